"""The prompt's embeddings gathered where the decoder runs, `feature_splice.onnx`: on a GPU, the projector's features
stay on the device and go into the prompt's embeddings there.

`projected_features [n_tiles, n_patches, D]` (the projector's output), `host_rows [1 + n_text, D]` (the image newline,
then the embeddings of the prompt's text tokens, in order) and `splice_index [B, T]` int64 -> `inputs_embeds [B, T,
D]`, all in the decoder's dtype: embedding (b, t) is row `splice_index[b, t]` of `host_rows` followed
by the flattened features (one Gather). The runtime computes the index with the host path's own packing
(`ortllava.embedding.features.splice_index`), so both give the same embeddings, bit for bit. Without it, the features would
go to the host, be packed and spliced there, and the embeddings come back: on the H200, 1.7 ms down, 11.5 ms of
host work with the GPU idle and 2.4 ms up for one photo on a 7B model. One graph serves every prompt; a few hundred bytes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ortllava.bundle import manifest as names
from ortllava.bundle.manifest import GraphSpec

from .fused_decoder import IR_VERSION

_ELEMENT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def build_feature_splice(path: Path, projector: GraphSpec, decoder: GraphSpec) -> GraphSpec:
    """Writes the gather from `projector`'s output into `decoder`'s input embeddings to `path`. For a `gqa` decoder,
    whose activations are in its vision graphs' dtype (fp16 where the bundle is for CUDA, else fp32)."""
    if projector.dtype != decoder.dtype:
        raise ValueError(f"the projector gives {projector.dtype} features, the decoder takes {decoder.dtype} embeddings")
    element = _ELEMENT_TYPES[decoder.dtype]
    nodes = [
        helper.make_node("Flatten", [names.PROJECTED_FEATURES], ["features"], "flatten", axis=2),  # [n_tiles * n_patches, D]
        helper.make_node("Concat", [names.SPLICE_HOST_ROWS, "features"], ["rows"], "concat", axis=0),
        helper.make_node("Gather", ["rows", names.SPLICE_INDEX], [names.INPUTS_EMBEDS], "gather", axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "feature_splice",
        [
            helper.make_tensor_value_info(names.PROJECTED_FEATURES, element, ["tiles", "patches", "hidden"]),
            helper.make_tensor_value_info(names.SPLICE_HOST_ROWS, element, ["host_rows", "hidden"]),
            helper.make_tensor_value_info(names.SPLICE_INDEX, TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info(names.INPUTS_EMBEDS, element, ["batch", "sequence", "hidden"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION, producer_name="ortllava")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return GraphSpec(file=path.name, inputs=list(names.FEATURE_SPLICE_INPUTS), outputs=[names.INPUTS_EMBEDS], dtype=decoder.dtype)
