"""The canonicalising pre-pass of the graph passes: a bundle-form graph as
torch.onnx.export writes it, rewritten into the forms ``structure``
(jizhi/graph/structured.py) and ``split_items`` (jizhi/graph/itemside.py)
recognise, with the same scores.

Both passes run it first (``canonicalise(model) -> Canonical``); it runs
where they run, takes a ModelProto and returns a new one (the argument is
not modified; a model it has nothing to do to is returned as it is), is
deterministic and runs no onnxruntime: the shape computations and the data
movement it reasons about are evaluated in numpy (jizhi/graph/ops.py) on
shapes and index lists. Rounds of the three steps below run until one
changes nothing.

1. Folding (``_fold``). A shape computation (``Shape``/``Size`` of any
   tensor, then Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, Add, Sub,
   Mul, Div, Equal, Where, Range... on it and on constants) is evaluated at
   three (U, P) sizes, each tensor's shape taken from onnx shape inference
   (with data propagation) with U and P the names of the inputs' first
   dims; one whose value is the same at every size becomes a constant.
   A ``Reshape`` whose input has the batch (U or P) as its first dim and
   whose output is that dim followed by static dims gets the constant
   target ``[0, dims...]`` (allowzero 0): the computed ``.view(batch, -1,
   d)`` of TorchScript and the ``[-1, F, D]`` with allowzero=1 of the
   dynamo exporter both become ``[0, F, D]``.
2. Local rewrites (``_simplify``), each exact:
   ``GatherND(x, Unsqueeze(i, [-1]))`` -> ``Gather(x, i, axis=0)`` (the
   dynamo exporter's ``x[user_index]``); a ``Concat`` of a ``Concat`` on the
   same axis -> one Concat; ``Squeeze`` of a one-wide ``Split`` output or
   ``Slice`` on the squeezed axis (``torch.unbind``, ``x[:, k]``) ->
   ``Gather(x, k, axis)``; ``Gather(Concat(parts), k)`` and ``Gather(Slice(x),
   k)`` on the concatenated / sliced axis with a constant scalar k -> the
   Gather of the part or of x; a unit-step ``Slice`` with constant bounds
   -> its bounds clamped to the static dims; and ``Reshape(Concat(parts of
   [B, k*D]), [0, F, D])`` read by a MatMul of two non-constant tensors (an
   interaction's T) -> ``Concat(parts as [B, k, D], axis=1)``, a field
   column ``Gather(x, j, axis=1)`` becoming ``Slice(x, j:j+1, axis=1)``,
   ``Flatten(y)`` of a [B, k, D] tensor y becoming y.
3. Interaction products (``_regions``). From ``Z = MatMul(A, B)`` [B, F, F]
   (A, B not constant, F static), the pure data-movement region that reads
   it (Transpose, Reshape, Flatten, Gather, GatherND, Slice, Split,
   Squeeze, Unsqueeze, Concat, Identity, Expand; indices constant, shapes
   constant or computed from shapes) is probed in numpy on ``Z[b, i, j] =
   b*F*F + i*F + j`` at batch sizes 1, 2 and 5; a region output R [B, K]
   read outside the region is rewritten as ``Gather(Flatten(Z, axis=1), s,
   axis=1)`` when the probe reads exactly ``R[b, k] = b*F*F + s_k`` at every
   size (TorchScript's ``Z[:, li, lj]``: Transpose, Flatten, Gather, Reshape,
   Transpose, Reshape; dynamo's: Transpose, GatherND, Transpose). Anything
   the probe does not prove stays as it is.

``Canonical.changes``: one line per rewrite, for the reports.
"""
import dataclasses

import numpy as np
import onnx

from jizhi.graph import ops
from jizhi.graph.proto import DOMAINS, ITEM_INPUT, USER_INDEX, USER_INPUTS, Graph, Writer, attr, has_subgraph

