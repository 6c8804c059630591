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
    click.echo(f"{'process':<28} {'pid':>7} {'state':<10} {'uptime':>8} {'restarts':>8} {'rss':>9}")
    for p in st["processes"]:
        rss = f"{p['rss_bytes'] / 2**20:.0f}MiB" if p.get("rss_bytes") else "-"
        up = f"{p['uptime_s']}s" if p.get("uptime_s") is not None else "-"
        click.echo(f"{p['name']:<28} {p['pid'] or '-':>7} {p['state']:<10} {up:>8} {p['restarts']:>8} {rss:>9}")


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


@cli.command()
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(run_dir, instance, as_json):
    """Per pipeline: ok/s, pairs/s, latency p50/p99/p99.9; per stage: pool size, queue, events/s, wait and service p50/p99; errors by code."""
    info = _control(run_dir, instance, "stats")
    click.echo(json.dumps(info, indent=2) if as_json else _stats_table(info))


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
def reload(run_dir, instance):
    """Re-read the config and pipelines (like SIGHUP). An invalid config is refused; the running one stays."""
    r = _control(run_dir, instance, "reload")
    click.echo(f"applied: {', '.join(r['applied']) or 'nothing'}")
    if r["needs_restart"]:
        click.echo(f"changed but needs a restart: {', '.join(r['needs_restart'])}")


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
