"""Structured features: run the user-only part of a bundle's dense model on
U rows (once per user) instead of P rows (once per candidate pair).

Runs where it is called, offline or when a model inference worker opens a
bundle: ``structure`` and ``unstructure`` take a ModelProto and return a new
one (the argument is not modified); they need no onnxruntime, are
deterministic (same model and options, same bytes) and take well under a
second on the demo model and the DLRM. Nothing here is shared across
processes.

The graphs are in bundle form (docs/formats.md): inputs ``dense`` f32[U,N],
``user_emb`` f32[U,F_user,D], ``item_emb`` f32[P,F_item,D], ``user_index``
int64[P]; the output (``score`` f32[P]) and the inputs are kept as they are.

API
---
* ``structure(model, *, split_layers=True, split_interactions=True) ->
  (ModelProto, StructureReport)``;
* ``unstructure(model) -> ModelProto``: the naive per-pair form (the
  "structured features off" baseline);
* ``check(original, transformed, U, P, seed, *, user_index=None) ->
  max_abs_diff`` of the outputs on random inputs, through onnxruntime;
* ``flops(model) -> Flops``: MatMul/Gemm FLOPs per pair and per user;
* ``random_inputs(model, U, P, seed, user_index=None)``: the feeds ``check``
  uses (dense ~ N(0, 1), embeddings ~ N(0, 0.3^2), user_index uniform).

How the pass sees a graph
-------------------------
Every tensor gets a kind, in node order: *const* (initializers, Constant
nodes, ops on constants only), *user* (U rows: ``dense``, ``user_emb`` and
row-wise ops on them), *pair of user* (P rows, but equal to
``Gather(x, user_index, axis=0)`` of a U-row tensor x, which the pass keeps
as the tensor's U form), *pair* (P rows, row p belongs to pair p: ``item_emb``
and what is computed from it) and *other* (anything the pass cannot place;
left alone). ``structure`` computes a pair-of-user tensor's node on the U
forms, and gathers by ``user_index`` only where the tensor is consumed by a
node it cannot move (where it meets a pair tensor, or an op not proven
row-wise); ``unstructure`` does the reverse: every user tensor derived
row-wise from the inputs is recomputed per pair from ``dense_pp =
Gather(dense, user_index)`` and ``user_emb_pp = Gather(user_emb,
user_index)``. Unused nodes and initializers are dropped at the end.

Row-wise ops (a Gather on axis 0 moves past them; constant operands must
broadcast along axis 0, i.e. have a lower rank or a leading 1): unary
elementwise ops (Relu, Sigmoid, Tanh, Exp, Log, Cast, Identity, ...);
broadcasting elementwise ops (Add, Sub, Mul, Div, Pow, Max, Min, Where, Clip,
comparisons, ...) whose non-constant operands have the output's rank; MatMul
with a constant operand (batch axis kept) or between two batch tensors of the
same rank >= 3; Gemm with transA=0 and constant B and C; Flatten (axis >= 1);
Reshape with a constant shape starting with 0, or with -1 followed by sizes
(or 0s copying static input dims) whose product is the row size; Unsqueeze/Squeeze with constant axes not
touching axis 0; Transpose with perm[0] = 0; Slice with constant explicit axes
not including 0; Concat and Split on an axis other than 0; Gather with
constant indices on an axis other than 0; Reduce* with constant axes not
including 0; ArgMax/ArgMin, Softmax/LogSoftmax/Hardmax on an axis other than 0
(before opset 13: axis >= 1); LayerNormalization with axis >= 1;
BatchNormalization in inference mode; CumSum on a constant axis other than 0.
Any other op, an op in another domain, a node with a subgraph, or an operand
whose rank or constant value is not known (shape inference, initializers and
Constant nodes only: no constant folding) is not row-wise: its inputs are
gathered per pair first. Correctness first: nothing is moved on a guess.

Recognised forms
----------------
* Layer split (``split_layers``): ``MatMul(X, W)`` with an initializer W of
  rank 2, or ``Gemm(X, W, C)`` with transA=0 (alpha, beta and transB folded
  into the new weights), where X is a ``Concat`` on its last axis (rank >= 2,
  static part widths) of pair-of-user and pair tensors, possibly nested, or
  a split interaction's output (below) or a Concat containing one. It
  becomes ``Gather(X_user @ W[user rows] (+ bias), user_index) + X_pair @
  W[pair rows]``, the user product on U rows. The bias is added on U rows
  when the MatMul's only consumer is an ``Add`` of a constant that broadcasts
  along axis 0 (that Add is absorbed), or from Gemm's C.
* Interaction split (``split_interactions``): ``Z = MatMul(T, Transpose(T,
  perm=[0,2,1]))`` [P,F,F] of one tensor T, flattened by ``Flatten(Z,
  axis=1)`` or ``Reshape(Z, [0|-1, F*F])`` (or ``[0, -1]``) into Zf, where
  T is either ``Concat(parts, axis=1)`` of rank-3 parts [P,k,D] or
  ``Reshape(Concat(parts, axis=1), [0|-1, F, D])`` of rank-2 parts [P,k*D],
  each part pair-of-user or pair, with at least one of each. The selected
  entries are those of a ``Gather(Zf, idx, axis=1)`` with constant 1-D idx
  (any entries: DLRM selects the strictly lower triangle), or all F*F of
  them, in order, when Zf is read by anything else (a model that feeds the
  whole flattened product to its top MLP). The user-user entries are
  computed on U rows (``Tu @ Tu^T``), the user-item entries per pair as
  ``Gather(Tu, user_index) @ Ti^T`` and the item-item ones as ``Ti @ Ti^T``
  (onnxruntime folds the Transposes into the MatMuls). Parts that are
  contiguous rows of one tensor on axis 1 (unit-step ``Slice``s, or
  ``Unsqueeze(Gather(x, k, axis=1), [1])`` with a constant scalar k) are
  read as one Slice, or as the tensor itself (DLRM's fields cut out of
  user_emb and item_emb), so T is never assembled per pair. A block whose
  entries are all selected is used as it is, otherwise a column Gather picks
  the selected ones. Consumed by a layer split, the blocks feed it directly,
  the weight rows permuted to match (no reordering per pair); any other
  consumer reads the entries in their original order (a Concat and a column
  Gather per pair; a Slice of Zf, say, reads those). Not recognised (left
  per pair): a Z of two different tensors, a Z read without being flattened
  first (a GatherND on Z, say), and Reshapes whose shape is computed
  (Shape -> Gather -> Concat, as torch.onnx.export writes for ``.view(batch,
  -1, d)``) rather than a constant.
Anything else stays per pair and gives the same scores.

Report
------
``StructureReport``: nodes now computed on U rows, layers split,
interactions split, the Gathers by user_index left (the meet points), and
MatMul/Gemm FLOPs per pair and per user of the input and the output model
(``flops``: from shapes inferred at three (U, P) sizes; FLOPs per pair at c
candidates per user is ``per_pair + per_user / c``).

Benchmark (not a test; one intra-op thread, the worker's session options)::

    python -m jizhi.structured bench [--users 8] [--candidates 100,500,1000]
                                     [--repeats 7] [--seed 0]
    python -m jizhi.structured report MODEL.onnx

``bench`` times ``unstructure(model)`` against ``structure(model, ...)``
with every option, for the demo model and the DLRM (``jizhi.tools.dlrm``, D = 64,
8 user and 8 item fields), and prints medians, pairs/s, ratios and the input
bytes fed per request.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

USER_INPUTS = ("dense", "user_emb")   # U rows; every other input but user_index has P rows
USER_INDEX = "user_index"

_CONST, _USER, _PU, _PAIR, _OTHER = "const", "user", "pair_of_user", "pair", "other"
_USER_SIDE, _PAIR_SIDE = "user", "pair"
_DOMAINS = ("", "ai.onnx")
_UNKNOWN = object()

_UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
    "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink",
    "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})
_BROADCASTING = frozenset({
    "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Clip", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu",
    "Sub", "Sum", "Where", "Xor",
})
_REDUCE = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare",
})
_SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})

# Random inputs of ``check``: embeddings a little wider than the demo cube's
# (0.1) so that interactions weigh in the scores being compared.
_EMBEDDING_STD = 0.3


# --- reading a graph -----------------------------------------------------------

def _attr(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _has_subgraph(node):
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _dims(value_info):
    """Static dims (int, or None when symbolic/unknown) of a value_info, or None without a shape."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def _constant_value(node):
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(attribute.floats), dtype=np.float32)
        if attribute.name == "value_int":
            return np.array(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.array(list(attribute.ints), dtype=np.int64)
    return None


def _axis(axis, rank):
    return axis + rank if axis < 0 else axis


class _Graph:
    """The input model as the pass reads it: shapes (onnx shape inference),
    constant values (initializers and Constant nodes), producers, consumers."""

    def __init__(self, model):
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in _DOMAINS), 1)
        self.shapes = {}
        try:
            inferred = shape_inference.infer_shapes(model)
        except Exception:  # a graph shape inference rejects is simply not understood
            inferred = model
        self.types = {}     # tensor -> ONNX element type, where inference tells
        for value_info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            dims = _dims(value_info)
            if dims is not None:
                self.shapes[value_info.name] = dims
            if value_info.type.HasField("tensor_type"):
                self.types[value_info.name] = value_info.type.tensor_type.elem_type
        # Constant values, converted when first read (weights can be large).
        self.initializers = {init.name: init for init in graph.initializer}
        self.values = {}
        for init in graph.initializer:
            self.shapes[init.name] = tuple(init.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DOMAINS:
                value = _constant_value(node)
                if value is not None:
                    self.values[node.output[0]] = value
                    self.shapes[node.output[0]] = tuple(value.shape)
        self.constants = set(self.initializers) | set(self.values)
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = [o.name for o in graph.output]
        self.names = set(self.constants) | {i.name for i in graph.input} | set(self.outputs)
        for node in graph.node:
            self.names.update(n for n in (*node.input, *node.output) if n)
            if node.name:
                self.names.add(node.name)

    def shape(self, name):
        return self.shapes.get(name)

    def rank(self, name):
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def value(self, name):
        """The value (numpy) of an initializer or a Constant node's output, or None."""
        if name not in self.values and name in self.initializers:
            self.values[name] = numpy_helper.to_array(self.initializers[name])
        return self.values.get(name)

    def ints(self, name):
        """A constant's values as a list of ints, or None."""
        value = self.value(name)
        if value is None or value.dtype.kind not in "iu":
            return None
        return [int(v) for v in value.reshape(-1)]


def _is_user_gather(node, g):
    """Gather(x, user_index) on axis 0."""
    if node.op_type != "Gather" or node.domain not in _DOMAINS or len(node.input) != 2:
        return False
    if node.input[1] != USER_INDEX:
        return False
    rank = g.rank(node.input[0])
    axis = _attr(node, "axis", 0)
    return axis == 0 or (rank is not None and _axis(axis, rank) == 0)


def _axes_input(node, g, attr_name="axes"):
    """Axes from input 1 (newer opsets) or the attribute; None when absent, _UNKNOWN when not constant."""
    if len(node.input) > 1 and node.input[1]:
        axes = g.ints(node.input[1])
        return _UNKNOWN if axes is None else axes
    axes = _attr(node, attr_name)
    return None if axes is None else list(axes)


# --- which ops commute with a row gather ----------------------------------------

def _rowwise(node, g, batch):
    """True when ``node`` applies one function to every row (axis 0) of its batch
    inputs, so that it commutes with a Gather on axis 0.

    ``batch``: the positions of the inputs that carry rows (all with the same
    row count); every other non-empty input is a constant.
    """
    if node.domain not in _DOMAINS or _has_subgraph(node) or not batch:
        return False
    inputs = list(node.input)
    op = node.op_type
    out_rank = g.rank(node.output[0])
    in_rank = g.rank(inputs[0]) if inputs else None
    first_only = batch == {0} and all(not name for name in inputs[1:])

    def broadcasts_along_rows(i):
        shape = g.shape(inputs[i])
        if shape is None or out_rank is None:
            return False
        return len(shape) < out_rank or (len(shape) == out_rank and shape[0] == 1)

    if op in _UNARY:
        return first_only
    if op in _BROADCASTING:
        if out_rank is None:
            return False
        for i, name in enumerate(inputs):
            if not name:
                continue
            if i in batch:
                if g.rank(name) != out_rank:
                    return False
            elif not broadcasts_along_rows(i):
                return False
        return True
    if op == "MatMul":
        ra, rb = g.rank(inputs[0]), g.rank(inputs[1])
        if ra is None or rb is None:
            return False
        if batch == {0}:
            return ra >= 2 and (rb <= 2 or rb < ra or (rb == ra and g.shape(inputs[1])[0] == 1))
        if batch == {1}:
            return rb >= 3 and (ra <= 2 or ra < rb or (ra == rb and g.shape(inputs[0])[0] == 1))
        return ra == rb >= 3
    if batch != {0}:
        if op == "Concat":
            axis = _attr(node, "axis")
            return (out_rank is not None and axis is not None and _axis(axis, out_rank) != 0
                    and all(i in batch for i, name in enumerate(inputs) if name))
        return False
    if op == "Gemm":
        if _attr(node, "transA", 0) != 0:
            return False
        if len(inputs) < 3 or not inputs[2]:
            return True
        shape = g.shape(inputs[2])
        return shape is not None and (len(shape) <= 1 or shape[0] == 1)
    if in_rank is None:
        return False
    if op == "Flatten":
        return _axis(_attr(node, "axis", 1), in_rank) >= 1
    if op == "Reshape":
        return _reshape_rowwise(node, g, in_rank)
    if op == "Unsqueeze":
        axes = _axes_input(node, g)
        if axes is None or axes is _UNKNOWN:
            return False
        return 0 not in [_axis(a, in_rank + len(axes)) for a in axes]
    if op == "Squeeze":
        axes = _axes_input(node, g)
        if axes is None or axes is _UNKNOWN:
            return False
        return 0 not in [_axis(a, in_rank) for a in axes]
    if op == "Transpose":
        perm = _attr(node, "perm")
        perm = list(perm) if perm is not None else list(reversed(range(in_rank)))
        return bool(perm) and perm[0] == 0
    if op == "Slice":
        if g.opset < 10:
            axes = _attr(node, "axes")
        elif len(inputs) > 3 and inputs[3]:
            axes = g.ints(inputs[3])
            if any(name and g.value(name) is None for name in inputs[1:]):
                return False
        else:
            axes = None
        return axes is not None and 0 not in [_axis(a, in_rank) for a in axes]
    if op == "Concat":
        axis = _attr(node, "axis")
        return axis is not None and _axis(axis, in_rank) != 0 and all(not name for name in inputs[1:])
    if op == "Split":
        return _axis(_attr(node, "axis", 0), in_rank) != 0
    if op == "Gather":
        return _axis(_attr(node, "axis", 0), in_rank) != 0
    if op in _REDUCE:
        axes = _axes_input(node, g)
        if axes is _UNKNOWN:
            return False
        if not axes:
            return bool(_attr(node, "noop_with_empty_axes", 0))
        return 0 not in [_axis(a, in_rank) for a in axes]
    if op in ("ArgMax", "ArgMin"):
        return first_only and _axis(_attr(node, "axis", 0), in_rank) != 0
    if op in _SOFTMAX:
        if g.opset >= 13:
            return _axis(_attr(node, "axis", -1), in_rank) != 0
        return _axis(_attr(node, "axis", 1), in_rank) >= 1
    if op == "LayerNormalization":
        return _axis(_attr(node, "axis", -1), in_rank) >= 1
    if op == "BatchNormalization":
        return (in_rank >= 2 and not _attr(node, "training_mode", 0)
                and sum(1 for name in node.output if name) == 1)
    if op == "CumSum":
        axis = g.ints(inputs[1])
        return axis is not None and len(axis) == 1 and _axis(axis[0], in_rank) != 0
    return False


def _reshape_rowwise(node, g, in_rank):
    shape = g.ints(node.input[1])
    if not shape:
        return False
    allowzero = _attr(node, "allowzero", 0)
    if shape[0] == 0:
        return not allowzero
    if shape[0] != -1 or -1 in shape[1:] or (allowzero and 0 in shape[1:]):
        return False
    in_shape = g.shape(node.input[0])
    if any(d is None for d in in_shape[1:]):
        return False
    rest = []
    for i, size in enumerate(shape[1:], start=1):
        if size == 0:
            if i >= in_rank:
                return False
            size = in_shape[i]
        rest.append(size)
    return all(s > 0 for s in rest) and int(np.prod(rest)) == int(np.prod(in_shape[1:]))


# --- writing a graph ---------------------------------------------------------------

class _Writer:
    """The new graph's nodes and new initializers, with fresh names that collide
    with nothing in the input graph nor with each other."""

    def __init__(self, g):
        self.g = g
        self.used = set(g.names)
        self.nodes = []
        self.initializers = []
        self.origin = {}   # id(new node) -> original node it computes on U rows

    def fresh(self, base):
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}.{k}"
        self.used.add(name)
        return name

    def node(self, op, inputs, outputs, **attrs):
        """Append a node; ``outputs`` are used as given. Returns the node."""
        node = helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"{op}:{outputs[0]}"), **attrs)
        self.nodes.append(node)
        return node

    def op(self, op, inputs, base, **attrs):
        """Append a single-output node with a fresh output name based on ``base``; return that name."""
        out = self.fresh(base)
        self.node(op, inputs, [out], **attrs)
        return out

    def copy(self, node, inputs, outputs):
        """Append a copy of ``node`` (op, domain, attributes) on other inputs and outputs."""
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[:] = inputs
        new.output[:] = outputs
        new.name = self.fresh(node.name or f"{node.op_type}:{next((o for o in outputs if o), '')}")
        self.nodes.append(new)
        return new

    def const(self, base, array):
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def concat(self, names, axis, base):
        return names[0] if len(names) == 1 else self.op("Concat", names, base, axis=axis)

    def model(self, source):
        """The finished ModelProto: unused nodes and initializers dropped, the
        source's inputs, outputs, opsets, IR version and metadata kept."""
        needed = {o.name for o in source.graph.output}
        kept = []
        for node in reversed(self.nodes):
            if any(name in needed for name in node.output if name):
                kept.append(node)
                needed.update(name for name in node.input if name)
        kept.reverse()
        initializers = [i for i in (*source.graph.initializer, *self.initializers) if i.name in needed]
        graph = helper.make_graph(kept, source.graph.name, list(source.graph.input),
                                  list(source.graph.output), initializer=initializers)
        model = onnx.ModelProto()
        model.CopyFrom(source)
        model.graph.CopyFrom(graph)
        onnx.checker.check_model(model)
        self.kept = kept
        return model