PROBES = ((1, 1), (3, 5), (4, 11))   # (U, P) at which shape computations are evaluated
REGION_BATCHES = (1, 2, 5)           # batch sizes at which an interaction's region is probed
MAX_ROUNDS = 8
MAX_VALUE = 100_000                  # elements: larger values are not folded
_SHAPE_OPS = ("Shape", "Size")


@dataclasses.dataclass(frozen=True)
class Canonical:
    model: onnx.ModelProto
    changes: tuple


def canonicalise(model):
    """The canonical form of a bundle-form model (module docstring): ``Canonical(model, changes)``."""
    if any(has_subgraph(node) for node in model.graph.node):
        return Canonical(model, ())
    changes = []
    current = model
    for _ in range(MAX_ROUNDS):
        done = []
        for step in (_fold, _simplify, _regions):
            try:
                current, step_changes = step(current)
            except Exception as e:  # a graph a step cannot rewrite is left as it was (and said so)
                step_changes = []
                changes.append(f"{step.__name__.strip('_')}: left as it was ({type(e).__name__}: {e})")
            done += step_changes
        changes += done
        if not done:
            break
    return Canonical(current, tuple(changes))


# --- editing ------------------------------------------------------------------------------

class _Edit:
    """A new node list for a model: original nodes kept under their names, new ones with fresh names."""

    def __init__(self, g):
        self.g = g
        self.w = Writer(g)
        self.changes = []

    def keep(self, node, inputs=None):
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if inputs is not None:
            new.input[:] = inputs
        self.w.nodes.append(new)
        return new

    def const(self, base, array):
        return self.w.const(base, np.asarray(array))

    def node(self, op, inputs, outputs, name=None, **attrs):
        node = self.w.node(op, inputs, outputs, **attrs)
        if name:
            node.name = name
        return node

    def finish(self, model):
        if not self.changes:
            return model, []
        return self.w.model(model), self.changes


# --- evaluating shape computations ----------------------------------------------------------

def _batch_symbols(g):
    """{dim name: "U" or "P"} of the bundle inputs' first dims (empty when they share a name)."""
    first = {}
    for value_info in g.model.graph.input:
        dims = g.symbols.get(value_info.name)
        if dims and isinstance(dims[0], str):
            first[value_info.name] = dims[0]
    users = {first[n] for n in USER_INPUTS if n in first}
    pairs = {first[n] for n in (ITEM_INPUT, USER_INDEX) if n in first}
    if len(users) > 1 or len(pairs) > 1 or users & pairs:
        return {}
    return {**{s: "U" for s in users}, **{s: "P" for s in pairs}}


def _shape_side(g):
    """Tensors computed from shapes and small constants only, with the nodes computing them."""
    side, nodes = set(), []
    for node in g.model.graph.node:
        if node.domain not in DOMAINS or node.op_type not in ops.SUPPORTED or node.op_type == "Constant":
            continue
        names = [n for n in node.input if n]
        if node.op_type in _SHAPE_OPS:
            pass
        elif not names or not all(n in side or n in g.constants for n in names):
            continue
        elif not any(n in side for n in names):
            if any(g.shape(n) is None or None in g.shape(n) or int(np.prod(g.shape(n))) > MAX_VALUE for n in names):
                continue
        side.update(n for n in node.output if n)
        nodes.append(node)
    return side, nodes


def _placeholder(dims, sizes):
    """An array of shape ``dims`` (symbols replaced by ``sizes``) that takes no memory, or None."""
    if dims is None:
        return None
    out = []
    for d in dims:
        if isinstance(d, str):
            d = sizes.get(d)
        if d is None:
            return None
        out.append(int(d))
    return np.broadcast_to(np.zeros((), np.int8), out)


