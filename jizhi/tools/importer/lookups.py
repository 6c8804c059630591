"""Finding a foreign model's embedding lookups for ``jizhictl import``: each
FIELDS.toml field's table (an initializer or a Constant read by a Gather) and
the tensor holding its pooled bags (ReduceSum/ReduceMean over a padded bag,
or the Loop ``torch.onnx.export`` writes for ``nn.EmbeddingBag``).

Runs in the importing process; reads the ModelProto, never changes it.
``analyse`` checks the graph inputs against FIELDS.toml both ways, the dense
input, the output and every lookup, and returns an ``Analysis``; a model it
cannot map is refused (``BundleError``) naming the node or the input. The
ONNX helpers are jizhi.graph.proto's, shared with the graph passes.
The pieces every lookup shares are jizhi/tools/importer/scope.py's; the
EmbeddingBag loops are bags.py's.
"""
import dataclasses

import numpy as np
from onnx import TensorProto, helper

from jizhi.graph.proto import attr, opset_version, static_dims
from jizhi.tools.importer.bags import bag_lookup
from jizhi.tools.importer.fields import refuse
from jizhi.tools.importer.scope import (Lookup, Scope, axes_of, ids_tensors, node_text, pooling_node, shape_text,
                                        table_read, type_text)

MIN_OPSET = 11           # Slice with inputs, Loop with scan outputs as torch writes them


