"""Tensors by rows: the kinds the graph passes give a tensor, and the ops that
apply one function to every row (axis 0) of their batch inputs.

Used by the structured-features pass (``jizhi.graph.structured``: kinds
``CONST``, ``USER`` (U rows), ``PAIR_OF_USER`` (P rows, each its user's row
of a U-row tensor), ``PAIR`` (P rows), ``OTHER``; the ``Segment`` columns of
a split tensor, on the ``USER_SIDE`` or the ``PAIR_SIDE``) and by the item-side pass
(``jizhi.graph.itemside``: ``CONST``, an item kind of its own, ``OTHER``).
Deterministic functions of a ``jizhi.graph.proto.Graph``; run wherever a pass
runs.

Row-wise ops (a Gather on axis 0 moves past them; constant operands must
broadcast along axis 0, i.e. have a lower rank or a leading 1): unary
elementwise ops (Relu, Sigmoid, Tanh, Exp, Log, Cast, Identity, ...);
broadcasting elementwise ops (Add, Sub, Mul, Div, Pow, Max, Min, Where, Clip,
comparisons, ...) whose non-constant operands have the output's rank; MatMul
with a constant operand (batch axis kept) or between two batch tensors of the
same rank >= 3; Gemm with transA=0 and constant B and C; Flatten (axis >= 1);
Reshape with a constant shape starting with 0, or with -1 followed by sizes
(or 0s copying static input dims) whose product is the row size;
Unsqueeze/Squeeze with constant axes not touching axis 0; Transpose with perm[0] = 0; Slice with constant explicit axes
not including 0; Concat and Split on an axis other than 0; Gather with
constant indices on an axis other than 0; Reduce* with constant axes not
including 0; ArgMax/ArgMin, Softmax/LogSoftmax/Hardmax on an axis other than 0
(before opset 13: axis >= 1); LayerNormalization with axis >= 1;
BatchNormalization in inference mode; CumSum on a constant axis other than 0.
Any other op, an op in another domain, a node with a subgraph, or an operand
whose rank or constant value is not known (shape inference, initializers and
Constant nodes only; the passes fold shape computations first,
jizhi/graph/canonical.py) is not row-wise: its inputs are gathered per pair
first. Correctness first: nothing is moved on a guess.
"""
import dataclasses

import numpy as np

from jizhi.graph.proto import DOMAINS, USER_INDEX, attr, has_subgraph, normalize_axis

# Tensor kinds (module docstring) and the two sides of a split tensor.
CONST, USER, PAIR_OF_USER, PAIR, OTHER = "const", "user", "pair_of_user", "pair", "other"
USER_SIDE, PAIR_SIDE = "user", "pair"
_UNKNOWN = object()     # axes_input: axes given by a tensor that is not a constant

UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
    "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink",
    "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})
BROADCASTING = frozenset({
    "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Clip", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu",
    "Sub", "Sum", "Where", "Xor",
})
REDUCE = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare",
})
_SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


@dataclasses.dataclass
class Segment:
    """Columns (last axis) ``cols`` of a decomposed tensor held by ``name``:
    a U-row tensor (side user) or a P-row tensor (side pair)."""
    name: str
    side: str
    cols: np.ndarray


def is_user_gather(node, g):
    """Gather(x, user_index) on axis 0."""
    if node.op_type != "Gather" or node.domain not in DOMAINS or len(node.input) != 2:
        return False
    if node.input[1] != USER_INDEX:
        return False
    rank = g.rank(node.input[0])
    axis = attr(node, "axis", 0)
    return axis == 0 or (rank is not None and normalize_axis(axis, rank) == 0)


def axes_input(node, g, attr_name="axes"):
    """Axes from input 1 (newer opsets) or the attribute; None when absent, _UNKNOWN when not constant."""
    if len(node.input) > 1 and node.input[1]:
        axes = g.ints(node.input[1])
        return _UNKNOWN if axes is None else axes
    axes = attr(node, attr_name)
    return None if axes is None else list(axes)


