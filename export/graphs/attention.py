"""The fused decoder's attention, in its three forms (one per layer, chosen by the bundle's kind of cache).

Every form reads and writes the layer's preallocated key/value buffers `[B, n_kv, C, head_dim]` in place (the
runtime binds `present` to the same memory as `past`), and returns `[B, S, heads * head_dim]`.

- `op_attention`: onnxruntime's GroupQueryAttention (rotary inside, sliding window as `local_window_size`). The
  only form for bundles with fp16 activations (fp16 and int4 `--target cuda`).
- `float_cache_attention` (fp32 activations, float cache: the CPU bundles): an `If` per layer. A decode step
  whose buffer is mostly filled attends in standard ops (`_step_attention`): the CPU GroupQueryAttention reads a
  step's keys/values at about a third of the memory bandwidth, and these ops read them at about half; the step
  is 7-19% faster on the CPU benchmark model at 2.2k tokens (docs/measurements.md). Standard ops read the whole capacity
  `C`, the op only the held positions, so prompts, continuations and steps into a buffer longer than 1.5x its
  context take the op.
- `int8_cache_attention` (`--kv-cache int8`): an `If` per layer. Decode steps take the op's int8-cache kernel;
  prompts and continuations dequantize the held positions, attend in float and quantize back (the int8 kernel is
  ~3x slower there); what a run attends to of the held positions is their int8 values.

Both `If`s share the layer's weights (outer scope); the conditions are computed once per run, in a prelude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import GraphProto, TensorProto, helper

from ortllava.bundle import manifest as names

if TYPE_CHECKING:
    from .fused_decoder import _Graph

ROTARY = ["rotary.cos", "rotary.sin"]
# A step attends in standard ops only while the buffer holds at least 2/3 of its capacity (C <= 1.5 x held):
# they read all C positions at ~1.5x the op's speed per byte, the op only the held ones.
STEP_CAPACITY_RATIO = (3, 2)


def _outputs(layer: int) -> list[str]:
    return [f"layers.{layer}/attention", names.present_key_name(layer), names.present_value_name(layer)]


def _buffers(layer: int) -> list[str]:
    return [names.past_key_name(layer), names.past_value_name(layer)]


def _if(g: _Graph, condition: str, layer: int, then: tuple[_Graph, list[str]], otherwise: tuple[_Graph, list[str]], kv_type: int) -> str:
    """An `If` writing the layer's attention output and present buffers from whichever branch runs."""
    types = [TensorProto.FLOAT, kv_type, kv_type]

    def branch(sub: _Graph, results: list[str], name: str) -> GraphProto:
        return helper.make_graph(sub.nodes, name, [], [helper.make_tensor_value_info(r, t, None) for r, t in zip(results, types)])

    p = f"layers.{layer}"
    return g.node(
        "If", [condition], _outputs(layer), f"{p}/attention",
        then_branch=branch(*then, f"{p}_then"), else_branch=branch(*otherwise, f"{p}_else"),
    )[0]


def _is_prompt(g: _Graph) -> str:
    """A bool scalar: this run has more than one token per row (a prompt or a continuation, not a step)."""
    (shape,) = g.node("Shape", [names.INPUTS_EMBEDS], 1, "prompt/shape", start=1, end=2)
    (is_prompt,) = g.node("Greater", [shape, g.const_i64("one_i64", [1])], 1, "prompt/greater")
    return g.node("Squeeze", [is_prompt], ["is_prompt"], "prompt/flag")[0]


# -- GroupQueryAttention ------------------------------------------------------------------------------


def op_attention(g: _Graph, layer: int, qkv: str, seqlens_k: str, total_length: str, attrs: dict, outputs: list[str] | None = None) -> str:
    """GroupQueryAttention over the layer's float buffers, written in place."""
    inputs = [qkv, "", "", *_buffers(layer), seqlens_k, total_length, *ROTARY]
    return g.node("GroupQueryAttention", inputs, outputs or _outputs(layer), f"layers.{layer}/op_attention", domain="com.microsoft", **attrs)[0]


# -- float cache: decode steps in standard ops ----------------------------------------------------------


@dataclass
class StepInputs:
    """What every layer's step attention shares, computed once per run in the main graph."""

    use_op: str  # bool scalar: the op runs (a prompt or continuation, a buffer longer than 1.5x its context, or a mask narrower than it)
    positions: str  # [B, 1] int64: each row's new token's position
    write_indices: str  # [B, n_kv, 1, 3] int64: (row, kv head, position) where ScatterND writes the new key/value
    bias: dict[int, str]  # sliding window (-1: none) -> [B, 1, 1, 1, C] float: 0 where the token may attend, else -1e30
    split: str  # the packed QKV's split sizes
    query_shape: str  # [B, n_kv, heads / n_kv, 1, head_dim]: a query head per row of its key/value head's group
    kv_shape: str  # [B, n_kv, 1, head_dim]
    output_shape: str  # [B, 1, heads * head_dim]
    group_axis: str  # [2]: a buffer [B, n_kv, C, head_dim] seen as [B, n_kv, 1, C, head_dim], shared by its group


