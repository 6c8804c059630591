"""jizhictl: the control CLI (click). A thin client of the daemon's sockets.

Exit codes a script can rely on: 0 success; 1 the daemon could not be
reached (the message says what to check); 2 usage error, or an input that is
not what the command needs (a missing file, a trace or bundle that is not
one: click's one line, or ``main``'s for what the command's own checks did
not catch; never a traceback); 3 the daemon answered with an error. Starts
fast: numba and onnxruntime are imported only by the commands that compute
(demo, bench --ceiling).

Size: over 700 lines, one file per command family is issue 18's split (the
control commands, demo, bench, cube, models, keys); today each family is a
block of click commands over the shared helpers at the top.
"""
import json
import logging
import os
import sys

import click

from jizhi import logs
from jizhi.errors import JizhiError

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

    Exit codes: 0 success; 1 the daemon could not be reached; 2 a usage
    error or an input that is not what the command needs (one line names
    it); 3 the daemon refused or answered an error.
    """


def _refused(message):
    """An input the command refuses: click's one line, with the usage-error exit code 2 (not ClickException's 1)."""
    e = click.ClickException(message)
    e.exit_code = 2
    return e


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

    from jizhi.tools.demo import publish, stage_version
    src = Path(models_dir) / "demo" / str(source)
    if not src.is_dir():
        raise _refused(f"no demo version {source} in {models_dir}")
    staged = stage_version(models_dir, src, version, seed=seed, fault=fault)
    try:
        final = publish(staged, models_dir)
    except FileExistsError as e:
        raise _refused(f"{e} exists already")
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

    from jizhi.tools.demo import generate_trace, init_demo
    try:
        vdir = init_demo(directory, seed=seed, users=users, items=items)
    except FileExistsError as e:
        raise _refused(f"{e} (remove it or choose another DIRECTORY)")
    click.echo(f"bundle: {vdir}")
    if trace_requests:
        out = Path(directory) / "trace.npz"
        generate_trace(vdir, out, requests=trace_requests, candidates=candidates, spearman=spearman, seed=seed)
        click.echo(f"trace: {out}")


@demo.command("head")
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--hidden", default="256,128", show_default=True,
              help="Widths of the head's top MLP, comma-separated: 64 is light, 512,256,128 heavy.")
@click.option("--seed", type=int, default=11, show_default=True, help="Its weights are deterministic from this seed.")
def demo_head(models_dir, name, version, hidden, seed):
    """Write a head bundle MODELS_DIR/NAME/VERSION on the demo's features.

    A head is a dense-only model version (manifest `head = true`: dense.onnx,
    no cube, no profiles) that a pipeline serves on the demo's features and
    cube: a model_inference stage with `model = "NAME"`. The multi-objective,
    cascade and A/B example pipelines (etc/pipelines/multi_objective.toml,
    cascade.toml, ab.toml) use heads named ctr, cvr and dwell:

    \b
      jizhictl demo head MODELS ctr --hidden 64
      jizhictl demo head MODELS cvr --hidden 256,128
      jizhictl demo head MODELS dwell --hidden 512,256,128
    """
    from jizhi.tools.demo import write_head
    from jizhi.errors import BundleError
    try:
        widths = tuple(int(x) for x in hidden.split(","))
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not comma-separated widths, e.g. 256,128", param_hint="--hidden")
    try:
        vdir = write_head(models_dir, name, version=version, hidden=widths, seed=seed, progress=True)
    except FileExistsError as e:
        raise _refused(f"{e} exists already (a version is written once; choose another --version)")
    except (ValueError, BundleError) as e:
        raise _refused(str(e))
    click.echo(f"head bundle: {vdir}")


@demo.command("trace")
@click.argument("version_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--requests", default=2000, show_default=True)
@click.option("--candidates", default=500, show_default=True)
@click.option("--spearman", default=0.8, show_default=True,
              help="Mean Spearman correlation of recall scores with the model's scores, per request.")
@click.option("--spread", default=0.0, show_default=True,
              help="Requests differ: each its own correlation in SPEARMAN +- SPREAD, visible in the spread of its "
                   "recall scores (for the learned shedding policy).")
@click.option("--seed", default=1, show_default=True)
def demo_trace(version_dir, out, requests, candidates, spearman, spread, seed):
    """Write a request trace (OUT, .npz) for the bundle at VERSION_DIR.

    The default 2000 requests replay without repeats for 20 s at 100 requests/s
    (`jizhictl bench --trace OUT --rate 100 --duration 20`): a bench point needs
    rate x duration distinct requests.
    """
    from jizhi.tools.bench import resolve_bundle
    try:
        version_dir = resolve_bundle(version_dir)   # a model directory: its newest version
    except click.BadParameter as e:
        e.param_hint = "VERSION_DIR"
        raise
    from jizhi.tools.demo import generate_trace     # (numba, onnx: after the arguments are checked)
    generate_trace(version_dir, out, requests=requests, candidates=candidates, spearman=spearman, seed=seed,
                   spread=spread)
    click.echo(f"trace: {out}")


# -- talking to the daemon --------------------------------------------------

def _client(endpoint, timeout_s):
    from jizhi.client import Client
    return Client(endpoint, timeout_s=timeout_s)


def _unreachable(endpoint, e):
    click.echo(f"jizhictl: no answer from {endpoint} ({e}); is jizhid running and is --endpoint right?", err=True)
    sys.exit(EXIT_UNREACHABLE)


def _not_listening(endpoint):
    """Why nothing can answer on a local ``endpoint`` (ipc://, or tcp:// on a loopback address), found at
    once: no socket file, or the connection refused. None when something listens there, and for any other
    endpoint (a remote host: only the request's --timeout can tell)."""
    import ipaddress
    import socket
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if path.startswith("@"):                 # an abstract socket
            where = "\0" + path[1:]
        elif not os.path.exists(path):
            return f"no socket file {path}"
        else:
            where = path
        targets = [(socket.AF_UNIX, where)]
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port)
            if host == "localhost":
                targets = [(ai[0], ai[4]) for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
            elif ipaddress.ip_address(host).is_loopback:
                targets = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
            else:
                return None
        except (ValueError, OSError):
            return None
    else:
        return None
    for family, addr in targets:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect(addr)
            return None                           # something listens (it is asked properly next)
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        except OSError:
            return None                           # cannot tell here: the request's timeout decides
        finally:
            s.close()
    return "connection refused"


def _exit_if_not_running(endpoints):
    """A local endpoint with nothing listening is said at once, as `status` says a missing control socket:
    one line, exit code 1 (not after --timeout). With several endpoints, only when none listens."""
    reasons = [_not_listening(e) for e in endpoints]
    if all(reasons):
        where = "; ".join(f"{e}: {r}" for e, r in zip(endpoints, reasons))
        click.echo(f"jizhictl: jizhid is not running (nothing listens on {where}); "
                   "pass --endpoint if it runs elsewhere", err=True)
        sys.exit(EXIT_UNREACHABLE)


@cli.command()
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True,
              help="jizhid's client endpoint; several comma-separated: the info of each, by endpoint.")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON (for machines).")
def info(endpoint, timeout_s, as_json):
    """The server's state: pipelines, versions, pools and queues, endpoints, limits, clients, counters.

    A summary for people; --json prints the whole reply (by endpoint when
    several are given). A local endpoint with nothing listening is reported at
    once (exit code 1), as `status` reports a missing control socket.
    """
    from jizhi.client import split_endpoints
    out = {}
    for one in split_endpoints(endpoint):
        _exit_if_not_running([one])
        with _client(one, timeout_s) as c:
            try:
                out[one] = c.info()
            except TimeoutError as e:
                _unreachable(one, e)
    if as_json:
        click.echo(json.dumps(out if len(out) > 1 else out[one], indent=2, default=str))
        return
    click.echo("\n\n".join("\n".join(_info_lines(e, x)) for e, x in out.items()))


def _info_lines(endpoint, info):
    """``info`` for people: one block per endpoint."""
    def plural(n, word):
        return f"{n} {word}{'' if n == 1 else 's'}"
    up = f"up {info['uptime_s']}s" if info.get("uptime_s") is not None else ""
    broker = (f" (broker pid {info.get('pid')}, up {info['broker_uptime_s']}s)"
              if info.get("broker_uptime_s") is not None else f" (broker pid {info.get('pid')})")
    lines = [f"jizhid {('instance ' + info['instance'] + ' ') if info.get('instance') else ''}at "
             f"{info.get('frontend', endpoint)}: {'ready' if info.get('ready') else 'not ready'}"
             f"{', draining' if info.get('draining') else ''}, {up}{broker}, run {info.get('run_id', '-')}"]
    errors = ", ".join(f"{k} {v}" for k, v in (info.get("errors") or {}).items()) or "none"
    fb = info.get("feedback") or {}
    lines.append(f"answered {info.get('answered', 0):,}  errors {errors}  malformed {info.get('malformed', 0)}  "
                 f"feedback {fb.get('events', 0):,} (dropped, overlay full: {fb.get('dropped_overlay_full', 0)})")
    cl = info.get("clients") or {}
    if cl:
        lines.append(f"clients: {cl.get('connections', 0)} connected of {cl.get('limit', '-')}, "
                     f"{cl.get('refused', 0)} refused")
    lim = info.get("limits") or {}
    if lim:
        lines.append("limits: " + ", ".join(
            f"{k} {v / 1024:g} KiB" if k == "max_message_bytes" else f"{k} {v:g}" if isinstance(v, float)
            else f"{k} {v}" for k, v in lim.items()))
    for pname, p in (info.get("pipelines") or {}).items():
        rq = p.get("requests") or {}
        default = " (default)" if pname == info.get("default_pipeline") else ""
        serving = ", ".join(f"{m} {v}" for m, v in (p.get("model_versions") or {}).items()) or "none"
        lines.append(f"pipeline {pname}{default}: {'ready' if p.get('ready') else 'not ready'}, serving {serving}; "
                     f"{p.get('in_flight', 0)} in flight of {p.get('slots', '-')} slots; {rq.get('ok', 0):,} ok "
                     f"({rq.get('ok_per_s', 0)}/s), invalid scores {p.get('invalid_scores', 0)}")
        for v, x in (p.get("versions") or {}).items():
            models = ", ".join(f"{m} {n}" for m, n in (x.get("models") or {}).items())
            lines.append(f"  version {v} ({models}): {x.get('state')}, {plural(x.get('workers', 0), 'worker')}, "
                         f"{x.get('in_flight', 0)} in flight")
        for g, gs in (p.get("groups") or {}).items():
            stages = " > ".join(gs.get("stages") or []) or "(no worker: A/B dispatch)"
            lines.append(f"  group {g}: {plural(gs.get('workers', 0), 'worker')}, queue {gs.get('queue', 0)}, "
                         f"{gs.get('events_per_s', 0)} events/s; {stages}")
    return lines


@cli.command()
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True,
              help="jizhid's client endpoint; several comma-separated: sent to one, and tried on the next "
                   "when one does not answer within --timeout or answers OVERLOADED / DEADLINE_EXCEEDED.")
