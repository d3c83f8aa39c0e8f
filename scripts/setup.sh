#!/usr/bin/env bash
# Creates .venv with the runtime, the exporter and the test tools. The CPU build of torch is pinned
# first: an open `torch` requirement would make pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,test]"
