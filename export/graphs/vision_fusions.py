"""Rewrites of the exported vision encoder's graph into fewer kernels, which onnxruntime's own optimizer does not make
from the dynamo exporter's CLIP graph.

Per encoder layer the exporter writes q, k and v as MatMul + bias Add, each Reshaped to `[tiles, S, heads,
head_dim]` and Transposed to `[tiles, heads, S, head_dim]` for opset 23's `Attention`, whose output is Transposed
and Reshaped back (`S` = patches + 1, the class token). `attention_on_3d_inputs` gives `Attention` the
`[tiles, S, heads * head_dim]` q, k and v, and it returns that shape itself (`q_num_heads` / `kv_num_heads`), so the
four Transposes (copies) and their Reshapes go; a node that does not match the pattern exactly is left as it was.
On the CPU benchmark tower (6 layers x 256, 5 tiles; docs/measurements.md) the Transposes were ~8 ms of ~410 with
2 threads (~14 of ~650 with one).

Tried and dropped, no faster on the CPU there: each MatMul + bias Add as a Gemm over `[tiles * S, hidden]` (the
Gemm took what the two had taken), q/k/v as one MatMul and a Split (the Split's copies cost more than the larger
GEMM saved), and the residual Add with its LayerNormalization as `SkipLayerNormalization` (its CPU kernel took
~45 ms where LayerNormalization took ~8, one thread).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper


class _GraphIndex:
    """The model's nodes with their consumers and producers, and its initializers as arrays, for rewriting."""

    def __init__(self, model: ModelProto):
        self.graph = model.graph
        self.weights = {t.name: t for t in self.graph.initializer}
        self._index()

    def _index(self) -> None:
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {o.name for o in self.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.weights[name]) if name in self.weights else None

    def only_consumer(self, name: str) -> NodeProto | None:
        """The one node that reads `name`, if it is read by one node and is not a graph output."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def replace(self, removed: list[NodeProto], added: list[NodeProto]) -> None:
        """Puts `added` where the last of `removed` was: the nodes replaced read nothing produced after it, and
        whatever reads their results comes after it."""
        gone = {id(n) for n in removed}
        last = max(i for i, n in enumerate(self.graph.node) if id(n) in gone)
        nodes = list(self.graph.node)
        kept = [n for n in nodes[:last] if id(n) not in gone] + added + [n for n in nodes[last + 1:] if id(n) not in gone]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        self._index()

    def drop_unused_weights(self) -> None:
        used = {name for node in self.graph.node for name in node.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _attribute(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _current(g: _GraphIndex, wanted) -> Iterator[NodeProto]:
    """The nodes for which `wanted(node)` holds, each as the graph holds it when its turn comes (a rewrite
    copies the graph's nodes, so nodes listed before it are stale)."""
    for output in [n.output[0] for n in g.graph.node if wanted(n)]:
        node = g.producer.get(output)
        if node is not None and wanted(node):
            yield node


def _swaps_heads(node: NodeProto | None) -> bool:
    """`node` is Transpose(0, 2, 1, 3): `[tiles, S, heads, head_dim]` <-> `[tiles, heads, S, head_dim]`."""
    return node is not None and node.op_type == "Transpose" and list(_attribute(node, "perm", [])) == [0, 2, 1, 3]


def _constant_shape(g: _GraphIndex, node: NodeProto | None, rank: int) -> np.ndarray | None:
    """The target shape of `node`, a Reshape to a constant shape of `rank` dimensions, else None."""
    shape = g.array(node.input[1]) if node is not None and node.op_type == "Reshape" else None
    return shape if shape is not None and shape.shape == (rank,) else None


def _split_heads(g: _GraphIndex, name: str, reader: NodeProto) -> tuple[str, list[NodeProto], tuple[int, int, int]] | None:
    """`name` as `reader` alone reads it: Reshape `[tiles, S, heads * head_dim]` to `[-1, S, heads, head_dim]`, then
    Transpose(0, 2, 1, 3), each read by the next only. Returns the 3-D tensor, the two nodes and (S, heads, head_dim),
    or None."""
    transpose = g.producer.get(name)
    reshape = g.producer.get(transpose.input[0]) if _swaps_heads(transpose) else None
    shape = _constant_shape(g, reshape, 4)
    if shape is None or not (shape[1:] > 0).all() or g.only_consumer(name) is not reader or g.only_consumer(reshape.output[0]) is not transpose:
        return None
    return reshape.input[0], [reshape, transpose], (int(shape[1]), int(shape[2]), int(shape[3]))


def _merge_heads(g: _GraphIndex, name: str, positions: int, width: int) -> list[NodeProto] | None:
    """The Transpose(0, 2, 1, 3) and Reshape to `[-1, positions, width]` that alone read `name`, or None."""
    transpose = g.only_consumer(name)
    reshape = g.only_consumer(transpose.output[0]) if _swaps_heads(transpose) else None
    shape = _constant_shape(g, reshape, 3)
    return [transpose, reshape] if shape is not None and list(shape[1:]) == [positions, width] else None


def attention_on_3d_inputs(g: _GraphIndex) -> int:
    """Reshape -> Transpose(0, 2, 1, 3) -> Attention -> Transpose(0, 2, 1, 3) -> Reshape, as `Attention` on the 3-D
    tensors. Returns how many Attention nodes it rewrote."""

    def is_4d_attention(node: NodeProto) -> bool:
        return node.op_type == "Attention" and node.domain in ("", "ai.onnx") and _attribute(node, "q_num_heads") is None

    done = 0
    for attention in _current(g, is_4d_attention):
        if len(attention.input) != 3 or len(attention.output) != 1 or _attribute(attention, "is_causal", 0):
            continue
        splits = [_split_heads(g, name, attention) for name in attention.input]  # q, k, v
        if any(split is None for split in splits) or len({dims for _, _, dims in splits}) != 1:
            continue
        positions, n_heads, head_dim = splits[0][2]
        merge = _merge_heads(g, attention.output[0], positions, n_heads * head_dim)  # (as the 3-D op returns it)
        if merge is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
        fused = helper.make_node(
            "Attention", [source for source, _, _ in splits], [merge[-1].output[0]], attention.name,
            q_num_heads=n_heads, kv_num_heads=n_heads, **attrs,
        )
        g.replace([node for _, nodes, _ in splits for node in nodes] + [attention, *merge], [fused])
        done += 1
    return done


def fuse_vision_encoder(model: ModelProto) -> ModelProto:
    """The rewrite above; the model is changed in place and returned."""
    g = _GraphIndex(model)
    attention_on_3d_inputs(g)
    g.drop_unused_weights()
    return model