# --- which ops commute with a row gather ----------------------------------------

def rowwise(node, g, batch):
    """True when ``node`` applies one function to every row (axis 0) of its batch
    inputs, so that it commutes with a Gather on axis 0.

    ``batch``: the positions of the inputs that carry rows (all with the same
    row count); every other non-empty input is a constant.
    """
    if node.domain not in DOMAINS or has_subgraph(node) or not batch:
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

    if op in UNARY:
        return first_only
    if op in BROADCASTING:
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
            axis = attr(node, "axis")
            return (out_rank is not None and axis is not None and normalize_axis(axis, out_rank) != 0
                    and all(i in batch for i, name in enumerate(inputs) if name))
        return False
    if op == "Gemm":
        if attr(node, "transA", 0) != 0:
            return False
        if len(inputs) < 3 or not inputs[2]:
            return True
        shape = g.shape(inputs[2])
        return shape is not None and (len(shape) <= 1 or shape[0] == 1)
    if in_rank is None:
        return False
    if op == "Flatten":
        return normalize_axis(attr(node, "axis", 1), in_rank) >= 1
    if op == "Reshape":
        return _reshape_rowwise(node, g, in_rank)
    if op == "Unsqueeze":
        axes = axes_input(node, g)
        if axes is None or axes is _UNKNOWN:
            return False
        return 0 not in [normalize_axis(a, in_rank + len(axes)) for a in axes]
    if op == "Squeeze":
        axes = axes_input(node, g)
        if axes is None or axes is _UNKNOWN:
            return False
        return 0 not in [normalize_axis(a, in_rank) for a in axes]
    if op == "Transpose":
        perm = attr(node, "perm")
        perm = list(perm) if perm is not None else list(reversed(range(in_rank)))
        return bool(perm) and perm[0] == 0
    if op == "Slice":
        if g.opset < 10:
            axes = attr(node, "axes")
        elif len(inputs) > 3 and inputs[3]:
            axes = g.ints(inputs[3])
            if any(name and g.value(name) is None for name in inputs[1:]):
                return False
        else:
            axes = None
        return axes is not None and 0 not in [normalize_axis(a, in_rank) for a in axes]
    if op == "Concat":
        axis = attr(node, "axis")
        return axis is not None and normalize_axis(axis, in_rank) != 0 and all(not name for name in inputs[1:])
    if op == "Split":
        return normalize_axis(attr(node, "axis", 0), in_rank) != 0
    if op == "Gather":
        return normalize_axis(attr(node, "axis", 0), in_rank) != 0
    if op in REDUCE:
        axes = axes_input(node, g)
        if axes is _UNKNOWN:
            return False
        if not axes:
            return bool(attr(node, "noop_with_empty_axes", 0))
        return 0 not in [normalize_axis(a, in_rank) for a in axes]
    if op in ("ArgMax", "ArgMin"):
        return first_only and normalize_axis(attr(node, "axis", 0), in_rank) != 0
    if op in _SOFTMAX:
        if g.opset >= 13:
            return normalize_axis(attr(node, "axis", -1), in_rank) != 0
        return normalize_axis(attr(node, "axis", 1), in_rank) >= 1
    if op == "LayerNormalization":
        return normalize_axis(attr(node, "axis", -1), in_rank) >= 1
    if op == "BatchNormalization":
        return (in_rank >= 2 and not attr(node, "training_mode", 0)
                and sum(1 for name in node.output if name) == 1)
    if op == "CumSum":
        axis = g.ints(inputs[1])
        return axis is not None and len(axis) == 1 and normalize_axis(axis[0], in_rank) != 0
    return False


def _reshape_rowwise(node, g, in_rank):
    shape = g.ints(node.input[1])
    if not shape:
        return False
    allowzero = attr(node, "allowzero", 0)
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
