#!/usr/bin/env bash
# The quick-start demo, on the CPU: installs into .venv, trains DiT-XS/2 with all eight MP switches on the
# built-in digits, samples a grid of every class with the post-hoc EMA, and computes its FID against the
# digits. Everything lands in a run folder under ${DEMO_DIR:-demo}/.
set -euo pipefail
cd "$(dirname "$0")"
source install.sh
OUT=${DEMO_DIR:-demo}
STEPS=${DEMO_STEPS:-1000}
start=$(date +%s)

"$PY" train.py --results-dir "$OUT" --model DiT-XS/2 --use-all-mp --lr 1e-2 --num-steps "$STEPS" --batch-size 32 \
  --num-workers 1 --log-every 50 --ckpt-every 500 --ema-snapshot-every 20 --magnitude-every 20
RUN=$(ls -d "$OUT"/*-DiT-XS-2 | sort | tail -n 1)
"$PY" sample.py --result-dir "$RUN" --num-samples 10 --num-sampling-steps 50 --output "$RUN/samples/grid.png"
"$PY" eval/sample_fid.py --result-dir "$RUN" --num-samples 400 --num-sampling-steps 25 --sampler ddim \
  --batch-size 400

echo
echo "demo done in $(( $(date +%s) - start )) s. Pictures:"
echo "  samples (one row per class):  $RUN/samples/grid.png"
echo "  loss curve:                   $RUN/loss.png"
echo "  activation/weight magnitudes: $RUN/magnitudes.png"
