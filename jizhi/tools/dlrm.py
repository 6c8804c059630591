"""A DLRM-shaped dense model: in bundle input form, and as a team exports it with its tables.

Runs offline, in the process that calls it (tests, the structured-features
benchmark, ``python -m jizhi.tools.dlrm make``). Two builders of one network:

* ``build`` returns a ``dense.onnx`` ModelProto with the inputs of
  docs/formats.md: ``dense`` f32[U,13], ``user_emb`` f32[U,F_user,dim],
  ``item_emb`` f32[P,F_item,dim], ``user_index`` int64[P]; output ``score``
  f32[P]. It is the naive per-pair form a model importer produces: it first
  gathers ``dense`` and ``user_emb`` per pair (``dense_pp``,
  ``user_emb_pp``), then computes everything on P rows, each field cut out
  of ``user_emb_pp`` / ``item_emb`` by a Slice on axis 1.
* ``build_with_tables`` returns the same network in the form a team exports
  from training, and the FIELDS.toml text ``jizhictl import`` reads
  (docs/formats.md, "Importing a model"): input ``dense_x`` f32[B,13] and
  one ids input per sparse field (named like the field), each field's table
  an initializer f32[V,dim] read by a Gather on axis 0; output ``prob``
  f32[B,1] (``logit`` without the sigmoid). ``table_fields`` lists the
  fields and their tables.

The network, on B rows (P pairs in bundle form):

* bottom MLP 13 -> 512 -> 256 -> dim, ReLU after every layer;
* the 1 + F_user + F_item vectors of the dot interaction, each [B,1,dim]:
  the bottom output first, then the sparse fields interleaved user, item,
  user, item... (``field_order``; the longer side's remaining fields last);
* ``T = Concat(vectors, axis=1)`` [B,F,dim], ``Z = MatMul(T, Transpose(T,
  [0,2,1]))`` [B,F,F], ``Flatten(Z, axis=1)`` and a Gather on axis 1 of the
  strictly lower triangle (i > j, row-major: DLRM's ``li, lj``), F(F-1)/2
  entries;
* ``Concat(bottom_out, interactions)`` -> top MLP 256 -> 128 -> 1 (ReLU, ReLU,
  linear), Sigmoid (bundle form: Squeeze to [P]).

Weights follow the reference DLRM's initialisation: W ~ N(0, 2/(fan_in +
fan_out)), b ~ N(0, 1/fan_out); each layer draws from its own stream
``default_rng([seed, layer])``, so the same arguments give the same bytes,
and both builders give the same layers for the same seed.

``python -m jizhi.tools.dlrm make OUT_DIR`` (``make``) writes ``model.onnx`` and
``fields.toml`` of ``build_with_tables``, imports them with jizhi's
importer into ``OUT_DIR/models/dlrm/1``, writes a request trace
``OUT_DIR/trace.npz`` (``jizhi.tools.demo.generate_trace``) and two pipeline
files, ``OUT_DIR/dlrm.toml`` (structured features on) and
``OUT_DIR/dlrm_per_pair.toml`` (``structured = false``: every stage per pair).
"""
import argparse
import dataclasses
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jizhi.tools.demo import ONNX_IR_VERSION, ONNX_OPSET, bundle_model

DENSE_FEATURES = 13
BOTTOM = (512, 256)   # hidden widths; the last bottom layer outputs ``dim``
TOP = (256, 128)      # hidden widths; the last top layer outputs 1

