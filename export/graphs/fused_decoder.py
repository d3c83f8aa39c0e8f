"""The fused decoder graph, written node by node from the checkpoint's weights (no tracing).

Why build it by hand: onnxruntime's fastest decoder kernels (GroupQueryAttention with a key/value buffer
shared between past and present, fused rotary embedding, SkipSimplifiedLayerNormalization) are contrib
ops that no exporter emits reliably for our wrapper, and the graph is small: for each layer, the same
dozen nodes. onnxruntime-genai's model builder takes the same approach.

I/O spec (`kind = "gqa"`):
- `inputs_embeds [B, S, D]` (graph dtype): the prompt (or the new tokens) with image features spliced in,
  each row's real tokens first (right padding).
- `attention_mask [B, W]` int64: row b has `n_b` ones, the tokens in its cache after this step (past + new).
  Only the count and the width are used: `seqlens_k = n_b - 1`, `total_sequence_length = W`. A first
  prompt passes `W = S`; later steps may pass a fixed width (the buffer capacity) so shapes stay static.
- `past_key_values.{i}.key|value [B, n_kv, C, head_dim]`: the preallocated buffers (capacity `C`); the
  caller binds `present.{i}.key|value` to the same memory, and the op writes the new keys/values in place.
  Graph dtype, or int8 with `KVScales`.
- `logits [B, V]` float32: for each row, its last real new token (`min(seqlens_k, S - 1)`).

Per layer: SkipSimplifiedLayerNorm -> packed QKV MatMul (+ bias) -> attention (GroupQueryAttention, rotary
inside, sliding window where the layer has one; with fp32 activations or an int8 cache, an `If` between it and
a second form for decode steps or prompts: export/graphs/attention.py) -> o_proj -> SkipSimplifiedLayerNorm ->
gate/up MatMul -> SiLU * up -> down (with `Int4Options`, each of these MatMuls is a `MatMulNBits` over 4-bit
blocks, quantized as the weight is read). Granite's multipliers (embedding, attention scale, residual) are folded in as constants; its
logits_scaling is not: LlavaNextForConditionalGeneration's own lm_head does not apply it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ortllava.bundle import manifest as names
from ortllava.bundle.manifest import GraphSpec

from .attention import float_cache_attention, float_step_prelude, int8_cache_attention, int8_cache_prelude, op_attention
from .kv_cache import KVScales
from .quantize import Int4Options, matmul_nbits_attributes, quantize_weight
from .weight_file import WeightWriter
from .wrappers import text_geometry

OPSET = 21
IR_VERSION = 10  # what opset 21 needs; onnx's default (newer) is refused by older onnxruntime releases (1.31: max 13)
_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Decoders with more weight bytes than this stream them to an external data file as they are converted, so
# the exporter never holds a second copy of the model (and the graph stays under protobuf's 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 28
# Rotary tables longer than this are cut: the graph then serves at most this many positions (manifest: max_length).
MAX_ROTARY_POSITIONS = 131072


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = [names.INPUTS_EMBEDS, names.ATTENTION_MASK]
    outputs = [names.LOGITS]
    for layer in range(num_layers):
        inputs += [names.past_key_name(layer), names.past_value_name(layer)]
        outputs += [names.present_key_name(layer), names.present_value_name(layer)]
    return inputs, outputs


@dataclass
class _Graph:
    """Nodes and initializers being collected. `weight()` converts each tensor once, as it is added, and the
    writer streams large ones to the external data file at once, so the graph never holds a second full copy
    of the model."""

    dtype: type
    writer: WeightWriter = field(default_factory=WeightWriter)  # with a data file when the weights are large
    int4: Int4Options | None = None
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    weight_bytes: int = 0

    def weight(self, name: str, value, dtype=None) -> str:
        dtype = np.dtype(dtype or self.dtype)
        if isinstance(value, torch.Tensor):  # cast and transpose in torch: multi-threaded, one copy
            array = value.detach().to(_TORCH_DTYPES[dtype.name]).contiguous().numpy()
        else:
            array = np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))
        if dtype == np.float16 and not np.isfinite(array).all():  # (past ±65504: an unvalidated export would not see it)
            raise ValueError(f"the weight {name} holds values beyond fp16's range (±65504): export it in fp32, or as int4")
        self.weight_bytes += array.nbytes
        self.initializers.append(self.writer.tensor(name, array))
        return name

    def branch(self) -> _Graph:
        """An empty graph for an `If` branch: its nodes are its own; the weights it adds go to this graph's
        initializers (a branch reads them from the outer scope)."""
        return _Graph(self.dtype, self.writer, self.int4, initializers=self.initializers)

    def const_i64(self, name: str, values) -> str:
        return self.weight(name, np.array(values, dtype=np.int64), np.int64)

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, domain: str = "", **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def linear(self, x: str, weight: torch.Tensor, name: str, quantize: bool = True) -> str:
        """`x @ weight` (`weight [K, N]`): a MatMul, or with int4 options a MatMulNBits over 4-bit blocks."""
        if self.int4 is None or not quantize:
            (out,) = self.node("MatMul", [x, self.weight(f"{name}.weight", weight)], 1, name)
            return out
        packed, scales, zero_points = quantize_weight(weight.detach().to(torch.float32).contiguous().numpy(), self.int4, self.dtype)
        inputs = [x, self.weight(f"{name}.weight_q4", packed, np.uint8), self.weight(f"{name}.scales", scales)]
        if zero_points is not None:
            inputs.append(self.weight(f"{name}.zero_points", zero_points, np.uint8))
        attrs = matmul_nbits_attributes(*weight.shape, self.int4)
        (out,) = self.node("MatMulNBits", inputs, 1, name, domain="com.microsoft", **attrs)
        return out


def _linear_weight(*linears) -> torch.Tensor:
    """nn.Linear weights `[out, in]` (concatenated on `out`) -> MatMul's `[in, out]`."""
    return torch.cat([linear.weight for linear in linears], dim=0).T