def float_step_prelude(g: _Graph, heads: int, kv_heads: int, head_dim: int, seqlens_k: str, total_length: str, windows: set[int]) -> StepInputs:
    """The step form's shared inputs, from the mask (`seqlens_k [B]` int32, `total_length` its width) and the
    layers' sliding windows; a few small ops per run, whichever form the layers then take."""
    (held,) = g.node("ReduceMax", [seqlens_k], 1, "step/longest", keepdims=0)  # positions held after this run, less one
    (held,) = g.node("Add", [held, g.weight("step/one_i32", np.array(1, np.int32), np.int32)], 1, "step/held")
    numerator, denominator = STEP_CAPACITY_RATIO
    (capacity_scaled,) = g.node("Mul", [total_length, g.weight("step/denominator", np.array(denominator, np.int32), np.int32)], 1, "step/capacity_scaled")
    (held_scaled,) = g.node("Mul", [held, g.weight("step/numerator", np.array(numerator, np.int32), np.int32)], 1, "step/held_scaled")
    (sparse,) = g.node("Greater", [capacity_scaled, held_scaled], 1, "step/sparse")
    # The bias is as wide as the mask: standard ops need the mask to span the whole buffer (the runtime's steps do).
    (capacity,) = g.node("Shape", [names.past_key_name(0)], 1, "step/capacity", start=2, end=3)
    (capacity,) = g.node("Cast", [g.node("Squeeze", [capacity], 1, "step/capacity_scalar")[0]], 1, "step/capacity32", to=TensorProto.INT32)
    (narrow,) = g.node("Not", [g.node("Equal", [capacity, total_length], 1, "step/mask_spans_buffer")[0]], 1, "step/narrow_mask")
    (use_op,) = g.node("Or", [g.node("Or", [_is_prompt(g), sparse], 1, "step/prompt_or_sparse")[0], narrow], ["use_op"], "step/use_op")

    (position,) = g.node("Cast", [seqlens_k], 1, "step/position", to=TensorProto.INT64)  # [B]
    (column,) = g.node("Unsqueeze", [position, g.const_i64("step/axis1", [1])], 1, "step/positions")  # [B, 1]
    # ScatterND indices [B, n_kv, 1, 3]: (row, kv head, position), each broadcast over the other two.
    (batch,) = g.node("Shape", [position], 1, "step/batch")
    (rows,) = g.node("Range", [g.const_i64("step/zero", 0), g.node("Squeeze", [batch], 1, "step/batch_scalar")[0], g.const_i64("step/one", 1)], 1, "step/rows")
    to_4d = g.const_i64("step/to_4d", [-1, 1, 1, 1])
    (index_shape,) = g.node("Concat", [batch, g.const_i64("step/index_rest", [kv_heads, 1, 1])], 1, "step/index_shape", axis=0)
    parts = [
        g.node("Reshape", [rows, to_4d], 1, "step/row_index")[0],
        g.const_i64("step/kv_heads", np.arange(kv_heads).reshape(1, kv_heads, 1, 1)),
        g.node("Reshape", [position, to_4d], 1, "step/position_index")[0],
    ]
    parts = [g.node("Expand", [part, index_shape], 1, f"step/index{j}")[0] for j, part in enumerate(parts)]
    (write_indices,) = g.node("Concat", parts, 1, "step/write_indices", axis=-1)

    (allowed,) = g.node("Cast", [names.ATTENTION_MASK], 1, "step/allowed", to=TensorProto.FLOAT)  # [B, C]: 1 held, 0 free
    (missing,) = g.node("Sub", [allowed, g.weight("step/one_f32", np.array(1, np.float32), np.float32)], 1, "step/missing")
    (bias,) = g.node("Mul", [missing, g.weight("step/big", np.array(1e30, np.float32), np.float32)], 1, "step/bias")  # 0 or -1e30
    to_5d = g.const_i64("step/axes123", [1, 2, 3])
    biases = {-1: g.node("Unsqueeze", [bias, to_5d], 1, "step/bias5")[0]}
    for window in sorted(windows - {-1}):  # key j is in the window of the token at position t when t - j < window
        (width,) = g.node("Cast", [total_length], 1, f"step/w{window}/width", to=TensorProto.INT64)
        (slots,) = g.node("Range", ["step/zero", width, "step/one"], 1, f"step/w{window}/slots")  # [C]
        (first,) = g.node("Sub", [column, g.const_i64(f"step/w{window}/span", window - 1)], 1, f"step/w{window}/first")  # [B, 1]
        (before,) = g.node("Less", [slots, first], 1, f"step/w{window}/before")  # [B, C]
        (before_f,) = g.node("Cast", [before], 1, f"step/w{window}/before_f", to=TensorProto.FLOAT)
        (penalty,) = g.node("Mul", [before_f, g.weight(f"step/w{window}/big", np.array(-1e30, np.float32), np.float32)], 1, f"step/w{window}/penalty")
        (windowed,) = g.node("Add", [bias, penalty], 1, f"step/w{window}/bias")
        biases[window] = g.node("Unsqueeze", [windowed, to_5d], 1, f"step/w{window}/bias5")[0]

    group = heads // kv_heads
    return StepInputs(
        use_op, column, write_indices, biases,
        split=g.const_i64("step/split", [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]),
        query_shape=g.const_i64("step/query_shape", [0, kv_heads, group, 1, head_dim]),
        kv_shape=g.const_i64("step/kv_shape", [0, kv_heads, 1, head_dim]),
        output_shape=g.const_i64("step/output_shape", [0, 1, heads * head_dim]),
        group_axis=g.const_i64("step/group_axis", [2]),
    )