# --- the tables form (build_with_tables) ---
DENSE_INPUT = "dense_x"
# Table rows of the onehot fields, cycled: the user fields u_cat0, u_cat1, ...;
# the item fields after the item id i_id (ITEM_ID_VOCAB rows), i_cat1, i_cat2, ...
USER_VOCAB = (10_000, 1_000, 500, 100, 2_000, 300, 5_000)
ITEM_ID_VOCAB = 100_000
ITEM_VOCAB = (10_000, 2_000, 500, 200, 100, 1_000)
# The last field of a side with two fields or more is multi-hot:
# (name, rows, max_len, pooling). "sum": ReduceSum over [B, max_len] ids, short
# bags padded with row 0, a zero row (padding_idx 0); "mean": ReduceMean over
# always-full bags (a mean would count padding rows, so there is none).
USER_MULTIHOT = ("u_tags", 5_000, 5, "sum")
ITEM_MULTIHOT = ("i_tags", 3_000, 4, "mean")
# Embedding rows ~ N(0, EMBEDDING_STD^2). Not the reference DLRM's U(+-1/sqrt(V)):
# on a 100,000-row table that makes the item's vectors so small that a wrong
# item embedding would move the score by less than the 1e-5 the tests compare to.
EMBEDDING_STD = 0.3
_S_TABLES = 1000      # table k draws from default_rng([seed, _S_TABLES, k]); layers use [seed, layer]

MODEL_NAME = "dlrm"


def field_order(n_user_fields, n_item_fields):
    """The sparse fields in interaction order: ``[("user", 0), ("item", 0),
    ("user", 1), ...]``, interleaved, the longer side's remainder last."""
    order = []
    for k in range(max(n_user_fields, n_item_fields)):
        if k < n_user_fields:
            order.append(("user", k))
        if k < n_item_fields:
            order.append(("item", k))
    return order


def lower_triangle(n_vectors):
    """int64 [n(n-1)/2]: flat indices ``i * n + j`` of the entries i > j, row-major."""
    return np.array([i * n_vectors + j for i in range(n_vectors) for j in range(i)], dtype=np.int64)


def _layers(dim, n_vectors):
    """(name, fan_in, fan_out, relu) of every layer, bottom then top."""
    widths = (DENSE_FEATURES, *BOTTOM, dim)
    layers = [(f"bottom{k}", widths[k], widths[k + 1], True) for k in range(len(widths) - 1)]
    widths = (dim + n_vectors * (n_vectors - 1) // 2, *TOP, 1)
    layers += [(f"top{k}", widths[k], widths[k + 1], k + 2 < len(widths)) for k in range(len(widths) - 1)]
    return layers


class _Net:
    """Nodes and initializers of the network being built (both builders)."""

    def __init__(self, seed, dim, n_vectors):
        self.seed, self.dim, self.n_vectors = int(seed), dim, n_vectors
        self.nodes, self.initializers = [], []

    def const(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, outputs, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    def mlp(self, x, group):
        """The layers of ``group`` ("bottom" or "top") applied to ``x``; the output's name."""
        for index, (name, fan_in, fan_out, relu) in enumerate(_layers(self.dim, self.n_vectors)):
            if not name.startswith(group):
                continue
            rng = np.random.default_rng([self.seed, index])
            w = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out)).astype(np.float32)
            b = rng.normal(0.0, math.sqrt(1.0 / fan_out), fan_out).astype(np.float32)
            self.node("MatMul", [x, self.const(name + ".W", w)], [name + ".mm"])
            x = self.node("Add", [name + ".mm", self.const(name + ".b", b)], [name + ".lin"])
            if relu:
                x = self.node("Relu", [x], [name + ".out"])
        return x

    def interaction_and_top(self, bottom, vectors, sigmoid):
        """Dot interaction of ``vectors`` (each [B,1,dim], the bottom's first), the
        lower triangle, Concat with ``bottom``, top MLP, Sigmoid: the [B,1] output's name."""
        self.node("Concat", vectors, ["T"], axis=1)
        self.node("Transpose", ["T"], ["T_t"], perm=[0, 2, 1])
        self.node("MatMul", ["T", "T_t"], ["Z"])
        self.node("Flatten", ["Z"], ["Z_flat"], axis=1)
        self.node("Gather", ["Z_flat", self.const("tri", lower_triangle(self.n_vectors))], ["interactions"], axis=1)
        self.node("Concat", [bottom, "interactions"], ["top_in"], axis=1)
        logit = self.mlp("top_in", "top")
        return self.node("Sigmoid", [logit], ["prob"]) if sigmoid else logit


