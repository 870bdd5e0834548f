#!/bin/bash
# End-to-end training throughput, as a user runs it: train.py with DiT-XS/2, all eight switches, global
# batch 32, 80 steps, on 2,560 random 4x16x16 latents in the reference format, every other option at its
# default. With REF=/path/to/the/paper's/code (its train.py; it needs einops) the paper's code trains on
# the same data in turn, with the same switches and EMA snapshots every step (train.py's default for 80
# steps; the paper's code divides by its own default of steps//250 = 0 here, so it must be given one).
# 2,560 items are exactly one epoch of 80 batches: the paper's loop checks --num-steps only between epochs.
#
#   bash benchmarks/train_end_to_end.sh                      # ours, with default and per-step magnitudes
#   REF=/tmp/map-dit RUNS=5 bash benchmarks/train_end_to_end.sh
#
# Each line: the command's wall time (start-up included) and 80 x 32 images / that time. Quote medians,
# and run it on a quiet machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
RUNS=${RUNS:-3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" "$ROOT/benchmarks/random_latents.py" "$WORK/latents" --num 2560 --classes 10 >/dev/null
SWITCHES="--use-cosine-attention --use-weight-normalization --use-forced-weight-normalization --use-mp-residual
          --use-mp-silu --use-no-layernorm --use-mp-pos-enc --use-mp-embedding"
COMMON="--data-path $WORK/latents --model DiT-XS/2 --batch-size 32 --num-steps 80 --num-classes 10"

timed() {  # NAME FOLDER COMMAND...: runs COMMAND in FOLDER, prints its wall time and img/s
  local name=$1 dir=$2; shift 2
  rm -rf "$WORK/results"
  local start end
  start=$(date +%s.%N)
  (cd "$dir" && "$@" >"$WORK/$name.log" 2>&1) || { echo "$name failed:"; tail -5 "$WORK/$name.log"; exit 1; }
  end=$(date +%s.%N)
  awk -v n="$name" -v s="$start" -v e="$end" 'BEGIN { printf "%-22s %7.1f s  %6.1f img/s\n", n, e - s, 80 * 32 / (e - s) }'
}

for round in $(seq "$RUNS"); do
  # shellcheck disable=SC2086
  timed "ours" "$ROOT" "$PY" train.py $COMMON $SWITCHES --results-dir "$WORK/results"
  if [ -n "${REF:-}" ]; then
    # shellcheck disable=SC2086
    timed "paper's code" "$REF" "$PY" train.py $COMMON $SWITCHES --ema-snapshot-every 1 --results-dir "$WORK/results"
  else
    # shellcheck disable=SC2086
    timed "ours, magnitudes/step" "$ROOT" "$PY" train.py $COMMON $SWITCHES --magnitude-every 1 --results-dir "$WORK/results"
  fi
done