@click.option("--pipeline", default="default", show_default=True)
@click.option("--user", type=int, default=None, help="User id (default: the first user of the trace or bundle).")
@click.option("--items", "items_csv", default=None, help="Comma-separated candidate item ids.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), help="Take user and candidates from a trace.")
@click.option("--index", default=0, show_default=True, help="Which trace request.")
@click.option("--random", "random_n", type=int, default=0,
              help="Draw this many candidates from --bundle's items (with the bundle's first user unless --user).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Bundle version directory for --random (a model directory: its newest version).")
@click.option("--top-k", default=10, show_default=True)
@click.option("--all", "ret_all", is_flag=True, help="Return every candidate's score in request order.")
@click.option("--deadline-ms", type=float, default=None)
@click.option("--timeout", "timeout_s", default=5.0, show_default=True,
              help="Seconds to wait for each attempt's answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def query(endpoint, pipeline, user, items_csv, trace, index, random_n, bundle, top_k, ret_all, deadline_ms,
          timeout_s, as_json):
    """Send one score request; print the ranked items and per-stage timings."""
    import numpy as np
    if trace or items_csv or random_n:      # (a usage error is said first; a stopped daemon before any loading)
        _exit_if_not_running([e.strip() for e in endpoint.split(",") if e.strip()])
    recall = None
    if trace:
        from jizhi.tools.bench import Trace
        t = Trace(trace)
        if not 0 <= index < len(t):
            raise click.BadParameter(f"{index} is not a request of {trace} (it has {len(t)}: 0 .. {len(t) - 1})",
                                     param_hint="--index")
        a, b = int(t.offsets[index]), int(t.offsets[index + 1])
        items = t.items[a:b]
        recall = t.recall[a:b]
        user = int(t.users[index]) if user is None else user
    elif items_csv:
        try:
            items = np.array([int(x) for x in items_csv.split(",") if x.strip()], dtype=np.uint64)
        except ValueError:
            raise click.BadParameter("--items must be comma-separated integers")
    elif random_n:
        if not bundle:
            raise click.UsageError("--random needs --bundle VERSION_DIR")
        from jizhi.tools.bench import resolve_bundle
        bundle = resolve_bundle(bundle)     # a version directory, or a model directory: its newest version
        ids = np.load(f"{bundle}/profiles/items/ids.npy", mmap_mode="r")
        if not 0 < random_n <= ids.shape[0]:
            raise click.BadParameter(f"{random_n}: the bundle {bundle} has {ids.shape[0]} items to draw from",
                                     param_hint="--random")
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
                   f"unknown_items {r['unknown_items']}  missing_signatures {r.get('missing_signatures', 0)}"
                   f"  invalid_scores {r.get('invalid_scores', 0)}"
                   + (f"  answered by {r.endpoint} (attempt {r.attempts})" if "," in endpoint else ""))
        click.echo(f"{'rank':>4}  {'item_id':>20}  score")
        for i, (iid, s) in enumerate(zip(r.item_ids, r.scores)):
            click.echo(f"{i + 1:>4}  {int(iid):>20}  {s:.6f}")
        click.echo("timings (us): " + "  ".join(f"{k}={v}" for k, v in r["timings_us"].items()))
    if not r.ok:
        click.echo(f"jizhictl: {r['code']}: {r['message']}", err=True)
        sys.exit(EXIT_ERROR_REPLY)