def _padded_lookup(scope, field, root, dims, what):
    """The lookup of a field whose ids come padded: Gather (+ ReduceSum/ReduceMean).

    ``root``: the tensor of the field's ids (the graph input, or its slot of a
    stacked input), of static ``dims``; ``what`` names it in messages.
    """
    tensors = ids_tensors(scope, root, len(dims) if dims is not None else None)
    gathers = [(node, tensors[t]) for t in tensors for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1]
    if not gathers:
        refuse(f"field {field.name!r}: {what} is not read by an embedding lookup (a Gather of "
               f"a table's rows, possibly after Cast/Reshape/Squeeze/Unsqueeze/Flatten)")
    if len(gathers) > 1:
        refuse(f"field {field.name!r}: {what} feeds {len(gathers)} lookups "
               f"({', '.join(node_text(n) for n, _ in gathers)}): jizhi maps one table per field")
    gather, rank = gathers[0]
    table_name, table = table_read(scope, gather, field)
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
    node, pooling, keepdim = pooling_node(scope, gather.output[0], field, 1, "[B, L, D]")
    if pooling == "mean" and field.padding_idx is not None:
        refuse(f"{node_text(node)} averages field {field.name!r}'s padded bags: the padding rows count in "
               f"that mean, jizhi's mean counts only the bag's values. Pool by sum, use an EmbeddingBag "
                f"(indices + offsets), or drop padding_idx if every bag is always full")
    lookup.pooled, lookup.pooling, lookup.keepdim = node.output[0], pooling, keepdim
    return lookup


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
            refuse(f"graph input {name!r} is {type_text(v)}: a stacked input has a batch axis and a field axis")
        if given:
            axis = given.pop()
            if axis > 1:
                refuse(f"{spec.path}: input {name!r}: axis = {axis}; fields are stacked on axis 0 ([F, B]) or "
                       f"axis 1 ([B, F] or [B, F, L])")
        else:
            fixed = [a for a in (0, 1) if isinstance(dims[a], int)]
            if not fixed:
                refuse(f"graph input {name!r} is {type_text(v)}: neither axis 0 nor axis 1 has a fixed size, so "
                       f"the axis its fields are stacked on is unknown: give axis = 0 or 1 with each field's index")
            axis = fixed[0]
        batch = 1 - axis
        if dims[batch] is not None:
            refuse(f"graph input {name!r} is {type_text(v)}: its fields are stacked on axis {axis}, so axis "
                   f"{batch} is the batch axis, which is fixed; export the model with a dynamic batch axis "
                   f"(dynamic_axes / dynamic_shapes)")
        size = dims[axis]
        slots = sorted(f.index for f in group)
        if size is None and slots != list(range(len(slots))):
            refuse(f"graph input {name!r} ({type_text(v)}) stacks fields on axis {axis}: slots "
                   f"{sorted(set(range(slots[-1] + 1)) - set(slots))} are not described in {spec.path}")
        if size is not None and slots != list(range(size)):
            missing = sorted(set(range(size)) - set(slots))
            extra = [k for k in slots if k >= size]
            refuse(f"graph input {name!r} ({type_text(v)}) stacks {size} fields on axis {axis}: "
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
                    if squeeze.op_type == "Squeeze" and axes_of(scope, squeeze) == [axis]:
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
        refuse(f"field {first.name!r}: input {name!r} ({shape_text(dims)}) is read whole by a lookup; jizhi "
               f"reads a whole stacked input as [B, F] (one id per field) or [B, F, L] (bags of L)")
    lens = {f.max_len for f in group}
    want = 1 if rank == 2 else dims[2]
    if len(lens) != 1 or (want is not None and lens != {want}):
        refuse(f"fields {', '.join(repr(f.name) for f in group)} of input {name!r} ({shape_text(dims)}): "
               f"every field of a stacked input read whole has max_len = {want} (FIELDS.toml says "
               f"{', '.join(str(f.max_len) for f in group)})")
    tensors = ids_tensors(scope, name, rank)
    gathers = [node for t in tensors for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1]
    if len(gathers) != 1:
        refuse(f"fields {', '.join(repr(f.name) for f in group)}: input {name!r} is read by "
               f"{len(gathers)} lookups ({', '.join(node_text(n) for n in gathers) or 'none'}) and no slot is "
               f"taken out of it: jizhi reads a stacked input by one lookup, or slot by slot")
    gather = gathers[0]
    table_name, table = table_read(scope, gather, first)
    pooled, pooling = gather.output[0], "mean"
    if rank == 3:
        node, pooling, keepdim = pooling_node(scope, gather.output[0], first, 2, "[B, F, L, D]")
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
            refuse(f"graph input {name!r} ({type_text(v)}) is not described in {spec.path}: name it as a "
                   f"field's input, indices or offsets, or as [dense] input{weights}")
        dims = static_dims(v)
        if name in stacks:
            continue
        if dims and dims[0] is not None:
            if len(dims) > 1 and dims[1] is None:
                refuse(f"graph input {name!r} is {type_text(v)}: its first axis is fixed and its batch axis is "
                       f"axis 1; if it stacks {dims[0]} fields (one row per table, as dlrm_s_pytorch.py exports "
                       f"offsets and indices), give each field its row in {spec.path}: index = k (axis = 0)")
            refuse(f"graph input {name!r} has a fixed first dimension ({type_text(v)}): jizhi scores "
                   f"batches of any size; export the model with a dynamic batch axis (dynamic_axes)")
    for f in spec.fields:
        for name in f.inputs:
            elem = inputs[name].type.tensor_type.elem_type
            if elem not in (TensorProto.INT64, TensorProto.INT32):
                refuse(f"field {f.name!r}: input {name!r} is {type_text(inputs[name])}; ids are int64 or int32")

    dense_features = 0
    if spec.dense_input is not None:
        v = inputs[spec.dense_input]
        dims = static_dims(v)
        if v.type.tensor_type.elem_type != TensorProto.FLOAT or dims is None or len(dims) != 2:
            refuse(f"[dense] input {spec.dense_input!r} is {type_text(v)}; the dense input is float32 [B, N]")
        if dims[1] is None and spec.dense_features is None:
            refuse(f"[dense] input {spec.dense_input!r} has no fixed width ({type_text(v)}): give "
                   f"[dense] features = N in {spec.path}")
        if dims[1] is not None and spec.dense_features is not None and dims[1] != spec.dense_features:
            refuse(f"[dense] features = {spec.dense_features}, but input {spec.dense_input!r} is {type_text(v)}")
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
        refuse(f"output {output!r} is {type_text(out)}: a score is a float per example")
    if dims is not None and not (len(dims) == 1 or len(dims) == 2 and dims[1] == 1):
        refuse(f"output {output!r} is {type_text(out)}: a score is one float per example ([B] or [B, 1])")

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
            lk = bag_lookup(scope, f, index_root, offset_root, index_dims, offset_dims)
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
