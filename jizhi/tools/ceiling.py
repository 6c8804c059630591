"""The in-process ceiling: ``jizhictl bench --ceiling`` (``run_ceiling_settled``).

Runs in the operator's shell, never inside jizhid: the same trace through the
same bundle in-process, with nothing between the stages. The five stage
processors of the demo pipeline run back to back (``CeilingScorer``) in one
process per core (spawned, pinned to its core, onnxruntime on one thread),
with the profiles copied into RAM and the cube loaded whole into a
``RamTable``, closed loop. It is the machine's limit for the work (the same
work minus LMDB, mmap, sockets and shared memory), the figure jizhi's
throughput is compared to (docs/benchmarks.md).

The same model in three modes (``--ceiling-mode``, ``MODES``), each the
pipeline jizhi serves it in, compiled by ``compile_pipeline`` so every stage
gets the config that pipeline's workers get: ``per_pair`` (pipeline
``structured = false``: every stage works per pair, as a generic server does),
``structured`` (the default: the user part once per request) and ``items``
(structured plus the item part once per version: the cube stage's ``item_rows
= true`` and the dnn stage's ``item_cache = true``; the item rows and the item
table are built while the stages are set up, before the measured window). Time per
stage is the thread's CPU time (``time.thread_time_ns``): onnxruntime runs on
the calling thread (one intra-op thread), so it is the process's CPU.
"""
import collections
import os
import time
from pathlib import Path

import click
import numpy as np

from jizhi.ctl.inputs import Trace
from jizhi.errors import PipelineError
from jizhi.tools.loadgen import percentiles
from jizhi.tools.procfs import machine_busy_s, self_cpu_s, wait_for_quiet


def _in_ram(obj):
    """Replace every array attribute of ``obj`` (also inside dicts and tuples)
    by a private in-RAM copy: no memory map is read afterwards."""
    def copy(v):
        if isinstance(v, np.ndarray):
            return np.array(v)  # subok=False: a plain ndarray, never a memmap
        if isinstance(v, tuple):
            return tuple(copy(x) for x in v)
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v
    for name, value in vars(obj).items():
        setattr(obj, name, copy(value))
    return obj


STAGES = (("reader", "data_reader"), ("features", "feature_processor"), ("cube", "cube_accessor"),
          ("dnn", "model_inference"), ("rank", "ranker"))

# The pipelines jizhi serves one model in: mode -> (the pipeline's structured, the dnn stage's options,
# the cube stage's options).
MODES = {"per_pair": (False, {}, {}), "structured": (True, {}, {}),
         "items": (True, {"item_cache": True}, {"item_rows": True})}


