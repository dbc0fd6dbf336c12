#!/usr/bin/env bash
# Installs tfcert with its test dependencies into .venv/ (once) and runs the whole test
# suite (slow tests included).  Extra arguments go to pytest: `-m "not slow"` runs the
# fast tier (every module's unit tests, for the edit-test loop).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
PY="$(venv_python dev)"
exec "$PY" -m pytest "$@"