# --- structure ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Flops:
    """MatMul/Gemm FLOPs (2 per multiply-add) of a model, from inferred shapes.

    ``per_pair``: on P rows, per pair; ``per_user``: on U rows, per user;
    ``unknown``: MatMul/Gemm nodes whose shapes could not be inferred (not counted).
    """
    per_pair: float
    per_user: float
    unknown: int = 0

    def at(self, candidates):
        """FLOPs per pair when every user has ``candidates`` candidates."""
        return self.per_pair + self.per_user / candidates


@dataclasses.dataclass(frozen=True)
class StructureReport:
    """What ``structure`` moved.

    ``moved_nodes``: input nodes (``"op -> output"``) now computed on U rows;
    ``split_layers`` and ``split_interactions``: one line per split;
    ``gathers``: the tensors gathered by user_index in the output model (where
    user-only tensors meet item-side ones or non-row-wise ops);
    ``flops_before`` / ``flops_after``: ``flops`` of the input and output models;
    ``note``: why the model was left as it is, if it was.
    """
    moved_nodes: tuple
    split_layers: tuple
    split_interactions: tuple
    gathers: tuple
    flops_before: Flops
    flops_after: Flops
    note: str = ""

    def summary(self, candidates=500):
        lines = [
            *([f"note: {self.note}"] if self.note else []),
            f"nodes moved to U rows: {len(self.moved_nodes)}",
            f"layers split: {len(self.split_layers)}",
            *(f"  {line}" for line in self.split_layers),
            f"interactions split: {len(self.split_interactions)}",
            *(f"  {line}" for line in self.split_interactions),
            f"gathers by user_index: {len(self.gathers)} ({', '.join(self.gathers)})",
        ]
        for label, f in (("before", self.flops_before), ("after", self.flops_after)):
            lines.append(f"MatMul/Gemm FLOPs {label}: {f.per_pair:,.0f} per pair + {f.per_user:,.0f} per user"
                         f" = {f.at(candidates):,.0f} per pair at {candidates} candidates"
                         + (f" ({f.unknown} nodes of unknown shape)" if f.unknown else ""))
        return "\n".join(lines)


