#!/usr/bin/env bash
# One GPU sitting, one command: everything the project measures on a GPU, most important first, each stage
# under its own time limit, the results in one folder that comes back whole.
#   1. install: the packages the machine lacks, offline from $WHEELHOUSE (benchmarks/wheelhouse.sh), if set;
#      then ablate.py --check-install (every import and data file of the protocol, one line if any is missing);
#   2. the protocol: ablate.py --preset gpu-mnist (rungs 0, 5, 7, two seeds, FID-2K at the end and during
#      training; `python ablate.py --preset gpu-mnist --dry-run` predicts its stages); cut at T_PROTOCOL, its
#      report is then written from whatever finished (--report-only), the missing runs marked;
#   3. the throughput table of RESULTS.md: bench.py --preset gpu, cut at T_BENCH.
# $OUT gets at most 8 files: ablation.md / .json (the report), ablation_curves.png (FID over training),
# stages.jsonl (each stage's wall time), throughput.md / .json, sitting.log (everything printed, ending with
# the protocol's and the sitting's "where the minutes went"). The runs themselves (checkpoints, EMA
# snapshots) go to $WORK, outside $OUT.
#
#   bash benchmarks/gpu_sitting.sh                                       # OUT=gpu-sitting
#   WHEELHOUSE=wheelhouse COMMIT=$(git rev-parse --short HEAD) T_PROTOCOL=360 bash benchmarks/gpu_sitting.sh
#   OUT=/tmp/s BENCH_ARGS="--models DiT-XS/8:8 ..." bash benchmarks/gpu_sitting.sh --num-steps 4 ...  # rehearsal
#
# Flags after the script name go to ablate.py (they override the preset's values; a test rehearses the whole
# sitting this way on a CPU). Knobs (environment): OUT, WORK (default $OUT.work), PYTHON, COMMIT (stamped in
# the log where the copy has no git metadata), WHEELHOUSE, T_INSTALL (120 s), T_PROTOCOL (420 s), T_REPORT
# (120 s), T_BENCH (180 s), BENCH_ARGS (default --preset gpu). Re-running continues: finished runs and FIDs
# in $WORK are reused.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-gpu-sitting}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK="${WORK:-$OUT.work}"
LOG="$OUT/sitting.log"
export PYTHONUNBUFFERED=1
SUMMARY=()

# stage NAME LIMIT COMMAND...: runs COMMAND under a time limit (its whole process group: the protocol's
# training processes too), printing into the log, and notes its wall time and exit status for the summary.
stage() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout -k 15 "$limit" "$@"
  rc=$?
  [ "$rc" = 124 ] && echo "== $name: cut at its time limit of ${limit} s"
  echo "== $name: exit $rc, $((SECONDS - t0)) s"
  SUMMARY+=("| $name | $((SECONDS - t0)) | $limit | $rc |")
  return "$rc"
}

{
  echo "== gpu_sitting.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', \
torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; $(nproc) cores"

  if [ -n "${WHEELHOUSE:-}" ]; then
    stage install "${T_INSTALL:-120}" bash benchmarks/wheelhouse.sh install "$WHEELHOUSE" "$PYTHON"
  fi
  if stage "install check" 60 "$PYTHON" ablate.py --preset gpu-mnist --check-install "$@"; then
    stage protocol "${T_PROTOCOL:-420}" "$PYTHON" ablate.py --preset gpu-mnist --out-dir "$WORK" "$@"
    # Cut short or not: the report of whatever finished (a finished protocol wrote it already; this is quick).
    stage report "${T_REPORT:-120}" "$PYTHON" ablate.py --preset gpu-mnist --out-dir "$WORK" --report-only "$@"
    for f in ablation.md ablation.json ablation_curves.png stages.jsonl; do
      [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"
    done
  else
    echo "== the protocol needs what the install check names; skipped (the throughput table needs torch only)"
  fi
  read -r -a bench_args <<<"${BENCH_ARGS:---preset gpu}"
  stage throughput "${T_BENCH:-180}" "$PYTHON" bench.py "${bench_args[@]}" --time-budget $(( ${T_BENCH:-180} - 60 > 10 ? ${T_BENCH:-180} - 60 : 10 )) \
    --out "$OUT/throughput"

  echo
  echo "The sitting, where the minutes went:"
  echo
  echo "| stage | seconds | limit s | exit |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "gpu_sitting.sh: $SECONDS s wall time; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} 2>&1 | tee -a "$LOG"
