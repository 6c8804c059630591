"""The Redis cube's client CPU per lookup batch, plain TCP against TLS (``rediss://``).

One process, two Redis Clusters started by the script on loopback (jizhi/tools/redis_local.py), each 3 masters
and no replicas: one plain, one TLS on every port (``make_certificates``: a CA and a node certificate;
``tls-auth-clients no``), the demo bundle's cube pushed to both (`jizhictl cube push --strategy key`). A
``RedisCube`` per cluster (``redis://.../demo/1`` and ``rediss://.../demo/1?tls_ca=CA``, ``timeout_ms`` 5,000 so
that nothing degrades) reads the same batches: ``--batches`` batches of ``--keys`` distinct keys each, drawn
uniformly from the cube's keys (seeded). The default 2,000 keys is the distinct signatures a demo request of
500 candidates reads (median 2,000, p10-p90 1,967-2,039, the cube stage's dedup of one request); the script also measures it on the
bundle's own trace (median distinct signatures of its first 200 requests, ``jizhi/tools/cubebench.py``) and
prints it. A second size, ``--small-keys`` (64), shows the fixed cost per batch (one pipeline per master, the
poll, and for TLS the record framing of every write and read).

Per round, each cluster reads every batch once (after a warm-up of 50 batches that compiles the Numba codecs
and opens the connections); plain and TLS alternate, the order flipped every round (plain first in even rounds),
``--rounds`` rounds. Per round and cluster: client CPU per batch = the cube's ``cpu_ns / calls`` over the round
(thread CPU spent in ``lookup``), wall time per batch = the round's wall time / batches. Reported: medians of the
rounds in microseconds and the ratio TLS / plain; the first batch of each size is checked equal to the bundle's
cube on both clusters, and no key may degrade. Writes OUT/results.json and prints a markdown table.

    python docs/run-redis-tls-bench.py --out /tmp/jizhi-redis-tls [--bundle MODELS/demo/1 --trace TRACE.npz]
                                       [--rounds 5] [--batches 2000] [--keys 2000] [--small-keys 64]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from jizhi.tools.testbed import demo_inputs

from jizhi.bundle import Bundle
from jizhi.cube.build import read_all
from jizhi.cube.redis import RedisCube
from jizhi.tools.redis_local import LocalCluster, free_port_block, make_certificates

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
WARM_BATCHES = 50


def jizhictl(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), *args], capture_output=True,
                          text=True, check=True).stdout


def one_round(cube, batches):
    """(CPU us per batch from the cube's counters, wall us per batch) for one pass over ``batches``."""
    c0, n0, d0 = cube.cpu_ns, cube.calls, cube.degraded
    t0 = time.perf_counter()
    for q in batches:
        cube.lookup(q)
    wall = time.perf_counter() - t0
    if cube.degraded != d0:
        raise RuntimeError(f"{cube.degraded - d0} keys degraded in a round: {cube.stats()}")
    return (cube.cpu_ns - c0) / 1000 / (cube.calls - n0), 1e6 * wall / len(batches)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundle", default=None, help="a demo version directory (default: jizhictl demo init in OUT)")
    ap.add_argument("--trace", default=None, help="its trace (default: the one demo init writes)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=2000, help="batches per round and cluster")
    ap.add_argument("--keys", type=int, default=2000, help="distinct keys per batch")
    ap.add_argument("--small-keys", type=int, default=64, help="keys per batch of the second, small size (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    args.bundle, args.trace = demo_inputs(out, args.bundle, args.trace)
    bundle = Bundle(args.bundle)
    all_keys, all_vectors = read_all(bundle.cube_path)
    per_request = None
    if args.trace:
        from jizhi.tools.cubebench import request_key_sets
        sets = request_key_sets(str(args.bundle), args.trace, limit=200)
        per_request = int(np.median([len(q) for q in sets]))
    rng = np.random.default_rng(args.seed)
    sizes = [args.keys] + ([args.small_keys] if args.small_keys else [])
    batches = {n: [rng.choice(all_keys, n, replace=False) for _ in range(args.batches)] for n in sizes}

    shutil.rmtree(os.path.join(out, "redis-plain"), ignore_errors=True)
    shutil.rmtree(os.path.join(out, "redis-tls"), ignore_errors=True)
    clusters = {}
    cubes = {}
    try:
        clusters["plain"] = LocalCluster(os.path.join(out, "redis-plain"), base_port=free_port_block(3), masters=3,
                                         replicas=0)
        clusters["plain"].start()
        certs = make_certificates(os.path.join(out, "certs"))
        clusters["tls"] = LocalCluster(os.path.join(out, "redis-tls"), base_port=free_port_block(3), masters=3,
                                       replicas=0, tls=certs)
        clusters["tls"].start()
        push_s = {}
        for name, c in clusters.items():
            t0 = time.monotonic()
            jizhictl("cube", "push", args.bundle, "--redis", c.url + c.options(), "--strategy", "key", "--quiet")
            push_s[name] = round(time.monotonic() - t0, 2)
            opts = c.options()
            cubes[name] = RedisCube(f"{c.url}/{bundle.name}/{bundle.version}{opts}", bundle.dim, timeout_ms=5000)
        # the values read equal the bundle's, on both clusters; then warm (Numba, connections)
        for name, cube in cubes.items():
            for n in sizes:
                q = batches[n][0]
                v, f = cube.lookup(q)
                want = all_vectors[np.searchsorted(all_keys, q)]
                if not (f.all() and np.array_equal(v, want)):
                    raise RuntimeError(f"{name}: the values read differ from the bundle's cube")
                for b in batches[n][:WARM_BATCHES]:
                    cube.lookup(b)
        rounds = {n: {"plain": [], "tls": []} for n in sizes}
        for k in range(args.rounds):
            order = ("plain", "tls") if k % 2 == 0 else ("tls", "plain")
            for n in sizes:
                for name in order:
                    cpu_us, wall_us = one_round(cubes[name], batches[n])
                    rounds[n][name].append({"cpu_us": round(cpu_us, 2), "wall_us": round(wall_us, 2),
                                            "loadavg": os.getloadavg()[0]})
                    print(f"round {k + 1} {n} keys {name:5}: CPU {cpu_us:,.0f} us/batch, wall {wall_us:,.0f} us/batch",
                          flush=True)
        stats = {name: cube.stats() for name, cube in cubes.items()}
    finally:
        for cube in cubes.values():
            cube.close()
        for c in clusters.values():
            c.stop()

    results = {"rounds": args.rounds, "batches": args.batches, "sizes": sizes, "seed": args.seed,
               "cube_keys": int(all_keys.shape[0]), "dim": int(bundle.dim),
               "distinct_signatures_per_request_median": per_request, "push_s": push_s,
               "git": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_end": os.getloadavg()[0],
               "cube_stats": stats, "results": {}}
    for n in sizes:
        row = {}
        for name in ("plain", "tls"):
            rs = rounds[n][name]
            row[name] = {"cpu_us_per_batch": float(np.median([r["cpu_us"] for r in rs])),
                         "wall_us_per_batch": float(np.median([r["wall_us"] for r in rs])), "rounds": rs}
        row["cpu_ratio"] = round(row["tls"]["cpu_us_per_batch"] / row["plain"]["cpu_us_per_batch"], 3)
        row["wall_ratio"] = round(row["tls"]["wall_us_per_batch"] / row["plain"]["wall_us_per_batch"], 3)
        results["results"][str(n)] = row
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{args.rounds} alternating rounds of {args.batches:,} batches, medians; 3 masters each, loopback; "
          f"cube {results['cube_keys']:,} keys x dim {results['dim']}; commit {results['git']}, {results['date']}"
          + (f"; a trace request reads {per_request:,} distinct signatures (median)" if per_request else "") + "\n")
    print("| keys/batch | plain CPU us/batch | TLS CPU us/batch | CPU TLS/plain | plain wall us/batch | "
          "TLS wall us/batch | wall TLS/plain |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        r = results["results"][str(n)]
        print(f"| {n:,} | {r['plain']['cpu_us_per_batch']:,.1f} | {r['tls']['cpu_us_per_batch']:,.1f} | "
              f"{r['cpu_ratio']:.2f}x | {r['plain']['wall_us_per_batch']:,.1f} | {r['tls']['wall_us_per_batch']:,.1f} | "
              f"{r['wall_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