@dataclasses.dataclass
class _Segment:
    """Columns (last axis) ``cols`` of a decomposed tensor held by ``name``:
    a U-row tensor (side user) or a P-row tensor (side pair)."""
    name: str
    side: str
    cols: np.ndarray


class _Structurer:
    def __init__(self, model, split_layers, split_interactions):
        self.g = _Graph(model)
        self.w = _Writer(self.g)
        self.split_layers_on = split_layers
        self.split_interactions_on = split_interactions
        self.kind = {}
        self.uform = {}          # pair-of-user tensor -> its U-row tensor
        self.gathered = set()    # pair-of-user tensors already gathered per pair
        self.segments = {}       # tensor -> [_Segment] (last-axis decomposition)
        self.absorbed = set()    # outputs of nodes a layer split computed already
        self.layers, self.interactions = [], []
        graph = model.graph
        for value_info in graph.input:
            name = value_info.name
            self.kind[name] = _USER if name in USER_INPUTS else _OTHER if name == USER_INDEX else _PAIR
        for name in self.g.constants:
            self.kind[name] = _CONST

    def run(self):
        g = self.g
        for node in g.model.graph.node:
            if tuple(node.output) in self.absorbed:
                continue
            kinds = {self.kind.get(name, _OTHER) for name in node.input if name}
            if _has_subgraph(node):
                self._per_pair(node)
            elif kinds <= {_CONST}:
                self.w.copy(node, node.input, node.output)
                self._set(node, _CONST)
            elif _is_user_gather(node, g) and self.kind.get(node.input[0]) == _USER:
                self.kind[node.output[0]] = _PU
                self.uform[node.output[0]] = node.input[0]
            elif kinds <= {_CONST, _USER}:
                self.w.copy(node, node.input, node.output)
                self._set(node, _USER if _rowwise(node, g, self._batch(node, {_USER})) else _OTHER)
            elif kinds <= {_CONST, _PU} and _rowwise(node, g, self._batch(node, {_PU})):
                self._on_user_rows(node)
            elif self.split_interactions_on and self._split_interaction(node):
                pass
            elif self.split_layers_on and self._split_layer(node):
                pass
            else:
                self._per_pair(node)
                if self.split_layers_on and node.op_type == "Concat":
                    self._decompose_concat(node)
        for name in g.outputs:
            self._pair(name)
        return self.w.model(g.model)

    def _batch(self, node, kinds):
        return {i for i, name in enumerate(node.input) if name and self.kind.get(name) in kinds}

    def _set(self, node, kind):
        for name in node.output:
            if name:
                self.kind[name] = kind

    def _pair(self, name):
        """The per-pair tensor ``name``: a pair-of-user tensor is gathered once, where first needed."""
        if self.kind.get(name) == _PU and name not in self.gathered:
            self.w.node("Gather", [self.uform[name], USER_INDEX], [name], axis=0)
            self.gathered.add(name)
        return name

    def _on_user_rows(self, node):
        inputs = [self.uform[n] if self.kind.get(n) == _PU else n for n in node.input]
        outputs = [self.w.fresh(n + ".U") if n else "" for n in node.output]
        new = self.w.copy(node, inputs, outputs)
        self.w.origin[id(new)] = node
        for name, u_name in zip(node.output, outputs):
            if name:
                self.kind[name] = _PU
                self.uform[name] = u_name

    def _per_pair(self, node):
        """The node as it is, on per-pair inputs. Its outputs are pair tensors when
        it is row-wise in its P-row inputs, else other."""
        inputs = [self._pair(n) if n else "" for n in node.input]
        self.w.copy(node, inputs, node.output)
        kinds = {self.kind.get(n, _OTHER) for n in node.input if n}
        batch = self._batch(node, {_PU, _PAIR})
        rowwise = kinds <= {_CONST, _PU, _PAIR} and _rowwise(node, self.g, batch)
        self._set(node, _PAIR if rowwise or _is_user_gather(node, self.g) else _OTHER)

    # -- (b) layer split --

    def _parts(self, name):
        """The last-axis segments of tensor ``name`` (columns from 0), or None."""
        if name in self.segments:
            return self.segments[name]
        shape = self.g.shape(name)
        if shape is None or len(shape) < 2 or shape[-1] is None:
            return None
        cols = np.arange(shape[-1])
        if self.kind.get(name) == _PU:
            return [_Segment(self.uform[name], _USER_SIDE, cols)]
        if self.kind.get(name) == _PAIR:
            return [_Segment(name, _PAIR_SIDE, cols)]
        return None

    def _decompose_concat(self, node):
        out = node.output[0]
        rank = self.g.rank(out)
        axis = _attr(node, "axis")
        if rank is None or rank < 2 or axis is None or _axis(axis, rank) != rank - 1:
            return
        segments, offset = [], 0
        for name in node.input:
            parts = self._parts(name) if self.g.rank(name) == rank else None
            if parts is None:
                return
            segments += [_Segment(s.name, s.side, s.cols + offset) for s in parts]
            offset += self.g.shape(name)[-1]
        if any(s.side == _USER_SIDE for s in segments):
            self.segments[out] = segments

    def _split_layer(self, node):
        g = self.g
        if node.domain not in _DOMAINS or node.op_type not in ("MatMul", "Gemm"):
            return False
        x = node.input[0]
        segments = self.segments.get(x)
        w = g.value(node.input[1])
        if segments is None or w is None or w.ndim != 2 or w.dtype != np.float32:
            return False
        if not {s.side for s in segments} == {_USER_SIDE, _PAIR_SIDE}:
            return False
        bias, out = None, node.output[0]
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or g.rank(x) != 2:
                return False
            if _attr(node, "transB", 0):
                w = w.T
            w = w * np.float32(_attr(node, "alpha", 1.0))
            if len(node.input) > 2 and node.input[2]:
                bias = g.value(node.input[2])
                if bias is None or not (bias.ndim <= 1 or bias.shape[0] == 1):
                    return False
                bias = bias * np.float32(_attr(node, "beta", 1.0))
        else:
            add = self._bias_add(node)
            if add is not None:
                bias_name = add.input[1] if add.input[0] == out else add.input[0]
                bias, out = g.value(bias_name), add.output[0]
                self.absorbed.add(tuple(add.output))
        user = [s for s in segments if s.side == _USER_SIDE]
        pair = [s for s in segments if s.side == _PAIR_SIDE]
        user_cols = np.concatenate([s.cols for s in user])
        pair_cols = np.concatenate([s.cols for s in pair])
        base = node.output[0]
        x_user = self.w.concat([s.name for s in user], -1, base + ".user_in")
        x_pair = self.w.concat([s.name for s in pair], -1, base + ".pair_in")
        y_user = self.w.op("MatMul", [x_user, self.w.const(base + ".W_user", w[user_cols])], base + ".user")
        if bias is not None:
            y_user = self.w.op("Add", [y_user, self.w.const(base + ".b", bias.astype(np.float32))], base + ".user_b")
        y_pair = self.w.op("MatMul", [x_pair, self.w.const(base + ".W_pair", w[pair_cols])], base + ".pair")
        y_user_pp = self.w.op("Gather", [y_user, USER_INDEX], base + ".user_pp", axis=0)
        self.w.node("Add", [y_user_pp, y_pair], [out])
        self.kind[out] = _PAIR
        self.layers.append(f"{node.op_type} -> {out}: {len(user_cols)} input rows on U rows, "
                           f"{len(pair_cols)} per pair, {w.shape[1]} outputs")
        return True

    def _bias_add(self, node):
        """The Add of a constant that is the MatMul's only consumer, if any."""
        out = node.output[0]
        consumers = self.g.consumers.get(out, [])
        if out in self.g.outputs or len(consumers) != 1:
            return None
        add = consumers[0]
        if add.op_type != "Add" or add.domain not in _DOMAINS or len(add.input) != 2:
            return None
        other = add.input[1] if add.input[0] == out else add.input[0]
        bias = self.g.value(other)
        out_rank = self.g.rank(out)
        if bias is None or out_rank is None or other == out or bias.dtype != np.float32:
            return None
        if not (bias.ndim < out_rank or (bias.ndim == out_rank and bias.shape[0] == 1)):
            return None
        return add

    # -- (c) interaction split --

    def _split_interaction(self, node):
        match = self._match_interaction(node)
        if match is None:
            return False
        fields, n_fields, dim, index = match
        user = [part for side, part, _, _ in fields if side == _USER_SIDE]
        item = [part for side, part, _, _ in fields if side == _PAIR_SIDE]
        side_of, local = [], []
        counts = {_USER_SIDE: 0, _PAIR_SIDE: 0}
        for side, _, k, _ in fields:
            for _ in range(k):
                side_of.append(side)
                local.append(counts[side])
                counts[side] += 1
        n_user, n_item = counts[_USER_SIDE], counts[_PAIR_SIDE]
        # Selected entries per block: (column of the selection, flat index in the block).
        # Z is symmetric, so an item-user entry is read from the user-item block.
        selected = {"uu": [], "ui": [], "ii": []}
        for m, s in enumerate(index):
            i, j = divmod(s, n_fields)
            if side_of[i] == side_of[j] == _USER_SIDE:
                selected["uu"].append((m, local[i] * n_user + local[j]))
            elif side_of[i] == side_of[j] == _PAIR_SIDE:
                selected["ii"].append((m, local[i] * n_item + local[j]))
            else:
                a, b = (local[i], local[j]) if side_of[i] == _USER_SIDE else (local[j], local[i])
                selected["ui"].append((m, a * n_item + b))

        out = node.output[0]
        w = self.w
        reshape = fields[0][3]
        tu = self._stack(user, n_user, dim, reshape, out + ".Tu", user_rows=True)
        ti = self._stack(item, n_item, dim, reshape, out + ".Ti", user_rows=False)
        # onnxruntime folds these Transposes into the MatMuls (transB); no per-pair copy.
        segments = []
        if selected["uu"]:
            z = w.op("MatMul", [tu, w.op("Transpose", [tu], out + ".Tu_t", perm=[0, 2, 1])], out + ".Zuu")
            segments.append(self._select(z, n_user * n_user, selected["uu"], _USER_SIDE, out + ".uu"))
        if selected["ui"] or selected["ii"]:
            ti_t = w.op("Transpose", [ti], out + ".Ti_t", perm=[0, 2, 1])
        if selected["ui"]:
            tu_pp = w.op("Gather", [tu, USER_INDEX], out + ".Tu_pp", axis=0)
            z = w.op("MatMul", [tu_pp, ti_t], out + ".Zui")
            segments.append(self._select(z, n_user * n_item, selected["ui"], _PAIR_SIDE, out + ".ui"))
        if selected["ii"]:
            z = w.op("MatMul", [ti, ti_t], out + ".Zii")
            segments.append(self._select(z, n_item * n_item, selected["ii"], _PAIR_SIDE, out + ".ii"))

        # The entries in their original order, for consumers other than a layer split.
        blocks = [w.op("Gather", [s.name, USER_INDEX], s.name + "_pp", axis=0) if s.side == _USER_SIDE else s.name
                  for s in segments]
        order = np.concatenate([s.cols for s in segments])
        if np.array_equal(order, np.arange(order.shape[0])):
            if len(blocks) > 1:
                w.node("Concat", blocks, [out], axis=1)
            else:
                w.node("Identity", blocks, [out])
        else:
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.shape[0])
            w.node("Gather", [w.concat(blocks, 1, out + ".blocks"), w.const(out + ".order", inverse)], [out], axis=1)
        self.kind[out] = _PAIR
        self.segments[out] = segments
        self.interactions.append(
            f"{out}: {n_fields} vectors of {dim} ({n_user} user, {n_item} item), {len(index)} entries: "
            f"{len(selected['uu'])} user-user on U rows, {len(selected['ui'])} user-item and "
            f"{len(selected['ii'])} item-item per pair")
        return True

    def _select(self, z, size, entries, side, base):
        """The segment of the selected ``entries`` of the product ``z`` ([rows, a, b],
        ``size`` = a * b): z flattened as it is when it holds exactly the selected
        entries (its columns then map to their selection columns), else a column
        Gather of them."""
        flat = self.w.op("Flatten", [z], base + ".flat", axis=1)
        cols = np.array([m for m, _ in entries], dtype=np.int64)
        positions = np.array([f for _, f in entries], dtype=np.int64)
        if np.array_equal(np.sort(positions), np.arange(size)):
            mapped = np.empty(size, dtype=np.int64)
            mapped[positions] = cols
            return _Segment(flat, side, mapped)
        picked = self.w.op("Gather", [flat, self.w.const(base + ".index", positions)], base, axis=1)
        return _Segment(picked, side, cols)

    def _stack(self, parts, n, dim, reshape, base, user_rows):
        """[rows, n, dim] from the parts of one side (U forms when ``user_rows``).

        Adjacent parts that are unit-step Slices on axis 1 of one tensor, with
        contiguous ranges, are read as one Slice (or as the whole tensor), so
        fields cut out of user_emb or item_emb are not copied twice.
        """
        names = []
        for run in self._slice_runs(parts, reshape):
            if isinstance(run, str):
                names.append(self.uform[run] if user_rows else self._pair(run))
                continue
            source, begin, end, size = run
            source = self.uform[source] if user_rows else self._pair(source)
            if begin == 0 and end == size:
                names.append(source)
            else:
                names.append(self.w.op("Slice", [source, self.w.const(base + ".begin", np.array([begin], np.int64)),
                                                 self.w.const(base + ".end", np.array([end], np.int64)),
                                                 self.w.const(base + ".axis", np.array([1], np.int64))],
                                       base + ".slice"))
        if not reshape:
            return self.w.concat(names, 1, base)
        stacked = self.w.concat(names, 1, base + ".cat")
        return self.w.op("Reshape", [stacked, self.w.const(base + ".shape", np.array([0, n, dim], np.int64))], base)

    def _slice_runs(self, parts, reshape):
        """``parts`` with runs of contiguous Slices of one tensor merged into
        ``(source, begin, end, source size on axis 1)``; other parts as their names."""
        runs = []
        for part in parts:
            piece = None if reshape else self._unit_slice(part)
            if piece is None:
                runs.append(part)
            elif runs and not isinstance(runs[-1], str) and runs[-1][0] == piece[0] and runs[-1][2] == piece[1]:
                runs[-1] = (piece[0], runs[-1][1], piece[2], piece[3])
            else:
                runs.append(piece)
        return runs

    def _unit_slice(self, part):
        """(source, begin, end, size) when ``part`` is rows of ``source`` [rows, size, D]
        on axis 1: ``Slice(source, [begin], [end], [1])`` (step 1, 0 <= begin < end
        <= size) or ``Unsqueeze(Gather(source, k, axis=1), [1])`` (k a constant
        scalar: begin = k, end = k + 1), ``source`` of the part's kind."""
        g = self.g
        node = g.producer.get(part)
        if node is None or node.domain not in _DOMAINS:
            return None
        if node.op_type == "Unsqueeze":
            axes = _axes_input(node, g)
            gather = g.producer.get(node.input[0])
            if axes not in ([1], [-2]) or gather is None or gather.op_type != "Gather" or len(gather.input) != 2:
                return None
            source, k = gather.input[0], g.value(gather.input[1])
            if k is None or k.shape != () or k.dtype.kind not in "iu" or g.rank(source) != 3:
                return None
            if _axis(_attr(gather, "axis", 0), 3) != 1:
                return None
            begin = end = int(k)
            end += 1
        elif node.op_type == "Slice" and g.opset >= 10:
            inputs = list(node.input) + [""] * (5 - len(node.input))
            source = inputs[0]
            begin, end = g.ints(inputs[1]), g.ints(inputs[2])
            axes = g.ints(inputs[3]) if inputs[3] else None
            steps = g.ints(inputs[4]) if inputs[4] else [1]
            if begin is None or end is None or axes not in ([1], [-2]) or steps != [1]:
                return None
            if len(begin) != 1 or len(end) != 1:
                return None
            begin, end = begin[0], end[0]
        else:
            return None
        shape = g.shape(source)
        if self.kind.get(source) != self.kind.get(part) or shape is None or len(shape) != 3 or shape[1] is None:
            return None
        if not 0 <= begin < end <= shape[1]:
            return None
        return source, begin, end, shape[1]

    def _match_interaction(self, node):
        """(fields, F, D, selected flat indices) of a recognised interaction
        (module docstring) whose selected entries ``node`` outputs, or None.
        ``fields``: (side, part, k, reshape) per part of T, in order."""
        g = self.g
        if node.domain not in _DOMAINS:
            return None
        if node.op_type == "Gather":
            index = self._selection(node)
            product = None if index is None else self._match_product(g.producer.get(node.input[0]))
            if product is None:
                return None
            fields, n_fields, dim = product
            index = [s + n_fields * n_fields if s < 0 else s for s in index]
            if any(not 0 <= s < n_fields * n_fields for s in index):
                return None
            return fields, n_fields, dim, index
        product = self._match_product(node)
        # A flattened product read through selections is split at the selections.
        consumers = g.consumers.get(node.output[0], [])
        if product is None or any(self._selection(c) is not None for c in consumers) \
                or not (consumers or node.output[0] in g.outputs):
            return None
        fields, n_fields, dim = product
        return fields, n_fields, dim, list(range(n_fields * n_fields))

    def _selection(self, node):
        """The constant flat indices (list of ints) when ``node`` is ``Gather(x [rows, n],
        idx [k], axis=1)``, else None."""
        g = self.g
        if node.op_type != "Gather" or node.domain not in _DOMAINS or len(node.input) != 2:
            return None
        index = g.value(node.input[1])
        if index is None or index.ndim != 1 or index.dtype.kind not in "iu" or g.rank(node.input[0]) != 2:
            return None
        if _axis(_attr(node, "axis", 0), 2) != 1:
            return None
        return [int(s) for s in index]

    def _match_product(self, flatten):
        """(fields, F, D) when ``flatten`` is ``Flatten(Z, axis=1)`` or ``Reshape(Z,
        [0|-1, F*F] or [0, -1])`` of ``Z = MatMul(T, Transpose(T, [0,2,1]))``
        with T in a recognised form, else None."""
        g = self.g
        if flatten is None or flatten.domain not in _DOMAINS or flatten.op_type not in ("Flatten", "Reshape"):
            return None
        z = flatten.input[0]
        z_shape = g.shape(z)
        if z_shape is None or len(z_shape) != 3 or z_shape[1] is None or z_shape[1] != z_shape[2]:
            return None
        n_fields = z_shape[1]
        if flatten.op_type == "Flatten":
            if _axis(_attr(flatten, "axis", 1), 3) != 1:
                return None
        elif _attr(flatten, "allowzero", 0) or g.ints(flatten.input[1]) not in (
                [0, n_fields * n_fields], [-1, n_fields * n_fields], [0, -1]):
            return None
        matmul = g.producer.get(z)
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in _DOMAINS:
            return None
        t, t_t = matmul.input
        transpose = g.producer.get(t_t)
        if (transpose is None or transpose.op_type != "Transpose" or transpose.input[0] != t
                or list(_attr(transpose, "perm", [])) != [0, 2, 1]):
            return None
        t_shape = g.shape(t)
        if t_shape is None or len(t_shape) != 3 or t_shape[1] != n_fields or t_shape[2] is None:
            return None
        dim = t_shape[2]
        producer = g.producer.get(t)
        reshape = False
        if producer is not None and producer.op_type == "Reshape" and producer.domain in _DOMAINS:
            shape = g.ints(producer.input[1])
            if _attr(producer, "allowzero", 0) or shape is None or len(shape) != 3 or shape[0] not in (0, -1) \
                    or shape[1:] != [n_fields, dim]:
                return None
            producer = g.producer.get(producer.input[0])
            reshape = True
        if producer is None or producer.op_type != "Concat" or producer.domain not in _DOMAINS:
            return None
        rank = 2 if reshape else 3
        if _axis(_attr(producer, "axis", 0), rank) != 1:
            return None
        fields = []
        for part in producer.input:
            shape = g.shape(part)
            if shape is None or len(shape) != rank or shape[1] is None:
                return None
            if reshape:
                if shape[1] % dim:
                    return None
                k = shape[1] // dim
            else:
                if shape[2] != dim:
                    return None
                k = shape[1]
            kind = self.kind.get(part)
            if kind not in (_PU, _PAIR):
                return None
            fields.append((_USER_SIDE if kind == _PU else _PAIR_SIDE, part, k, reshape))
        if sum(k for _, _, k, _ in fields) != n_fields or {f[0] for f in fields} != {_USER_SIDE, _PAIR_SIDE}:
            return None
        return fields, n_fields, dim


