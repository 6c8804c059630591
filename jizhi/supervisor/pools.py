"""Pool sizes: how many workers each pool should have, and who said so.

A pool is one group (a stage, or a fused chain of stages) of one pipeline,
keyed ``(pipeline, group)``. Its *desired* size comes from the pipeline file
at start; at run time ``jizhictl scale`` (``SCALE``) and the autoscaler
(``AUTOSCALER``) set it too, and the source is remembered. Setting a size
changes nothing else: the supervisor loop's ``manage()`` starts or retires
workers until the pools match (docs/architecture.md, "Resource manager").

A reload meets each pool with the config's value again (``reload``): a size
set at run time is kept while the config's value for that pool stays what it
was; when that value changed, the config wins and the runtime size is
dropped.

Runs in the supervisor process; imported by the scale command (light: no
heavy import here).
"""
import logging

log = logging.getLogger("jizhi.supervisor")

SCALE, AUTOSCALER = "jizhictl scale", "the autoscaler"    # who set a pool's size at run time


class Pools:
    def __init__(self):
        self.desired = {}   # (pipeline, group) -> workers wanted now
        self.config = {}    # (pipeline, group) -> the config's value (at start, or the last reload)
        self.source = {}    # (pipeline, group) -> who set a size other than the config's, at run time

    def start(self, pipeline, group, n):
        """The pipeline file's size, at start."""
        self.desired[(pipeline, group)] = self.config[(pipeline, group)] = n

    def set(self, pipeline, group, n, source=None):
        """``source``: who sets a size at run time (SCALE, AUTOSCALER): remembered, and kept across a
        reload unless the config's value for the pool changes; None: the config's value (a reload)."""
        key = (pipeline, group)
        self.desired[key] = n
        if source is None or n == self.config.get(key):
            self.source.pop(key, None)     # back at the config's size: nothing to keep
        else:
            self.source[key] = source
        log.info("pool %s/%s: desired size %d%s", pipeline, group, n, f" (set by {source})" if source else "")

    def reload(self, pipeline, group, config_n):
        """A reload meets a pool whose config value is now ``config_n``: returns (what, note), what being
        "applied", "kept" or None (nothing to say). A size set at run time (jizhictl scale, the
        autoscaler) is kept while the config's value for the pool stays what it was; when that value
        changed, the config wins and the runtime size is dropped."""
        key = (pipeline, group)
        before, size, source = self.config.get(key), self.desired[key], self.source.get(key)
        self.config[key] = config_n
        name = f"{pipeline}/{group}"
        if config_n == before:
            if source is not None and size != config_n:
                return "kept", f"{name} pool={size} (kept from {source}; the config says {config_n})"
            if size != config_n:    # (no runtime size recorded: the config's value applies)
                self.set(pipeline, group, config_n)
                return "applied", f"{name} pool={config_n}"
            return None, None
        runtime = "runtime scale" if source == SCALE else "autoscaled size"
        if size == config_n:
            if source is None:
                return None, None
            self.source.pop(key, None)
            return "applied", f"{name} pool={config_n} (config changed {before} -> {config_n}; the {runtime} already was {size})"
        self.set(pipeline, group, config_n)
        return "applied", (f"{name} pool={config_n} (config changed {before} -> {config_n}; {runtime} {size} dropped)"
                           if source else f"{name} pool={config_n}")

    def summary(self):
        """Every pool's size, the config's value and who set it (``jizhictl reload --json``)."""
        return {f"{p}/{g}": {"size": n, "config": self.config.get((p, g)), "set_by": self.source.get((p, g), "config")}
                for (p, g), n in self.desired.items()}

    def sizes(self):
        """{"pipeline/group": size} (``jizhictl status``)."""
        return {f"{p}/{g}": n for (p, g), n in self.desired.items()}