def _add_bench():
    try:
        from jizhi.tools.bench import bench_command
    except ImportError:  # pragma: no cover - bench is part of the package
        return
    cli.add_command(bench_command, "bench")
    from jizhi.tools.reloadbench import bench_reload_command
    cli.add_command(bench_reload_command, "bench-reload")
    from jizhi.tools.shedbench import shape_command
    cli.add_command(shape_command, "bench-shape")





# -- import: an ONNX model with its embedding tables -> a bundle version (offline) ----

@cli.command("import")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--fields", "fields_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="FIELDS.toml: which graph inputs are the dense features and each sparse field's ids.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="The bundle version directory to write, <models>/<name>/<version> (must not exist).")
@click.option("--name", default=None, help="Model name in the manifest [default: MODEL's file stem].")
@click.option("--version", type=click.IntRange(min=1), default=1, show_default=True,
              help="Version in the manifest (jizhid wants it to match the directory name).")
@click.option("--profiles", "profiles_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Copy these profiles (a directory holding users/ and items/ in the bundle format) "
                   "instead of generating random ones.")
@click.option("--users", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Users to generate (without --profiles).")
@click.option("--items", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Items to generate (without --profiles).")
@click.option("--seed", default=1, show_default=True, help="Seed of the generated profiles and of the check's pairs.")
@click.option("--hash-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The signature hash's seed (manifest hash_seed).")
@click.option("--check-pairs", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Random (user, item) pairs scored by jizhi and by the original model.")
def import_command(model, fields_path, out_dir, name, version, profiles_dir, users, items, seed, hash_seed,
                   check_pairs):
    """Import MODEL.onnx, a DLRM-style model holding its embedding tables, as a bundle version.

    Every table (an initializer read by a Gather on axis 0, pooled by
    ReduceSum/ReduceMean over the bag axis, or by the Loop torch.onnx.export
    writes for nn.EmbeddingBag with mode sum or mean) moves into the LMDB
    cube: row v under the signature of raw value v + 1 (raw value 0 means
    missing). The graph is rewritten to take jizhi's inputs (dense,
    user_emb, item_emb, user_index) and return score [P]. Profiles are
    generated (or copied with --profiles). Then random pairs are scored by
    jizhi's own stages and by the original model on the same ids; the
    version is renamed into place only when every score agrees within
    1e-5 + 1e-5 * |original|. Weights in an external data file next to
    MODEL are read. docs/formats.md, "Importing a model", has the details.

    \b
    FIELDS.toml, for example:
      output = "prob"            # the score output (default: the only output)
      [dense]                    # optional; the dense features are per user
      input = "dense_x"          # float32 [B, N]
      [[fields]]                 # one per sparse field, in column order
      name = "u_cat"             # file names in profiles/ use it
      side = "user"              # user | item
      kind = "onehot"            # onehot | multihot | history
      input = "u_cat"            # padded ids: int64 [B] or [B, max_len]
      [[fields]]
      name = "u_tags"
      side = "user"
      kind = "multihot"
      max_len = 5
      input = "u_tags"           # int64 [B, 5]
      padding_idx = 0            # short bags are padded with row 0 (a zero row)
      [[fields]]
      name = "i_tags"
      side = "item"
      kind = "multihot"
      max_len = 8
      indices = "tags_indices"   # EmbeddingBag: flat ids [N]
      offsets = "tags_offsets"   # bag starts [B] (or [B+1], include_last_offset)
    (optional per field: id = N, the field id hashed into signatures;
    default its position in the file)

    \b
    Example:
      jizhictl import dlrm.onnx --fields fields.toml --out models/dlrm/1

    Exit codes: 0 imported and checked; 2 usage error, or refused (the
    message names the FIELDS.toml entry, the graph input or the node and
    op type), or the check failed. A refused or failed import writes
    nothing to --out.
    """
    import os

    from jizhi.errors import BundleError
    from jizhi.tools.importer import import_model
    if os.path.lexists(out_dir):
        raise click.BadParameter(f"{out_dir} exists already (a version is written into a new directory)",
                                 param_hint="--out")
    try:
        import_model(model, fields_path, out_dir, name=name, version=version, users=users, items=items, seed=seed,
                     hash_seed=hash_seed, profiles=profiles_dir, check_pairs=check_pairs,
                     log=click.echo)
    except (BundleError, FileExistsError) as e:
        refused = click.ClickException(str(e))
        refused.exit_code = 2
        raise refused


def main(argv=None):
    logs.setup("jizhictl", level=logging.WARNING)   # a library's warning is a log line, never a bare print
    try:
        return cli.main(args=argv, prog_name="jizhictl")
    except (OSError, JizhiError) as e:
        # An input that is not what the command needs (a file missing or unreadable, a bundle that is not
        # one) found below the command's own checks: one line, exit 2, never a traceback.
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        click.echo(f"jizhictl: {where}{e.strerror if isinstance(e, OSError) and e.strerror else e}", err=True)
        return 2


# -- operating the daemon (control socket) -----------------------------------

def _run_dir_option(f):
    # readable=False: a run directory that is not ours is reported by _control in its own words.
    f = click.option("--run-dir", type=click.Path(file_okay=False, readable=False), default=None,
                     help="The daemon's run directory (holds control.ipc). Default: $JIZHI_RUN_DIR, "
                          "/run/jizhi (systemd), then /tmp/jizhi-<uid>-<instance>.")(f)
    f = click.option("--instance", default="default", show_default=True, help="Instance name (server.instance).")(f)
    return f


def _control(run_dir, instance, cmd, args=None, timeout_s=5.0):
    from pathlib import Path

    from jizhi import control
    dirs = [Path(run_dir)] if run_dir else control.run_dir_candidates(instance)
    tried, denied = [], None
    for d in dirs:
        try:
            if not control.present(d):
                tried.append(str(d))
                continue
        except control.NoAccess as e:
            denied = denied or e    # (another candidate may still be ours)
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
    if denied is not None:
        click.echo(f"jizhictl: {denied}", err=True)
        sys.exit(EXIT_UNREACHABLE)
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
    if st.get("not_ready") and st["health"] != "ready":
        click.echo(f"not ready: {st['not_ready']}")
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
                 f"draining {info['draining']}  up {info['uptime_s']}s"
                 + (f" (broker up {info['broker_uptime_s']}s)" if info.get("broker_uptime_s") is not None
                    and abs(info["broker_uptime_s"] - info["uptime_s"]) >= 1 else ""))
    lines.append(f"{'pipeline':<26} {'in flight':>9} {'ok/s':>7} {'pairs/s':>9} {'p50':>9} {'p99':>9} {'p99.9':>9} "
                 f"{'invalid':>9}")
    for pname, p in info["pipelines"].items():
        rq = p.get("requests", {})
        lat = rq.get("latency_us", {})
        # invalid: candidates dropped from ok replies since the broker started (a NaN or infinite score)
        lines.append(f"{pname:<26} {p['in_flight']:>9} {rq.get('ok_per_s', 0):>7} {rq.get('pairs_per_s', 0):>9,.0f} "
                     f"{_fmt_us(lat.get('p50')):>9} {_fmt_us(lat.get('p99')):>9} {_fmt_us(lat.get('p99_9')):>9} "
                     f"{p.get('invalid_scores', 0):>9,}")
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
        if c.get("remote_keys") is not None:
            lines.append(f"{pname}: below the hot tier: disk cache {_ratio(c['disk_ratio'])}, remote cube "
                         f"{_ratio(c['remote_ratio'])} of the lookups since start")
            if c.get("remote_round_trips") or c.get("remote_degraded"):
                lines.append(f"{pname}: remote cube round trips {c['remote_round_trips']:,}, keys degraded to the "
                             f"default vector {c['remote_degraded']:,} (no shard answered)")
        if c.get("qcache_candidates"):
            lines.append(f"{pname}: query cache {_ratio(c['qcache_ratio'])} of {c['qcache_candidates']:,} candidates "
                         f"since start, {_ratio(last.get('qcache_ratio'))} last minute")
    return "\n".join(lines)


def _ab_lines(info):
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
                             f"{x['ok_per_s']:>7} {x['pairs_per_s']:>9} {_fmt_us(lat['p50']):>8} "
                             f"{_fmt_us(lat['p99']):>8}  {errors}  ({', '.join(x['branch'])})")
    return "\n".join(lines)


def _versions_lines(info):
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


@cli.command()
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(run_dir, instance, as_json):
    """Per pipeline: ok/s, pairs/s, latency p50/p99/p99.9, candidates dropped for a NaN or infinite score; per stage: pool size, queue, events/s, wait and service p50/p99; errors by code; per A/B group: its fraction, answers, latency and errors."""
    info = _control(run_dir, instance, "stats")
    click.echo(json.dumps(info, indent=2) if as_json else
               "\n".join(x for x in (_stats_table(info), _storage_lines(info), _ab_lines(info), _versions_lines(info))
                         if x))


@cli.command(context_settings={"ignore_unknown_options": True})    # N = -1 is a value (refused), not an option
@_run_dir_option
@click.argument("group")
@click.argument("n", type=click.IntRange(min=1))
@click.option("--pipeline", default=None, help="Pipeline (default: the server's default pipeline).")
def scale(run_dir, instance, group, n, pipeline):
    """Set the pool size of GROUP (a stage, or a fused group) to N worker processes.

    Scaling down retires workers without dropping a request: the broker sends
    them nothing new and stops them once they hold nothing. The size is kept
    across `jizhictl reload` (and SIGHUP) unless the config's value for that
    pool changes; a restart of jizhid starts from the config.
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
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON (with every pool's size, config, set_by).")
def reload(run_dir, instance, model, as_json):
    """Rescan the model directory now (only MODEL's, if named) and re-read the config and pipelines (like SIGHUP).

    A new model version is noticed by the watcher within
    models.poll_interval_s anyway; this also retries versions refused for the
    memory budget. An invalid config is refused; the running one stays.

    A pool resized at run time (`jizhictl scale`, the autoscaler) keeps its
    size unless the config's value for that pool changed (then the config
    wins); each such pool is named with what happened to it, e.g.
    `kept: demo/scorer pool=3 (kept from jizhictl scale; the config says 2)` or
    `applied: demo/scorer pool=4 (config changed 2 -> 4; runtime scale 3 dropped)`.
    """
    r = _control(run_dir, instance, "reload", {"model": model} if model else None)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"applied: {', '.join(r['applied']) or 'nothing'}")
    if r.get("kept"):
        click.echo(f"kept: {', '.join(r['kept'])}")
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
    warm = replaying recorded requests; total = rename to serving. A version
    served since jizhid started has one too: validate = the start's check of
    its files (sizes, sha256); warm = its workers' warm-up batch; total =
    jizhid's start to ready.
    """
    r = _control(run_dir, instance, "models")
    if model is not None:
        if model not in r:
            raise _refused(f"no model {model!r} is served (served: {', '.join(r)})")
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
    """A live view of the per-stage figures, refreshed every --interval seconds. q (or Ctrl-C) quits."""
    import time
    i = 0
    try:
        with _Keys() as keys:
            while True:
                info = _control(run_dir, instance, "stats")
                click.clear() if sys.stdout.isatty() else None
                click.echo(time.strftime("%H:%M:%S ") + _stats_table(info))
                click.echo(_breakdown(info))
                click.echo(_storage_lines(info))
                shed_lines = _shed_info_lines(info)
                if shed_lines:
                    click.echo(shed_lines)
                if keys.tty:
                    click.echo("(q quits)")
                i += 1
                if count and i >= count:
                    break
                if keys.wait_for_quit(interval):
                    break
    except KeyboardInterrupt:
        pass


class _Keys:
    """Single key presses from a terminal on stdin, without blocking (``top``'s q): the terminal is put in
    cbreak mode (keys arrive unbuffered and unechoed; Ctrl-C still interrupts) and restored on exit.
    When stdin is not a terminal, waiting is a plain sleep."""

    def __init__(self):
        self.fd, self.saved = None, None
        try:
            if sys.stdin is not None and sys.stdin.isatty():
                self.fd = sys.stdin.fileno()
        except (OSError, ValueError):
            self.fd = None

    @property
    def tty(self):
        return self.saved is not None

    def __enter__(self):
        if self.fd is not None:
            import termios
            import tty
            try:
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
            except termios.error:
                self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass

    def wait_for_quit(self, seconds):
        """Wait up to ``seconds``; True as soon as q (or Q) is pressed."""
        import select
        import time
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if not self.tty:
                time.sleep(left)
                continue
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 64)
                except OSError:
                    data = b""
                if not data:         # the terminal went away: keep refreshing, as without one
                    self.__exit__()
                    self.saved = None
                    continue
                if b"q" in data or b"Q" in data:
                    return True