def structure(model, *, split_layers=True, split_interactions=True):
    """Move the user-only part of a bundle-form model to U rows.

    Returns ``(new_model, StructureReport)``; ``model`` is not modified. The
    new model has the same inputs and outputs and computes the same scores
    (up to float32 rounding of reordered sums: ``check``). ``split_layers``
    and ``split_interactions`` enable the layer and interaction splits of the
    module docstring. Deterministic; safe to apply to its own output. A
    model with a subgraph (If, Loop, Scan) is returned unchanged, with a
    ``note`` in the report.
    """
    if any(_has_subgraph(node) for node in model.graph.node):
        same = onnx.ModelProto()
        same.CopyFrom(model)
        before = flops(model)
        return same, StructureReport((), (), (), _user_gathers(same), before, before,
                                     note="a node has a subgraph (If, Loop, Scan): model left as it is")
    s = _Structurer(model, split_layers, split_interactions)
    new = s.run()
    moved = []
    for node in s.w.kept:
        original = s.w.origin.get(id(node))
        if original is not None:
            moved.append(f"{original.op_type} -> {original.output[0]}")
    report = StructureReport(tuple(moved), tuple(s.layers), tuple(s.interactions), _user_gathers(new),
                             flops(model), flops(new))
    return new, report


def _user_gathers(model):
    return tuple(n.output[0] for n in model.graph.node
                 if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == USER_INDEX)


