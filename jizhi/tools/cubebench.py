"""The storage micro-benchmark: keys/s per core at each place a cube lookup can be answered.

``jizhictl cube bench`` (run by hand, documented in docs/benchmarks.md,
"Storage micro-benchmarks"; never in CI). One process, one thread, in one
run, on the same batches of sorted unique keys (what ``pool_blocks`` hands
the store):

* the hot tier (cube/hot.py): a table segment of the whole cube in /dev/shm,
  built with the builder's own functions and unlinked as soon as it is
  mapped, read by ``HotTable.lookup_into`` with the output allocated per batch
  as ``TieredStore.lookup`` does, and once more into a preallocated output
  (the kernel alone);
* the LMDB cube through ``Cube.lookup`` (the verified Numba B+tree reader);
* the same cube through liblmdb (``Cube(path, dim, reader="liblmdb")``);
* a Python dict {signature: vector} and a loop over the keys;
* an in-RAM numpy gather (``RamTable``: ``searchsorted`` + take), the
  reference the issue's targets are stated against (hot tier >= 10 million
  keys/s at dim 32, and >= 70 % of the gather).

Keys/s per core = keys looked up / the thread's CPU time (``thread_time``),
so time-slicing by other processes on a shared machine is not charged; the
wall-clock rate is reported beside it (they agree on a quiet machine). Each
method warms up first, then runs ``repeats`` timed slices of ``duration_s /
repeats``; the median slice is the figure.

Key batches: with a bundle, drawn without replacement, weighted by how often
a demo trace's requests read each signature (the real DataReader ->
FeatureProcessor stages on the trace's requests; the signatures one request
asks the store for, deduplicated within the request as cube_accessor does);
the trace's skew is reported (share of lookups on the top 0.1/1/10 % of the
cube's keys). With a bare cube (``--cube``), or ``--keys uniform``, drawn
uniformly from the cube's keys.
"""
import os
import statistics
import tempfile
import time

import lmdb
import numpy as np

from jizhi.cube.build import locate_cube, read_all
from jizhi.cube.hot import private_table
from jizhi.cube.pooling import valid_signatures
from jizhi.cube.store import Cube
from jizhi.cube.table import RamTable

TARGET_HOT_KEYS_S = 10e6        # issue 5: the hot tier, dim 32, one core
TARGET_HOT_VS_GATHER = 0.70     # issue 5: the hot tier against the in-RAM gather
POOL_BATCHES = 32               # distinct batches cycled through while timing


# --- what the serving pipeline asks the store for ------------------------------------

def trace_lookups(version_dir, trace_path=None, requests=500, candidates=500, seed=1, log=None):
    """The signatures each request of a demo trace asks the store for.

    Runs the real ``data_reader`` and ``feature_processor`` processors of the
    bundle at ``version_dir`` on each request of ``trace_path`` (or of a
    trace of ``requests`` x ``candidates`` generated here and deleted), one
    request per batch, and collects the valid user and item signatures
    cube_accessor would pool, deduplicated within the request. Returns
    ``(keys uint64 [L], requests)``: the requests' key sets concatenated.
    """
    sets = request_key_sets(version_dir, trace_path, requests, candidates, seed, log)
    return np.concatenate(sets), len(sets)


