"""Several jizhid nodes behind one client (issue 8, item 3): spreading, retry on another node, giving up.

Real daemons on loopback, each its own instance (shared-memory names), port and run directory, the
demo pipeline fused into one worker (pool 1) so that three of them fit on two cores. Two nodes are
shared by the module; the kill test starts a third and kills its whole process group with SIGKILL
(supervisor, broker and workers: a machine gone), then removes the shared-memory segments the dead
supervisor could not (what its next start would reclaim), so teardown's /dev/shm check holds.
"""
import os
import signal
import time

import numpy as np
import pytest

from conftest import SHM, assert_topk, demo_pipeline_text, free_port, wait_until, write_text
from daemon_helpers import jizhictl_ok
from jizhi.client import Client
from jizhi.errors import OVERLOADED, RequestError
from jizhi.tools.loadgen import ClientThreads

DEADLINE_MS = 2000
ATTEMPT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pipeline_path(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("multinode") / "demo.toml", demo_pipeline_text("demo", pool=1, batch=4))


@pytest.fixture(scope="module")
def nodes(launch_module, pipeline_path):
    return [launch_module.start(pipelines=[pipeline_path]) for _ in range(2)]


def answered(server):
    return server.info()["answered"]


def summed(stats, key):
    return sum(e[key] for e in stats["endpoints"].values())


