"""docs/benchmarks.md, "The CPU a request spends around the model (issue 20)": one model, one run.

One jizhid serves the model's four pipelines (fused, pool 2, batch 8, `batch_wait_ms` 3):

* `per_pair`: structured features off (every stage per pair, as a generic server does);
* `structured`: on (the user part once per request);
* `items`: on, with the item part once per version: the cube stage's `item_rows` (each item's pooled
  embeddings) and the dnn stage's `item_cache` (the item-only part of the graph);
* `legacy`: jizhi's LEGACY pipeline (one monolithic stage, one request at a time, per pair).

Then, in the same run: the CPU account of each pipeline at one offered rate (`jizhictl bench --rate R
--cpu`: us per answered request by process, thread and phase), the max pairs/s of each at p99 <= 50 ms
(`--find-max --cpu`), and the in-process ceilings of the same model (`jizhictl bench --ceiling
--ceiling-mode per_pair,structured,items`, one pinned process per core, closed loop).

    python docs/run-cost-account.py --bundle MODELS/NAME/VERSION --out /tmp/jza [--rate 200] [--duration 20]
                                    [--pipelines per_pair,structured,items,legacy] [--skip-max] [--skip-ceiling]

The bundle's model directory is served read-only. Writes OUT/results.json and prints its markdown tables
(again with `--summarize OUT/results.json`).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from jizhi.pipeline import Pipeline
from jizhi.tools.ceiling import mode_pipeline
from jizhi.tools.testbed import stop_session, wait_for_hot_tiers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

PIPELINES = ("per_pair", "structured", "items", "legacy")


def pipeline_text(name, model):
    """The pipeline file ``name`` for ``model`` (module docstring): a ceiling mode's fused pipeline
    (jizhi/tools/ceiling.py, ``mode_pipeline``), served with the shipped plan's pool, batch and wait."""
    if name == "legacy":
        return Pipeline("legacy", model).stage("legacy", "legacy_scorer", pool=2, batch=1).toml()
    return mode_pipeline(name, model, name, pool=2, batch=8, batch_wait_ms=3).toml()


def bench(args, out_json, cwd):
    cmd = [sys.executable, "-m", "jizhi.tools.bench", *args, "--json", out_json, "--quiet"]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)
    return json.load(open(out_json))


def _account_rows(point, label):
    """Markdown rows of one point's CPU account: one per process kind of its pipeline, the generator."""
    c = point.get("cpu") or {}
    rows = []
    for kind, e in (c.get("account") or {}).items():
        if "/" in kind and not kind.startswith(point["pipeline"] + "/"):
            continue
        parts = e["parts"]
        phases = ", ".join(f"{k} {v:,.0f}" for k, v in (e.get("phases") or {}).items())
        rows.append(f"| {label} | {kind} | {e['us']:,.0f} | {parts.get('main', 0):,.0f}"
                    f"{' (' + phases + ')' if phases else ''} | {parts.get('zmq_io', 0):,.0f} | "
                    f"{parts.get('other_threads', 0):,.0f} |")
    if c:
        rows.append(f"| {label} | load generator | {c['generator_us_per_request']:,.0f} | | | |")
        rows.append(f"| {label} | **total** | **{c['total_us_per_request']:,.0f}** | | | |")
    return rows


