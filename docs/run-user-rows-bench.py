"""docs/benchmarks.md, "User rows on Redis": the Redis user-feature path against the snapshot path.

One jizhid serves three pipelines on the demo bundle, each etc/pipelines/demo.toml (fused, pool 2, batch 8,
`batch_wait_ms` 3) under another name, differing only in where the reader takes a user's row:

* `snapshot`: the profile snapshot (memory maps), as shipped;
* `rows`: `user_rows = "redis://.../demo-users"` with the defaults (`ttl_ms` 1,000: a user's row is kept in the
  worker's local cache for a second);
* `rows_nocache`: the same with `ttl_ms=0`: every batch reads its users from Redis (one pipelined MGET per
  master).

The Redis Cluster (3 masters, no replicas, on loopback) is started by the script (jizhi/tools/redis_local.py)
and `jizhictl profiles push` loads the bundle's users into it. Load: the demo trace (each request's user drawn
uniformly from the bundle's users, N = 500 candidates) at a fixed `--rate`, open loop (`jizhictl bench --rates R
--cpu`), a `--warm` point on each pipeline first, then `--rounds` alternating rounds of `--duration` s (the
machine drifts between points minutes apart: alternating puts the drift into every pipeline alike). Reported per
pipeline, medians of the rounds: server CPU per request (every process of the run, from /proc), p50 and p99;
and the user rows' own figures from `jizhictl stats` (users read, local-cache hits, degraded). Writes
OUT/results.json and prints a markdown table.

    python docs/run-user-rows-bench.py --out /tmp/jizhi-userrows [--bundle MODELS/demo/1 --trace TRACE.npz]
                                       [--rate 200] [--duration 20] [--rounds 3] [--warm 20]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from jizhi.tools.redis_local import LocalCluster, free_port_block
from jizhi.tools.testbed import demo_inputs, stop_session, wait_for_hot_tiers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
PIPELINES = ("snapshot", "rows", "rows_nocache")


def jizhictl(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), *args], capture_output=True,
                          text=True, check=True).stdout


def pipeline_files(out, url):
    base = open(os.path.join(ROOT, "etc", "pipelines", "demo.toml")).read()
    files = []
    for name in PIPELINES:
        text = re.sub(r'(?m)^name = "demo"', f'name = "{name}"', base, count=1)
        if name != "snapshot":
            rows = url + ("?ttl_ms=0" if name == "rows_nocache" else "")
            text = text.replace('processor = "data_reader"\n', f'processor = "data_reader"\nuser_rows = "{rows}"\n')
        path = os.path.join(out, f"{name}.toml")
        with open(path, "w") as f:
            f.write(text)
        files.append(path)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundle", default=None, help="a demo version directory (default: jizhictl demo init in OUT)")
    ap.add_argument("--trace", default=None, help="its trace (default: the one demo init writes)")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=float, default=20.0)
    ap.add_argument("--port", type=int, default=5781)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    args.bundle, args.trace = demo_inputs(out, args.bundle, args.trace)
    shutil.rmtree(os.path.join(out, "redis"), ignore_errors=True)
    cluster = LocalCluster(os.path.join(out, "redis"), base_port=free_port_block(3), replicas=0)
    cluster.start()
    daemon = None
    try:
        url = f"{cluster.url}/demo-users"
        t0 = time.monotonic()
        jizhictl("profiles", "push", "--model", args.bundle, url, "--quiet")
        push_s = time.monotonic() - t0
        files = pipeline_files(out, url)
        work = os.path.join(out, "run-work")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        config = os.path.join(work, "jizhi.toml")
        with open(config, "w") as f:
            f.write('[metrics]\nlisten = ""\n')
        run_dir = os.path.join(work, "run")
        endpoint = f"tcp://127.0.0.1:{args.port}"
        log_path = os.path.join(work, "jizhid.log")
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "jizhid"), "--config", config,
                                       "--models", os.path.dirname(os.path.dirname(args.bundle)), "--instance",
                                       "urbench", "--frontend", endpoint, "--pipelines", ",".join(files),
                                       "--run-dir", run_dir], stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                      start_new_session=True)
        subprocess.run([sys.executable, "-m", "jizhi.client", "--wait-ready", endpoint], check=True, timeout=300)
        if not wait_for_hot_tiers(log_path, len(files)):
            print("warning: not every hot tier was reported built; measuring anyway", flush=True)

        def point(pipeline, duration, tag):
            path = os.path.join(work, f"{pipeline}-{tag}.json")
            subprocess.run([sys.executable, "-m", "jizhi.tools.bench", "--endpoint", endpoint, "--trace", args.trace,
                            "--pipeline", pipeline, "--rates", str(args.rate), "--duration", str(duration),
                            "--warmup", "0", "--slo-ms", "50", "--cpu", "--run-dir", run_dir, "--json", path,
                            "--quiet", "--allow-repeat"], check=True, cwd=work)
            return json.load(open(path))["runs"][0]["points"][0]

        for p in PIPELINES:
            point(p, args.warm, "warm")
        before = json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"]
        rounds = {p: [] for p in PIPELINES}
        for k in range(args.rounds):
            for p in PIPELINES:
                pt = point(p, args.duration, f"round{k}")
                rounds[p].append({"cpu_us_per_request": (pt.get("cpu") or {}).get("server_us_per_request"),
                                  "p50_ms": pt.get("p50_ms"), "p99_ms": pt.get("p99_ms"), "ok": pt.get("ok"),
                                  "sent": pt.get("sent")})
                print(f"round {k + 1} {p}: server CPU {rounds[p][-1]['cpu_us_per_request']:,.0f} us/request, "
                      f"p99 {pt.get('p99_ms'):.1f} ms", flush=True)
        after = json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"]
    finally:
        if daemon is not None:
            stop_session(daemon)
        cluster.stop()
    results = {"rate": args.rate, "duration": args.duration, "rounds": args.rounds, "push_s": round(push_s, 2),
               "git": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pipelines": {}}
    for p in PIPELINES:
        rows_after = (after.get(p) or {}).get("user_rows") or {}
        rows_before = (before.get(p) or {}).get("user_rows") or {}
        delta = {k: rows_after.get(k, 0) - rows_before.get(k, 0) for k in ("read", "cache_hits", "degraded")}
        results["pipelines"][p] = {
            "cpu_us_per_request": float(np.median([r["cpu_us_per_request"] for r in rounds[p]])),
            "p50_ms": float(np.median([r["p50_ms"] for r in rounds[p]])),
            "p99_ms": float(np.median([r["p99_ms"] for r in rounds[p]])),
            "answered": sum(r["ok"] for r in rounds[p]), "sent": sum(r["sent"] for r in rounds[p]),
            "user_rows": delta, "rounds": rounds[p]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    base = results["pipelines"]["snapshot"]
    print(f"\n{args.rate:g} requests/s of N = 500, {args.rounds} alternating rounds of {args.duration:g} s, "
          f"medians; commit {results['git']}, {results['date']}; push of the users {push_s:.1f} s\n")
    print("| pipeline | server CPU us/request | vs snapshot | p50 ms | p99 ms | vs snapshot | answered | users read "
          "from Redis (local cache hits) | degraded |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in PIPELINES:
        r = results["pipelines"][p]
        u = r["user_rows"]
        print(f"| `{p}` | {r['cpu_us_per_request']:,.0f} | {r['cpu_us_per_request'] / base['cpu_us_per_request']:.3f}x "
              f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_ms'] / base['p99_ms']:.2f}x | "
              f"{r['answered']:,}/{r['sent']:,} | {u['read']:,} ({u['cache_hits']:,}) | {u['degraded']:,} |")


if __name__ == "__main__":
    main()
