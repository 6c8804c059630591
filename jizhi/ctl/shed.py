"""jizhictl shed: the load shedding of pipelines with a shedder stage (jizhi/shedding.py), on a running jizhid.

``status``, ``auto``, ``off`` and ``set`` are the ops of the ``shed``
control command (``reach.ask``). Training a learned policy offline (``shed
train``) is a tool: ``jizhi.tools.commands`` adds it to this group.
"""
import os

import click

from jizhi.ctl.reach import ask, control_command, control_help, json_option, run_dir_option, show


@click.group(help=control_help("shed"))
def shed():
    pass


def _shed_lines(r):
    lines = []
    for p, x in r.items():
        p99 = "-" if x.get("p99_ms") is None else f"{x['p99_ms']:.1f} ms"
        trim = f", trim {x['trim']:.2f}" if x["mode"] == "auto" and "trim" in x else ""
        lines.append(f"{p}: mode {x['mode']}, quota {x['quota']:.3f} (keeps {100 * x['quota']:.1f} % of candidates "
                     f"on average{trim}), policy {x['policy']}, p99 {p99} (SLO {x['slo_ms']:g} ms), "
                     f"{x['in_flight']} in flight")
    return "\n".join(lines) or "no pipeline has a shedder stage"


@control_command("shed", op="status")
@run_dir_option
@json_option()
def shed_status(run_dir, instance, as_json):
    show(ask(run_dir, instance, "shed", {"op": "status"}), as_json, _shed_lines)


@control_command("shed", op="auto")
@run_dir_option
@click.option("--pipeline", default=None, help="Pipeline (default: every pipeline with a shedder).")
def shed_auto(run_dir, instance, pipeline):
    click.echo(_shed_lines(ask(run_dir, instance, "shed", {"op": "auto", "pipeline": pipeline})))


@control_command("shed", op="off")
@run_dir_option
@click.option("--pipeline", default=None, help="Pipeline (default: every pipeline with a shedder).")
def shed_off(run_dir, instance, pipeline):
    click.echo(_shed_lines(ask(run_dir, instance, "shed", {"op": "off", "pipeline": pipeline})))


@control_command("shed", op="set")
@run_dir_option
@click.option("--quota", type=float, default=None,
              help="Fix the mean fraction of candidates kept (0-1]; the controller stops until `shed auto`.")
@click.option("--policy", default=None,
              help="`rule` (every request keeps the quota) or a policy file from `jizhictl shed train`.")
@click.option("--pipeline", default=None, help="Pipeline (default: every pipeline with a shedder).")
def shed_set(run_dir, instance, quota, policy, pipeline):
    if quota is None and policy is None:
        raise click.UsageError("give --quota, --policy or both")
    args = {"op": "set", "quota": quota, "pipeline": pipeline}
    if policy is not None:
        args["policy"] = policy if policy == "rule" else os.path.abspath(policy)
    click.echo(_shed_lines(ask(run_dir, instance, "shed", args)))



for command in (shed_status, shed_auto, shed_off, shed_set):
    shed.add_command(command)
