"""A pushed cube that lost keys is a fault, not "absent" (issue 22, item 4).

On a real Redis Cluster (3 masters, no replica): a master flushed under a reader is detected in the very next
batch by the sentinel keys the push wrote (its keys read as absent are counted degraded, not silently zero),
and so are keys a master evicted under ``maxmemory`` with ``allkeys-lru`` (its evicted-key count grew); keys the
cube never had are still plain absent. jizhid refuses a cluster that may evict unless told
``evictable=accept``.
"""
import json
import re
import signal

import numpy as np
import pytest

from conftest import demo_pipeline_text, wait_until, write_text
from daemon_helpers import Load, jizhictl_ok, popen
from redis_helpers import require_redis, small_cluster
from jizhi.bundle import Bundle
from jizhi.cube.cluster import keyslot, slot_map
from jizhi.cube.push import read_cube
from jizhi.cube.redis import RedisCube
from jizhi.cube.resp import call

require_redis()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with small_cluster(tmp_path_factory, "redis-faults") as c:
        yield c


@pytest.fixture(scope="module")
def cube(demo_bundle):
    return read_cube(Bundle(demo_bundle))


def _query(cube, seed):
    keys = cube[0]
    rng = np.random.default_rng(seed)
    never = rng.integers(1, 2 ** 62, 200, dtype=np.uint64)          # keys the cube never had
    return np.unique(np.concatenate([rng.choice(keys, 3000), never])), never


def _key_on(port):
    """A key whose slot the master on ``port`` serves."""
    owner, nodes = slot_map(call("127.0.0.1", port, ["CLUSTER", "SLOTS"]))
    mine = nodes.index(("127.0.0.1", port))
    return next(k for k in (f"filler{i}".encode() for i in range(100_000)) if owner[keyslot(k)] == mine)


def _reader(cluster, demo_bundle, **opts):
    b = Bundle(demo_bundle)
    q = "&".join(f"{k}={v}" for k, v in dict({"timeout_ms": 500}, **opts).items())
    return RedisCube(f"{cluster.url}/{b.name}/{b.version}?{q}", b.dim)


def test_a_flushed_master_is_detected_in_the_next_batch_by_its_sentinel(cluster, demo_bundle, cube):
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "key", "--quiet")
    r = _reader(cluster, demo_bundle, check_s=3600)                 # (the layout check would also see it, later)
    q, never = _query(cube, 1)
    _, found = r.lookup(q)
    assert found.sum() == q.shape[0] - np.isin(q, never).sum() and r.degraded == 0   # absent is not degraded
    victim = cluster.masters_of(cluster.ports[0])[0]
    call("127.0.0.1", victim, ["FLUSHALL"])
    _, found = r.lookup(q)                                           # the very next batch
    lost = q.shape[0] - np.isin(q, never).sum() - found.sum()
    assert lost > 0 and r.degraded >= lost                         # every key the master lost is counted
    assert r.errors.get("cube lost", 0) >= lost
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "key", "--quiet")
    before = r.degraded
    _, found = r.lookup(q)
    assert found.sum() == q.shape[0] - np.isin(q, never).sum() and r.degraded == before
    r.close()


