"""jizhictl's server-control commands: status, stats, scale, drain, resume, reload, models, pin, unpin, record.

Each sends the control command of its name (``jizhi.supervisor.commands``,
one class per command) over the run directory's control socket
(``reach.ask``) and prints the result. Its --help is that class's docstring
(``reach.control_command``): the registry is the one place it is written.
"""
import time

import click

from jizhi.ctl import figures
from jizhi.ctl.reach import ask, control_command, json_option, refused, run_dir_option, show


@control_command("status")
@run_dir_option
@json_option()
def status(run_dir, instance, as_json):
    show(ask(run_dir, instance, "status"), as_json, figures.status_text)


@control_command("stats")
@run_dir_option
@json_option()
def stats(run_dir, instance, as_json):
    show(ask(run_dir, instance, "stats"), as_json, figures.stats_text)


# ignore_unknown_options: N = -1 is a value (refused by its range), not an option
@control_command("scale", context_settings={"ignore_unknown_options": True})
@run_dir_option
@click.argument("group")
@click.argument("n", type=click.IntRange(min=1))
@click.option("--pipeline", default=None, help="Pipeline (default: the server's default pipeline).")
def scale(run_dir, instance, group, n, pipeline):
    r = ask(run_dir, instance, "scale", {"group": group, "n": n, "pipeline": pipeline})
    click.echo(f"{r['pipeline']}/{r['group']}: {r['before']} -> {r['after']} workers")


@control_command("drain")
@run_dir_option
def drain(run_dir, instance):
    ask(run_dir, instance, "drain")
    click.echo("draining: no new requests are admitted")


@control_command("resume")
@run_dir_option
def resume(run_dir, instance):
    ask(run_dir, instance, "resume")
    click.echo("admitting requests")


@control_command("reload")
@run_dir_option
@click.argument("model", required=False)
@json_option("Print the reply as JSON (with every pool's size, config, set_by).")
def reload(run_dir, instance, model, as_json):
    show(ask(run_dir, instance, "reload", {"model": model} if model else None), as_json, _reload_text)


def _reload_text(r):
    lines = [f"applied: {', '.join(r['applied']) or 'nothing'}"]
    if r.get("kept"):
        lines.append(f"kept: {', '.join(r['kept'])}")
    if r.get("new_versions"):
        lines.append(f"new model versions: {', '.join(r['new_versions'])}")
    if r["needs_restart"]:
        lines.append(f"changed but needs a restart: {', '.join(r['needs_restart'])}")
    return "\n".join(lines)


def _when(ts):
    return "-" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


@control_command("models")
@run_dir_option
@click.argument("model", required=False)
@json_option()
def models(run_dir, instance, model, as_json):
    r = ask(run_dir, instance, "models")
    if model is not None:
        if model not in r:
            raise refused(f"no model {model!r} is served (served: {', '.join(r)})")
        r = {model: r[model]}
    show(r, as_json, _models_text)


def _models_text(r):
    lines = []
    for name, m in r.items():
        lines.append(f"model {name}  policy {m['policy']} ({m['policy_from']})  target {m['target']}")
        lines.append(f"  {'version':>7} {'state':<10} {'appeared':>8} {'serving':>8} {'detect':>7} {'validate':>8} "
                     f"{'start':>6} {'load':>6} {'warm':>6} {'total':>7}  error")
        for v in m["versions"]:
            t = v["timings_ms"]

            def ms(k):
                return "-" if t.get(k) is None else f"{t[k]:.0f}"
            lines.append(f"  {v['version']:>7} {v['state']:<10} {_when(v['renamed_at']):>8} "
                         f"{_when(v['serving_since']):>8} {ms('detection'):>7} {ms('validation'):>8} "
                         f"{ms('start'):>6} {ms('load'):>6} {ms('warm_up'):>6} {ms('total'):>7}  {v['error'] or ''}")
    return "\n".join(lines)


@control_command("pin")
@run_dir_option
@click.argument("model")
@click.argument("version", type=int)
def pin(run_dir, instance, model, version):
    r = ask(run_dir, instance, "pin", {"model": model, "version": version})
    click.echo(f"{model}: policy {r['policy']}" + ("" if r["persisted"] else " (in memory only: the pin file "
                                                      "could not be written, see the log)"))


@control_command("unpin")
@run_dir_option
@click.argument("model")
def unpin(run_dir, instance, model):
    r = ask(run_dir, instance, "unpin", {"model": model})
    click.echo(f"{model}: policy {r['policy']}, target version {r['target']}")


@control_command("record")
@run_dir_option
@click.option("--duration", type=click.FloatRange(min=0.1), required=True, help="Seconds of live traffic to record.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Trace file to write (.npz).")
@click.option("--pipeline", default=None, help="Only this pipeline's requests (default: all).")
def record(run_dir, instance, duration, out, pipeline):
    import numpy as np     # (numpy: for this command only, jizhictl starts without it)
    ask(run_dir, instance, "record", {"op": "start"})
    records, dropped = [], 0
    t_end = time.monotonic() + duration
    try:
        while True:
            left = t_end - time.monotonic()
            time.sleep(max(0.0, min(0.5, left)))
            last = left <= 0.5
            r = ask(run_dir, instance, "record", {"op": "stop" if last else "fetch"})
            records += [x for x in r["records"] if pipeline is None or x[1] == pipeline]
            dropped += r["dropped"]
            click.echo(f"\rrecording: {len(records)} requests, {max(0.0, t_end - time.monotonic()):.1f} s left ",
                       err=True, nl=False)
            if last:
                break
    except KeyboardInterrupt:
        ask(run_dir, instance, "record", {"op": "stop"})
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