def float_cache_attention(g: _Graph, layer: int, qkv: str, seqlens_k: str, total_length: str, attrs: dict, steps: StepInputs) -> str:
    """GroupQueryAttention, or for a decode step into a mostly filled buffer, `_step_attention`."""
    p = f"layers.{layer}"
    op = g.branch()
    op_attention(op, layer, qkv, seqlens_k, total_length, attrs, [f"{p}/op/attention", f"{p}/op/key", f"{p}/op/value"])
    step = g.branch()
    results = _step_attention(step, layer, qkv, attrs, steps)
    return _if(g, steps.use_op, layer, (op, op.nodes[-1].output), (step, results), TensorProto.FLOAT)


def _step_attention(g: _Graph, layer: int, qkv: str, attrs: dict, steps: StepInputs) -> list[str]:
    """One new token per row: rotary, write the new key/value in place, softmax(q k^T + bias) v.

    Each query head is one row against its key/value head's buffer (MatMuls with M = 1 stream the buffer
    without repacking it); the buffers are read over their whole capacity, with the bias masking free and
    out-of-window positions.
    """
    p = f"layers.{layer}/step"
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    query, key, value = g.node("Split", [qkv, steps.split], 3, f"{p}/split", axis=-1)
    (query,) = g.node("RotaryEmbedding", [query, steps.positions, *ROTARY], 1, f"{p}/query_rotary", domain="com.microsoft", num_heads=heads, interleaved=0)
    (key,) = g.node("RotaryEmbedding", [key, steps.positions, *ROTARY], 1, f"{p}/key_rotary", domain="com.microsoft", num_heads=kv_heads, interleaved=0)
    (query,) = g.node("Mul", [query, g.weight(f"{p}/scale", np.array(attrs["scale"], np.float32), np.float32)], 1, f"{p}/query_scaled")
    (query,) = g.node("Reshape", [query, steps.query_shape], 1, f"{p}/query_groups")  # [B, n_kv, group, 1, head_dim]
    written = []
    for buffer, new, kind in zip(_buffers(layer), (key, value), ("key", "value")):
        (new,) = g.node("Reshape", [new, steps.kv_shape], 1, f"{p}/{kind}_4d")
        # ScatterND into the bound buffer: input and output are the same memory, so only the new row is written.
        written.append(g.node("ScatterND", [buffer, steps.write_indices, new], 1, f"{p}/{kind}_write")[0])
    keys, values = (g.node("Unsqueeze", [buffer, steps.group_axis], 1, f"{p}/{kind}_5d")[0] for buffer, kind in zip(written, ("key", "value")))
    (scores,) = g.node("FusedMatMul", [query, keys], 1, f"{p}/scores", domain="com.microsoft", transB=1)  # [B, n_kv, group, 1, C]
    (scores,) = g.node("Add", [scores, steps.bias[attrs["local_window_size"]]], 1, f"{p}/masked")
    (weights,) = g.node("Softmax", [scores], 1, f"{p}/softmax", axis=-1)
    (attended,) = g.node("MatMul", [weights, values], 1, f"{p}/weighted")  # [B, n_kv, group, 1, head_dim]
    (attended,) = g.node("Reshape", [attended, steps.output_shape], 1, f"{p}/attention")
    return [attended, *written]


# -- int8 cache ---------------------------------------------------------------------------------------