def _bias(*linears) -> torch.Tensor | None:
    if linears[0].bias is None:
        return None
    return torch.cat([linear.bias for linear in linears], dim=0)


def _rotary_tables(text_model, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `[positions, head_dim / 2]`, computed by the checkpoint's own rotary module (rope scaling included)."""
    # A fresh module in fp32, whatever dtype the checkpoint was read in: the tables then never depend on how this
    # transformers loads inv_freq (5.24 keeps it fp32; `computing_in_fp32` refuses a narrower one for PyTorch's side).
    rotary = type(text_model.rotary_emb)(config=text_model.config)
    position_ids = torch.arange(positions, dtype=torch.long)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, position_ids)
    half = head_dim // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _sliding_windows(text_config, num_layers: int) -> list[int]:
    """Per layer, GroupQueryAttention's `local_window_size` (-1: full attention), as transformers masks.

    transformers lets query i see key j when i - j < sliding_window (the window counts the query itself);
    the CPU kernel's `local_window_size` has the same meaning (parity-tested on prompts past the window).
    """
    window = getattr(text_config, "sliding_window", None)
    if window is None:
        return [-1] * num_layers
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:  # Mistral: every layer slides
        return [window] * num_layers
    return [window if kind == "sliding_attention" else -1 for kind in layer_types]


# Rotary scalings whose tables depend on the position only (the graph holds one table); "longrope" switches
# between two tables with the sequence length. ("dynamic" rescales only past max_position_embeddings, never served.)
POSITION_ONLY_ROPE = {"default", "linear", "llama3", "yarn", "dynamic"}


