"""docs/benchmarks.md, "The query cache pays for itself or steps aside (issue 20)": the query cache on against off.

One jizhid per trace serves two pipelines on the demo bundle, both fused (pool 2, batch 8, `batch_wait_ms` 3):
`demo_cached` (etc/pipelines/demo_cached.toml: the query cache in front, default settings: `qcache.bypass =
"auto"`) and `uncached`, the same file without its `query_cache` stage, so that the cache is the only difference
(etc/pipelines/demo.toml lacks demo_cached's `item_cache = true`). Two traces of N = 500 candidates per request:

* `little` (little repetition): the demo's trace (jizhi/tools/demo, `generate_trace`): each request's user drawn
  uniformly from the bundle's users, its candidates by Zipf popularity; what repeats, repeats by chance.
* `jizhi` (the JIZHI paper's traffic: about 20 % of candidates repeating within 2 minutes), built from `little`
  with numpy: a request is a user's *return* with probability p: it takes the user of the request d before it
  (d uniform in 1 .. W) and a random `--overlap` (half) of that request's candidates, the rest its own
  candidates from `little`; p is solved for `--repeat` from the share measured on `little`, then corrected
  once from the share measured on the result.

Repetition, as defined and measured on each trace: the share of all candidates whose (user, item) pair was a
candidate of one of the W requests before (W = `--window-requests`, 1,000). Replayed at r requests/s these W
requests span W / r seconds, so the share is "within 2 minutes" at every rate >= W / 120 s (8.3 requests/s
for 1,000), that is at every rate find-max tries, and W requests of 500 candidates fit in the query cache's
default 1 M entries (`qcache.entries`: 2,097 requests' worth). The share anywhere in the trace is printed too.

For each trace and pipeline: `jizhictl bench --find-max --cpu` (p99 <= 50 ms; `--warmup 0`, because the
bench's warm-up replays the previous point's last requests, which would hit the cache and inflate its hit
ratio), then the query cache's hit ratio over the whole run and its workers' last judgement (`jizhictl stats
--json`: cube.demo_cached). Prints a markdown table: trace, pipeline, max pairs/s, p99 at the max, hit ratio,
server CPU us per request at the max, and max pairs/s cached / uncached; then, after each find-max, one point at
`--cpu-rate` (200 requests/s) on the trace with its users relabelled (``relabelled``) for the server's CPU per
request of both pipelines at the same rate (at each one's own max the batches differ: a lower max runs smaller
batches, dearer per request); writes OUT/results.json.

    python docs/run-qcache-bench.py --out /tmp/jizhi-qcache [--duration 15] [--precision 0.1] [--max-points 7]
                                    [--requests 20000] [--traces little,jizhi] [--bundle MODELS/demo/1]
                                    [--extra '[qcache]\\nbypass = "off"\\n'] [--item-part per-candidate]

With the defaults a full run takes about 15 minutes on 2 cores: the bundle and the traces (2 min), two jizhid
starts, four find-max runs of at most 7 points of 15 s.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from jizhi.tools.testbed import stop_session, wait_for_hot_tiers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
CANDIDATES = 500
CACHED, UNCACHED = "demo_cached", "uncached"


def repetition(users, offsets, items, window):
    """(share of candidates whose (user, item) pair was a candidate of one of the ``window`` requests before,
    share whose pair was a candidate of any request before)."""
    q = np.repeat(np.arange(users.shape[0], dtype=np.int64), np.diff(offsets))
    u = users[q]
    order = np.lexsort((q, items, u))       # by user, then item, then request
    u, it, q = u[order], items[order], q[order]
    again = (u[1:] == u[:-1]) & (it[1:] == it[:-1])      # a request's candidates are distinct: q grew
    within = again & (q[1:] - q[:-1] <= window)
    n = max(items.shape[0], 1)
    return int(np.count_nonzero(within)) / n, int(np.count_nonzero(again)) / n


def with_returns(trace, p, window, overlap, seed):
    """``trace`` (users, offsets, items, recall_scores of N candidates each) with returns (module docstring)."""
    users, items, recall = trace["users"].copy(), trace["items"].copy(), trace["recall_scores"].copy()
    n = users.shape[0]
    items, recall = items.reshape(n, CANDIDATES), recall.reshape(n, CANDIDATES)
    rng = np.random.default_rng(seed)
    returns = np.flatnonzero(rng.random(n) < p)
    returns = returns[returns > 0]
    sources = np.maximum(returns - rng.integers(1, window + 1, returns.shape[0]), 0)
    k = int(round(overlap * CANDIDATES))
    # In request order: a source is final before a later request returns to it (a loop over requests, each
    # step numpy over its candidates).
    for q, s in zip(returns.tolist(), sources.tolist()):
        pick = rng.choice(CANDIDATES, k, replace=False)
        again = items[s, pick]
        own = np.flatnonzero(~np.isin(items[q], again))[:CANDIDATES - k]
        items[q] = np.concatenate([again, items[q, own]])
        recall[q] = np.concatenate([recall[s, pick], recall[q, own]])
        users[q] = users[s]
    return {"users": users, "offsets": trace["offsets"], "items": items.reshape(-1), "recall_scores": recall.reshape(-1)}


def relabelled(bundle, path, seed=11):
    """``path`` with every user replaced through one random bijection of the bundle's users, written beside it
    (``<name>-fixed.npz``): the same repetition and the same work, but pairs that the find-max points before
    it never sent, so the fixed-rate point's hits are the trace's own repeats, not the find-max's leftovers."""
    ids = np.load(os.path.join(bundle, "profiles", "users", "ids.npy"))
    perm = np.random.default_rng(seed).permutation(ids.shape[0])
    with np.load(path, allow_pickle=False) as z:
        trace = {k: z[k] for k in z.files}
    rows = np.searchsorted(ids, trace["users"])
    known = (rows < ids.shape[0]) & (ids[np.minimum(rows, ids.shape[0] - 1)] == trace["users"])
    trace["users"] = np.where(known, ids[perm[np.minimum(rows, ids.shape[0] - 1)]], trace["users"])
    fixed = path[:-len(".npz")] + f"-relabelled{seed}.npz"
    np.savez(fixed, **trace)
    return fixed


