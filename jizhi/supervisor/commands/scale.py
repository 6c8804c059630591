"""``jizhictl scale GROUP N [--pipeline P]``."""
from jizhi.control import ControlError
from jizhi.supervisor.commands.base import Command
from jizhi.supervisor.pools import SCALE


class Scale(Command):
    """Set the pool size of GROUP (a stage, or a fused group) to N worker processes.

    Scaling down retires workers without dropping a request: the broker sends
    them nothing new and stops them once they hold nothing. The size is kept
    across `jizhictl reload` (and SIGHUP) unless the config's value for that
    pool changes; a restart of jizhid starts from the config.
    """
    name = "scale"

    def validate(self, args):
        n = args.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ControlError("the pool size must be an integer >= 1 (a group without a worker would hold its "
                               "requests until their deadline; `jizhictl drain` stops admitting)")
        return args

    def execute(self, sup, args):
        pipeline, group = pool_key(sup, args)
        if args["n"] > sup.settings["workers.max_pool"]:
            raise ControlError(f"the pool size must be at most workers.max_pool = {sup.settings['workers.max_pool']}")
        before = sup.pools.desired[(pipeline, group)]
        sup.pools.set(pipeline, group, args["n"], source=SCALE)     # kept across a reload: Pools.reload
        return {"pipeline": pipeline, "group": group, "before": before, "after": args["n"]}


def pool_key(sup, args):
    """The ``(pipeline, group)`` named (the default pipeline when none is), or ControlError."""
    pipeline, group = args.get("pipeline"), args.get("group")
    plans = sup.run["pipelines"]
    if pipeline is None:
        pipeline = sup.run["default_pipeline"]
    if pipeline not in plans:
        raise ControlError(f"no pipeline {pipeline!r} (served: {', '.join(plans)})")
    groups = plans[pipeline]["groups"]
    if group not in groups:
        raise ControlError(f"pipeline {pipeline} has no stage or fused group {group!r} (groups: {', '.join(groups)})")
    return pipeline, group
