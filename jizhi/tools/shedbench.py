"""Traffic shapes and timelines: ``jizhictl bench --shape`` and the shedding benchmark.

A *shape* is an offered rate over time, compressed into minutes:

* ``constant``: ``--peak-rate`` all along;
* ``diurnal``: a day's swing, trough to peak and back: rate(t) = peak x (r + (1 - r) x
  (1 - cos(2 pi t / period)) / 2), r = 1 / ``--trough-ratio`` (the JIZHI paper's traffic swings
  up to 100x);
* ``step``: ``--base-rate`` with a step to ``--peak-rate`` between ``--step-at`` and
  ``--step-at + --step-s`` seconds (an overload that starts and ends at once).

Arrivals are a non-homogeneous Poisson process (``arrivals``, jizhi/tools/loadgen.py's
``shaped_times``: per 100 ms bin a Poisson count at the bin's rate, uniform times within the
bin); latency is measured from each request's intended send time. ``run_timeline`` sends the
trace's requests (in order, wrapping) through loadgen's generator on one DEALER socket, keeps
every reply's status, latency, ``shed_ratio`` and returned ids, and once a second asks the
server's ``info`` for its pools and shedding state. ``timeline_series`` folds it into per-second
series (offered and answered rates, p99, shed ratio, quota, pool sizes); ``plot_timeline`` draws
them (PNG, needs matplotlib: ``pip install 'jizhi[plot]'``).
"""
import collections
import math
import time

import numpy as np

from jizhi import protocol
from jizhi.tools.loadgen import (ENCODE_AHEAD, LOST, OK, PROGRESS_INTERVAL_S, InfoProbe, OpenLoop, load_socket,
                                 shaped_times)

SHAPES = ("constant", "diurnal", "step")


def rate_fn(shape, peak, trough_ratio=10.0, period_s=120.0, base=None, step_at=10.0, step_s=20.0):
    """rate(t) in requests/s for t seconds from the start (see the module docstring)."""
    if shape == "constant":
        return lambda t: peak
    if shape == "diurnal":
        r = 1.0 / trough_ratio
        return lambda t: peak * (r + (1.0 - r) * (1.0 - math.cos(2.0 * math.pi * t / period_s)) / 2.0)
    if shape == "step":
        low = base if base is not None else peak / 3.0
        return lambda t: peak if step_at <= t < step_at + step_s else low
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")


arrivals = shaped_times     # (the name docs/run-shed-bench.py imports)


def run_timeline(endpoint, trace, pipeline, times, *, deadline_ms=1000, top_k=10, first_row=0, progress=None,
                 info_every_s=1.0):
    """Send request ``first_row + i`` (wrapping over the trace) at ``times[i]`` seconds from now.

    jizhi/tools/loadgen.py's generator, the frames encoded a little ahead of their send time (a
    timeline can be long), with an ``InfoProbe`` asking the server's info every ``info_every_s``;
    ``progress(sent, total, seconds)`` is called every 0.5 s. Returns ``{"rows", "due",
    "latency_ms", "status" (ok|code|lost), "shed_ratio", "ids" (the returned item ids of each OK
    reply), "info": [(t, info)], "send_lag_ms" (each send's start after its due time)}``; every
    request is answered or counted lost (no reply within its deadline + 1 s)."""
    m = times.shape[0]
    rows = (first_row + np.arange(m)) % len(trace)
    status = np.array([""] * m, dtype=object)
    shed = np.full(m, np.nan)
    ids = [None] * m

    def keep(i, h, frames):
        if h.get("status") == "ok":
            shed[i] = float(h.get("shed_ratio") or 0.0)
            ids[i] = np.array(protocol.decode_reply(frames[1:])[1]["item_ids"])
        else:
            status[i] = h.get("code", "?")

    sock = load_socket(endpoint)
    probe = InfoProbe(endpoint, info_every_s)
    try:
        load = OpenLoop(sock, trace, pipeline=pipeline, due=times, rows=rows, deadline_ms=deadline_ms, top_k=top_k,
                        encode_ahead=ENCODE_AHEAD, on_reply=keep)
        t0 = time.monotonic() + 0.2
        probe.attach(load, t0)
        if progress:
            load.every(PROGRESS_INTERVAL_S, lambda now: progress(load.sent, m, now - t0))
        load.run(t0)
    finally:
        sock.close(0)
        probe.close()
    status[load.status == OK] = "ok"
    status[load.status == LOST] = "lost"
    return {"rows": rows, "due": load.due - t0, "latency_ms": load.latency_ms(), "status": status,
            "shed_ratio": shed, "ids": ids, "info": probe.infos, "send_lag_ms": (load.sent_at - load.due) * 1000}