def _evaluate(g, nodes, sizes, env=None):
    """{tensor: value or None} of ``nodes`` (in graph order) evaluated at ``sizes`` ({dim name: int})
    from ``env`` and the constants; a Shape or Size of a tensor not evaluated reads its inferred dims."""
    values = dict(env or {})
    for node in nodes:
        inputs = []
        for i, name in enumerate(node.input):
            if not name:
                inputs.append(None)
            elif name in values:
                inputs.append(values[name])
            elif name in g.constants:
                inputs.append(g.value(name))
            elif i == 0 and node.op_type in _SHAPE_OPS:
                inputs.append(_placeholder(g.symbols.get(name), sizes))
            else:
                inputs.append(None)
        if node.op_type in _SHAPE_OPS and inputs and inputs[0] is None:
            inputs[0] = _placeholder(g.symbols.get(node.input[0]), sizes)
        try:
            outputs = ops.run(node, inputs, g.opset)
        except ops.Unsupported:
            outputs = [None] * len(node.output)
        for name, value in zip(node.output, outputs):
            if name:
                values[name] = None if value is None or value.size > MAX_VALUE else np.asarray(value)
    return values


def _same(values):
    first = values[0]
    return first is not None and all(
        v is not None and v.dtype == first.dtype and v.shape == first.shape and np.array_equal(v, first)
        for v in values[1:])


def _probe_sizes(symbols, users, pairs):
    return {name: (users if side == "U" else pairs) for name, side in symbols.items()}


def _reshaped(dims, target, allowzero):
    """The output dims of Reshape(dims, target), or None when it is not a valid reshape."""
    out = []
    for i, size in enumerate(target):
        if size == 0 and not allowzero:
            if i >= len(dims):
                return None
            size = dims[i]
        out.append(size)
    total = int(np.prod(dims, dtype=np.int64))
    if out.count(-1) == 1:
        rest = int(np.prod([s for s in out if s != -1], dtype=np.int64))
        if rest == 0 or total % rest:
            return None
        out[out.index(-1)] = total // rest
    if -1 in out or any(s < 0 for s in out) or int(np.prod(out, dtype=np.int64)) != total:
        return None
    return out


# --- 1. folding ---------------------------------------------------------------------------------

def _fold(model):
    g = Graph(model, data_prop=True)
    symbols = _batch_symbols(g)
    side, side_nodes = _shape_side(g)
    probes = [_evaluate(g, side_nodes, _probe_sizes(symbols, u, p)) for u, p in PROBES]
    outputs = set(g.outputs)
    folded = {name for name in side if name not in outputs and _same([v.get(name) for v in probes])}
    edit = _Edit(g)
    dropped = 0
    side_ids = {id(node) for node in side_nodes}
    for node in model.graph.node:
        outs = [n for n in node.output if n]
        if outs and id(node) in side_ids and all(n in folded for n in outs):
            edit.w.initializers += [onnx.numpy_helper.from_array(probes[0][name], name) for name in outs]
            dropped += 1
            continue
        if node.op_type == "Reshape" and node.domain in DOMAINS:
            target = _reshape_target(g, node, symbols, probes)
            if target is not None:
                edit.node("Reshape", [node.input[0], edit.const(node.output[0] + ".shape", target)],
                          list(node.output), name=node.name or None)
                edit.changes.append(f"Reshape -> {node.output[0]}: constant target {target.tolist()}")
                continue
        edit.keep(node)
    if dropped:
        edit.changes.append(f"{dropped} shape computations folded into constants")
    return edit.finish(model)


def _reshape_target(g, node, symbols, probes):
    """The constant target ``[0, dims...]`` of a Reshape that keeps its input's batch dim first
    (module docstring), or None when it has one already or is not such a Reshape."""
    data, shape = node.input[0], node.input[1]
    allowzero = attr(node, "allowzero", 0)
    dims = g.symbols.get(data)
    if not dims or dims[0] not in symbols:
        return None
    outs = []
    for (u, p), values in zip(PROBES, probes):
        target = g.value(shape) if shape in g.constants else values.get(shape)
        sizes = _probe_sizes(symbols, u, p)
        in_dims = _placeholder(dims, sizes)
        if target is None or in_dims is None or target.ndim != 1 or target.dtype.kind not in "iu":
            return None
        out = _reshaped(list(in_dims.shape), [int(t) for t in target], allowzero)
        if out is None or not out or out[0] != in_dims.shape[0]:
            return None
        outs.append(out[1:])
    if any(o != outs[0] for o in outs[1:]) or any(s <= 0 for s in outs[0]):
        return None
    new = np.array([0, *outs[0]], dtype=np.int64)
    current = g.value(shape) if shape in g.constants else None
    if current is not None and not allowzero and np.array_equal(current.astype(np.int64), new):
        return None
    if current is not None and not allowzero and current.size == new.size and current[0] in (0, -1) \
            and -1 not in current[1:] and 0 not in current[1:]:
        return None    # [-1, dims...] or [0, dims...] already: a constant the passes read as it is
    return new


