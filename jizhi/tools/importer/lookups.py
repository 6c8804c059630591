"""Finding a foreign model's embedding lookups for ``jizhictl import``: each
FIELDS.toml field's table (an initializer or a Constant read by a Gather) and
the tensor holding its pooled bags (ReduceSum/ReduceMean over a padded bag,
or the Loop ``torch.onnx.export`` writes for ``nn.EmbeddingBag``).

Runs in the importing process; reads the ModelProto, never changes it.
``analyse`` checks the graph inputs against FIELDS.toml both ways, the dense
input, the output and every lookup, and returns an ``Analysis``; a model it
cannot map is refused (``BundleError``) naming the node or the input. The
ONNX helpers are jizhi.graph.proto's, shared with the graph passes.
"""
import collections
import dataclasses

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from jizhi.graph.proto import attr, constant_value, opset_version, static_dims, subgraphs, walk
from jizhi.tools.importer.fields import FieldSpec, refuse

MIN_OPSET = 11           # Slice with inputs, Loop with scan outputs as torch writes them

# Ops an ids tensor may pass through on its way to the Gather (input 0 only).
ID_CHAIN = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
_POOLING = {"ReduceSum": "sum", "ReduceMean": "mean"}
# A Slice "to the end": torch writes sys.maxsize; anything past int32 counts.
_SLICE_END = 2 ** 31 - 1


# --- the model's graph ---------------------------------------------------------------

def node_text(node):
    """How a message names a node: its name and op type."""
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"the unnamed {node.op_type} node making {node.output[0]!r}"


