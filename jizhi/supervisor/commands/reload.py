"""``jizhictl reload [MODEL]`` (and SIGHUP: the same code path, ``VersionManager.reload``)."""
from jizhi.control import ControlError
from jizhi.supervisor.commands.base import Command


class Reload(Command):
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
    name = "reload"

    def execute(self, sup, args):
        model = args.get("model")
        records = sup.versions.registry.records
        if model is not None and model not in records:
            raise ControlError(f"no model {model!r} is served (served: {', '.join(records)})")
        return sup.versions.reload(model)