def make_traces(bundle, out, requests, window, overlap, target, seed=3):
    """{name: (path, (within, anywhere))}: the two traces, written to OUT, and their measured repetition."""
    from jizhi.tools.demo import generate_trace
    little = os.path.join(out, "little.npz")
    if not os.path.exists(little):
        generate_trace(bundle, little, requests=requests, candidates=CANDIDATES, progress=False)
    with np.load(little, allow_pickle=False) as z:
        base = {k: z[k] for k in ("users", "offsets", "items", "recall_scores")}
    r0 = repetition(base["users"], base["offsets"], base["items"], window)
    p = min(1.0, max(0.0, (target - r0[0]) / (overlap * (1.0 - r0[0]))))
    trace = with_returns(base, p, window, overlap, seed)
    r = repetition(trace["users"], trace["offsets"], trace["items"], window)
    if r[0] > r0[0]:        # one correction: the share grows about linearly with p
        p = min(1.0, p * (target - r0[0]) / (r[0] - r0[0]))
        trace = with_returns(base, p, window, overlap, seed)
        r = repetition(trace["users"], trace["offsets"], trace["items"], window)
    path = os.path.join(out, "jizhi.npz")
    np.savez(path, **trace)
    print(f"traces: {requests:,} requests x {CANDIDATES}; repeating within {window:,} requests: little "
          f"{100 * r0[0]:.1f}% (anywhere {100 * r0[1]:.1f}%), jizhi {100 * r[0]:.1f}% (anywhere {100 * r[1]:.1f}%; "
          f"returns p = {p:.3f}, overlap {overlap:g})", flush=True)
    return {"little": (little, r0), "jizhi": (path, r)}


