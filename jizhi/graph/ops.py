"""A few ONNX ops in numpy: the shape computations and the data movement the
canonical pre-pass folds and probes (``jizhi.graph.canonical``) and the floor
analysis follows (``jizhi.graph.floor``).

Runs wherever those run, on small arrays (shapes, index lists, probe tensors
of a few hundred values); deterministic, no onnxruntime. ``run(node, values,
opset)`` computes a node's outputs from its input values (numpy arrays; None
for an absent optional input) and raises ``Unsupported`` for an op, an
attribute or a value it does not handle: the caller then leaves the node
alone. Semantics follow the ONNX operator specification for the default
domain (opsets 9 to 21); integer Div truncates toward zero, as onnxruntime's.

``MOVEMENT``: the ops that only move, copy or drop elements of their first
input (``DATA_INPUTS`` says which inputs are moved; the others are indices,
shapes or axes, which must be constants).
"""
import numpy as np
from onnx import helper, numpy_helper

from jizhi.graph.proto import DOMAINS, attr, constant_value


class Unsupported(Exception):
    """An op, attribute or value ``run`` does not handle."""


# Ops that move elements of their data inputs: input positions moved (None: all of them).
DATA_INPUTS = {
    "Identity": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Gather": (0,), "GatherND": (0,), "Slice": (0,), "Split": (0,),
    "Concat": None, "Expand": (0,),
}
MOVEMENT = frozenset(DATA_INPUTS)


def data_inputs(node):
    """The positions of ``node``'s inputs that a movement op moves."""
    positions = DATA_INPUTS[node.op_type]
    return tuple(range(len(node.input))) if positions is None else positions


def _axis(value, rank):
    value = int(value)
    if not -rank <= value < max(rank, 1):
        raise Unsupported(f"axis {value} out of range for rank {rank}")
    return value + rank if value < 0 else value


def _ints(value):
    if value is None:
        return None
    value = np.asarray(value)
    if value.dtype.kind not in "iu":
        raise Unsupported("indices that are not integers")
    return [int(v) for v in value.reshape(-1)]


def _axes(node, values, opset, since):
    """Axes from input 1 (opset >= ``since``) or from the attribute."""
    if opset >= since:
        return _ints(values[1]) if len(values) > 1 else None
    axes = attr(node, "axes")
    return None if axes is None else list(axes)


def _int_div(a, b):
    if np.any(b == 0):
        raise Unsupported("integer division by zero")
    q = np.abs(a) // np.abs(b)
    return (np.sign(a) * np.sign(b) * q).astype(np.result_type(a, b))