def _shed_info_lines(info):
    """Shedding per pipeline with a shedder: mode, quota, the share of candidates shed lately."""
    lines = []
    for pname, p in info["pipelines"].items():
        sh = p.get("shedding")
        if sh:
            lines.append(f"{pname}: shedding {sh['mode']}, quota {sh['quota']:.3f}, policy {sh['policy']}, "
                         f"shed {100 * sh.get('shed_ratio_recent', 0.0):.1f} % of candidates in the last seconds")
    return "\n".join(lines)


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




# -- shed: load shedding (jizhi/shedding.py) ----------------------------------

@cli.group()
def shed():
    """Load shedding: the controller's quota, the pruning policy, and training a learned policy.

    A pipeline whose first stage is a `shedder` (etc/pipelines/demo_shed.toml)
    keeps only each request's best candidates by recall score when the server
    is overloaded. In mode `auto` the supervisor's controller sets the quota
    (mean fraction kept) from the live p99 against shed.slo_ms; `set` fixes it
    by hand; `off` keeps every candidate.
    """


def _shed_lines(r):
    lines = []
    for p, x in r.items():
        p99 = "-" if x.get("p99_ms") is None else f"{x['p99_ms']:.1f} ms"
        lines.append(f"{p}: mode {x['mode']}, quota {x['quota']:.3f} (keeps {100 * x['quota']:.1f} % of candidates "
                     f"on average), policy {x['policy']}, p99 {p99} (SLO {x['slo_ms']:g} ms), "
                     f"{x['in_flight']} in flight")
    return "\n".join(lines) or "no pipeline has a shedder stage"


