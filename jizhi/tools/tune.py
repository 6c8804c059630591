"""The offline tuner: ``jizhictl tune`` (``tune_command``).

Runs in the operator's shell, never inside jizhid, and owns every jizhid it
starts. It answers one question for one pipeline and one load: which
deployment settings serve a request trace at a fixed offered rate with the
least server CPU per scored pair, under a p99 objective?

The settings it searches (``search_space``):

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
is a point of the space.

An **evaluation** (``Testbed.measure``) starts its own jizhid (a fresh
instance name, a free loopback port, a private run directory, the config with
``metrics.listen = ""``), waits until it is ready, every pool is full and
the hot tier's first generation is built, then runs one open-loop point of
``jizhi.tools.bench.LoadGenerator``: ``--warmup`` seconds not counted, ``--duration``
seconds measured at ``--rate`` requests/s, with the CPU of every process of
the run read from /proc (``ServerCpu``). Every evaluation replays the same
requests at the same arrival times (a fresh generator per daemon), so the
figures compare like with like. It then stops the daemon (SIGTERM, a bounded
wait, then SIGKILL to its process group) and checks that nothing of the
instance is left in /dev/shm (removing it if so, and saying so).

The **objective** is server CPU-seconds per 1,000 pairs: the CPU time of
jizhid's processes (supervisor, broker, workers) over the measured window
divided by the goodput pairs (candidates that received a model score in OK
replies) of that window, x 1000. A point is **feasible** when its p99 is at
most ``--slo-p99`` ms and it has no error, nothing lost and every request
answered OK. An infeasible point is told to the optimizer as
``3 x the default's CPU (or twice its own, if more) x (1 + excess)``, excess
being how far p99 is over the objective (as a fraction, at most 1; 1 for
errors or a daemon that did not start), so the search learns both "worse"
and "how much worse".

The **search** is scikit-optimize's ask/tell ``Optimizer`` (a Gaussian-process
surrogate, the pool total as its ``space_constraint``). Evaluation 1 is the
shipped default, the next ``--initial-points - 1`` are random, the rest
follow the surrogate's acquisition. Every evaluated point is kept: the
solution path. The **chosen** setting is the feasible point with the least
CPU per 1,000 pairs (possibly the default).

The **comparison** measures the shipped default (the pipeline file and config
exactly as given) and the chosen setting (the overlay files as written)
alternately, ``--repeats`` times each (default, chosen, default, chosen, ...),
each with its own jizhid, and reports medians, min, max and spread (max - min)
of CPU per 1,000 pairs and p99, and the gain. A single search measurement
favours a lucky point; the alternating repeats are what the gain rests on.

Outputs in ``--out``: ``tune-report.json`` (inputs, environment, space, path,
chosen, comparison; rewritten after every evaluation), ``tune-settings.toml``
(the base config with the chosen settings; MALLOC_ARENA_MAX, an environment
variable, in its header), ``tune-pipeline.toml`` (the pipeline with the chosen
pool, batch and batch_wait_ms per group), ``tune-path.txt`` (the solution path
table) and ``evals/`` (each measurement's config, pipeline and jizhid log).
"""
import copy
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from jizhi.tomlw import toml_text

BATCH_VALUES = (1, 2, 4, 8, 16, 32)
BATCH_WAIT_MS = (0.0, 5.0)
HOT_TIER_MB_VALUES = (0, 64, 256, 1024)
ARENA_VALUES = (1, 2, 4, 0)            # 0: unset; ordered by arena count (unset = 8 per core, the most)
QCACHE_WINDOW_S = (10, 300)
ARENA = "MALLOC_ARENA_MAX"
HOT_TIER = "cube.hot_tier_mb"
QCACHE_WINDOW = "qcache.window_s"
PENALTY_FACTOR = 3.0
READY_TIMEOUT_S = 180.0     # a first start on a machine compiles the Numba kernels
HOT_TIER_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0       # drain bound (workers.drain_timeout_s, 10 s) + child stop bound + slack
REPORT = "tune-report.json"
SETTINGS_FILE = "tune-settings.toml"
PIPELINE_FILE = "tune-pipeline.toml"
PATH_TABLE = "tune-path.txt"


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


def measurement_config(doc):
    """The config a measured jizhid gets: ``doc`` with the Prometheus endpoint off
    (one port per host; the tuner's daemons must not clash with a serving one)."""
    out = copy.deepcopy(doc or {})
    out.setdefault("metrics", {})["listen"] = ""
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


