"""The structured-features benchmark: the dense graph alone, naive (per pair)
against structured, and what the pass does to a model.

Runs offline, in its own process, never in the server (not a test). One
intra-op thread, the worker's session options (``jizhi.graph.session``)::

    python -m jizhi.tools.structbench bench [--users 8] [--candidates 100,500,1000]
                                            [--repeats 7] [--seed 0]
    python -m jizhi.tools.structbench report MODEL.onnx [MODEL.onnx ...] [--candidates 500]

``bench`` times ``unstructure(model)`` against ``structure(model, ...)``
with every option (and, with both splits, the item-only part read from a
table of 100,000 items, as stage option ``item_cache`` serves it), for the
demo model and the DLRM (``jizhi.tools.dlrm``, D = 64, 8 user and 8 item
fields), and prints medians, pairs/s, ratios and the input bytes fed per
request. ``report`` prints, per model, what ``structure`` moves
(``StructureReport.summary``: the layers and interactions split, those left
per pair by name) and the MatMul/Gemm FLOPs per pair at ``--candidates``
candidates per user of the per-pair graph (``unstructure``), the structured
graph, the structured graph with its item-only part read from the item table
(the serving graph of ``split_items``) and the analytic floor
(jizhi/graph/floor.py: only the work that depends on both a user and an item
tensor). The pass itself: jizhi/graph/structured.py.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx

from jizhi.graph.floor import floor
from jizhi.graph.flops import flops
from jizhi.graph.itemside import split_items
from jizhi.graph.proto import USER_INDEX, USER_INPUTS, static_dims
from jizhi.graph.session import model_session
from jizhi.graph.structured import random_inputs, structure, unstructure
from jizhi.tools import demo, dlrm

_OPTIONS = (
    ("structure(split_layers, split_interactions)", dict(split_layers=True, split_interactions=True)),
    ("structure(split_layers)", dict(split_layers=True, split_interactions=False)),
    ("structure(split_interactions)", dict(split_layers=False, split_interactions=True)),
    ("structure()", dict(split_layers=False, split_interactions=False)),
)


def _reference_models(seed):
    f_user = sum(1 for f in demo._fields(1) if f.side == "user")
    f_item = len(demo._fields(1)) - f_user
    return {
        "demo": demo._dense_model(demo._dense_weights(seed), f_user, f_item),
        "dlrm": dlrm.build(seed, 64, 8, 8),
    }


def _input_bytes(model, candidates):
    """(naive, bundle): input bytes per request when the pipeline broadcasts the
    user tensors per pair, and in bundle form (U-row user tensors + user_index)."""
    user_row, item_row = 0, 0
    for value_info in model.graph.input:
        dims = static_dims(value_info)
        row = 4 * int(np.prod(dims[1:])) if value_info.name != USER_INDEX else 0
        if value_info.name in USER_INPUTS:
            user_row += row
        elif value_info.name != USER_INDEX:
            item_row += row
    naive = candidates * (user_row + item_row)
    bundle = user_row + candidates * (item_row + 8)
    return naive, bundle


def _time_runs(run, loops):
    start = time.perf_counter()
    for _ in range(loops):
        run()
    return (time.perf_counter() - start) / loops


def _loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def bench(users=8, candidates=(100, 500, 1000), repeats=7, seed=0, out=sys.stdout):
    """Time naive vs structured models (module docstring); print a table to ``out``.

    Every variant is timed ``repeats`` times, interleaved with the others,
    each time over enough runs for about 50 ms; the median run time is
    reported. Candidates are grouped by user, as the pipeline sends them.
    """
    print(f"# structured features bench, {time.strftime('%Y-%m-%d %H:%M:%S')}: U={users} users per batch, "
          f"repeats={repeats}, seed={seed}, {os.cpu_count()} cpus, loadavg {_loadavg()}", file=out)
    for model_name, model in _reference_models(seed).items():
        naive = unstructure(model)
        variants = [("unstructure (naive)", naive, flops(naive))]
        if model_name == "demo":
            variants.append(("as shipped (demo.py)", model, flops(model)))
        reports = []
        for label, options in _OPTIONS:
            structured_model, report = structure(model, **options)
            variants.append((label, structured_model, report.flops_after))
            reports.append(report)
        # Both splits, and the item-only part read from a table of 100,000 items (jizhi/graph/itemside.py,
        # stage option item_cache): timed with the gather of each candidate's row.
        split = split_items(structure(model)[0])
        if split is not None:
            variants.append(("both + item table (item_cache)", split, flops(split.serving)))
        print(f"\n## {model_name}\n{reports[0].summary(500)}", file=out)
        sessions = [model_session(m if isinstance(m, onnx.ModelProto) else m.serving) for _, m, _ in variants]
        tables = None
        if split is not None:
            names = [name for name, _ in split.frontier]
            table_items = random_inputs(model, 1, 100_000, seed + 1)["item_emb"]
            tables = dict(zip(names, model_session(split.items).run(names, {"item_emb": table_items})))
        for c in candidates:
            pairs = users * c
            feeds = random_inputs(model, users, pairs, seed, np.repeat(np.arange(users, dtype=np.int64), c))
            rows = np.random.default_rng(seed).integers(0, 100_000, size=pairs)
            runs = []
            for (_, m, _), session in zip(variants, sessions):
                if isinstance(m, onnx.ModelProto):
                    runs.append(lambda session=session: session.run(None, feeds))
                    continue
                wanted = {i.name for i in session.get_inputs()}
                base = {k: v for k, v in feeds.items() if k in wanted}

                def run(session=session, base=base):
                    return session.run(None, {**base, **{n: np.take(t, rows, axis=0) for n, t in tables.items()}})
                runs.append(run)
            loops = []
            for run in runs:
                _time_runs(run, 2)
                loops.append(max(1, int(0.05 / max(_time_runs(run, 3), 1e-6))))
            times = [[] for _ in runs]
            for _ in range(repeats):
                for k, run in enumerate(runs):
                    times[k].append(_time_runs(run, loops[k]))
            medians = [statistics.median(t) for t in times]
            naive_bytes, bundle_bytes = _input_bytes(model, c)
            print(f"\n{model_name}, {users} x {c} candidates (P={pairs}), loadavg {_loadavg()}; input bytes per "
                  f"request: {naive_bytes:,} user tensors broadcast per pair, {bundle_bytes:,} bundle form "
                  f"({naive_bytes / bundle_bytes:.2f}x)", file=out)
            print(f"{'variant':<46} {'ms/batch':>9} {'us/pair':>8} {'pairs/s':>11} {'x naive':>8} "
                  f"{'kFLOP/pair':>10}", file=out)
            for (label, _, f), median in zip(variants, medians):
                print(f"{label:<46} {median * 1e3:9.3f} {median * 1e6 / pairs:8.3f} {pairs / median:11,.0f} "
                      f"{medians[0] / median:8.2f} {f.at(c) / 1e3:10.1f}", file=out)


def figures(model, candidates=500):
    """``(StructureReport, ItemSplit or None, {figure: FLOPs per pair})`` of one bundle-form model: MatMul/Gemm
    FLOPs per pair at ``candidates`` candidates per user of the per-pair graph (``per_pair``), the structured
    graph (``structured``), the structured graph with the item table (``items``: None without one) and the
    analytic floor (``floor``)."""
    structured_model, summary = structure(model)
    split = split_items(structured_model)
    return summary, split, {"per_pair": flops(unstructure(model)).at(candidates),
                            "structured": summary.flops_after.at(candidates),
                            "items": flops(split.serving).at(candidates) if split is not None else None,
                            "floor": floor(model).per_pair}


def report(model, candidates=500, label="model"):
    """The ``report`` command's text for one bundle-form model (module docstring)."""
    summary, split, values = figures(model, candidates)
    rows = [("per-pair graph (unstructure)", values["per_pair"]), ("structured", values["structured"]),
            ("structured + item table", values["items"]), ("floor (user x item work only)", values["floor"])]
    lines = [f"## {label}", summary.summary(candidates),
             f"item table: {', '.join(split.layers) or 'no layer split'}; {split.floats_per_item} floats per item"
             if split is not None else "item table: none (no item-only MatMul/Gemm work)",
             f"MatMul/Gemm FLOPs per pair at {candidates} candidates:"]
    for name, value in rows:
        lines.append(f"  {name:<32} " + ("-" if value is None else f"{value:12,.0f}"))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jizhi.tools.structbench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("bench", help="time naive vs structured reference models")
    b.add_argument("--users", type=int, default=8)
    b.add_argument("--candidates", default="100,500,1000", help="comma-separated candidates per user")
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--seed", type=int, default=0)
    r = commands.add_parser("report", help="print what structure() moves in ONNX models and their FLOPs per pair")
    r.add_argument("model", nargs="+")
    r.add_argument("--candidates", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench(args.users, tuple(int(c) for c in args.candidates.split(",")), args.repeats, args.seed)
    else:
        for path in args.model:
            print(report(onnx.load(path), args.candidates, label=path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
