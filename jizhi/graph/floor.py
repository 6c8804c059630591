"""The analytic floor of a bundle-form dense graph: the MatMul/Gemm FLOPs per
pair of only the work that depends on both a user and an item tensor, the
work no split of the graph can take off the pairs.

What ``python -m jizhi.tools.structbench report`` prints beside the FLOPs of
the per-pair, structured and item-table graphs (jizhi/graph/structured.py,
jizhi/graph/itemside.py), and what tests/test_real_graphs.py measures them
against. An analysis independent of the passes: it does not use their
kinds, their recognised forms nor the canonical pre-pass; it runs wherever it
is called, in numpy (jizhi/graph/ops.py), no onnxruntime.

``floor(model) -> Floor``. The graph is followed at U = P = 1 (every
tensor's shape is its shape for one pair), every element of every tensor
tagged const, user, item or both (which inputs it depends on: ``dense`` and
``user_emb`` user, ``item_emb`` and any other input but ``user_index``
item); shape computations and constants are evaluated:

* data movement (Transpose, Reshape, Flatten, Gather/GatherND/Slice with
  constant indices, Squeeze, Unsqueeze, Split, Concat, Identity, Expand) and
  unary elementwise ops move the tags with the elements;
* broadcasting elementwise ops: the union of the operands' tags, element
  by element; Reduce* with constant axes: the union over the reduced axes;
* ``MatMul``/``Gemm`` with a constant operand: output element = the union of
  its row's tags; the floor counts 2 * (input elements tagged both) * (the
  constant operand's other dim): only rows that depend on both sides must
  be multiplied per pair;
* ``MatMul`` of two tensors (``T @ T^T``): entry (a, b) = the union of row
  a and column b; its 2 * (multiply-adds whose operands' union is both) are
  counted only if the entry is read (by an op other than data movement, or
  as an output), once per entry, and once for (a, b) and (b, a) when the
  product is ``T @ Transpose(T, [0, 2, 1])`` (a symmetric product computes
  each dot once);
* anything else: every output element tagged the union of all its inputs.

``Floor.per_pair``: FLOPs per pair; ``Floor.unknown``: nodes the analysis
could not follow element by element (their outputs took the union).
"""
import dataclasses

import numpy as np
import onnx
from onnx import shape_inference

from jizhi.graph import ops
from jizhi.graph.proto import DOMAINS, USER_INDEX, USER_INPUTS, Graph, attr, symbolic_shapes
from jizhi.graph.rows import BROADCASTING, REDUCE, UNARY, axes_input

CONST, USER, ITEM, BOTH = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Floor:
    per_pair: float
    unknown: int = 0


@dataclasses.dataclass
class _Tags:
    """Per-element tags of a tensor (uint8 array of the tensor's shape) and, for elements of a
    product of two tensors, the product entry they hold (int64, -1 for none)."""
    tag: np.ndarray
    ids: np.ndarray

    @classmethod
    def const(cls, shape):
        return cls(np.zeros(shape, np.uint8), np.full(shape, -1, np.int64))


def floor(model):
    """The floor of a bundle-form model (module docstring): ``Floor``."""
    return _Analysis(model).run()