def kill_node(server):
    """SIGKILL the node's whole process group, wait for it, remove the segments it left; returns their names."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: not server.children(), 10, what=f"every process of {server.instance} to be gone")
    left = server.segments()
    for name in left:
        os.unlink(SHM / name)
    return left


class MultiLoad(ClientThreads):
    """``clients`` threads, each its own multi-endpoint Client, sending trace requests back to back.

    Each logical request is one record: ``client``, ``q``, ``t_send``, ``t_done``, ``reply`` (or
    ``error``: the exception a request ended with). ``clients`` keeps each thread's Client for its
    ``stats()`` (read after the threads ended).
    """

    def __init__(self, endpoints, trace, clients=3, **client_args):
        self.endpoints, self.trace, self.client_args = endpoints, trace, client_args
        self.records = []
        super().__init__(clients)

    def connect(self, i):
        return Client(self.endpoints, **self.client_args)

    def send(self, i, client, n):
        q = (i + (n + 1) * len(self.threads)) % len(self.trace)
        user, items, recall = self.trace[q]
        rec = {"client": i, "q": q, "t_send": time.monotonic()}
        try:
            rec["reply"] = client.score(user, items, recall, pipeline="demo", top_k=10, deadline_ms=DEADLINE_MS)
        except (TimeoutError, RequestError) as e:
            rec["error"] = e
        rec["t_done"] = time.monotonic()
        with self.lock:
            self.records.append(rec)

    def snapshot(self):
        with self.lock:
            return list(self.records)

    def count(self, client=None, since=0.0):
        return sum(1 for r in self.snapshot() if (client is None or r["client"] == client) and r["t_send"] >= since)


# ---------------------------------------------------------------------------


def test_one_client_spreads_requests_over_two_nodes_and_scores_as_one_node_does(nodes, demo_trace, trace_scores):
    a, b = nodes
    before = {s.endpoint: answered(s) for s in nodes}
    n = len(demo_trace)
    with Client([a.endpoint, b.endpoint], timeout_s=10.0) as multi, a.client() as direct:
        for q in range(n):
            user, items, recall = demo_trace[q]
            r = multi.score(user, items, recall, pipeline="demo", top_k=10, deadline_ms=30_000)
            assert_topk(r, items, trace_scores[q], 10)
            assert r.attempts == 1
            every = multi.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=30_000)
            one = direct.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=30_000)
            assert every.endpoint != r.endpoint      # round-robin: consecutive requests, the other node
            np.testing.assert_allclose(every.scores, one.scores, rtol=0, atol=1e-5)
        stats = multi.stats()
    assert stats["requests"] == 2 * n and stats["gave_up"] == 0
    assert stats["endpoints"] == {
        e: {"sent": n, "answered": n, "timeouts": 0, "retries": 0, "errors_retried": 0, "down": False}
        for e in (a.endpoint, b.endpoint)}
    # The nodes' own counters: both answered part of the multi-node load.
    assert answered(a) - before[a.endpoint] == 2 * n     # n from the multi client, n from the direct one
    assert answered(b) - before[b.endpoint] == n


def test_a_draining_node_answers_overloaded_and_the_request_is_answered_by_the_other_node(
        nodes, demo_trace, trace_scores):
    a, b = nodes
    user, items, recall = demo_trace[0]
    jizhictl_ok("drain", run_dir=a.run_dir)
    try:
        with a.client() as direct:
            def refused():
                return direct.score(user, items, recall, pipeline="demo", check=False).get("code") == OVERLOADED
            wait_until(refused, 10, what=f"{a.endpoint} to refuse while draining")
        with Client(f"{a.endpoint},{b.endpoint}", timeout_s=10.0) as multi:
            for q in range(6):
                user, items, recall = demo_trace[q]
                r = multi.score(user, items, recall, pipeline="demo", top_k=10, deadline_ms=30_000)
                assert r.endpoint == b.endpoint
                assert_topk(r, items, trace_scores[q], 10)
            stats = multi.stats()
    finally:
        jizhictl_ok("resume", run_dir=a.run_dir)
    sa, sb = stats["endpoints"][a.endpoint], stats["endpoints"][b.endpoint]
    # The first request met the draining node and was retried; the refusal's retry_after_ms (1 s) keeps the
    # node marked down, so the requests after it went to the other node first.
    assert sa["sent"] == sa["errors_retried"] >= 1
    assert sa["answered"] == sa["sent"] and sa["timeouts"] == 0
    assert sb["retries"] == sa["errors_retried"]
    assert sb["answered"] == 6 and stats["gave_up"] == 0


@pytest.mark.slow
def test_a_node_killed_under_load_loses_no_request_and_every_failed_attempt_is_retried_on_the_other(
        nodes, launch, pipeline_path, demo_trace, trace_scores):
    survivor = nodes[0]
    victim = launch.start(pipelines=[pipeline_path])
    endpoints = [survivor.endpoint, victim.endpoint]
    with MultiLoad(endpoints, demo_trace, clients=3, timeout_s=ATTEMPT_TIMEOUT_S, attempts=4,
                   budget_s=10.0) as load:
        wait_until(lambda: all(load.count(i) >= 4 for i in range(3)), 60, what="the load to get going")
        victim_before = answered(victim)
        left = kill_node(victim)
        t_kill = time.monotonic()
        # Every client sends to the dead node at least once (round-robin), times out and retries.
        wait_until(lambda: all(load.count(i, since=t_kill) >= 12 for i in range(3)), 60,
                   what="requests sent after the kill to be answered")
    records = load.snapshot()
    failed = [r for r in records if "error" in r]
    assert not failed, f"{len(failed)} of {len(records)} requests failed, the first: {failed[0]['error']!r}"
    for r in records:
        _, items, _ = demo_trace[r["q"]]
        assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    assert victim_before > 0, "the victim answered nothing before the kill"
    retried = [r for r in records if r["reply"].attempts > 1]
    for i, c in enumerate(load.clients):
        stats = c.stats()
        dead = stats["endpoints"][victim.endpoint]
        assert stats["requests"] == sum(1 for r in records if r["client"] == i)
        assert stats["gave_up"] == 0
        assert dead["timeouts"] >= 1
        # No request gave up, so every timeout and every retried error reply was followed by a retry.
        assert summed(stats, "retries") == summed(stats, "timeouts") + summed(stats, "errors_retried")
        assert summed(stats, "sent") == stats["requests"] + summed(stats, "retries")
        assert all(r["reply"].endpoint == survivor.endpoint for r in records
                   if r["client"] == i and r["t_send"] > t_kill)
    assert len(retried) >= 3
    worst = max(r["t_done"] - r["t_send"] for r in retried)
    print(f"\nkill -9 of {victim.endpoint} under load: {len(records)} requests, none lost, {len(retried)} retried "
          f"(worst {worst:.2f} s), segments removed after the kill: {len(left)}")


def test_with_every_node_down_a_request_raises_timeout_error_naming_each_endpoint_within_its_budget():
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]   # nothing listens there
    with Client(endpoints, timeout_s=0.2, attempts=4) as c:
        with pytest.raises(TimeoutError) as e:
            c.ping()
        stats = c.stats()
    assert f"{endpoints[0]} (2x)" in str(e.value) and f"{endpoints[1]} (2x)" in str(e.value)
    assert stats["gave_up"] == 1
    assert [s["timeouts"] for s in stats["endpoints"].values()] == [2, 2]
    assert [s["down"] for s in stats["endpoints"].values()] == [True, True]

    # A time budget bounds a request however many attempts are allowed.
    with Client(endpoints, timeout_s=0.2, attempts=1000, budget_s=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply in"):
            c.ping()
        took = time.monotonic() - t0
        stats = c.stats()
    assert took < 10, f"a request with a budget of 1 s took {took:.1f} s"   # not a hang; not a timing claim
    assert 2 <= summed(stats, "timeouts") < 1000


def test_one_endpoint_keeps_one_attempt_and_its_timeout_message():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, timeout_s=0.2) as c:
        with pytest.raises(TimeoutError, match=f"^no reply from {endpoint} within 200 ms$"):
            c.ping()
        assert c.stats()["endpoints"][endpoint]["sent"] == 1


def test_route_user_sends_a_user_and_its_feedback_to_one_node_so_the_feedback_changes_its_next_score(
        nodes, demo_trace):
    endpoints = [n.endpoint for n in nodes]
    with Client(endpoints, timeout_s=ATTEMPT_TIMEOUT_S, route="user") as c:
        where = {}
        for q in range(len(demo_trace)):
            user, items, recall = demo_trace[q]
            r = c.score(user, items, recall, pipeline="default", deadline_ms=DEADLINE_MS)
            assert where.setdefault(user, r.endpoint) == r.endpoint       # a user always lands on one node
        assert len(set(where.values())) == 2                               # and users spread over both
        user, items, recall = demo_trace[1]
        before = c.score(user, items, recall, pipeline="default", ret="all", deadline_ms=DEADLINE_MS)
        fb = c.feedback(user, int(items[0]), "click")
        after = c.score(user, items, recall, pipeline="default", ret="all", deadline_ms=DEADLINE_MS)
    assert fb.endpoint == before.endpoint == after.endpoint
    assert not np.allclose(after.scores, before.scores)      # the node that scores the user saw its click
    # another client (same endpoints, other order) routes the user to the same node
    with Client(endpoints[::-1], timeout_s=ATTEMPT_TIMEOUT_S, route="user") as other:
        assert other.score(user, items, recall, pipeline="default", deadline_ms=DEADLINE_MS).endpoint == fb.endpoint
    with pytest.raises(ValueError, match="route"):
        Client(endpoints, route="random")


def test_without_a_timeout_a_dead_node_costs_half_the_deadline_not_five_seconds(nodes, demo_trace):
    """Several endpoints and no timeout_s: an attempt waits half the request's deadline (jizhi/client.py,
    ATTEMPT_FRACTION), so a dead first node costs 100 ms of a 200 ms deadline and the live one answers."""
    dead = f"tcp://127.0.0.1:{free_port()}"                          # nothing listens there
    user, items, _ = demo_trace[0]
    with Client([dead, nodes[0].endpoint]) as c:
        t0 = time.monotonic()
        r = c.score(user, items, pipeline="default", deadline_ms=200)
        took = time.monotonic() - t0
        stats = c.stats()["endpoints"]
    assert r.ok and r.endpoint == nodes[0].endpoint
    assert stats[dead]["timeouts"] >= 1
    assert took < 4.0, f"a dead node cost {took:.1f} s"                # 5 s per attempt before; not a timing claim
