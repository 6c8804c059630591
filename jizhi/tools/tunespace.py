"""The tuner's search space and the overlay files it writes (``jizhictl tune``, jizhi/tools/tune.py).

Runs in the tuner's process; pure: no daemon, and no file but the two
overlays ``write_overlay`` writes. The settings searched (``search_space``):

* per worker group of the pipeline (a ``[[fuse]]`` group, or a stage that
  runs alone): ``pool`` in [1, 2 x cores], ``batch`` in {1, 2, 4, 8, 16, 32},
  ``batch_wait_ms`` in [0, 5] (0.1 ms steps); the pools of all groups
  together at most 2 x cores (or the shipped plan's total, if larger);
* per ``model_inference`` stage with structured features on: ``item_cache``
  in {false, true} (the item-only part of the graph precomputed per item of
  the version: memory for CPU, README "Structured features");
* ``cube.hot_tier_mb`` in {0 (off), 64, 256, 1024};
* ``MALLOC_ARENA_MAX`` of jizhid's environment (its children inherit it) in
  {1, 2, 4, unset} (unset: glibc's default of 8 arenas per core);
* ``qcache.window_s`` in [10, 300] s, only when the pipeline has a
  ``query_cache`` stage.

The shipped default's own values join these lists and ranges, so the default
is a point of the space. A point's settings are served from two overlay
files: ``tune-settings.toml`` (the base config with the chosen settings;
MALLOC_ARENA_MAX, an environment variable, in its header) and
``tune-pipeline.toml`` (the pipeline with the chosen pool, batch and
batch_wait_ms per group).
"""
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

from jizhi.tomlw import toml_text

BATCH_VALUES = (1, 2, 4, 8, 16, 32)
BATCH_WAIT_MS = (0.0, 5.0)
HOT_TIER_MB_VALUES = (0, 64, 256, 1024)
ARENA_VALUES = (1, 2, 4, 0)            # 0: unset; ordered by arena count (unset = 8 per core, the most)
QCACHE_WINDOW_S = (10, 300)
ARENA = "MALLOC_ARENA_MAX"
HOT_TIER = "cube.hot_tier_mb"
QCACHE_WINDOW = "qcache.window_s"
SETTINGS_FILE = "tune-settings.toml"
PIPELINE_FILE = "tune-pipeline.toml"


# ----------------------------------------------------------------------------
# The search space


@dataclass
class Dimension:
    """One tuned knob. ``kind``: ``int`` (``low``..``high``), ``real``
    (``low``..``high``, rounded to ``digits`` decimals) or ``ordinal`` (one
    of ``values``, in a meaningful order; the optimizer sees its index)."""
    name: str
    kind: str
    default: object
    low: float = None
    high: float = None
    values: tuple = ()
    digits: int = 1
    description: str = ""

    def skopt(self):
        from skopt.space import Integer, Real
        if self.kind == "int":
            return Integer(int(self.low), int(self.high), name=self.name)
        if self.kind == "real":
            return Real(float(self.low), float(self.high), name=self.name)
        return Integer(0, len(self.values) - 1, name=self.name)

    def encode(self, value):
        if self.kind == "ordinal":
            return self.values.index(value)
        return int(value) if self.kind == "int" else float(value)

    def decode(self, x):
        if self.kind == "ordinal":
            return self.values[int(x)]
        if self.kind == "int":
            return int(round(float(x)))
        return min(float(self.high), max(float(self.low), round(float(x), self.digits)))

    def describe(self):
        d = {"name": self.name, "kind": self.kind, "default": self.default, "description": self.description}
        if self.kind == "ordinal":
            d["values"] = list(self.values)
        else:
            d["low"], d["high"] = self.low, self.high
        return d