def build(seed, dim=64, n_user_fields=8, n_item_fields=8, *, sigmoid=True):
    """The naive per-pair DLRM in bundle form (module docstring), as a checked ModelProto.

    ``dim`` is the embedding dimension (the bottom MLP's output width too);
    ``n_user_fields`` and ``n_item_fields`` are F_user and F_item. With
    ``sigmoid=False`` the output ``score`` is the logit.
    """
    if n_user_fields < 1 or n_item_fields < 1:
        raise ValueError("a DLRM needs at least one user and one item field")
    net = _Net(seed, dim, 1 + n_user_fields + n_item_fields)
    net.const("axis1", np.array([1], dtype=np.int64))
    net.node("Gather", ["dense", "user_index"], ["dense_pp"], axis=0)
    net.node("Gather", ["user_emb", "user_index"], ["user_emb_pp"], axis=0)
    bottom = net.mlp("dense_pp", "bottom")
    vectors = [net.node("Unsqueeze", [bottom, "axis1"], ["bottom_vec"])]
    for side, k in field_order(n_user_fields, n_item_fields):
        source = "user_emb_pp" if side == "user" else "item_emb"
        name = f"{side}_field{k}"
        vectors.append(net.node(
            "Slice", [source, net.const(f"{name}.start", np.array([k], dtype=np.int64)),
                      net.const(f"{name}.end", np.array([k + 1], dtype=np.int64)), "axis1"], [name]))
    out = net.interaction_and_top(bottom, vectors, sigmoid)
    net.node("Squeeze", [out, "axis1"], ["score"])
    return bundle_model(net.nodes, net.initializers, "jizhi_dlrm", "jizhi.tools.dlrm", DENSE_FEATURES, n_user_fields,
                        n_item_fields, dim)


# --- the tables form -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TableField:
    """A sparse field of ``build_with_tables``: its ids input (named ``name``) and its table."""
    name: str
    side: str        # user | item
    kind: str        # onehot: int64 [B] ids; multihot: int64 [B, max_len]
    max_len: int
    vocab: int       # table rows; raw values in a bundle are 1..vocab (row + 1)
    pooling: str     # multihot: "sum" or "mean" (see USER_MULTIHOT); onehot: "mean" (one row)

    @property
    def padding_idx(self):
        """The zero row short bags are padded with, or None (always-full bags, or onehot)."""
        return 0 if self.kind == "multihot" and self.pooling == "sum" else None


def table_fields(n_user_fields=8, n_item_fields=8, vocab=None):
    """The sparse fields of ``build_with_tables``: user fields, then item fields (column order).

    User fields ``u_cat0..`` and, with two or more, the multi-hot ``u_tags``
    last; item fields ``i_id`` (the item id, ITEM_ID_VOCAB rows), ``i_cat1..``
    and, with two or more, the multi-hot ``i_tags`` last. ``vocab``: None
    (the realistic sizes of USER_VOCAB, ITEM_VOCAB, ...), an int (every
    table cut to at most that many rows, at least 2), or one int per field
    in this order.
    """
    if n_user_fields < 1 or n_item_fields < 1:
        raise ValueError("a DLRM needs at least one user and one item field")
    fields = []
    for side, n, first, cats, multihot in (("user", n_user_fields, None, USER_VOCAB, USER_MULTIHOT),
                                           ("item", n_item_fields, ("i_id", ITEM_ID_VOCAB), ITEM_VOCAB,
                                            ITEM_MULTIHOT)):
        onehot = n - 1 if n >= 2 else n
        for k in range(onehot):
            if first is not None and k == 0:
                fields.append(TableField(first[0], side, "onehot", 1, first[1], "mean"))
            else:
                fields.append(TableField(f"{side[0]}_cat{k}", side, "onehot", 1,
                                         cats[(k - (first is not None)) % len(cats)], "mean"))
        if n >= 2:
            name, rows, max_len, pooling = multihot
            fields.append(TableField(name, side, "multihot", max_len, rows, pooling))
    if vocab is None:
        return tuple(fields)
    if isinstance(vocab, (int, np.integer)):
        if vocab < 2:
            raise ValueError(f"vocab {vocab}: a table needs at least 2 rows (a padding row and another)")
        return tuple(dataclasses.replace(f, vocab=min(f.vocab, int(vocab))) for f in fields)
    vocab = [int(v) for v in vocab]
    if len(vocab) != len(fields) or min(vocab) < 2:
        raise ValueError(f"vocab: {len(fields)} table sizes of at least 2 rows expected, got {vocab}")
    return tuple(dataclasses.replace(f, vocab=v) for f, v in zip(fields, vocab))


