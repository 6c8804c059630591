"""A cube on a real Redis Cluster (3 masters, 1 replica each, on loopback), started by these tests.

Needs Debian's redis-server; .ci/run installs it and sets JIZHI_REQUIRE_REDIS=1,
so there a missing server fails instead of skipping.
"""
import json
import os
import signal
import time

import numpy as np
import pytest

from conftest import assert_topk, demo_pipeline_text, wait_until, write_text
from daemon_helpers import JIZHICTL, Load, jizhictl, jizhictl_ok, log_lines
from jizhi.bundle import Bundle
from jizhi.cube.cluster import CRC_TABLE, crc16, key_slots, keyslot, slot_map
from jizhi.cube.layout import STRATEGIES, bundle_tables, table_of
from jizhi.cube.push import read_cube
from jizhi.cube.redis import RedisCube
from jizhi.cube.resp import call, command_starts, parse_mget
from jizhi.cube.signature import sign
from jizhi.tools.redis_local import LocalCluster, free_port_block, server_binary

if server_binary() is None:
    if os.environ.get("JIZHI_REQUIRE_REDIS"):
        raise RuntimeError("JIZHI_REQUIRE_REDIS is set but redis-server is not installed")
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("redis"), base_port=free_port_block(6), node_timeout_ms=1000)
    c.start(timeout_s=60)
    yield c
    c.stop()
    assert not any(c.pid(p) for p in c.ports)


@pytest.fixture(scope="module")
def cube(demo_bundle):
    return read_cube(Bundle(demo_bundle))      # (other tests of this process may hold its env open)


def expected(cube, q):
    keys, vectors = cube
    pos = np.minimum(np.searchsorted(keys, q), keys.shape[0] - 1)
    found = keys[pos] == q
    out = np.where(found[:, None], vectors[pos], 0.0).astype(np.float32)
    return out, found


def sample(cube, n=3000, absent=50, seed=0):
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([rng.choice(cube[0], n), rng.integers(1, 2 ** 63, absent, dtype=np.uint64)]))


def jizhictl_tool(name, *args):
    import subprocess
    return subprocess.run([str(JIZHICTL.parent / name), *args], capture_output=True, text=True, timeout=60)


# --- pieces, without a cluster -------------------------------------------------


def test_the_table_of_a_signature_is_found_by_inverting_the_hash(demo_bundle):
    tables = bundle_tables(Bundle(demo_bundle))
    names = [t[0] for t in tables]
    assert "u_hist" not in names                  # a history shares i_id's table
    for i, (name, fid, vocab) in enumerate(tables):
        if name == "i_id":
            continue
        got = table_of(sign(fid, np.arange(1, vocab + 1)), tables, 0)
        assert (got == i).all(), name
    # entity ids (any int64) claim no bounded table: they are the rest
    ids = np.random.default_rng(1).integers(10 ** 9, 2 ** 62, 1000)
    assert (table_of(sign(10, ids), tables, 0) == len(tables)).all()


def test_key_slots_agree_with_redis_rules():
    assert keyslot(b"123456789") == 0x31C3 % 16384       # the CRC16 check value
    assert keyslot(b"{user1000}.following") == keyslot(b"user1000")
    assert keyslot(b"{}x") == crc16(b"{}x") % 16384      # an empty tag hashes the whole key
    keyb = np.frombuffer(b"{}jz:a:1:" + bytes(range(8)) + b"{}jz:a:1:" + b"\x7b\x7d" * 4, dtype=np.uint8).reshape(2, -1)
    slots = np.empty(2, dtype=np.int32)
    key_slots(keyb.copy(), CRC_TABLE, slots)
    assert list(slots) == [keyslot(bytes(k)) for k in keyb]


def test_commands_split_at_slot_changes_and_at_the_per_command_limit():
    s = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
    assert list(command_starts(s, 2)) == [0, 2, 3, 5, 7, 9, 10]
    assert list(command_starts(np.full(5, 7), 1024)) == [0, 5]


