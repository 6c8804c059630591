"""jizhictl: the control CLI (click). A thin client of the daemon's sockets.

Exit codes a script can rely on: 0 success; 1 the daemon could not be
reached (the message says what to check); 2 usage error (click's); 3 the
daemon answered with an error. Starts fast: numba and onnxruntime are
imported only by the commands that compute (demo, bench --ceiling).
"""
import json
import sys

import click

EXIT_UNREACHABLE = 1
EXIT_ERROR_REPLY = 3
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jizhi")
def cli():
    """Operate and exercise a jizhi server.

    jizhictl talks to jizhid's frontend (ZeroMQ, the same protocol any client
    speaks). Start a server with `jizhid --demo`, then try
    `jizhictl query --random 500 --bundle ~/.cache/jizhi/demo/models/demo/1`.
    """


# -- demo -------------------------------------------------------------------

@cli.group()
def demo():
    """Create the demo model bundle and request traces."""


@demo.command("publish")
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--from", "source", type=int, default=1, show_default=True, help="Version to copy.")
@click.option("--to", "version", type=int, required=True, help="The new version number.")
@click.option("--seed", type=int, default=None, help="New dense weights from this seed (the version scores differently).")
@click.option("--fault", type=click.Choice(["corrupt", "wrong_dim", "nan", "bad_onnx"]), default=None,
              help="Make a deliberately bad version, to watch the server reject it.")
def demo_publish(models_dir, source, version, seed, fault):
    """Publish a new demo version the way a training pipeline should: copy into MODELS_DIR/.incoming, then rename.

    A running jizhid notices it within models.poll_interval_s, validates it,
    loads it beside the serving version and switches when it is warm.
    """
    from pathlib import Path

    from jizhi.demo import publish, stage_version
    src = Path(models_dir) / "demo" / str(source)
    if not src.is_dir():
        raise click.ClickException(f"no demo version {source} in {models_dir}")
    staged = stage_version(models_dir, src, version, seed=seed, fault=fault)
    try:
        final = publish(staged, models_dir)
    except FileExistsError as e:
        raise click.ClickException(f"{e} exists already")
    click.echo(f"published {final}" + (f" (fault: {fault})" if fault else ""))


@demo.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=7, show_default=True, help="Everything is deterministic from this seed.")
@click.option("--users", default=10_000, show_default=True)
@click.option("--items", default=100_000, show_default=True)
@click.option("--trace-requests", default=0, show_default=True,
              help="Also write DIRECTORY/trace.npz with this many requests (0: none).")
@click.option("--candidates", default=500, show_default=True, help="Candidates per trace request.")
@click.option("--spearman", default=0.8, show_default=True,
              help="Target Spearman correlation between recall scores and the model's scores.")
def demo_init(directory, seed, users, items, trace_requests, candidates, spearman):
    """Write a complete demo bundle into DIRECTORY/models/demo/1.

    A DLRM-style model (13 dense user features, 9 user and 8 item sparse
    fields, embedding dim 32), its LMDB cube, columnar profiles of USERS users
    and ITEMS items with Zipf-like popularity. Serve it with
    `jizhid --models DIRECTORY/models`.
    """
    from pathlib import Path

    from jizhi.demo import generate_trace, init_demo
    try:
        vdir = init_demo(directory, seed=seed, users=users, items=items)
    except FileExistsError as e:
        raise click.ClickException(f"{e} (remove it or choose another DIRECTORY)")
    click.echo(f"bundle: {vdir}")
    if trace_requests:
        out = Path(directory) / "trace.npz"
        generate_trace(vdir, out, requests=trace_requests, candidates=candidates, spearman=spearman, seed=seed)
        click.echo(f"trace: {out}")


@demo.command("trace")
@click.argument("version_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--requests", default=2000, show_default=True)
@click.option("--candidates", default=500, show_default=True)
@click.option("--spearman", default=0.8, show_default=True)
@click.option("--seed", default=1, show_default=True)
def demo_trace(version_dir, out, requests, candidates, spearman, seed):
    """Write a request trace (OUT, .npz) for the bundle at VERSION_DIR."""
    from jizhi.demo import generate_trace
    generate_trace(version_dir, out, requests=requests, candidates=candidates, spearman=spearman, seed=seed)
    click.echo(f"trace: {out}")