# --- unstructure -------------------------------------------------------------------

def unstructure(model):
    """The naive per-pair form of a bundle-form model: ``dense`` and ``user_emb``
    are gathered per pair first (``dense_pp``, ``user_emb_pp``), and every
    user-side node that is row-wise runs on P rows from them; a Gather by
    user_index of such a tensor disappears. User-side nodes that are not
    row-wise stay on U rows (and are gathered as before). Same inputs,
    outputs and scores; ``model`` is not modified. Raises ValueError for a
    model with a subgraph (If, Loop, Scan).
    """
    if any(_has_subgraph(node) for node in model.graph.node):
        raise ValueError("unstructure: graphs with subgraphs (If, Loop, Scan) are not supported")
    g = _Graph(model)
    w = _Writer(g)
    kind = {v.name: (_USER if v.name in USER_INPUTS else _OTHER) for v in model.graph.input}
    kind.update((name, _CONST) for name in g.constants)
    per_pair = {}   # user tensor -> its per-pair tensor
    alias = {}      # input tensor -> the tensor that replaces it

    def pp(name):
        if name not in per_pair:
            per_pair[name] = w.op("Gather", [name, USER_INDEX], name + "_pp", axis=0)
        return per_pair[name]

    for node in model.graph.node:
        inputs = [alias.get(n, n) for n in node.input]
        kinds = {kind.get(n, _OTHER) for n in node.input if n}
        if _is_user_gather(node, g) and kind.get(node.input[0]) == _USER:
            source = node.input[0]
            if source in per_pair:
                alias[node.output[0]] = per_pair[source]
            else:
                w.copy(node, node.input, node.output)
                per_pair[source] = node.output[0]
            kind[node.output[0]] = _OTHER
            continue
        w.copy(node, inputs, node.output)
        if kinds <= {_CONST}:
            out_kind = _CONST
        elif kinds <= {_CONST, _USER} and _rowwise(node, g, {i for i, n in enumerate(node.input)
                                                               if n and kind.get(n) == _USER}):
            out_kind = _USER
            lifted = [pp(n) if n and kind.get(n) == _USER else n for n in node.input]
            outputs = [w.fresh(n + "_pp") if n else "" for n in node.output]
            w.copy(node, lifted, outputs)
            per_pair.update((n, o) for n, o in zip(node.output, outputs) if n)
        else:
            out_kind = _OTHER
        for name in node.output:
            if name:
                kind[name] = out_kind
    for output in model.graph.output:
        if output.name in alias:
            w.node("Identity", [alias[output.name]], [output.name])
    return w.model(model)


