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


def attention_on_3d_inputs(g: _GraphIndex) -> int:
    """Reshape -> Transpose(0, 2, 1, 3) -> Attention -> Transpose(0, 2, 1, 3) -> Reshape, as `Attention` on the 3-D
    tensors. Returns how many Attention nodes it rewrote."""

    def is_4d_attention(node: NodeProto) -> bool:
        return node.op_type == "Attention" and node.domain in ("", "ai.onnx") and _attribute(node, "q_num_heads") is None

    done = 0
    for attention in _current(g, is_4d_attention):
        if len(attention.input) != 3 or len(attention.output) != 1 or _attribute(attention, "is_causal", 0):
            continue
        sources, removed, split = [], [], set()
        for name in attention.input:  # each [tiles, S, heads * head_dim] -> Reshape [-1, S, heads, head_dim] -> Transpose
            transpose = g.producer.get(name)
            reshape = g.producer.get(transpose.input[0]) if transpose is not None and transpose.op_type == "Transpose" else None
            shape = g.array(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
            if (shape is None or shape.shape != (4,) or not (shape[1:] > 0).all() or list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]
                    or g.only_consumer(transpose.output[0]) is not attention or g.only_consumer(reshape.output[0]) is not transpose):
                break
            sources.append(reshape.input[0])
            removed += [reshape, transpose]
            split.add((int(shape[1]), int(shape[2]), int(shape[3])))
        else:
            transpose = g.only_consumer(attention.output[0])
            reshape = g.only_consumer(transpose.output[0]) if transpose is not None and transpose.op_type == "Transpose" else None
            shape = g.array(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
            if len(split) != 1 or shape is None or shape.shape != (3,) or list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]:
                continue
            ((positions, n_heads, head_dim),) = split
            if list(shape[1:]) != [positions, n_heads * head_dim]:  # (back to [tiles, S, heads * head_dim], as the 3-D op returns)
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
            fused = helper.make_node(
                "Attention", sources, [reshape.output[0]], attention.name, q_num_heads=n_heads, kv_num_heads=n_heads, **attrs,
            )
            g.replace([*removed, attention, transpose, reshape], [fused])
            done += 1
    return done


def fuse_vision_encoder(model: ModelProto) -> ModelProto:
    """The rewrite above; the model is changed in place and returned."""
    g = _GraphIndex(model)
    attention_on_3d_inputs(g)
    g.drop_unused_weights()
    return model