# ----------------------------------------------------------------------------
# One measurement: one jizhid, one open-loop point


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jizhid_argv():
    """How to start jizhid: the script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "jizhid"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("jizhid")
    if found:
        return [found]
    raise click.ClickException("cannot find jizhid (beside this Python or on PATH): is jizhi installed?")


def cpu_s_per_1000_pairs(point):
    """Server CPU-seconds per 1,000 goodput pairs of a ``run_point`` result with
    ``cpu`` (every process of the run: supervisor, broker, workers), or None
    when nothing was scored. Also returns the CPU seconds and the pairs."""
    c = point.get("cpu")
    pairs = point["goodput_pairs_s"] * point["duration_s"]
    if not c:
        return None, None, pairs
    server_s = c["server_us_per_request"] * max(point["ok"], 1) / 1e6
    return (server_s / pairs * 1000.0 if pairs > 0 else None), server_s, pairs


class Testbed:
    """Starts one jizhid per measurement, loads it and stops it.

    Runs in the tuner's process; each jizhid runs in its own session (process
    group) so that stopping it can never touch anything else. Measurements
    run one at a time (they share the machine's cores by design: the CPU of
    one run must not be inflated by another).
    """

    def __init__(self, *, models, trace, pipeline_name, rate, slo_ms, duration_s, warmup_s, work_dir,
                 deadline_ms=1000.0, top_k=10, allow_repeat=False, ready_timeout_s=READY_TIMEOUT_S,
                 max_other_cores=None, settle_s=60.0, retries=2, progress=False, log=None):
        self.models = str(Path(models).resolve())
        self.trace = trace
        self.pipeline_name = pipeline_name
        self.rate = rate
        self.slo_ms = slo_ms
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.work_dir = Path(work_dir)
        self.deadline_ms = deadline_ms
        self.top_k = top_k
        self.allow_repeat = allow_repeat
        self.ready_timeout_s = ready_timeout_s
        self.max_other_cores = max_other_cores
        self.settle_s = settle_s
        self.retries = retries
        self.progress = progress
        self.log = log or (lambda text: None)
        self.count = 0

    def measure_settled(self, tag, *args, **kw):
        """``measure`` on a machine quiet enough: with ``max_other_cores`` set, wait
        (at most ``settle_s``) until other processes use at most that many cores,
        and measure again (``retries`` times) when they used more while it ran.
        Noise inflates both CPU per pair and p99, so a disturbed record is not kept
        when a clean one can be had; the earlier attempts stay in the record."""
        from jizhi.tools.procfs import wait_for_quiet
        earlier = []
        for attempt in range(self.retries + 1):
            if self.max_other_cores is not None:
                wait_for_quiet(self.max_other_cores, self.settle_s, None, self.log)
            rec = self.measure(tag if not attempt else f"{tag}-again{attempt}", *args, **kw)
            other = rec.get("other_cores")
            rec["disturbed"] = bool(self.max_other_cores is not None and other is not None
                                    and other > self.max_other_cores)
            rec["earlier_attempts"] = earlier
            if not rec["disturbed"] or attempt == self.retries:
                return rec
            self.log(f"  {tag}: other processes used {other:.2f} cores while it ran: measuring it again")
            earlier.append({k: rec.get(k) for k in ("tag", "cpu_s_per_1000_pairs", "p99_ms", "other_cores")})
        return rec

    def measure(self, tag, pipeline_path, config_doc, arena, hot_tier_mb, early_stop=False):
        """One measurement; returns its record (never raises for a daemon that fails).

        ``pipeline_path``: the pipeline TOML jizhid serves; ``config_doc``: its
        config (written with ``metrics.listen = ""``); ``arena``: MALLOC_ARENA_MAX
        (0: unset; None: inherited from this process, the shipped default);
        ``hot_tier_mb``: to know whether to wait for the first hot tier.
        """
        from jizhi.tools.bench import LoadGenerator
        from jizhi.tools.procfs import ServerCpu
        self.count += 1
        instance = f"tune{os.getpid()}n{self.count}"
        files = self.work_dir / "evals" / tag
        files.mkdir(parents=True, exist_ok=True)
        cfg = files / "jizhi.toml"
        cfg.write_text(toml_text(measurement_config(config_doc)))
        if Path(pipeline_path).resolve().parent != files.resolve():   # (an evaluation's overlay is there already)
            shutil.copyfile(pipeline_path, files / "pipeline.toml")
        run_dir = Path(tempfile.mkdtemp(prefix=f"jizhi-{instance}-"))   # short: ipc paths live here
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ)
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):   # never talk to the caller's systemd
            env.pop(var, None)
        if arena is not None:
            if arena:
                env[ARENA] = str(arena)
            else:
                env.pop(ARENA, None)
        argv = jizhid_argv() + ["--models", self.models, "--instance", instance, "--frontend", endpoint,
                                "--pipelines", str(Path(pipeline_path).resolve()), "--run-dir", str(run_dir),
                                "--config", str(cfg.resolve())]
        rec = {"tag": tag, "instance": instance, "endpoint": endpoint, "arena": env.get(ARENA, ""),
               "log": str(files / "jizhid.log"), "started": False, "error": None}
        t_spawn = time.monotonic()
        log_f = open(files / "jizhid.log", "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT, env=env,
                                cwd=run_dir, start_new_session=True)
        try:
            why = self._wait_serving(proc, endpoint, run_dir, files / "jizhid.log", hot_tier_mb)
            if why:
                rec["error"] = why
                return rec
            rec["started"] = True
            rec["startup_s"] = round(time.monotonic() - t_spawn, 1)
            gen = LoadGenerator(endpoint, self.trace, deadline_ms=self.deadline_ms, top_k=self.top_k,
                                slo_ms=self.slo_ms, cpu=ServerCpu(run_dir), progress=self.progress,
                                allow_repeat=self.allow_repeat)
            try:
                point = gen.run_point(self.pipeline_name, self.rate, self.duration_s, self.warmup_s,
                                      early_stop=early_stop, label=f"{tag} @ {self.rate:g}/s")
            finally:
                gen.close()
            rec.update(self._figures(point))
        finally:
            rec.update(self._stop(proc, instance, run_dir))
            log_f.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        return rec

    def _wait_serving(self, proc, endpoint, run_dir, log_path, hot_tier_mb):
        """Wait until jizhid is ready, every pool is full and (hot tier on) its first
        generation is built. Returns None, or why it is not serving."""
        import msgpack
        from jizhi.client import Client, wait_ready
        end = time.monotonic() + self.ready_timeout_s
        while not wait_ready(endpoint, timeout_s=1.0):
            if proc.poll() is not None:
                return f"jizhid exited with {proc.returncode} before it was ready:\n{_tail(log_path)}"
            if time.monotonic() > end:
                return f"jizhid not ready within {self.ready_timeout_s:g} s:\n{_tail(log_path)}"
        plan = msgpack.unpackb((run_dir / "plan.msgpack").read_bytes(), raw=False, strict_map_key=False)
        want = {(p, g): grp["pool"] for p, pl in plan["pipelines"].items() for g, grp in pl["groups"].items()}
        with Client(endpoint, timeout_s=2.0) as c:
            while True:
                try:
                    info = c.info()
                    have = {(p, g): v["workers"] for p, pv in info["pipelines"].items()
                            for g, v in pv["groups"].items()}
                    if have == want:
                        break
                except TimeoutError:
                    pass
                if proc.poll() is not None:
                    return f"jizhid exited with {proc.returncode} while its pools filled:\n{_tail(log_path)}"
                if time.monotonic() > end:
                    return f"pools not full within {self.ready_timeout_s:g} s (want {want}):\n{_tail(log_path)}"
                time.sleep(0.1)
        uses_cube = any(st["processor"] in ("cube_accessor", "legacy_scorer")
                        for pl in plan["pipelines"].values() for st in pl["stages"].values())
        if hot_tier_mb and uses_cube:
            # Built by a child after start; a measurement must not include the build or LMDB-only time.
            hot_end = time.monotonic() + HOT_TIER_TIMEOUT_S
            while "hot tier generation 1" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None:
                    return f"jizhid exited with {proc.returncode}:\n{_tail(log_path)}"
                if time.monotonic() > hot_end:
                    self.log(f"  note: no hot tier built within {HOT_TIER_TIMEOUT_S:g} s; measuring anyway")
                    break
                time.sleep(0.1)
        return None

    def _figures(self, point):
        cpu_1000, server_s, pairs = cpu_s_per_1000_pairs(point)
        feasible = bool(point["pass"])
        kinds = (point.get("cpu") or {}).get("kinds", {})
        return {"cpu_s_per_1000_pairs": None if cpu_1000 is None else round(cpu_1000, 6),
                "server_cpu_s": None if server_s is None else round(server_s, 3), "pairs": int(round(pairs)),
                "p50_ms": point["p50_ms"], "p99_ms": point["p99_ms"], "p99_9_ms": point["p99_9_ms"],
                "requests": point["requests"], "ok": point["ok"], "errors": point["errors"], "lost": point["lost"],
                "aborted": point["aborted"], "goodput_pairs_s": point["goodput_pairs_s"],
                "feasible": feasible,
                "cpu_by_kind_ms_per_s": {k: v["ms_per_s"] for k, v in kinds.items()},
                "cores_busy": (point.get("cpu") or {}).get("cores_busy"),
                "other_cores": (point.get("cpu") or {}).get("foreign_cores", point.get("machine_busy_cores")),
                "send_lag_p99_ms": point["send_lag_p99_ms"]}

    def _stop(self, proc, instance, run_dir):
        """SIGTERM, a bounded wait, then SIGKILL to the run's process group; then
        the instance's /dev/shm entries (removed if any, and reported)."""
        from jizhi import shm
        from jizhi.tools.procfs import ServerCpu
        out = {"killed": False}
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                out["killed"] = True
        if out["killed"] or ServerCpu(run_dir).processes():
            out["killed"] = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # our own session: jizhid and its children only
            except ProcessLookupError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        out["exit_code"] = proc.returncode
        left = sorted(p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{instance}.*"))
        if left:
            shm.remove_instance(instance)
            self.log(f"  warning: jizhid {instance} left {len(left)} shared-memory segments; removed them")
        out["shm_left"] = left
        return out


def _tail(path, lines=30):
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + x for x in text)