# --- measuring ---------------------------------------------------------------------

def _with_rows(model, users, pairs):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value_info in fixed.graph.input:
        dims = value_info.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = users if value_info.name in USER_INPUTS else pairs
    return fixed


def _matmul_flops(model):
    """(total MatMul/Gemm FLOPs, nodes of unknown shape) of a model with static input shapes."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # counted as unknown: the FLOPs are an estimate for the report
        inferred = model
    shapes = {}
    for value_info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = _dims(value_info)
        if dims is not None:
            shapes[value_info.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    total, unknown = 0, 0
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in _DOMAINS:
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is None or out is None or None in a or None in out or not a:
            unknown += 1
            continue
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            k = a[0]
        else:
            k = a[-1]
        total += 2 * int(np.prod(out)) * k
    return total, unknown


def flops(model):
    """MatMul/Gemm FLOPs per pair and per user of a bundle-form model (``Flops``).

    Shapes are inferred at (U, P) = (2, 3), (2, 5) and (4, 3); the FLOPs are
    assumed affine in U and P (true of models whose nodes run on U or P rows).
    """
    base, unknown = _matmul_flops(_with_rows(model, 2, 3))
    more_pairs, _ = _matmul_flops(_with_rows(model, 2, 5))
    more_users, _ = _matmul_flops(_with_rows(model, 4, 3))
    return Flops((more_pairs - base) / 2, (more_users - base) / 2, unknown)


def random_inputs(model, users, pairs, seed, user_index=None):
    """Feeds for a bundle-form model: dense ~ N(0, 1), embeddings ~ N(0, 0.3^2),
    ``user_index`` uniform over the users (or the given int64[P] array).

    Every input's dims after the first must be static.
    """
    rng = np.random.default_rng([int(seed), 0])
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value_info in model.graph.input:
        name = value_info.name
        if name in initializers:
            continue
        dims = _dims(value_info)
        if dims is None or None in dims[1:]:
            raise ValueError(f"input {name}: dims after the first must be static, got {dims}")
        if name == USER_INDEX:
            index = rng.integers(0, users, size=pairs) if user_index is None else user_index
            feeds[name] = np.ascontiguousarray(index, dtype=np.int64)
            continue
        shape = (users if name in USER_INPUTS else pairs, *dims[1:])
        std = 1.0 if name == "dense" else _EMBEDDING_STD
        feeds[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return feeds


def _session(model):
    import onnxruntime as ort

    from jizhi.workers.model_inference import session_options
    return ort.InferenceSession(model.SerializeToString(), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


def check(original, transformed, U, P, seed, *, user_index=None):
    """Max absolute difference of the first outputs of two bundle-form models
    on the same random inputs (``random_inputs``), through onnxruntime with
    the worker's session options. ``user_index``: int64[P], or random."""
    feeds = random_inputs(original, U, P, seed, user_index)
    a = _session(original).run(None, feeds)[0]
    b = _session(transformed).run(None, feeds)[0]
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: {a.shape} != {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))