def unsupported_features(config) -> list[str]:
    """What a LLaVA-NeXT `config`'s decoder has that the fused graph does not implement (the `concat` one, traced
    from PyTorch, does); empty when it can be built. Read from the config, before any weight loads."""
    text = config.text_config
    found = []
    if getattr(text, "hidden_act", "silu") not in ("silu", "swish"):
        found.append(f"hidden_act {text.hidden_act!r} (the graph has SiLU)")
    if getattr(text, "attention_bias", False):  # Llama-style: biases on q, k, v and o_proj (Qwen2's q/k/v only are fine)
        found.append("a bias on o_proj (attention_bias)")
    if getattr(text, "mlp_bias", False):
        found.append("MLP biases (mlp_bias)")
    rope = (getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope not in POSITION_ONLY_ROPE:
        found.append(f"rope_type {rope!r} (its tables change with the sequence length)")
    return found


def build_fused_decoder(
    model, path: Path, precision: str = "fp32", int4: Int4Options | None = None, kv_scales: KVScales | None = None,
) -> GraphSpec:
    """Writes the fused decoder of `model` (a LlavaNextForConditionalGeneration) to `path`; returns its spec.

    `precision` is the activations' (and float weights') dtype; `int4` quantizes the linear layers' weights;
    `kv_scales` makes the key/value buffers int8 with those per-channel scales (export/graphs/kv_cache.py).
    Large models stream their weights to `path.data` as they are converted (bounded memory).
    """
    dtype = _DTYPES[precision]
    config = model.config.text_config
    text_model = model.model.language_model
    data_file = path.name + ".data"
    external = initializer_bytes(model, precision, int4) > EXTERNAL_DATA_THRESHOLD
    (path.parent / data_file).unlink(missing_ok=True)  # an earlier build's at this path
    with open(path.parent / data_file, "wb") if external else nullcontext() as data:
        g = _Graph(dtype, WeightWriter(data, data_file), int4)
        _build(g, model, config, text_model, kv_scales)
        inputs, outputs = io_names(len(text_model.layers))
        onnx_model = _model(g, model.config, inputs, outputs, dtype, np.int8 if kv_scales else dtype)
    onnx.save_model(onnx_model, str(path))
    return GraphSpec(
        file=path.name, inputs=inputs, outputs=outputs, dtype="float16" if precision == "fp16" else "float32",
        external_data=[data_file] if external else [], kind="gqa", max_length=_max_positions(config),
        quantization=int4.manifest_entry() if int4 else {},
        kv_dtype="int8" if kv_scales else "",
    )


def initializer_bytes(model, precision: str = "fp32", int4: Int4Options | None = None) -> float:
    """About how many bytes of initializers the fused decoder of `model` holds: the layers' weights (4 bits plus
    a scale per block, ~0.6 B each, with `int4`), the final norm, the lm_head (4-bit only with `quantize_lm_head`:
    a large vocabulary's lm_head can outweigh a few layers) and the two rotary tables (up to 131072 positions).
    What decides whether the weights go to an external data file, so the graph stays under protobuf's 2 GiB."""
    itemsize = np.dtype(_DTYPES[precision]).itemsize
    quantized = 0.6 if int4 else itemsize  # 4 bits plus a scale per block, roughly
    text_model, config = model.model.language_model, model.config.text_config
    _, _, head_dim = text_geometry(model.config)
    layers = sum(p.numel() for p in text_model.layers.parameters()) * quantized
    lm_head = model.lm_head.weight.numel() * (quantized if int4 and int4.quantize_lm_head else itemsize)
    rotary = 2 * _max_positions(config) * (head_dim // 2) * itemsize
    return layers + lm_head + rotary + text_model.norm.weight.numel() * itemsize


def _max_positions(config) -> int:
    return min(int(config.max_position_embeddings), MAX_ROTARY_POSITIONS)


def _build(g: _Graph, model, config, text_model, kv_scales: KVScales | None = None) -> None:
    layers = text_model.layers
    num_layers = len(layers)
    heads = config.num_attention_heads
    _, kv_heads, head_dim = text_geometry(model.config)
    eps = float(config.rms_norm_eps)
    int4 = g.int4
    # Granite's multipliers; 1.0 (or absent) for every other family.
    embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0))
    residual_multiplier = float(getattr(config, "residual_multiplier", 1.0))
    attention_scale = float(getattr(config, "attention_multiplier", head_dim**-0.5))
    windows = _sliding_windows(config, num_layers)
    cos, sin = _rotary_tables(text_model, head_dim, _max_positions(config))
    g.weight("rotary.cos", cos)
    g.weight("rotary.sin", sin)

    # attention_mask -> the op's sequence lengths. seqlens_k is data (on the device, int32 throughout);
    # total_sequence_length comes from the mask's shape, which the op reads on the host.
    (mask32,) = g.node("Cast", [names.ATTENTION_MASK], 1, "mask/int32", to=TensorProto.INT32)
    (mask_sum,) = g.node("ReduceSum", [mask32, g.const_i64("axis1", [1])], 1, "mask/sum", keepdims=0)
    (seqlens_k,) = g.node("Sub", [mask_sum, g.weight("one_i32", np.array(1, np.int32), np.int32)], ["seqlens_k"], "mask/seqlens_k")
    (mask_shape,) = g.node("Shape", [names.ATTENTION_MASK], 1, "mask/shape")
    (width,) = g.node("Gather", [mask_shape, g.const_i64("index1", 1)], 1, "mask/width", axis=0)
    (total_length,) = g.node("Cast", [width], ["total_sequence_length"], "mask/total", to=TensorProto.INT32)

    # The attention's form (export/graphs/attention.py): int8 cache; float cache with fp32 activations (CPU bundles:
    # decode steps in standard ops); or the op alone (fp16, CUDA).
    int8_inputs, steps = None, None
    if kv_scales is not None:
        int8_inputs = int8_cache_prelude(g, seqlens_k)
    elif g.dtype == np.float32:
        steps = float_step_prelude(g, heads, kv_heads, head_dim, seqlens_k, total_length, set(windows))

    x = names.INPUTS_EMBEDS
    if embedding_multiplier != 1.0:
        (x,) = g.node("Mul", [x, g.weight("embedding_multiplier", np.array(embedding_multiplier))], 1, "embed/scale")

    residual = None
    update = x  # what the next SkipSimplifiedLayerNorm adds to the residual stream
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        normed, residual = _add_and_norm(g, update, residual, layer.input_layernorm.weight, eps, f"{p}/input_norm")
        qkv = g.linear(normed, _linear_weight(attn.q_proj, attn.k_proj, attn.v_proj), f"{p}.qkv")
        bias = _bias(attn.q_proj, attn.k_proj, attn.v_proj)
        if bias is not None:
            (qkv,) = g.node("Add", [qkv, g.weight(f"{p}.qkv.bias", bias)], 1, f"{p}/qkv_bias")
        attention = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=attention_scale, local_window_size=windows[i])
        if kv_scales is not None:
            scales = (g.weight(f"{p}.k_scale", kv_scales.keys[i], np.float32), g.weight(f"{p}.v_scale", kv_scales.values[i], np.float32))
            attended = int8_cache_attention(g, i, qkv, seqlens_k, total_length, attention, scales, int8_inputs)
        elif steps is not None:
            attended = float_cache_attention(g, i, qkv, seqlens_k, total_length, attention, steps)
        else:
            attended = op_attention(g, i, qkv, seqlens_k, total_length, attention)
        update = g.linear(attended, _linear_weight(attn.o_proj), f"{p}.o_proj")
        update = _scale_residual(g, update, residual_multiplier, f"{p}/attention_residual_scale")
        normed, residual = _add_and_norm(g, update, residual, layer.post_attention_layernorm.weight, eps, f"{p}/post_attention_norm")
        gate_up = g.linear(normed, _linear_weight(mlp.gate_proj, mlp.up_proj), f"{p}.gate_up")
        gate, up = g.node("Split", [gate_up], 2, f"{p}/split", axis=-1, num_outputs=2)
        (sigmoid,) = g.node("Sigmoid", [gate], 1, f"{p}/sigmoid")
        (silu,) = g.node("Mul", [gate, sigmoid], 1, f"{p}/silu")
        (product,) = g.node("Mul", [silu, up], 1, f"{p}/gated")
        update = g.linear(product, _linear_weight(mlp.down_proj), f"{p}.down_proj")
        update = _scale_residual(g, update, residual_multiplier, f"{p}/mlp_residual_scale")

    # Only each row's last real token goes through the final norm and lm_head.
    (stream,) = g.node("Add", [update, residual], 1, "final/residual")
    (last_hidden,) = _gather_last(g, stream, seqlens_k)
    (normed,) = g.node(
        "SimplifiedLayerNormalization", [last_hidden, g.weight("norm.weight", text_model.norm.weight)], 1, "final/norm",
        axis=-1, epsilon=eps, stash_type=1,
    )
    logits = g.linear(normed, model.lm_head.weight.T, "lm_head", quantize=bool(int4 and int4.quantize_lm_head))
    if g.dtype == np.float32:  # already float: name the lm_head's output (a Cast would copy [B, V] every step)
        g.nodes[-1].output[0] = names.LOGITS
    else:
        g.node("Cast", [logits], [names.LOGITS], "lm_head/float", to=TensorProto.FLOAT)