def pipeline_files(out, item_part="once"):
    """demo_cached as shipped, and ``uncached``: the same without its query_cache stage. ``item_part``
    "per-candidate": both without the item part once per version (the cube's ``item_rows``, the dnn's
    ``item_cache``), so a candidate costs what `demo.toml`'s structured pipeline makes it cost."""
    import tomllib
    from jizhi.tomlw import toml_text
    src = os.path.join(ROOT, "etc", "pipelines", "demo_cached.toml")
    with open(src, "rb") as f:
        doc = tomllib.load(f)
    if item_part == "per-candidate":
        for st in doc["stage"]:
            st.pop("item_rows", None)
            st.pop("item_cache", None)
        src = os.path.join(out, CACHED + ".toml")
        with open(src, "w") as f:
            f.write(toml_text(doc))
    cache = [st["name"] for st in doc["stage"] if st["processor"] == "query_cache"]
    doc["name"] = UNCACHED
    doc["stage"] = [st for st in doc["stage"] if st["name"] not in cache]
    for fuse in doc["fuse"]:
        fuse["stages"] = [s for s in fuse["stages"] if s not in cache]
    path = os.path.join(out, UNCACHED + ".toml")
    with open(path, "w") as f:
        f.write(toml_text(doc))
    return [path, src]


def jizhictl(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), *args], capture_output=True, text=True,
                       check=True)
    return r.stdout