def test_mget_replies_parse_the_same_in_any_chunking():
    rng = np.random.default_rng(3)
    k, rb = 40, 8
    vals = rng.integers(0, 256, (k, rb), dtype=np.uint8)
    present = rng.random(k) > 0.3
    starts = np.array([0, 1, 5, 5 + 20, 26, 40], dtype=np.int64)
    order = rng.permutation(k).astype(np.int64)
    parts = []
    for g in range(len(starts) - 1):
        if g == 2:
            parts.append(b"-MOVED 1234 127.0.0.1:7001\r\n")
            continue
        parts.append(b"*%d\r\n" % (starts[g + 1] - starts[g]))
        for e in range(starts[g], starts[g + 1]):
            key = order[e]
            parts.append(b"$%d\r\n%s\r\n" % (rb, vals[key].tobytes()) if present[key] else b"$-1\r\n")
    reply = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    for chunk in (1, 7, 64, reply.shape[0]):
        rows, found, status = np.zeros((k, rb), np.uint8), np.zeros(k, bool), np.zeros(k, np.uint8)
        state = np.array([0, 0, -1], np.int64)
        errat = np.full(len(starts) - 1, -1, np.int64)
        for n in range(chunk, reply.shape[0] + chunk, chunk):
            assert parse_mget(reply, min(n, reply.shape[0]), state, starts, order, rows, found, status, errat)
        assert state[1] == len(starts) - 1
        assert [i for i, e in enumerate(errat) if e >= 0] == [2]
        assert reply[errat[2]:errat[2] + 6].tobytes() == b"-MOVED"
        moved = order[starts[2]:starts[3]]
        assert (status[moved] == 2).all()
        rest = np.setdiff1d(np.arange(k), moved)
        assert (status[rest] == 1).all()
        assert (found[rest] == present[rest]).all() and not found[moved].any()
        assert np.array_equal(rows[rest][present[rest]], vals[rest][present[rest]])


# --- against the cluster --------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_reads_back_exactly_the_local_cube(cluster, demo_bundle, cube, strategy):
    b = Bundle(demo_bundle)
    r = jizhictl("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", strategy)
    assert r.returncode == 0, r.stderr
    assert "117,560 keys" in r.stdout or "keys" in r.stdout
    doc = json.loads(jizhictl_ok("cube", "layout", demo_bundle, "--redis", cluster.url, "--json"))
    assert doc["strategy"] == strategy and doc["keys"] == cube[0].shape[0]
    assert sum(t["keys"] for t in doc["tables"]) == cube[0].shape[0]
    text = jizhictl_ok("cube", "layout", demo_bundle, "--redis", cluster.url)
    trips = {"key": "round trips per lookup batch: 3", "table": "at most 3", "model": "at most 1"}[strategy]
    assert trips in text
    backend = RedisCube(f"{cluster.url}/{b.name}/{b.version}", b.dim, timeout_ms=2000)
    q = sample(cube)
    vectors, found = backend.lookup(q)
    want, want_found = expected(cube, q)
    assert np.array_equal(found, want_found) and np.array_equal(vectors, want)
    assert backend.degraded == 0
    # one pipeline per master holding keys of the batch
    assert backend.round_trips == (1 if strategy == "model" else 3)
    backend.close()


