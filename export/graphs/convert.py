"""One ONNX export call per graph (torch.onnx's dynamo exporter), with the bundle's I/O names and dynamic axes."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from ortllava.bundle import manifest as names
from ortllava.bundle.manifest import GraphSpec

from .vision_fusions import fuse_vision_encoder
from .wrappers import Decoder, Projector, VisionEncoder, text_geometry

# Above this many bytes of weights a graph keeps them in an external data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30

# Shapes used for tracing; validation uses others (see validate.py).
TRACE_TILES = 2
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 5, 3


# Opset 23 has the fused `Attention` op, which the exporter emits for scaled_dot_product_attention (the
# vision tower's attention): one kernel per layer on the CPU and CUDA providers instead of MatMul/Softmax.
VISION_OPSET = 23


# The exporter warns once per torchvision op it cannot register; torchvision is not used here.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes, input_names, output_names, path: Path, opset: int | None = None) -> GraphSpec:
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
            output_names=output_names, optimize=True, verbose=False, opset_version=opset,
        )
    data_file = path.name + ".data"
    program.save(str(path), external_data=external)
    extra = [data_file] if external and os.path.exists(path.parent / data_file) else []
    return GraphSpec(file=path.name, inputs=list(input_names), outputs=list(output_names), external_data=extra)


def export_vision_encoder(model, path: Path) -> GraphSpec:
    vision = model.config.vision_config
    pixels = torch.randn(TRACE_TILES, 3, vision.image_size, vision.image_size)
    model.model.vision_tower.config._attn_implementation = "sdpa"  # -> the fused Attention op
    spec = _export(
        VisionEncoder(model).eval(), (pixels,), ({0: Dim("tiles", min=1, max=1024)},),
        [names.PIXEL_VALUES], [names.IMAGE_FEATURES], path, opset=VISION_OPSET,
    )
    return rewrite_graph(spec, path.parent, fuse_vision_encoder)


def export_projector(model, path: Path) -> GraphSpec:
    vision = model.config.vision_config
    layers = 1 if isinstance(model.config.vision_feature_layer, int) else len(model.config.vision_feature_layer)
    features = torch.randn(TRACE_TILES, (vision.image_size // vision.patch_size) ** 2, vision.hidden_size * layers)
    return _export(
        Projector(model).eval(), (features,), ({0: Dim("tiles", min=1, max=1024), 1: Dim("patches", min=1, max=65536)},),
        [names.IMAGE_FEATURES], [names.PROJECTED_FEATURES], path,
    )


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = [names.INPUTS_EMBEDS, names.ATTENTION_MASK, names.POSITION_IDS]
    outputs = [names.LOGITS]
    for layer in range(num_layers):
        inputs += [names.past_key_name(layer), names.past_value_name(layer)]
        outputs += [names.present_key_name(layer), names.present_value_name(layer)]
    return inputs, outputs


def decoder_example(model, batch: int, seq: int, past: int, mask: torch.Tensor | None = None, generator=None) -> tuple:
    """Random decoder inputs; `mask` defaults to all ones. Position ids follow the mask (as transformers)."""
    layers, kv_heads, head_dim = text_geometry(model.config)
    hidden = model.config.text_config.hidden_size
    if mask is None:
        mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, past:]
    embeds = torch.randn(batch, seq, hidden, generator=generator)
    cache = tuple(torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * layers))
    return embeds, mask, positions.contiguous(), cache


def export_decoder(model, path: Path) -> GraphSpec:
    layers, _, _ = text_geometry(model.config)
    batch, seq, past, total = Dim("batch", min=1, max=256), Dim("seq", min=1, max=131072), Dim("past", min=0, max=131072), Dim("total", min=1, max=262144)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in range(2 * layers)))
    inputs, outputs = decoder_io_names(layers)
    spec = _export(Decoder(model).eval(), decoder_example(model, TRACE_BATCH, TRACE_SEQ, TRACE_PAST), dynamic, inputs, outputs, path)
    spec.kind = "concat"
    return spec


def convert_to_fp16(spec: GraphSpec, folder: Path) -> GraphSpec:
    """Rewrites an fp32 graph in fp16 (weights, inputs and outputs), with onnxruntime's converter.

    The converter keeps the ops it knows to be unsafe in fp16 in fp32 behind casts; LayerNormalization and
    the fused Attention compute their reductions in fp32 internally.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    rewrite_graph(spec, folder, lambda model: convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True))
    spec.dtype = "float16"
    return spec


def rewrite_graph(spec: GraphSpec, folder: Path, transform) -> GraphSpec:
    """Loads `folder / spec.file`, replaces it with `transform(model)` (its weights in one external data file
    when they are large) and updates `spec.external_data`."""
    import onnx

    path = folder / spec.file
    model = onnx.load(str(path))
    for extra in spec.external_data:
        (folder / extra).unlink()
    rewritten = transform(model)
    external = sum(t.ByteSize() for t in rewritten.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_file = path.name + ".data"
    onnx.save_model(rewritten, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data_file, size_threshold=1024)
    spec.external_data = [data_file] if external else []
    return spec
