#!/usr/bin/env bash
# The GPU check's last call (see ../shared/gpu/README.md): onnxruntime-gpu is already in /tmp/site; this puts
# the checkout on the path and runs scripts/gpu/check.py, writing its results under $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/pkgs:${PYTHONPATH:-}
mkdir -p /tmp/pkgs
ln -sfn "$PWD/ortllava" /tmp/pkgs/ortllava
ln -sfn "$PWD/export" /tmp/pkgs/ortllava_export
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/nvidia-smi.txt"
# onnxruntime lists the CUDA provider whenever its library is present; a session shows whether it starts (a
# missing CUDA or cuDNN library makes a CPU session), so a broken install stops here, not minutes into the check.
python3 - <<'PY' || exit 1
import torch, onnxruntime as ort
from onnx import TensorProto, helper
print(ort.__version__, ort.get_available_providers())
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "smoke", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("smoke session providers:", session.get_providers())
raise SystemExit(0 if session.get_providers()[0] == "CUDAExecutionProvider" else "the CUDA provider did not start")
PY
# (--line-buffered: a run cut short by its timeout keeps every line it printed)
python3 scripts/gpu/check.py --device cuda --out "$OUT" "$@" 2>&1 | grep --line-buffered -v "Writing model shards\|Loading weights" | tee "$OUT/log.txt"