@dataclass
class SearchSpace:
    """The tuned settings of one pipeline. A *point* is a dict
    ``{dimension name: value}``; group knobs are named
    ``<pipeline>/<group>.pool`` (``.batch``, ``.batch_wait_ms``)."""
    pipeline: str
    groups: list                    # worker groups tuned, in plan order
    dims: list
    max_total_pool: int
    cores: int
    notes: list = field(default_factory=list)

    @property
    def names(self):
        return [d.name for d in self.dims]

    @property
    def default(self):
        return {d.name: d.default for d in self.dims}

    def key(self, group, knob):
        return f"{self.pipeline}/{group}.{knob}"

    def dim(self, name):
        return next(d for d in self.dims if d.name == name)

    def has(self, name):
        return any(d.name == name for d in self.dims)

    def to_x(self, point):
        return [d.encode(point[d.name]) for d in self.dims]

    def from_x(self, x):
        return {d.name: d.decode(v) for d, v in zip(self.dims, x)}

    def total_pool(self, point):
        return sum(point[self.key(g, "pool")] for g in self.groups)

    def allows(self, point):
        return self.total_pool(point) <= self.max_total_pool

    def constraint(self, x):
        """skopt's ``space_constraint``: ``x`` is a point in the optimizer's (index) form.
        Called for every sampled candidate (thousands per ask): pools only, no decoding."""
        pools = self.__dict__.get("_pool_at")
        if pools is None:
            pools = self.__dict__["_pool_at"] = [i for i, d in enumerate(self.dims)
                                                 if d.name in {self.key(g, "pool") for g in self.groups}]
        return sum(int(round(x[i])) for i in pools) <= self.max_total_pool

    def skopt_dimensions(self):
        return [d.skopt() for d in self.dims]

    def item_cache_stages(self):
        return [d.name[len(self.pipeline) + 1:-len(".item_cache")] for d in self.dims
                if d.name.endswith(".item_cache")]

    def group_settings(self, point):
        """{group: {"pool", "batch", "batch_wait_ms"}} of ``point``."""
        return {g: {k: point[self.key(g, k)] for k in ("pool", "batch", "batch_wait_ms")} for g in self.groups}

    def label(self, point):
        """A compact one-line rendering of ``point`` (the solution path's settings column)."""
        parts = []
        for g in self.groups:
            s = self.group_settings(point)[g]
            parts.append(f"{g} pool {s['pool']} batch {s['batch']} wait {s['batch_wait_ms']:g}")
        for st in self.item_cache_stages():
            parts.append(f"{st} item table {'on' if point[self.key(st, 'item_cache')] else 'off'}")
        parts.append(f"hot {point[HOT_TIER]}")
        parts.append(f"arena {point[ARENA] or 'unset'}")
        if self.has(QCACHE_WINDOW):
            parts.append(f"window {point[QCACHE_WINDOW]:g}")
        return " | ".join(parts)

    def describe(self):
        return {"pipeline": self.pipeline, "groups": self.groups, "max_total_pool": self.max_total_pool,
                "cores": self.cores, "dimensions": [d.describe() for d in self.dims],
                "default": self.default, "notes": self.notes}


def _ordinal(values, default, arena=False):
    """``values`` with ``default`` added in its place (the default must be a point of the space)."""
    vals = set(values) | {default}
    if arena:   # positive counts ascending, then unset (glibc's 8 per core)
        return tuple(sorted(v for v in vals if v) + ([0] if 0 in vals else []))
    return tuple(sorted(vals))


def arena_from_env(environ=None):
    """MALLOC_ARENA_MAX of ``environ`` (default: this process's) as an int; 0 when unset or not a number."""
    raw = (os.environ if environ is None else environ).get(ARENA, "")
    return int(raw) if raw.strip().isdigit() else 0


def search_space(plan, settings, cores, arena_default=0):
    """The search space of one compiled pipeline ``plan`` (``compile_pipeline``).

    ``settings``: the base config's values (``jizhi.config.load``), whose
    ``cube.hot_tier_mb`` and ``qcache.window_s`` are the defaults;
    ``cores``: the cores jizhid may use (pools up to 2 x cores);
    ``arena_default``: the shipped MALLOC_ARENA_MAX (0: unset). Every group
    with workers is tuned (an ab_dispatch group runs in the broker: pool 0,
    not tuned). Pure: no daemon, no file.
    """
    name = plan["name"]
    groups = [g for g in plan["group_order"] if plan["groups"][g]["pool"] > 0]
    max_pool = 2 * cores
    default_total = sum(int(plan["groups"][g]["pool"]) for g in groups)
    max_total = max(max_pool, default_total, len(groups))
    dims, notes = [], []
    if max_total > max_pool:
        notes.append(f"pool total limited to {max_total} (the shipped plan's total or one worker per group), "
                     f"above 2 x cores = {max_pool}")
    for g in groups:
        grp = plan["groups"][g]
        pool, batch, wait = int(grp["pool"]), int(grp["batch"]), float(grp["batch_wait_ms"])
        # Every other group keeps at least one worker within the total: a tighter range than
        # 2 x cores keeps the constrained space dense (skopt samples it by rejection).
        high = max(min(max_pool, max_total - (len(groups) - 1)), pool)
        if pool > max_pool:
            notes.append(f"{name}/{g}: the shipped pool {pool} is above 2 x cores ({max_pool}); the range keeps it")
        dims.append(Dimension(f"{name}/{g}.pool", "int", pool, low=1, high=high,
                              description=f"worker processes of group {g}"))
        dims.append(Dimension(f"{name}/{g}.batch", "ordinal", batch, values=_ordinal(BATCH_VALUES, batch),
                              description=f"requests per micro-batch of group {g}"))
        dims.append(Dimension(f"{name}/{g}.batch_wait_ms", "real", wait, low=min(BATCH_WAIT_MS[0], wait),
                              high=max(BATCH_WAIT_MS[1], wait), digits=1,
                              description=f"ms group {g} holds a partial batch for company"))
    for s in plan["stage_order"]:
        st = plan["stages"][s]
        cfg = st.get("config") or {}
        # (not a head's stage: a head model has no item profiles to build the table from)
        if (st["processor"] == "model_inference" and cfg.get("structured", "on") == "on" and not cfg.get("per_pair")
                and cfg.get("model") in (None, plan.get("model"))):
            on = cfg.get("item_cache", False) is True
            dims.append(Dimension(f"{name}/{s}.item_cache", "ordinal", on, values=(False, True),
                                  description=f"stage {s}: the item-only part of the graph precomputed per item"))
    hot = int(settings[HOT_TIER])
    dims.append(Dimension(HOT_TIER, "ordinal", hot, values=_ordinal(HOT_TIER_MB_VALUES, hot),
                          description="hot tier budget per model version, MiB (0: off)"))
    dims.append(Dimension(ARENA, "ordinal", int(arena_default), values=_ordinal(ARENA_VALUES, int(arena_default), True),
                          description="glibc malloc arenas of jizhid and its children (0: unset, 8 per core)"))
    if any(st["processor"] == "query_cache" for st in plan["stages"].values()):
        window = settings[QCACHE_WINDOW]
        window = int(window) if float(window).is_integer() else window
        dims.append(Dimension(QCACHE_WINDOW, "int" if isinstance(window, int) else "real", window,
                              low=min(QCACHE_WINDOW_S[0], window), high=max(QCACHE_WINDOW_S[1], window), digits=0,
                              description="s a cached score is reused"))
    return SearchSpace(name, groups, dims, max_total, cores, notes)


