#!/usr/bin/env python
"""Load shedding under overload (issues 7 and 23): p99, answers, cutoff and top-10 quality at 1.5x,
2x and 3x the maximum sustainable rate, for recall-score correlations 0.8 and 0.5, rule against
learned policy, each point measured from the moment its load starts with a fresh quota; and a
diurnal run with its timeline plot.

    .venv/bin/python docs/run-shed-bench.py [--duration 30] [--xs 1.5,2,3] [--spearman 0.8,0.5]

Every figure from one run on a quiet machine:

1. The demo bundle (--base) served by ``etc/pipelines/demo_shed.toml`` (a shedder fused in front
   of the demo stages, pool 2), shed.slo_ms = --slo-ms.
2. Traces (made once under --work): for each Spearman correlation, an evaluation trace and a
   training trace (another seed): 0.8 and 0.5 as the issue asks (every request alike), and
   0.65~0.3 (each request its own correlation in 0.35..0.95, visible in the spread of its recall
   scores: ``generate_trace(spread=...)``); ``jizhi.shedding.train`` fits a learned policy on the training
   trace (its offline report: rule against learned at the same mean kept fraction).
3. The maximum sustainable rate with shedding off (``jizhictl shed off``): the highest constant
   rate with p99 <= SLO and every request answered (doubling, then bisection to 5 %), on the 0.8
   evaluation trace; the same with every request keeping each of --floor-quotas, and the line
   1/R(q) = a + b q through those maxima, solved for the smallest fixed cut that carries k x.
   What a request's CPU is made of, at each of --cost-quotas near its own maximum: server (per
   process kind) and load generator, per answered request, fitted F + V q; a server bound by that
   CPU needs a cut of (1 - 1/k)(1 + F/V) at k x, which is 1 - 1/k only when F = 0.
4. Shedding on, per correlation and policy, at each multiple k of that rate: ``jizhictl shed auto``
   (a fresh start: the admission cut forgets its rates, trim 1; a quiet second), then --duration s
   of load, all of it measured (--warmup s more before, 0 by default, would be left out). Per
   point: p99 over the whole point and after its first 5 s, the share of requests answered OK, the
   mean shed ratio (the cut: 1 - fraction kept) against 1 - 1/k, the mean overlap of each reply's
   top-10 with the top-10 of the same request scored in full by the reference scorer (offline,
   exact), and its offline bound: the same overlap when every request keeps its best candidates
   by recall score at the point's mean cut; the CPU per request of the point; the two cuts of
   step 3 beside the point's own.
5. A diurnal run (peak --diurnal-x x max, trough 1/10 of the peak, one period of --period s) with
   the learned 0.8 policy: the per-second timeline (JSON) and a PNG (load, cut, p99, pools).
"""
import argparse
import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("mm", REPO / "docs" / "run-many-models-bench.py")
mm = importlib.util.module_from_spec(spec)     # its Daemon: start a jizhid, jizhictl against it, stop it
spec.loader.exec_module(mm)

from jizhi.tools.bench import Trace                                             # noqa: E402
from jizhi.tools.procfs import ServerCpu                                        # noqa: E402
from jizhi.tools.demo import generate_trace                                     # noqa: E402
from jizhi.tools.reference import ReferenceScorer                               # noqa: E402
from jizhi.tools.shedbench import arrivals, plot_timeline, rate_fn, run_timeline, timeline_series   # noqa: E402
from jizhi.shedding import save_policy                                          # noqa: E402
from jizhi.tools.shedtrain import train                                         # noqa: E402

