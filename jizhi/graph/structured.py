"""Structured features: run the user-only part of a bundle's dense model on
U rows (once per user) instead of P rows (once per candidate pair).

Runs where it is called, offline or when a model inference worker opens a
bundle: ``structure`` and ``unstructure`` take a ModelProto and return a new
one (the argument is not modified); they run no onnxruntime (``check`` does), are
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
* ``flops(model) -> Flops``: MatMul/Gemm FLOPs per pair and per user
  (jizhi/graph/flops.py);
* ``random_inputs(model, U, P, seed, user_index=None)``: the feeds ``check``
  uses (dense ~ N(0, 1), embeddings ~ N(0, 0.3^2), user_index uniform).

How the pass sees a graph
-------------------------
``structure`` first puts the graph in canonical form
(jizhi/graph/canonical.py, same scores): shape computations that do not
depend on the batch folded into constants, Reshape targets that keep the
batch first made ``[0, dims...]``, unbound and nested Concats seen through,
an interaction's T made a Concat of [P, k, D] parts and the data movement
that selects entries of an interaction product Z rewritten as
``Gather(Flatten(Z, axis=1), s, axis=1)`` when a probe proves it is one. The
walk below reads the canonical graph.

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

Row-wise ops (a Gather on axis 0 moves past them): the list is in
jizhi/graph/rows.py. Any other op, an op in another domain, a node with a
subgraph, or an operand whose rank or constant value is not known (shape
inference, initializers and Constant nodes of the canonical graph) is not
row-wise: its inputs are gathered per pair first. Correctness first: nothing
is moved on a guess.

Recognised forms
----------------
The forms below are those of the canonical graph; the canonical pre-pass
brings to them what torch.onnx.export writes from the reference DLRM
(``cat([x] + ly).view(batch, -1, d)``, ``bmm(T, T^T)``, ``Z[:, li, lj]``,
``cat([x, Zflat])``) with either exporter: TorchScript's computed view shape
(Shape -> Gather -> Unsqueeze -> Concat) and its Transpose -> Flatten ->
Gather (computed index) -> Reshape -> Transpose -> Reshape selection;
dynamo's ``Reshape(.., [-1, F, D], allowzero=1)``, Transpose -> GatherND ->
Transpose selection and ``GatherND(x, Unsqueeze(user_index))`` gathers; field
vectors Concat'ed inside another Concat, or stacked in [B, k, D] blocks,
Concat'ed and unbound (Split or Slice, then Squeeze).

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
  (any entries: DLRM selects the strictly lower triangle; the canonical
  pre-pass writes any proven selection this way, a Slice of Zf included),
  or all F*F of them, in order, when Zf is read by anything else (a model
  that feeds the whole flattened product to its top MLP). The user-user
  entries are computed on U rows (``Tu @ Tu^T``), the user-item entries per
  pair as ``Gather(Tu, user_index) @ Ti^T`` and the item-item ones as ``Ti @
  Ti^T`` (onnxruntime folds the Transposes into the MatMuls). Parts that are
  contiguous rows of one tensor on axis 1 (unit-step ``Slice``s, or
  ``Unsqueeze(Gather(x, k, axis=1), [1])`` with a constant scalar k) are
  read as one Slice, or as the tensor itself (DLRM's fields cut out of
  user_emb and item_emb), so T is never assembled per pair. A block whose
  entries are all selected is used as it is, otherwise a column Gather picks
  the selected ones. Consumed by a layer split, the blocks feed it directly,
  the weight rows permuted to match (no reordering per pair); any other
  consumer reads the entries in their original order (a Concat and a column
  Gather per pair).
* Not recognised (left per pair, named in the report's ``not_split``): a
  product of two tensors of which one mixes user and item data but that is
  not T @ T^T of one T (``interaction at node N: not recognised``); DCN's
  cross layers ``x0 * (x W + b) + x`` (``cross layer (x0 * (x W + b) + x)
  -> N: not split``; their first layer on x0 is a layer split all the same);
  a selection of Z's entries that the probe does not prove (one that mixes
  pairs, say).
Anything else stays per pair and gives the same scores.

Report
------
``StructureReport``: nodes now computed on U rows, layers split,
interactions split, those left per pair (``not_split``), the canonical
pre-pass's rewrites, the Gathers by user_index left (the meet points), and
MatMul/Gemm FLOPs per pair and per user of the input and the output model
(``flops``: from shapes inferred at three (U, P) sizes; FLOPs per pair at c
candidates per user is ``per_pair + per_user / c``).

Where it is written
-------------------
This module holds the API; the canonical pre-pass is
jizhi/graph/canonical.py (its numpy ops jizhi/graph/ops.py), the walk and the
layer split jizhi/graph/structurer.py, the interaction split
jizhi/graph/interactions.py, the row-wise ops jizhi/graph/rows.py, ``flops``
jizhi/graph/flops.py, the analytic floor (the FLOPs per pair of only the work
that depends on both a user and an item tensor) jizhi/graph/floor.py. The
benchmark (naive against structured, with every option, on the demo model
and the DLRM) and ``report MODEL.onnx`` (per model: FLOPs per pair of the
per-pair, structured and item-table graphs and the floor) are ``python -m
jizhi.tools.structbench``.
"""
import dataclasses

import numpy as np
import onnx

from jizhi.graph.canonical import canonicalise
from jizhi.graph.flops import Flops, flops
from jizhi.graph.proto import USER_INDEX, USER_INPUTS, Graph, Writer, has_subgraph, static_dims
from jizhi.graph.rows import CONST, OTHER, USER, is_user_gather, rowwise
from jizhi.graph.session import model_session
from jizhi.graph.structurer import Structurer