# --- 2. local rewrites ----------------------------------------------------------------------------

def _scalar(g, name):
    value = g.value(name) if name else None
    if value is None or value.shape != () or value.dtype.kind not in "iu":
        return None
    return int(value)


def _axes_of(g, node):
    if g.opset >= 13 and node.op_type in ("Squeeze", "Unsqueeze"):
        return g.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = attr(node, "axes")
    return None if axes is None else list(axes)


def _norm(axis, rank):
    if rank is None or not -rank <= axis < rank:
        return None
    return axis + rank if axis < 0 else axis


def _slice_params(g, node):
    """(source, axis, start, end) of a unit-step Slice on one axis with constant bounds, normalised
    to the static dim of the source (0 <= start <= end <= dim), or None."""
    if node is None or node.op_type != "Slice" or node.domain not in DOMAINS or g.opset < 10:
        return None
    inputs = list(node.input) + [""] * (5 - len(node.input))
    starts, ends = g.ints(inputs[1]), g.ints(inputs[2])
    axes = g.ints(inputs[3]) if inputs[3] else [0]
    steps = g.ints(inputs[4]) if inputs[4] else [1]
    if starts is None or ends is None or axes is None or steps is None or len(starts) != 1 \
            or len(ends) != 1 or len(axes) != 1 or steps != [1]:
        return None
    shape = g.shape(inputs[0])
    axis = _norm(axes[0], None if shape is None else len(shape))
    if axis is None or shape[axis] is None:
        return None
    start, end, _ = slice(starts[0], ends[0], 1).indices(shape[axis])
    return inputs[0], axis, start, max(start, end)


def _split_piece(g, node, name):
    """(source, axis, offset, size) of output ``name`` of a Split, or None."""
    shape = g.shape(node.input[0])
    if shape is None:
        return None
    axis = _norm(attr(node, "axis", 0), len(shape))
    if axis is None or shape[axis] is None:
        return None
    given = None
    if g.opset >= 13 and len(node.input) > 1 and node.input[1]:
        given = g.ints(node.input[1])
        if given is None:
            return None
    sizes = ops.split_sizes(node, g.opset, shape[axis], given)
    if sizes is None:
        return None
    k = list(node.output).index(name)
    return node.input[0], axis, int(sum(sizes[:k])), int(sizes[k])


def _simplify(model):
    """The local rewrites, then (once those change nothing) the interaction's T as a Concat."""
    for rewrite in (_rewrite, _reshape_to_concat):
        g = Graph(model, data_prop=True)
        edit = _Edit(g)
        for node in model.graph.node:
            if node.domain not in DOMAINS or not rewrite(g, edit, node):
                edit.keep(node)
        if edit.changes:
            return edit.finish(model)
    return model, []