def request_key_sets(version_dir, trace_path=None, requests=500, candidates=500, seed=1, log=None, limit=None):
    """Per request of the trace (the first ``limit``), its sorted distinct signatures (see ``trace_lookups``)."""
    from jizhi.bundle import Bundle
    from jizhi.workers.data_reader import DataReader
    from jizhi.workers.feature_processor import FeatureProcessor
    from jizhi.workers.stage import Batch

    tmp = None
    if trace_path is None:
        from jizhi.tools.demo import generate_trace
        fd, tmp = tempfile.mkstemp(prefix="jizhi-cube-bench-", suffix=".npz")
        os.close(fd)
        if log:
            log(f"generating a trace of {requests} requests x {candidates} candidates (seed {seed})")
        generate_trace(version_dir, tmp, requests=requests, candidates=candidates, seed=seed, progress=False)
        trace_path = tmp
    try:
        with np.load(trace_path, allow_pickle=False) as t:
            users = np.ascontiguousarray(t["users"], dtype=np.uint64)
            offsets = np.ascontiguousarray(t["offsets"], dtype=np.int64)
            items = np.ascontiguousarray(t["items"], dtype=np.uint64)
    finally:
        if tmp:
            os.unlink(tmp)
    bundle = Bundle(version_dir)
    reader, features = DataReader(), FeatureProcessor()
    reader.setup({"on_unknown": "default"}, bundle)
    features.setup({}, bundle)
    out = []
    for r in range(users.shape[0] if limit is None else min(limit, users.shape[0])):
        a, b = offsets[r], offsets[r + 1]
        batch = Batch(users[r:r + 1], np.full(1, 10, np.int64), np.zeros(1, bool), np.full(1, np.inf),
                      np.array([0, b - a], np.int64), {"item_ids": items[a:b]})
        batch.columns.update(reader.process(batch))
        batch.columns.update(features.process(batch))
        sigs = np.concatenate([valid_signatures(batch["user_sigs"], batch["user_lens"]),
                               valid_signatures(batch["item_sigs"], batch["item_lens"])])
        out.append(np.unique(sigs))
    return out


def skew(lookups, cube_keys, requests):
    """How concentrated ``lookups`` (uint64, with repeats) are on the cube's most read keys."""
    present = np.isin(lookups, cube_keys)
    keys, counts = np.unique(lookups[present], return_counts=True)
    by_use = np.sort(counts)[::-1]
    n_cube = cube_keys.shape[0]
    total = int(present.sum())

    def share(fraction):
        top = max(1, int(round(fraction * n_cube)))
        return round(float(by_use[:top].sum()) / max(total, 1), 4)

    return {"requests": int(requests), "lookups": int(lookups.shape[0]),
            "lookups_per_request": round(lookups.shape[0] / max(requests, 1), 1),
            "missing_from_cube": int(lookups.shape[0] - total),
            "distinct_keys_read": int(keys.shape[0]), "cube_keys": int(n_cube),
            "share_top_0.1pct": share(0.001), "share_top_1pct": share(0.01), "share_top_10pct": share(0.10)}, \
        (keys, counts)


def key_batches(cube_keys, batch, count, weights=None, seed=0):
    """``count`` batches of ``batch`` distinct keys, sorted ascending (as ``np.unique`` gives them).

    ``weights``: ``(keys, counts)`` to draw by (without replacement within a
    batch), or None for uniform draws from ``cube_keys``.
    """
    rng = np.random.default_rng(seed)
    if weights is None:
        population, p = cube_keys, None
    else:
        population, c = weights
        p = c / c.sum()
    size = min(batch, population.shape[0])
    return [np.sort(rng.choice(population, size=size, replace=False, p=p)) for _ in range(count)]


# --- timing -------------------------------------------------------------------------

def _busy_s():
    from jizhi.tools.bench import machine_busy_s
    return machine_busy_s()


def measure(fn, batches, duration_s, repeats, warmup_s):
    """Time ``fn(keys)`` over ``batches`` (cycled): warm-up, then ``repeats`` slices.

    Returns {"keys_per_s" (median of the slices, per CPU second of this
    thread), "slices" [per slice], "wall_keys_per_s" (median), "other_cores"
    (what other processes used meanwhile), "own_other_threads_cores" (this
    process's other threads: should be 0)}.
    """
    i = 0
    end = time.perf_counter() + warmup_s
    while i < 2 or time.perf_counter() < end:
        fn(batches[i % len(batches)])
        i += 1
    per = duration_s / repeats
    cpu_rates, wall_rates = [], []
    m0, t0_all, c0_all, p0_all = _busy_s(), time.perf_counter(), time.thread_time(), time.process_time()
    for _ in range(repeats):
        n = 0
        t0, c0 = time.perf_counter(), time.thread_time()
        while True:
            b = batches[i % len(batches)]
            fn(b)
            n += b.shape[0]
            i += 1
            if time.perf_counter() - t0 >= per:
                break
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        cpu_rates.append(n / max(cpu, 1e-9))
        wall_rates.append(n / wall)
    m1, wall_all = _busy_s(), time.perf_counter() - t0_all
    cpu_all, proc_all = time.thread_time() - c0_all, time.process_time() - p0_all
    busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1e-9) * (os.cpu_count() or 1)
    return {"keys_per_s": statistics.median(cpu_rates), "slices": [round(x) for x in cpu_rates],
            "wall_keys_per_s": statistics.median(wall_rates),
            "other_cores": round(max(0.0, busy - proc_all / wall_all), 2),
            "own_other_threads_cores": round(max(0.0, proc_all - cpu_all) / wall_all, 2)}