# Random inputs of ``check``: embeddings a little wider than the demo cube's
# (0.1) so that interactions weigh in the scores being compared.
_EMBEDDING_STD = 0.3


# --- structure ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StructureReport:
    """What ``structure`` moved.

    ``moved_nodes``: input nodes (``"op -> output"``) now computed on U rows;
    ``split_layers`` and ``split_interactions``: one line per split;
    ``gathers``: the tensors gathered by user_index in the output model (where
    user-only tensors meet item-side ones or non-row-wise ops);
    ``flops_before`` / ``flops_after``: ``flops`` of the input and output models;
    ``note``: why the model was left as it is, if it was; ``not_split``: the
    interactions left per pair, by name (``interaction at node N: not
    recognised``, ``cross layer (x0 * (x W + b) + x) -> N: not split``);
    ``canonical``: what the canonical pre-pass rewrote (jizhi/graph/canonical.py).
    """
    moved_nodes: tuple
    split_layers: tuple
    split_interactions: tuple
    gathers: tuple
    flops_before: Flops
    flops_after: Flops
    note: str = ""
    not_split: tuple = ()
    canonical: tuple = ()

    def summary(self, candidates=500):
        lines = [
            *([f"note: {self.note}"] if self.note else []),
            f"canonical pre-pass: {len(self.canonical)} rewrites",
            f"nodes moved to U rows: {len(self.moved_nodes)}",
            f"layers split: {len(self.split_layers)}",
            *(f"  {line}" for line in self.split_layers),
            f"interactions split: {len(self.split_interactions)}",
            *(f"  {line}" for line in self.split_interactions),
            *(f"{line}" for line in self.not_split),
            f"gathers by user_index: {len(self.gathers)} ({', '.join(self.gathers)})",
        ]
        for label, f in (("before", self.flops_before), ("after", self.flops_after)):
            lines.append(f"MatMul/Gemm FLOPs {label}: {f.per_pair:,.0f} per pair + {f.per_user:,.0f} per user"
                         f" = {f.at(candidates):,.0f} per pair at {candidates} candidates"
                         + (f" ({f.unknown} nodes of unknown shape)" if f.unknown else ""))
        return "\n".join(lines)


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
    if any(has_subgraph(node) for node in model.graph.node):
        same = onnx.ModelProto()
        same.CopyFrom(model)
        before = flops(model)
        return same, StructureReport((), (), (), _user_gathers(same), before, before,
                                     note="a node has a subgraph (If, Loop, Scan): model left as it is")
    canonical = canonicalise(model)
    s = Structurer(canonical.model, split_layers, split_interactions)
    new = s.run()
    moved = []
    for node in s.w.kept:
        original = s.w.origin.get(id(node))
        if original is not None:
            moved.append(f"{original.op_type} -> {original.output[0]}")
    report = StructureReport(tuple(moved), tuple(s.layers), tuple(s.interactions), _user_gathers(new),
                             flops(model), flops(new), not_split=tuple(s.not_split), canonical=canonical.changes)
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
    if any(has_subgraph(node) for node in model.graph.node):
        raise ValueError("unstructure: graphs with subgraphs (If, Loop, Scan) are not supported")
    g = Graph(model)
    w = Writer(g)
    kind = {v.name: (USER if v.name in USER_INPUTS else OTHER) for v in model.graph.input}
    kind.update((name, CONST) for name in g.constants)
    per_pair = {}   # user tensor -> its per-pair tensor
    alias = {}      # input tensor -> the tensor that replaces it

    def pp(name):
        if name not in per_pair:
            per_pair[name] = w.op("Gather", [name, USER_INDEX], name + "_pp", axis=0)
        return per_pair[name]

    for node in model.graph.node:
        inputs = [alias.get(n, n) for n in node.input]
        kinds = {kind.get(n, OTHER) for n in node.input if n}
        if is_user_gather(node, g) and kind.get(node.input[0]) == USER:
            source = node.input[0]
            if source in per_pair:
                alias[node.output[0]] = per_pair[source]
            else:
                w.copy(node, node.input, node.output)
                per_pair[source] = node.output[0]
            kind[node.output[0]] = OTHER
            continue
        w.copy(node, inputs, node.output)
        if kinds <= {CONST}:
            out_kind = CONST
        elif kinds <= {CONST, USER} and rowwise(node, g, {i for i, n in enumerate(node.input)
                                                          if n and kind.get(n) == USER}):
            out_kind = USER
            lifted = [pp(n) if n and kind.get(n) == USER else n for n in node.input]
            outputs = [w.fresh(n + "_pp") if n else "" for n in node.output]
            w.copy(node, lifted, outputs)
            per_pair.update((n, o) for n, o in zip(node.output, outputs) if n)
        else:
            out_kind = OTHER
        for name in node.output:
            if name:
                kind[name] = out_kind
    for output in model.graph.output:
        if output.name in alias:
            w.node("Identity", [alias[output.name]], [output.name])
    return w.model(model)


# --- checking ----------------------------------------------------------------------

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
        dims = static_dims(value_info)
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


def check(original, transformed, U, P, seed, *, user_index=None):
    """Max absolute difference of the first outputs of two bundle-form models
    on the same random inputs (``random_inputs``), through onnxruntime with
    the worker's session options. ``user_index``: int64[P], or random."""
    feeds = random_inputs(original, U, P, seed, user_index)
    a = model_session(original).run(None, feeds)[0]
    b = model_session(transformed).run(None, feeds)[0]
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: {a.shape} != {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))