def _rewrite(g, edit, node):
    """Write ``node``'s replacement (module docstring, step 2) and return True, or return False."""
    op, out = node.op_type, node.output[0] if node.output else ""
    name = node.name or None
    if op == "GatherND" and attr(node, "batch_dims", 0) == 0 and len(node.input) == 2:
        unsqueeze = g.producer.get(node.input[1])
        if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" and unsqueeze.domain in DOMAINS:
            index = unsqueeze.input[0]
            axes, rank = _axes_of(g, unsqueeze), g.rank(index)
            if rank is not None and axes is not None and len(axes) == 1 and _norm(axes[0], rank + 1) == rank:
                edit.node("Gather", [node.input[0], index], [out], name=name, axis=0)
                edit.changes.append(f"GatherND -> {out}: Gather on axis 0")
                return True
        return False
    if op == "Concat":
        rank, axis = g.rank(out), attr(node, "axis")
        axis = None if axis is None else _norm(axis, rank)
        if axis is None:
            return False
        parts = _flat_concat(g, node, axis, rank)
        if parts == list(node.input):
            return False
        edit.node("Concat", parts, [out], name=name, axis=axis)
        edit.changes.append(f"Concat -> {out}: nested Concats on axis {axis} made one")
        return True
    if op == "Squeeze":
        axes, rank = _axes_of(g, node), g.rank(node.input[0])
        if axes is None or len(axes) != 1 or rank is None:
            return False
        axis = _norm(axes[0], rank)
        piece = _piece(g, node.input[0])
        if piece is None or piece[1] != axis or piece[3] != 1:
            return False
        source, _, offset, _ = piece
        edit.node("Gather", [source, edit.const(out + ".index", np.array(offset, np.int64))], [out], name=name,
                  axis=axis)
        edit.changes.append(f"Squeeze -> {out}: Gather of row {offset} on axis {axis}")
        return True
    if op == "Gather" and len(node.input) == 2:
        k = _scalar(g, node.input[1])
        shape = g.shape(node.input[0])
        if k is None or shape is None:
            return False
        axis = _norm(attr(node, "axis", 0), len(shape))
        if axis is None or shape[axis] is None or not -shape[axis] <= k < shape[axis]:
            return False
        k = k + shape[axis] if k < 0 else k
        found = _row_of(g, node.input[0], axis, k)
        if found is None:
            return False
        source, row = found
        edit.node("Gather", [source, edit.const(out + ".index", np.array(row, np.int64))], [out], name=name,
                  axis=axis)
        edit.changes.append(f"Gather -> {out}: row {row} of {source}")
        return True
    if op == "Slice":
        params = _slice_params(g, node)
        if params is None:
            return False
        source, axis, start, end = params
        inputs = list(node.input) + [""] * (5 - len(node.input))
        if g.ints(inputs[1]) == [start] and g.ints(inputs[2]) == [end] and g.ints(inputs[3]) == [axis] \
                and not inputs[4]:
            return False
        edit.node("Slice", [source, edit.const(out + ".starts", np.array([start], np.int64)),
                            edit.const(out + ".ends", np.array([end], np.int64)),
                            edit.const(out + ".axes", np.array([axis], np.int64))], [out], name=name)
        edit.changes.append(f"Slice -> {out}: bounds {start}:{end} on axis {axis}")
        return True
    return False


def _flat_concat(g, node, axis, rank):
    parts = []
    for name in node.input:
        inner = g.producer.get(name)
        if inner is not None and inner.op_type == "Concat" and inner.domain in DOMAINS and g.rank(name) == rank \
                and attr(inner, "axis") is not None and _norm(attr(inner, "axis"), rank) == axis:
            parts += _flat_concat(g, inner, axis, rank)
        else:
            parts.append(name)
    return parts


def _piece(g, name):
    """(source, axis, offset, size) when ``name`` is a Split output or a Slice on one axis."""
    node = g.producer.get(name)
    if node is None or node.domain not in DOMAINS:
        return None
    if node.op_type == "Split":
        return _split_piece(g, node, name)
    params = _slice_params(g, node)
    if params is None:
        return None
    source, axis, start, end = params
    return source, axis, start, end - start


def _row_of(g, name, axis, k):
    """(source, row) when row ``k`` on ``axis`` of tensor ``name`` is row ``row`` of a Concat part
    or of a Slice's source, else None."""
    node = g.producer.get(name)
    if node is None or node.domain not in DOMAINS:
        return None
    if node.op_type == "Concat":
        rank = g.rank(name)
        if attr(node, "axis") is None or _norm(attr(node, "axis"), rank) != axis:
            return None
        offset = 0
        for part in node.input:
            shape = g.shape(part)
            if shape is None or len(shape) != rank or shape[axis] is None:
                return None
            if offset <= k < offset + shape[axis]:
                return part, k - offset
            offset += shape[axis]
        return None
    params = _slice_params(g, node)
    if params is None or params[1] != axis or not params[2] + k < params[3]:
        return None
    return params[0], params[2] + k


