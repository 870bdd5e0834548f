#!/usr/bin/env bash
# The one-GPU ablation protocol (ablate.py --preset gpu-mnist), meant for under 8 minutes of device time:
# MNIST 16x16, DiT-XS/2, batch 256, 2,500 steps; no MP at lr 1e-3 and 1e-4, all eight switches at MP lr
# 1e-2 and 3e-3, all eight with scale+rotation+gate modulation at MP lr 1e-2 (all eight leave no plain
# parameter: the MP lr is the whole model's); two seeds each; FID-2K (100 DDPM steps,
# CFG 1.5, post-hoc EMA σ_rel 0.05) against the 10,000 MNIST test images, and FID-2K (20 DPM-Solver++ steps)
# every 500 steps. Ten runs train at once on the one card (small models leave it mostly idle).
#
#   bash benchmarks/ablation_gpu.sh                    # writes ablation-gpu/ (ablation.md, .json, PNGs, runs/)
#   OUT=/tmp/abl bash benchmarks/ablation_gpu.sh --num-steps 4 --model DiT-XS/8 ...   # any ablate.py flag
#
# Flags after the script name override the preset's values (a test runs it this way on a CPU with a tiny
# budget). Re-running continues: finished runs and FIDs are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
OUT="${OUT:-ablation-gpu}"
mkdir -p "$OUT"
start=$(date +%s)
"$PYTHON" ablate.py --preset gpu-mnist --out-dir "$OUT" "$@" 2>&1 | tee -a "$OUT/ablation_gpu.log"
echo "ablation_gpu.sh: $(( $(date +%s) - start )) s wall time; report $OUT/ablation.md, curves $OUT/ablation_curves.png" \
    | tee -a "$OUT/ablation_gpu.log"
