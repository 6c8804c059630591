"""docs/benchmarks.md, "Real models": one row per fixture (model family x exporter x layout).

Each fixture is built from real PyTorch code (tests/torch_models.py, size BENCH: issue 20's DLRM shape, 16
sparse fields, dim 32, bottom MLP 13-64-32, top MLP 256-128-1; DCN-v2 on the same fields), exported by
torch.onnx.export and imported by `jizhictl import` (1,000 users, 10,000 items, generated profiles). Per
fixture: the import's wall time, max |jizhi - PyTorch| over 800 fresh pairs (jizhi's stage processors against
the PyTorch module on the same raw ids), MatMul/Gemm FLOPs per pair at 500 candidates (the per-pair graph,
structured, structured + item table, the analytic floor: `python -m jizhi.tools.structbench report`), and,
with --throughput, the max pairs/s at p99 <= 50 ms with N = 500 of three pipelines served by one jizhid in
one run: structured features off, on, and on with the item table (`item_cache = true`).

    python docs/run-real-models-bench.py --out /tmp/jizhi-real [--only dlrm_sum] [--throughput dlrm_sum]
                                         [--duration 8]

Needs the test extra (torch). Run from anywhere; it puts tests/ on sys.path. Prints a markdown table and
writes OUT/results.json.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
warnings.filterwarnings("ignore")

import logging  # noqa: E402

logging.disable(logging.WARNING)    # torch.onnx.export's notes

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import torch_models as tm  # noqa: E402
from jizhi.tools.dlrm import pipeline_text  # noqa: E402
from jizhi.tools.demo import generate_trace  # noqa: E402
from jizhi.tools.importer import import_model  # noqa: E402
from jizhi.tools.structbench import figures  # noqa: E402
from jizhi.tools.testbed import stop_session  # noqa: E402

CANDIDATES = 500
PIPELINES = (("per_pair", False, False), ("structured", True, False), ("items", True, True))


def flops_table(model, candidates):
    """MatMul/Gemm FLOPs per pair at ``candidates`` per user (`python -m jizhi.tools.structbench report`'s
    figures; a model without an item table counts its structured graph there), and what was split."""
    report, _, values = figures(model, candidates)
    if values["items"] is None:
        values["items"] = values["structured"]
    return {**values, "layers_split": len(report.split_layers), "interactions_split": len(report.split_interactions)}


def pipelines(directory):
    """The three pipeline files of a fixture's jizhid: structured off, on, on + item table."""
    paths = []
    for name, structured, items in PIPELINES:
        text = pipeline_text(name, structured=structured, pool=2)
        if items:
            text = text.replace('processor = "model_inference"\n',
                                'processor = "model_inference"\nitem_cache = true\n')
        path = os.path.join(directory, name + ".toml")
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return paths


def throughput(work, version, duration):
    """{pipeline: max requests/s} of one jizhid serving the three pipelines, find-max each in turn."""
    models = os.path.dirname(os.path.dirname(version))
    trace = os.path.join(work, "trace.npz")
    generate_trace(version, trace, requests=20000, candidates=CANDIDATES, progress=False)
    files = pipelines(work)
    config = os.path.join(work, "jizhi.toml")
    with open(config, "w") as f:
        f.write('[metrics]\nlisten = ""\n')
    run_dir = os.path.join(work, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    endpoint = "tcp://127.0.0.1:5598"
    log = open(os.path.join(work, "jizhid.log"), "w")
    daemon = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "bin", "jizhid"), "--config", config, "--models", models,
                               "--instance", "realbench", "--frontend", endpoint, "--pipelines", ",".join(files),
                               "--run-dir", run_dir], stdout=log, stderr=subprocess.STDOUT, cwd=work,
                              start_new_session=True)
    try:
        subprocess.run([sys.executable, "-m", "jizhi.client", "--wait-ready", endpoint], check=True, timeout=300,
                       cwd=work)
        # The item tables and hot tiers build after ready: let them finish before the first point.
        time.sleep(20)
        out = os.path.join(work, "bench.json")
        subprocess.run([sys.executable, "-m", "jizhi.tools.bench", "--endpoint", endpoint, "--trace", trace,
                        "--pipeline", ",".join(name for name, _, _ in PIPELINES), "--find-max", "--start-rate", "100",
                        "--duration", str(duration), "--warmup", "2", "--slo-ms", "50", "--max-points", "8",
                        # a shared machine: wait for it to be quiet, re-run a point others disturbed
                        "--cpu", "--run-dir", run_dir, "--max-other-cores", "0.3",
                        "--json", out, "--quiet"], check=True, cwd=work)
        runs = json.load(open(out))["runs"]
        return {r["pipeline"]: (r["max"] or {}).get("offered_rps", 0.0) for r in runs}
    finally:
        stop_session(daemon)
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated substrings of fixture labels to run")
    parser.add_argument("--throughput", default="", help="comma-separated substrings: fixtures to load-test")
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    loaded = [s for s in args.throughput.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} {os.cpu_count()} cores, "
          f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    results = []
    for family, exporter, layout in tm.combinations():
        label = f"{family}/{exporter}/{layout}"
        if only and not any(s in label for s in only):
            continue
        work = os.path.join(args.out, label.replace("/", "_"))
        shutil.rmtree(work, ignore_errors=True)
        fixture = tm.make(family, exporter, layout, os.path.join(work, "export"), size=tm.BENCH, seed=1)
        version = os.path.join(work, "models", "dlrm", "1")
        row = {"fixture": label, "bytes": os.path.getsize(fixture.model_path)}
        started = time.perf_counter()
        try:
            import_model(fixture.model_path, fixture.fields_path, version, name="dlrm", progress=False,
                         log=lambda *a: None)
        except Exception as e:
            row.update(imports=False, error=str(e))
            results.append(row)
            print(label, "REFUSED", e, flush=True)
            continue
        row["import_s"] = time.perf_counter() - started
        jizhi, torch_scores = tm.score_pairs(fixture, version, requests=8, per=100)
        row["max_diff"] = float(np.max(np.abs(jizhi.astype(np.float64) - torch_scores)))
        row.update(flops_table(onnx.load(os.path.join(version, "dense.onnx")), CANDIDATES))
        if any(s in label for s in loaded):
            row["rps"] = throughput(work, version, args.duration)
        row["imports"] = True
        results.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| fixture | imports | max abs diff vs PyTorch | import s | FLOPs/pair per-pair | structured | "
          "+ item table | floor | split / floor | pairs/s off | on | on + items | gain (items/off) | "
          "FLOP ratio (off / items) | gain / FLOP ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if not r["imports"]:
            print(f"| {r['fixture']} | no: {r['error']} |" + " |" * 13)
            continue
        f = r
        cells = [r["fixture"], "yes", f"{r['max_diff']:.1e}", f"{r['import_s']:.1f}", f"{f['per_pair']:,.0f}",
                 f"{f['structured']:,.0f}", f"{f['items']:,.0f}", f"{f['floor']:,.0f}",
                 f"{f['items'] / f['floor']:.2f}" if f["floor"] else "-"]
        if "rps" in r:
            off, on, items = (r["rps"].get(name, 0.0) * CANDIDATES for name, _, _ in PIPELINES)
            gain = items / off if off else float("nan")
            ratio = f["per_pair"] / f["items"]
            cells += [f"{off:,.0f}", f"{on:,.0f}", f"{items:,.0f}", f"{gain:.2f}", f"{ratio:.2f}",
                      f"{gain / ratio:.2f}"]
        else:
            cells += ["-"] * 6
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