def _interaction_operand(g, name):
    """True when tensor ``name`` (or its Transpose) is read by a MatMul of two non-constant tensors."""
    for consumer in g.consumers.get(name, ()):
        if consumer.domain not in DOMAINS:
            continue
        if consumer.op_type == "MatMul" and not any(n in g.constants for n in consumer.input):
            return True
        if consumer.op_type == "Transpose" and any(
                c.op_type == "MatMul" and c.domain in DOMAINS and not any(n in g.constants for n in c.input)
                for c in g.consumers.get(consumer.output[0], ())):
            return True
    return False


def _reshape_to_concat(g, edit, node):
    if node.op_type != "Reshape":
        return False
    out = node.output[0]
    target = g.ints(node.input[1])
    concat = g.producer.get(node.input[0])
    if target is None or len(target) != 3 or target[0] not in (0, -1) or min(target[1:]) <= 0 \
            or attr(node, "allowzero", 0) or concat is None or concat.op_type != "Concat" \
            or concat.domain not in DOMAINS or g.rank(node.input[0]) != 2 \
            or _norm(attr(concat, "axis", 0), 2) != 1 or not _interaction_operand(g, out):
        return False
    n_fields, dim = target[1:]
    inputs = _flat_concat(g, concat, 1, 2)
    widths = [g.shape(p)[1] if g.rank(p) == 2 else None for p in inputs]
    if None in widths or any(w % dim for w in widths) or sum(widths) != n_fields * dim:
        return False
    parts = []
    for part, width in zip(inputs, widths):
        k = width // dim
        producer = g.producer.get(part)
        source = producer.input[0] if producer is not None and producer.domain in DOMAINS else None
        source_shape = g.shape(source) if source else None
        if producer is not None and producer.op_type == "Gather" and source_shape is not None \
                and len(source_shape) == 3 and source_shape[2] == dim and source_shape[1] is not None \
                and _norm(attr(producer, "axis", 0), 3) == 1 and _scalar(g, producer.input[1]) is not None \
                and -source_shape[1] <= _scalar(g, producer.input[1]) < source_shape[1]:
            j = _scalar(g, producer.input[1]) % source_shape[1]
            parts.append(edit.w.op("Slice", [source, edit.const(part + ".starts", np.array([j], np.int64)),
                                             edit.const(part + ".ends", np.array([j + 1], np.int64)),
                                             edit.const(part + ".axes", np.array([1], np.int64))], part + ".row"))
        elif producer is not None and producer.op_type == "Flatten" and source_shape is not None \
                and len(source_shape) == 3 and tuple(source_shape[1:]) == (k, dim) \
                and _norm(attr(producer, "axis", 1), 3) == 1:
            parts.append(source)
        else:
            parts.append(edit.w.op("Reshape", [part, edit.const(part + ".rows_shape", np.array([0, k, dim], np.int64))],
                                   part + ".rows"))
    edit.node("Concat", parts, [out], name=node.name or None, axis=1)
    edit.changes.append(f"Reshape -> {out}: a Concat of {len(parts)} parts of [B, k, {dim}]")
    return True


# --- 3. interaction products ---------------------------------------------------------------------