class Truth:
    """Reference top-10 of trace rows, scored in full offline (cached per row, with the full scores)."""

    def __init__(self, ref, trace, k=10):
        self.ref, self.trace, self.k, self.top, self.scores = ref, trace, k, {}, {}

    def fill(self, rows):
        todo = sorted(set(int(r) for r in rows) - set(self.top))
        for s in range(0, len(todo), 64):
            chunk = np.array(todo[s:s + 64])
            t = self.trace
            items = np.concatenate([t.items[t.offsets[r]:t.offsets[r + 1]] for r in chunk])
            offs = np.concatenate([[0], np.cumsum(t.counts[chunk])])
            scores, _ = self.ref.score_requests(t.users[chunk], offs, items)
            for j, r in enumerate(chunk):
                s_, ids = scores[offs[j]:offs[j + 1]], items[offs[j]:offs[j + 1]]
                k = min(self.k, s_.shape[0])
                self.top[int(r)] = set(ids[np.argpartition(-s_, k - 1)[:k]].tolist())
                self.scores[int(r)] = s_.copy()

    def overlap(self, rows, ids, ok):
        self.fill(rows[ok])
        return np.array([len(self.top[int(r)].intersection(i.tolist())) / self.k
                         for r, i, o in zip(rows, ids, ok) if o])

    def bound(self, rows, cut):
        """The offline bound at mean cut ``cut``: each request keeps its best ceil((1 - cut) x n) candidates
        by recall score (at least k), the reference scorer's top-k of those against its top-k of all.
        (At each reply's own cut the bound would be the measured overlap itself: both policies keep a
        request's best candidates by recall score and differ only in how many.)"""
        self.fill(rows)
        t, out = self.trace, []
        for r in rows.tolist():
            a, b = t.offsets[r], t.offsets[r + 1]
            n = b - a
            keep = min(n, max(self.k, int(np.ceil((1.0 - cut) * n))))
            kept = np.argsort(-t.recall[a:b], kind="stable")[:keep]
            s_ = self.scores[r][kept]
            k = min(self.k, keep)
            top = t.items[a:b][kept[np.argpartition(-s_, k - 1)[:k]]]
            out.append(len(self.top[r].intersection(top.tolist())) / self.k)
        return np.array(out)


def point(d, trace, rate, duration_s, warmup_s, first_row, slo_ms, truth=None, seed=0):
    times = arrivals(rate_fn("constant", rate), warmup_s + duration_s, seed=seed)
    cpu0, gen0 = d.cpu.snapshot(), time.process_time()
    res = run_timeline(d.endpoint, trace, "demo_shed", times, first_row=first_row)
    gen_s, by_kind = time.process_time() - gen0, ServerCpu.delta(cpu0, d.cpu.snapshot())
    meas = res["due"] >= warmup_s
    st, lat = res["status"][meas], res["latency_ms"][meas]
    ok = st == "ok"
    late = (res["due"][meas] >= warmup_s + 5.0)
    out = {"rate": round(rate, 1), "requests": int(meas.sum()),
           "p99_after_5s_ms": round(float(np.percentile(lat[ok & late], 99)), 1) if (ok & late).any() else None,
           "answered_after_5s": round(float(ok[late].mean()), 4) if late.any() else None,
           "answered_share": round(float(ok.mean()), 4) if meas.any() else None,
           "errors": {c: int((st == c).sum()) for c in set(st.tolist()) if c != "ok"},
           "p50_ms": round(float(np.percentile(lat[ok], 50)), 1) if ok.any() else None,
           "p99_ms": round(float(np.percentile(lat[ok], 99)), 1) if ok.any() else None,
           "shed_ratio": round(float(np.nanmean(res["shed_ratio"][meas][ok])), 4) if ok.any() else None,
           "shed_ratio_p10_p50_p90": [round(float(x), 3) for x in np.nanpercentile(res["shed_ratio"][meas][ok],
                                                                                   [10, 50, 90])] if ok.any() else None}
    out["pass"] = bool(ok.all() and out["p99_ms"] is not None and out["p99_ms"] <= slo_ms)
    # CPU per answered request over the whole timeline (warm-up included): each process kind of the
    # server, and this load generator (it shares the 2 cores).
    answered = max(1, int((res["status"] == "ok").sum()))
    out["cpu_us_per_request"] = {**{k: round(v * 1e6 / answered, 1) for k, v in sorted(by_kind.items())},
                                 "generator": round(gen_s * 1e6 / answered, 1)}
    # Per second: offered, answered, p99, mean cut (where in the point a cut or a tail came from) and
    # the generator's own lateness.
    series = timeline_series(res, "demo_shed", slo_ms)
    out["per_second"] = {k: series[k] for k in ("offered_rps", "answered_rps", "p99_ms", "shed_ratio", "send_lag_max_ms")}
    if res["info"]:     # the server's admission cut at the end of the point (jizhi/shedding.py)
        out["admission"] = (res["info"][-1][1]["pipelines"].get("demo_shed", {}).get("shedding") or {}).get("admission")
    if truth is not None:
        ids = [i for i, m in zip(res["ids"], meas) if m]
        ov = truth.overlap(res["rows"][meas], ids, ok)
        out["top10_overlap"] = round(float(ov.mean()), 4) if ov.shape[0] else None
        if out["shed_ratio"] is not None:
            out["bound_at_same_cut"] = round(float(truth.bound(res["rows"][meas][ok], out["shed_ratio"]).mean()), 4)
    return out, first_row + times.shape[0]