# --- the run ------------------------------------------------------------------------

def run(cube=None, bundle=None, batch=4096, duration_s=3.0, repeats=5, draw="trace", trace_path=None,
        requests=500, seed=1, log=None):
    """One storage micro-benchmark run; returns the result dict (``format_report`` prints it).

    ``cube``: a cube directory or bundle; ``bundle``: a bundle (version
    directory, model directory or demo directory) whose trace weights the
    keys. ``draw``: "trace" (needs a bundle; a bare cube is drawn uniformly) or "uniform".
    """
    from jizhi.tools.bench import environment

    log = log or (lambda s: None)
    cube_dir, dim, version_dir = locate_cube(bundle or cube)
    if version_dir is None:
        draw = "uniform"
    all_keys, vectors = read_all(cube_dir)
    if dim is None:
        dim = vectors.shape[1]
    log(f"cube {cube_dir}: {all_keys.shape[0]:,} keys, dim {dim}")
    result = {"cube": cube_dir, "bundle": version_dir, "dim": int(dim), "cube_keys": int(all_keys.shape[0]),
              "batch": int(batch), "duration_s": duration_s, "repeats": repeats, "draw": draw,
              "environment": dict(environment(), py_lmdb=lmdb.__version__,
                                  liblmdb=".".join(map(str, lmdb.version()[:3]))),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    weights = None
    if draw == "trace":
        lookups, n_req = trace_lookups(version_dir, trace_path, requests=requests, seed=seed, log=log)
        result["skew"], weights = skew(lookups, all_keys, n_req)
        result["trace"] = trace_path or f"generated: {requests} requests x 500 candidates, seed {seed}"
    batches = key_batches(all_keys, batch, POOL_BATCHES, weights, seed)
    result["batch_keys"] = int(batches[0].shape[0])

    ram = RamTable(all_keys, vectors)
    want = ram.lookup(batches[0])
    rows = []

    def bench(name, label, fn):
        got = fn(batches[0])
        agrees = bool(np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0]))
        log(f"timing {label} ...")
        r = measure(fn, batches, duration_s, repeats, warmup_s=min(1.0, max(0.1, duration_s / 5)))
        rows.append(dict(name=name, label=label, agrees=agrees, **r))

    table = private_table(all_keys, vectors)   # mapped, its segment already unlinked

    def hot_lookup(k):
        out = np.zeros((k.shape[0], dim), dtype=np.float32)
        found = np.zeros(k.shape[0], dtype=bool)
        table.lookup_into(k, out, found)
        return out, found

    out_buf = np.zeros((batch, dim), dtype=np.float32)
    found_buf = np.zeros(batch, dtype=bool)

    def hot_kernel(k):
        out, found = out_buf[:k.shape[0]], found_buf[:k.shape[0]]
        found[:] = False
        table.lookup_into(k, out, found)
        return out, found

    bench("hot", "hot tier (HotTable.lookup_into, output allocated per batch like TieredStore)", hot_lookup)
    bench("hot_kernel", "hot tier, kernel only (output preallocated)", hot_kernel)

    c = Cube(cube_dir, dim)
    if c.btree is not None:
        bench("btree", "LMDB cube, Numba B+tree reader (Cube.lookup)", c.lookup)
    else:
        rows.append({"name": "btree", "label": "LMDB cube, Numba B+tree reader: did not verify, not measured",
                     "keys_per_s": None})
    c.close()
    c = Cube(cube_dir, dim, reader="liblmdb")
    bench("liblmdb", "LMDB cube, liblmdb (Cube reader=liblmdb: one getmulti)", c.lookup)
    c.close()

    d = dict(zip(all_keys.tolist(), vectors))

    def dict_lookup(k):
        out = np.zeros((k.shape[0], dim), dtype=np.float32)
        found = np.zeros(k.shape[0], dtype=bool)
        get = d.get
        for i, key in enumerate(k.tolist()):
            v = get(key)
            if v is not None:
                out[i] = v
                found[i] = True
        return out, found

    bench("dict", "Python dict {signature: vector}, a loop over the keys", dict_lookup)
    bench("gather", "numpy gather in RAM (RamTable: searchsorted + take)", ram.lookup)

    by = {r["name"]: r for r in rows}
    base_dict = by["dict"]["keys_per_s"]
    base_gather = by["gather"]["keys_per_s"]
    for r in rows:
        v = r["keys_per_s"]
        r["x_dict"] = None if v is None else round(v / base_dict, 1)
        r["pct_of_gather"] = None if v is None else round(100 * v / base_gather, 1)
    hot_rate = by["hot"]["keys_per_s"]
    result["rows"] = rows
    result["targets"] = {
        "hot_keys_per_s": {"target": TARGET_HOT_KEYS_S, "measured": round(hot_rate),
                           "met": hot_rate >= TARGET_HOT_KEYS_S},
        "hot_vs_gather": {"target": TARGET_HOT_VS_GATHER, "measured": round(hot_rate / base_gather, 3),
                          "met": hot_rate / base_gather >= TARGET_HOT_VS_GATHER}}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def format_report(r):
    """The result of ``run`` as text lines."""
    lines = [f"cube {r['cube']}: {r['cube_keys']:,} keys, dim {r['dim']}",
             f"batches of {r['batch_keys']:,} sorted unique keys drawn "
             + ("by the trace's skew" if r["draw"] == "trace" else "uniformly")
             + f"; {r['duration_s']:g} s per method in {r['repeats']} slices after a warm-up; "
             "one thread; keys/s per core = keys / the thread's CPU seconds (median slice)"]
    s = r.get("skew")
    if s:
        lines.append(f"trace skew ({r['trace']}): {s['requests']} requests, {s['lookups_per_request']:,} distinct "
                     f"signatures per request, {s['distinct_keys_read']:,} of {s['cube_keys']:,} cube keys read; "
                     f"lookups on the top 0.1% / 1% / 10% of the cube's keys: "
                     f"{100 * s['share_top_0.1pct']:.1f}% / {100 * s['share_top_1pct']:.1f}% / "
                     f"{100 * s['share_top_10pct']:.1f}%; {s['missing_from_cube']:,} lookups miss the cube")
    lines.append(f"{'method':<78} {'keys/s/core':>13} {'wall keys/s':>13} {'x dict':>8} {'% gather':>9} "
                 f"{'other cores':>11}")
    for row in r["rows"]:
        if row["keys_per_s"] is None:
            lines.append(f"{row['label']:<78} {'-':>13}")
            continue
        flag = "" if row["agrees"] else "  (DISAGREES with the gather)"
        lines.append(f"{row['label']:<78} {row['keys_per_s']:>13,.0f} {row['wall_keys_per_s']:>13,.0f} "
                     f"{row['x_dict']:>8.1f} {row['pct_of_gather']:>8.1f}% {row['other_cores']:>11.2f}{flag}")
    t = r["targets"]
    a, b = t["hot_keys_per_s"], t["hot_vs_gather"]
    lines.append(f"target: hot tier >= {a['target'] / 1e6:g}M keys/s per core: {a['measured'] / 1e6:.1f}M "
                 f"({'met' if a['met'] else 'NOT met'}); hot tier >= {100 * b['target']:.0f}% of the numpy gather: "
                 f"{100 * b['measured']:.1f}% ({'met' if b['met'] else 'NOT met'})")
    lines.append(f"load average {' '.join(map(str, r['loadavg_start']))} at the start, "
                 f"{' '.join(map(str, r['loadavg_end']))} at the end")
    return lines