def _model(g: _Graph, model_config, inputs: list[str], outputs: list[str], dtype, kv_dtype) -> onnx.ModelProto:
    """The graph's declared inputs and outputs around the collected nodes."""
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    onnx_kv_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(kv_dtype))
    config = model_config.text_config
    _, kv_heads, head_dim = text_geometry(model_config)
    kv_shape = ["batch", kv_heads, "capacity", head_dim]
    graph_inputs = [
        helper.make_tensor_value_info(names.INPUTS_EMBEDS, onnx_dtype, ["batch", "sequence", config.hidden_size]),
        helper.make_tensor_value_info(names.ATTENTION_MASK, TensorProto.INT64, ["batch", "total"]),
    ] + [helper.make_tensor_value_info(name, onnx_kv_dtype, kv_shape) for name in inputs[2:]]
    graph_outputs = [helper.make_tensor_value_info(names.LOGITS, TensorProto.FLOAT, ["batch", config.vocab_size])] + [
        helper.make_tensor_value_info(name, onnx_kv_dtype, kv_shape) for name in outputs[1:]
    ]
    graph = helper.make_graph(g.nodes, "ortllava_fused_decoder", graph_inputs, graph_outputs, g.initializers)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], producer_name="ortllava",
        ir_version=IR_VERSION,
    )