# -- talking to the daemon --------------------------------------------------

def _client(endpoint, timeout_s):
    from jizhi.client import Client
    return Client(endpoint, timeout_s=timeout_s)


def _unreachable(endpoint, e):
    click.echo(f"jizhictl: no answer from {endpoint} ({e}); is jizhid running and is --endpoint right?", err=True)
    sys.exit(EXIT_UNREACHABLE)


@cli.command()
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True)
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds to wait for the answer.")
def info(endpoint, timeout_s):
    """Print the server's state: pipelines, workers per group, queues, counters (JSON)."""
    with _client(endpoint, timeout_s) as c:
        try:
            h = c.info()
        except TimeoutError as e:
            _unreachable(endpoint, e)
    click.echo(json.dumps(h, indent=2, default=str))


@cli.command()
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True)
@click.option("--pipeline", default="default", show_default=True)
@click.option("--user", type=int, default=None, help="User id (default: the first user of the trace or bundle).")
@click.option("--items", "items_csv", default=None, help="Comma-separated candidate item ids.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), help="Take user and candidates from a trace.")
@click.option("--index", default=0, show_default=True, help="Which trace request.")
@click.option("--random", "random_n", type=int, default=0,
              help="Draw this many candidates from --bundle's items (with the bundle's first user unless --user).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Bundle version dir for --random.")
@click.option("--top-k", default=10, show_default=True)
@click.option("--all", "ret_all", is_flag=True, help="Return every candidate's score in request order.")
@click.option("--deadline-ms", type=float, default=None)
@click.option("--timeout", "timeout_s", default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def query(endpoint, pipeline, user, items_csv, trace, index, random_n, bundle, top_k, ret_all, deadline_ms,
          timeout_s, as_json):
    """Send one score request; print the ranked items and per-stage timings."""
    import numpy as np
    recall = None
    if trace:
        t = np.load(trace, allow_pickle=False)
        a, b = int(t["offsets"][index]), int(t["offsets"][index + 1])
        items = t["items"][a:b]
        recall = t["recall_scores"][a:b]
        user = int(t["users"][index]) if user is None else user
    elif items_csv:
        try:
            items = np.array([int(x) for x in items_csv.split(",") if x.strip()], dtype=np.uint64)
        except ValueError:
            raise click.BadParameter("--items must be comma-separated integers")
    elif random_n:
        if not bundle:
            raise click.UsageError("--random needs --bundle VERSION_DIR")
        ids = np.load(f"{bundle}/profiles/items/ids.npy", mmap_mode="r")
        items = np.random.default_rng().choice(np.asarray(ids), size=random_n, replace=False)
        if user is None:
            user = int(np.load(f"{bundle}/profiles/users/ids.npy", mmap_mode="r")[0])
    else:
        raise click.UsageError("give candidates: --trace, --items or --random with --bundle")
    if user is None:
        raise click.UsageError("give --user")
    with _client(endpoint, timeout_s) as c:
        try:
            r = c.score(user, items, recall, pipeline=pipeline, top_k=top_k, ret="all" if ret_all else "topk",
                        deadline_ms=deadline_ms, check=False)
        except TimeoutError as e:
            _unreachable(endpoint, e)
    if as_json:
        out = dict(r.header)
        if r.ok:
            out["item_ids"] = [int(x) for x in r.item_ids]
            out["scores"] = [None if np.isnan(x) else float(x) for x in r.scores]
        click.echo(json.dumps(out, indent=2, default=str))
    elif r.ok:
        click.echo(f"pipeline {pipeline}  user {user}  candidates {len(items)}  model_versions {r['model_versions']}  "
                   f"unknown_items {r['unknown_items']}  missing_signatures {r.get('missing_signatures', 0)}")
        click.echo(f"{'rank':>4}  {'item_id':>20}  score")
        for i, (iid, s) in enumerate(zip(r.item_ids, r.scores)):
            click.echo(f"{i + 1:>4}  {int(iid):>20}  {s:.6f}")
        click.echo("timings (us): " + "  ".join(f"{k}={v}" for k, v in r["timings_us"].items()))
    if not r.ok:
        click.echo(f"jizhictl: {r['code']}: {r['message']}", err=True)
        sys.exit(EXIT_ERROR_REPLY)


def _add_bench():
    try:
        from jizhi.bench import bench_command
    except ImportError:  # pragma: no cover - bench is part of the package
        return
    cli.add_command(bench_command, "bench")
    from jizhi.reloadbench import bench_reload_command
    cli.add_command(bench_reload_command, "bench-reload")





def main(argv=None):
    return cli.main(args=argv, prog_name="jizhictl")


# -- operating the daemon (control socket) -----------------------------------

def _run_dir_option(f):
    f = click.option("--run-dir", type=click.Path(file_okay=False), default=None,
                     help="The daemon's run directory (holds control.ipc). Default: $JIZHI_RUN_DIR, "
                          "/run/jizhi (systemd), then /tmp/jizhi-<uid>-<instance>.")(f)
    f = click.option("--instance", default="default", show_default=True, help="Instance name (server.instance).")(f)
    return f


def _control(run_dir, instance, cmd, args=None, timeout_s=5.0):
    from pathlib import Path

    from jizhi import control
    dirs = [Path(run_dir)] if run_dir else control.run_dir_candidates(instance)
    tried = []
    for d in dirs:
        if not (d / control.SOCKET_NAME).exists():
            tried.append(str(d))
            continue
        try:
            return control.call(d, cmd, args, timeout_s)
        except ConnectionError as e:
            click.echo(f"jizhictl: jizhid is not answering on {d / control.SOCKET_NAME} ({e}); "
                       "is it running (systemctl status jizhi, or its log)?", err=True)
            sys.exit(EXIT_UNREACHABLE)
        except control.ControlError as e:
            click.echo(f"jizhictl: {cmd} refused: {e}", err=True)
            sys.exit(EXIT_ERROR_REPLY)
    click.echo(f"jizhictl: jizhid is not running (no control socket in {', '.join(tried)}); "
               "pass --run-dir or --instance if it runs elsewhere", err=True)
    sys.exit(EXIT_UNREACHABLE)


def _fmt_us(v):
    return "-" if v is None else (f"{v / 1000:.2f}ms" if v >= 1000 else f"{v}us")


@cli.command()
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run_dir, instance, as_json):
    """Processes, pids, uptime, model versions and health of a running jizhid."""
    st = _control(run_dir, instance, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"jizhid instance {st['instance']}  pid {st['pid']}  up {st['uptime_s']}s  health {st['health']}")
    click.echo(f"frontend {st['frontend']}  models {st['models']}  pipelines {', '.join(st['pipelines'])}")
    for problem in st.get("model_problems", []):
        click.echo(f"model version not served: {problem}")
    click.echo(f"{'process':<28} {'version':>7} {'pid':>7} {'state':<10} {'uptime':>8} {'restarts':>8} {'rss':>9}")
    for p in st["processes"]:
        rss = f"{p['rss_bytes'] / 2**20:.0f}MiB" if p.get("rss_bytes") else "-"
        up = f"{p['uptime_s']}s" if p.get("uptime_s") is not None else "-"
        ver = "-" if p.get("version") is None else p["version"]
        click.echo(f"{p['name']:<28} {ver:>7} {p['pid'] or '-':>7} {p['state']:<10} {up:>8} {p['restarts']:>8} {rss:>9}")


def _stats_table(info):
    lines = []
    lines.append(f"answered {info['answered']}  errors {info['errors'] or '{}'}  malformed {info['malformed']}  "
                 f"draining {info['draining']}  up {info['uptime_s']}s")
    lines.append(f"{'pipeline':<26} {'in flight':>9} {'ok/s':>7} {'pairs/s':>9} {'p50':>9} {'p99':>9} {'p99.9':>9}")
    for pname, p in info["pipelines"].items():
        rq = p.get("requests", {})
        lat = rq.get("latency_us", {})
        lines.append(f"{pname:<26} {p['in_flight']:>9} {rq.get('ok_per_s', 0):>7} {rq.get('pairs_per_s', 0):>9,.0f} "
                     f"{_fmt_us(lat.get('p50')):>9} {_fmt_us(lat.get('p99')):>9} {_fmt_us(lat.get('p99_9')):>9}")
    lines.append(f"{'pipeline/group':<26} {'workers':>7} {'queue':>6} {'events/s':>9} {'wait p50':>9} {'wait p99':>9} "
                 f"{'svc p50':>9} {'svc p99':>9}")
    for pname, p in info["pipelines"].items():
        for g, gs in p["groups"].items():
            lines.append(f"{pname + '/' + g:<26} {gs['workers']:>7} {gs['queue']:>6} {gs['events_per_s']:>9} "
                         f"{_fmt_us(gs['wait_us']['p50']):>9} {_fmt_us(gs['wait_us']['p99']):>9} "
                         f"{_fmt_us(gs['service_us']['p50']):>9} {_fmt_us(gs['service_us']['p99']):>9}")
    return "\n".join(lines)


def _ratio(r):
    return "-" if r is None else f"{100 * r:.1f}%"


def _storage_lines(info):
    """Hot-tier hit ratio per pipeline: since start and over the last minute."""
    lines = []
    for pname, c in info.get("cube", {}).items():
        last = c.get("last_minute") or {}
        lines.append(f"{pname}: cube lookups {c['lookups']:,}  hot tier {_ratio(c['hot_ratio'])} since start, "
                     f"{_ratio(last.get('hot_ratio'))} last minute ({last.get('lookups', 0):,} lookups)")
        if c.get("qcache_candidates"):
            lines.append(f"{pname}: query cache {_ratio(c['qcache_ratio'])} of {c['qcache_candidates']:,} candidates "
                         f"since start, {_ratio(last.get('qcache_ratio'))} last minute")
    return "\n".join(lines)


def _versions_lines(info):
    """Model versions loaded per pipeline, and versions that are not served and why."""
    lines = []
    for pname, p in info["pipelines"].items():
        vs = ", ".join(f"{v} {x['state']} ({x['in_flight']} in flight)" for v, x in p.get("versions", {}).items())
        lines.append(f"{pname}: model {p['model']} versions: {vs}")
    for name, m in info.get("models", {}).items():
        for v in m["versions"]:
            if v["state"] in ("rejected", "refused", "failed"):
                lines.append(f"model {name} version {v['version']} {v['state']}: {v['error']}")
    return "\n".join(lines)


@cli.command()
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(run_dir, instance, as_json):
    """Per pipeline: ok/s, pairs/s, latency p50/p99/p99.9; per stage: pool size, queue, events/s, wait and service p50/p99; errors by code."""
    info = _control(run_dir, instance, "stats")
    click.echo(json.dumps(info, indent=2) if as_json else
               "\n".join([_stats_table(info), _storage_lines(info), _versions_lines(info)]))


@cli.command()
@_run_dir_option
@click.argument("group")
@click.argument("n", type=int)
@click.option("--pipeline", default=None, help="Pipeline (default: the server's default pipeline).")
def scale(run_dir, instance, group, n, pipeline):
    """Set the pool size of GROUP (a stage, or a fused group) to N worker processes.

    Scaling down retires workers without dropping a request: the broker sends
    them nothing new and stops them once they hold nothing.
    """
    r = _control(run_dir, instance, "scale", {"group": group, "n": n, "pipeline": pipeline})
    click.echo(f"{r['pipeline']}/{r['group']}: {r['before']} -> {r['after']} workers")


@cli.command()
@_run_dir_option
def drain(run_dir, instance):
    """Stop admitting requests (clients get OVERLOADED) and finish those in flight. `resume` undoes it."""
    _control(run_dir, instance, "drain")
    click.echo("draining: no new requests are admitted")


@cli.command()
@_run_dir_option
def resume(run_dir, instance):
    """Admit requests again after `drain`."""
    _control(run_dir, instance, "resume")
    click.echo("admitting requests")


@cli.command()
@_run_dir_option
@click.argument("model", required=False)
def reload(run_dir, instance, model):
    """Rescan the model directory now (only MODEL's, if named) and re-read the config and pipelines (like SIGHUP).

    A new model version is noticed by the watcher within
    models.poll_interval_s anyway; this also retries versions refused for the
    memory budget. An invalid config is refused; the running one stays.
    """
    r = _control(run_dir, instance, "reload", {"model": model} if model else None)
    click.echo(f"applied: {', '.join(r['applied']) or 'nothing'}")
    if r.get("new_versions"):
        click.echo(f"new model versions: {', '.join(r['new_versions'])}")
    if r["needs_restart"]:
        click.echo(f"changed but needs a restart: {', '.join(r['needs_restart'])}")


def _when(ts):
    import time
    return "-" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


@cli.command()
@_run_dir_option
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(run_dir, instance, model, as_json):
    """Models and their versions: state, serving policy, when a version appeared and began serving, its load timeline and error.

    Timeline (ms): detect = rename to noticed; validate = the validation child;
    start = process start of its slowest worker; load = its stages' setup;
    warm = replaying recorded requests; total = rename to serving.
    """
    r = _control(run_dir, instance, "models")
    if model is not None:
        if model not in r:
            raise click.ClickException(f"no model {model!r} is served (served: {', '.join(r)})")
        r = {model: r[model]}
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for name, m in r.items():
        click.echo(f"model {name}  policy {m['policy']} ({m['policy_from']})  target {m['target']}")
        click.echo(f"  {'version':>7} {'state':<10} {'appeared':>8} {'serving':>8} {'detect':>7} {'validate':>8} "
                   f"{'start':>6} {'load':>6} {'warm':>6} {'total':>7}  error")
        for v in m["versions"]:
            t = v["timings_ms"]

            def ms(k):
                return "-" if t.get(k) is None else f"{t[k]:.0f}"
            click.echo(f"  {v['version']:>7} {v['state']:<10} {_when(v['renamed_at']):>8} {_when(v['serving_since']):>8} "
                       f"{ms('detection'):>7} {ms('validation'):>8} {ms('start'):>6} {ms('load'):>6} "
                       f"{ms('warm_up'):>6} {ms('total'):>7}  {v['error'] or ''}")


@cli.command()
@_run_dir_option
@click.argument("model")
@click.argument("version", type=int)
def pin(run_dir, instance, model, version):
    """Serve VERSION of MODEL (a rollback), whatever is newer. Remembered in <models>/MODEL/.pinned across restarts.

    The pinned version is validated and loaded beside the serving one and
    switched in when warm, like any new version. `unpin` returns to the
    pipeline file's policy.
    """
    r = _control(run_dir, instance, "pin", {"model": model, "version": version})
    click.echo(f"{model}: policy {r['policy']}" + ("" if r["persisted"] else " (in memory only: the pin file "
                                                      "could not be written, see the log)"))


@cli.command()
@_run_dir_option
@click.argument("model")
def unpin(run_dir, instance, model):
    """Return MODEL to its pipeline file's policy (usually the latest good version)."""
    r = _control(run_dir, instance, "unpin", {"model": model})
    click.echo(f"{model}: policy {r['policy']}, target version {r['target']}")


@cli.command()
@_run_dir_option
@click.option("--duration", type=click.FloatRange(min=0.1), required=True, help="Seconds of live traffic to record.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Trace file to write (.npz).")
@click.option("--pipeline", default=None, help="Only this pipeline's requests (default: all).")
def record(run_dir, instance, duration, out, pipeline):
    """Save live traffic to a trace file (docs/formats.md, "Trace") that `jizhictl bench --trace` replays.

    Every admitted score request is kept with its arrival time (t_offset_s),
    top_k and pipeline; the broker hands them over every half second, so it
    holds little. Nothing is recorded if no request arrives.
    """
    import time

    import numpy as np
    _control(run_dir, instance, "record", {"op": "start"})
    records, dropped = [], 0
    t_end = time.monotonic() + duration
    try:
        while True:
            left = t_end - time.monotonic()
            time.sleep(max(0.0, min(0.5, left)))
            last = left <= 0.5
            r = _control(run_dir, instance, "record", {"op": "stop" if last else "fetch"})
            records += [x for x in r["records"] if pipeline is None or x[1] == pipeline]
            dropped += r["dropped"]
            click.echo(f"\rrecording: {len(records)} requests, {max(0.0, t_end - time.monotonic()):.1f} s left ",
                       err=True, nl=False)
            if last:
                break
    except KeyboardInterrupt:
        _control(run_dir, instance, "record", {"op": "stop"})
        click.echo("\ninterrupted: writing what was recorded", err=True)
    click.echo("", err=True)
    if not records:
        raise click.ClickException("no requests arrived while recording; nothing written")
    items = [np.frombuffer(x[3], dtype="<u8") for x in records]
    counts = np.array([a.shape[0] for a in items], dtype=np.int64)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    recall = [np.frombuffer(x[4], dtype="<f4") if x[4] else np.zeros(c, dtype="<f4") for x, c in zip(records, counts)]
    t0 = records[0][0]
    with open(out, "wb") as f:
        np.savez(f, users=np.array([x[2] for x in records], dtype=np.uint64), offsets=offsets,
                 items=np.concatenate(items), recall_scores=np.concatenate(recall),
                 t_offset_s=np.array([x[0] - t0 for x in records], dtype=np.float64),
                 top_k=np.array([x[5] for x in records], dtype=np.int64),
                 pipelines=np.array([x[1] for x in records], dtype=np.str_),
                 seed=np.int64(-1), candidates=np.int64(int(np.median(counts))), spearman=np.float64("nan"))
    click.echo(f"wrote {out}: {len(records)} requests, {int(counts.sum())} candidates, "
               f"{records[-1][0] - t0:.1f} s of traffic" + (f"; {dropped} not recorded (buffer full)" if dropped else ""))


@cli.command()
@_run_dir_option
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--count", default=0, help="Stop after this many refreshes (0: until Ctrl-C).")
def top(run_dir, instance, interval, count):
    """A live view of the per-stage figures, refreshed every --interval seconds."""
    import time
    i = 0
    try:
        while True:
            info = _control(run_dir, instance, "stats")
            click.clear() if sys.stdout.isatty() else None
            click.echo(time.strftime("%H:%M:%S ") + _stats_table(info))
            click.echo(_breakdown(info))
            click.echo(_storage_lines(info))
            i += 1
            if count and i >= count:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


def _breakdown(info):
    """Latency breakdown by stage (queue wait and service, p50), as bars."""
    lines = ["latency breakdown (p50 per group: wait '.', service '#', 1 char = 0.25 ms)"]
    for pname, p in info["pipelines"].items():
        for g, gs in p["groups"].items():
            w = gs["wait_us"]["p50"] or 0
            s = gs["service_us"]["p50"] or 0
            bar = "." * min(60, int(w / 250)) + "#" * min(60, int(s / 250))
            lines.append(f"  {pname + '/' + g:<24} {bar}")
    return "\n".join(lines)




@cli.group()
def keys():
    """CURVE keys for the frontend (encryption plus an allow-list of clients)."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, default=("client",), show_default=True,
              help="Name of a client key pair to create and allow (repeatable).")
def keys_init(directory, clients):
    """Create a server key pair and client key pairs in DIRECTORY.

    Writes DIRECTORY/server.key (public: give it to clients),
    server.key_secret (keep it for jizhid), <client>.key and
    <client>.key_secret, and DIRECTORY/clients/<client>.key: the allow-list.
    Then set in jizhi.toml: [security] curve_server_secret =
    "DIRECTORY/server.key_secret", curve_clients_dir = "DIRECTORY/clients".
    """
    import os
    import shutil
    from pathlib import Path

    import zmq.auth
    d = Path(directory)
    allow = d / "clients"
    allow.mkdir(parents=True, exist_ok=True)
    if (d / "server.key_secret").exists():
        raise click.ClickException(f"{d / 'server.key_secret'} exists; not overwriting keys")
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(d), "server")
        for name in clients:
            pub, _sec = zmq.auth.create_certificates(str(d), name)
            shutil.copy(pub, allow / f"{name}.key")
    finally:
        os.umask(old)
    click.echo(f"server keys: {d / 'server.key'} (public), {d / 'server.key_secret'} (secret)")
    click.echo(f"allowed clients in {allow}: {', '.join(clients)}")

_add_bench()
