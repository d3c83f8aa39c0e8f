#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Offline: tiny checkpoints are built in the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