def _add_and_norm(g: _Graph, update: str, residual: str | None, weight, eps: float, name: str) -> tuple[str, str]:
    """residual + update -> (RMSNorm of the sum, the sum); the first layer has no residual yet."""
    gamma = g.weight(f"{name}.weight", weight)
    if residual is None:
        (normed,) = g.node("SimplifiedLayerNormalization", [update, gamma], 1, name, axis=-1, epsilon=eps, stash_type=1)
        return normed, update
    normed, _, _, total = g.node("SkipSimplifiedLayerNormalization", [update, residual, gamma], 4, name, domain="com.microsoft", epsilon=eps)
    return normed, total


def _scale_residual(g: _Graph, update: str, multiplier: float, name: str) -> str:
    if multiplier == 1.0:
        return update
    (scaled,) = g.node("Mul", [update, g.weight(f"{name}.value", np.array(multiplier))], 1, name)
    return scaled


def _gather_last(g: _Graph, hidden: str, seqlens_k: str) -> list[str]:
    """`hidden [B, S, D]` -> `[B, D]` at row b's index `min(seqlens_k[b], S - 1)`.

    A first prompt is right-padded, so its last real token sits at `seqlens_k`; a decode step (S = 1) and a
    continued prompt (B = 1, past > 0) end at `S - 1`, which the min picks. The index is computed from data
    only (positions by a cumulative sum, S - 1 as their maximum) and the row picked by Where + ReduceSum, so no
    shape value crosses between host and device: with no copy nodes, CUDA graphs can capture the step. (Where, not a
    one-hot MatMul: 0 × NaN is NaN, so a padding position's overflow would have reached the real row.)
    """
    (first,) = g.node("Slice", [hidden, g.const_i64("zero1", [0]), g.const_i64("one1", [1]), g.const_i64("axis2", [2])], 1, "last/first_feature")
    # Ones of shape [B, S, 1] from the data, whatever its values: x == x gives 0 or 1 (a NaN × 0 would be NaN, and a
    # non-finite hidden state would then pick no row: zero logits, a wrong answer, rather than non-finite ones).
    # (Equal, not IsNaN: the CUDA provider has Equal for fp16.)
    (ordered,) = g.node("Equal", [first, first], 1, "last/ordered")
    (flag,) = g.node("Cast", [ordered], 1, "last/float", to=TensorProto.FLOAT)  # positions past 2048 need fp32
    (zeros,) = g.node("Mul", [flag, g.weight("zero_f32", np.array(0, np.float32), np.float32)], 1, "last/zeros")
    (ones,) = g.node("Add", [zeros, g.weight("one_f32", np.array(1, np.float32), np.float32)], 1, "last/ones")  # [B, S, 1]
    (count,) = g.node("CumSum", [ones, g.weight("axis1_i32", np.array(1, np.int32), np.int32)], 1, "last/count")
    (positions,) = g.node("Sub", [count, g.weight("one_f32_", np.array(1, np.float32), np.float32)], 1, "last/positions")  # s
    (final,) = g.node("ReduceMax", [positions, g.const_i64("axis1_", [1])], 1, "last/final", keepdims=1)  # S - 1: [B, 1, 1]
    (lengths,) = g.node("Cast", [seqlens_k], 1, "last/lengths", to=TensorProto.FLOAT)
    (lengths3,) = g.node("Unsqueeze", [lengths, g.const_i64("axes12", [1, 2])], 1, "last/lengths3")  # [B, 1, 1]
    (index,) = g.node("Min", [lengths3, final], 1, "last/index")
    (hit,) = g.node("Equal", [positions, index], 1, "last/hit")  # [B, S, 1]
    (kept,) = g.node("Where", [hit, hidden, g.weight("zero_hidden", np.array(0, g.dtype))], 1, "last/keep")  # [B, S, D]
    return g.node("ReduceSum", [kept, g.const_i64("axis1__", [1])], 1, "last/pick", keepdims=0)  # [B, D]