def run_trace(args, name, trace, files, out):
    """One jizhid, both pipelines find-max'ed on ``trace``: {pipeline: figures}."""
    work = os.path.join(out, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    config = os.path.join(work, "jizhi.toml")
    with open(config, "w") as f:
        f.write('[metrics]\nlisten = ""\n' + args.extra.encode().decode("unicode_escape"))
    run_dir = os.path.join(work, "run")
    endpoint = f"tcp://127.0.0.1:{args.port}"
    log_path = os.path.join(work, "jizhid.log")
    models = os.path.dirname(os.path.dirname(args.bundle))
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "jizhid"), "--config", config,
                                   "--models", models, "--instance", "qcbench", "--frontend", endpoint,
                                   "--pipelines", ",".join(files), "--run-dir", run_dir],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    out_rows = {}
    try:
        subprocess.run([sys.executable, "-m", "jizhi.client", "--wait-ready", endpoint], check=True, timeout=300,
                       cwd=work)
        if not wait_for_hot_tiers(log_path, len(files)):
            print("warning: not every hot tier was reported built; measuring anyway", flush=True)
        for pipeline in (UNCACHED, CACHED):
            row = out_rows[pipeline] = {"max_pairs_s": None, "p99_ms": None, "cpu_us_per_request": None,
                                        "hit_ratio": None}
            if args.fixed_only:
                continue
            before = json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"][pipeline]
            result = os.path.join(work, f"{pipeline}.json")
            cmd = [sys.executable, "-m", "jizhi.tools.bench", "--endpoint", endpoint, "--trace", trace,
                   "--pipeline", pipeline, "--find-max", "--start-rate", str(args.start_rate),
                   "--precision", str(args.precision), "--max-points", str(args.max_points),
                   "--duration", str(args.duration), "--warmup", "0", "--slo-ms", "50",
                   "--cpu", "--run-dir", run_dir, "--json", result, "--quiet"]
            if args.max_other_cores is not None:
                cmd += ["--max-other-cores", str(args.max_other_cores)]
            print(f"== {name} / {pipeline}", flush=True)
            subprocess.run(cmd, check=True, cwd=work)
            after = json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"][pipeline]
            run = json.load(open(result))["runs"][0]
            best = run.get("max") or {}
            cand = after["qcache_candidates"] - before["qcache_candidates"]
            row.update({"max_pairs_s": best.get("goodput_pairs_s", 0.0), "max_rps": best.get("offered_rps", 0.0),
                        "p99_ms": best.get("p99_ms"), "note": run.get("note"),
                        "cpu_us_per_request": (best.get("cpu") or {}).get("server_us_per_request"),
                        "hit_ratio": (after["qcache_hits"] - before["qcache_hits"]) / cand if cand else None})
        # The same offered rate for both pipelines, alternating (the machine drifts by 10-20 % between points
        # minutes apart: one point each would measure the drift): CPU per request where batches are alike (at
        # each one's own max they are not: a lower max runs smaller batches, dearer per request). Each point
        # replays the trace with its users relabelled anew, so no point hits what an earlier one stored.
        def fixed_point(pipeline, seed, duration, tag):
            path = os.path.join(work, f"{pipeline}-{tag}.json")
            cmd = [sys.executable, "-m", "jizhi.tools.bench", "--endpoint", endpoint, "--trace",
                   relabelled(args.bundle, trace, seed), "--pipeline", pipeline, "--rates", str(args.cpu_rate),
                   "--duration", str(duration), "--warmup", "0", "--slo-ms", "50", "--cpu", "--run-dir", run_dir,
                   "--json", path, "--quiet", "--allow-repeat"]
            if args.max_other_cores is not None:
                cmd += ["--max-other-cores", str(args.max_other_cores)]
            subprocess.run(cmd, check=True, cwd=work)
            return json.load(open(path))["runs"][0]["points"][0]
        print(f"== {name}: {args.cpu_rate:g} requests/s, a {args.fixed_warm:g} s warm-up each (the cache judges "
              f"itself), then {args.rounds} alternating rounds of {args.duration:g} s", flush=True)
        for pipeline in (UNCACHED, CACHED):
            fixed_point(pipeline, 100, args.fixed_warm, "warm")
        before = json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"][CACHED]
        for k in range(args.rounds):
            for pipeline in (UNCACHED, CACHED):
                point = fixed_point(pipeline, 11 + k, args.duration, f"round{k}")
                out_rows[pipeline].setdefault("fixed", []).append(
                    {"cpu_us_per_request": (point.get("cpu") or {}).get("server_us_per_request"),
                     "p99_ms": point.get("p99_ms"), "ok": point.get("ok"), "sent": point.get("sent")})
                print(f"   round {k + 1} {pipeline}: server CPU {out_rows[pipeline]['fixed'][-1]['cpu_us_per_request']:,.0f} "
                      f"us/request, p99 {point.get('p99_ms'):.1f} ms", flush=True)
        after = json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"][CACHED]
        cand = after["qcache_candidates"] - before["qcache_candidates"]
        out_rows[CACHED]["fixed_hit_ratio"] = (after["qcache_hits"] - before["qcache_hits"]) / cand if cand else None
        out_rows[CACHED]["judgement"] = after.get("qcache_workers")
        for pipeline in (UNCACHED, CACHED):
            cpu = [p["cpu_us_per_request"] for p in out_rows[pipeline]["fixed"]]
            out_rows[pipeline]["fixed_rps"] = args.cpu_rate
            out_rows[pipeline]["fixed_cpu_us_per_request"] = float(np.median(cpu))
            out_rows[pipeline]["fixed_p99_ms"] = float(np.median([p["p99_ms"] for p in out_rows[pipeline]["fixed"]]))
        if out_rows[CACHED]["judgement"]:
            from jizhi.ctl.figures import qcache_line
            print(f"   {qcache_line(out_rows[CACHED]['judgement'])}", flush=True)
    finally:
        stop_session(daemon)
    return out_rows


