#!/usr/bin/env bash
# Creates .venv with the runtime, the exporter and the test tools. torch's CPU build goes in first: a plain
# `torch` requirement makes pip fetch the multi-GB CUDA build on Linux. Where pip's own configuration already
# supplies the CPU wheel (a local wheel folder, as on this project's CI machines) it comes from there, else
# from PyTorch's CPU index (TORCH_INDEX_URL overrides it). PyPI's macOS and Windows wheels are CPU builds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "$(uname -s)" != Linux ]; then
  python -m pip install -q "torch==2.13.0"
elif python -m pip install -q --dry-run --no-deps --no-index "torch==2.13.0+cpu" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0+cpu"
else
  python -m pip install -q "torch==2.13.0+cpu" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
python -m pip install -q -e ".[export,test]"