def _slice(node, values, opset):
    data = values[0]
    if opset < 10:
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes = attr(node, "axes")
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(values[1]), _ints(values[2])
        axes = _ints(values[3]) if len(values) > 3 and values[3] is not None else list(range(len(starts)))
        steps = _ints(values[4]) if len(values) > 4 and values[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise Unsupported("Slice step 0")
        # numpy clamps starts and ends as ONNX does (negative ones count from the end; an end past the
        # first element with a negative step runs to it); slice.indices() would turn end -1 into the last.
        index[_axis(axis, data.ndim)] = slice(start, end, step)
    return [data[tuple(index)]]


def split_sizes(node, opset, length, given=None):
    """The sizes of a Split's outputs along an axis of ``length``: ``given`` (its sizes input, opset 13 and
    later), the ``split`` attribute (older opsets), else equal chunks with the last one smaller; None when
    they do not add up to ``length`` or do not match the outputs."""
    if opset >= 13:
        sizes = given
    else:
        sizes = attr(node, "split")
        sizes = list(sizes) if sizes is not None else None
    outputs = len(node.output)
    if sizes is None:
        chunk = -(-length // outputs)
        sizes = [min(chunk, max(0, length - k * chunk)) for k in range(outputs)]
    return [int(x) for x in sizes] if len(sizes) == outputs and sum(sizes) == length else None


def _split(node, values, opset):
    data = values[0]
    axis = _axis(attr(node, "axis", 0), data.ndim)
    given = _ints(values[1]) if opset >= 13 and len(values) > 1 and values[1] is not None else None
    sizes = split_sizes(node, opset, data.shape[axis], given)
    if sizes is None:
        raise Unsupported("Split sizes do not add up")
    return np.split(data, np.cumsum(sizes)[:-1], axis=axis)


def _reshape(data, shape, allowzero):
    shape = list(shape)
    for i, size in enumerate(shape):
        if size == 0 and not allowzero:
            if i >= data.ndim:
                raise Unsupported("Reshape copies a dim the input does not have")
            shape[i] = data.shape[i]
    if shape.count(-1) > 1:
        raise Unsupported("Reshape with two -1")
    try:
        return data.reshape(shape)
    except ValueError as e:
        raise Unsupported(f"Reshape: {e}") from None


def _gather_nd(node, data, index):
    if attr(node, "batch_dims", 0) != 0:
        raise Unsupported("GatherND with batch_dims")
    index = np.asarray(index)
    if index.dtype.kind not in "iu" or index.ndim < 1 or index.shape[-1] > data.ndim:
        raise Unsupported("GatherND index")
    k = index.shape[-1]
    flat = index.reshape(-1, k)
    bounds = np.array(data.shape[:k])
    flat = np.where(flat < 0, flat + bounds, flat)
    if np.any(flat < 0) or np.any(flat >= bounds):
        raise Unsupported("GatherND index out of range")
    picked = data[tuple(flat.T)]
    return picked.reshape(*index.shape[:-1], *data.shape[k:])


def _numpy_type(to):
    try:
        return helper.tensor_dtype_to_np_dtype(to)
    except Exception:
        raise Unsupported(f"Cast to {to}") from None


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
    "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and, "Or": np.logical_or,
}

SUPPORTED = MOVEMENT | frozenset(_BINARY) | frozenset({
    "Constant", "Shape", "Size", "Cast", "Div", "Where", "Min", "Max", "Neg", "Abs", "Not", "Range",
    "ConstantOfShape",
})


def run(node, values, opset):
    """The outputs (list of numpy arrays) of ``node`` on input ``values`` (module docstring)."""
    if node.domain not in DOMAINS or node.op_type not in SUPPORTED:
        raise Unsupported(node.op_type)
    try:
        return _run(node, values, opset)
    except Unsupported:
        raise
    except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as e:  # values the op rejects
        raise Unsupported(f"{node.op_type}: {e}") from None


def _run(node, values, opset):
    op = node.op_type
    values = list(values)
    if any(v is None for i, v in enumerate(values) if node.input[i]):
        raise Unsupported("an input value is unknown")
    x = values[0] if values else None
    if op == "Constant":
        value = constant_value(node)
        if value is None:
            raise Unsupported("Constant without a value")
        return [value]
    if op == "Identity":
        return [x]
    if op == "Shape":
        dims = np.array(x.shape, dtype=np.int64)
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return [dims[start:end]]
    if op == "Size":
        return [np.array(x.size, dtype=np.int64)]
    if op == "Cast":
        return [x.astype(_numpy_type(attr(node, "to")))]
    if op in _BINARY:
        if op in ("And", "Or"):
            return [_BINARY[op](x, values[1])]
        return [np.asarray(_BINARY[op](x, values[1])).astype(
            np.bool_ if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
            else np.result_type(x, values[1]))]
    if op == "Div":
        if x.dtype.kind in "iu":
            return [_int_div(x, values[1])]
        return [np.divide(x, values[1]).astype(np.result_type(x, values[1]))]
    if op in ("Min", "Max"):
        out = values[0]
        for v in values[1:]:
            out = (np.minimum if op == "Min" else np.maximum)(out, v)
        return [out]
    if op == "Neg":
        return [np.negative(x)]
    if op == "Abs":
        return [np.abs(x)]
    if op == "Not":
        return [np.logical_not(x)]
    if op == "Where":
        return [np.where(x, values[1], values[2])]
    if op == "Range":
        return [np.arange(x, values[1], values[2]).astype(x.dtype)]
    if op == "ConstantOfShape":
        value = attr(node, "value")
        fill = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value)
        shape = _ints(x)
        if int(np.prod(shape)) > 1_000_000:
            raise Unsupported("ConstantOfShape too large")
        return [np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)]
    return _movement(node, values, opset)


def _movement(node, values, opset):
    op = node.op_type
    x = values[0]
    if op == "Reshape":
        return [_reshape(x, _ints(values[1]), attr(node, "allowzero", 0))]
    if op == "Flatten":
        axis = _axis(attr(node, "axis", 1), x.ndim + 1) if x.ndim else 0
        return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]
    if op == "Transpose":
        perm = attr(node, "perm")
        return [np.transpose(x, None if perm is None else list(perm))]
    if op == "Squeeze":
        axes = _axes(node, values, opset, 13)
        if axes is None:
            return [np.squeeze(x)]
        axes = [_axis(a, x.ndim) for a in axes]
        if any(x.shape[a] != 1 for a in axes):
            raise Unsupported("Squeeze of a dim other than 1")
        return [np.squeeze(x, axis=tuple(axes))]
    if op == "Unsqueeze":
        axes = _axes(node, values, opset, 13)
        if axes is None:
            raise Unsupported("Unsqueeze without axes")
        rank = x.ndim + len(axes)
        out = x
        for a in sorted(_axis(a, rank) for a in axes):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Gather":
        index = np.asarray(values[1])
        if index.dtype.kind not in "iu":
            raise Unsupported("Gather index")
        axis = _axis(attr(node, "axis", 0), x.ndim)
        n = x.shape[axis]
        if np.any(index < -n) or np.any(index >= n):
            raise Unsupported("Gather index out of range")
        return [np.take(x, np.where(index < 0, index + n, index), axis=axis)]
    if op == "GatherND":
        return [_gather_nd(node, x, values[1])]
    if op == "Slice":
        return _slice(node, values, opset)
    if op == "Split":
        return _split(node, values, opset)
    if op == "Concat":
        parts = [v for v in values if v is not None]
        axis = _axis(attr(node, "axis"), parts[0].ndim)
        return [np.concatenate(parts, axis=axis)]
    if op == "Expand":
        shape = _ints(values[1])
        try:
            target = np.broadcast_shapes(x.shape, tuple(shape))
        except ValueError:
            raise Unsupported("Expand shapes do not broadcast") from None
        return [np.broadcast_to(x, target).copy()]
    raise Unsupported(op)

