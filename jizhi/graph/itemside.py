"""Item-side precomputation: the part of a bundle's dense model that depends
only on the item, computed once per item of a bundle version instead of once
per (user, item) pair.

Within a bundle version an item's pooled embeddings are fixed (its
signatures are precomputed in the item profiles and the cube is read-only),
so any tensor of the dense graph that is a row-wise function of ``item_emb``
alone is a fixed row per item. On the demo model the first top layer's item
part (``item_flat @ W[item rows]``, 256 x 256 multiply-adds per pair: about
two thirds of the model's per-pair work once structured features have moved
the user part) is such a tensor; on the DLRM the item-item interaction block
and its share of the first layer are.

``split_items(model)`` takes a bundle-form model (usually the output of
``jizhi.graph.structured.structure``), puts it in canonical form first
(jizhi/graph/canonical.py: same scores) and returns an ``ItemSplit``:

* ``items``: a model from ``item_emb`` f32[P, F_item, D] to the *frontier*
  tensors (item-only tensors that took a MatMul/Gemm to compute and are read
  by the rest of the graph), run once per item when the table is built;
* ``serving``: the model with those tensors as extra inputs (same names,
  f32[P, ...]); everything else unchanged, same output.

Before the frontier is taken, a first layer over a concatenation of item and
other tensors (``MatMul(Concat(parts, axis=-1), W)`` with a constant W) is
split into ``Concat(item parts) @ W[item rows] + Concat(other parts) @
W[other rows]``, the same way ``structure`` splits user parts off. Item-side
tensors are ``item_emb`` and the outputs of nodes whose non-constant inputs
are all item-side and that are row-wise (``jizhi.graph.rows.rowwise``), so
row p of every frontier tensor depends only on row p of ``item_emb``.

``ItemTable`` (used by ``workers/model_inference.py`` with the stage option
``item_cache = true``) builds, when the worker opens a bundle version, one
table per frontier tensor with a row per item of the item profiles: the
items' precomputed signatures pooled from the version's cube (by a function
the worker passes in), in chunks, through the ``items`` model. A request's candidates then read their rows
(one gather per tensor); a candidate whose id is not in the profiles (scored
with empty bags, pipeline option ``on_unknown = "default"``) gets its rows
from the ``items`` model run on its pooled embeddings in the batch. Scores
are those of the model without the split up to float32 rounding of the
reordered sums (tests/test_itemside.py).
"""
import dataclasses
import time

import numpy as np
import onnx
from onnx import helper

from jizhi.graph.canonical import canonicalise
from jizhi.graph.proto import DOMAINS, ITEM_INPUT, Graph, Writer, assemble, attr, has_subgraph, normalize_axis
from jizhi.graph.rows import CONST, OTHER, rowwise
from jizhi.profilestore import profiles as store_profiles
from jizhi.sharedtable import build_now, building as shared_building, table_name

_HEAVY = frozenset({"MatMul", "Gemm", "Conv", "Einsum", "MatMulInteger", "QLinearMatMul"})
_ITEM = "item"     # the item side's kind, beside rows.CONST and rows.OTHER


@dataclasses.dataclass(frozen=True)
class ItemSplit:
    serving: onnx.ModelProto
    items: onnx.ModelProto
    frontier: tuple          # ((name, trailing dims), ...): the tensors the table holds per item
    layers: tuple            # descriptions of the layers split into an item part and the rest

    @property
    def floats_per_item(self):
        return int(sum(int(np.prod(dims)) for _, dims in self.frontier))


def _kinds(g, model):
    """Tensor -> _ITEM / CONST / OTHER, in node order."""
    kind = {v.name: (_ITEM if v.name == ITEM_INPUT else OTHER) for v in model.graph.input}
    kind.update((name, CONST) for name in g.constants)
    for node in model.graph.node:
        kinds = [kind.get(n, OTHER) for n in node.input if n]
        if node.op_type == "Constant" or (kinds and all(k == CONST for k in kinds)):
            out = CONST
        elif all(k in (CONST, _ITEM) for k in kinds) and rowwise(
                node, g, {i for i, n in enumerate(node.input) if n and kind.get(n) == _ITEM}):
            out = _ITEM
        else:
            out = OTHER
        for name in node.output:
            if name:
                kind[name] = out
    return kind


