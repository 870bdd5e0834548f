#!/usr/bin/env bash
# Installs what the project needs into .venv and runs the test suite (extra arguments go to pytest).
# Two pytest-xdist workers, a test file each at a time (module fixtures train once): the suite takes about
# two thirds of its serial time on a 2-core machine. TEST_WORKERS=0 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")"
source install.sh
exec "$PY" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile tests "$@"
