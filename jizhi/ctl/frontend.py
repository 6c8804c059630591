"""jizhictl's commands that speak the client protocol to jizhid's frontend: info and query.

The same ZeroMQ protocol any client speaks (``jizhi.client``, docs/protocol.md),
at ``--endpoint``; several comma-separated endpoints are several jizhid nodes
(README, "Past one machine"). A local endpoint with nothing listening is said
at once (``reach.exit_if_not_running``), a remote one after ``--timeout``.
"""
import json
import sys

import click

from jizhi import endpoints
from jizhi.ctl import reach


def _endpoint_list(endpoint):
    """``--endpoint``'s endpoints (comma-separated), or click's usage error when it names none."""
    try:
        return endpoints.split(endpoint)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--endpoint")


@click.command()
@click.option("--endpoint", default=reach.DEFAULT_ENDPOINT, show_default=True,
              help="jizhid's client endpoint; several comma-separated: the info of each, by endpoint.")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON (for machines).")
def info(endpoint, timeout_s, as_json):
    """The server's state: pipelines, versions, pools and queues, endpoints, limits, clients, counters.

    A summary for people; --json prints the whole reply (by endpoint when
    several are given). A local endpoint with nothing listening is reported at
    once (exit code 1), as `status` reports a missing control socket.
    """
    out = {}
    for one in _endpoint_list(endpoint):
        reach.exit_if_not_running([one])
        with reach.client(one, timeout_s) as c:
            try:
                out[one] = c.info()
            except TimeoutError as e:
                reach.unreachable(one, e)
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
                     f"{p.get('in_flight', 0)} in flight of {p.get('slots', '-')} slots, {p.get('waiting', 0)} waiting "
                     f"({p.get('refused', 0)} refused); {rq.get('ok', 0):,} ok "
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


@click.command()
@click.option("--endpoint", default=reach.DEFAULT_ENDPOINT, show_default=True,
              help="jizhid's client endpoint; several comma-separated: sent to one, and tried on the next "
                   "when one does not answer within --timeout or answers OVERLOADED / DEADLINE_EXCEEDED.")
@click.option("--pipeline", default="default", show_default=True)
@click.option("--user", type=int, default=None, help="User id (default: the first user of the trace or bundle).")
@click.option("--items", "items_csv", default=None, help="Comma-separated candidate item ids.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), help="Take user and candidates from a trace.")
@click.option("--index", default=0, show_default=True, help="Which trace request.")
@click.option("--random", "random_n", type=int, default=0,
              help="Draw this many candidates from --bundle's items (with the bundle's first user unless --user).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="Bundle version directory for --random (a model directory: its newest version).")
@click.option("--top-k", default=10, show_default=True)
@click.option("--all", "ret_all", is_flag=True, help="Return every candidate's score in request order.")
@click.option("--deadline-ms", type=float, default=None)
@click.option("--timeout", "timeout_s", default=5.0, show_default=True,
              help="Seconds to wait for each attempt's answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def query(endpoint, pipeline, user, items_csv, trace, index, random_n, bundle, top_k, ret_all, deadline_ms,
          timeout_s, as_json):
    """Send one score request; print the ranked items and per-stage timings."""
    import numpy as np                      # (numpy: for this command only, jizhictl starts without it)

    from jizhi.ctl.inputs import Trace, resolve_bundle
    if trace or items_csv or random_n:      # (a usage error is said first; a stopped daemon before any loading)
        reach.exit_if_not_running(_endpoint_list(endpoint))
    recall = None
    if trace:
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
        bundle = resolve_bundle(bundle)     # a version directory, or a model directory: its newest version
        from jizhi.bundle import Bundle
        from jizhi.profilestore import profiles_dir
        root = profiles_dir(Bundle(bundle))     # its own profiles, or its profile store's snapshot
        if root is None:
            raise click.BadParameter(f"{bundle} reads a profile store with no snapshot that fits it",
                                     param_hint="--bundle")
        ids = np.load(f"{root}/items/ids.npy", mmap_mode="r")
        if not 0 < random_n <= ids.shape[0]:
            raise click.BadParameter(f"{random_n}: the bundle {bundle} has {ids.shape[0]} items to draw from",
                                     param_hint="--random")
        items = np.random.default_rng().choice(np.asarray(ids), size=random_n, replace=False)
        if user is None:
            user = int(np.load(f"{root}/users/ids.npy", mmap_mode="r")[0])
    else:
        raise click.UsageError("give candidates: --trace, --items or --random with --bundle")
    if user is None:
        raise click.UsageError("give --user")
    with reach.client(endpoint, timeout_s) as c:
        try:
            r = c.score(user, items, recall, pipeline=pipeline, top_k=top_k, ret="all" if ret_all else "topk",
                        deadline_ms=deadline_ms, check=False)
        except TimeoutError as e:
            reach.unreachable(endpoint, e)
    if as_json:
        out = dict(r.header)
        if r.ok:
            out["item_ids"] = [int(x) for x in r.item_ids]
            out["scores"] = [None if np.isnan(x) else float(x) for x in r.scores]
        click.echo(json.dumps(out, indent=2, default=str))
    elif r.ok:
        click.echo(f"pipeline {pipeline}  user {user}  candidates {len(items)}  model_versions {r['model_versions']}  "
                   f"unknown_items {r['unknown_items']}  unknown_user {r.get('unknown_user', 0)}"
                   f"  missing_signatures {r.get('missing_signatures', 0)}"
                   f"  invalid_scores {r.get('invalid_scores', 0)}"
                   + (f"  answered by {r.endpoint} (attempt {r.attempts})" if "," in endpoint else ""))
        click.echo(f"{'rank':>4}  {'item_id':>20}  score")
        for i, (iid, s) in enumerate(zip(r.item_ids, r.scores)):
            click.echo(f"{i + 1:>4}  {int(iid):>20}  {s:.6f}")
        click.echo("timings (us): " + "  ".join(f"{k}={v}" for k, v in r["timings_us"].items()))
    if not r.ok:
        click.echo(f"jizhictl: {r['code']}: {r['message']}", err=True)
        sys.exit(reach.EXIT_ERROR_REPLY)
