"""A sweep of load points: the ``--find-max`` search, the points' table and their plot.

Runs in the operator's shell (``jizhictl bench``, jizhi/tools/bench.py). A point
is the result dict of ``LoadGenerator.run_point``; ``find_max`` calls a function
that runs one at a given rate.
"""
import click
import numpy as np

from jizhi.tools.account import format_account


def find_max(run, start_rate, max_rate, precision, max_points, log=print):
    """Search the highest passing rate: double from ``start_rate`` until a
    point fails, then bisect. Returns (points, best point or None, note)."""
    points, lo, hi = [], None, None
    rate = min(start_rate, max_rate)
    note = ""
    while len(points) < max_points:
        r = run(rate)
        points.append(r)
        log(f"  {rate:9.1f} req/s: {'pass' if r['pass'] else 'FAIL'}  p99 {r['p99_ms']} ms  "
            f"errors {r['errors'] or 0} lost {r['lost']}{' (stopped early)' if r['aborted'] else ''}"
            f"  [other processes: {r.get('other_cores', r['machine_busy_cores'])} cores]")
        if r["pass"]:
            lo = r
        else:
            hi = r
        if hi is None:
            if rate >= max_rate:
                note = f"trace-bound: passed at {max_rate:g} requests/s, the most the trace allows without repeats"
                break
            rate = min(rate * 2.0, max_rate)
        elif lo is None:
            rate = hi["offered_rps"] / 2.0
            if rate < 0.5:
                note = "nothing passes at 0.5 requests/s"
                break
        else:
            if hi["offered_rps"] - lo["offered_rps"] <= precision * lo["offered_rps"]:
                break
            rate = (lo["offered_rps"] + hi["offered_rps"]) / 2.0
        rate = round(rate, 1)
    else:
        note = f"stopped after {max_points} points"
    return points, lo, note


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def print_points(points, out=print):
    out(f"{'pipeline':<14}{'offered/s':>10}{'ok/s':>10}{'goodput pairs/s':>17}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p99.9 ms':>10}{'errors':>18}{'lost':>6}  result")
    for r in points:
        errs = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        out(f"{r['pipeline']:<14}{_fmt(r['offered_rps']):>10}{_fmt(r['ok_rps']):>10}{_fmt(r['goodput_pairs_s'], 0):>17}"
            f"{_fmt(r['p50_ms']):>9}{_fmt(r['p99_ms']):>9}{_fmt(r['p99_9_ms']):>10}{errs:>18}{r['lost']:>6}  "
            f"{'pass' if r['pass'] else 'fail'}{' (stopped early)' if r['aborted'] else ''}")


def print_detail(r, out=print):
    t = r["timings_us"]
    if t:
        out(f"  mean timings_us of OK replies ({r['pipeline']} @ {r['offered_rps']:g}/s): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in t.items()))
    c = r.get("cpu")
    if c:
        out(f"  CPU over {c['wall_s']:.1f} s: this server and generator {c['cores_busy']} cores, anything else "
            f"{c.get('foreign_cores', '?')} cores (load average {r['loadavg_1m'][0]} -> {r['loadavg_1m'][1]}); "
            f"generator send lag p99 {r['send_lag_p99_ms']} ms:")
        out(f"    {'process kind':<28}{'ms/s':>8}{'us/request':>12}")
        for kind, v in c["kinds"].items():
            out(f"    {kind:<28}{v['ms_per_s']:>8,.1f}{v['us_per_request']:>12,.1f}")
        out(f"    {'load generator':<28}{c['generator_ms_per_s']:>8,.1f}{c['generator_us_per_request']:>12,.1f}")
        out(f"    server {c['server_us_per_request']:,.0f} us/request (this pipeline + broker + supervisor: "
            f"{c['pipeline_us_per_request']:,.0f}); with the generator {c['total_us_per_request']:,.0f}")
        if c.get("account"):
            out("  CPU account, us per answered request: each process kind's main thread by phase (the "
                "stats segment), its other threads (/proc):")
            for line in format_account(c["account"], c["generator_us_per_request"], r["pipeline"]):
                out("  " + line)


def plot_sweep(runs, path, slo_ms, title):
    """A PNG of load points: latency percentiles and goodput (OK replies/s) against offered requests/s.

    One line per pipeline; points that fail (p99 over the SLO, an error, a
    lost request, stopped early) are marked with an x on the goodput panel.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'jizhi[plot]'")
    fig, (lat, good) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top = 0.0
    for i, run in enumerate(runs):
        color = f"C{i}"
        pts = sorted(run["points"], key=lambda r: r["offered_rps"])
        x = [r["offered_rps"] for r in pts]
        top = max([top] + x)
        for key, label, style in (("p50_ms", "p50", ":"), ("p99_ms", "p99", "-"), ("p99_9_ms", "p99.9", "--")):
            lat.plot(x, [np.nan if r[key] is None else r[key] for r in pts], color=color, linestyle=style,
                     marker="o", markersize=4, label=f"{run['pipeline']} {label}")
        good.plot(x, [r["ok_rps"] for r in pts], color=color, marker="o", markersize=4,
                  label=f"{run['pipeline']} OK replies/s")
        bad = [r for r in pts if not r["pass"]]
        if bad:
            good.plot([r["offered_rps"] for r in bad], [r["ok_rps"] for r in bad], linestyle="none", marker="x",
                      markersize=9, color="red", label="failed point" if i == 0 else None)
    lat.axhline(slo_ms, color="red", linestyle="--", linewidth=1, label=f"SLO: p99 <= {slo_ms:g} ms")
    lat.set_yscale("log")
    lat.set_ylabel("latency, ms (log)")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(loc="upper left", fontsize=8)
    good.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="offered")
    good.set_xlabel("offered load, requests/s")
    good.set_ylabel("goodput, OK replies/s")
    good.set_xlim(left=0)
    good.set_ylim(bottom=0)
    good.grid(True, alpha=0.3)
    good.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