def _split_item_layers(model):
    """Split MatMul(Concat(item and other parts, last axis), W) into an item part and the rest.
    Returns (model, descriptions)."""
    g = Graph(model)
    kind = _kinds(g, model)
    w = Writer(g)
    layers = []
    for node in model.graph.node:
        split = _item_layer(node, g, kind)
        if split is None:
            w.copy(node, node.input, node.output)
            continue
        item_parts, other_parts, weights = split
        base = node.output[0]
        x_item = w.concat([name for name, _ in item_parts], -1, base + ".item_in")
        x_other = w.concat([name for name, _ in other_parts], -1, base + ".other_in")
        item_rows = np.concatenate([cols for _, cols in item_parts])
        other_rows = np.concatenate([cols for _, cols in other_parts])
        y_item = w.op("MatMul", [x_item, w.const(base + ".W_item", weights[item_rows])], base + ".item")
        y_other = w.op("MatMul", [x_other, w.const(base + ".W_other", weights[other_rows])], base + ".other")
        w.node("Add", [y_item, y_other], [base])
        layers.append(f"MatMul -> {base}: {len(item_rows)} input rows per item, {len(other_rows)} per pair, "
                      f"{weights.shape[1]} outputs")
    if not layers:
        return model, ()
    return w.model(model), tuple(layers)


def _item_layer(node, g, kind):
    """(item parts, other parts, W) of a splittable MatMul, each part (name, weight rows); or None."""
    if node.domain not in DOMAINS or node.op_type != "MatMul":
        return None
    x, weights = node.input[0], g.value(node.input[1])
    if weights is None or weights.ndim != 2 or weights.dtype != np.float32 or g.rank(x) != 2:
        return None
    concat = g.producer.get(x)
    if concat is None or concat.op_type != "Concat" or concat.domain not in DOMAINS:
        return None
    axis = attr(concat, "axis")
    if axis is None or normalize_axis(axis, 2) != 1:
        return None
    parts, start = [], 0
    for name in concat.input:
        shape = g.shape(name)
        if not name or shape is None or len(shape) != 2 or not isinstance(shape[1], int):
            return None
        parts.append((name, np.arange(start, start + shape[1])))
        start += shape[1]
    if start != weights.shape[0]:
        return None
    item = [p for p in parts if kind.get(p[0]) == _ITEM]
    other = [p for p in parts if kind.get(p[0]) != _ITEM]
    if not item or not other:
        return None
    return item, other, weights


def split_items(model):
    """The model's item-only work as a separate model (module docstring), or None when the
    model has none worth a table (no MatMul/Gemm on item-only tensors)."""
    if any(has_subgraph(node) for node in model.graph.node):
        return None
    if ITEM_INPUT not in {v.name for v in model.graph.input}:
        return None
    model, layers = _split_item_layers(canonicalise(model).model)
    g = Graph(model)
    kind = _kinds(g, model)
    heavy = set()            # item-side tensors that took a MatMul/Gemm to compute
    region = []              # their nodes
    for node in model.graph.node:
        outs = [n for n in node.output if n]
        if not outs or any(kind.get(n) != _ITEM for n in outs):
            continue
        if (node.op_type in _HEAVY and node.domain in DOMAINS) or any(n in heavy for n in node.input if n):
            heavy.update(outs)
            region.append(node)
    in_region = {id(n) for n in region}
    outputs = {o.name for o in model.graph.output}
    frontier = []
    for node in region:
        for name in node.output:
            if not name:
                continue
            read = [c for c in g.consumers.get(name, []) if id(c) not in in_region]
            if (read or name in outputs) and name not in frontier:
                frontier.append(name)
    if not frontier:
        return None
    dims = []
    for name in frontier:
        if g.types.get(name) != onnx.TensorProto.FLOAT:
            return None     # the table is float32 (a bool mask or an index of the item is not precomputed)
        shape = g.shape(name)
        if shape is None or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return None     # a table needs static trailing dims
        dims.append((name, tuple(int(d) for d in shape[1:])))
    frontier_inputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["P", *d]) for name, d in dims]

    # The item model: the item-side ancestors of the frontier.
    item_input = next(v for v in model.graph.input if v.name == ITEM_INPUT)
    items, _ = assemble(model, model.graph.node, [item_input], frontier_inputs)
    # The serving model: everything but the region, the frontier as inputs.
    serving, _ = assemble(model, [n for n in model.graph.node if id(n) not in in_region],
                          list(model.graph.input) + frontier_inputs, list(model.graph.output))
    return ItemSplit(serving, items, tuple(dims), layers)