def _table(seed, k, field, dim):
    table = np.random.default_rng([int(seed), _S_TABLES, k]).standard_normal((field.vocab, dim), dtype=np.float32)
    table *= np.float32(EMBEDDING_STD)
    if field.padding_idx is not None:
        table[field.padding_idx] = 0.0
    return table


def build_with_tables(seed, dim=64, n_user_fields=8, n_item_fields=8, vocab=None, *, sigmoid=True):
    """``(ModelProto, FIELDS.toml text)``: the network of ``build`` with its embedding tables inside.

    Inputs ``dense_x`` float32 [B, 13] and, per field of ``table_fields(
    n_user_fields, n_item_fields, vocab)``, an int64 ids input named like
    the field: [B] (onehot, ``Gather(table, ids)`` is the field's vector) or
    [B, max_len] (multihot: ``Gather`` then ``ReduceSum`` or ``ReduceMean``
    over axis 1). Output ``prob`` float32 [B, 1] (``top2.lin``, the logit,
    with ``sigmoid=False``). Opset 17, checked with ``full_check``. The
    layers are ``build``'s for the same seed (same names, same weights), so
    a bundle imported from it serves the same graph as ``build`` up to the
    column lookups. Deterministic in its arguments.
    """
    fields = table_fields(n_user_fields, n_item_fields, vocab)
    net = _Net(seed, dim, 1 + n_user_fields + n_item_fields)
    net.const("axis1", np.array([1], dtype=np.int64))
    bottom = net.mlp(DENSE_INPUT, "bottom")
    by_side = {"user": [], "item": []}     # each side's field vectors, in column order
    for k, f in enumerate(fields):
        table = net.const(f"{f.name}.table", _table(seed, k, f, dim))
        rows = net.node("Gather", [table, f.name], [f"{f.name}.rows"], axis=0, name=f"{f.name}.lookup")
        if f.pooling == "sum" and f.kind == "multihot":
            rows = net.node("ReduceSum", [rows, "axis1"], [f"{f.name}.pooled"], keepdims=0, name=f"{f.name}.pool")
        elif f.kind == "multihot":
            rows = net.node("ReduceMean", [rows], [f"{f.name}.pooled"], axes=[1], keepdims=0,
                            name=f"{f.name}.pool")
        by_side[f.side].append(net.node("Unsqueeze", [rows, "axis1"], [f"{f.name}.vec"]))
    vectors = [net.node("Unsqueeze", [bottom, "axis1"], ["bottom_vec"])]
    vectors += [by_side[side][k] for side, k in field_order(n_user_fields, n_item_fields)]
    out = net.interaction_and_top(bottom, vectors, sigmoid)

    inputs = [helper.make_tensor_value_info(DENSE_INPUT, TensorProto.FLOAT, ["B", DENSE_FEATURES])]
    inputs += [helper.make_tensor_value_info(f.name, TensorProto.INT64, ["B"] if f.kind == "onehot"
                                             else ["B", f.max_len]) for f in fields]
    graph = helper.make_graph(net.nodes, "jizhi_dlrm_tables", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", 1])],
                              initializer=net.initializers)
    model = helper.make_model(graph, producer_name="jizhi.tools.dlrm", producer_version="1",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model, fields_toml(fields, out)


def fields_toml(fields, output="prob"):
    """FIELDS.toml text (docs/formats.md, "Importing a model") for ``build_with_tables``' model."""
    lines = ["# FIELDS.toml of jizhi.tools.dlrm.build_with_tables: what every input of the model is",
             f'output = "{output}"', "", "[dense]", f'input = "{DENSE_INPUT}"', 'side = "user"',
             f"features = {DENSE_FEATURES}"]
    for f in fields:
        lines += ["", "[[fields]]", f'name = "{f.name}"', f'side = "{f.side}"', f'kind = "{f.kind}"',
                  f"max_len = {f.max_len}", f'input = "{f.name}"']
        if f.padding_idx is not None:
            lines.append(f"padding_idx = {f.padding_idx}")
    return "\n".join(lines) + "\n"


# --- make: model.onnx + fields.toml -> an imported bundle, a trace, pipelines -------------

def pipeline_text(name, structured=True, pool=2, batch=8, batch_wait_ms=3):
    """A pipeline file for the imported DLRM, fused like etc/pipelines/demo.toml.

    ``structured``: the pipeline's ``structured`` (False: every stage per pair, jizhi/pipeline.py).
    """
    lines = [
        "# The imported DLRM (python -m jizhi.tools.dlrm make), fused like etc/pipelines/demo.toml;",
        "# structured features " + ("on (the default)." if structured else
                                    "off: every stage works per pair, for comparison."),
        f'name = "{name}"', f'model = "{MODEL_NAME}"', 'version = "latest"', 'on_unknown = "default"',
        *([] if structured else ["structured = false"]), "",
    ]
    stages = (("reader", "data_reader"), ("features", "feature_processor"), ("cube", "cube_accessor"),
              ("dnn", "model_inference"), ("rank", "ranker"))
    for i, (stage, processor) in enumerate(stages):
        lines += ["[[stage]]", f'name = "{stage}"', f'processor = "{processor}"']
        if i + 1 < len(stages):
            lines.append(f'next = ["{stages[i + 1][0]}"]')
        lines.append("")
    names = ", ".join(f'"{stage}"' for stage, _ in stages)
    lines += ["[[fuse]]", 'name = "scorer"', f"stages = [{names}]", f"pool = {pool}", f"batch = {batch}",
              f"batch_wait_ms = {batch_wait_ms}"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Made:
    """What ``make`` wrote (absolute paths; ``trace`` None without trace requests)."""
    model: str
    fields: str
    models_dir: str
    version_dir: str
    trace: str | None
    pipelines: tuple     # (dlrm.toml, dlrm_per_pair.toml)


def make(out_dir, *, seed=0, dim=64, n_user_fields=8, n_item_fields=8, vocab=None, users=10_000, items=100_000,
         check_pairs=2000, trace_requests=2000, candidates=500, spearman=0.8, pool=2, progress=True, log=print):
    """Write the DLRM with its tables and serve-ready files under ``out_dir``; a ``Made``.

    ``out_dir/model.onnx`` and ``fields.toml`` (``build_with_tables(seed,
    dim, n_user_fields, n_item_fields, vocab)``), imported by
    ``jizhi.tools.importer.import_model`` (what ``jizhictl import`` runs: ``users``
    and ``items`` generated profiles, ``check_pairs`` pairs checked against
    the original model) into ``out_dir/models/dlrm/1``; with
    ``trace_requests``, ``out_dir/trace.npz`` by ``jizhi.tools.demo.generate_trace``
    (users uniform, ``candidates`` items per request by Zipf popularity,
    recall scores at Spearman ``spearman`` with the reference scores); the
    pipeline files ``out_dir/dlrm.toml`` and ``out_dir/dlrm_per_pair.toml``
    (``pool`` workers each). Raises FileExistsError when the version exists,
    BundleError when the import fails (it then leaves no version).
    """
    from jizhi.bundle import write_text
    from jizhi.tools.demo import generate_trace
    from jizhi.tools.importer import import_model

    out_dir = os.path.abspath(os.fspath(out_dir))
    models_dir = os.path.join(out_dir, "models")
    version_dir = os.path.join(models_dir, MODEL_NAME, "1")
    if os.path.lexists(version_dir):
        raise FileExistsError(version_dir)
    os.makedirs(out_dir, exist_ok=True)
    model, fields_text = build_with_tables(seed, dim, n_user_fields, n_item_fields, vocab)
    model_path = os.path.join(out_dir, "model.onnx")
    fields_path = os.path.join(out_dir, "fields.toml")
    onnx.save(model, model_path)
    del model
    write_text(fields_path, fields_text)
    import_model(model_path, fields_path, version_dir, name=MODEL_NAME, version=1, users=users, items=items,
                 seed=seed, check_pairs=check_pairs, progress=progress, log=log)
    trace_path = None
    if trace_requests:
        trace_path = os.path.join(out_dir, "trace.npz")
        generate_trace(version_dir, trace_path, requests=trace_requests, candidates=candidates, spearman=spearman,
                       seed=seed, progress=progress)
    pipelines = []
    for name, structured in ((MODEL_NAME, True), (MODEL_NAME + "_per_pair", False)):
        pipelines.append(os.path.join(out_dir, name + ".toml"))
        write_text(pipelines[-1], pipeline_text(name, structured, pool=pool))
    return Made(model_path, fields_path, models_dir, version_dir, trace_path, tuple(pipelines))


def _size_text(path):
    total = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    return f"{total / 1e6:,.1f} MB"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jizhi.tools.dlrm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make", help="model.onnx with its tables -> jizhictl import -> bundle, trace, pipelines",
                            description=make.__doc__.split("\n\n")[0])
    m.add_argument("out_dir", metavar="OUT_DIR")
    m.add_argument("--seed", type=int, default=0, help="weights, tables, profiles and trace (default 0)")
    m.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    m.add_argument("--user-fields", type=int, default=8, help="sparse user fields (default 8)")
    m.add_argument("--item-fields", type=int, default=8, help="sparse item fields (default 8)")
    m.add_argument("--max-vocab", type=int, default=None,
                   help="cut every table to at most this many rows (default: the realistic sizes, i_id 100,000)")
    m.add_argument("--users", type=int, default=10_000, help="users in the generated profiles (default 10,000)")
    m.add_argument("--items", type=int, default=100_000, help="items in the generated profiles (default 100,000)")
    m.add_argument("--check-pairs", type=int, default=2000, help="pairs the import checks (default 2000)")
    m.add_argument("--trace-requests", type=int, default=2000, help="trace requests, 0: no trace (default 2000)")
    m.add_argument("--candidates", type=int, default=500, help="candidates per trace request (default 500)")
    m.add_argument("--spearman", type=float, default=0.8, help="recall/reference score correlation (default 0.8)")
    m.add_argument("--pool", type=int, default=2, help="workers per pipeline in the pipeline files (default 2)")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from jizhi.errors import BundleError
    try:
        made = make(args.out_dir, seed=args.seed, dim=args.dim, n_user_fields=args.user_fields,
                    n_item_fields=args.item_fields, vocab=args.max_vocab, users=args.users, items=args.items,
                    check_pairs=args.check_pairs, trace_requests=args.trace_requests, candidates=args.candidates,
                    spearman=args.spearman, pool=args.pool, progress=not args.quiet)
    except FileExistsError as e:
        print(f"python -m jizhi.tools.dlrm make: {e} exists already (choose another OUT_DIR)", file=sys.stderr)
        return 2
    except (BundleError, ValueError) as e:
        print(f"python -m jizhi.tools.dlrm make: {e}", file=sys.stderr)
        return 2
    print(f"model:     {made.model} ({_size_text(made.model)})")
    print(f"fields:    {made.fields}")
    print(f"bundle:    {made.version_dir} (cube {_size_text(os.path.join(made.version_dir, 'cube'))}, "
          f"dense.onnx {_size_text(os.path.join(made.version_dir, 'dense.onnx'))}, "
          f"profiles {_size_text(os.path.join(made.version_dir, 'profiles'))})")
    if made.trace:
        print(f"trace:     {made.trace}")
    print(f"pipelines: {', '.join(made.pipelines)}")
    print(f"serve:     jizhid --models {made.models_dir} --pipelines {','.join(made.pipelines)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