def test_keys_a_master_evicted_are_counted_degraded_in_the_batch_that_reads_them(cluster, demo_bundle, cube):
    for port in cluster.masters_of(cluster.ports[0]):
        call("127.0.0.1", port, ["FLUSHALL"])          # (an earlier push's keys would be the ones evicted)
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "table", "--quiet")
    victim = next(p for p in cluster.masters_of(cluster.ports[0]))
    call("127.0.0.1", victim, ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
    try:
        r = _reader(cluster, demo_bundle, evictable="accept")
        q, never = _query(cube, 2)
        _, found = r.lookup(q)
        assert r.degraded == 0 and found.sum() == q.shape[0] - np.isin(q, never).sum()
        used = int(next(line.split(":")[1] for line in call("127.0.0.1", victim, ["INFO", "memory"]).decode()
                        .split("\r\n") if line.startswith("used_memory:")))
        call("127.0.0.1", victim, ["CONFIG", "SET", "maxmemory", str(used - 4_000_000)])
        call("127.0.0.1", victim, ["SET", _key_on(victim), "y" * 100])   # (a write makes it evict to the limit)
        info = call("127.0.0.1", victim, ["INFO", "stats"]).decode()
        assert int(next(x.split(":")[1] for x in info.split("\r\n") if x.startswith("evicted_keys:"))) > 0
        q, never = _query(cube, 3)          # (other keys than the first batch's, which LRU just kept)
        _, found = r.lookup(q)
        lost = q.shape[0] - np.isin(q, never).sum() - found.sum()
        assert lost > 0 and r.degraded >= lost and r.errors.get("evicted", 0) >= lost
    finally:
        call("127.0.0.1", victim, ["CONFIG", "SET", "maxmemory", "0"])
        call("127.0.0.1", victim, ["CONFIG", "SET", "maxmemory-policy", "noeviction"])
    r.close()


def test_jizhid_refuses_a_cluster_that_may_evict_the_cube_unless_told_to_accept(cluster, launch, demo_bundle, tmp_path):
    jizhictl_ok("cube", "push", demo_bundle, "--redis", cluster.url, "--strategy", "key", "--quiet")
    port = cluster.masters_of(cluster.ports[0])[1]
    call("127.0.0.1", port, ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
    try:
        text = demo_pipeline_text("evicting", pool=1, options={"cube": [
            f'remote = "{cluster.url}/{{name}}/{{version}}?timeout_ms=200"']})
        server = launch.start(pipelines=(str(write_text(tmp_path / "evicting.toml", text)),), wait_ready=False)
        popen(server)
        assert server.proc.wait(60) == 2
        log = server.log_text()
        assert re.search(rf"jizhid: pipeline evicting: the Redis cube at .* may evict its keys: maxmemory-policy of "
                         rf"127\.0\.0\.1:{port} \(allkeys-lru\) \(set noeviction, or evictable=accept", log), log[-800:]
        assert "Traceback" not in log
    finally:
        call("127.0.0.1", port, ["CONFIG", "SET", "maxmemory-policy", "noeviction"])


@pytest.mark.slow
def test_a_failover_at_the_production_node_timeout_answers_every_request(tmp_path_factory, launch, demo_bundle,
                                                                          demo_trace, tmp_path):
    """cluster-node-timeout 15000 (Redis's default, what teams run): a master frozen (SIGSTOP) under load until
    its replica is promoted (about 15-22 s); every request is answered, its keys read from the replica meanwhile
    (docs/benchmarks.md, issue 22: the figures of docs/run-redis-failover.py)."""
    with small_cluster(tmp_path_factory, "redis-failover", replicas=1, node_timeout_ms=15000) as c:
        jizhictl_ok("cube", "push", demo_bundle, "--redis", c.url, "--strategy", "key", "--quiet")
        text = demo_pipeline_text("failover", pool=1, options={"cube": [
            f'remote = "{c.url}/{{name}}/{{version}}?timeout_ms=50"', "disk_cache_keys = 2000"]})
        server = launch.start(pipelines=(str(write_text(tmp_path / "failover.toml", text)),),
                              config_text="[cube]\nhot_tier_mb = 1\n")
        victim = c.masters_of(c.ports[0])[0]
        other = next(p for p in c.ports if p != victim)
        with Load(server.endpoint, demo_trace, pipeline="failover", clients=2, rate=40, deadline_ms=2000) as load:
            wait_until(lambda: len(load.snapshot()) > 40, 30, interval_s=0.2, what="load before the stop")
            c.kill(victim, signal.SIGSTOP)
            try:
                wait_until(lambda: victim not in c.masters_of(other), 60, interval_s=0.5, what="the promotion")
            finally:
                c.kill(victim, signal.SIGCONT)
            n = len(load.snapshot())
            wait_until(lambda: len(load.snapshot()) > n + 40, 30, interval_s=0.2, what="load after the promotion")
        records = load.snapshot()
        assert load.outcomes(records) == {"ok": len(records)}
        fig = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["failover"]
        print(f"\nfailover at cluster-node-timeout 15000: {len(records)} requests, all answered; "
              f"{fig.get('remote_degraded', 0):,} keys degraded")
        assert server.stop() == 0