def timeline_series(result, pipeline, slo_ms):
    """Per-second series: t, offered/s, answered/s, errors/s, p99 ms, mean shed ratio, the generator's
    latest send (ms after its due time), quota, pools."""
    due, lat, st, shed = result["due"], result["latency_ms"], result["status"], result["shed_ratio"]
    lag = result["send_lag_ms"]
    end = int(math.ceil(due.max())) if due.shape[0] else 0
    sec = np.floor(due).astype(np.int64)
    out = collections.defaultdict(list)
    for s in range(end):
        m = sec == s
        ok = m & (st == "ok")
        out["t"].append(s)
        out["offered_rps"].append(int(m.sum()))
        out["answered_rps"].append(int(ok.sum()))
        out["errors"].append(int((m & (st != "ok")).sum()))
        out["p99_ms"].append(round(float(np.percentile(lat[ok], 99)), 1) if ok.any() else None)
        out["shed_ratio"].append(round(float(np.nanmean(shed[ok])), 4) if ok.any() else None)
        out["send_lag_max_ms"].append(round(float(np.nanmax(lag[m])), 1) if m.any() else None)
    quota_t, quota, pools_t, pools = [], [], [], []
    for t, info in result["info"]:
        p = (info.get("pipelines") or {}).get(pipeline) or {}
        sh = p.get("shedding") or {}
        if "quota" in sh:
            quota_t.append(round(t, 2))
            quota.append(sh["quota"])
        pools_t.append(round(t, 2))
        pools.append({g: x["workers"] for g, x in (p.get("groups") or {}).items()})
    out["quota_t"], out["quota"], out["pools_t"], out["pools"] = quota_t, quota, pools_t, pools
    out["slo_ms"] = slo_ms
    return dict(out)


