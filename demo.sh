#!/usr/bin/env bash
# The quick-start demo, on the CPU: installs into .venv, trains DiT-XXS/2 with all eight MP switches on the
# built-in digits (16x16) for 2,000 steps, and samples a grid of every class with the post-hoc EMA.
# Everything lands in a run folder under ${DEMO_DIR:-demo}/. DEMO_FID=1 adds a small FID (5.5 minutes
# more on a 2-core CPU); DEMO_STEPS=N trains N steps instead.
set -euo pipefail
cd "$(dirname "$0")"
source install.sh
OUT=${DEMO_DIR:-demo}
STEPS=${DEMO_STEPS:-2000}
start=$(date +%s)

# A constant rate (decay starts at the last step): in a run this short, the EMA does the averaging.
"$PY" train.py --results-dir "$OUT" --model DiT-XXS/2 --use-all-mp --lr 2e-2 --num-steps "$STEPS" \
  --start-decay "$STEPS" --batch-size 32 --num-workers 0 --log-every 100 --ckpt-every "$STEPS" \
  --ema-snapshot-every $(( STEPS >= 40 ? STEPS / 40 : 1 ))
RUN=$(ls -d "$OUT"/*-DiT-XXS-2 | sort | tail -n 1)
"$PY" sample.py --run-dir "$RUN" --num-samples 10 --sampler dpm-solver++ --num-sampling-steps 20 \
  --cfg-scale 3 --output "$RUN/samples/grid.png"
if [ "${DEMO_FID:-0}" = 1 ]; then
  "$PY" -m eval.sample_fid --run-dir "$RUN" --num-samples 400 --num-sampling-steps 20 --sampler dpm-solver++ \
    --cfg-scale 1.5 --batch-size 400
fi

echo
echo "demo done in $(( $(date +%s) - start )) s. Pictures:"
echo "  samples (one row per class):  $RUN/samples/grid.png"
echo "  loss curve:                   $RUN/loss.png"
echo "  activation/weight magnitudes: $RUN/magnitudes.png"
