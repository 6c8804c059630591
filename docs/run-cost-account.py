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

    python docs/run-cost-account.py --bundle MODELS/NAME/VERSION --out /tmp/jza [--rate 300] [--duration 20]
                                    [--pipelines per_pair,structured,items,legacy] [--skip-max] [--skip-ceiling]

The bundle's model directory is served read-only. Prints markdown tables and writes OUT/results.json.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

PIPELINES = ("per_pair", "structured", "items", "legacy")


def pipeline_text(name, model):
    """The pipeline file ``name`` for ``model`` (module docstring)."""
    if name == "legacy":
        return (f'name = "legacy"\nmodel = "{model}"\nversion = "latest"\non_unknown = "default"\n\n'
                '[[stage]]\nname = "legacy"\nprocessor = "legacy_scorer"\npool = 2\nbatch = 1\n')
    lines = [f'name = "{name}"', f'model = "{model}"', 'version = "latest"', 'on_unknown = "default"']
    if name == "per_pair":
        lines.append("structured = false")
    stages = (("reader", "data_reader", []), ("features", "feature_processor", []),
              ("cube", "cube_accessor", ["item_rows = true"] if name == "items" else []),
              ("dnn", "model_inference", ["item_cache = true"] if name == "items" else []),
              ("rank", "ranker", []))
    for i, (stage, processor, options) in enumerate(stages):
        lines += ["", "[[stage]]", f'name = "{stage}"', f'processor = "{processor}"', *options]
        if i + 1 < len(stages):
            lines.append(f'next = ["{stages[i + 1][0]}"]')
    lines += ["", "[[fuse]]", 'name = "scorer"', 'stages = ["reader", "features", "cube", "dnn", "rank"]',
              "pool = 2", "batch = 8", "batch_wait_ms = 3"]
    return "\n".join(lines) + "\n"


def bench(args, out_json, cwd):
    cmd = [sys.executable, "-m", "jizhi.tools.bench", *args, "--json", out_json, "--quiet"]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)
    return json.load(open(out_json))


def wait_for_tiers(log_path, pipelines, timeout_s=300):
    """jizhid says ready before the hot tiers are built: wait for one per pipeline with a cube stage."""
    want = len([p for p in pipelines if p != "legacy"])
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with open(log_path) as f:
            if sum("hot tier generation 1:" in line for line in f) >= want:
                return
        time.sleep(1)
    print("warning: not every hot tier was reported built; measuring anyway", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="the model's version directory MODELS/NAME/VERSION")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trace", help="a trace of the model (default: 20,000 requests x 500 generated)")
    parser.add_argument("--rate", type=float, default=300.0, help="offered requests/s of the account points")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--ceiling-batch", type=int, default=8, help="requests per ceiling call (jizhi's batch)")
    parser.add_argument("--skip-max", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--port", type=int, default=5597)
    args = parser.parse_args()
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
        wait_for_tiers(log_path, names)
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
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
    results["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