@shed.command("status")
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def shed_status(run_dir, instance, as_json):
    """Mode, quota, policy, the recent p99 and requests in flight, per pipeline with a shedder."""
    r = _control(run_dir, instance, "shed", {"op": "status"})
    click.echo(json.dumps(r, indent=2) if as_json else _shed_lines(r))


@shed.command("auto")
@_run_dir_option
@click.option("--pipeline", default=None, help="Pipeline (default: every pipeline with a shedder).")
def shed_auto(run_dir, instance, pipeline):
    """Let the load controller set the quota from the live p99 (the default mode)."""
    click.echo(_shed_lines(_control(run_dir, instance, "shed", {"op": "auto", "pipeline": pipeline})))


@shed.command("off")
@_run_dir_option
@click.option("--pipeline", default=None, help="Pipeline (default: every pipeline with a shedder).")
def shed_off(run_dir, instance, pipeline):
    """Keep every candidate, whatever the load."""
    click.echo(_shed_lines(_control(run_dir, instance, "shed", {"op": "off", "pipeline": pipeline})))


@shed.command("set")
@_run_dir_option
@click.option("--quota", type=float, default=None,
              help="Fix the mean fraction of candidates kept (0-1]; the controller stops until `shed auto`.")
@click.option("--policy", default=None,
              help="`rule` (every request keeps the quota) or a policy file from `jizhictl shed train`.")
@click.option("--pipeline", default=None, help="Pipeline (default: every pipeline with a shedder).")
def shed_set(run_dir, instance, quota, policy, pipeline):
    """Set the quota by hand, or the pruning policy (both take effect at the workers' next batch)."""
    if quota is None and policy is None:
        raise click.UsageError("give --quota, --policy or both")
    args = {"op": "set", "quota": quota, "pipeline": pipeline}
    if policy is not None:
        args["policy"] = policy if policy == "rule" else os.path.abspath(policy)
    click.echo(_shed_lines(_control(run_dir, instance, "shed", args)))


@shed.command("train")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A recorded trace (jizhictl record, or jizhictl demo trace).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True,
              help="The model version that scores it offline.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The policy file to write (JSON).")