class ItemTable:
    """The frontier tensors of ``split`` for every item of a bundle version (module docstring).

    ``session``: an onnxruntime session of ``split.items``. ``pool(sigs, lens)``:
    the pooled item embeddings f32[R, F_item, D] of R items' signatures (uint64
    [R, F_item, L], lengths int32 [R, F_item]), read from the version's cube by
    the caller (the worker: the cube is a layer this package does not import).
    ``max_mb``: refuse (ValueError) a table larger than this, before any pooling.
    ``chunk``: items pooled and run per step while building.
    """

    def __init__(self, bundle, split, session, pool, max_mb=512, chunk=8192, items=None, build=True, shared=None,
                 stage="dnn"):
        self.split = split
        self.session = session
        self.items = store_profiles(bundle, "item") if items is None else items
        n = int(self.items.ids.shape[0])
        mb = n * split.floats_per_item * 4 / 2**20
        if mb > max_mb:
            raise ValueError(f"the item table would take {mb:.0f} MiB ({n} items x {split.floats_per_item} "
                             f"floats), over item_cache_mb = {max_mb}")
        self.names = [name for name, _ in split.frontier]
        self.specs = [((n, *d), np.float32) for _, d in split.frontier]
        # one copy per version in shared memory when the worker is given a prefix (jizhi/sharedtable.py)
        self.name = table_name(shared, stage, self.items.root / "items")
        self.how = None
        self._pool = pool
        self.build_s = 0.0
        self.mb = mb
        if build:
            self.tables, self.how = build_now(self.name, self.specs, lambda t: self._fill(t, chunk))

    def building(self, chunk=8192):
        """The steps of the table (a generator, one step per batch boundary while a new profile snapshot is
        prepared; waiting a step at a time while another worker builds the shared copy); returns this
        ItemTable when done."""
        self.tables, self.how = yield from shared_building(self.name, self.specs, lambda t: self._fill(t, chunk),
                                                           wait=False)
        return self

    def _fill(self, tables, chunk):
        """Every item's frontier tensors into ``tables``, ``chunk`` items a step."""
        n = tables[0].shape[0] if tables else 0
        for a in range(0, n, chunk):
            t0 = time.monotonic()
            rows = np.arange(a, min(n, a + chunk), dtype=np.int64)
            sigs, lens = self.items.item_signatures(rows, np.ones(rows.shape[0], dtype=np.bool_))
            emb = self._pool(sigs, lens)
            for table, out in zip(tables, self.session.run(self.names, {ITEM_INPUT: emb})):
                table[a:a + rows.shape[0]] = out
            self.build_s += time.monotonic() - t0
            yield

    def feeds(self, item_ids, item_emb, found=None):
        """{frontier name: f32[P, ...]} for these candidates (``item_emb``: their pooled embeddings,
        read only for ids the profiles do not know; ``found``: ``self.items.rows(item_ids)`` if the
        caller has it already)."""
        rows, known = self.items.rows(item_ids) if found is None else found
        out = {name: np.take(table, rows, axis=0) for name, table in zip(self.names, self.tables)}
        if not known.all():
            unknown = np.flatnonzero(~known)
            computed = self.session.run(self.names, {ITEM_INPUT: np.ascontiguousarray(item_emb[unknown])})
            for name, values in zip(self.names, computed):
                out[name][unknown] = values
        return out
