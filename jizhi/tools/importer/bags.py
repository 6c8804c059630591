"""``nn.EmbeddingBag`` as torch.onnx.export writes it, for ``jizhictl import``: the Loop over bags of
the TorchScript exporter (``bag_lookup``) and the sequence loop of the dynamo exporter
(``_sequence_bag_lookup``), each found from a field's indices and offsets and turned into a ``Lookup``
(jizhi/tools/importer/scope.py). Runs in the importing process; reads the ModelProto, never changes it.
"""
import numpy as np
from onnx import TensorProto, numpy_helper

from jizhi.graph.proto import attr, subgraphs, walk
from jizhi.tools.importer.fields import refuse
from jizhi.tools.importer.scope import (ID_CHAIN, Lookup, Scope, derives_from_length, ids_tensors, node_text,
                                        pooling_node, shape_text, table_read)

# A Slice "to the end": torch writes sys.maxsize; anything past int32 counts.
_SLICE_END = 2 ** 31 - 1


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


def bag_lookup(scope, field, indices_root, offsets_root, index_dims, offset_dims):
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
               f"{shape_text(index_dims)}, {field.offsets!r} is {shape_text(offset_dims)}"
               + ("" if field.stacked else " (if they stack one row per table, give each field index = k)"))
    indices = ids_tensors(scope, indices_root, 1)
    offsets = ids_tensors(scope, offsets_root, 1)
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
        table_name, table = table_read(body, gather, field)
        rows = gather.output[0]
        where = f"{node_text(gather)} in {node_text(loop)}"
    else:
        gather = outside[cut.input[0]]
        table_name, table = table_read(scope, gather, field)
        rows = cut.output[0]
        where = f"{node_text(gather)}, sliced per bag in {node_text(loop)}"
    node, pooling, keepdim = pooling_node(body, rows, field, 0, f"[len(bag), D] in {node_text(loop)}")
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
                or concat.input[0] not in offsets or not derives_from_length(scope, concat.input[1], indices)):
            refuse(f"{node_text(loop)} (field {field.name!r}): its bag bounds come from {start_of!r}, which "
                   f"is neither offsets {field.offsets!r} nor Concat(offsets, len(indices))")
        last_offset = False
    if not (derives_from_length(scope, loop.input[0], {ends})
            or not last_offset and derives_from_length(scope, loop.input[0], offsets)):
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
    table_name, table = table_read(scope, gather, field)
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
    if concat and derives_from_length(scope, concat[0].input[1], indices):
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