@click.option("--top-k", default=10, show_default=True, help="The top-K whose quality the policy protects.")
def shed_train(trace_path, bundle, out, top_k):
    """Fit the learned pruning policy on a trace, scored fully offline.

    For every request: the smallest cutoff (its best candidates by recall
    score) that keeps its whole model top-K; a small model learns that need
    from the request's recall-score statistics. Prints the quality (top-K
    overlap) of the rule and of the learned policy at the same mean fraction
    kept, on the trace and on a held-out quarter of it. Use it with
    `jizhictl shed set --policy FILE` or shed.policy_file.
    """
    from jizhi.tools.bench import Trace, resolve_bundle
    from jizhi.tools.shedtrain import save_policy, train
    trace = Trace(trace_path)
    bar = {"last": 0}

    def progress(done, total):
        if done - bar["last"] >= total / 20 or done == total:
            bar["last"] = done
            click.echo(f"\rscoring the trace offline: {done}/{total} requests", nl=done == total, err=True)

    doc, report = train(trace, resolve_bundle(bundle), top_k=top_k, progress=progress)
    save_policy(doc, out)
    click.echo(f"policy: {out} (held-out R^2 of the log need {report['held_out_r2_log_need']}; "
               f"a request needs {100 * report['mean_needed_fraction']:.1f} % of its candidates on average, "
               f"median {100 * report['median_needed_fraction']:.1f} %)")
    click.echo(f"{'quota':>6} {'subset':<9} {'rule kept':>9} {'overlap':>8} {'learned kept':>12} {'overlap':>8}")
    for q in report["quality"]:
        click.echo(f"{q['quota']:6.2f} {q['subset']:<9} {q['rule']['kept']:9.3f} {q['rule']['overlap']:8.4f} "
                   f"{q['learned']['kept']:12.3f} {q['learned']['overlap']:8.4f}")


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
        raise _refused(f"{d / 'server.key_secret'} exists; not overwriting keys")
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


# -- cube: build, inspect and benchmark an LMDB cube (offline) -----------------

@cli.group()
def cube():
    """Build, inspect and benchmark an LMDB cube (the bundle's cube/data.mdb, docs/formats.md).

    Offline tools: they read and write files. Only `cube info` asks a running
    jizhid for the hot tier's figures, read-only, and is fine without one.
    Exit codes: 0 success; 2 usage error or refused input (a bad table, an
    existing OUT_DIR, Parquet without pyarrow); 3 the daemon answered an
    error (`cube info`).
    """


class _SignatureType(click.ParamType):
    """A signature on the command line: decimal or 0x-hex, 0 .. 2**64-1."""

    name = "signature"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        s = value.strip().replace("_", "")
        try:
            v = int(s, 16) if s.lower().startswith("0x") else int(s, 10)
        except ValueError:
            self.fail(f"{value!r} is not a signature (decimal, or hex with 0x)", param, ctx)
        if not 0 <= v < 2 ** 64:
            self.fail(f"{value} is not a signature (0 .. 2**64-1)", param, ctx)
        return v


def _locate_cube(path):
    from jizhi.cube.build import TableError, locate_cube
    try:
        return locate_cube(path)
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="CUBE_DIR_OR_BUNDLE")


@cube.command("build")
@click.argument("out_dir", type=click.Path())
@click.option("--from", "tables", multiple=True, type=click.Path(),
              help="An input table (repeatable): a .npz with arrays `keys` and `vectors`, a directory holding "
                   "keys.npy and vectors.npy, or a .parquet file with columns `signature` and `vector`.")
@click.option("--keys", "keys_files", multiple=True, type=click.Path(),
              help="A keys .npy (uint64 [K]) to pair with the --vectors of the same position (repeatable).")
@click.option("--vectors", "vectors_files", multiple=True, type=click.Path(),
              help="A vectors .npy (float32 [K, dim]) for the --keys of the same position (repeatable).")
@click.option("--dim", type=click.IntRange(min=1), default=None, help="Refuse input whose vectors are not this long.")
@click.option("--txn-mb", type=click.IntRange(min=1), default=64, show_default=True,
              help="Vector bytes written per LMDB write transaction (what the writer holds in memory).")
