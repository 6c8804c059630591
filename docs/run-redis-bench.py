#!/usr/bin/env python
"""The cube on Redis Cluster (issue 8): client CPU per request, and p50/p99 against the local cube.

    .venv/bin/python docs/run-redis-bench.py [--rounds 2] [--duration 20] [--out /tmp/jzb/redis-bench.json]

Needs Debian's redis-server and, for the baseline, redis-py (``pip install -e '.[redis-baseline]'``).
Everything runs on this machine: a local Redis Cluster of 3 masters with 1 replica each
(jizhi.tools.redis_local, loopback ports --base-port..+5, node timeout 2 s; with --netns each node a
separate host in its own network namespace behind a veth link) and one jizhid at a time.

1. Client CPU per request: the distinct signatures of each of the first --client-requests trace
   requests (the real reader and feature stages; ~2,000 keys a request) read straight from the
   cluster, every key remote, for each table-mapping strategy: jizhi's RedisCube (one pipeline of
   slot-grouped MGETs per master, Numba-encoded and parsed) against redis-py's RedisCluster
   ``mget_nonatomic`` (the library's cluster helper: keys grouped by slot, one command per key or
   slot, Python objects per key). Thread CPU time and wall time per request, medians; the values
   read are checked equal.
2. Serving, one jizhid at a time, the demo pipeline (fused, pool 2, batch 8, wait 3 ms), N = 500:
   cube settings ``warm`` (hot tier holds the whole cube, disk cache 10,000 keys), ``small`` (hot
   tier 1 MiB = ~6 % of the cube's keys, disk cache 1,000 keys = ~1 %) and ``cold`` (no hot tier,
   no disk cache: every lookup below the pipeline's dedup goes to the cube). The capacity of the
   LOCAL cube (LMDB) is found first for each setting (highest rate with p99 <= --slo-ms, doubling
   then bisection, shorter points); then at 50 % of it, local and the Redis cube under each strategy
   run alternately, --rounds times, each point a fresh daemon (warmed --warmup s, measured
   --duration s, open loop, Poisson arrivals, latency from the intended send time). Per point: p50,
   p99, errors, lost, shard round trips per request (the cube_accessor's pipelines / requests),
   keys degraded, and the CPU of jizhid and of the redis-server processes per request.

Prints the tables docs/benchmarks.md quotes and writes --out (JSON).
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jizhi.tools.bench import Trace, proc_cpu_s                           # noqa: E402
from jizhi.bundle import Bundle                                     # noqa: E402
from jizhi.cube import redis as R                                   # noqa: E402
from jizhi.cube.push import push                                       # noqa: E402
from jizhi.tools.cubebench import request_key_sets                       # noqa: E402
from jizhi.cube.build import read_all                               # noqa: E402
from jizhi.tools.redis_local import LocalCluster                          # noqa: E402

spec = importlib.util.spec_from_file_location("mm", REPO / "docs" / "run-many-models-bench.py")
mm = importlib.util.module_from_spec(spec)     # its Daemon, run_point and find_capacity
spec.loader.exec_module(mm)

SETTINGS = {   # name: (cube.hot_tier_mb, disk_cache_keys)
    "warm": (512, 10_000),
    "small": (1, 1_000),
    "cold": (0, 0),
}


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def procs_cpu_s(pids):
    """CPU seconds of ``pids`` together (the redis-servers); a process gone counts nothing."""
    return sum((proc_cpu_s(p) or (0.0, 0))[0] for p in pids if p)


def pipeline_text(remote=None, disk_keys=0):
    text = (REPO / "etc" / "pipelines" / "demo.toml").read_text()
    if remote:
        text = text.replace('processor = "cube_accessor"\n',
                            f'processor = "cube_accessor"\nremote = "{remote}"\ndisk_cache_keys = {disk_keys}\n')
    return text


def client_cpu(cluster, bundle, sets, strategies):
    """Per strategy: jizhi's RedisCube against redis-py's mget_nonatomic, CPU and wall per request."""
    try:
        from redis.cluster import ClusterNode, RedisCluster
    except ImportError:
        RedisCluster = None
        log("redis-py is not installed: no baseline (pip install -e '.[redis-baseline]')")
    keys, vectors = read_all(bundle.cube_path)
    out = {}
    for strategy in strategies:
        push([bundle], cluster.url, strategy)
        cube = R.RedisCube(f"{cluster.url}/{bundle.name}/{bundle.version}", bundle.dim, timeout_ms=5000)
        for q in sets[:5]:
            cube.lookup(q)
        cpu, wall, trips = [], [], []
        for q in sets:
            t0, c0, r0 = time.perf_counter(), time.thread_time(), cube.round_trips
            v, f = cube.lookup(q)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
            trips.append(cube.round_trips - r0)
        assert cube.degraded == 0, cube.stats()
        row = {"keys_per_request": int(np.median([len(q) for q in sets])),
               "jizhi_cpu_ms": round(1000 * statistics.median(cpu), 3),
               "jizhi_wall_ms": round(1000 * statistics.median(wall), 3),
               "round_trips_per_request": float(np.mean(trips))}
        if RedisCluster is not None:
            rc = RedisCluster(startup_nodes=[ClusterNode(cluster.host(p), p) for p in cluster.ports],
                              decode_responses=False)
            layout = cube.layout
            rkeys = []
            for q in sets:
                keyb, _ = layout.keys_and_slots(q)
                rkeys.append([bytes(k) for k in keyb])
            for k in rkeys[:3]:
                rc.mget_nonatomic(k)
            cpu, wall = [], []
            for q, k in zip(sets, rkeys):
                t0, c0 = time.perf_counter(), time.thread_time()
                vals = rc.mget_nonatomic(k)
                got = np.array([np.frombuffer(x, dtype="<f4") if x is not None else np.zeros(bundle.dim, np.float32)
                                for x in vals], dtype=np.float32)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - t0)
            ours, _ = cube.lookup(sets[-1])
            assert np.array_equal(got, ours), "redis-py read other values"
            rc.close()
            row.update(redis_py_cpu_ms=round(1000 * statistics.median(cpu), 3),
                       redis_py_wall_ms=round(1000 * statistics.median(wall), 3))
            row["cpu_ratio"] = round(row["redis_py_cpu_ms"] / row["jizhi_cpu_ms"], 1)
        cube.close()
        out[strategy] = row
        log(f"client CPU, {strategy}: {row}")
    return out


def serve_point(args, cluster, work, name, setting, remote, rate, seed, trace):
    hot_mb, disk_keys = SETTINGS[setting]
    pfile = work / f"{name}-{setting}.toml"
    pfile.write_text(pipeline_text(remote, disk_keys))
    d = mm.Daemon(work, f"{name}-{setting}", args.port, [pfile], config=f"[cube]\nhot_tier_mb = {hot_mb}\n"
                  "hot_rebuild_s = 2.0\n")
    try:
        before = cube_stats(d)
        rpids = [cluster.pid(p) for p in cluster.ports]
        rcpu0 = procs_cpu_s(rpids)
        r = mm.run_point(d, ["demo"], trace, rate, args.duration, args.warmup, seed)
        rcpu = procs_cpu_s(rpids) - rcpu0
        after = cube_stats(d)
    finally:
        d.stop()
    sent = int(round(rate * args.duration)) + int(round(rate * args.warmup))
    r.update(config=name, setting=setting,
             round_trips_per_request=round((after.get("remote_round_trips", 0) - before.get("remote_round_trips", 0))
                                           / sent, 2),
             degraded_keys=after.get("remote_degraded", 0) - before.get("remote_degraded", 0),
             hot_ratio=after.get("hot_ratio"), disk_ratio=after.get("disk_ratio"),
             remote_ratio=after.get("remote_ratio"),
             redis_cpu_ms_per_request=round(1000 * rcpu / sent, 3) if remote else 0.0,
             jizhid_cpu_ms_per_request=round(r["cpu_s_per_1000"], 3))
    log(f"  {name:<12} {setting:<6} {rate:g}/s: p50 {r['p50_ms']} p99 {r['p99_ms']} ms, errors {r['errors']}, "
        f"lost {r['lost']}, trips/req {r['round_trips_per_request']}, degraded {r['degraded_keys']}, "
        f"hot {r['hot_ratio']} disk {r['disk_ratio']} remote {r['remote_ratio']}")
    return r


def capacities(args, cluster, work, bundle, trace, settings):
    """{setting: {"local": req/s, "redis-S": req/s}}: find-max of each, settings in turn."""
    push([bundle], cluster.url, args.capacities)
    url = f"{cluster.url}/{{name}}/{{version}}?timeout_ms=50"
    out = {}
    for setting in settings:
        hot_mb, disk_keys = SETTINGS[setting]
        for name, remote in (("local", None), (f"redis-{args.capacities}", url)):
            pfile = work / f"cap-{name}-{setting}.toml"
            pfile.write_text(pipeline_text(remote, disk_keys))
            d = mm.Daemon(work, f"cap-{name}-{setting}", args.port, [pfile],
                          config=f"[cube]\nhot_tier_mb = {hot_mb}\nhot_rebuild_s = 2.0\n")
            try:
                time.sleep(args.warmup)
                cap = mm.find_capacity(d, ["demo"], trace, args.slo_ms, 100, 10.0, 3.0, log)
            finally:
                d.stop()
            out.setdefault(setting, {})[name] = cap
            log(f"capacity {name} {setting}: {cap} req/s")
    print("\n| setting | " + " | ".join(next(iter(out.values())).keys()) + " |")
    print("|---|" + "---|" * len(next(iter(out.values()))))
    for setting, caps in out.items():
        print(f"| {setting} | " + " | ".join(f"{v:g} req/s" for v in caps.values()) + " |")
    return out


def cube_stats(d):
    try:
        return json.loads(d.ctl("stats", "--json")).get("cube", {}).get("demo", {})
    except SystemExit:
        return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="/tmp/jzb/demo", help="a demo directory (jizhictl demo init)")
    ap.add_argument("--trace", default="/tmp/jzb/trace30k.npz")
    ap.add_argument("--work", default="/tmp/jzb/redis-bench")
    ap.add_argument("--base-port", type=int, default=7200, help="the cluster's first port")
    ap.add_argument("--netns", action="store_true", help="run every Redis node as a separate host (its own "
                    "network namespace and veth link; root)")
    ap.add_argument("--port", type=int, default=5641, help="jizhid's frontend port")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--load", type=float, default=0.5, help="fraction of the local cube's capacity offered")
    ap.add_argument("--client-requests", type=int, default=200)
    ap.add_argument("--settings", default="warm,small,cold")
    ap.add_argument("--strategies", default="key,table,model")
    ap.add_argument("--capacity", default="", help="skip the capacity search: setting=req/s,... (e.g. warm=700)")
    ap.add_argument("--capacities", metavar="STRATEGY", help="instead of the latency points: the capacity "
                    "(highest rate with p99 <= --slo-ms) of the local cube and of the Redis cube under STRATEGY, "
                    "for each of --settings, alternately (caches on against off for a cube that is not local)")
    ap.add_argument("--out", default="/tmp/jzb/redis-bench.json")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    src = Path(args.base) / "models" / "demo"
    shutil.copytree(src, work / "models" / "demo")      # a copy: LMDB refuses two envs of one file
    version = sorted((work / "models" / "demo").iterdir())[-1]
    bundle = Bundle(version)
    trace = Trace(args.trace)
    strategies = args.strategies.split(",")
    settings = args.settings.split(",")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
              "cpus": os.cpu_count(), "args": vars(args)}
    cluster = LocalCluster(work / "cluster", base_port=args.base_port, node_timeout_ms=2000, netns=args.netns)
    cluster.start()
    try:
        log(f"cluster up: {cluster.url}")
        if args.capacities:
            result["capacities"] = capacities(args, cluster, work, bundle, trace, settings)
            Path(args.out).write_text(json.dumps(result, indent=1))
            return
        sets = request_key_sets(str(version), args.trace, limit=args.client_requests)
        result["client"] = client_cpu(cluster, bundle, sets, strategies)
        url = f"{cluster.url}/{{name}}/{{version}}?timeout_ms=50"
        result["capacity"], result["points"] = {}, []
        seed = 1
        given = dict((k, float(v)) for k, v in (x.split("=") for x in args.capacity.split(",") if x))
        for setting in settings:
            if setting in given:
                result["capacity"][setting] = given[setting]
                continue
            hot_mb, _ = SETTINGS[setting]
            pfile = work / f"cap-{setting}.toml"
            pfile.write_text(pipeline_text())
            d = mm.Daemon(work, f"cap-{setting}", args.port, [pfile], config=f"[cube]\nhot_tier_mb = {hot_mb}\n"
                          "hot_rebuild_s = 2.0\n")
            try:
                cap = mm.find_capacity(d, ["demo"], trace, args.slo_ms, 200, 10.0, 3.0, log)
            finally:
                d.stop()
            result["capacity"][setting] = cap
            log(f"local capacity, {setting}: {cap} req/s")
        for rnd in range(args.rounds):
            for setting in settings:
                rate = round(args.load * result["capacity"][setting], 1)
                configs = [("local", None)] + [(f"redis-{s}", s) for s in strategies]
                if rnd % 2:
                    configs.reverse()
                for name, strategy in configs:
                    if strategy:
                        push([bundle], cluster.url, strategy)
                    seed += 1
                    p = serve_point(args, cluster, work, name, setting, url if strategy else None, rate, seed, trace)
                    p["round"] = rnd
                    p["rate"] = rate
                    result["points"].append(p)
                    Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        cluster.stop()
    Path(args.out).write_text(json.dumps(result, indent=1))
    if not args.capacities:
        report(result)


def report(result):
    print("\n## client CPU per request (every key remote)\n")
    print("| strategy | keys/request | jizhi CPU ms | jizhi wall ms | round trips | redis-py CPU ms | redis-py wall ms | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for s, r in result["client"].items():
        print(f"| {s} | {r['keys_per_request']} | {r['jizhi_cpu_ms']} | {r['jizhi_wall_ms']} | "
              f"{r['round_trips_per_request']} | {r.get('redis_py_cpu_ms', '-')} | {r.get('redis_py_wall_ms', '-')} | "
              f"{r.get('cpu_ratio', '-')}x |")
    print("\n## serving at", result["args"]["load"], "x the local capacity (medians of rounds)\n")
    print("| setting | rate | cube | p50 ms | p99 ms | p99 vs local | trips/req | degraded keys | hot | disk | remote | jizhid CPU ms/req | redis CPU ms/req | errors+lost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    by = {}
    for p in result["points"]:
        by.setdefault((p["setting"], p["config"]), []).append(p)
    for setting in result["args"]["settings"].split(","):
        base = None
        for name in ["local"] + [f"redis-{s}" for s in result["args"]["strategies"].split(",")]:
            ps = by.get((setting, name))
            if not ps:
                continue
            med = {k: statistics.median([p[k] for p in ps]) for k in
                   ("p50_ms", "p99_ms", "round_trips_per_request", "degraded_keys", "jizhid_cpu_ms_per_request",
                    "redis_cpu_ms_per_request")}
            if name == "local":
                base = med["p99_ms"]
            bad = sum(sum(p["errors"].values()) + p["lost"] for p in ps)

            def pct(v):
                return "-" if v is None else f"{100 * v:.1f}%"
            last = ps[-1]
            over = "" if name == "local" else f"{100 * (med['p99_ms'] / base - 1):+.1f}%"
            print(f"| {setting} | {ps[0]['rate']:g} | {name} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {over} | "
                  f"{med['round_trips_per_request']:.2f} | {med['degraded_keys']:g} | {pct(last.get('hot_ratio'))} | "
                  f"{pct(last.get('disk_ratio'))} | {pct(last.get('remote_ratio'))} | "
                  f"{med['jizhid_cpu_ms_per_request']:.2f} | {med['redis_cpu_ms_per_request']:.2f} | {bad} |")


if __name__ == "__main__":
    main()