def table(results, traces, window):
    lines = [f"| trace (repeating within {window:,} requests) | pipeline | max pairs/s | p99 at the max | "
             "hit ratio (find-max) | server CPU us/request, fixed rate (median of rounds; each round) | p99, fixed rate "
             "(median) | hit ratio (rounds) | cached / uncached: max, CPU |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for name, rows in results.items():
        label = f"{name} ({100 * traces[name][1][0]:.1f} %)"
        off = rows[UNCACHED]["max_pairs_s"]
        off_cpu = rows[UNCACHED].get("fixed_cpu_us_per_request")
        for pipeline in (UNCACHED, CACHED):
            r = rows[pipeline]
            hit = "-" if r["hit_ratio"] is None else f"{100 * r['hit_ratio']:.1f} %"
            mx = "-" if r["max_pairs_s"] is None else f"{r['max_pairs_s']:,.0f}"
            p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f} ms"
            fixed = r.get("fixed_cpu_us_per_request")
            each = ", ".join(f"{p['cpu_us_per_request']:,.0f}" for p in r.get("fixed", []))
            fixed_text = "-" if fixed is None else f"{fixed:,.0f} @ {r['fixed_rps']:g}/s ({each})"
            fp99 = "-" if r.get("fixed_p99_ms") is None else f"{r['fixed_p99_ms']:.1f} ms"
            fhit = "-" if r.get("fixed_hit_ratio") is None else f"{100 * r['fixed_hit_ratio']:.1f} %"
            ratios = ""
            if pipeline == CACHED:
                ratios = (f"{r['max_pairs_s'] / off:.2f}" if off and r["max_pairs_s"] else "-") + ", " + \
                    (f"{fixed / off_cpu:.2f}" if fixed and off_cpu else "-")
            lines.append(f"| {label} | {pipeline} | {mx} | {p99} | {hit} | {fixed_text} | {fp99} | {fhit} | {ratios} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--bundle", help="the demo bundle's version directory (default: made in OUT/demo)")
    parser.add_argument("--traces", default="little,jizhi", help="which traces to load: little, jizhi or both")
    parser.add_argument("--requests", type=int, default=20000, help="requests per trace (find-max's cap is "
                        "requests / duration per second)")
    parser.add_argument("--window-requests", type=int, default=1000, help="W: a repeat is within this many requests")
    parser.add_argument("--repeat", type=float, default=0.20, help="the jizhi trace's share of repeating candidates")
    parser.add_argument("--overlap", type=float, default=0.5, help="share of a return's candidates seen before")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per point")
    parser.add_argument("--precision", type=float, default=0.1, help="find-max stops within this fraction")
    parser.add_argument("--max-points", type=int, default=7)
    parser.add_argument("--start-rate", type=float, default=100.0)
    parser.add_argument("--max-other-cores", type=float, default=None,
                        help="a shared machine: passed to jizhictl bench (wait for quiet, re-run disturbed points)")
    parser.add_argument("--extra", default="", help="TOML appended to jizhid's config (\\n for new lines)")
    parser.add_argument("--port", type=int, default=5596)
    parser.add_argument("--cpu-rate", type=float, default=200.0,
                        help="the alternating fixed-rate points' rate (requests/s), for the CPU per request")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of fixed-rate points")
    parser.add_argument("--fixed-warm", type=float, default=60.0,
                        help="seconds of each pipeline at the fixed rate before the rounds (the cache judges itself)")
    parser.add_argument("--fixed-only", action="store_true", help="no find-max: only the fixed-rate rounds")
    parser.add_argument("--item-part", choices=("once", "per-candidate"), default="once",
                        help="once: demo_cached as shipped (item_rows, item_cache); per-candidate: both pipelines "
                        "without them (a candidate costs about twice as much: what a hit saves)")
    args = parser.parse_args()
    out = os.path.realpath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} {os.cpu_count()} cores, load "
          f"{open('/proc/loadavg').read().split()[:3]}", flush=True)
    if not args.bundle:
        args.bundle = os.path.join(out, "demo", "models", "demo", "1")
        if not os.path.isdir(args.bundle):
            from jizhi.tools.demo import init_demo
            init_demo(os.path.join(out, "demo"), progress=False)
    args.bundle = os.path.realpath(args.bundle)
    traces = make_traces(args.bundle, out, args.requests, args.window_requests, args.overlap, args.repeat)
    files = pipeline_files(out, args.item_part)
    results = {}
    for name in (t for t in args.traces.split(",") if t):
        results[name] = run_trace(args, name, traces[name][0], files, out)
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"git": git.strip(), "args": vars(args), "minutes": round((time.time() - started) / 60, 1),
                   "repetition": {k: v[1] for k, v in traces.items()}, "results": results}, f, indent=1)
    print()
    print(table(results, traces, args.window_requests))
    print(f"\n({(time.time() - started) / 60:.1f} min; {os.path.join(out, 'results.json')})")


if __name__ == "__main__":
    main()
