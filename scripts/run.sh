#!/usr/bin/env bash
# Install (if needed) and run an experiment; with no arguments, the default F2C training run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- method=f2c; fi
exec .venv/bin/python experiments/run.py "$@"