def test_the_cluster_tool_reports_each_node_and_background_readers_get_a_long_budget(cluster, demo_bundle, cube):
    r = jizhictl_tool("jizhi-redis-cluster", "status", str(cluster.root))
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 6
    assert sum(" master ok" in ln for ln in lines) == 3 and sum(" slave ok" in ln for ln in lines) == 3
    from jizhi.cube.remote import BACKGROUND_TIMEOUT_MS, open_backend
    b = Bundle(demo_bundle)
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "model")
    url = f"{cluster.url}/{b.name}/{b.version}?timeout_ms=1"
    background = open_backend(url, b.dim, background=True)
    assert background.timeout_s == BACKGROUND_TIMEOUT_MS / 1000
    vectors, found = background.lookup(cube[0])          # every key, in bounded pieces
    assert found.all() and np.array_equal(vectors, cube[1]) and background.degraded == 0
    assert background.round_trips == -(-cube[0].shape[0] // background.piece)      # one master: model
    background.close()


def test_a_cube_not_pushed_is_a_clear_error_and_a_bad_url_too(cluster):
    with pytest.raises(LookupError, match="jizhictl cube push"):
        RedisCube(f"{cluster.url}/nosuch/3", 32)
    with pytest.raises(ValueError, match="NAME/VERSION"):
        RedisCube(cluster.url, 32)
    r = jizhictl("cube", "push", "/nonexistent-bundle", "--redis", cluster.url)
    assert r.returncode == 2


@pytest.mark.slow
def test_a_frozen_shard_costs_one_budget_then_its_keys_degrade_and_recover(cluster, demo_bundle, cube):
    b = Bundle(demo_bundle)
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "key")
    backend = RedisCube(f"{cluster.url}/{b.name}/{b.version}", b.dim, timeout_ms=100, retry_ms=300)
    q = sample(cube, seed=5)
    want, want_found = expected(cube, q)
    master = cluster.masters_of(cluster.ports[0])[0]
    pid = cluster.pid(master)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        v, f = backend.lookup(q)
        took = time.monotonic() - t0
        assert took < 2.0                       # bounded by the budget (100 ms), never a hang
        assert 0 < backend.degraded < q.shape[0]
        ok = f | ~want_found
        assert f.sum() > 0 and np.array_equal(v[f], want[f])            # other shards still answer
        assert not f[~ok].any() and (v[~f] == 0).all()                   # degraded keys read zeros
        t0 = time.monotonic()
        degraded = backend.degraded
        v, f = backend.lookup(q)                 # the frozen master is marked down: no second wait,
        assert time.monotonic() - t0 < took + 0.05
        assert backend.degraded == degraded, backend.errors      # and its replica answers for it (READONLY)
        assert np.array_equal(f, want_found) and np.array_equal(v, want)
        assert backend.errors.get("read from a replica", 0) > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(0.4)
    wait_until(lambda: backend.lookup(q)[1].sum() == want_found.sum(), 20, interval_s=0.2,
               what="the thawed master's keys")
    v, f = backend.lookup(q)
    assert np.array_equal(v, want)
    assert backend.errors
    backend.close()


def remote_pipeline(tmp_path, url, timeout_ms=200):
    return write_text(tmp_path / "redis.toml", demo_pipeline_text(
        "redis", pool=1, batch=8,
        options={"cube": [f'remote = "{url}/{{name}}/{{version}}?timeout_ms={timeout_ms}&retry_ms=200"',
                          "disk_cache_keys = 2000"]}))


@pytest.mark.slow
def test_jizhid_scores_through_the_redis_cube_equal_the_local_cube_and_survive_a_master_kill(
        cluster, launch, demo_bundle, demo_trace, trace_scores, tmp_path, capsys):
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "table")
    server = launch.start(pipelines=(str(remote_pipeline(tmp_path, cluster.url)),),
                          config_text="[cube]\nhot_tier_mb = 1\nhot_rebuild_s = 1.0\n")
    # 1. same scores as the reference (the local cube), every level counted
    with Load(server.endpoint, demo_trace, pipeline="default", clients=2, rate=30, deadline_ms=10_000) as load:
        def remote_read():
            c = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["redis"]
            return c if c.get("remote_keys") and c.get("remote_round_trips") else None
        wait_until(remote_read, 60, interval_s=0.5, what="reads from the Redis cube")
    records = load.snapshot()
    assert load.outcomes(records) == {"ok": len(records)}
    for r in records:
        user, items, _ = demo_trace[r["q"]]
        assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    # 2. kill -9 the master holding i_id (most of the remote reads) under load: requests keep being
    # answered (degraded while the replica takes over), then the scores are exact again
    doc = json.loads(jizhictl_ok("cube", "layout", demo_bundle, "--redis", cluster.url, "--json"))
    unit = doc["units"][next(t["unit"] for t in doc["tables"] if t["name"] == "i_id")]
    owner, nodes = slot_map(call("127.0.0.1", cluster.ports[0], ["CLUSTER", "SLOTS"]))
    victim = nodes[owner[unit["slot"]]][1]
    with Load(server.endpoint, demo_trace, pipeline="default", clients=2, rate=30, deadline_ms=10_000) as load:
        time.sleep(1.0)
        cluster.kill(victim)
        wait_until(lambda: victim not in cluster.masters_of(next(p for p in cluster.ports if p != victim)),
                   30, interval_s=0.2, what="the replica's promotion")
        time.sleep(2.0)
        t_after = time.monotonic()
        time.sleep(2.0)
    records = load.snapshot()
    assert load.outcomes(records) == {"ok": len(records)}          # nothing lost, nothing refused
    stats = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["redis"]
    assert stats["remote_degraded"] > 0
    late = [r for r in records if r["t_send"] > t_after]
    assert late
    for r in late:
        user, items, _ = demo_trace[r["q"]]
        assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    with capsys.disabled():
        print(f"\nredis cube: master {victim} killed; {len(records)} requests answered, "
              f"{stats['remote_degraded']:,} keys degraded during the failover, exact after it")
    assert server.stop() == 0
    cluster.start_node(victim)                 # it rejoins as a replica
    cluster.wait_ok(30)


