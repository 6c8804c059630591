"""The analysis and the report of a ``jizhictl bench-reload`` run (jizhi/tools/reloadbench.py).

Runs in the benchmark's process after the load ended. Reads the load's
per-request arrays (``ReloadLoad``: intended send time, reply time, status,
answering version, broker/queue/service ms), the memory sampler's samples
(``procfs.MemorySampler``) and the reload driver's timeline, and folds them
into the windows the module docstring of reloadbench defines: steady, each
switch window with its phases (validating, starting, warming, draining,
released), after; ``print_report`` prints the tables.
"""
import collections
import math
import time

import numpy as np

WARMUP_S = 3.0               # load before the steady window, not counted
RELEASE_TAIL_S = 1.0         # the switch window ends this long after the release
TIMELINE_BUCKET_S = 0.5
MIB = 2 ** 20


def latency_stats(loop, a, b):
    """Latency (ms, from the intended send time) of the requests intended in [a, b) (monotonic)."""
    due = loop.t0 + loop.due_rel
    sel = (due >= a) & (due < b) & (loop.status != 4)
    st = loop.status[sel]
    ok = st == 1
    lat = (loop.done_at[sel][ok] - due[sel][ok]) * 1000.0
    lag = (loop.sent_at[sel] - due[sel]) * 1000.0
    out = {"from_s": round(a - loop.t0, 3), "to_s": round(b - loop.t0, 3), "requests": int(sel.sum()),
           "ok": int(ok.sum()), "errors": int((st == 2).sum()), "lost": int((st == 3).sum())}
    if lat.shape[0]:
        p = np.percentile(lat, [50, 99, 99.9])
        out.update(p50_ms=round(float(p[0]), 2), p99_ms=round(float(p[1]), 2), p99_9_ms=round(float(p[2]), 2),
                   max_ms=round(float(lat.max()), 2))
    else:
        out.update(p50_ms=None, p99_ms=None, p99_9_ms=None, max_ms=None)
    out["send_lag_p99_ms"] = round(float(np.percentile(lag, 99)), 2) if lag.shape[0] else None
    # Where the time of the slowest 1 % went: mean of each part over the requests at or above the p99.
    if lat.shape[0]:
        tail = lat >= np.percentile(lat, 99)
        parts = {"broker": loop.broker_ms[sel][ok], "queue_wait": loop.wait_ms[sel][ok],
                 "service": loop.service_ms[sel][ok]}
        parts["outside_broker"] = lat - parts["broker"]
        out["p99_tail_parts_ms"] = {k: (round(float(np.nanmean(v[tail])), 2) if np.isfinite(v[tail]).any()
                                        else None) for k, v in parts.items()}
    return out


def slowest(loop, a, b, t_ref, count=10):
    """The ``count`` slowest OK requests intended in [a, b): [s after t_ref, latency, broker, queue wait,
    service (ms), version]."""
    due = loop.t0 + loop.due_rel
    idx = np.nonzero((due >= a) & (due < b) & (loop.status == 1))[0]
    lat = (loop.done_at[idx] - due[idx]) * 1000.0
    top = idx[np.argsort(lat)[::-1][:count]]
    def r1(x):
        return None if not np.isfinite(x) else round(float(x), 1)
    return [[round(float(due[i] - t_ref), 3), r1((loop.done_at[i] - due[i]) * 1000.0), r1(loop.broker_ms[i]),
             r1(loop.wait_ms[i]), r1(loop.service_ms[i]), int(loop.version[i])] for i in top]


def timeline(loop):
    """Per TIMELINE_BUCKET_S of intended send time: [start s, requests, p50 ms, p99 ms, max ms]."""
    ok = loop.status == 1
    t = loop.due_rel[ok]
    lat = (loop.done_at[ok] - (loop.t0 + loop.due_rel[ok])) * 1000.0
    out = []
    if not t.shape[0]:
        return out
    b = np.floor(t / TIMELINE_BUCKET_S).astype(np.int64)
    for k in range(int(b.max()) + 1):
        x = lat[b == k]
        if x.shape[0]:
            p = np.percentile(x, [50, 99])
            out.append([round(k * TIMELINE_BUCKET_S, 1), int(x.shape[0]), round(float(p[0]), 1),
                        round(float(p[1]), 1), round(float(x.max()), 1)])
    return out


def _mib(v):
    return None if v is None else round(float(v) / MIB, 1)


