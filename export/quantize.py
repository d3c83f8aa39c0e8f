"""4-bit weight-only quantization of the decoder's linear layers -> onnxruntime's `MatMulNBits`.

Round-to-nearest per block of `block_size` input rows, with onnxruntime's own kernel
(`quantize_matmul_4bits`, what its `MatMulNBitsQuantizer` calls). Two ways in:
- `quantize_weight`: one weight at a time, as the fused decoder builder adds it (bounded memory);
- `quantize_decoder`: a whole traced graph ("concat" decoders), through `MatMulNBitsQuantizer`.
The lm_head is quantized only when asked: it sets every logit, and a 4-bit lm_head costs the most accuracy.
Activations keep the graph's dtype: fp16 for CUDA, fp32 for the CPU (where `accuracy_level` 4 lets MLAS
compute the products in int8 after quantizing each activation block).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ortllava.manifest import GraphSpec


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


def _lm_head_nodes(model) -> list[str]:
    """Names of the MatMul nodes that read the lm_head weight (by the weight's name, in either decoder kind)."""
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and any("lm_head" in name for name in node.input)]


def quantize_decoder(spec: GraphSpec, folder: Path, options: Int4Options) -> GraphSpec:
    """Rewrites `folder / spec.file` with 4-bit weights; returns the updated spec."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .convert import rewrite_graph  # (torch: imported when used, so the CLI's --help runs without it)

    def quantize(model):
        exclude = [] if options.quantize_lm_head else _lm_head_nodes(model)
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
            nodes_to_exclude=exclude,
        )
        quantizer.process()
        return quantizer.model.model

    rewrite_graph(spec, folder, quantize)
    spec.quantization = options.manifest_entry()
    return spec
