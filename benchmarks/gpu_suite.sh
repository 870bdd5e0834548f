#!/usr/bin/env bash
# The GPU measurements behind the README's tables, in one command (about 8 minutes on an H100/H200):
#   1. bench.py --preset gpu: training / sampling throughput and memory, switches none vs all eight,
#      TF32 eager, bf16 eager and bf16 + torch.compile, for DiT-XS/2, DiT-S/4 (4x16x16), DiT-B/2 (4x32x32);
#   2. the loss curves of DiT-XS/2 with all eight switches on the digits in TF32 and in bf16.
# Usage: OUT=folder bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
"$PY" bench.py --preset gpu --time-budget "${BENCH_BUDGET:-330}" --out "$OUT/bench-gpu" || echo "bench failed: $?"
runs=$(mktemp -d)
for precision in tf32 bf16; do
  "$PY" train.py --use-all-mp --lr 1e-2 --num-steps 600 --batch-size 256 --precision "$precision" \
    --results-dir "$runs/$precision" --log-every 20 --ckpt-every 600 --ema-snapshot-every 600 \
    --magnitude-every 600 --num-workers 4 || echo "training in $precision failed: $?"
  cp "$runs/$precision"/*/metrics.jsonl "$OUT/curve-$precision.jsonl" || true
done
