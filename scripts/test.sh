#!/usr/bin/env bash
# Installs tfcert with its test dependencies into .venv/ (once) and runs the whole test
# suite (slow tests included).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
PY="$(venv_python dev)"
exec "$PY" -m pytest "$@"