# ----------------------------------------------------------------------------
# The search and the comparison


def objective(rec, reference, slo_ms):
    """The value told to the optimizer for measurement ``rec``: CPU-s per 1,000
    pairs when feasible, else the penalty (see the module docstring)."""
    if rec.get("feasible") and rec.get("cpu_s_per_1000_pairs"):
        return rec["cpu_s_per_1000_pairs"]
    if rec.get("started") and not rec["errors"] and not rec["lost"] and rec.get("p99_ms") is not None:
        excess = min(1.0, max(0.0, rec["p99_ms"] / slo_ms - 1.0))
    else:
        excess = 1.0
    base = PENALTY_FACTOR * reference
    return round(max(base, 2.0 * (rec.get("cpu_s_per_1000_pairs") or 0.0)) * (1.0 + excess), 6)


def summarize(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "spread": None, "spread_pct": None}
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    return {"n": len(vals), "median": round(med, 6), "min": round(lo, 6), "max": round(hi, 6),
            "spread": round(hi - lo, 6), "spread_pct": round((hi - lo) / med * 100.0, 1) if med else None}


def compare(measurements):
    """Medians, ranges and the gain of the alternating default/chosen measurements."""
    out = {}
    for which in ("default", "chosen"):
        ms = [m for m in measurements if m["setting"] == which]
        out[which] = {"cpu_s_per_1000_pairs": summarize([m.get("cpu_s_per_1000_pairs") for m in ms]),
                      "p99_ms": summarize([m.get("p99_ms") for m in ms]),
                      "feasible": sum(1 for m in ms if m.get("feasible")), "measured": len(ms)}
    d, c = out["default"]["cpu_s_per_1000_pairs"], out["chosen"]["cpu_s_per_1000_pairs"]
    if d["median"] and c["median"] is not None:
        gain = d["median"] - c["median"]
        out["gain_cpu_s_per_1000_pairs"] = round(gain, 6)
        out["gain_pct"] = round(gain / d["median"] * 100.0, 1)
        if c["max"] < d["min"]:
            out["verdict"] = "the chosen setting used less CPU in every measurement than the default in any"
        elif c["min"] > d["max"]:
            out["verdict"] = "the chosen setting used more CPU in every measurement than the default in any"
        else:
            out["verdict"] = "the ranges overlap: the difference is within the run-to-run spread"
    else:
        out["gain_cpu_s_per_1000_pairs"] = out["gain_pct"] = None
        out["verdict"] = "no comparison: a setting scored nothing"
    return out


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def path_table(space, path):
    """The solution path as text lines: eval #, settings, CPU-s per 1,000 pairs, p99, feasible."""
    rows = [(str(e["eval"]) + (" (default)" if e["is_default"] else ""), space.label(e["settings"]),
             _num(e["measurement"].get("cpu_s_per_1000_pairs"), ".5f"), _num(e["measurement"].get("p99_ms"), ".1f"),
             ("yes" if e["measurement"].get("feasible") else
              "no" + (" (did not start)" if not e["measurement"].get("started") else
                      " (errors)" if e["measurement"].get("errors") or e["measurement"].get("lost") else "")),
             _num(e["objective"], ".5f")) for e in path]
    head = ("eval", "settings", "CPU-s/1000 pairs", "p99 ms", "feasible", "objective")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i in (0, 1, 4) else c.rjust(widths[i]) for i, c in enumerate(r))
    return [fmt(head)] + [fmt(r) for r in rows]


