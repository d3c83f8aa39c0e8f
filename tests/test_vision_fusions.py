"""The vision encoder's graph rewrites (export/graphs/vision_fusions.py): what they produce, that the rewritten graph computes
what the exported one does, and that a node outside the patterns is left as it was. (That the bundle's vision
features match transformers' is test_pipeline's and the export's validation.)"""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from ortllava.bundle.manifest import read_manifest


@pytest.fixture(scope="module")
def exported(mistral, tmp_path_factory):
    """The tiny Mistral's vision encoder as torch.onnx exports it (no rewrites), and its Attention count."""
    import torch
    from torch.export import Dim
    from transformers import LlavaNextForConditionalGeneration

    from ortllava.bundle import manifest as names
    from ortllava_export.graphs.convert import VISION_OPSET, _export
    from ortllava_export.graphs.wrappers import VisionEncoder

    model = LlavaNextForConditionalGeneration.from_pretrained(mistral.checkpoint).eval()
    model.model.vision_tower.config._attn_implementation = "sdpa"  # (as export_vision_encoder)
    size = model.config.vision_config.image_size
    path = tmp_path_factory.mktemp("vision") / "vision_encoder.onnx"
    _export(
        VisionEncoder(model).eval(), (torch.zeros(2, 3, size, size),), ({0: Dim("tiles", min=1, max=1024)},),
        [names.PIXEL_VALUES], [names.IMAGE_FEATURES], path, opset=VISION_OPSET,
    )
    graph = onnx.load(str(path))
    return graph, sum(1 for n in graph.graph.node if n.op_type == "Attention")


def _run(model: onnx.ModelProto, tiles: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": tiles})


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _tiles(model: onnx.ModelProto, count: int = 3) -> np.ndarray:
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    return np.random.default_rng(0).standard_normal((count, 3, size, size)).astype(np.float32)


def test_the_bundle_vision_encoder_is_rewritten(mistral):
    """Every layer's Attention on 3-D tensors: no Transposes or Reshapes around it."""
    model = onnx.load(str(mistral.bundle / read_manifest(mistral.bundle).graphs["vision_encoder"].file))
    ops = _ops(model)
    layers = ops["Attention"]
    assert layers >= 1 and ops["Transpose"] == 1  # (the patch embedding's, before the layers)
    assert all(helper.get_attribute_value(a) > 0 for n in model.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "q_num_heads")
    assert ops["Reshape"] == 1  # (the patch embedding's too)


def test_the_rewrites_compute_what_the_export_does(exported):
    """Against the graph as exported, on other tile counts than the export traced."""
    from ortllava_export.graphs.vision_fusions import fuse_vision_encoder

    original, layers = exported
    fused = fuse_vision_encoder(copy.deepcopy(original))
    onnx.checker.check_model(fused)
    assert _ops(fused)["Attention"] == layers and _ops(fused)["Transpose"] == 1
    for count in (1, 3):
        tiles = _tiles(original, count)
        (want,), (got,) = _run(original, tiles), _run(fused, tiles)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    again = fuse_vision_encoder(copy.deepcopy(fused))  # nothing left to rewrite
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in fused.graph.node]


def test_a_node_outside_the_patterns_is_left_alone(exported):
    """A tensor inside a pattern that something else also reads (here: the first layer's transposed query, made a
    graph output) keeps that layer's Attention as exported; the other layers are still rewritten, and the graph still
    computes the same."""
    from ortllava_export.graphs.vision_fusions import fuse_vision_encoder

    original, layers = exported
    first_attention = next(n for n in original.graph.node if n.op_type == "Attention")
    query = first_attention.input[0]
    exposed = copy.deepcopy(original)
    exposed.graph.output.append(helper.make_tensor_value_info(query, onnx.TensorProto.FLOAT, ["tiles", None, None, None]))
    fused = fuse_vision_encoder(copy.deepcopy(exposed))
    onnx.checker.check_model(fused)
    attentions = [n for n in fused.graph.node if n.op_type == "Attention"]
    assert attentions[0].input[0] == query and not any(a.name == "q_num_heads" for a in attentions[0].attribute)
    assert all(any(a.name == "q_num_heads" for a in n.attribute) for n in attentions[1:]) and len(attentions) == layers
    tiles = _tiles(original, 2)
    for want, got in zip(_run(exposed, tiles), _run(fused, tiles)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