def _regions(model):
    g = Graph(model, data_prop=True)
    symbols = _batch_symbols(g)
    side, side_nodes = _shape_side(g)
    rewrites = {}     # region output -> (Z, selection)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in DOMAINS or any(n in g.constants for n in node.input):
            continue
        z = node.output[0]
        dims = g.symbols.get(z)
        if not dims or len(dims) != 3 or not isinstance(dims[1], int) or dims[1] != dims[2] or dims[1] <= 0:
            continue
        for out, selection in _probe_region(g, z, dims, symbols, side, side_nodes):
            rewrites[out] = (z, selection)
    if not rewrites:
        return model, []
    edit = _Edit(g)
    flat, renamed = {}, {}
    for node in model.graph.node:
        edit.keep(node, [renamed.get(n, n) for n in node.input])
        z = node.output[0] if node.output else None
        for out, (source, selection) in rewrites.items():
            if source != z:
                continue
            if z not in flat:
                flat[z] = edit.w.op("Flatten", [z], z + ".flat", axis=1)
            renamed[out] = edit.w.op("Gather", [flat[z], edit.const(out + ".entries", selection)], out + ".entries",
                                     axis=1)
            edit.changes.append(f"{out}: entries {_describe(selection)} of the flattened product {z}")
    return edit.finish(model)


def _describe(selection):
    return f"{len(selection)} ({', '.join(str(int(s)) for s in selection[:4])}{', ...' if len(selection) > 4 else ''})"


def _probe_region(g, z, dims, symbols, side, side_nodes):
    """[(output, selection)] of the data-movement region reading ``z`` (module docstring, step 3)."""
    n = dims[1]
    region, nodes = {z}, []
    for node in g.model.graph.node:
        if node.op_type not in ops.MOVEMENT or node.domain not in DOMAINS:
            continue
        moved = ops.data_inputs(node)
        names = [(i, name) for i, name in enumerate(node.input) if name]
        if not any(name in region for i, name in names if i in moved):
            continue
        if all((name in region) if i in moved else (name in g.constants or name in side) for i, name in names):
            region.update(o for o in node.output if o)
            nodes.append(node)
    in_region = {id(node) for node in nodes}
    exits = []
    for name in (o for node in nodes for o in node.output if o):
        readers = [c for c in g.consumers.get(name, ()) if id(c) not in in_region]
        if readers and name not in g.outputs and not _already_canonical(g, name, z):
            exits.append(name)
    if not exits:
        return []
    wanted = in_region | {id(node) for node in side_nodes}
    order = [node for node in g.model.graph.node if id(node) in wanted]
    batch_symbol = dims[0] if isinstance(dims[0], str) else None
    probes = []
    for b in REGION_BATCHES:
        sizes = {} if batch_symbol is None else {batch_symbol: b}
        env = {z: np.arange(b * n * n, dtype=np.float64).reshape(b, n, n)}
        probes.append((b, _evaluate(g, order, sizes, env)))
    found = []
    for name in exits:
        selection = None
        for b, values in probes:
            r = values.get(name)
            if r is None or r.ndim != 2 or r.shape[0] != b or r.dtype != np.float64:
                selection = None
                break
            s = r - (np.arange(b, dtype=np.float64) * n * n)[:, None]
            if not np.all(s == s[0]) or np.any(s[0] < 0) or np.any(s[0] >= n * n) \
                    or np.any(s[0] != np.round(s[0])):
                selection = None
                break
            if selection is not None and not np.array_equal(selection, s[0].astype(np.int64)):
                selection = None
                break
            selection = s[0].astype(np.int64)
        if selection is not None and selection.size:
            found.append((name, selection))
    return found


def _already_canonical(g, name, z):
    """True when ``name`` is ``Flatten(z, axis=1)``, ``Reshape(z, [0|-1, F*F])`` or a Gather of one on axis 1."""
    node = g.producer.get(name)
    if node is None:
        return False
    if node.op_type == "Gather" and _norm(attr(node, "axis", 0), 2) == 1 and g.value(node.input[1]) is not None:
        node = g.producer.get(node.input[0])
        if node is None:
            return False
    if node.input[0] != z:
        return False
    if node.op_type == "Flatten":
        return attr(node, "axis", 1) == 1
    if node.op_type == "Reshape":
        shape = g.ints(node.input[1])
        n = g.symbols.get(z)[1]
        return shape in ([0, n * n], [-1, n * n], [0, -1]) and not attr(node, "allowzero", 0)
    return False