def summarize(results, out=print):
    """The markdown tables of a run (docs/benchmarks.md)."""
    ceilings = {}
    for c in (results.get("ceiling") or {}).get("ceilings") or [(results.get("ceiling") or {}).get("ceiling")]:
        if c:
            ceilings[c.get("mode", "structured")] = c
    if ceilings:
        out("| in-process ceiling | pairs/s | requests/s | p99 | CPU us/request | by stage (us/request) |")
        out("|---|---:|---:|---:|---:|---|")
        for mode, c in ceilings.items():
            stages = ", ".join(f"{k} {v:,.0f}" for k, v in c["stage_us_per_request"].items())
            out(f"| {mode} | {c['pairs_s']:,.0f} | {c['rps']:,.1f} | {c['p99_ms']} ms | "
                f"{c['cpu_us_per_request']:,.0f} | {stages} |")
        out("")
    for key, title in (("account", "at the same offered rate"), ("max", "at each pipeline's max")):
        runs = (results.get(key) or {}).get("runs") or []
        if not runs:
            continue
        out(f"CPU account {title}, us per answered request:")
        out("")
        out("| pipeline, point | process | total | main thread (phases) | ZeroMQ I/O | other threads |")
        out("|---|---|---:|---|---:|---:|")
        for r in runs:
            p = r.get("max") if key == "max" else (r["points"][0] if r["points"] else None)
            if p:
                label = f"{r['pipeline']} @ {p['offered_rps']:g}/s (p99 {p['p99_ms']} ms)"
                for row in _account_rows(p, label):
                    out(row)
        out("")
    runs = (results.get("max") or {}).get("runs") or []
    if runs:
        legacy = next((r["max"]["goodput_pairs_s"] for r in runs if r["pipeline"] == "legacy" and r["max"]), None)
        out("| pipeline | max pairs/s (p99 <= 50 ms) | p99 | / per-pair ceiling | / structured ceiling | "
            "/ items ceiling | / legacy |")
        out("|---|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            m = r["max"]
            if not m:
                out(f"| {r['pipeline']} | no passing point | | | | | |")
                continue
            g = m["goodput_pairs_s"]

            def ratio(base):
                return f"{g / base:.2f}x" if base else "-"
            out(f"| {r['pipeline']} | {g:,.0f} | {m['p99_ms']} ms | "
                f"{ratio(ceilings.get('per_pair', {}).get('pairs_s'))} | "
                f"{ratio(ceilings.get('structured', {}).get('pairs_s'))} | "
                f"{ratio(ceilings.get('items', {}).get('pairs_s'))} | {ratio(legacy)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="the model's version directory MODELS/NAME/VERSION (required)")
    parser.add_argument("--out", help="a directory for the run's files (required)")
    parser.add_argument("--trace", help="a trace of the model (default: 20,000 requests x 500 generated)")
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests/s of the account points")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--ceiling-batch", type=int, default=8, help="requests per ceiling call (jizhi's batch)")
    parser.add_argument("--skip-max", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--port", type=int, default=5597)
    parser.add_argument("--summarize", metavar="RESULTS", help="only print the tables of a run's results.json")
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            summarize(json.load(f))
        return
    if not args.bundle or not args.out:
        parser.error("--bundle and --out are required (or --summarize RESULTS)")
    bundle = os.path.realpath(args.bundle)
    model = os.path.basename(os.path.dirname(bundle))
    models = os.path.dirname(os.path.dirname(bundle))
    out = os.path.realpath(args.out)
    os.makedirs(out, exist_ok=True)
    names = [p for p in args.pipelines.split(",") if p]
    trace = args.trace or os.path.join(out, "trace.npz")
    if not args.trace:
        from jizhi.tools.demo import generate_trace
        generate_trace(bundle, trace, requests=20000, candidates=500, progress=False)
    files = []
    for name in names:
        path = os.path.join(out, name + ".toml")
        with open(path, "w") as f:
            f.write(pipeline_text(name, model))
        files.append(path)
    config = os.path.join(out, "jizhi.toml")
    with open(config, "w") as f:
        f.write('[metrics]\nlisten = ""\n')
    run_dir = os.path.join(out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    endpoint = f"tcp://127.0.0.1:{args.port}"
    log_path = os.path.join(out, "jizhid.log")
    results = {"bundle": bundle, "model": model, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "git": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}
    if not args.skip_ceiling:
        # First, while no jizhid runs: the ceilings (they take every core).
        r = bench(["--ceiling", "--bundle", bundle, "--trace", trace, "--ceiling-mode", "per_pair,structured,items",
                   "--batch", str(args.ceiling_batch), "--duration", str(args.duration), "--warmup", "3"],
                  os.path.join(out, "ceiling.json"), out)
        results["ceiling"] = r
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "jizhid"), "--config", config,
                                   "--models", models, "--instance", "costacct", "--frontend", endpoint,
                                   "--pipelines", ",".join(files), "--run-dir", run_dir],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=out, start_new_session=True)
    try:
        subprocess.run([sys.executable, "-m", "jizhi.client", "--wait-ready", endpoint], check=True, timeout=300,
                       cwd=out)
        if not wait_for_hot_tiers(log_path, len([p for p in names if p != "legacy"])):
            print("warning: not every hot tier was reported built; measuring anyway", flush=True)
        common = ["--endpoint", endpoint, "--trace", trace, "--cpu", "--run-dir", run_dir, "--slo-ms", "50",
                  "--warmup", "3", "--duration", str(args.duration)]
        results["account"] = bench([*common, "--pipeline", ",".join(names), "--rate", str(args.rate)],
                                   os.path.join(out, "account.json"), out)
        if not args.skip_max:
            results["max"] = bench([*common, "--pipeline", ",".join(names), "--find-max", "--start-rate", "100",
                                    "--precision", "0.05", "--max-points", "9",
                                    # a shared machine: wait for it to be quiet, re-run a point others disturbed
                                    "--max-other-cores", "0.3"],
                                   os.path.join(out, "max.json"), out)
    finally:
        stop_session(daemon)
    results["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {os.path.join(out, 'results.json')}")
    summarize(results)


if __name__ == "__main__":
    main()
