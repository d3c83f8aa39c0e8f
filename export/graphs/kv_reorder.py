"""The key/value row gather, `kv_reorder.onnx`: beam search's reorder of a cache's rows, run where the cache lives.

`rows [B]` int64 and every layer's key and value `[B, n_kv, C, head_dim]` (named as the decoder's past) ->
`reordered.{i}.key/value`, row b of each being row `rows[b]` of its input (a Gather on axis 0 each). On a GPU a beam
search step runs it twice: into a scratch copy of the cache, then back into the decoder's bound buffers with the rows
in order (the decoder's step binding, and a captured CUDA graph, keep their addresses). Without it, the rows would go
to the host and back each step. One graph serves every batch, length and capacity; a few kilobytes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ortllava.bundle import manifest as names
from ortllava.bundle.manifest import GraphSpec

from .fused_decoder import IR_VERSION

_ELEMENT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}


def build_kv_reorder(path: Path, decoder: GraphSpec) -> GraphSpec:
    """Writes the gather for `decoder`'s keys/values (as many layers as its past inputs; its `kv_dtype`, else its
    `dtype`) to `path`."""
    element = _ELEMENT_TYPES[decoder.kv_dtype or decoder.dtype]
    layers = range(sum(name.startswith("past_key_values.") for name in decoder.inputs) // 2)
    past = [n for layer in layers for n in (names.past_key_name(layer), names.past_value_name(layer))]
    assert all(name in decoder.inputs for name in past), decoder.inputs
    reordered = [n for layer in layers for n in (names.reordered_key_name(layer), names.reordered_value_name(layer))]
    axes = ["batch", "kv_heads", "positions", "head_dim"]
    graph = helper.make_graph(
        [helper.make_node("Gather", [source, names.KV_ROWS], [target], f"gather/{target}", axis=0) for source, target in zip(past, reordered)],
        "kv_reorder",
        [helper.make_tensor_value_info(names.KV_ROWS, TensorProto.INT64, ["batch"])]
        + [helper.make_tensor_value_info(name, element, axes) for name in past],
        [helper.make_tensor_value_info(name, element, axes) for name in reordered],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION, producer_name="ortllava")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return GraphSpec(
        file=path.name, inputs=[names.KV_ROWS, *past], outputs=reordered, dtype=decoder.dtype,
        kv_dtype=decoder.kv_dtype if decoder.kv_dtype and decoder.kv_dtype != decoder.dtype else "",
    )