def capacity_fit(best, at_quota, xs=(1.5, 2.0, 3.0)):
    """The capacity search's own answer to "the smallest cut that carries k x": a least-squares line
    1/R(q) = a + b q through the maximum rates at fixed quotas (q = 1: shedding off), solved for the q
    whose 1/R is 1/(k x best)."""
    pts = [(1.0, best)] + [(q, r) for q, r in at_quota.items() if r > 0]
    if best <= 0 or len(pts) < 2:
        return None
    q = np.array([p[0] for p in pts])
    inv = 1.0 / np.array([p[1] for p in pts])
    b, a = np.polyfit(q, inv, 1)
    cut = {x: round(float(np.clip(1.0 - (1.0 / (x * best) - a) / b, 0.0, 1.0)), 3) for x in xs}
    return {"points": pts, "a": float(a), "b": float(b), "cut_for": cut}


def cost_model(cost, xs):
    """F + V q fitted to the CPU per request (server and load generator, every kind summed) at fixed
    quotas q; a server bound by that CPU carries k x its full-quota rate at keep q = (1/k)(1 + F/V) - F/V,
    a cut of (1 - 1/k)(1 + F/V)."""
    qs = np.array(sorted(cost))
    tot = np.array([sum(cost[q].values()) for q in qs])
    v, f = np.polyfit(qs, tot, 1)
    r = f / v
    return {"per_quota_us": {float(q): round(float(t), 1) for q, t in zip(qs, tot)},
            "by_kind": {float(q): cost[q] for q in qs}, "fixed_us": round(float(f), 1), "per_kept_us": round(float(v), 1),
            "f_over_v": round(float(r), 4),
            "cut_for": {x: round(float(min(1.0, (1.0 - 1.0 / x) * (1.0 + r))), 3) for x in xs}}