def check_mode(mode):
    """Raise ValueError (one line) unless ``mode`` is one of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"unknown ceiling mode {mode!r}: one of {', '.join(MODES)}")


def parse_modes(text):
    """``--ceiling-mode``'s comma-separated list: the modes in the order given, each once.
    Raises ValueError (one line) naming an unknown mode."""
    modes = []
    for mode in (m.strip() for m in text.split(",") if m.strip()):
        check_mode(mode)
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise ValueError(f"no ceiling mode given: one or more of {', '.join(MODES)}")
    return modes


def mode_pipeline(name, model, mode, version="latest", pool=1, batch=8, batch_wait_ms=0):
    """The fused pipeline (a ``jizhi.pipeline.Pipeline``) that serves ``model`` in ``mode`` (``MODES``):
    what the ceiling compiles, and what docs/run-cost-account.py serves beside it."""
    from jizhi.pipeline import Pipeline
    check_mode(mode)
    structured, dnn_options, cube_options = MODES[mode]
    p = Pipeline(name, model=model, version=version, on_unknown="default")
    p.doc["structured"] = structured
    p.front(["dnn"]).stage("dnn", "model_inference", next=["rank"], **dnn_options).stage("rank", "ranker")
    next(st for st in p.doc["stage"] if st["name"] == "cube").update(cube_options)
    return p.fuse("scorer", [name for name, _ in STAGES], pool=pool, batch=batch, batch_wait_ms=batch_wait_ms)


def stage_configs(bundle, mode):
    """``{stage name: config}``: what ``compile_pipeline`` gives the five stages of the fused
    pipeline ``mode`` names, on ``bundle``'s version (``<models>/<name>/<version>``).
    Raises ValueError for an unknown mode or a version the compiler cannot find there."""
    from jizhi.pipeline import compile_pipeline
    p = mode_pipeline(f"ceiling_{mode}", bundle.name, mode, version=bundle.version)
    models_dir = bundle.path.parent.parent
    try:
        plan = compile_pipeline(p.doc, models_dir)
    except PipelineError as e:
        raise ValueError(f"the ceiling compiles its pipeline from {models_dir}: {e}")
    if Path(plan["version_dir"]).resolve() != bundle.path.resolve():
        raise ValueError(f"{bundle.path} is not {models_dir}/{bundle.name}/{bundle.version}: the ceiling scores "
                         "a version where jizhid would find it (<models>/<name>/<version>)")
    return {name: plan["stages"][name]["config"] for name, _ in STAGES}


class CeilingScorer:
    """The fused pipeline's five stage processors, back to back in one process,
    reading RAM instead of LMDB and memory maps. Each processor is set up as a
    worker of the pipeline ``mode`` names (``MODES``) sets it up, with the
    config ``compile_pipeline`` gives it, then its stores are swapped: the
    profiles' columns for in-RAM copies, the cube for a hot-tier table of the
    whole cube (the fastest store jizhi has, cube/hot.py), private to this
    process. The ``process`` code is the fused worker's. ``setup_s``: seconds
    the stages took to set up (the item table's build included), outside any
    measured window."""

    def __init__(self, version_dir, mode="structured"):
        from jizhi.bundle import Bundle
        from jizhi.cube.hot import private_table
        from jizhi.cube.table import RamTable
        from jizhi.cube.build import read_all
        from jizhi.workers.builtins import load_class
        check_mode(mode)
        self.mode = mode
        bundle = Bundle(version_dir)
        configs = stage_configs(bundle, mode)
        # Read the whole cube before cube_accessor opens it: LMDB forbids one
        # environment open twice in a process.
        keys, vectors = read_all(bundle.cube_path)
        table = private_table(keys, vectors)     # mapped, its segment already unlinked
        t0 = time.monotonic()
        self.stages = []
        for name, proc in STAGES:
            stage = load_class(proc)()
            stage.setup(dict(configs[name]), bundle)
            self.stages.append((name, stage))
        self.setup_s = time.monotonic() - t0
        reader, cube, dnn = self.stages[0][1], self.stages[2][1], self.stages[3][1]
        _in_ram(reader.users)
        _in_ram(reader.items)
        cube.store.table = table
        cube.store.cube = RamTable(keys, vectors)   # what the table lacks (signatures absent from the cube)
        self.item_table_build_s = None
        if mode == "items":
            if dnn.item_table is None:      # refused (too large) or nothing item-only: it would measure structured
                raise ValueError(f"ceiling mode items: the dnn stage built no item table for {version_dir} "
                                 "(its log line says why)")
            if cube.item_rows is None:      # refused (over item_rows_mb): the cube would pool every item bag
                raise ValueError(f"ceiling mode items: the cube stage built no item rows for {version_dir} "
                                 "(its log line says why)")
            _in_ram(dnn.item_table.items)
            _in_ram(cube.item_rows.items)
            self.item_table_build_s = round(dnn.item_table.build_s + cube.item_rows.build_s, 2)

    def score(self, users, offsets, items, recall, top_k, stage_us):
        """Score one batch of requests; adds each stage's CPU time (us, this thread's) to ``stage_us``."""
        from jizhi.workers.stage import Batch
        r = users.shape[0]
        batch = Batch(users, np.full(r, top_k, dtype=np.int64), np.zeros(r, dtype=bool),
                      np.full(r, np.inf), offsets, {"item_ids": items, "recall_scores": recall})
        # One clock read per stage boundary: thread_time_ns costs ~1 us (a system call), perf_counter less.
        t = time.thread_time_ns()
        for name, proc in self.stages:
            batch.columns.update(proc.process(batch))
            now = time.thread_time_ns()
            stage_us[name] += (now - t) / 1e3
            t = now
        return batch


def _ceiling_worker(version_dir, mode, trace_path, core, start, batch_size, top_k, warmup_s, duration_s,
                    ready, go, t0_value, results):
    # ready, results: Queues; go: Event; t0_value: the shared start time (monotonic s).
    """One ceiling process (spawned): pin, load (the item table too), wait for the start, loop closed."""
    os.sched_setaffinity(0, {core})
    scorer = CeilingScorer(version_dir, mode)
    tr = Trace(trace_path)
    q = len(tr)
    stage_us = collections.defaultdict(float)
    i = start % q

    def take(i):
        rows = (i + np.arange(batch_size)) % q
        if batch_size == 1:
            r = rows[0]
            a, b = tr.offsets[r], tr.offsets[r + 1]
            return tr.users[rows], np.array([0, b - a], dtype=np.int64), tr.items[a:b], tr.recall[a:b], rows
        counts = tr.counts[rows]
        offsets = np.zeros(batch_size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        items = np.concatenate([tr.items[tr.offsets[r]:tr.offsets[r + 1]] for r in rows])
        recall = np.concatenate([tr.recall[tr.offsets[r]:tr.offsets[r + 1]] for r in rows])
        return tr.users[rows], offsets, items, recall, rows

    for _ in range(3):  # first calls: onnxruntime and numba warm paths, not measured
        scorer.score(*take(i)[:4], top_k, collections.defaultdict(float))
    ready.put(core)
    go.wait()
    t0 = t0_value.value
    t_meas, t_end = t0 + warmup_s, t0 + warmup_s + duration_s
    lat, n_req, n_pairs = [], 0, 0
    cpu0 = None
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        measured = now >= t_meas
        if measured and cpu0 is None:
            cpu0 = self_cpu_s()
            stage_us.clear()
        users, offsets, items, recall, rows = take(i)
        t = time.perf_counter()
        scorer.score(users, offsets, items, recall, top_k, stage_us if measured else collections.defaultdict(float))
        dt_ms = (time.perf_counter() - t) * 1000.0
        i = (i + batch_size) % q
        if measured:
            lat.extend([dt_ms] * batch_size)
            n_req += batch_size
            n_pairs += int(offsets[-1])
    cpu = self_cpu_s() - (cpu0 if cpu0 is not None else self_cpu_s())
    results.put({"core": core, "requests": n_req, "pairs": n_pairs, "lat_ms": lat, "cpu_s": cpu,
                 "stage_us": dict(stage_us), "setup_s": scorer.setup_s,
                 "item_table_build_s": scorer.item_table_build_s})


def _collect(queue, procs, doing):
    """One message per process from ``queue``; fail when a process dies first."""
    import queue as queue_mod
    got = []
    while len(got) < len(procs):
        try:
            got.append(queue.get(timeout=1.0))
        except queue_mod.Empty:
            if any(p.exitcode for p in procs) or all(p.exitcode is not None for p in procs):
                raise click.ClickException(f"a ceiling process died while {doing} (exit codes "
                                           f"{[p.exitcode for p in procs]}); its traceback is above")
    return got


def run_ceiling_settled(version_dir, trace_path, *, max_other_cores=None, settle_s=60.0, retries=2, log=None,
                        **kw):
    """``run_ceiling``, waiting for a quiet machine first when ``max_other_cores``
    is set and running again (``retries`` times) when other processes took
    more than that during the run; keeps the fastest run (noise only slows)."""
    runs = []
    for attempt in range(retries + 1):
        quiet = wait_for_quiet(max_other_cores, settle_s, None, log) if max_other_cores is not None else None
        c = run_ceiling(version_dir, trace_path, **kw)
        c["waited_for_quiet"] = quiet
        c["disturbed"] = max_other_cores is not None and c["foreign_cores"] > max_other_cores
        runs.append(c)
        if not c["disturbed"]:
            break
        if log and attempt < retries:
            log(f"  ceiling ran while other processes used {c['foreign_cores']:.2f} cores: running it again")
    best = max(runs, key=lambda c: c["pairs_s"])
    best["attempts"] = [{k: c[k] for k in ("pairs_s", "rps", "cpu_us_per_request", "foreign_cores")} for c in runs]
    return best


def run_ceiling(version_dir, trace_path, *, duration_s, warmup_s, top_k, batch_size, mode="structured",
                processes=None):
    """The ceiling of one mode (``MODES``): one pinned process per core, closed loop; returns the
    result dict. A bad mode or version layout raises click.ClickException before anything spawns."""
    import multiprocessing as mp
    from jizhi.bundle import Bundle
    try:
        stage_configs(Bundle(version_dir), mode)
    except ValueError as e:
        raise click.ClickException(str(e))
    cores = sorted(os.sched_getaffinity(0))
    n = processes or len(cores)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    go = ctx.Event()
    t0 = ctx.Value("d", 0.0)
    results = ctx.Queue()
    q = len(Trace(trace_path))
    procs = [ctx.Process(target=_ceiling_worker,
                         args=(str(version_dir), mode, str(trace_path), cores[j % len(cores)], j * q // n,
                               batch_size, top_k, warmup_s, duration_s, ready, go, t0, results), daemon=True)
             for j in range(n)]
    for p in procs:
        p.start()
    try:
        _collect(ready, procs, "setting up")
        t0.value = start = time.monotonic() + 0.05
        go.set()
        time.sleep(max(0.0, start + warmup_s - time.monotonic()))
        mach0 = machine_busy_s()
        time.sleep(max(0.0, start + warmup_s + duration_s - time.monotonic()))
        mach1 = machine_busy_s()
        out = _collect(results, procs, "scoring")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    lat = np.array([x for o in out for x in o["lat_ms"]], dtype=np.float64)
    reqs = sum(o["requests"] for o in out)
    pairs = sum(o["pairs"] for o in out)
    cpu = sum(o["cpu_s"] for o in out)
    stage = collections.defaultdict(float)
    for o in out:
        for k, v in o["stage_us"].items():
            stage[k] += v
    builds = [o["item_table_build_s"] for o in out if o["item_table_build_s"] is not None]
    return {"mode": mode, "processes": n, "cores": cores, "batch": batch_size, "duration_s": duration_s,
            "warmup_s": warmup_s, "requests": reqs, "rps": round(reqs / duration_s, 1),
            "pairs_s": round(pairs / duration_s, 1), **percentiles(lat),
            "stage_us_per_request": {k: round(stage[k] / max(reqs, 1), 1) for k, _ in STAGES},
            "stage_clock": "thread_time",       # stage_us_per_request is CPU time, not wall
            "setup_s": round(max(o["setup_s"] for o in out), 2),
            "item_table_build_s": round(max(builds), 2) if builds else None,
            "cpu_us_per_request": round(cpu * 1e6 / max(reqs, 1), 1),
            "cores_busy": round(cpu / duration_s, 2),
            "foreign_cores": round(max(0.0, (mach1[0] - mach0[0]) / max(mach1[1] - mach0[1], 1e-9) * (os.cpu_count() or 1)
                                       - cpu / duration_s), 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def print_ceiling(c, out=print):
    out(f"ceiling {c.get('mode', 'structured')}: {c['processes']} processes (cores {c['cores']}), "
        f"batch {c['batch']}: "
        f"{c['pairs_s']:,.0f} pairs/s, {c['rps']:,.1f} requests/s, latency p50 {c['p50_ms']} ms "
        f"p99 {c['p99_ms']} ms, CPU {c['cpu_us_per_request']:,.0f} us/request ({c['cores_busy']} cores busy, "
        f"anything else {c['foreign_cores']} cores)")
    clock = "CPU (thread time)" if c.get("stage_clock") == "thread_time" else "wall"
    out(f"  mean {clock} us per request by stage: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in c["stage_us_per_request"].items())
        + (f"; item table and item rows built in set-up ({c['item_table_build_s']} s, not measured)"
           if c.get("item_table_build_s") is not None else ""))

