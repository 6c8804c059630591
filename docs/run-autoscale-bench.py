#!/usr/bin/env python
"""Pool autoscaling after a shift in the load mix (issue 7): the sustainable rate with the autoscaler
against the best static allocation for the new mix.

    .venv/bin/python docs/run-autoscale-bench.py [--duration 8] [--budget 5]

Setup: the models of docs/run-many-models-bench.py (the demo and its heads; run that first, or
this makes them), an A/B pipeline whose groups run a light head (``ctr``, top MLP 64) and a heavy
one (``dwell``, 512-256-128) on the shared front (reader, features, cube): worker kinds ``front``,
``dnn_a``, ``dnn_b``, ``rank``. The mix shifts from 90 % light / 10 % heavy to 10 % / 90 % by a
config reload (``jizhictl reload`` with new fractions), as when a test group ramps up.

Repeated with --rounds N (each round: every static allocation on the new mix, then an autoscaled
daemon); the verdict compares medians.

1. Static (autoscale off): for each allocation of --budget workers (every kind >= 1, rank 1) the
   maximum sustainable rate of the new mix (p99 <= --slo-ms, no error; doubling then bisection),
   pools set with ``jizhictl scale``. The best of them is the reference; the allocation that was
   best for the old mix is among them (what a static deployment keeps after the shift).
2. Autoscaled: a daemon with ``autoscale.enabled`` starts with the old mix's best allocation,
   serves the old mix under load, the mix shifts, the autoscaler moves workers (its log lines
   are kept), then the maximum sustainable rate of the new mix is measured the same way.

Success (the issue's): the autoscaled rate within 10 % of the best static one.
"""
import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
spec = importlib.util.spec_from_file_location("mm", REPO / "docs" / "run-many-models-bench.py")
mm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mm)

from jizhi.tools.bench import Trace                  # noqa: E402
from jizhi.pipeline import Pipeline            # noqa: E402
from jizhi.client import Client                # noqa: E402

KINDS = ("front", "dnn_a", "dnn_b", "rank")


def pipeline(fractions, pools):
    """The A/B pipeline: group a the light head, b the heavy one, on the shared front; ``pools``
    per worker kind."""
    (a, b) = fractions
    return (Pipeline("mix", model="demo").front(next=["ab"])
            .stage("ab", "ab_dispatch", next=["dnn_a", "dnn_b"], salt="mix",
                   groups=[{"name": "a", "fraction": a, "next": "dnn_a"}, {"name": "b", "fraction": b, "next": "dnn_b"}])
            .stage("dnn_a", "model_inference", next=["rank"], pool=pools["dnn_a"], model="ctr")
            .stage("dnn_b", "model_inference", next=["rank"], pool=pools["dnn_b"], model="dwell")
            .stage("rank", "ranker", pool=pools["rank"])
            .fuse("front", ["reader", "features", "cube"], pool=pools["front"], batch=8, batch_wait_ms=2)).toml()


def pools_now(d):
    with Client(d.endpoint, timeout_s=5) as c:
        info = c.info()["pipelines"]["mix"]["groups"]
    return {g: info[g]["workers"] for g in KINDS}