def memory_window(sampler, a, b, t_ref=None, how="median"):
    """PSS, RSS, anonymous RSS and /dev/shm (MiB) over [a, b): the median, or the peak (with its time)."""
    t, rss, anon, shm = sampler.series(a, b)
    ps, pss = sampler.pss_series(a, b)
    if not rss.shape[0]:
        return None
    if how == "median":
        out = {"pss_mib": _mib(np.median(pss)) if pss.shape[0] else None, "rss_mib": _mib(np.median(rss)),
               "anon_mib": _mib(np.median(anon)), "shm_mib": _mib(np.median(shm)),
               "samples": int(rss.shape[0]), "pss_samples": int(pss.shape[0])}
        return out
    i = int(np.argmax(rss))
    out = {"rss_mib": _mib(rss[i]), "rss_at_s": round(float(t[i] - t_ref), 2), "anon_mib": _mib(anon.max()),
           "shm_mib": _mib(shm.max()), "pss_mib": None, "pss_at_s": None, "pss_by_role_mib": None,
           "processes_max": max(len(x["procs"]) for x in sampler.samples if a <= x["t"] < b)}
    if pss.shape[0]:
        j = int(np.argmax(pss))
        roles = collections.defaultdict(float)
        for role, p, _ in ps[j]["procs"].values():
            roles[role] += p
        out.update(pss_mib=_mib(pss[j]), pss_at_s=round(float(ps[j]["t"] - t_ref), 2),
                   pss_by_role_mib={r: _mib(v) for r, v in sorted(roles.items())})
    return out