# --- benchmark ---------------------------------------------------------------------

_OPTIONS = (
    ("structure(split_layers, split_interactions)", dict(split_layers=True, split_interactions=True)),
    ("structure(split_layers)", dict(split_layers=True, split_interactions=False)),
    ("structure(split_interactions)", dict(split_layers=False, split_interactions=True)),
    ("structure()", dict(split_layers=False, split_interactions=False)),
)


def _reference_models(seed):
    from jizhi.tools import dlrm, demo
    f_user = sum(1 for f in demo._fields(1) if f.side == "user")
    f_item = len(demo._fields(1)) - f_user
    return {
        "demo": demo._dense_model(demo._dense_weights(seed), f_user, f_item),
        "dlrm": dlrm.build(seed, 64, 8, 8),
    }


def _input_bytes(model, candidates):
    """(naive, bundle): input bytes per request when the pipeline broadcasts the
    user tensors per pair, and in bundle form (U-row user tensors + user_index)."""
    user_row, item_row = 0, 0
    for value_info in model.graph.input:
        dims = _dims(value_info)
        row = 4 * int(np.prod(dims[1:])) if value_info.name != USER_INDEX else 0
        if value_info.name in USER_INPUTS:
            user_row += row
        elif value_info.name != USER_INDEX:
            item_row += row
    naive = candidates * (user_row + item_row)
    bundle = user_row + candidates * (item_row + 8)
    return naive, bundle