def set_pools(d, pools):
    for g, n in pools.items():
        d.ctl("scale", g, str(n), "--pipeline", "mix")
    end = time.monotonic() + 60
    while pools_now(d) != pools and time.monotonic() < end:
        time.sleep(0.5)
    time.sleep(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/jzb/many")
    ap.add_argument("--base", default="/tmp/jzb/demo/models/demo/1")
    ap.add_argument("--trace", default="/tmp/jzb/trace30k.npz")
    ap.add_argument("--budget", type=int, default=5)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--out", default="/tmp/jzb/many/autoscale.json")
    ap.add_argument("--start", default=None,
                    help="The autoscaled daemon's first allocation, front,dnn_a,dnn_b,rank (default: the old mix's "
                         "best, which needs the old mix's static figures).")
    ap.add_argument("--old-rate", type=float, default=None,
                    help="With --start: the old mix's rate before the shift (default 60 %% of the old mix's best "
                         "static capacity, which is then measured).")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Rounds of (every static allocation on the new mix, then the autoscaled daemon); the "
                         "verdict compares medians (single find-max runs here move by +-25 %%).")
    ap.add_argument("--static-from", default=None,
                    help="Take the static figures from this earlier results file instead of measuring them.")
    a = ap.parse_args()
    work = Path(a.work)
    log = lambda s: print(s, flush=True)   # noqa: E731
    models = work / "models"
    if not (models / "dwell" / "1").exists():
        sys.argv = [sys.argv[0], "--only", "none", "--work", str(work), "--base", a.base]
        mm.main()
    trace = Trace(a.trace)
    old, new = (0.9, 0.1), (0.1, 0.9)
    allocs = []
    for f, x, y in itertools.product(range(1, a.budget), repeat=3):
        if f + x + y + 1 == a.budget:
            allocs.append({"front": f, "dnn_a": x, "dnn_b": y, "rank": 1})
    keys = [",".join(str(al[g]) for g in KINDS) for al in allocs]
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cores": os.cpu_count(), "argv": sys.argv[1:], "budget": a.budget, "rounds": a.rounds,
               "static": {}, "static_old": {}, "static_rounds": {k: [] for k in keys}, "autoscaled_rounds": []}

    def capacity(d, label, start=40.0):
        return mm.find_capacity(d, ["mix"], trace, a.slo_ms, start, a.duration, a.warmup,
                                lambda s: log(f"  {label}: {s.strip()}"))

    path = work / "mix.toml"
    if a.static_from:
        earlier = json.loads(Path(a.static_from).read_text())
        results["static"], results["static_old"] = earlier["static"], earlier["static_old"]
        results["static_from"] = a.static_from
    elif a.start is None or a.old_rate is None:
        # The old mix's static capacities (its best allocation is the autoscaled daemon's default start).
        path.write_text(pipeline(old, allocs[0]))
        d = mm.Daemon(work, "static", 5631, [path])
        try:
            for al, key in zip(allocs, keys):
                set_pools(d, al)
                results["static_old"][key] = capacity(d, f"old mix {key}")
                log(f"old mix, static {key}: {results['static_old'][key]:g} req/s")
        finally:
            d.stop()
    best_old = a.start or max(results["static_old"], key=results["static_old"].get)
    old_rate = a.old_rate or 0.6 * results["static_old"][best_old]
    start = dict(zip(KINDS, map(int, best_old.split(","))))
    results["autoscaled_start"] = start

    for rnd in range(1, a.rounds + 1):
        # 1. Static allocations on the new mix, autoscale off.
        if not a.static_from:
            path.write_text(pipeline(new, allocs[0]))
            d = mm.Daemon(work, "static", 5631, [path])
            try:
                for al, key in zip(allocs, keys):
                    set_pools(d, al)
                    results["static_rounds"][key].append(capacity(d, f"round {rnd}, new mix {key}"))
                    log(f"round {rnd}: new mix, static {key}: {results['static_rounds'][key][-1]:g} req/s")
            finally:
                d.stop()
            results["static"] = {k: statistics.median(v) for k, v in results["static_rounds"].items()}
        best_new = max(results["static"], key=results["static"].get)

        # 2. Autoscaled: start at ``start``, serve the old mix, shift the mix under load, let it move, measure.
        path.write_text(pipeline(old, start))
        d = mm.Daemon(work, "auto", 5632, [path],
                      f"[autoscale]\nenabled = true\nbudget = {a.budget}\nperiod_s = 1.0\nsustain = 3\ncooldown_s = 8\n")
        rec = {"round": rnd}
        try:
            mm.run_point(d, ["mix"], trace, old_rate, 10, 2, seed=1)
            log(f"round {rnd}: autoscaled, old mix at {old_rate:g}/s: pools {pools_now(d)}")
            path.write_text(pipeline(new, start))
            d.ctl("reload")
            t0 = time.monotonic()
            timeline = []
            rate_new = 0.7 * results["static"][best_new]
            for i in range(6):
                r = mm.run_point(d, ["mix"], trace, rate_new, 8, 1, seed=10 + i)
                timeline.append({"t_s": round(time.monotonic() - t0, 1), "pools": pools_now(d),
                                 "p99_ms": r["p99_ms"], "errors": r["errors"]})
                log(f"  after the shift {timeline[-1]}")
            rec["timeline"] = timeline
            rec["pools"] = pools_now(d)
            rec["capacity"] = capacity(d, f"round {rnd}, new mix, autoscaled", start=results["static"][best_new] / 2)
            rec["pools_after"] = pools_now(d)
            rec["log"] = [line for line in (d.run_dir / "jizhid.log").read_text().splitlines() if "autoscale" in line]
        finally:
            d.stop()
        results["autoscaled_rounds"].append(rec)
        log(f"round {rnd}: autoscaled {rec['capacity']:g} req/s, pools {rec['pools']}")
        Path(a.out).write_text(json.dumps(results, indent=1))

    best_new = max(results["static"], key=results["static"].get)
    auto = statistics.median(r["capacity"] for r in results["autoscaled_rounds"])
    results["autoscaled"] = auto
    ratio = auto / results["static"][best_new]
    results["ratio_to_best_static"] = round(ratio, 3)
    Path(a.out).write_text(json.dumps(results, indent=1))
    log("\nnew mix, static (req/s per round): " + "; ".join(
        f"{k}: {', '.join(f'{x:g}' for x in v)}" for k, v in results["static_rounds"].items() if v))
    per_round = ", ".join(f"{r['capacity']:g}" for r in results["autoscaled_rounds"])
    log(f"new mix: best static {best_new} {results['static'][best_new]:g} req/s (median); the start {best_old} "
        f"{results['static'].get(best_old, float('nan')):g}; autoscaled {per_round} req/s, median {auto:g} "
        f"= {100 * ratio:.0f} % of the best static")
    log(f"results: {a.out}")


if __name__ == "__main__":
    main()
