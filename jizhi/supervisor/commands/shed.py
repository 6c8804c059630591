"""``jizhictl shed status | auto | off | set``: on the wire, one command with ``op`` (and ``quota``, ``policy``,
``pipeline``). ``jizhictl shed train`` is offline (jizhi/tools/shedtrain.py) and sends nothing."""
from jizhi.control import ControlError
from jizhi.supervisor.commands.base import Command


class Shed(Command):
    """Load shedding: the controller's quota, the pruning policy, and training a learned policy.

    A pipeline whose first stage is a `shedder` (etc/pipelines/demo_shed.toml)
    keeps only each request's best candidates by recall score when the server
    is overloaded. In mode `auto` the broker gives each request its quota
    (fraction kept) at admission from the work queued, the measured cost and
    the arriving load, and the supervisor's controller corrects it from the
    live p99 against shed.slo_ms; `set` fixes it by hand; `off` keeps every
    candidate.
    """
    name = "shed"
    # Each op's --help (jizhictl shed OP).
    ops = {
        "status": "Mode, quota, policy, the recent p99 and requests in flight, per pipeline with a shedder.",
        "auto": "Cut at admission as the load needs, corrected by the live p99 (the default mode); starts afresh.",
        "off": "Keep every candidate, whatever the load.",
        "set": "Set the quota by hand, or the pruning policy (both take effect at the workers' next batch).",
    }

    def validate(self, args):
        op = args.get("op")
        if op not in self.ops:
            raise ControlError("shed: op must be status, auto, set or off")
        quota = args.get("quota")
        if quota is not None and (not isinstance(quota, (int, float)) or isinstance(quota, bool)
                                  or not 0 < quota <= 1):
            raise ControlError("shed set: the quota (mean fraction of candidates kept) must be in (0, 1]")
        return args

    def execute(self, sup, args):
        return sup.load_control.shed_command(args)