def plot_timeline(series, path, title):
    """A PNG of the series: load, cut (1 - quota) and shed ratio, p99 against the SLO, pool sizes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'jizhi[plot]'")
    fig, ax = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    t = series["t"]
    ax[0].plot(t, series["offered_rps"], label="offered req/s")
    ax[0].plot(t, series["answered_rps"], label="answered req/s")
    ax[0].set_ylabel("load")
    ax[0].legend(loc="upper left")
    ax[1].plot(series["quota_t"], [1 - q for q in series["quota"]], label="controller's cut (1 - quota)")
    ax[1].plot(t, [x if x is not None else np.nan for x in series["shed_ratio"]], label="shed ratio (replies)")
    ax[1].set_ylabel("cutoff")
    ax[1].set_ylim(0, 1)
    ax[1].legend(loc="upper left")
    ax[2].plot(t, [x if x is not None else np.nan for x in series["p99_ms"]], label="p99 per second")
    ax[2].axhline(series["slo_ms"], color="red", linestyle="--", label="SLO")
    ax[2].set_ylabel("ms")
    ax[2].legend(loc="upper left")
    groups = sorted({g for p in series["pools"] for g in p})
    for g in groups:
        ax[3].step(series["pools_t"], [p.get(g, 0) for p in series["pools"]], where="post", label=g)
    ax[3].set_ylabel("workers")
    ax[3].set_xlabel("seconds")
    if groups:
        ax[3].legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _command():
    import json

    import click

    @click.command("bench-shape")
    @click.option("--endpoint", default="tcp://127.0.0.1:5555", show_default=True, help="jizhid's frontend.")
    @click.option("--pipeline", default="default", show_default=True)
    @click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
                  help="The requests to send, in order (wrapping).")
    @click.option("--shape", type=click.Choice(SHAPES), default="diurnal", show_default=True)
    @click.option("--peak-rate", type=click.FloatRange(min=0.1), required=True, help="Requests/s at the peak.")
    @click.option("--trough-ratio", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
                  help="diurnal: peak / trough.")
    @click.option("--period", type=click.FloatRange(min=1.0), default=120.0, show_default=True,
                  help="diurnal: seconds of one compressed day.")
    @click.option("--base-rate", type=click.FloatRange(min=0.0), default=None,
                  help="step: requests/s outside the step [default: peak / 3].")
    @click.option("--step-at", type=click.FloatRange(min=0.0), default=10.0, show_default=True)
    @click.option("--step-s", type=click.FloatRange(min=0.1), default=20.0, show_default=True)
    @click.option("--duration", type=click.FloatRange(min=1.0), default=None,
                  help="Seconds [default: one period for diurnal, step-at + 2 x step-s for step, 60 for constant].")
    @click.option("--slo-ms", type=float, default=50.0, show_default=True, help="Drawn on the plot; counted per second.")
    @click.option("--deadline-ms", type=float, default=1000.0, show_default=True)
    @click.option("--seed", default=0, show_default=True)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="Write the per-second series here.")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
                  help="Draw load, cut, p99 and pool sizes over time (PNG; needs pip install 'jizhi[plot]').")
    def shape_command(endpoint, pipeline, trace_path, shape, peak_rate, trough_ratio, period, base_rate, step_at,
                      step_s, duration, slo_ms, deadline_ms, seed, json_path, plot_path):
        """Offer a traffic shape to a running jizhid and record what it did, second by second.

        Shapes (compressed into minutes): diurnal (trough to peak and back over
        --period), step (--base-rate with a step to --peak-rate from --step-at
        for --step-s), constant. Open loop, Poisson arrivals; latency from each
        request's intended send time. Prints a line per 5 s: offered and
        answered requests/s, errors, p99, the shed ratio of replies and the
        shedding quota and pool sizes from the server's info; --json keeps
        the per-second series and --plot draws them.

        \b
          jizhictl bench-shape --trace trace.npz --pipeline demo_shed --peak-rate 1400 --plot day.png
          jizhictl bench-shape --trace trace.npz --shape step --base-rate 300 --peak-rate 1500
        """
        from jizhi.ctl.inputs import Trace
        trace = Trace(trace_path)
        if duration is None:
            duration = {"diurnal": period, "step": step_at + 2 * step_s, "constant": 60.0}[shape]
        fn = rate_fn(shape, peak_rate, trough_ratio=trough_ratio, period_s=period, base=base_rate,
                     step_at=step_at, step_s=step_s)
        times = arrivals(fn, duration, seed=seed)
        click.echo(f"{shape}: {times.shape[0]} requests over {duration:g} s to {pipeline} at {endpoint}", err=True)
        res = run_timeline(endpoint, trace, pipeline, times, deadline_ms=deadline_ms)
        name = pipeline
        if pipeline == "default" and res["info"]:
            name = res["info"][-1][1].get("default_pipeline", pipeline)
        series = timeline_series(res, name, slo_ms)
        click.echo(f"{'t s':>5} {'offered/s':>9} {'answered/s':>10} {'errors':>6} {'p99 ms':>7} {'shed':>6} {'quota':>6}  pools")
        for i in range(0, len(series["t"]), 5):
            sl = slice(i, i + 5)
            p99 = [x for x in series["p99_ms"][sl] if x is not None]
            shed_r = [x for x in series["shed_ratio"][sl] if x is not None]
            q = [v for t, v in zip(series["quota_t"], series["quota"]) if i <= t < i + 5]
            pools = next((p for t, p in zip(series["pools_t"], series["pools"]) if t >= i), {})
            click.echo(f"{i:>5} {sum(series['offered_rps'][sl]) / 5:>9.0f} {sum(series['answered_rps'][sl]) / 5:>10.0f} "
                       f"{sum(series['errors'][sl]):>6} {max(p99) if p99 else float('nan'):>7.1f} "
                       f"{(sum(shed_r) / len(shed_r)) if shed_r else 0.0:>6.3f} "
                       f"{(sum(q) / len(q)) if q else float('nan'):>6.3f}  "
                       + " ".join(f"{g}={n}" for g, n in pools.items()))
        total, ok = sum(series["offered_rps"]), sum(series["answered_rps"])
        click.echo(f"answered {ok} of {total} requests ({100 * ok / max(total, 1):.2f} %)")
        if json_path:
            with open(json_path, "w") as f:
                json.dump(series, f, indent=1)
        if plot_path:
            plot_timeline(series, plot_path, f"{name}: {shape} load, peak {peak_rate:g} req/s")
            click.echo(f"plot: {plot_path}", err=True)

    return shape_command


shape_command = _command()