def max_rate(d, trace, start, a, row, log, what):
    """The highest constant rate with p99 <= SLO and every request answered: doubling from ``start``,
    then bisection to 5 %."""
    lo, hi, rate = None, None, start
    while lo is None or hi is None:         # doubling up, or halving down, to a pass and a fail
        r, row = point(d, trace, rate, a.search_duration, 3.0, row, a.slo_ms, seed=int(rate))
        log(f"max search {rate:g}/s ({what}): p99 {r['p99_ms']} answered {r['answered_share']} {r['errors']}")
        if r["pass"]:
            lo, rate = rate, rate * 2
        else:
            hi, rate = rate, rate / 2
            if rate < 10:
                return 0.0, row
        if lo is not None and hi is not None and lo > hi:
            lo = None
    while lo is not None and hi - lo > 0.05 * lo:
        rate = (lo + hi) / 2
        r, row = point(d, trace, rate, a.search_duration, 3.0, row, a.slo_ms, seed=int(rate))
        log(f"max search {rate:g}/s ({what}): p99 {r['p99_ms']} answered {r['answered_share']} {r['errors']}")
        lo, hi = (rate, hi) if r["pass"] else (lo, rate)
    return lo or 0.0, row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/jzb/shed")
    ap.add_argument("--base", default="/tmp/jzb/demo/models/demo/1", help="The demo version directory.")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=30.0, help="Measured seconds per point.")
    ap.add_argument("--search-duration", type=float, default=15.0, help="Seconds per point of the max-rate search.")
    ap.add_argument("--warmup", type=float, default=0.0,
                    help="Seconds of the same load before each overload point, left out (0: measured from the start).")
    ap.add_argument("--xs", default="1.5,2,3", help="Multiples of the maximum sustainable rate.")
    ap.add_argument("--spearman", default="0.8,0.5,0.65~0.3",
                    help="Traces: a Spearman correlation, or MEAN~SPREAD for requests that differ (jizhi.tools.demo.generate_trace).")
    ap.add_argument("--policies", default="rule,learned")
    ap.add_argument("--requests", type=int, default=40000, help="Requests in each evaluation trace.")
    ap.add_argument("--train-requests", type=int, default=3000)
    ap.add_argument("--diurnal-x", type=float, default=2.0, help="Peak of the diurnal run, x max (0: no run).")
    ap.add_argument("--period", type=float, default=120.0, help="Seconds of the diurnal run (one day).")
    ap.add_argument("--max-rate", type=float, default=None, help="Skip the search: the max sustainable rate.")
    ap.add_argument("--floor-quotas", default="0.5,0.25",
                    help="Also the max sustainable rate with every request keeping each of these (what a cut can buy).")
    ap.add_argument("--cost-quotas", default="1,0.5,0.25",
                    help="The CPU per request at each of these fixed quotas, each at --cost-rate x its own "
                         "maximum (the search's at that quota, with it in --floor-quotas; else the shedding-off maximum, too low "
                         "a rate for a cut quota to be near saturation; empty: none): its fixed part F and per-kept-fraction part V, "
                         "and the cut (1 - 1/k)(1 + F/V) a server bound by that CPU needs at k x.")
    ap.add_argument("--cost-rate", type=float, default=0.9,
                    help="The rate of a cost point, x the maximum found at its quota (near saturation: at a low "
                         "rate the idle loop's CPU is spread over few requests).")
    ap.add_argument("--out", default="/tmp/jzb/shed/results.json")
    ap.add_argument("--shed-low", type=float, default=None, help="shed.low for the daemon (default: the setting's).")
    ap.add_argument("--plot", default=str(REPO / "docs" / "img" / "diurnal-shedding.png"))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # a stop still stops the daemon (finally)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)   # noqa: E731
    models = work / "models"
    if not (models / "demo" / "1").exists():
        shutil.copytree(a.base, models / "demo" / "1", copy_function=os.link)
    vdir = models / "demo" / "1"
    traces, policies, reports = {}, {}, {}
    for sp in a.spearman.split(","):
        mean, _, spread = sp.partition("~")
        mean, spread = float(mean), float(spread or 0.0)
        ev, tr = work / f"eval-{sp}.npz", work / f"train-{sp}.npz"
        if not ev.exists():
            log(f"trace spearman {sp}: {a.requests} requests")
            generate_trace(str(vdir), ev, requests=a.requests, candidates=500, spearman=mean, seed=11,
                           progress=False, spread=spread)
        if not tr.exists():
            generate_trace(str(vdir), tr, requests=a.train_requests, candidates=500, spearman=mean, seed=12,
                           progress=False, spread=spread)
        traces[sp] = Trace(ev)
        pol = work / f"policy-{sp}.json"
        doc, report = train(Trace(tr), vdir, quotas=(0.2, 0.3, 0.4, 0.5))
        save_policy(doc, pol)
        policies[sp], reports[sp] = pol, report
        log(f"policy {sp}: held-out R2 {report['held_out_r2_log_need']}, offline quality at equal kept fraction:")
        for q in report["quality"]:
            log(f"  quota {q['quota']:.2f} {q['subset']:<8} rule kept {q['rule']['kept']:.3f} overlap "
                f"{q['rule']['overlap']:.4f} | learned kept {q['learned']['kept']:.3f} overlap {q['learned']['overlap']:.4f}")
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cores": os.cpu_count(), "argv": sys.argv[1:], "slo_ms": a.slo_ms, "offline": reports, "points": []}
    ref = ReferenceScorer(vdir)
    d = mm.Daemon(work, "shed", 5621, [REPO / "etc" / "pipelines" / "demo_shed.toml"],
                  f'[shed]\nslo_ms = {a.slo_ms}\nmode = "auto"\n' + (f"low = {a.shed_low}\n" if a.shed_low else ""))
    try:
        first = traces["0.8"] if "0.8" in traces else next(iter(traces.values()))
        row = 0
        if a.max_rate:
            best = a.max_rate
        else:
            d.ctl("shed", "off")
            best, row = max_rate(d, first, 100.0, a, row, log, "shedding off")
        results["max_rate"] = best
        log(f"max sustainable rate, shedding off: {best:g} requests/s")
        # What a cut can buy at most: the max sustainable rate with every request keeping q (manual).
        results["max_rate_at_quota"] = {}
        for q in [float(v) for v in a.floor_quotas.split(",") if v]:
            d.ctl("shed", "set", "--quota", str(q))
            results["max_rate_at_quota"][q], row = max_rate(d, first, best, a, row, log, f"every request keeps {q:g}")
            log(f"max sustainable rate keeping {q:g}: {results['max_rate_at_quota'][q]:g} requests/s "
                f"({results['max_rate_at_quota'][q] / best:.2f}x)")
        fit = capacity_fit(best, results["max_rate_at_quota"])
        if fit:
            results["capacity_fit"] = fit
            log(f"capacity at a fixed quota q, 1/R = {fit['a']:.3g} + {fit['b']:.3g} q s: the smallest fixed cut "
                f"that carries k x: " + ", ".join(f"{x:g}x {c}" for x, c in fit["cut_for"].items()))
        # The CPU a request costs at fixed quotas, one rate: F (whatever is cut) and V (per kept fraction).
        cost = {}
        for q in [float(v) for v in a.cost_quotas.split(",") if v]:
            d.ctl("shed", "off") if q >= 1.0 else d.ctl("shed", "set", "--quota", str(q))
            at_q = best if q >= 1.0 else results["max_rate_at_quota"].get(q, best)
            r, row = point(d, first, a.cost_rate * at_q, a.search_duration, 3.0, row, a.slo_ms, seed=int(q * 100))
            cost[q] = r["cpu_us_per_request"]
            log(f"cost at quota {q:g}, {r['rate']:g}/s: p99 {r['p99_ms']} ms, CPU us per request {cost[q]}")
        if len(cost) >= 2:
            results["cost_model"] = cost_model(cost, [float(v) for v in a.xs.split(",")])
            cm = results["cost_model"]
            log(f"cost model: F {cm['fixed_us']:g} us + V {cm['per_kept_us']:g} us x kept fraction (F/V "
                f"{cm['f_over_v']:.3f}); the cut a CPU-bound server needs: "
                + ", ".join(f"{x}x {c}" for x, c in cm["cut_for"].items()))
        d.ctl("shed", "auto")
        for sp, trace in traces.items():
            truth = Truth(ref, trace)
            for pol in a.policies.split(","):
                d.ctl("shed", "set", "--policy", "rule" if pol == "rule" else str(policies[sp]))
                for x in [float(v) for v in a.xs.split(",")]:
                    d.ctl("shed", "auto")          # a fresh start: no cut, rates forgotten, trim 1
                    time.sleep(1.0)
                    r, row = point(d, trace, x * best, a.duration, a.warmup, row, a.slo_ms, truth, seed=int(x * 10))
                    r.update(x=x, spearman=sp, policy=pol, ideal_cut=round(1.0 - 1.0 / x, 4))
                    if "cost_model" in results:
                        r["cpu_model_cut"] = results["cost_model"]["cut_for"].get(x)
                    if fit:
                        r["fixed_cut_fit"] = fit["cut_for"].get(x)
                    results["points"].append(r)
                    log(f"spearman {sp} {pol:<7} {x:g}x ({r['rate']:g}/s): p99 {r['p99_ms']} ms (after 5 s "
                        f"{r['p99_after_5s_ms']}), answered {r['answered_share']}, cut {r['shed_ratio']} (1-1/k "
                        f"{r['ideal_cut']:.3f}, CPU model {r.get('cpu_model_cut')}, fixed cuts' fit "
                        f"{r.get('fixed_cut_fit')}), top-10 overlap {r['top10_overlap']} (bound at the same cut "
                        f"{r.get('bound_at_same_cut')}) {r['errors']}; "
                        f"cut p10/p50/p90 {r['shed_ratio_p10_p50_p90']}; {r.get('admission')}")
        if a.diurnal_x:
            sp = "0.8" if "0.8" in traces else next(iter(traces))
            d.ctl("shed", "set", "--policy", str(policies[sp]))
            d.ctl("shed", "auto")
            fn = rate_fn("diurnal", a.diurnal_x * best, trough_ratio=10.0, period_s=a.period)
            times = arrivals(fn, a.period, seed=7)
            log(f"diurnal: peak {a.diurnal_x * best:.0f}/s, trough {a.diurnal_x * best / 10:.0f}/s, {a.period:g} s")
            res = run_timeline(d.endpoint, traces[sp], "demo_shed", times, first_row=row)
            series = timeline_series(res, "demo_shed", a.slo_ms)
            results["diurnal"] = series
            Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
            plot_timeline(series, a.plot, f"demo_shed, diurnal load (peak {a.diurnal_x:g}x max), learned policy")
            log(f"diurnal plot: {a.plot}; answered {sum(series['answered_rps'])} of {sum(series['offered_rps'])}")
    finally:
        d.stop()
        Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    log(f"results: {a.out}")


if __name__ == "__main__":
    main()