def cube_build(out_dir, tables, keys_files, vectors_files, dim, txn_mb):
    """Write a new cube directory OUT_DIR (LMDB: data.mdb) from signature/vector tables.

    \b
    Input layouts (every table: distinct uint64 signatures, float32 vectors of one dim):
      --from T.npz              arrays `keys` uint64 [K] and `vectors` float32 [K, dim] (read into RAM)
      --from DIR                DIR/keys.npy and DIR/vectors.npy, the same arrays (memory-mapped)
      --keys K.npy --vectors V.npy   the same, any names (memory-mapped)
      --from T.parquet          columns `signature` uint64 (int64: the same 64 bits) and `vector`
                                list<float32> (read into RAM; needs pip install 'jizhi[parquet]')

    Refused (exit 2, nothing written): an existing OUT_DIR, a signature that
    appears twice (in one table or across tables), keys that are not uint64,
    vectors that are not float32 [K, dim], tables of different dims (or not
    --dim), a vector holding NaN or infinity. The cube is written in LMDB key
    order, --txn-mb of vectors per write transaction, into a hidden directory
    beside OUT_DIR that is renamed to OUT_DIR when complete. Ship it as a
    bundle version's cube/ (docs/formats.md).
    """
    import os

    from jizhi.cube.build import TableError, open_npy_pair, open_table, plan_cube
    if os.path.lexists(out_dir):
        raise click.BadParameter(f"{out_dir} exists already (a cube is written into a new directory)",
                                 param_hint="OUT_DIR")
    if len(keys_files) != len(vectors_files):
        raise click.UsageError(f"{len(keys_files)} --keys but {len(vectors_files)} --vectors: give them in pairs")
    if not tables and not keys_files:
        raise click.UsageError("no input: give --from TABLE or --keys K.npy --vectors V.npy")
    try:
        inputs = [open_table(t) for t in tables] + [open_npy_pair(k, v) for k, v in zip(keys_files, vectors_files)]
        for t in inputs:
            click.echo(f"{t.name}: {len(t):,} keys, dim {t.dim}", err=True)
        plan = plan_cube(out_dir, inputs, dim=dim)
        txn_entries = max(1, (txn_mb << 20) // (4 * plan.dim))
        with click.progressbar(length=len(plan), label=f"writing {out_dir}", file=sys.stderr,
                               show_pos=True) as bar:
            r = plan.write(txn_entries=txn_entries, progress=bar.update)
    except TableError as e:
        raise click.UsageError(str(e))
    except OSError as e:   # includes lmdb's errors that are OSError; disk full, permissions
        raise click.ClickException(f"writing {out_dir} failed: {e}")
    click.echo(f"cube {out_dir}: {r['keys']:,} keys, dim {r['dim']}, data.mdb {r['bytes']:,} bytes, "
               f"{r['transactions']} write transaction{'s' if r['transactions'] != 1 else ''}")


def _cube_daemon(run_dir, instance, version_dir):
    """The hot tier's figures from a running jizhid's `stats` (read-only), or why there are none."""
    import os
    from pathlib import Path

    from jizhi import control
    dirs = [Path(run_dir).absolute()] if run_dir else control.run_dir_candidates(instance)
    try:
        live = [d for d in dirs if control.present(d)]
    except control.NoAccess as e:
        return {"running": False, "instance": instance, "note": f"{e}: no hot-tier figures"}
    if not live:
        return {"running": False, "instance": instance,
                "note": f"jizhid is not running (no control socket in {', '.join(map(str, dirs))}): "
                        "no hot-tier figures"}
    try:
        info = control.call(live[0], "stats", None, timeout_s=3.0)
    except ConnectionError as e:
        return {"running": False, "instance": instance, "run_dir": str(live[0]),
                "note": f"jizhid is not answering on {live[0] / control.SOCKET_NAME} ({e}): no hot-tier figures"}
    except control.ControlError as e:
        click.echo(f"jizhictl: stats refused: {e}", err=True)
        sys.exit(EXIT_ERROR_REPLY)
    serves = []
    if version_dir is not None:
        mine = os.path.realpath(version_dir)
        for model, m in info.get("models", {}).items():
            for v in m.get("versions", []):
                if v.get("path") and os.path.realpath(v["path"]) == mine:
                    serves.append({"model": model, "version": v["version"], "state": v["state"]})
    models = {s["model"] for s in serves}
    pipelines = {p: dict(info.get("cube", {}).get(p, {}), model=x.get("model"),
                         versions={str(k): v.get("state") for k, v in x.get("versions", {}).items()})
                 for p, x in info.get("pipelines", {}).items() if not models or x.get("model") in models}
    return {"running": True, "instance": instance, "run_dir": str(live[0]), "serves_this_cube": serves,
            "pipelines": pipelines}


@cube.command("info")
@click.argument("cube_dir_or_bundle", type=click.Path(exists=True, file_okay=False))
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cube_info(cube_dir_or_bundle, run_dir, instance, as_json):
    """Keys, dim, file size, the LMDB tree, whether the Numba reader verifies, and the hot tier's hit ratios.

    CUBE_DIR_OR_BUNDLE: a cube directory (data.mdb), a bundle version
    directory, a model directory (its newest version) or a demo directory.
    The hot tier's figures (lookups, hot hits, hit ratio since start and over
    the last minute, per pipeline) come from a running jizhid's `stats`
    (--run-dir/--instance find it as for `jizhictl stats`); without one,
    the file's figures alone, exit 0.
    """
    from jizhi.cube.build import TableError, describe
    cube_dir, mdim, version_dir = _locate_cube(cube_dir_or_bundle)
    try:
        d = describe(cube_dir)
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="CUBE_DIR_OR_BUNDLE")
    vdim = d["value_bytes"] // 4 if d["value_bytes"] else None
    dim = mdim or vdim
    problems = []
    if mdim and d["value_bytes"] is not None and d["value_bytes"] != mdim * 4:
        problems.append(f"the manifest says dim {mdim} but the first value has {d['value_bytes']} bytes")
    verified = False
    if dim and d["keys"]:
        from jizhi.cube.store import Cube
        c = Cube(cube_dir, dim)
        verified = c.btree is not None
        c.close()
    daemon = _cube_daemon(run_dir, instance, version_dir)
    out = dict(cube=cube_dir, bundle=version_dir, dim=dim, **d, numba_reader_verified=verified,
               problems=problems, daemon=daemon)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"cube      {cube_dir}" + (f"  (bundle {version_dir})" if version_dir else ""))
    click.echo(f"keys      {d['keys']:,}")
    click.echo(f"dim       {dim if dim else '- (empty cube)'}" + (" (manifest.toml)" if mdim else
                                                                   " (from the first value's size)" if dim else ""))
    click.echo(f"file      data.mdb {d['file_bytes']:,} bytes ({d['file_bytes'] / 2 ** 20:.1f} MiB)")
    click.echo(f"LMDB      depth {d['depth']}, {d['page_bytes']:,}-byte pages: {d['branch_pages']:,} branch, "
               f"{d['leaf_pages']:,} leaf, {d['overflow_pages']:,} overflow; last page {d['last_page']:,}, "
               f"last txn {d['last_txnid']}")
    click.echo("reader    " + ("the Numba B+tree reader verified against liblmdb (workers use it)" if verified else
                               "the Numba B+tree reader did not verify: workers read through liblmdb (slower)"))
    for p in problems:
        click.echo(f"problem   {p}")
    if not daemon["running"]:
        click.echo(f"hot tier  {daemon['note']}")
        return
    where = f"jizhid ({'' if run_dir else f'instance {instance}, '}run dir {daemon['run_dir']})"
    if daemon["serves_this_cube"]:
        click.echo(f"hot tier  {where} serves this cube: " + ", ".join(
            f"model {s['model']} version {s['version']} ({s['state']})" for s in daemon["serves_this_cube"]))
    else:
        click.echo(f"hot tier  {where} does not serve this cube; its pipelines:")
    for pname, c in daemon["pipelines"].items():
        if "lookups" not in c:
            click.echo(f"  pipeline {pname}: no cube figures")
            continue
        last = c.get("last_minute") or {}
        click.echo(f"  pipeline {pname} (model {c['model']}): {c['lookups']:,} lookups, {c['hot_hits']:,} hot hits "
                   f"({_ratio(c['hot_ratio'])}) since start; last minute {_ratio(last.get('hot_ratio'))} "
                   f"of {last.get('lookups', 0):,} lookups")


@cube.command("push")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--redis", "url", required=True, metavar="URL",
              help="The cluster: redis://HOST:PORT[,HOST:PORT...] (any nodes; the rest are discovered).")
