#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md's tables, in one command (about 13 minutes on an H200),
# the most important first. Every step has a time limit (T1..T5 seconds, from the environment) and writes
# its own files, so a cut-short run keeps what it finished:
#   1. bench.py, bf16 + torch.compile with CUDA graphs (--compile-mode reduce-overhead): switches none vs all
#      eight, DiT-XS/2 and DiT-S/4 on 4x16x16, DiT-B/2 on 4x32x32, batch 256;
#   2. the same with torch.compile's default mode;
#   3. benchmarks/profile_step.py: kernels per step and device vs wall time, DiT-S/4, bf16 + compile;
#   4. bench.py in eager mode, bf16 and TF32;
#   5. the loss curves of DiT-XS/2 with all eight switches on the digits, TF32 and bf16 (600 steps).
# Usage: OUT=folder bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
MODELS=(DiT-XS/2:16 DiT-S/4:16 DiT-B/2:32)
COMMON=(--switches none all --batch-size 256 --warmup 3 --steps 10 --min-time 1)

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $?, $((SECONDS - t0)) s"
  grep -E "^  |FAILED|skip|^\| |error|Error" "$OUT/$name.log" | tail -n 30
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__)"
  echo "commit ${COMMIT:-?}"; } | tee "$OUT/gpu.txt"
T1=${T1:-330} T2=${T2:-300}
step bench-compile-cudagraphs "$T1" env TORCH_LOGS=perf_hints "$PY" bench.py --models "${MODELS[@]}" "${COMMON[@]}" --precisions bf16 \
  --compile on --compile-mode reduce-overhead --time-budget $((T1 - 60)) --out "$OUT/bench-compile-cudagraphs"
step bench-compile "$T2" "$PY" bench.py --models "${MODELS[@]}" "${COMMON[@]}" --precisions bf16 \
  --compile on --time-budget $((T2 - 60)) --out "$OUT/bench-compile"
step profile-s4 "${T3:-75}" "$PY" -m benchmarks.profile_step --model DiT-S/4:16 --precision bf16 --compile on
step bench-eager "${T4:-75}" "$PY" bench.py --models "${MODELS[@]}" "${COMMON[@]}" --precisions bf16 tf32 \
  --compile off --time-budget 60 --out "$OUT/bench-eager"
runs=$(mktemp -d)
for precision in tf32 bf16; do
  step "curve-$precision" "${T5:-120}" "$PY" train.py --use-all-mp --lr 1e-2 --num-steps 600 --batch-size 256 \
    --precision "$precision" --results-dir "$runs/$precision" --log-every 20 --ckpt-every 600 \
    --ema-snapshot-every 600 --magnitude-every 600 --num-workers 4
  cp "$runs/$precision"/*/metrics.jsonl "$OUT/curve-$precision.jsonl" || true
done
echo "== done in $SECONDS s"
