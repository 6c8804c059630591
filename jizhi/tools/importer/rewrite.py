"""The bundle's graph for ``jizhictl import``: the foreign model with jizhi's
inputs (``dense``, ``user_emb``, ``item_emb``, ``user_index``) in place of its
ids inputs and embedding lookups, in the naive per-pair form.

Runs in the importing process, on a copy of the model (``rewrite`` returns a
new ModelProto). The structured-features pass (jizhi/graph/structured.py)
later finds the ``Gather(.., user_index)`` nodes it writes first.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jizhi.graph.proto import ITEM_INPUT, USER_INDEX, USER_INPUTS, live, static_dims, subgraphs, walk
from jizhi.tools.importer.fields import refuse
from jizhi.tools.importer.scope import ID_CHAIN, node_text

DENSE_PP = "dense_pp"
USER_EMB_PP = "user_emb_pp"
BUNDLE_INPUTS = (*USER_INPUTS, ITEM_INPUT, USER_INDEX)
SCORE = "score"


def _graphs(graph):
    """``graph`` and every graph nested in its nodes."""
    return [graph, *(sub for node in walk(graph) for sub in subgraphs(node))]


def _names(graph):
    """Every name in ``graph`` and its subgraphs: node inputs and outputs, graph inputs,
    outputs and value_infos, initializers."""
    out = set()
    for g in _graphs(graph):
        for node in g.node:
            out.update(node.input)
            out.update(node.output)
        for coll in (g.input, g.output, g.value_info):
            out.update(v.name for v in coll)
        out.update(t.name for t in g.initializer)
    return out


def _rename(graph, mapping):
    """Rename tensors everywhere in ``graph`` and its subgraphs."""
    for g in _graphs(graph):
        for node in g.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
        for coll in (g.input, g.output, g.value_info):
            for v in coll:
                v.name = mapping.get(v.name, v.name)
        for t in g.initializer:
            t.name = mapping.get(t.name, t.name)


def _substitute(graph, mapping):
    """Make every reader of a tensor in ``mapping`` (here and in subgraphs) read its replacement."""
    for node in walk(graph):
        node.input[:] = [mapping.get(n, n) for n in node.input]


def _prune(graph, wanted):
    """Drop the nodes and initializers ``wanted`` does not need; return the names still read."""
    keep, needed = live(graph.node, wanted)
    del graph.node[:]
    graph.node.extend(keep)
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
    return needed


def _readers(graph, names):
    """[(node, name)]: the nodes of ``graph`` and its subgraphs reading one of ``names``, in order."""
    return [(node, n) for node in walk(graph) for n in node.input if n in names]


def _leftover_reader(graph, names):
    """The first node still reading ``names`` (through the id chain ops), preferring a real consumer."""
    names = set(names)
    while True:
        readers = _readers(graph, names)
        grown = names | {node.output[0] for node, _ in readers if node.op_type in ID_CHAIN}
        if grown == names:
            break
        names = grown
    real = [node for node, _ in readers if node.op_type not in ID_CHAIN]
    return (real or [node for node, _ in readers] or [None])[0]


def rewrite(model, spec, analysis):
    """The bundle's graph: ``model`` with jizhi's inputs in place of ids and lookups (a new ModelProto).

    Inputs ``dense`` f32[U, N], ``user_emb`` f32[U, F_user, D], ``item_emb``
    f32[P, F_item, D], ``user_index`` int64[P]; output ``score`` f32[P]. The
    naive per-pair form: ``dense_pp`` and ``user_emb_pp`` (Gathers by
    user_index, named so jizhi/graph/structured.py finds them) are the first
    nodes; each pooled tensor is replaced by its column of ``user_emb_pp`` or
    ``item_emb``. Tables and dead nodes are removed. Raises BundleError when a
    node that survives still reads a table or an ids input.
    """
    lookups = analysis.lookups
    out_model = onnx.ModelProto()
    out_model.CopyFrom(model)
    graph = out_model.graph
    dim, width = analysis.dim, analysis.dense_features
    columns = {}
    for side in ("user", "item"):
        for j, lk in enumerate(x for x in lookups if x.field.side == side):
            columns[lk.field.name] = (side, j)
    col_name = {name: f"{side}_emb.{name}" for name, (side, _) in columns.items()}
    # Constants of the column nodes: the Gather index (scalar), or the Slice bounds (keepdim).
    const_name = {name: [col + suffix for suffix in (".index", ".start", ".end", ".axis")]
                  for name, col in col_name.items()}
    reserved = set(BUNDLE_INPUTS) | {DENSE_PP, USER_EMB_PP, SCORE, SCORE + ".shape"}
    reserved |= set(col_name.values()) | {c for names in const_name.values() for c in names}
    used = _names(graph)
    renamed = {}
    for name in sorted(reserved & used):
        fresh = name + ".orig"
        while fresh in used or fresh in reserved:
            fresh += "_"
        renamed[name] = fresh
    _rename(graph, renamed)

    def r(name):
        return renamed.get(name, name)

    n_user = sum(1 for lk in lookups if lk.field.side == "user")
    n_item = len(lookups) - n_user
    head, constants, subs = [], [], {}
    if width:
        head.append(helper.make_node("Gather", ["dense", "user_index"], [DENSE_PP], axis=0,
                                     name="jizhi.gather_dense_pp"))
        subs[r(spec.dense_input)] = DENSE_PP
    if n_user:
        head.append(helper.make_node("Gather", ["user_emb", "user_index"], [USER_EMB_PP], axis=0,
                                     name="jizhi.gather_user_emb_pp"))
    for lk in lookups:
        side, j = columns[lk.field.name]
        source = USER_EMB_PP if side == "user" else "item_emb"
        column = col_name[lk.field.name]
        index, start, end, axis = const_name[lk.field.name]
        if lk.block:
            # All fields of a stacked input looked up at once: [P, F, D], columns j0 .. j0 + F - 1.
            if lk.field.index != 0:
                continue
            group = [x for x in lookups if x.pooled == lk.pooled]
            cols = [columns[x.field.name] for x in sorted(group, key=lambda x: x.field.index)]
            if len({c[0] for c in cols}) != 1 or [c[1] for c in cols] != list(range(j, j + len(cols))):
                refuse(f"fields {', '.join(repr(x.field.name) for x in group)} are looked up together "
                       f"({lk.where}) as one [B, {len(group)}, D] block: give them one side and list them in "
                       f"FIELDS.toml one after another in slot order (index 0, 1, ...)")
            for name, value in ((start, j), (end, j + len(cols)), (axis, 1)):
                constants.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            head.append(helper.make_node("Slice", [source, start, end, axis], [column],
                                         name=f"jizhi.columns.{lk.field.name}"))
        elif lk.keepdim:
            # [P, 1, D], as the model's [B, 1, D].
            for name, value in ((start, j), (end, j + 1), (axis, 1)):
                constants.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            head.append(helper.make_node("Slice", [source, start, end, axis], [column],
                                         name=f"jizhi.column.{lk.field.name}"))
        else:
            constants.append(numpy_helper.from_array(np.array(j, dtype=np.int64), index))
            head.append(helper.make_node("Gather", [source, index], [column], axis=1,
                                         name=f"jizhi.column.{lk.field.name}"))
        subs[r(lk.pooled)] = column
    _substitute(graph, subs)

    output = r(analysis.output)
    out_info = next(v for v in graph.output if v.name == output)
    tail = []
    x = output
    if out_info.type.tensor_type.elem_type != TensorProto.FLOAT:
        tail.append(helper.make_node("Cast", [x], [x + ".f32"], to=TensorProto.FLOAT, name="jizhi.score_cast"))
        x = x + ".f32"
    dims = static_dims(out_info)
    if dims is not None and len(dims) == 1:
        if tail:
            tail[-1].output[0] = SCORE
        else:
            _rename(graph, {output: SCORE})
    else:
        constants.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), SCORE + ".shape"))
        tail.append(helper.make_node("Reshape", [x, SCORE + ".shape"], [SCORE], name="jizhi.score_flat"))

    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    _prune(graph, [SCORE])

    for lk in lookups:
        for name in lk.field.inputs:
            node = _leftover_reader(graph, {r(name)})
            if node is not None:
                refuse(f"field {lk.field.name!r}: input {name!r} is also read by {node_text(node)}, which is not "
                       f"part of an embedding lookup: the bundle's graph gets pooled embeddings, not ids")
    for lk in lookups:
        node = _leftover_reader(graph, {r(lk.table)})
        if node is not None:
            refuse(f"table {lk.table!r} (field {lk.field.name!r}) is also read by {node_text(node)}, which is not "
                   f"an embedding lookup jizhi can move to the cube")

    del graph.input[:]
    graph.input.extend([
        helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["U", width]),
        helper.make_tensor_value_info("user_emb", TensorProto.FLOAT, ["U", n_user, dim]),
        helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["P", n_item, dim]),
        helper.make_tensor_value_info("user_index", TensorProto.INT64, ["P"]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["P"]))
    # The model's own shape annotations name its batch B and its ids: stale now.
    del graph.value_info[:]
    try:
        onnx.checker.check_model(out_model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        refuse(f"the rewritten graph fails onnx.checker: {e}")
    return out_model