@click.option("--strategy", type=click.Choice(["key", "table", "model"]), default=None,
              help="Table mapping: key (every table over every shard), table (whole tables bin-packed onto "
                   "shards by size), model (a bundle's tables together on one shard). Default: the manifest's "
                   "cube_mapping, else key.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cube_push(bundles, url, strategy, quiet):
    """Load the cubes of BUNDLE version directories into a Redis Cluster.

    Keys are written with pipelined MSETs, one pipeline per master; each
    bundle's layout record goes last, so jizhid never reads a half-pushed
    cube. Serve it with the cube_accessor option
    remote = "redis://HOST:PORT,.../{name}/{version}" (docs/formats.md,
    "A cube on Redis Cluster"). Pushing again overwrites the vectors; keys of
    an earlier push with another strategy stay until the cluster is flushed.
    Exit codes: 0 pushed; 2 a bad bundle or URL; 1 the cluster refused or
    did not answer.
    """
    import tomllib
    from jizhi.bundle import Bundle, BundleError
    from jizhi.cube import redis as R
    try:
        bs = [Bundle(b) for b in bundles]
        if strategy is None:
            with open(bs[0].path / "manifest.toml", "rb") as f:
                strategy = tomllib.load(f).get("cube_mapping", "key")
        R.parse_url(url)
    except (BundleError, ValueError, OSError) as e:
        raise click.UsageError(str(e))
    import time
    from jizhi.tools.demo import _Progress
    t0 = time.monotonic()
    bar = []

    def progress(done, total):
        if not bar:
            bar.append(_Progress("pushing keys", total, not quiet))
        bar[0].advance(done - bar[0].done)
    try:
        docs = R.push(bs, url, strategy, progress=progress)
        if bar:
            bar[0].close()
    except (OSError, RuntimeError, R.RedisError) as e:
        click.echo(f"jizhictl cube push: {e}", err=True)
        sys.exit(1)
    except ValueError as e:
        raise click.UsageError(str(e))
    for d in docs:
        click.echo(f"pushed {d['namespace']}: {d['keys']:,} keys, dim {d['dim']}, strategy {d['strategy']}, "
                   f"{len(d['units'])} unit(s) in {time.monotonic() - t0:.1f} s")


@cube.command("layout")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--redis", "url", required=True, metavar="URL", help="The cluster: redis://HOST:PORT[,HOST:PORT...].")
@click.option("--json", "as_json", is_flag=True, help="Print the layout record as JSON.")
def cube_layout(bundle, url, as_json):
    """Print where each table of a pushed BUNDLE lives and the shard round trips per lookup batch.

    Reads the layout record `jizhictl cube push` wrote and the cluster's
    current slot map (after a failover the promoted replica is named).
    Exit codes: 0; 1 not pushed or the cluster did not answer; 2 a bad bundle.
    """
    from jizhi.bundle import Bundle, BundleError
    from jizhi.cube import redis as R
    try:
        b = Bundle(bundle)
        doc, cluster = R.read_layout(url, b.name, b.version)
    except (BundleError, ValueError) as e:
        raise click.UsageError(str(e))
    except (OSError, R.RedisError) as e:
        click.echo(f"jizhictl cube layout: {e}", err=True)
        sys.exit(1)
    if doc is None:
        click.echo(f"jizhictl cube layout: {b.name} {b.version} is not in the cluster (jizhictl cube push)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for line in R.describe(doc, cluster):
        click.echo(line)


@cube.command("get")
@click.argument("cube_dir_or_bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("signatures", nargs=-1, required=True, type=_SignatureType())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cube_get(cube_dir_or_bundle, signatures, as_json):
    """Print the vector of each SIGNATURE (decimal or 0x hex), or that it is missing.

    A signature missing from the cube reads the default vector (zeros) in
    the pipeline; it is reported as missing, with exit code 0.
    """
    from jizhi.cube.build import TableError, describe, get_vectors
    cube_dir, mdim, _ = _locate_cube(cube_dir_or_bundle)
    try:
        vb = describe(cube_dir)["value_bytes"]
        dim = mdim or (vb // 4 if vb else 0)
        got = get_vectors(cube_dir, signatures, dim)
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="CUBE_DIR_OR_BUNDLE")
    if as_json:
        click.echo(json.dumps([{"signature": s, "hex": f"0x{s:016x}", "found": v is not None,
                                "vector": None if v is None else [float(x) for x in v]} for s, v in got], indent=2))
        return
    for s, v in got:
        text = "missing: the default vector (zeros)" if v is None else " ".join(f"{x:.9g}" for x in v)
        click.echo(f"{s} (0x{s:016x}): {text}")


@cube.command("bench")
@click.option("--cube", "cube_dir", type=click.Path(exists=True, file_okay=False),
              help="A cube directory: keys are drawn uniformly from it.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="A bundle (version, model or demo directory): keys are drawn with its trace's skew. "
                   "Default: ~/.cache/jizhi/demo (make it with `jizhictl demo init ~/.cache/jizhi/demo`).")
@click.option("--batch", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Distinct keys per lookup batch.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.01), default=3.0, show_default=True,
              help="Seconds timed per method (after a warm-up).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed slices per method; the median is reported.")
@click.option("--keys", "key_draw", type=click.Choice(["trace", "uniform"]), default="trace", show_default=True,
              help="Draw keys by the trace's skew (needs a bundle) or uniformly.")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              help="The trace to weight keys by (default: one generated from the bundle).")
@click.option("--requests", type=click.IntRange(min=1), default=500, show_default=True,
              help="Requests of the generated trace (500 candidates each).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def cube_bench(cube_dir, bundle, batch, duration_s, repeats, key_draw, trace_path, requests, as_json):
    """Storage micro-benchmark: keys/s per core of the hot tier, the LMDB cube (Numba reader and liblmdb),
    a Python dict and an in-RAM numpy gather, on the same batches of sorted unique keys.

    One process, one thread; run it on a quiet machine (docs/benchmarks.md,
    "Storage micro-benchmarks"). Makes a hot-tier segment in /dev/shm and
    unlinks it as soon as it is mapped.
    """
    from pathlib import Path

    if cube_dir and bundle:
        raise click.UsageError("give --cube or --bundle, not both")
    if not cube_dir and not bundle:
        default = Path.home() / ".cache" / "jizhi" / "demo"
        if not default.is_dir():
            raise click.UsageError(f"give --cube or --bundle (no demo at {default}: "
                                   f"`jizhictl demo init {default}` makes one)")
        bundle = str(default)
    from jizhi.tools.cubebench import format_report, run
    from jizhi.cube.build import TableError
    try:
        r = run(cube=cube_dir, bundle=bundle, batch=batch, duration_s=duration_s, repeats=repeats,
                draw=key_draw, trace_path=trace_path, requests=requests,
                log=lambda s: click.echo(s, err=True))
    except TableError as e:
        raise click.BadParameter(str(e), param_hint="--cube/--bundle")
    click.echo(json.dumps(r, indent=2) if as_json else "\n".join(format_report(r)))


_add_bench()


def _add_tune():
    from jizhi.tools.tune import tune_command     # click and the standard library only: jizhictl starts fast
    cli.add_command(tune_command)


_add_tune()
