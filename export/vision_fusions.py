"""Rewrites of the exported vision encoder's graph into fewer kernels, which onnxruntime's own optimizer does not make
from the dynamo exporter's CLIP graph.

Per encoder layer the exporter writes q, k and v as MatMul + bias Add, each Reshaped to `[tiles, S, heads,
head_dim]` and Transposed to `[tiles, heads, S, head_dim]` for opset 23's `Attention`, whose output is Transposed
and Reshaped back; then the out-projection and the MLP's two layers, each a MatMul + bias Add. The rewrites, each
checked against the pattern it replaces (a node that does not match it exactly is left as it was):

- `attention_on_3d_inputs`: `Attention` takes the `[tiles, S, heads * head_dim]` q, k and v and returns that shape
  itself (`q_num_heads` / `kv_num_heads`), so the four Transposes (copies) and their Reshapes go.
- `linear_as_gemm`: each MatMul + bias Add is a `Gemm` over `[tiles * S, hidden]` that starts from the bias.

`S` = patches + 1 (the class token). On the CPU benchmark tower (6 layers x 256, 5 tiles, one thread) the Transposes
took ~16 ms and the bias Adds ~40 ms of ~690 (docs/measurements.md). Tried and dropped, slower on the CPU there:
q/k/v as one MatMul and a Split (the Split's copies cost more than the larger GEMM gains), and the residual Add
with its LayerNormalization as `SkipLayerNormalization` (its CPU kernel took 45 ms where LayerNormalization took 8).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper


class _Graph:
    """The model's nodes with their consumers and producers, and its initializers as arrays, for rewriting."""

    def __init__(self, model: ModelProto):
        self.model = model
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

    def add_weight(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.weights[name] = self.graph.initializer[-1]
        return name

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


def _current(g: _Graph, wanted) -> Iterator[NodeProto]:
    """The nodes for which `wanted(node)` holds, each as the graph holds it when its turn comes (a rewrite
    copies the graph's nodes, so nodes listed before it are stale)."""
    for output in [n.output[0] for n in g.graph.node if wanted(n)]:
        node = g.producer.get(output)
        if node is not None and wanted(node):
            yield node


def _linear(g: _Graph, name: str) -> tuple[NodeProto, NodeProto, str, str] | None:
    """(MatMul, Add, weight, bias) where `name` is `MatMul(x, weight) + bias`, the MatMul's result read only by
    that Add, the weight a 2-D initializer and the bias a 1-D one."""
    add = g.producer.get(name)
    if add is None or add.op_type != "Add":
        return None
    for matmul_out, bias in (add.input, reversed(add.input)):
        matmul = g.producer.get(matmul_out)
        b, w = g.array(bias), (g.array(matmul.input[1]) if matmul is not None and matmul.op_type == "MatMul" else None)
        if w is not None and w.ndim == 2 and b is not None and b.ndim == 1 and b.shape[0] == w.shape[1] and g.only_consumer(matmul_out) is add:
            return matmul, add, matmul.input[1], bias
    return None


def attention_on_3d_inputs(g: _Graph) -> int:
    """Reshape -> Transpose(0, 2, 1, 3) -> Attention -> Transpose(0, 2, 1, 3) -> Reshape, as `Attention` on the 3-D
    tensors. Returns how many Attention nodes it rewrote."""
    done = 0
    for attention in _current(g, lambda n: n.op_type == "Attention" and n.domain in ("", "ai.onnx")):
        if len(attention.input) != 3 or len(attention.output) != 1 or _attribute(attention, "is_causal", 0):
            continue
        sources, removed, heads = [], [], set()
        for name in attention.input:
            transpose = g.producer.get(name)
            reshape = g.producer.get(transpose.input[0]) if transpose is not None and transpose.op_type == "Transpose" else None
            shape = g.array(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
            if (shape is None or shape.shape != (4,) or list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]
                    or g.only_consumer(transpose.output[0]) is not attention or g.only_consumer(reshape.output[0]) is not transpose):
                break
            sources.append(reshape.input[0])
            removed += [reshape, transpose]
            heads.add(int(shape[2]))
        else:
            transpose = g.only_consumer(attention.output[0])
            reshape = g.only_consumer(transpose.output[0]) if transpose is not None and transpose.op_type == "Transpose" else None
            shape = g.array(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
            if len(heads) != 1 or shape is None or shape.shape != (3,) or list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]:
                continue
            (n_heads,) = heads
            attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
            fused = helper.make_node(
                "Attention", sources, [reshape.output[0]], attention.name, q_num_heads=n_heads, kv_num_heads=n_heads, **attrs,
            )
            g.replace([*removed, attention, transpose, reshape], [fused])
            done += 1
    return done


def linear_as_gemm(g: _Graph) -> int:
    """`MatMul(x, W) + b` over `[tiles, S, K]` as `Gemm(x, W, b)` over `[tiles * S, K]`: the GEMM starts from the
    bias instead of a separate Add reading and writing the result again. Only where shape inference gives `x` a
    fixed `S` (the back Reshape is to `[-1, S, N]`). Returns how many it rewrote."""
    shapes = _inferred_shapes(g.model)
    done = 0
    for add in _current(g, lambda n: n.op_type == "Add"):
        linear = _linear(g, add.output[0])
        dims = shapes.get(linear[0].input[0]) if linear is not None else None
        if dims is None or len(dims) != 3 or not isinstance(dims[1], int):
            continue
        matmul, _, weight, bias = linear
        k, n = g.array(weight).shape
        p = add.name or add.output[0]
        rows, back = g.add_weight(f"{p}.rows_shape", np.array([-1, k], np.int64)), g.add_weight(f"{p}.shape", np.array([-1, dims[1], n], np.int64))
        g.replace([matmul, add], [
            helper.make_node("Reshape", [matmul.input[0], rows], [f"{p}.rows"], f"{p}/rows"),
            helper.make_node("Gemm", [f"{p}.rows", weight, bias], [f"{p}.gemm"], f"{p}/gemm"),
            helper.make_node("Reshape", [f"{p}.gemm", back], [add.output[0]], f"{p}/back"),
        ])
        done += 1
    return done


def _inferred_shapes(model: ModelProto) -> dict[str, list[int | str | None]]:
    """Every intermediate tensor's shape as onnx's shape inference gives it (a dimension: its size, its symbol, or
    None); empty where inference fails (the rewrites that need shapes then do nothing)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - e.g. a model over protobuf's 2 GiB; the rewrite is an optimization
        return {}
    shapes = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return shapes


def fuse_vision_encoder(model: ModelProto) -> ModelProto:
    """Both rewrites above; the model is changed in place and returned."""
    g = _Graph(model)
    attention_on_3d_inputs(g)
    linear_as_gemm(g)
    g.drop_unused_weights()
    return model