@dataclass
class Int8Inputs:
    """What every layer's int8-cache attention shares, computed once per run in the main graph."""

    is_prompt: str  # bool scalar: more than one token per row (the float branch runs)
    held: str  # int32 scalar: positions held after this run (the longest row)
    past_end: str  # [1] int64: positions held before it, the part of the buffer a prompt reads
    padding: str  # [8] int64: Pad's amounts from `held` positions to the buffer's capacity


def int8_cache_prelude(g: _Graph, seqlens_k: str) -> Int8Inputs:
    """The quantizer's constants and the prompt branch's bounds: it reads and rewrites only the held positions."""
    g.weight("unit_scale", np.array(1, np.float32), np.float32)
    g.weight("int8_zero", np.array(0, np.int8), np.int8)
    g.const_i64("int8/axis2", [2])
    (longest,) = g.node("ReduceMax", [seqlens_k, g.const_i64("int8/axis0", [0])], 1, "int8/longest", keepdims=1)  # [1]
    (held1,) = g.node("Add", [longest, g.weight("int8/one_i32", np.array([1], np.int32), np.int32)], 1, "int8/held_vector")
    (held,) = g.node("Squeeze", [held1], 1, "int8/held")  # int32 scalar, as the op takes it
    (held1,) = g.node("Cast", [held1], 1, "int8/held64", to=TensorProto.INT64)  # [1]
    (new,) = g.node("Shape", [names.INPUTS_EMBEDS], 1, "int8/new", start=1, end=2)
    (past_end,) = g.node("Sub", [held1, new], 1, "int8/past_end")
    (capacity,) = g.node("Shape", [names.past_key_name(0)], 1, "int8/capacity", start=2, end=3)
    (free,) = g.node("Sub", [capacity, held1], 1, "int8/free")
    zeros6 = g.const_i64("int8/zeros6", [0] * 6)
    (padding,) = g.node("Concat", [zeros6, free, g.const_i64("int8/zero1", [0])], 1, "int8/padding", axis=0)  # pad axis 2's end
    return Int8Inputs(_is_prompt(g), held, past_end, padding)


def int8_cache_attention(
    g: _Graph, layer: int, qkv: str, seqlens_k: str, total_length: str, attrs: dict, scales: tuple[str, str], shared: Int8Inputs,
) -> str:
    """Attention over an int8 key/value cache (`scales`: key and value `[n_kv, 1, head_dim]`).

    A decode step (one token per row) runs the op's own int8-cache kernel: it reads 1 byte per cached value,
    which is what makes the step fast. On prompts that kernel is ~3x slower than the float one (it dequantizes
    inside its inner loops), so a prompt or continuation dequantizes the held positions, attends in float
    (present = past ++ new), quantizes that back and pads it to the buffer's capacity (the held positions
    come back bit-identical: round(q * s / s) = q; the free ones are zeros).
    """
    p = f"layers.{layer}"
    past = _buffers(layer)
    step = g.branch()  # the op quantizes as it writes and dequantizes as it reads
    step.node(
        "GroupQueryAttention", [qkv, "", "", *past, seqlens_k, total_length, *ROTARY, "", "", "", *scales],
        [f"{p}/step/attention", f"{p}/step/key", f"{p}/step/value"], f"{p}/step/attention", domain="com.microsoft",
        k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8, **attrs,
    )
    prompt = g.branch()  # float attention between a dequantize and a quantize
    floats = []
    for name, scale, kind in zip(past, scales, ("key", "value")):
        (held,) = prompt.node("Slice", [name, "int8/zero1", shared.past_end, "int8/axis2"], 1, f"{p}/prompt/{kind}_held")
        (as_float,) = prompt.node("Cast", [held], 1, f"{p}/prompt/{kind}_float", to=TensorProto.FLOAT)
        floats.append(prompt.node("Mul", [as_float, scale], 1, f"{p}/prompt/{kind}_dequantized")[0])
    attended, *present = prompt.node(
        "GroupQueryAttention", [qkv, "", "", *floats, seqlens_k, shared.held, *ROTARY], 3, f"{p}/prompt/attention", domain="com.microsoft", **attrs,
    )
    quantized = [attended]
    for values, scale, kind in zip(present, scales, ("key", "value")):
        (scaled,) = prompt.node("Div", [values, scale], 1, f"{p}/prompt/{kind}_scaled")
        # QuantizeLinear with scale 1: round half to even and saturate to int8 in one pass.
        (as_int8,) = prompt.node("QuantizeLinear", [scaled, "unit_scale", "int8_zero"], 1, f"{p}/prompt/{kind}_int8")
        quantized.append(prompt.node("Pad", [as_int8, shared.padding], 1, f"{p}/prompt/{kind}_padded")[0])
    return _if(g, shared.is_prompt, layer, (prompt, quantized), (step, step.nodes[0].output), TensorProto.INT8)