class _Analysis:
    def __init__(self, model):
        fixed = _one_pair(model)
        self.g = Graph(fixed)
        try:
            inferred = shape_inference.infer_shapes(fixed, data_prop=True)
            self.shapes = symbolic_shapes(inferred)
        except Exception:  # shapes unknown: the nodes that need them take the union
            self.shapes = {}
        self.model = fixed
        self.values = {}      # tensor -> numpy array (constants, shapes) or _Tags
        self.cost = {}        # product entry id -> FLOPs
        self.read = set()     # product entry ids read
        self.flops = 0.0
        self.unknown = 0
        self.next_id = 0

    def run(self):
        g = self.g
        for value_info in self.model.graph.input:
            name = value_info.name
            if name in g.constants:
                continue
            dims = [d if isinstance(d, int) else 1 for d in (self.shapes.get(name) or ())]
            if name == USER_INDEX:
                self.values[name] = np.zeros(dims, np.int64)
            else:
                tags = _Tags.const(dims)
                tags.tag[...] = USER if name in USER_INPUTS else ITEM
                self.values[name] = tags
        for node in self.model.graph.node:
            self._node(node)
        for name in g.outputs:
            self._consume(self.values.get(name))
        return Floor(float(self.flops + sum(self.cost[i] for i in self.read)), self.unknown)

    # -- values --

    def _value(self, name):
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        return self.g.value(name)

    def _consume(self, value):
        if isinstance(value, _Tags):
            self.read.update(int(i) for i in np.unique(value.ids) if i >= 0)

    def _tags(self, value):
        if isinstance(value, _Tags):
            return value
        return _Tags.const(np.shape(value))

    def _set(self, node, outputs):
        for name, value in zip(node.output, outputs):
            if name:
                self.values[name] = value

    # -- nodes --

    def _node(self, node):
        inputs = [self._value(n) for n in node.input]
        tagged = any(isinstance(v, _Tags) for v in inputs)
        if node.domain in DOMAINS and not tagged:
            try:
                self._set(node, ops.run(node, inputs, self.g.opset))
                return
            except ops.Unsupported:
                pass
        try:
            if node.domain not in DOMAINS:
                raise ops.Unsupported(node.op_type)
            self._set(node, self._tagged(node, inputs))
        except (ops.Unsupported, ValueError, IndexError):
            self._union(node, inputs)

    def _union(self, node, inputs):
        self.unknown += 1
        tag = 0
        for value in inputs:
            if isinstance(value, _Tags):
                tag |= int(np.bitwise_or.reduce(value.tag, axis=None)) if value.tag.size else 0
                self._consume(value)
        outputs = []
        for name in node.output:
            dims = self.shapes.get(name)
            shape = [d if isinstance(d, int) else 1 for d in dims] if dims is not None else []
            tags = _Tags.const(shape)
            tags.tag[...] = tag
            outputs.append(tags)
        self._set(node, outputs)

    def _tagged(self, node, inputs):
        op = node.op_type
        if op in ("Shape", "Size"):
            return ops.run(node, [self._tags(inputs[0]).tag], self.g.opset)
        if op in ops.MOVEMENT:
            moved = ops.data_inputs(node)
            if any(isinstance(v, _Tags) for i, v in enumerate(inputs) if i not in moved):
                raise ops.Unsupported("indices computed from data")
            tags = [self._tags(v).tag if i in moved and v is not None else v for i, v in enumerate(inputs)]
            ids = [self._tags(v).ids if i in moved and v is not None else v for i, v in enumerate(inputs)]
            return [_Tags(t, d) for t, d in zip(ops.run(node, tags, self.g.opset), ops.run(node, ids, self.g.opset))]
        if op in UNARY and len([n for n in node.input if n]) == 1:
            x = self._tags(inputs[0])
            return [_Tags(x.tag.copy(), x.ids.copy())]
        if op in BROADCASTING:
            tag = None
            for v in inputs:
                if v is None:
                    continue
                self._consume(v)
                t = self._tags(v).tag
                tag = t if tag is None else np.bitwise_or(tag, t)
            return [_Tags(tag, np.full(tag.shape, -1, np.int64))]
        if op in REDUCE:
            x = self._tags(inputs[0])
            axes = axes_input(node, self.g)
            if axes is None or not isinstance(axes, list):
                raise ops.Unsupported("Reduce axes")
            axes = tuple(a + x.tag.ndim if a < 0 else a for a in axes) if axes else tuple(range(x.tag.ndim))
            self._consume(x)
            tag = np.bitwise_or.reduce(x.tag, axis=axes, keepdims=bool(attr(node, "keepdims", 1)))
            return [_Tags(tag, np.full(tag.shape, -1, np.int64))]
        if op == "MatMul":
            return [self._matmul(node, inputs[0], inputs[1])]
        if op == "Gemm":
            a, b = inputs[0], inputs[1]
            if attr(node, "transA", 0):
                a = _transpose(a)
            if attr(node, "transB", 0):
                b = _transpose(b)
            out = self._matmul(node, a, b)
            if len(inputs) > 2 and inputs[2] is not None:
                c = self._tags(inputs[2])
                self._consume(c)
                out = _Tags(np.bitwise_or(out.tag, c.tag), out.ids)
            return [out]
        raise ops.Unsupported(op)

    def _matmul(self, node, a, b):
        if isinstance(a, _Tags) and isinstance(b, _Tags):
            return self._product(node, a, b)
        if isinstance(a, _Tags):       # x @ W
            x, width = a, np.shape(b)[-1]
            if x.tag.ndim < 2 or np.ndim(b) < 2:
                raise ops.Unsupported("MatMul of vectors")
            self._consume(x)
            self.flops += 2.0 * width * np.count_nonzero(x.tag == BOTH)
            row = np.bitwise_or.reduce(x.tag, axis=-1, keepdims=True)
            shape = np.broadcast_shapes(x.tag.shape[:-2], np.shape(b)[:-2]) + (x.tag.shape[-2], width)
            return _Tags(np.broadcast_to(row, shape).copy(), np.full(shape, -1, np.int64))
        x, height = self._tags(b), np.shape(a)[-2]     # W @ x
        if x.tag.ndim < 2 or np.ndim(a) < 2:
            raise ops.Unsupported("MatMul of vectors")
        self._consume(x)
        self.flops += 2.0 * height * np.count_nonzero(x.tag == BOTH)
        column = np.bitwise_or.reduce(x.tag, axis=-2, keepdims=True)
        shape = np.broadcast_shapes(np.shape(a)[:-2], x.tag.shape[:-2]) + (height, x.tag.shape[-1])
        return _Tags(np.broadcast_to(column, shape).copy(), np.full(shape, -1, np.int64))

    def _product(self, node, a, b):
        if a.tag.ndim < 2 or b.tag.ndim < 2:
            raise ops.Unsupported("MatMul of vectors")
        self._consume(a)
        self._consume(b)
        pairs = np.bitwise_or(a.tag[..., :, :, None], b.tag[..., None, :, :])    # [..., M, K, N]
        tag = np.bitwise_or.reduce(pairs, axis=-2)
        cost = 2.0 * np.count_nonzero(pairs == BOTH, axis=-2)
        ids = np.arange(self.next_id, self.next_id + cost.size, dtype=np.int64).reshape(cost.shape)
        if self._symmetric(node) and ids.shape[-1] == ids.shape[-2]:
            upper = np.triu(ids)
            ids = upper + np.swapaxes(np.triu(ids, 1), -1, -2)    # (a, b) and (b, a): one entry
        self.next_id += cost.size
        for i, c in zip(ids.reshape(-1), cost.reshape(-1)):
            self.cost[int(i)] = float(c)
        return _Tags(tag, ids)

    def _symmetric(self, node):
        """True when ``node`` is ``MatMul(T, Transpose(T, [.., last two swapped]))`` or the reverse."""
        g = self.g
        for t, t_t in (node.input, reversed(node.input)):
            transpose = g.producer.get(t_t)
            if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] != t:
                continue
            rank = len(self._tags(self.values.get(t)).tag.shape)
            perm = attr(transpose, "perm")
            if perm is not None and list(perm) == [*range(rank - 2), rank - 1, rank - 2]:
                return True
        return False


def _transpose(value):
    if isinstance(value, _Tags):
        return _Tags(value.tag.T.copy(), value.ids.T.copy())
    return np.asarray(value).T


def _one_pair(model):
    """A copy of ``model`` with U = P = 1 as the inputs' first dims."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value_info in fixed.graph.input:
        dims = value_info.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    return fixed