@pytest.mark.slow
def test_a_stopped_cluster_degrades_the_scores_and_they_recover_when_it_returns(
        cluster, launch, demo_bundle, demo_trace, trace_scores, tmp_path):
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "key")
    server = launch.start(pipelines=(str(remote_pipeline(tmp_path, cluster.url, timeout_ms=100)),),
                          config_text="[cube]\nhot_tier_mb = 1\nhot_rebuild_s = 1.0\n")
    pids = [cluster.pid(p) for p in cluster.ports]
    with server.client(timeout_s=10) as c:
        user, items, _ = demo_trace[0]
        c.score(user, items, pipeline="default", deadline_ms=5000)
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            answered = []
            for q in range(1, 9):
                user, items, _ = demo_trace[q]
                r = c.score(user, items, pipeline="default", deadline_ms=5000)
                answered.append(r.ok)
            assert all(answered)
            assert time.monotonic() - t0 < 8 * 1.5          # each request bounded, no hang
            stats = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["redis"]
            assert stats["remote_degraded"] > 0
        finally:
            for p in pids:
                os.kill(p, signal.SIGCONT)
        cluster.wait_ok(30)

        def exact():
            degraded = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["redis"][
                "remote_degraded"]
            user, items, _ = demo_trace[10]
            r = c.score(user, items, pipeline="default", deadline_ms=5000)
            again = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["redis"][
                "remote_degraded"]
            return r if again == degraded else None
        wait_until(exact, 30, interval_s=0.5, what="lookups without degradation")
        for q in range(11, 16):
            user, items, _ = demo_trace[q]
            assert_topk(c.score(user, items, pipeline="default", deadline_ms=5000), items, trace_scores[q], 10)
    assert server.stop() == 0


@pytest.mark.slow
def test_a_redis_cube_that_fits_the_hot_tier_is_held_whole_and_nothing_is_read_below_it(
        cluster, launch, demo_bundle, demo_trace, trace_scores, tmp_path, cube):
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "table")
    server = launch.start(pipelines=(str(remote_pipeline(tmp_path, cluster.url)),))    # hot tier: 512 MiB
    total = cube[0].shape[0]
    wait_until(lambda: log_lines(server, f"generation 1: {total} of {total} cube keys"), 60,
               what="a hot tier of the whole cube")
    with server.client(timeout_s=10) as c:
        for q in range(6):
            user, items, _ = demo_trace[q]
            assert_topk(c.score(user, items, pipeline="default", deadline_ms=5000), items, trace_scores[q], 10)
    fig = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["redis"]
    # what the hot tier lacks, the cube lacks too (the demo leaves some signatures out on purpose):
    # a tier published whole answers those itself, and nothing is read below it
    assert fig["lookups"] > 0 and fig["hot_ratio"] > 0.99
    assert not fig.get("disk_hits") and not fig.get("remote_keys") and not fig.get("remote_degraded")
    assert log_lines(server, "the whole cube")
    wait_until(lambda: log_lines(server, "idle: the hot tier holds the whole cube"), 10,
               what="the disk cache manager to idle")
    assert server.stop() == 0


