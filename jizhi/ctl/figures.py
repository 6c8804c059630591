"""The daemon's figures for people: the tables and lines of `jizhictl status`, `stats`, `top` and `cube info`.

Each function takes the ``stats`` control command's result (``status_text``:
the ``status`` command's; a dict, as ``jizhi.control.call`` returns it) and
returns text; nothing here talks to the daemon. Latencies arrive in microseconds and are printed by ``fmt_us``.
"""


def fmt_us(v):
    """A latency in microseconds, as ms from 1 ms up; "-" for none."""
    return "-" if v is None else (f"{v / 1000:.2f}ms" if v >= 1000 else f"{v}us")


def ratio(r):
    """A fraction as a percentage; "-" for none (no lookups yet)."""
    return "-" if r is None else f"{100 * r:.1f}%"


def status_text(st):
    """``jizhictl status``: the daemon's health, endpoints and models, one row per process."""
    lines = [f"jizhid instance {st['instance']}  pid {st['pid']}  up {st['uptime_s']}s  health {st['health']}"]
    if st.get("not_ready") and st["health"] != "ready":
        lines.append(f"not ready: {st['not_ready']}")
    lines.append(f"frontend {st['frontend']}  models {st['models']}  pipelines {', '.join(st['pipelines'])}")
    for problem in st.get("model_problems", []):
        lines.append(f"model version not served: {problem}")
    lines.append(f"{'process':<28} {'version':>7} {'pid':>7} {'state':<10} {'uptime':>8} {'restarts':>8} {'rss':>9}")
    for p in st["processes"]:
        rss = f"{p['rss_bytes'] / 2**20:.0f}MiB" if p.get("rss_bytes") else "-"
        up = f"{p['uptime_s']}s" if p.get("uptime_s") is not None else "-"
        ver = "-" if p.get("version") is None else p["version"]
        lines.append(f"{p['name']:<28} {ver:>7} {p['pid'] or '-':>7} {p['state']:<10} {up:>8} {p['restarts']:>8} "
                     f"{rss:>9}")
    return "\n".join(lines)


def stats_text(info):
    """``jizhictl stats``: the counters and groups table, the storage, A/B and version lines."""
    parts = (stats_table(info), storage_lines(info), ab_lines(info), versions_lines(info))
    return "\n".join(x for x in parts if x)


def stats_table(info):
    """The counters line, one row per pipeline (latency, unknown users, invalid scores) and one per stage group
    (pool, queue, wait and service times)."""
    lines = []
    lines.append(f"answered {info['answered']}  errors {info['errors'] or '{}'}  malformed {info['malformed']}  "
                 f"draining {info['draining']}  up {info['uptime_s']}s"
                 + (f" (broker up {info['broker_uptime_s']}s)" if info.get("broker_uptime_s") is not None
                    and abs(info["broker_uptime_s"] - info["uptime_s"]) >= 1 else ""))
    lines.append(f"{'pipeline':<26} {'in flight':>9} {'ok/s':>7} {'pairs/s':>9} {'p50':>9} {'p99':>9} {'p99.9':>9} "
                 f"{'unk.users':>9} {'invalid':>9}")
    for pname, p in info["pipelines"].items():
        rq = p.get("requests", {})
        lat = rq.get("latency_us", {})
        # unk.users: ok replies to a user the profiles do not know; invalid: candidates dropped from ok replies
        # (a NaN or infinite score); both since the broker started
        lines.append(f"{pname:<26} {p['in_flight']:>9} {rq.get('ok_per_s', 0):>7} {rq.get('pairs_per_s', 0):>9,.0f} "
                     f"{fmt_us(lat.get('p50')):>9} {fmt_us(lat.get('p99')):>9} {fmt_us(lat.get('p99_9')):>9} "
                     f"{p.get('unknown_users', 0):>9,} {p.get('invalid_scores', 0):>9,}")
    lines.append(f"{'pipeline/group':<26} {'workers':>7} {'queue':>6} {'events/s':>9} {'wait p50':>9} {'wait p99':>9} "
                 f"{'svc p50':>9} {'svc p99':>9}")
    for pname, p in info["pipelines"].items():
        for g, gs in p["groups"].items():
            lines.append(f"{pname + '/' + g:<26} {gs['workers']:>7} {gs['queue']:>6} {gs['events_per_s']:>9} "
                         f"{fmt_us(gs['wait_us']['p50']):>9} {fmt_us(gs['wait_us']['p99']):>9} "
                         f"{fmt_us(gs['service_us']['p50']):>9} {fmt_us(gs['service_us']['p99']):>9}")
    return "\n".join(lines)


