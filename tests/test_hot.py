"""The hot tier: a shared-memory table in front of the LMDB cube, rebuilt from sampled key counts.

Unit tests build real tables in /dev/shm (names ``jizhi.test-hot-<pid>...``,
removed at the end); daemon tests run jizhid with a small hot tier that is
rebuilt every second under load.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import Launcher, assert_topk, wait_until
from daemon_helpers import JIZHICTL, Load, jizhictl_ok, log_lines
from jizhi import shm
from jizhi.cube import hot
from jizhi.cube.build import write_cube
from jizhi.cube.store import Cube


@pytest.fixture
def segs():
    names = []
    yield names
    for n in names:
        shm.unlink(n)


def _cube(tmp_path, count=5000, dim=8, with_zero=True):
    rng = np.random.default_rng(count)
    keys = np.unique(rng.integers(1, 2 ** 64, count, dtype=np.uint64, endpoint=False))
    if with_zero:
        keys = np.concatenate([np.zeros(1, np.uint64), keys])
    vecs = rng.standard_normal((keys.shape[0], dim)).astype(np.float32)
    write_cube(tmp_path / "cube", keys, vecs)
    return Cube(tmp_path / "cube", dim), keys, vecs


def _build(segs, cube_dir, dim, budget, generation=1, keys_path=None):
    seg = f"jizhi.test-hot-{os.getpid()}-{len(segs)}.g{generation}"
    segs.append(seg)
    argv = [sys.executable, "-m", "jizhi.cube.hot", "build", "--segment", seg, "--cube", str(cube_dir),
            "--dim", str(dim), "--generation", str(generation), "--budget-bytes", str(budget)]
    if keys_path:
        argv += ["--keys", str(keys_path)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return seg, json.loads(r.stdout.strip().splitlines()[-1])


def test_a_table_of_the_whole_cube_answers_exactly_what_lmdb_answers(tmp_path, segs):
    cube, keys, vecs = _cube(tmp_path)
    seg, report = _build(segs, tmp_path / "cube", 8, 64 << 20)
    assert report["keys"] == report["cube_keys"] == keys.shape[0]
    table = hot.HotTable(seg)
    rng = np.random.default_rng(1)
    probes = np.unique(np.concatenate([np.zeros(1, np.uint64), keys[rng.integers(0, keys.shape[0], 2000)],
                                       rng.integers(1, 2 ** 64, 500, dtype=np.uint64, endpoint=False)]))
    out = np.zeros((probes.shape[0], 8), np.float32)
    found = np.zeros(probes.shape[0], bool)
    hits = table.lookup_into(probes, out, found)
    want, want_found = cube.lookup(probes)
    assert np.array_equal(found, want_found) and hits == int(want_found.sum())
    assert np.array_equal(out, want)          # signature 0 included; misses stay zero (the default vector)
    assert found[0] and probes[0] == 0


def test_a_budget_holds_the_keys_that_fit_and_the_tiered_store_reads_the_rest_from_lmdb(tmp_path, segs):
    cube, keys, vecs = _cube(tmp_path, count=20_000, with_zero=False)
    budget = 64 << 10
    seg, report = _build(segs, tmp_path / "cube", 8, budget)
    assert 0 < report["keys"] < keys.shape[0] and report["bytes"] <= budget
    ctl = f"jizhi.test-hot-{os.getpid()}-ctl"
    segs.append(ctl)
    shm.create(ctl, hot.CTL_WORDS * 8)
    store = hot.TieredStore(cube, {"control": ctl, "table": seg.rsplit(".g", 1)[0] + ".g{generation}"})
    store.refresh()
    assert store.table is None                  # nothing published yet: LMDB only
    hot.Control(ctl, writable=True).publish(1, report["keys"], report["capacity"])
    store.refresh()
    assert store.generation == 1
    probes = np.unique(keys[::7])
    got, found = store.lookup(probes)
    want, want_found = cube.lookup(probes)
    assert np.array_equal(got, want) and np.array_equal(found, want_found)
    assert 0 < store.hot_hits < probes.shape[0] and store.lookups == probes.shape[0]


class Counting:
    """A store that counts the keys it is asked for (to see that the tier below is not asked)."""

    def __init__(self, store):
        self.store, self.dim, self.asked = store, store.dim, 0

    def lookup(self, keys):
        self.asked += keys.shape[0]
        return self.store.lookup(keys)


@pytest.mark.parametrize("whole", [True, False])
def test_a_tier_published_whole_answers_absent_keys_itself_and_a_partial_one_asks_below(tmp_path, segs, whole):
    from jizhi.cube.pooling import pool_blocks
    cube, keys, vecs = _cube(tmp_path, count=3000, with_zero=False)
    seg, report = _build(segs, tmp_path / "cube", 8, 64 << 20)          # every key fits
    assert report["keys"] == report["cube_keys"] == keys.shape[0]
    ctl = f"jizhi.test-hot-{os.getpid()}-ctlw"
    segs.append(ctl)
    shm.create(ctl, hot.CTL_WORDS * 8)
    below = Counting(cube)
    store = hot.TieredStore(below, {"control": ctl, "table": seg.rsplit(".g", 1)[0] + ".g{generation}"})
    hot.Control(ctl, writable=True).publish(1, report["keys"], report["capacity"], whole=whole)
    store.refresh()
    assert store.whole is whole
    absent = np.random.default_rng(9).integers(1, 2 ** 63, 50, dtype=np.uint64)
    probes = np.unique(np.concatenate([keys[::5], absent]))
    got, found = store.lookup(probes)
    want, want_found = cube.lookup(probes)
    assert np.array_equal(got, want) and np.array_equal(found, want_found)
    sigs = np.concatenate([keys[:40], absent[:24]]).reshape(16, 4, 1)
    lens = np.ones((16, 4), np.int32)
    pooled, missing = pool_blocks(store, [(sigs, lens)], 8, [np.zeros(4, bool)])
    ref, ref_missing = pool_blocks(hot.TieredStore(cube, None), [(sigs, lens)], 8, [np.zeros(4, bool)])
    assert np.array_equal(pooled[0], ref[0]) and np.array_equal(missing[0], ref_missing[0])
    assert (below.asked == 0) is whole


def test_pooling_through_a_partial_hot_tier_equals_pooling_the_deduplicated_lmdb_reads(tmp_path, segs):
    # The tiered store pools by itself (probe per signature, misses deduplicated to LMDB): same
    # pooled vectors and missing counts as the dedup path straight from LMDB, for mean and sum bags.
    from jizhi.cube.pooling import pool_blocks
    cube, keys, vecs = _cube(tmp_path, count=20_000, with_zero=False)
    seg, report = _build(segs, tmp_path / "cube", 8, 64 << 10)     # holds part of the cube
    store = hot.TieredStore(cube, None)
    store.table = hot.HotTable(seg)
    rng = np.random.default_rng(3)
    absent = rng.integers(1, 2 ** 64, 50, dtype=np.uint64, endpoint=False)
    pool = np.concatenate([keys, absent])
    blocks, sums = [], []
    for rows, fields, bag in ((3, 2, 4), (200, 5, 6)):
        lens = rng.integers(0, bag + 1, (rows, fields)).astype(np.int32)
        sigs = pool[rng.integers(0, pool.shape[0], (rows, fields, bag))]
        sigs[np.arange(bag) >= lens[..., None]] = 0              # padding past each bag
        blocks.append((sigs, lens))
        sums.append(rng.random(fields) < 0.5)
    got, got_missing = pool_blocks(store, blocks, 8, sums)
    want, want_missing = pool_blocks(cube, blocks, 8, sums)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_missing, want_missing):
        assert np.array_equal(g, w)
    assert sum(int(m.sum()) for m in got_missing) > 0
    assert 0 < store.hot_hits < store.lookups


def test_the_ceiling_scores_what_the_reference_scores_in_every_mode(demo_bundle, demo_trace, reference):
    # jizhictl bench --ceiling: the fused stages in one process over a private hot table of the whole cube,
    # in each pipeline the model is served in. Same scores in every mode: what makes them comparable.
    from collections import defaultdict
    from jizhi.tools.bench import CeilingScorer
    before = set(os.listdir("/dev/shm"))
    q = np.arange(3)
    offsets = np.concatenate([[0], np.cumsum([len(demo_trace[i][1]) for i in q])]).astype(np.int64)
    items = np.concatenate([demo_trace[i][1] for i in q])
    recall = np.concatenate([demo_trace[i][2] for i in q])
    users = np.array([demo_trace[i][0] for i in q], np.uint64)
    scores = {}
    for mode in ("per_pair", "structured", "items"):
        scorer = CeilingScorer(demo_bundle, mode)
        reader, dnn = scorer.stages[0][1], scorer.stages[3][1]
        assert (reader.per_pair, dnn.per_pair) == ((True, True) if mode == "per_pair" else (False, False))
        assert (dnn.item_table is not None) == (mode == "items")
        assert (scorer.item_table_build_s is not None) == (mode == "items")
        stage_us = defaultdict(float)
        batch = scorer.score(users, offsets, items, recall, 10, stage_us)
        assert sorted(stage_us) == sorted(["reader", "features", "cube", "dnn", "rank"])
        assert all(v >= 0 for v in stage_us.values()) and stage_us["dnn"] > 0
        scores[mode] = np.array(batch["score"])
        for i in q:
            want, _ = reference.score(*demo_trace[i][:2])
            np.testing.assert_allclose(scores[mode][offsets[i]:offsets[i + 1]], want, rtol=1e-5, atol=1e-6)
        assert scorer.stages[2][1].store.hot_hits > 0
    np.testing.assert_allclose(scores["per_pair"], scores["structured"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["items"], scores["structured"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown ceiling mode 'fast': one of per_pair, structured, items"):
        CeilingScorer(demo_bundle, "fast")
    assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("jizhi.private")]


def test_bench_ceiling_measures_each_mode_asked_in_one_run(demo_bundle, tmp_path):
    # One core (one ceiling process per mode) and a fraction of a second per mode: the run, not its figures.
    out = tmp_path / "ceiling.json"
    argv = [str(JIZHICTL), "bench", "--ceiling", "--ceiling-mode", "per_pair,structured,items", "--bundle",
            demo_bundle, "--requests", "20", "--candidates", "50", "--duration", "0.2", "--warmup", "0",
            "--json", str(out), "--quiet"]
    core = min(os.sched_getaffinity(0))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("ceiling")] == [
        "ceiling per_pair", "ceiling structured", "ceiling items"]
    assert sum("mean CPU (thread time) us per request by stage: reader" in line for line in lines) == 3
    result = json.loads(out.read_text())
    assert "ceiling" not in result
    ceilings = result["ceilings"]
    assert [c["mode"] for c in ceilings] == ["per_pair", "structured", "items"]
    for c in ceilings:
        assert c["processes"] == 1 and c["requests"] > 0 and c["stage_clock"] == "thread_time"
        assert list(c["stage_us_per_request"]) == ["reader", "features", "cube", "dnn", "rank"]
        assert (c["item_table_build_s"] is not None) == (c["mode"] == "items")

    r = subprocess.run(argv[:3] + ["--ceiling-mode", "structured,fast"] + argv[5:], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "unknown ceiling mode 'fast': one of per_pair, structured, items" in r.stderr
    assert "Traceback" not in r.stderr


def test_key_counts_keep_the_most_used_keys_first_and_decay(tmp_path):
    counts = hot.KeyCounts(limit=3)
    counts.add(np.array([5, 5, 5, 7, 9, 9], np.uint64))
    counts.add(np.array([9, 11, 5], np.uint64))
    assert list(counts.top(3)) == [5, 9, 7] or list(counts.top(3)) == [5, 9, 11]
    assert counts.top(1)[0] == 5
    counts.decay()
    assert counts.keys.shape[0] == 3 and counts.counts.max() == 2.0
    counts.add(np.array([13] * 10, np.uint64))
    assert counts.top(1)[0] == 13


@pytest.fixture
def launch_hot(tmp_path_factory, demo_models):
    launcher = Launcher(tmp_path_factory, demo_models)
    yield launcher
    launcher.close()


@pytest.mark.slow
def test_a_small_hot_tier_rebuilt_from_sampled_counts_under_load_keeps_scores_identical(
        launch_hot, demo_trace, trace_scores, demo_cube_keys, capsys):
    server = launch_hot.start(config_text="[cube]\nhot_tier_mb = 1\nhot_rebuild_s = 1.0\n")
    with Load(server.endpoint, demo_trace, pipeline="default", clients=2, rate=40, deadline_ms=5000) as load:
        wait_until(lambda: log_lines(server, "hot tier generation 3:"), 60, what="two rebuilds from sampled counts")
        wait_until(lambda: log_lines(server, "hot tier generation 2 removed"), 30, what="a replaced table removed")
    records = load.snapshot()
    assert load.outcomes(records) == {"ok": len(records)}
    for r in records:       # every answer, before, during and after each swap, is the reference's top-10
        user, items, _ = demo_trace[r["q"]]
        assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    stats = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["demo"]
    first = log_lines(server, "hot tier generation 1:")[0]
    assert f"of {demo_cube_keys} cube keys" in first and "(the most used)" in log_lines(server, "hot tier generation 2:")[0]
    with capsys.disabled():
        print(f"\n1 MiB hot tier (rebuilt every 1 s): {stats['hot_hits']:,} of {stats['lookups']:,} lookups hit "
              f"({stats['hot_ratio']:.1%}); {len(records)} requests, scores identical to the reference")
    assert stats["hot_hits"] > 0
    live = [s for s in server.segments() if ".hot.g" in s]
    assert 1 <= len(live) <= 2, live


@pytest.mark.slow
def test_the_default_hot_tier_holds_the_whole_demo_cube_and_a_killed_worker_leaves_nothing_behind(
        launch_hot, demo_trace, trace_scores, demo_cube_keys):
    server = launch_hot.start()
    wait_until(lambda: log_lines(server, f"hot tier generation 1: {demo_cube_keys} of {demo_cube_keys} cube keys"), 60,
               what="the hot tier")
    with server.client() as c:
        for q in range(4):
            user, items, recall = demo_trace[q]
            assert_topk(c.score(user, items, recall, top_k=10, deadline_ms=5000), items, trace_scores[q], 10)
    # Two batches after the publication every worker reads the table.
    stats = wait_until(lambda: (lambda s: s if s["hot_hits"] else None)(
        json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["demo"]), 10,
        what="hot-tier hits")
    with server.client() as c:
        for q in range(4, 8):
            user, items, recall = demo_trace[q]
            c.score(user, items, recall, top_k=10, deadline_ms=5000)
    stats = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["demo"]
    assert stats["hot_ratio"] > 0.5
    with Load(server.endpoint, demo_trace, pipeline="default", clients=2, rate=40, deadline_ms=5000,
              retry=True) as load:
        time.sleep(0.5)
        victim = next(iter(server.workers()))
        os.kill(victim, 9)          # mid-read of the hot tier, most likely
        wait_until(lambda: len(server.workers()) == 2 and victim not in server.workers(), 30,
                   what="a replacement worker")
        time.sleep(0.5)
    assert server.stop() == 0
    assert server.segments() == []   # (the launcher checks /dev/shm again)
    del load