# ----------------------------------------------------------------------------
# Overlay files: TOML out


def pipeline_doc_with(doc, space, point):
    """A copy of the pipeline document ``doc`` with ``point``'s pool, batch and
    batch_wait_ms on each tuned group: on its ``[[fuse]]`` entry, or on the
    ``[[stage]]`` of a stage that runs alone."""
    out = copy.deepcopy(doc)
    for g, s in space.group_settings(point).items():
        entry = next((f for f in out.get("fuse", []) if f.get("name") == g), None)
        if entry is None:
            entry = next(st for st in out.get("stage", []) if st.get("name") == g)
        entry["pool"] = int(s["pool"])
        entry["batch"] = int(s["batch"])
        wait = float(s["batch_wait_ms"])
        entry["batch_wait_ms"] = int(wait) if wait.is_integer() else wait
    for st in space.item_cache_stages():
        entry = next(e for e in out.get("stage", []) if e.get("name") == st)
        if point[space.key(st, "item_cache")]:
            entry["item_cache"] = True
        else:
            entry.pop("item_cache", None)
    return out


def settings_doc_with(base_doc, space, point):
    """A copy of the config document ``base_doc`` (``{}``: defaults) with ``point``'s settings."""
    out = copy.deepcopy(base_doc or {})
    out.setdefault("cube", {})["hot_tier_mb"] = int(point[HOT_TIER])
    if space.has(QCACHE_WINDOW):
        out.setdefault("qcache", {})["window_s"] = float(point[QCACHE_WINDOW])
    return out


def arena_advice(value):
    if not value:
        return f"{ARENA}: leave it unset in jizhid's environment (glibc's default, 8 arenas per core)."
    return (f"{ARENA}={value}: set it in jizhid's environment (its children inherit it); under systemd, "
            f"a drop-in with Environment={ARENA}={value}.")


def write_overlay(out_dir, space, point, base_doc, pipeline_doc, source):
    """Write ``tune-settings.toml`` and ``tune-pipeline.toml`` for ``point`` into
    ``out_dir``; return their paths. ``source``: a line naming where the
    point comes from (written in both headers)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path, pipeline_path = out_dir / SETTINGS_FILE, out_dir / PIPELINE_FILE
    changed = [HOT_TIER] + ([QCACHE_WINDOW] if space.has(QCACHE_WINDOW) else [])
    head = (f"jizhictl tune: {source}\n"
            f"The base config with the tuned settings ({', '.join(changed)}).\n"
            f"{arena_advice(point[ARENA])}\n"
            f"Serve {PIPELINE_FILE} (its pipeline keeps the name {space.pipeline!r}) in place of the original.")
    settings_path.write_text(toml_text(settings_doc_with(base_doc, space, point), head))
    head = (f"jizhictl tune: {source}\n"
            f"Pipeline {space.pipeline!r} with the tuned pool, batch and batch_wait_ms of "
            f"{', '.join(space.groups)}.")
    pipeline_path.write_text(toml_text(pipeline_doc_with(pipeline_doc, space, point), head))
    return settings_path, pipeline_path