def storage_lines(info):
    """Hot-tier hit ratio per pipeline: since start and over the last minute."""
    lines = []
    for pname, c in info.get("cube", {}).items():
        last = c.get("last_minute") or {}
        lines.append(f"{pname}: cube lookups {c['lookups']:,}  hot tier {ratio(c['hot_ratio'])} since start, "
                     f"{ratio(last.get('hot_ratio'))} last minute ({last.get('lookups', 0):,} lookups)")
        if c.get("remote_keys") is not None:
            lines.append(f"{pname}: below the hot tier: disk cache {ratio(c['disk_ratio'])}, remote cube "
                         f"{ratio(c['remote_ratio'])} of the lookups since start")
            if c.get("remote_round_trips") or c.get("remote_degraded"):
                lines.append(f"{pname}: remote cube round trips {c['remote_round_trips']:,}, keys degraded to the "
                             f"default vector {c['remote_degraded']:,} (no shard answered)")
        if c.get("user_rows"):
            u = c["user_rows"]
            lines.append(f"{pname}: user rows on Redis: {u['read']:,} users read ({u['cache_hits']:,} from the local "
                         f"cache), {u['degraded']:,} read the profile snapshot instead (no shard answered, or the "
                         "rows' layout refused)")
        if c.get("qcache_candidates"):
            lines.append(f"{pname}: query cache {ratio(c['qcache_ratio'])} of {c['qcache_candidates']:,} candidates "
                         f"since start, {ratio(last.get('qcache_ratio'))} last minute")
        if c.get("qcache_workers"):
            lines.append(f"{pname}: {qcache_line(c['qcache_workers'])}")
    return "\n".join(lines)


def qcache_line(q):
    """Whether the query cache pays, from its workers' last judgements (jizhi/supervisor/reports.py,
    ``qcache_workers``): "query cache bypassed by 2 of 2 workers: hit ratio 2.8%, saves 0.10 us per
    candidate (3.40 us per hit), costs 0.45 us"."""
    state = f"bypassed by {q['bypassed']}" if q["bypassed"] else f"on in {q['workers']}"
    state += f" of {q['workers']} workers"
    if q.get("hit_ratio") is None:
        text = f"query cache {state} (measuring: not judged yet)"
    else:
        text = (f"query cache {state}: hit ratio {ratio(q['hit_ratio'])}, saves {q['saves_us']:.2f} us per candidate "
                f"({q['hit_saves_us']:.2f} us per hit), costs {q['costs_us']:.2f} us")
    if q.get("mode") == "off":
        text += " (qcache.bypass = off: never bypassed)"
    if q.get("switches"):
        text += f"; {q['switches']} switches since start"
    return text


def ab_lines(info):
    """Per A/B group of every ab_dispatch stage: its fraction, answers, ok/s, pairs/s, latency, errors."""
    lines = []
    for pname, p in info["pipelines"].items():
        for stage, ab in (p.get("ab") or {}).items():
            lines.append(f"{pname}/{stage} A/B groups: {'group':<12} {'fraction':>8} {'ok':>8} {'ok/s':>7} "
                         f"{'pairs/s':>9} {'p50':>8} {'p99':>8}  errors  (stages)")
            for g, x in ab["groups"].items():
                lat = x["latency_us"]
                errors = ", ".join(f"{c} {n}" for c, n in x["errors"].items()) or "-"
                lines.append(f"{'':<{len(pname) + len(stage) + 13}} {g:<12} {ab['fractions'][g]:>8.3f} {x['ok']:>8} "
                             f"{x['ok_per_s']:>7} {x['pairs_per_s']:>9} {fmt_us(lat['p50']):>8} "
                             f"{fmt_us(lat['p99']):>8}  {errors}  ({', '.join(x['branch'])})")
    return "\n".join(lines)


def versions_lines(info):
    """Model versions loaded per pipeline, and versions that are not served and why."""
    lines = []
    for pname, p in info["pipelines"].items():
        vs = ", ".join(f"{v} {x['state']} ({x['in_flight']} in flight)" for v, x in p.get("versions", {}).items())
        if len(p.get("model_versions") or {}) > 1:
            vs += "; serving " + ", ".join(f"{m} {v}" for m, v in p["model_versions"].items())
        lines.append(f"{pname}: model {p['model']} versions: {vs}")
    for name, m in info.get("models", {}).items():
        for v in m["versions"]:
            if v["state"] in ("rejected", "refused", "failed"):
                lines.append(f"model {name} version {v['version']} {v['state']}: {v['error']}")
    return "\n".join(lines)