def analyse(loop, sampler, driver, conditions):
    t0 = loop.t0
    first = driver.reloads[0]["t_rename"] if driver.reloads else loop.stop_at
    steady_a = t0 + WARMUP_S
    steady = latency_stats(loop, steady_a, first)
    steady["other_cores"] = sampler.other_cores(steady_a, first)
    steady_mem = memory_window(sampler, steady_a, first)
    reloads, pooled = [], np.zeros(loop.n, dtype=bool)
    due = t0 + loop.due_rel
    off = time.time() - time.monotonic()
    for k, r in enumerate(driver.reloads):
        done = r["t_released"] is not None
        a = r["t_rename"]
        b = (r["t_released"] + RELEASE_TAIL_S) if done else loop.stop_at
        pooled |= (due >= a) & (due < b)
        out = {"reload": r["reload"], "from": r["from"], "to": r["to"], "complete": done,
               "rename_s": round(a - t0, 3), "states_seen": r["states_seen"], "window": latency_stats(loop, a, b)}
        out["window"]["other_cores"] = sampler.other_cores(a, b)
        server = r.get("server") or {}
        t_serving = (server["serving_since"] - off) if server.get("serving_since") else r["t_serving_seen"]
        if done:
            # Sub-phases of loading from the server's timeline: rename -> validated (detection and the
            # validation child), -> the new workers ready (process start and stage setup), -> serving (warm-up).
            tm = server.get("timings_ms") or {}
            t_valid = a + ((tm.get("detection") or 0) + (tm.get("validation") or 0)) / 1000.0
            t_ready = min(t_valid + (tm.get("ready") or 0) / 1000.0, t_serving)
            out["phases"] = {
                "loading": latency_stats(loop, a, t_serving),
                "validating": latency_stats(loop, a, t_valid),
                "starting": latency_stats(loop, t_valid, t_ready),
                "warming": latency_stats(loop, t_ready, t_serving),
                "draining": latency_stats(loop, t_serving, r["t_released"]),
                "released": latency_stats(loop, r["t_released"], b)}
            for ph in out["phases"].values():
                lo, hi = t0 + ph["from_s"], t0 + ph["to_s"]
                if hi - lo >= 0.3:   # shorter than a few samples says nothing about CPU
                    ph["cpu_cores_by_role"] = {role: round(c / (hi - lo), 2) for role, c in
                                               sorted(sampler.cpu_by_role(lo, hi).items())}
                    ph["cpu_cores_by_role"]["(bench)"] = sampler.own_cores(lo, hi)
                    ph["cpu_cores_by_role"]["(other)"] = sampler.other_cores(lo, hi)
            out["timeline_ms"] = {
                "server": server.get("timings_ms"),
                "rename_to_serving": round((t_serving - a) * 1000, 1),
                "rename_to_released": round((r["t_released"] - a) * 1000, 1),
                "rename_ctime_vs_measured": round((server["renamed_at"] - r["t_rename_wall"]) * 1000, 1)
                if server.get("renamed_at") else None}
            answered = (loop.version == r["to"]) & (loop.status == 1)
            out["timeline_ms"]["rename_to_first_answer"] = (
                round(float((np.min(loop.done_at[answered]) - a) * 1000), 1) if answered.any() else None)
        wall = max(b - a, 1e-9)
        out["cpu_cores_by_role"] = {role: round(s / wall, 3) for role, s in
                                    sorted(sampler.cpu_by_role(a, b).items())}
        out["memory"] = {"peak": memory_window(sampler, a, b, t_ref=a, how="peak")}
        after_b = driver.reloads[k + 1]["t_rename"] if k + 1 < len(driver.reloads) else loop.stop_at
        if done and after_b > b:
            out["memory"]["after_release"] = memory_window(sampler, b, after_b)
            out["between"] = latency_stats(loop, b, after_b)
        out["slowest"] = slowest(loop, a, b, a)
        out["nice_at_rename"] = sampler.nice_at(a)
        out["nice_at_window_end"] = sampler.nice_at(b)
        out["quiet_wait_s"] = r.get("quiet_wait_s")
        reloads.append(out)
    if pooled.any():
        sel = pooled & (loop.status == 1)
        lat = (loop.done_at[sel] - due[sel]) * 1000.0
        p = np.percentile(lat, [50, 99, 99.9]) if lat.shape[0] else [None] * 3
        st = loop.status[pooled & (loop.status != 4)]
        switch = {"requests": int(st.shape[0]), "ok": int((st == 1).sum()), "errors": int((st == 2).sum()),
                  "lost": int((st == 3).sum()), "p50_ms": round(float(p[0]), 2) if lat.shape[0] else None,
                  "p99_ms": round(float(p[1]), 2) if lat.shape[0] else None,
                  "p99_9_ms": round(float(p[2]), 2) if lat.shape[0] else None,
                  "max_ms": round(float(lat.max()), 2) if lat.shape[0] else None,
                  "seconds": round(sum(r["window"]["to_s"] - r["window"]["from_s"] for r in reloads), 2)}
    else:
        switch = None
    last = driver.reloads[-1] if driver.reloads else None
    after = None
    if last is not None and last["t_released"] is not None and loop.stop_at > last["t_released"] + RELEASE_TAIL_S:
        after = latency_stats(loop, last["t_released"] + RELEASE_TAIL_S, loop.stop_at)
        after["other_cores"] = sampler.other_cores(last["t_released"] + RELEASE_TAIL_S, loop.stop_at)
    ratio = None
    if switch and switch["p99_ms"] and steady["p99_ms"]:
        ratio = round(switch["p99_ms"] / steady["p99_ms"], 3)
    # A second reference with more samples: every request after the warm-up outside the switch windows
    # (steady, the gaps between reloads, after): on a noisy machine 20 s of steady state is one draw.
    outside = (due >= steady_a) & (due < loop.stop_at) & ~pooled & (loop.status == 1)
    lat_out = (loop.done_at[outside] - due[outside]) * 1000.0
    elsewhere = None
    if lat_out.shape[0]:
        p = np.percentile(lat_out, [50, 99])
        elsewhere = {"requests": int(lat_out.shape[0]), "p50_ms": round(float(p[0]), 2),
                     "p99_ms": round(float(p[1]), 2),
                     "p99_ratio": round(switch["p99_ms"] / float(p[1]), 3) if switch and switch["p99_ms"] else None}
    for r in reloads:
        w = r["window"]
        r["p99_ratio"] = round(w["p99_ms"] / steady["p99_ms"], 3) if w["p99_ms"] and steady["p99_ms"] else None
        pk = r["memory"]["peak"]
        if pk and steady_mem:
            r["memory"]["peak_extra"] = {
                k: (round(pk[k] - steady_mem[k], 1) if pk.get(k) is not None and steady_mem.get(k) is not None
                    else None) for k in ("pss_mib", "rss_mib", "anon_mib", "shm_mib")}
    extras = [r["memory"].get("peak_extra") for r in reloads if r["memory"].get("peak_extra")]
    st_all = loop.status[loop.status != 4]
    return {
        **conditions,
        "steady": steady, "switch": switch, "after": after, "outside_switch_windows": elsewhere, "reloads": reloads,
        "p99_ratio": ratio, "target_ratio": 1.5, "target_met": bool(ratio is not None and ratio <= 1.5),
        "requests": int(st_all.shape[0]), "errors": dict(loop.codes), "lost": int((st_all == 3).sum()),
        "memory": {"baseline": steady_mem,
                   "peak_extra_max": {k: max((e[k] for e in extras if e.get(k) is not None), default=None)
                                      for k in ("pss_mib", "rss_mib", "anon_mib", "shm_mib")} if extras else None},
        "sampler": {"samples": len(sampler.samples), "pss_samples": len(sampler.pss),
                    "cpu_s": round(sampler.cpu_s, 3),
                    "cpu_cores": round(sampler.cpu_s / max(loop.stop_at - t0, 1e-9), 3)
                    if loop.stop_at != math.inf else None},
        "error": driver.error or ("the load horizon was reached before the reloads completed"
                                  if loop.horizon_reached else None),
        "latency_timeline": timeline(loop),
    }


