#!/usr/bin/env bash
# The GPU check's last call (see ../shared/gpu/README.md): onnxruntime-gpu is already in /tmp/site; this puts
# the checkout on the path and runs scripts/gpu/check.py, writing its results under $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/pkgs:${PYTHONPATH:-}
mkdir -p /tmp/pkgs
ln -sfn "$PWD/ortllava" /tmp/pkgs/ortllava
ln -sfn "$PWD/export" /tmp/pkgs/ortllava_export
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c 'import torch, onnxruntime as o; print(o.__version__, o.get_available_providers())'
python3 scripts/gpu/check.py --device cuda --out "$OUT" "$@" 2>&1 | grep -v "Writing model shards\|Loading weights" | tee "$OUT/log.txt"