class Scope:
    """One graph (the model's, or a Loop body inside it): who makes and who reads each name.

    ``consumers`` lists the readers in this graph only (not in its subgraphs);
    ``constant`` looks through this graph and then the enclosing ones, as
    ONNX's outer-scope rule does.
    """

    def __init__(self, graph, outer=None):
        self.graph = graph
        self.outer = outer
        self.producer = {}
        self.consumers = collections.defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for position, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, position))
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self._values = {}

    def defines(self, name):
        return name in self.producer or name in self.initializers or name in self.inputs

    def source(self, name):
        """(scope, name) of the tensor ``name`` is an Identity chain of."""
        scope = self
        while True:
            node = scope.producer.get(name)
            if node is not None and node.op_type == "Identity":
                name = node.input[0]
                continue
            if scope.defines(name) or scope.outer is None:
                return scope, name
            scope = scope.outer

    def constant(self, name):
        """The value of ``name`` when it is an initializer or a Constant (through Identity), else None."""
        scope, name = self.source(name)
        if name in scope._values:
            return scope._values[name]
        value = None
        if name in scope.initializers:
            value = numpy_helper.to_array(scope.initializers[name])
        elif name in scope.producer and scope.producer[name].op_type == "Constant":
            value = constant_value(scope.producer[name])
        scope._values[name] = value
        return value

    def ints(self, name):
        """A constant int list, or None."""
        if not name:
            return None
        value = self.constant(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _axes(scope, node):
    """The axes attribute or input (opset 13/18 forms) of a Squeeze/Unsqueeze/Reduce node, or None."""
    axes = attr(node, "axes")
    if axes is not None:
        return list(axes)
    return scope.ints(node.input[1]) if len(node.input) > 1 else None


def _chain_rank(scope, node, rank):
    """Rank of the output of an ``ID_CHAIN`` node whose input has ``rank`` (None: unknown)."""
    op = node.op_type
    if op in ("Identity", "Cast"):
        return rank
    if op == "Flatten":
        return 2
    if op == "Reshape":
        shape = scope.ints(node.input[1])
        return None if shape is None else len(shape)
    axes = _axes(scope, node)
    if rank is None or axes is None:
        return None
    return rank - len(axes) if op == "Squeeze" else rank + len(axes)


def _ids_tensors(scope, name, rank):
    """{tensor: rank} of ``name`` and every tensor the ``ID_CHAIN`` ops make of it alone."""
    found, todo = {}, [(name, rank)]
    while todo:
        tensor, r = todo.pop()
        if tensor in found:
            continue
        found[tensor] = r
        for node, position in scope.consumers.get(tensor, ()):
            if node.op_type in ID_CHAIN and position == 0:
                todo.append((node.output[0], _chain_rank(scope, node, r)))
    return found


def _derives_from_length(scope, name, of, depth=8):
    """True when ``name`` is the length of a tensor in ``of`` (Shape/Size, then Gather/Unsqueeze/...)."""
    for _ in range(depth):
        scope_of, name = scope.source(name)
        node = scope_of.producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Shape", "Size"):
            return node.input[0] in of
        if node.op_type not in ("Gather", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Slice", "Concat"):
            return False
        name = node.input[0]
    return False


@dataclasses.dataclass
class Lookup:
    """An embedding lookup found in the graph: one field's table and its pooled tensor."""
    field: FieldSpec
    table: str            # the table's tensor name in the model
    pooled: str           # the tensor holding the pooled bags: [B, D], or [B, 1, D] when keepdim
    keepdim: bool
    pooling: str          # sum | mean, as the graph computes it (max_len 1: either)
    where: str            # the node that reads the table, for messages
    input_rank: int = 2   # padded ids: rank of the field's ids as the model takes them ([B] or [B, L])
    last_offset: bool = False   # EmbeddingBag: offsets hold B+1 entries (include_last_offset)
    stack_axis: int | None = None   # a stacked input: the axis its fields are stacked on
    block: int = 0        # > 0: one Gather looks up all ``block`` fields of a stacked input at once; ``pooled``
                          # is then [B, block, D] and this field is slot ``field.index`` of it
    vectors: np.ndarray = dataclasses.field(default=None, repr=False)   # the table, float32 [V, D]


def _table(scope, gather, field):
    """(name, array) of the table ``gather`` reads, checked to be a float32 [V, D] read by rows."""
    _, source = scope.source(gather.input[0])
    table = scope.constant(gather.input[0])
    if table is None:
        refuse(f"{node_text(gather)} gathers field {field.name!r}'s ids from {gather.input[0]!r}, which is not "
               f"a table stored in the model (an initializer or a Constant): jizhi moves stored tables into the cube")
    if table.ndim != 2:
        refuse(f"{node_text(gather)} reads field {field.name!r}'s ids from {source!r} of shape "
               f"{list(table.shape)}: an embedding table is [V, D]")
    axis = attr(gather, "axis", 0)
    if axis not in (0, -2):
        refuse(f"{node_text(gather)} gathers table {source!r} on axis {axis}: an embedding lookup gathers "
               f"rows (axis 0), so field {field.name!r} cannot be moved to the cube")
    if table.dtype != np.float32:
        refuse(f"table {source!r} of field {field.name!r} is {table.dtype}: the cube holds float32 vectors")
    return source, table


def _pooling_node(scope, rows, field, bag_axis, what):
    """The ReduceSum/ReduceMean that pools ``rows`` over ``bag_axis``; (node, pooling, keepdims)."""
    readers = scope.consumers.get(rows, [])
    if len(readers) != 1:
        names = ", ".join(node_text(n) for n, _ in readers) or "nothing"
        refuse(f"field {field.name!r}: its unpooled embeddings {what} ({rows!r}) are read by {names}; "
               f"jizhi serves a bag only through one ReduceSum or ReduceMean over the bag axis")
    node = readers[0][0]
    if node.op_type not in _POOLING:
        if node.op_type.startswith("Reduce"):
            refuse(f"{node_text(node)} pools field {field.name!r}'s bag: jizhi pools bags by sum or mean only "
                   f"(ReduceSum, ReduceMean)")
        refuse(f"{node_text(node)} reads field {field.name!r}'s unpooled embeddings {what}: jizhi serves "
               f"pooled bags only (a ReduceSum or ReduceMean over the bag axis right after the lookup)")
    rank = bag_axis + 2
    axes = _axes(scope, node)
    if axes is None:
        refuse(f"{node_text(node)} reduces field {field.name!r}'s embeddings {what} over all axes or "
               f"computed axes: a bag pools over axis {bag_axis}")
    if sorted(a % rank for a in axes) != [bag_axis]:
        refuse(f"{node_text(node)} reduces axes {axes} of field {field.name!r}'s embeddings {what}: "
               f"a bag pools over axis {bag_axis}")
    return node, _POOLING[node.op_type], bool(attr(node, "keepdims", 1))


def _padded_lookup(scope, field, root, dims, what):
    """The lookup of a field whose ids come padded: Gather (+ ReduceSum/ReduceMean).

    ``root``: the tensor of the field's ids (the graph input, or its slot of a
    stacked input), of static ``dims``; ``what`` names it in messages.
    """
    tensors = _ids_tensors(scope, root, len(dims) if dims is not None else None)
    gathers = [(node, tensors[t]) for t in tensors for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1]
    if not gathers:
        refuse(f"field {field.name!r}: {what} is not read by an embedding lookup (a Gather of "
               f"a table's rows, possibly after Cast/Reshape/Squeeze/Unsqueeze/Flatten)")
    if len(gathers) > 1:
        refuse(f"field {field.name!r}: {what} feeds {len(gathers)} lookups "
               f"({', '.join(node_text(n) for n, _ in gathers)}): jizhi maps one table per field")
    gather, rank = gathers[0]
    table_name, table = _table(scope, gather, field)
    if dims is not None and len(dims) == 2 and isinstance(dims[1], int) and dims[1] != field.max_len:
        stacked = "" if field.stacked else (
            f" (if it stacks {dims[1]} one-hot fields, give each its slot: index = k)")
        refuse(f"field {field.name!r}: {what} holds {dims[1]} ids per example, "
               f"FIELDS.toml says max_len = {field.max_len}{stacked}")
    lookup = Lookup(field, table_name, gather.output[0], False, "mean", node_text(gather),
                    input_rank=len(dims) if dims is not None else 2, vectors=table)
    if rank is None:
        refuse(f"{node_text(gather)}: cannot tell the rank of field {field.name!r}'s ids {gather.input[1]!r}")
    if rank == 1:
        if field.max_len != 1:
            refuse(f"{node_text(gather)} looks up one id per example for field {field.name!r}, "
                   f"which has max_len = {field.max_len}")
        return lookup
    if rank != 2:
        refuse(f"{node_text(gather)} looks up field {field.name!r}'s ids of rank {rank}: "
               f"expected [B] or [B, max_len]")
    if field.max_len == 1:
        # [B, 1, D]: a bag of at most one row pools to itself, whatever reduces it next.
        lookup.keepdim = True
        return lookup
    node, pooling, keepdim = _pooling_node(scope, gather.output[0], field, 1, "[B, L, D]")
    if pooling == "mean" and field.padding_idx is not None:
        refuse(f"{node_text(node)} averages field {field.name!r}'s padded bags: the padding rows count in "
               f"that mean, jizhi's mean counts only the bag's values. Pool by sum, use an EmbeddingBag "
                f"(indices + offsets), or drop padding_idx if every bag is always full")
    lookup.pooled, lookup.pooling, lookup.keepdim = node.output[0], pooling, keepdim
    return lookup


def _bag_bound(body, name, iteration, loop, field):
    """The outer tensor X when ``name`` is ``X[i]`` of the loop's iteration i (Gather, then Unsqueeze...)."""
    for _ in range(6):
        node = body.producer.get(name)
        if node is None:
            break
        if node.op_type == "Gather":
            index = node.input[1]
            while index in body.producer and body.producer[index].op_type in ID_CHAIN:
                index = body.producer[index].input[0]
            if index == iteration and attr(node, "axis", 0) == 0 and not body.defines(node.input[0]):
                return node.input[0]
            break
        if node.op_type not in ID_CHAIN:
            break
        name = node.input[0]
    refuse(f"{node_text(loop)} (field {field.name!r}): the bag bound {name!r} is not offsets[i] of the "
           f"loop's iteration i (a Gather of an outer tensor by the iteration number)")


def _slice_from(scope, name, start):
    """The data X when ``name`` is ``X[start:]`` (a Slice on axis 0 to the end), else None."""
    node = scope.producer.get(name)
    if node is None or node.op_type != "Slice" or len(node.input) < 3:
        return None
    starts, ends = scope.ints(node.input[1]), scope.ints(node.input[2])
    axes = scope.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
    steps = scope.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if starts != [start] or ends is None or len(ends) != 1 or ends[0] < _SLICE_END or axes != [0] or steps != [1]:
        return None
    return node.input[0]


def _bag_lookup(scope, field, indices_root, offsets_root, index_dims, offset_dims):
    """The lookup of an EmbeddingBag field (indices + offsets): the Loop torch.onnx.export writes.

    ``indices_root`` / ``offsets_root``: the field's flat ids and bag starts
    (graph inputs, or a row of stacked inputs), of static dims ``index_dims``
    / ``offset_dims``.

    TorchScript's form (``dynamo=False``), outside the loop: ``O =
    Concat(offsets, len(indices))`` (or ``offsets`` itself with
    include_last_offset), ``starts = O[0:]``, ``ends = O[1:]``; in the body,
    for iteration i: ``Slice(indices, starts[i], ends[i])``, ``Gather(table,
    that)`` (or ``Slice`` of ``Gather(table, indices)`` computed before the
    loop), ``ReduceSum``/``ReduceMean`` over axis 0 into a scan output. The
    dynamo exporter's form: ``_sequence_bag_lookup``.
    """
    if index_dims is not None and len(index_dims) != 1 or offset_dims is not None and len(offset_dims) != 1:
        refuse(f"field {field.name!r}: EmbeddingBag indices and offsets are 1-D; {field.indices!r} is "
               f"{_shape_text(index_dims)}, {field.offsets!r} is {_shape_text(offset_dims)}"
               + ("" if field.stacked else " (if they stack one row per table, give each field index = k)"))
    indices = _ids_tensors(scope, indices_root, 1)
    offsets = _ids_tensors(scope, offsets_root, 1)
    outside = {node.output[0]: node for t in indices for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1}
    found = []
    for loop in scope.graph.node:
        if loop.op_type != "Loop":
            continue
        for node in attr(loop, "body").node:
            if node.op_type == "Slice" and (node.input[0] in indices or node.input[0] in outside):
                found.append((loop, node))
    if not found and outside:
        return _sequence_bag_lookup(scope, field, indices, offsets, outside)
    if not found:
        readers = ", ".join(node_text(n) for t in indices for n, _ in scope.consumers.get(t, ())
                            if n.op_type not in ID_CHAIN) or "nothing"
        refuse(f"field {field.name!r}: indices {field.indices!r} are not sliced by an EmbeddingBag loop (a Loop "
               f"whose body takes indices[offsets[i]:offsets[i+1]], gathers those rows of a table and sums or "
               f"averages them), nor gathered from a table before one; they are read by {readers}")
    if len(found) > 1:
        refuse(f"field {field.name!r}: indices {field.indices!r} are sliced by "
               f"{', '.join(f'{node_text(cut)} in {node_text(loop)}' for loop, cut in found)}: "
                f"jizhi maps one table per field")
    loop, cut = found[0]
    body_graph = attr(loop, "body")
    body = Scope(body_graph, outer=scope)
    if len(loop.input) != 2 or len(body_graph.input) != 2:
        refuse(f"{node_text(loop)} (field {field.name!r}) carries loop state: an EmbeddingBag loop has only "
               f"a trip count and a condition")
    iteration = body_graph.input[0].name
    starts = _bag_bound(body, cut.input[1], iteration, loop, field)
    ends = _bag_bound(body, cut.input[2], iteration, loop, field)
    axes = body.ints(cut.input[3]) if len(cut.input) > 3 and cut.input[3] else [0]
    steps = body.ints(cut.input[4]) if len(cut.input) > 4 and cut.input[4] else [1]
    if axes != [0] or steps != [1]:
        refuse(f"{node_text(cut)} in {node_text(loop)} slices field {field.name!r}'s bag on axes {axes} "
               f"with steps {steps}: a bag is indices[offsets[i]:offsets[i+1]]")
    if cut.input[0] in indices:
        readers = body.consumers.get(cut.output[0], [])
        gathers = [n for n, position in readers if n.op_type == "Gather" and position == 1]
        if len(readers) != 1 or len(gathers) != 1:
            names = ", ".join(node_text(n) for n, _ in readers) or "nothing"
            refuse(f"{node_text(loop)}: field {field.name!r}'s bag of ids is read by {names}, not by one "
                   f"Gather of a table")
        gather = gathers[0]
        table_name, table = _table(body, gather, field)
        rows = gather.output[0]
        where = f"{node_text(gather)} in {node_text(loop)}"
    else:
        gather = outside[cut.input[0]]
        table_name, table = _table(scope, gather, field)
        rows = cut.output[0]
        where = f"{node_text(gather)}, sliced per bag in {node_text(loop)}"
    node, pooling, keepdim = _pooling_node(body, rows, field, 0, f"[len(bag), D] in {node_text(loop)}")
    body_outputs = [v.name for v in body_graph.output]
    if node.output[0] not in body_outputs[1:]:
        refuse(f"{node_text(node)} in {node_text(loop)}: field {field.name!r}'s pooled bag is not a scan "
               f"output of the loop")
    pooled = loop.output[body_outputs.index(node.output[0]) - 1]

    start_of = _slice_from(scope, starts, 0) or starts
    end_of = _slice_from(scope, ends, 1)
    if end_of is None or start_of != end_of:
        refuse(f"{node_text(loop)} (field {field.name!r}): its bags do not run from offsets[i] to "
               f"offsets[i+1] (expected starts = O[0:] and ends = O[1:] of one offsets tensor O)")
    if start_of in offsets:
        last_offset = True
    else:
        concat = scope.producer.get(start_of)
        if (concat is None or concat.op_type != "Concat" or attr(concat, "axis") != 0 or len(concat.input) != 2
                or concat.input[0] not in offsets or not _derives_from_length(scope, concat.input[1], indices)):
            refuse(f"{node_text(loop)} (field {field.name!r}): its bag bounds come from {start_of!r}, which "
                   f"is neither offsets {field.offsets!r} nor Concat(offsets, len(indices))")
        last_offset = False
    if not (_derives_from_length(scope, loop.input[0], {ends})
            or not last_offset and _derives_from_length(scope, loop.input[0], offsets)):
        refuse(f"{node_text(loop)} (field {field.name!r}): its trip count {loop.input[0]!r} is not the "
               f"number of bags")
    return Lookup(field, table_name, pooled, keepdim, pooling, where, last_offset=last_offset, vectors=table)


def _subgraph_nodes(node):
    """Every node of ``node``'s subgraphs, at any depth."""
    return [inner for graph in subgraphs(node) for inner in walk(graph)]


def _ones(scope, name, depth=6):
    """True when ``name`` is all ones: a constant of ones, or Expand/ConstantOfShape of one (through
    Unsqueeze/Reshape/Cast/Identity)."""
    for _ in range(depth):
        value = scope.constant(name)
        if value is not None:
            return bool(np.all(np.asarray(value) == 1))
        scope_of, name = scope.source(name)
        node = scope_of.producer.get(name)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            v = attr(node, "value")
            return v is not None and bool(np.all(numpy_helper.to_array(v) == 1))
        if node.op_type not in ("Expand", "Unsqueeze", "Reshape", "Cast", "Squeeze", "CastLike"):
            return False
        name = node.input[0]
    return False


def _sequence_bag_lookup(scope, field, indices, offsets, outside):
    """The EmbeddingBag form of torch's dynamo exporter.

    Before the loop: ``rows = Gather(table, indices)``, multiplied by
    per-sample weights of ones (``Mul(rows, Unsqueeze(Expand(1, ...)))``:
    folded away; any other weights are refused), ``O = Concat(offsets,
    len(indices))``; a ``Loop`` whose body (an ``If`` for empty bags)
    slices ``rows[O[i]:O[i+1]]`` and reduces it (``ReduceSum``; mean:
    ``ReduceMean`` or a sum divided by the count), appending each bag to a
    sequence (``SequenceInsert``) that ``ConcatFromSequence(axis=0)`` turns
    into the pooled [B, D]. The import's check proves the rest numerically.
    """
    if len(outside) > 1:
        refuse(f"field {field.name!r}: indices {field.indices!r} feed {len(outside)} lookups "
               f"({', '.join(node_text(n) for n in outside.values())}): jizhi maps one table per field")
    gather = next(iter(outside.values()))
    table_name, table = _table(scope, gather, field)
    rows, todo = {gather.output[0]}, [gather.output[0]]
    while todo:
        name = todo.pop()
        for node, position in scope.consumers.get(name, ()):
            if node.op_type == "Identity":
                rows.add(node.output[0])
                todo.append(node.output[0])
            elif node.op_type == "Mul":
                weights = node.input[1 - position]
                if not _ones(scope, weights):
                    refuse(f"{node_text(node)} multiplies field {field.name!r}'s embeddings by per-sample weights "
                           f"{weights!r}: jizhi pools plain bags (sum or mean); weights of ones are folded away, "
                           f"others cannot be served")
                rows.add(node.output[0])
                todo.append(node.output[0])
    loops = [n for n in scope.graph.node if n.op_type == "Loop"
             and any(i in rows for inner in _subgraph_nodes(n) for i in inner.input)]
    if len(loops) != 1:
        names = ", ".join(node_text(n) for n in loops) or "no Loop"
        refuse(f"{node_text(gather)} gathers field {field.name!r}'s rows before the loop, and {names} reads them: "
               f"an EmbeddingBag is one Loop over its bags (export with dynamo=False if this one is not)")
    loop = loops[0]
    inner = _subgraph_nodes(loop)
    ops = {n.op_type for n in inner}
    for op in ("ReduceMax", "ReduceMin", "ReduceProd"):
        if op in ops:
            refuse(f"{node_text(loop)} pools field {field.name!r}'s bag with {op}: jizhi pools bags by sum or "
                   f"mean only")
    if "ReduceMean" in ops or "Div" in ops:
        pooling = "mean"
    elif "ReduceSum" in ops:
        pooling = "sum"
    else:
        refuse(f"{node_text(loop)} (field {field.name!r}): no ReduceSum or ReduceMean over the bag in its body; "
               f"expected the EmbeddingBag loop torch.onnx.export writes")
    read = {i for n in inner for i in n.input}
    concat = [scope.producer[name] for name in read if name in scope.producer
              and scope.producer[name].op_type == "Concat" and len(scope.producer[name].input) == 2
              and scope.producer[name].input[0] in offsets]
    if concat and _derives_from_length(scope, concat[0].input[1], indices):
        last_offset = False
    elif read & set(offsets):
        last_offset = True
    else:
        refuse(f"{node_text(loop)} (field {field.name!r}): its bag bounds are neither offsets {field.offsets!r} "
               f"nor Concat(offsets, len(indices))")
    outputs = [o for o in loop.output if o]
    pooled = None
    for name in outputs:
        for node, _ in scope.consumers.get(name, ()):
            if node.op_type == "ConcatFromSequence" and attr(node, "axis", 0) == 0 and not attr(node, "new_axis", 0):
                pooled = node.output[0]
    if pooled is None:
        refuse(f"{node_text(loop)} (field {field.name!r}): its bags are not gathered by a ConcatFromSequence on "
               f"axis 0 into the pooled [B, D]")
    while True:
        readers = scope.consumers.get(pooled, [])
        if len(readers) == 1 and readers[0][0].op_type in ("Cast", "Identity") \
                and attr(readers[0][0], "to", TensorProto.FLOAT) == TensorProto.FLOAT:
            pooled = readers[0][0].output[0]
            continue
        break
    where = f"{node_text(gather)}, pooled per bag in {node_text(loop)}"
    return Lookup(field, table_name, pooled, False, pooling, where, last_offset=last_offset, vectors=table)


def _shape_text(dims):
    if dims is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _type_text(value_info):
    elem = value_info.type.tensor_type.elem_type
    return f"{TensorProto.DataType.Name(elem).lower()} {_shape_text(static_dims(value_info))}"


# --- stacked inputs ------------------------------------------------------------------

def _stack_axes(spec, inputs):
    """{graph input: its stacking axis} for the inputs whose fields name a slot (index).

    The axis is the fields' ``axis``, or the first of axes 0 and 1 with a
    fixed size (``[F, B]``: 0, ``[B, F]`` and ``[B, F, L]``: 1); the other
    one of the two is the batch axis and must be dynamic; every slot of the
    axis must be a field.
    """
    stacks = {}
    for name, v in inputs.items():
        group = [f for f in spec.fields if name in f.inputs and f.stacked]
        if not group:
            continue
        dims = static_dims(v)
        given = {f.axis for f in group if f.axis is not None}
        if len(given) > 1:
            refuse(f"{spec.path}: the fields of input {name!r} give different axes {sorted(given)}")
        if dims is None or len(dims) < 2:
            refuse(f"graph input {name!r} is {_type_text(v)}: a stacked input has a batch axis and a field axis")
        if given:
            axis = given.pop()
            if axis > 1:
                refuse(f"{spec.path}: input {name!r}: axis = {axis}; fields are stacked on axis 0 ([F, B]) or "
                       f"axis 1 ([B, F] or [B, F, L])")
        else:
            fixed = [a for a in (0, 1) if isinstance(dims[a], int)]
            if not fixed:
                refuse(f"graph input {name!r} is {_type_text(v)}: neither axis 0 nor axis 1 has a fixed size, so "
                       f"the axis its fields are stacked on is unknown: give axis = 0 or 1 with each field's index")
            axis = fixed[0]
        batch = 1 - axis
        if dims[batch] is not None:
            refuse(f"graph input {name!r} is {_type_text(v)}: its fields are stacked on axis {axis}, so axis "
                   f"{batch} is the batch axis, which is fixed; export the model with a dynamic batch axis "
                   f"(dynamic_axes / dynamic_shapes)")
        size = dims[axis]
        slots = sorted(f.index for f in group)
        if size is None and slots != list(range(len(slots))):
            refuse(f"graph input {name!r} ({_type_text(v)}) stacks fields on axis {axis}: slots "
                   f"{sorted(set(range(slots[-1] + 1)) - set(slots))} are not described in {spec.path}")
        if size is not None and slots != list(range(size)):
            missing = sorted(set(range(size)) - set(slots))
            extra = [k for k in slots if k >= size]
            refuse(f"graph input {name!r} ({_type_text(v)}) stacks {size} fields on axis {axis}: "
                   + (f"slot(s) {missing} are not described in {spec.path}" if missing else
                      f"index {extra[0]} is past its last slot"))
        stacks[name] = axis
    return stacks


def _slot(scope, name, index, axis):
    """The tensor of slot ``index`` of the stacked input ``name`` on ``axis``: the output of
    ``Gather(name, index, axis)`` (a constant scalar index), or of ``Squeeze(Slice(name, index,
    index + 1, axis), axis)``; None when the model reads no such slot."""
    for node, position in scope.consumers.get(name, ()):
        if position != 0:
            continue
        if node.op_type == "Gather" and attr(node, "axis", 0) == axis:
            k = scope.constant(node.input[1])
            if k is not None and np.asarray(k).ndim == 0 and int(k) == index:
                return node.output[0]
        if node.op_type == "Slice" and len(node.input) >= 4:
            starts, ends, axes = (scope.ints(node.input[i]) for i in (1, 2, 3))
            if starts == [index] and ends == [index + 1] and axes == [axis]:
                for squeeze, _ in scope.consumers.get(node.output[0], ()):
                    if squeeze.op_type == "Squeeze" and _axes(scope, squeeze) == [axis]:
                        return squeeze.output[0]
    return None


def _field_ids(scope, field, name, inputs, stacks):
    """(tensor, static dims, how a message names it) of the field's ids in input ``name``."""
    dims = static_dims(inputs[name])
    if name not in stacks:
        return name, dims, f"input {name!r}"
    axis = stacks[name]
    root = _slot(scope, name, field.index, axis)
    if root is None:
        readers = ", ".join(node_text(n) for n, _ in scope.consumers.get(name, ())) or "nothing"
        refuse(f"field {field.name!r}: slot {field.index} (axis {axis}) of input {name!r} is not taken out by a "
               f"Gather({name}, {field.index}, axis={axis}) or a Slice + Squeeze; {name!r} is read by {readers}")
    return root, [d for a, d in enumerate(dims) if a != axis], f"slot {field.index} of input {name!r}"


def _block_lookups(scope, group, name, dims, axis):
    """The lookups of a stacked input whose fields are looked up at once: ``Gather(table, ids
    [B, F])`` -> [B, F, D] (one-hot fields), or ``Gather(table, ids [B, F, L])`` -> [B, F, L, D]
    pooled over axis 2 by one ReduceSum/ReduceMean (keepdims 0) -> [B, F, D]."""
    first = group[0]
    rank = len(dims)
    if axis != 1 or rank not in (2, 3):
        refuse(f"field {first.name!r}: input {name!r} ({_shape_text(dims)}) is read whole by a lookup; jizhi "
               f"reads a whole stacked input as [B, F] (one id per field) or [B, F, L] (bags of L)")
    lens = {f.max_len for f in group}
    want = 1 if rank == 2 else dims[2]
    if len(lens) != 1 or (want is not None and lens != {want}):
        refuse(f"fields {', '.join(repr(f.name) for f in group)} of input {name!r} ({_shape_text(dims)}): "
               f"every field of a stacked input read whole has max_len = {want} (FIELDS.toml says "
               f"{', '.join(str(f.max_len) for f in group)})")
    tensors = _ids_tensors(scope, name, rank)
    gathers = [node for t in tensors for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1]
    if len(gathers) != 1:
        refuse(f"fields {', '.join(repr(f.name) for f in group)}: input {name!r} is read by "
               f"{len(gathers)} lookups ({', '.join(node_text(n) for n in gathers) or 'none'}) and no slot is "
               f"taken out of it: jizhi reads a stacked input by one lookup, or slot by slot")
    gather = gathers[0]
    table_name, table = _table(scope, gather, first)
    pooled, pooling = gather.output[0], "mean"
    if rank == 3:
        node, pooling, keepdim = _pooling_node(scope, gather.output[0], first, 2, "[B, F, L, D]")
        if keepdim:
            refuse(f"{node_text(node)} pools the bags of input {name!r} keeping the bag axis ([B, F, 1, D]): "
                   f"export with keepdim=False (x.sum(dim=2))")
        if pooling == "mean" and any(f.padding_idx is not None for f in group):
            refuse(f"{node_text(node)} averages the padded bags of input {name!r}: the padding rows count in "
                   f"that mean, jizhi's mean counts only the bag's values. Pool by sum, or use an EmbeddingBag")
        pooled = node.output[0]
    return [Lookup(f, table_name, pooled, False, pooling, node_text(gather), input_rank=rank - 1,
                   stack_axis=axis, block=len(group), vectors=table) for f in group]


@dataclasses.dataclass
class Analysis:
    """What ``analyse`` found: the lookups in FIELDS.toml order and what the bundle needs of them."""
    lookups: list
    tables: dict          # table name -> float32 [V, D]
    dim: int
    dense_input: str | None
    dense_features: int   # 0: the model has no dense input
    output: str           # the graph output that is the score
    dtypes: dict          # graph input -> numpy dtype
    opset: int


def analyse(model, spec):
    """Find every field's embedding lookup in ``model`` (a loaded ModelProto); an ``Analysis``.

    Checks the graph inputs against FIELDS.toml both ways, the dense input,
    the output, every lookup's shape (docs/formats.md, "Importing a model")
    and that all tables share one dim. Raises BundleError naming the node,
    the input or the tables.
    """
    graph = model.graph
    opset = opset_version(model, 0)
    if opset < MIN_OPSET:
        refuse(f"the model imports opset {opset}; jizhictl import reads opset {MIN_OPSET} or newer "
               f"(export with opset_version >= {MIN_OPSET})")
    scope = Scope(graph)
    inputs = {v.name: v for v in graph.input if v.name not in scope.initializers}
    claimed = {spec.dense_input: "[dense]"} if spec.dense_input else {}
    for f in spec.fields:
        for name in f.inputs:
            claimed[name] = f"field {f.name!r}"
    for name, who in claimed.items():
        if name not in inputs:
            refuse(f"{spec.path}: {who} names input {name!r}, which the model does not have "
                   f"(its inputs: {', '.join(inputs)})")
    stacks = _stack_axes(spec, inputs)
    for name, v in inputs.items():
        if name not in claimed:
            dims = static_dims(v)
            weights = ("; a float [N] input beside EmbeddingBag indices is usually per_sample_weights, which "
                       "jizhi cannot serve (it pools plain bags): export the model without them"
                       if v.type.tensor_type.elem_type == TensorProto.FLOAT and dims is not None and len(dims) == 1
                       else "")
            refuse(f"graph input {name!r} ({_type_text(v)}) is not described in {spec.path}: name it as a "
                   f"field's input, indices or offsets, or as [dense] input{weights}")
        dims = static_dims(v)
        if name in stacks:
            continue
        if dims and dims[0] is not None:
            if len(dims) > 1 and dims[1] is None:
                refuse(f"graph input {name!r} is {_type_text(v)}: its first axis is fixed and its batch axis is "
                       f"axis 1; if it stacks {dims[0]} fields (one row per table, as dlrm_s_pytorch.py exports "
                       f"offsets and indices), give each field its row in {spec.path}: index = k (axis = 0)")
            refuse(f"graph input {name!r} has a fixed first dimension ({_type_text(v)}): jizhi scores "
                   f"batches of any size; export the model with a dynamic batch axis (dynamic_axes)")
    for f in spec.fields:
        for name in f.inputs:
            elem = inputs[name].type.tensor_type.elem_type
            if elem not in (TensorProto.INT64, TensorProto.INT32):
                refuse(f"field {f.name!r}: input {name!r} is {_type_text(inputs[name])}; ids are int64 or int32")

    dense_features = 0
    if spec.dense_input is not None:
        v = inputs[spec.dense_input]
        dims = static_dims(v)
        if v.type.tensor_type.elem_type != TensorProto.FLOAT or dims is None or len(dims) != 2:
            refuse(f"[dense] input {spec.dense_input!r} is {_type_text(v)}; the dense input is float32 [B, N]")
        if dims[1] is None and spec.dense_features is None:
            refuse(f"[dense] input {spec.dense_input!r} has no fixed width ({_type_text(v)}): give "
                   f"[dense] features = N in {spec.path}")
        if dims[1] is not None and spec.dense_features is not None and dims[1] != spec.dense_features:
            refuse(f"[dense] features = {spec.dense_features}, but input {spec.dense_input!r} is {_type_text(v)}")
        dense_features = dims[1] if dims[1] is not None else spec.dense_features

    outputs = {v.name: v for v in graph.output}
    output = spec.output
    if output is None:
        if len(outputs) != 1:
            refuse(f"the model has {len(outputs)} outputs ({', '.join(outputs)}): say which is the score "
                   f"with output = \"...\" in {spec.path}")
        output = next(iter(outputs))
    elif output not in outputs:
        refuse(f"{spec.path}: output {output!r} is not an output of the model (its outputs: {', '.join(outputs)})")
    out = outputs[output]
    dims = static_dims(out)
    if out.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        refuse(f"output {output!r} is {_type_text(out)}: a score is a float per example")
    if dims is not None and not (len(dims) == 1 or len(dims) == 2 and dims[1] == 1):
        refuse(f"output {output!r} is {_type_text(out)}: a score is one float per example ([B] or [B, 1])")

    lookups = {}
    for name, axis in stacks.items():
        group = sorted((f for f in spec.fields if f.input == name), key=lambda f: f.index)
        if group and not any(_slot(scope, name, f.index, axis) for f in group):
            for lk in _block_lookups(scope, group, name, static_dims(inputs[name]), axis):
                lookups[lk.field.name] = lk
    for f in spec.fields:
        if f.name in lookups:
            continue
        if f.input is not None:
            root, dims, what = _field_ids(scope, f, f.input, inputs, stacks)
            lk = _padded_lookup(scope, f, root, dims, what)
        else:
            index_root, index_dims, _ = _field_ids(scope, f, f.indices, inputs, stacks)
            offset_root, offset_dims, _ = _field_ids(scope, f, f.offsets, inputs, stacks)
            lk = _bag_lookup(scope, f, index_root, offset_root, index_dims, offset_dims)
        lk.stack_axis = stacks.get(f.inputs[0])
        lookups[f.name] = lk
    lookups = [lookups[f.name] for f in spec.fields]

    tables = {}
    for lk in lookups:
        tables.setdefault(lk.table, lk.vectors)
    table_dims = {t.shape[1] for t in tables.values()}
    if len(table_dims) > 1:
        refuse("the embedding tables have different dims: "
               + ", ".join(f"{name} [{t.shape[0]}, {t.shape[1]}] (field "
                           f"{', '.join(repr(lk.field.name) for lk in lookups if lk.table == name)})"
                            for name, t in tables.items())
                + "; a jizhi bundle has one dim")
    for lk in lookups:
        p = lk.field.padding_idx
        table = tables[lk.table]
        if p is not None:
            if p >= table.shape[0] or table.shape[0] < 2:
                refuse(f"field {lk.field.name!r}: padding_idx {p} is not a row of table {lk.table!r} "
                       f"[{table.shape[0]}, {table.shape[1]}] with other rows beside it")
            if np.any(table[p] != 0):
                refuse(f"field {lk.field.name!r}: row {p} (padding_idx) of table {lk.table!r} is not zeros, so "
                       f"the model adds it for every padding slot; jizhi's bags have no padding")
    dtypes = {name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for name, v in inputs.items()}
    return Analysis(lookups, tables, int(table_dims.pop()), spec.dense_input, dense_features, output,
                    dtypes, opset)
