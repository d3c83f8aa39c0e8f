"""4-bit weight-only quantization of the decoder's linear layers -> onnxruntime's `MatMulNBits`.

Round-to-nearest per block of `block_size` input rows, with onnxruntime's own kernel
(`quantize_matmul_4bits`, what its `MatMulNBitsQuantizer` calls), one weight at a time either way in:
- `quantize_weight`: as the fused decoder builder adds each weight;
- `quantize_decoder`: a traced graph ("concat" decoders), rewritten weight by weight from its data file (the
  same nodes and bytes as `MatMulNBitsQuantizer`, which would hold the whole fp32 graph in memory).
The lm_head is quantized only when asked: it sets every logit, and a 4-bit lm_head costs the most accuracy.
Activations keep the graph's dtype: fp16 for CUDA, fp32 for the CPU (where `accuracy_level` 4 lets MLAS
compute the products in int8 after quantizing each activation block).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ortllava.bundle.manifest import GraphSpec


@dataclass
class Int4Options:
    block_size: int = 32  # input rows per scale; 32 keeps accuracy close to fp16, 128 makes files ~6% smaller
    symmetric: bool = True  # False adds a zero point per block
    quantize_lm_head: bool = False
    accuracy_level: int | None = None  # MatMulNBits compute type; None: 4 (int8) for CPU targets, the provider's default on CUDA

    def manifest_entry(self) -> dict:
        """What a quantized graph's `GraphSpec.quantization` says."""
        return {
            "method": "MatMulNBits", "bits": 4, "block_size": self.block_size, "symmetric": self.symmetric,
            "quantize_lm_head": self.quantize_lm_head, "accuracy_level": self.accuracy_level,
        }


def quantize_weight(weight: np.ndarray, options: Int4Options, scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`weight [K, N]` -> (packed `[N, K / block, block / 2]` uint8, scales `[N, K / block]`, zero points or None).

    The layout of `MatMulNBits`' B, scales and zero_points inputs (K padded up to a whole block).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    block = options.block_size
    blocks = -(-rows // block)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if blocks * block != rows:
        weight = np.pad(weight, ((0, blocks * block - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block // 2), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, -(-blocks // 2)), np.uint8)
    quantize_matmul_4bits(packed, weight, scales, zero_points, block, cols, rows, options.symmetric)
    return packed, scales.astype(scale_dtype), None if options.symmetric else zero_points


def matmul_nbits_attributes(rows: int, cols: int, options: Int4Options) -> dict:
    """`MatMulNBits`' attributes for a weight `[rows, cols]` (K, N)."""
    attributes = dict(K=rows, N=cols, bits=4, block_size=options.block_size)
    if options.accuracy_level:
        attributes["accuracy_level"] = options.accuracy_level
    return attributes


def _names_read(graph):
    """Every value name the graph's nodes (subgraphs included) and outputs read."""
    for node in graph.node:
        yield from node.input
        for attribute in node.attribute:
            for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                yield from _names_read(subgraph)
    yield from (output.name for output in graph.output)


def quantize_decoder(spec: GraphSpec, folder: Path, options: Int4Options) -> GraphSpec:
    """Rewrites the traced fp32 graph `folder / spec.file`: each MatMul over a 2-D fp32 weight becomes a
    `MatMulNBits` (the lm_head only with `options.quantize_lm_head`). Returns the updated spec.

    One weight at a time: each fp32 weight is read alone from the graph's data file and the new tensors
    streamed to a new one, so neither graph is ever held whole (a 7B model's traced graph is 28 GB).
    """
    import onnx
    from onnx import TensorProto, helper

    from .weight_file import WeightWriter, read_tensor

    path = folder / spec.file
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses = Counter(_names_read(graph))
    location = spec.file + ".data"
    scratch = folder / (location + ".quantizing")
    with open(scratch, "wb") if spec.external_data else contextlib.nullcontext() as data:
        writer = WeightWriter(data, location)
        written, nodes = [], []
        quantized: dict[str, list[str]] = {}  # fp32 weight -> MatMulNBits' inputs for it
        for node in graph.node:
            weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
            if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT or (
                "lm_head" in weight.name and not options.quantize_lm_head
            ):
                nodes.append(node)
                continue
            if weight.name not in quantized:
                packed, scales, zero_points = quantize_weight(read_tensor(weight, folder), options, np.float32)
                parts = {f"{weight.name}_Q4": packed, f"{weight.name}_scales": scales}
                if zero_points is not None:
                    parts[f"{weight.name}_zero_points"] = zero_points
                written += [writer.tensor(name, array) for name, array in parts.items()]
                quantized[weight.name] = list(parts)
            nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], *quantized[weight.name]], list(node.output), name=node.name,
                domain="com.microsoft", **matmul_nbits_attributes(*weight.dims, options),
            ))
            uses[weight.name] -= 1
        # The other initializers, copied across one at a time (a quantized weight another node reads stays too).
        written += [
            writer.tensor(tensor.name, read_tensor(tensor, folder)) if tensor.data_location == TensorProto.EXTERNAL else tensor
            for tensor in graph.initializer if uses[tensor.name] > 0
        ]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(written)
    if not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for extra in spec.external_data:
        (folder / extra).unlink()
    if spec.external_data:
        scratch.rename(folder / location)
    onnx.save_model(model, str(path))
    spec.external_data = [location] if spec.external_data else []
    spec.quantization = options.manifest_entry()
    return spec