def _time_runs(run, loops):
    start = time.perf_counter()
    for _ in range(loops):
        run()
    return (time.perf_counter() - start) / loops


def _loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def bench(users=8, candidates=(100, 500, 1000), repeats=7, seed=0, out=sys.stdout):
    """Time naive vs structured models (module docstring); print a table to ``out``.

    Every variant is timed ``repeats`` times, interleaved with the others,
    each time over enough runs for about 50 ms; the median run time is
    reported. Candidates are grouped by user, as the pipeline sends them.
    """
    print(f"# structured features bench, {time.strftime('%Y-%m-%d %H:%M:%S')}: U={users} users per batch, "
          f"repeats={repeats}, seed={seed}, {os.cpu_count()} cpus, loadavg {_loadavg()}", file=out)
    for model_name, model in _reference_models(seed).items():
        naive = unstructure(model)
        variants = [("unstructure (naive)", naive, flops(naive))]
        if model_name == "demo":
            variants.append(("as shipped (demo.py)", model, flops(model)))
        reports = []
        for label, options in _OPTIONS:
            structured_model, report = structure(model, **options)
            variants.append((label, structured_model, report.flops_after))
            reports.append(report)
        # Both splits, and the item-only part read from a table of 100,000 items (jizhi/itemside.py,
        # stage option item_cache): timed with the gather of each candidate's row.
        from jizhi.itemside import split_items
        split = split_items(structure(model)[0])
        if split is not None:
            variants.append(("both + item table (item_cache)", split, flops(split.serving)))
        print(f"\n## {model_name}\n{reports[0].summary(500)}", file=out)
        sessions = [_session(m if isinstance(m, onnx.ModelProto) else m.serving) for _, m, _ in variants]
        tables = None
        if split is not None:
            names = [name for name, _ in split.frontier]
            table_items = random_inputs(model, 1, 100_000, seed + 1)["item_emb"]
            tables = dict(zip(names, _session(split.items).run(names, {"item_emb": table_items})))
        for c in candidates:
            pairs = users * c
            feeds = random_inputs(model, users, pairs, seed, np.repeat(np.arange(users, dtype=np.int64), c))
            rows = np.random.default_rng(seed).integers(0, 100_000, size=pairs)
            runs = []
            for (_, m, _), session in zip(variants, sessions):
                if isinstance(m, onnx.ModelProto):
                    runs.append(lambda session=session: session.run(None, feeds))
                    continue
                wanted = {i.name for i in session.get_inputs()}
                base = {k: v for k, v in feeds.items() if k in wanted}

                def run(session=session, base=base):
                    return session.run(None, {**base, **{n: np.take(t, rows, axis=0) for n, t in tables.items()}})
                runs.append(run)
            loops = []
            for run in runs:
                _time_runs(run, 2)
                loops.append(max(1, int(0.05 / max(_time_runs(run, 3), 1e-6))))
            times = [[] for _ in runs]
            for _ in range(repeats):
                for k, run in enumerate(runs):
                    times[k].append(_time_runs(run, loops[k]))
            medians = [statistics.median(t) for t in times]
            naive_bytes, bundle_bytes = _input_bytes(model, c)
            print(f"\n{model_name}, {users} x {c} candidates (P={pairs}), loadavg {_loadavg()}; input bytes per "
                  f"request: {naive_bytes:,} user tensors broadcast per pair, {bundle_bytes:,} bundle form "
                  f"({naive_bytes / bundle_bytes:.2f}x)", file=out)
            print(f"{'variant':<46} {'ms/batch':>9} {'us/pair':>8} {'pairs/s':>11} {'x naive':>8} "
                  f"{'kFLOP/pair':>10}", file=out)
            for (label, _, f), median in zip(variants, medians):
                print(f"{label:<46} {median * 1e3:9.3f} {median * 1e6 / pairs:8.3f} {pairs / median:11,.0f} "
                      f"{medians[0] / median:8.2f} {f.at(c) / 1e3:10.1f}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jizhi.structured", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("bench", help="time naive vs structured reference models")
    b.add_argument("--users", type=int, default=8)
    b.add_argument("--candidates", default="100,500,1000", help="comma-separated candidates per user")
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--seed", type=int, default=0)
    r = commands.add_parser("report", help="print what structure() moves in an ONNX model")
    r.add_argument("model")
    r.add_argument("--candidates", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench(args.users, tuple(int(c) for c in args.candidates.split(",")), args.repeats, args.seed)
    else:
        _, report = structure(onnx.load(args.model))
        print(report.summary(args.candidates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
