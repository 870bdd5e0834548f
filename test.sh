#!/usr/bin/env bash
# Installs what the project needs into .venv and runs the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
source install.sh
exec "$PY" -m pytest -q tests "$@"