def comparison_lines(cmp, measurements, rate, slo_ms):
    lines = [f"comparison at {rate:g} requests/s, SLO p99 <= {slo_ms:g} ms, measured alternately:",
             f"  {'setting':<8} {'round':>5} {'CPU-s/1000 pairs':>17} {'p99 ms':>8} {'goodput pairs/s':>16} "
             f"{'errors':>8}  feasible"]
    for m in measurements:
        errs = sum((m.get("errors") or {}).values()) + (m.get("lost") or 0)
        lines.append(f"  {m['setting']:<8} {m['round']:>5} {_num(m.get('cpu_s_per_1000_pairs'), '.5f'):>17} "
                     f"{_num(m.get('p99_ms'), '.1f'):>8} {_num(m.get('goodput_pairs_s'), ',.0f'):>16} "
                     f"{errs if m.get('started') else '-':>8}  "
                     f"{'yes' if m.get('feasible') else 'no' if m.get('started') else 'no (did not start)'}")
    lines.append(f"  {'':<8} {'':>5} {'median':>10} {'min':>9} {'max':>9} {'spread':>9}   p99 median")
    for which in ("default", "chosen"):
        s, p = cmp[which]["cpu_s_per_1000_pairs"], cmp[which]["p99_ms"]
        lines.append(f"  {which:<8} {'':>5} {_num(s['median'], '.5f'):>10} {_num(s['min'], '.5f'):>9} "
                     f"{_num(s['max'], '.5f'):>9} {_num(s['spread'], '.5f'):>9}   {_num(p['median'], '.1f')} ms"
                     + (f" (spread {s['spread_pct']} %)" if s["spread_pct"] is not None else ""))
    if cmp["gain_cpu_s_per_1000_pairs"] is not None:
        lines.append(f"  gain: {cmp['gain_cpu_s_per_1000_pairs']:.5f} CPU-s per 1,000 pairs "
                     f"({cmp['gain_pct']:+.1f} % of the default's median); {cmp['verdict']}")
    else:
        lines.append(f"  {cmp['verdict']}")
    return lines


