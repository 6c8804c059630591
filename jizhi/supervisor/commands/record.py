"""``jizhictl record``: on the wire, ``op`` start | fetch (what came since the last fetch) | stop."""
from jizhi.control import ControlError
from jizhi.supervisor.commands.base import Command


class Record(Command):
    """Save live traffic to a trace file (docs/formats.md, "Trace") that `jizhictl bench --trace` replays.

    Every admitted score request is kept with its arrival time (t_offset_s),
    top_k and pipeline; the broker hands them over every half second, so it
    holds little. Nothing is recorded if no request arrives.
    """
    name = "record"

    def validate(self, args):
        if args.get("op") not in ("start", "fetch", "stop"):
            raise ControlError("op must be start, fetch or stop")
        return args

    def execute(self, sup, args):
        return sup.record(args["op"])