# ----------------------------------------------------------------------------
# Report


def _f(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def print_report(r, out):
    out(f"bench-reload: {r['model']} v{' -> v'.join(map(str, r['versions']))} on {r['endpoint']} "
        f"({r['pipeline']}), {r['rate']:g} req/s offered (Poisson), {r['candidates_mean']:.0f} candidates/request")
    out("")
    out("latency from the intended send time, OK replies (ms)")
    out(f"  {'window':<40}{'span s':>13}{'requests':>9}{'p50':>8}{'p99':>8}{'max':>8}{'err':>5}{'lost':>5}"
        f"{'send lag p99':>14}{'other cores':>13}")

    def row(name, w):
        if w is None:
            return
        out(f"  {name:<40}{w['from_s']:>6.1f}-{w['to_s']:<6.1f}{w['requests']:>9}{_f(w['p50_ms']):>8}"
            f"{_f(w['p99_ms']):>8}{_f(w['max_ms']):>8}{w['errors']:>5}{w['lost']:>5}{_f(w['send_lag_p99_ms'], 2):>14}"
            f"{_f(w.get('other_cores'), 2):>13}")
    row("steady", r["steady"])
    for x in r["reloads"]:
        row(f"reload {x['reload']}: v{x['from']} -> v{x['to']} switch window", x["window"])
        for ph, label in (("validating", "validating (rename -> valid)"),
                          ("starting", "new workers start (-> ready)"), ("warming", "warm-up, hot tier (-> serving)"),
                          ("draining", "draining (serving -> released)"), ("released", "released + 1 s")):
            if x.get("phases"):
                row("    " + label, x["phases"][ph])
    row("after the last release", r["after"])
    s = r["switch"]
    if s:
        out(f"  {'all switch windows pooled':<40}{s['seconds']:>9.1f} s  {s['requests']:>9}{_f(s['p50_ms']):>8}"
            f"{_f(s['p99_ms']):>8}{_f(s['max_ms']):>8}{s['errors']:>5}{s['lost']:>5}")
    ratio = r["p99_ratio"]
    out(f"  switch p99 / steady p99 = {_f(ratio, 2)} (target <= 1.5: {'met' if r['target_met'] else 'MISSED'}); "
        f"per reload: {', '.join(_f(x['p99_ratio'], 2) for x in r['reloads'])}; "
        f"errors {sum(r['errors'].values())} {r['errors'] or ''} lost {r['lost']} of {r['requests']} requests")
    e = r.get("outside_switch_windows")
    if e:
        out(f"  every request outside the switch windows (steady, gaps, after; {e['requests']}): p50 {_f(e['p50_ms'])} "
            f"p99 {_f(e['p99_ms'])} ms; switch p99 / that p99 = {_f(e['p99_ratio'], 2)}")
    out("")
    out("the slowest 1 % of each window: mean ms in the broker (admission to answer: queue wait + service + "
        "the rest), and outside it (generator, sockets)")
    out(f"  {'window':<40}{'broker':>9}{'wait':>9}{'service':>9}{'outside':>9}")

    def parts(name, w):
        p = (w or {}).get("p99_tail_parts_ms")
        if p:
            out(f"  {name:<40}{_f(p['broker']):>9}{_f(p['queue_wait']):>9}{_f(p['service']):>9}"
                f"{_f(p['outside_broker']):>9}")
    parts("steady", r["steady"])
    for x in r["reloads"]:
        parts(f"reload {x['reload']} switch window", x["window"])
        for ph in ("validating", "starting", "warming", "draining", "released"):
            if x.get("phases"):
                parts("    " + ph, x["phases"][ph])
    parts("after the last release", r["after"])
    out("")
    out("nice of the workers (main thread) at the rename and at the end of each switch window:")
    for x in r["reloads"]:
        def nices(d):
            return ", ".join(f"{k} {v}" for k, v in d.items() if k.startswith("workers"))
        out(f"  reload {x['reload']}: at the rename {nices(x['nice_at_rename'])}; at the end {nices(x['nice_at_window_end'])}"
            + (f"; waited {x['quiet_wait_s']} s for a quiet machine" if x.get("quiet_wait_s") else ""))
    out("")
    out("server timeline per reload (ms): from `jizhictl models` timings_ms, and measured here")
    out(f"  {'reload':<14}{'detect':>8}{'validate':>9}{'start':>8}{'load':>8}{'ready':>8}{'warm':>8}{'switch':>8}"
        f"{'total':>8}{'-> 1st answer':>15}{'-> released':>13}")
    for x in r["reloads"]:
        tl = x.get("timeline_ms") or {}
        t = tl.get("server") or {}
        out(f"  {x['reload']}: v{x['from']}->v{x['to']:<7}{_f(t.get('detection'), 0):>8}{_f(t.get('validation'), 0):>9}"
            f"{_f(t.get('start'), 0):>8}{_f(t.get('load'), 0):>8}{_f(t.get('ready'), 0):>8}"
            f"{_f(t.get('warm_up'), 0):>8}{_f(t.get('switch'), 2):>8}{_f(t.get('total'), 0):>8}"
            f"{_f(tl.get('rename_to_first_answer'), 0):>15}{_f(tl.get('rename_to_released'), 0):>13}")
    out("")
    m = r["memory"]["baseline"] or {}
    out("memory of jizhid and its children (MiB): PSS counts a shared page once, RSS once per process; "
        "anon = anonymous RSS; shm = allocated /dev/shm/jizhi.<instance>.*")
    out(f"  {'':<34}{'PSS':>9}{'RSS':>9}{'anon':>9}{'shm':>7}")
    out(f"  {'baseline (steady window, median)':<34}{_f(m.get('pss_mib')):>9}{_f(m.get('rss_mib')):>9}"
        f"{_f(m.get('anon_mib')):>9}{_f(m.get('shm_mib')):>7}")
    for x in r["reloads"]:
        pk, ex = x["memory"].get("peak") or {}, x["memory"].get("peak_extra") or {}
        out(f"  {'reload ' + str(x['reload']) + ' peak':<34}{_f(pk.get('pss_mib')):>9}{_f(pk.get('rss_mib')):>9}"
            f"{_f(pk.get('anon_mib')):>9}{_f(pk.get('shm_mib')):>7}   PSS peak at +{_f(pk.get('pss_at_s'))} s, "
            f"{pk.get('processes_max')} processes at most")
        out(f"  {'  peak extra':<34}{_f(ex.get('pss_mib')):>9}{_f(ex.get('rss_mib')):>9}{_f(ex.get('anon_mib')):>9}"
            f"{_f(ex.get('shm_mib')):>7}")
        ar = x["memory"].get("after_release")
        if ar:
            out(f"  {'  after release (median)':<34}{_f(ar.get('pss_mib')):>9}{_f(ar.get('rss_mib')):>9}"
                f"{_f(ar.get('anon_mib')):>9}{_f(ar.get('shm_mib')):>7}")
        if pk.get("pss_by_role_mib"):
            out("    PSS at the peak by process: " + ", ".join(f"{k} {v:.0f}" for k, v in pk["pss_by_role_mib"].items()))
    out("")
    out("CPU in each switch window (cores), by process; and in its validating and starting phases:")
    for x in r["reloads"]:
        out(f"  reload {x['reload']}: " + ", ".join(f"{k} {v:.2f}" for k, v in x["cpu_cores_by_role"].items()))
        for ph in ("validating", "starting"):
            c = (x.get("phases") or {}).get(ph, {}).get("cpu_cores_by_role")
            if c:
                out(f"    {ph} (total {sum(v or 0 for v in c.values()):.2f}): "
                    + ", ".join(f"{k} {_f(v, 2)}" for k, v in c.items()))
    smp = r["sampler"]
    out(f"sampler: {smp['samples']} samples, {smp['pss_samples']} with PSS, its own CPU {smp['cpu_s']} s "
        f"({_f(smp['cpu_cores'], 3)} cores)")
    if r["error"]:
        out(f"INCOMPLETE: {r['error']}")