def run_tune(*, trace_path, slo_ms, rate, evals, duration_s, warmup_s, repeats, out_dir, models, pipeline,
             config_path, seed=1, initial_points=None, deadline_ms=1000.0, top_k=10, allow_repeat=False,
             ready_timeout_s=READY_TIMEOUT_S, max_other_cores=None, settle_s=60.0, retries=2, progress=False,
             echo=print, note=None):
    """The whole tune: search, overlay, comparison, report. Returns the report dict.

    ``echo`` prints the tables (stdout), ``note`` the progress lines (stderr).
    Raises click.ClickException when the shipped default does not start.
    """
    import tomllib
    import warnings

    from jizhi import config as config_mod
    from jizhi.ctl.inputs import Trace
    from jizhi.tools.bench import check_trace_length
    from jizhi.tools.procfs import environment
    from jizhi.errors import ConfigError, PipelineError
    from jizhi.pipeline import compile_pipeline, pipeline_path, read_pipeline

    note = note or echo
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings = config_mod.load(config_path)
    except ConfigError as e:
        raise click.ClickException(f"--config: {e}")
    base_doc = {}
    if config_path:
        with open(config_path, "rb") as f:
            base_doc = tomllib.load(f)
    models = models or settings["server.models"]
    if not models:
        raise click.UsageError("give --models (or server.models in --config)")
    pipeline = pipeline or settings["server.pipelines"][0]
    src_pipeline = pipeline_path(pipeline).resolve()
    try:
        doc = read_pipeline(str(src_pipeline))
        plan = compile_pipeline(doc, models)
    except PipelineError as e:
        raise click.ClickException(f"--pipeline: {e}")
    trace = Trace(trace_path)
    check_trace_length(trace, rate, duration_s, allow_repeat)
    cores = len(os.sched_getaffinity(0))
    space = search_space(plan, settings, cores, arena_from_env())
    n_init = initial_points or max(2, round(evals / 3))
    n_init = max(1, min(n_init, evals))
    report = {
        "status": "searching", "started": started, "command": sys.argv, "environment": environment(),
        "inputs": {"trace": str(trace_path), "trace_requests": len(trace),
                   "mean_candidates": round(trace.mean_candidates(), 1), "pipeline": str(src_pipeline),
                   "pipeline_name": plan["name"], "config": str(config_path) if config_path else None,
                   "models": str(models), "rate_rps": rate, "slo_p99_ms": slo_ms, "duration_s": duration_s,
                   "warmup_s": warmup_s, "evals": evals, "repeats": repeats, "seed": seed,
                   "initial_points": n_init, "cores": cores, "deadline_ms": deadline_ms, "top_k": top_k,
                   "max_other_cores": max_other_cores},
        "objective": "server CPU-seconds per 1,000 goodput pairs (supervisor + broker + workers, from /proc); "
                     f"infeasible (p99 > SLO, errors, lost): {PENALTY_FACTOR:g} x the default's x (1 + excess)",
        "space": space.describe(), "path": [], "chosen": None, "comparison": None,
        "files": {"report": str(out_dir / REPORT), "settings": str(out_dir / SETTINGS_FILE),
                  "pipeline": str(out_dir / PIPELINE_FILE), "path_table": str(out_dir / PATH_TABLE)},
    }

    def save():
        (out_dir / REPORT).write_text(json.dumps(report, indent=1, default=str))

    per_eval_s = duration_s + warmup_s + 15.0
    note(f"tune {plan['name']} ({', '.join(space.groups)}; {len(space.dims)} dimensions) at {rate:g} requests/s, "
         f"SLO p99 <= {slo_ms:g} ms: {evals} evaluations + {2 * repeats} comparison measurements of "
         f"{warmup_s:g} + {duration_s:g} s, about {(evals + 2 * repeats) * per_eval_s / 60:.0f} min")
    for n in space.notes:
        note(f"  note: {n}")
    if duration_s < 20.0:
        note(f"  note: {duration_s:g} s measured per point is shorter than the benchmark rule's 20 s")
    bed = Testbed(models=models, trace=trace, pipeline_name=plan["name"], rate=rate, slo_ms=slo_ms,
                  duration_s=duration_s, warmup_s=warmup_s, work_dir=out_dir, deadline_ms=deadline_ms,
                  top_k=top_k, allow_repeat=allow_repeat, ready_timeout_s=ready_timeout_s,
                  max_other_cores=max_other_cores, settle_s=settle_s, retries=retries, progress=progress, log=note)

    from skopt import Optimizer
    opt = Optimizer(space.skopt_dimensions(), base_estimator="GP", n_initial_points=n_init,
                    initial_point_generator="random", acq_func="gp_hedge", random_state=seed,
                    space_constraint=space.constraint)
    default = space.default
    reference = None
    cand_dir = out_dir / "evals"
    for i in range(1, evals + 1):
        if i == 1:
            point = default
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "evaluated before, using a random point": logged below
                point = space.from_x(opt.ask())
        tag = f"e{i:02d}"
        if i == 1:
            rec = bed.measure_settled(tag, src_pipeline, base_doc, None, point[HOT_TIER], early_stop=True)
        else:
            s_path, p_path = write_overlay(cand_dir / tag, space, point, base_doc, doc, f"evaluation {i}")
            with open(s_path, "rb") as f:
                cfg_doc = tomllib.load(f)
            rec = bed.measure_settled(tag, p_path, cfg_doc, point[ARENA], point[HOT_TIER], early_stop=True)
        if i == 1:
            if not rec["started"]:
                report["path"].append({"eval": 1, "is_default": True, "settings": point, "objective": None,
                                       "measurement": rec})
                report["status"] = "failed: the shipped default did not start"
                save()
                raise click.ClickException(f"the shipped default did not start: {rec['error']}")
            reference = rec.get("cpu_s_per_1000_pairs") or 1.0
            if not rec["feasible"]:
                note(f"  warning: the shipped default misses the objective at {rate:g} requests/s (p99 "
                     f"{rec['p99_ms']} ms, errors {rec['errors'] or 0}, lost {rec['lost']}): give a --rate of "
                     f"70-80 % of its maximum (jizhictl bench --find-max)")
        y = objective(rec, reference, slo_ms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.tell(space.to_x(point), y)
        report["path"].append({"eval": i, "is_default": point == default, "settings": point, "objective": y,
                               "measurement": rec})
        feasible = [e for e in report["path"] if e["measurement"].get("feasible")]
        best = min(feasible, key=lambda e: e["measurement"]["cpu_s_per_1000_pairs"]) if feasible else None
        m = rec
        note(f"[{i:>2}/{evals}] {space.label(point)} -> "
             + (f"{_num(m.get('cpu_s_per_1000_pairs'), '.5f')} CPU-s/1000 pairs, p99 {_num(m.get('p99_ms'), '.1f')} ms, "
                f"{'feasible' if m['feasible'] else 'INFEASIBLE'}" if m["started"] else
                f"did not start: {m['error'].splitlines()[0]}")
             + (f"  (best: #{best['eval']} {best['measurement']['cpu_s_per_1000_pairs']:.5f})" if best else ""))
        save()

    table = path_table(space, report["path"])
    (out_dir / PATH_TABLE).write_text("\n".join(table) + "\n")
    echo("")
    echo(f"solution path ({plan['name']} at {rate:g} requests/s, SLO p99 <= {slo_ms:g} ms; objective = CPU-s per "
         f"1,000 pairs, or the penalty when infeasible):")
    for line in table:
        echo("  " + line)

    feasible = [e for e in report["path"] if e["measurement"].get("feasible")]
    if not feasible:
        report["status"] = "done: no evaluated point met the objective"
        save()
        raise click.ClickException(f"no evaluated point met p99 <= {slo_ms:g} ms without errors at {rate:g} "
                                   f"requests/s: lower --rate (70-80 % of the default's maximum from "
                                   f"jizhictl bench --find-max). The path is in {out_dir / REPORT}")
    best = min(feasible, key=lambda e: e["measurement"]["cpu_s_per_1000_pairs"])
    chosen = best["settings"]
    s_path, p_path = write_overlay(out_dir, space, chosen, base_doc, doc,
                                   f"evaluation {best['eval']} of {evals} ({'the shipped default' if best['is_default'] else 'chosen'}), "
                                   f"{rate:g} requests/s, SLO p99 <= {slo_ms:g} ms, {started}")
    report["chosen"] = {"eval": best["eval"], "is_default": best["is_default"], "settings": chosen,
                        "changed": {k: [default[k], chosen[k]] for k in space.names if chosen[k] != default[k]},
                        "arena_advice": arena_advice(chosen[ARENA])}
    echo("")
    echo(f"chosen: evaluation {best['eval']}" + (" (the shipped default: no evaluated point used less CPU)"
                                                  if best["is_default"] else ""))
    for k, (a, b) in report["chosen"]["changed"].items():
        echo(f"  {k}: {a if k != ARENA else (a or 'unset')} -> {b if k != ARENA else (b or 'unset')}")
    echo(f"  written: {s_path}, {p_path}")
    save()

    with open(s_path, "rb") as f:
        chosen_cfg = tomllib.load(f)
    measurements = []
    for r in range(1, repeats + 1):
        for which in ("default", "chosen"):
            tag = f"c{r}-{which}"
            if which == "default":
                rec = bed.measure_settled(tag, src_pipeline, base_doc, None, default[HOT_TIER])
            else:
                rec = bed.measure_settled(tag, p_path, chosen_cfg, chosen[ARENA], chosen[HOT_TIER])
            rec.update(setting=which, round=r)
            measurements.append(rec)
            note(f"[compare {r}/{repeats}] {which:<7} -> "
                 + (f"{_num(rec.get('cpu_s_per_1000_pairs'), '.5f')} CPU-s/1000 pairs, p99 "
                    f"{_num(rec.get('p99_ms'), '.1f')} ms" if rec["started"] else "did not start"))
            report["comparison"] = {"measurements": measurements}
            save()
    cmp = compare(measurements)
    report["comparison"] = dict(cmp, measurements=measurements)
    report["status"] = "done"
    report["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    save()
    echo("")
    for line in comparison_lines(cmp, measurements, rate, slo_ms):
        echo(line)
    echo(f"report: {out_dir / REPORT}")
    return report


# ----------------------------------------------------------------------------
# The command


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Request trace to replay (trace.npz, docs/formats.md); it should hold at least "
                   "--rate x --duration requests (no request repeats within a point).")
@click.option("--slo-p99", "slo_ms", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="Latency objective, ms: a point is feasible with p99 <= this, no error and nothing lost.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Offered load, requests/s, the same for every measurement. Give 70-80 % of the shipped "
                   "default's maximum (jizhictl bench --find-max, --slo-ms the same): CPU per pair is then "
                   "compared at a load the default meets, and p99 is checked under it.")
@click.option("--evals", type=click.IntRange(1), default=20, show_default=True,
              help="Evaluations in the search (the first is the shipped default).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Seconds measured per evaluation (the benchmark rule: at least 20).")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds of the same load before each measured window, not counted.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Final comparison: measurements of the default and of the chosen setting each, alternating.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output directory: tune-report.json, tune-settings.toml, tune-pipeline.toml, tune-path.txt, evals/.")
@click.option("--models", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model directory <models>/<name>/<version>/ [default: server.models of --config].")
@click.option("--pipeline", default=None,
              help="Pipeline to tune: a name in etc/pipelines or a .toml path [default: the first of "
                   "server.pipelines of --config].")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Base jizhi.toml: the shipped default's settings, and the base of tune-settings.toml "
                   "[default: built-in defaults].")
@click.option("--seed", type=int, default=1, show_default=True, help="Random state of the optimizer.")
@click.option("--initial-points", type=click.IntRange(1), default=None,
              help="Evaluations before the surrogate model steers (the default counts as one) "
                   "[default: a third of --evals, at least 2].")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Deadline sent with every request; no reply within deadline + 1 s counts as lost.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--allow-repeat", is_flag=True, help="Allow a trace shorter than --rate x --duration.")
@click.option("--ready-timeout", "ready_timeout_s", type=click.FloatRange(min=1), default=READY_TIMEOUT_S,
              show_default=True, help="Seconds a started jizhid may take to serve with full pools.")
@click.option("--max-other-cores", type=click.FloatRange(min=0), default=None,
              help="A shared machine: before each measurement wait until other processes use at most this many "
                   "cores, and measure again when they used more while it ran.")
@click.option("--settle-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="--max-other-cores: longest wait for a quiet machine before a measurement.")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="--max-other-cores: how often a disturbed measurement is repeated.")
@click.option("--quiet", is_flag=True, help="No live load line on stderr (the line per evaluation stays).")
def tune_command(trace_path, slo_ms, rate, evals, duration_s, warmup_s, repeats, out_dir, models, pipeline,
                 config_path, seed, initial_points, deadline_ms, top_k, allow_repeat, ready_timeout_s,
                 max_other_cores, settle_s, retries, quiet):
    """Search the deployment settings that serve a trace with the least CPU
    per pair under a p99 objective, offline, against real jizhid runs.

    Each evaluation starts its own jizhid (a fresh instance, free port,
    metrics off) with candidate settings, waits for full pools and the hot
    tier, replays the trace open loop at --rate for --warmup + --duration
    seconds and measures the server's CPU-seconds per 1,000 scored pairs
    (every jizhid process, from /proc) and the p99 latency; then stops it
    and checks /dev/shm. Run it on a quiet machine: other load inflates the
    CPU and latency figures (each record notes other processes' cores).

    \b
    Searched (scikit-optimize, a Gaussian process, ask/tell):
      per worker group: pool 1..2 x cores, batch 1/2/4/8/16/32,
                        batch_wait_ms 0..5 (pools together <= 2 x cores)
      cube.hot_tier_mb  0 (off)/64/256/1024
      MALLOC_ARENA_MAX  1/2/4/unset (jizhid's environment)
      qcache.window_s   10..300 s (pipelines with a query_cache stage)
    The shipped default's values join the lists; evaluation 1 is the
    default. A point is feasible with p99 <= --slo-p99, no error, nothing
    lost; an infeasible one counts as 3 x the default's CPU x (1 + how far
    p99 is over, up to 1). The chosen setting is the feasible point with the
    least CPU per 1,000 pairs.

    Then the default (files as given) and the chosen setting (the overlay
    files as written) are measured alternately --repeats times each; the
    report gives medians, min, max and spread, and the gain.

    \b
    Writes in --out: tune-settings.toml (the base config with the chosen
    settings; MALLOC_ARENA_MAX advice in its header), tune-pipeline.toml
    (the pipeline with the chosen pool/batch/batch_wait_ms), tune-report.json
    (everything, rewritten after every evaluation), tune-path.txt (the
    solution path) and evals/ (each run's config, pipeline and jizhid log).
    Time: about (--evals + 2 x --repeats) x (--warmup + --duration + 15 s).

    \b
      jizhictl bench --trace trace.npz --find-max --pipeline demo   # on a served default: its max
      jizhictl tune --models models --trace trace.npz --pipeline demo \\
          --rate 250 --slo-p99 50 --evals 16 --repeats 3 --out tune/
    """
    run_tune(trace_path=trace_path, slo_ms=slo_ms, rate=rate, evals=evals, duration_s=duration_s,
             warmup_s=warmup_s, repeats=repeats, out_dir=out_dir, models=models, pipeline=pipeline,
             config_path=config_path, seed=seed, initial_points=initial_points, deadline_ms=deadline_ms,
             top_k=top_k, allow_repeat=allow_repeat, ready_timeout_s=ready_timeout_s,
             max_other_cores=max_other_cores, settle_s=settle_s, retries=retries,
             progress=not quiet and sys.stderr.isatty(), echo=click.echo,
             note=lambda s: click.echo(s, err=True))


if __name__ == "__main__":
    tune_command(prog_name="python -m jizhi.tools.tune")