@pytest.mark.slow
def test_a_flushed_cluster_degrades_the_lookups_instead_of_reading_absent_keys_and_a_new_push_is_taken_up(
        cluster, demo_bundle, cube):
    b = Bundle(demo_bundle)
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "key")
    backend = RedisCube(f"{cluster.url}/{b.name}/{b.version}?check_s=0.5", b.dim, timeout_ms=2000, retry_ms=100)
    q = sample(cube, seed=11)
    want, want_found = expected(cube, q)
    assert np.array_equal(backend.lookup(q)[0], want)
    for port in cluster.masters_of(cluster.ports[0]):
        call(cluster.host(port), port, ["FLUSHALL"])
    time.sleep(0.6)
    backend.lookup(q)                          # this one notices the layout record is gone
    before = backend.degraded
    v, f = backend.lookup(q)
    assert not f.any() and backend.degraded - before == q.shape[0]       # degraded (counted), not "absent"
    assert backend.errors.get("cube gone") == 1
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "table")
    wait_until(lambda: backend.lookup(q)[1].sum() == want_found.sum(), 10, interval_s=0.2, what="the new push")
    assert np.array_equal(backend.lookup(q)[0], want)
    assert backend.layout.strategy == "table"
    backend.close()


@pytest.mark.slow
def test_keys_of_a_slot_being_migrated_are_read_through_ask_and_the_finished_move_through_moved(
        cluster, demo_bundle, cube):
    # A reshard by hand: the slot of table i_cat1 goes from its master A to master B, half of its keys
    # moved (MIGRATING/IMPORTING: MGETs there answer TRYAGAIN or ASK), then all and the slot assigned.
    b = Bundle(demo_bundle)
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "table")
    doc = json.loads(jizhictl_ok("cube", "layout", demo_bundle, "--redis", cluster.url, "--json"))
    slot = doc["units"][next(t["unit"] for t in doc["tables"] if t["name"] == "i_cat1")]["slot"]
    owner, nodes = slot_map(call(cluster.host(cluster.ports[0]), cluster.ports[0], ["CLUSTER", "SLOTS"]))
    a = nodes[owner[slot]]
    b_ = next(n for n in nodes if n != a)
    ida = call(*a, ["CLUSTER", "MYID"]).decode()
    idb = call(*b_, ["CLUSTER", "MYID"]).decode()
    backend = RedisCube(f"{cluster.url}/{b.name}/{b.version}", b.dim, timeout_ms=2000)
    q = sample(cube, seed=13)
    want, want_found = expected(cube, q)

    def move(keys):
        call(*a, ["MIGRATE", b_[0], b_[1], "", 0, 5000, "KEYS", *keys])

    try:
        call(*b_, ["CLUSTER", "SETSLOT", slot, "IMPORTING", ida])
        call(*a, ["CLUSTER", "SETSLOT", slot, "MIGRATING", idb])
        keys = call(*a, ["CLUSTER", "GETKEYSINSLOT", slot, 100_000])
        assert len(keys) > 1000
        move(keys[: len(keys) // 2])
        v, f = backend.lookup(q)
        assert np.array_equal(f, want_found) and np.array_equal(v, want) and backend.degraded == 0
        assert backend.errors.get("TRYAGAIN", 0) + backend.errors.get("ASK", 0) > 0
        move(keys[len(keys) // 2:])
        v, f = backend.lookup(q)                               # every key of the slot now answers ASK
        assert np.array_equal(v, want) and backend.degraded == 0
    finally:
        for node in nodes:
            call(*node, ["CLUSTER", "SETSLOT", slot, "NODE", idb])
    cluster.wait_ok(30)
    v, f = backend.lookup(q)                                   # the old owner answers MOVED
    assert np.array_equal(v, want) and backend.degraded == 0
    assert backend.cluster.nodes[backend.cluster.owner[slot]] == b_
    backend.close()
