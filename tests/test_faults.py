"""Faults under load: a SIGKILLed stage worker, SIGTERM of the supervisor.

A closed-loop load of several concurrent REQ clients runs against a real
jizhid. Every request must get an answer (success or a retriable error)
within its deadline plus a bound; a client-side timeout is a lost request.
"""
import os
import signal
import time

import pytest

from conftest import assert_topk, wait_until, write_text
from daemon_helpers import Load, assert_answered_in_time, held_request, sleepy_pipeline_text
from jizhi import protocol
from jizhi.errors import RETRIABLE

CLIENTS = 4
DEADLINE_MS = 2000
BOUND_S = 1.0                       # answer at most this long after the deadline
CLIENT_TIMEOUT_S = DEADLINE_MS / 1000 + BOUND_S + 3.0   # longer than any legal answer


def test_a_sigkilled_scorer_worker_loses_no_request_and_its_pool_grows_back(launch, demo_trace, trace_scores):
    server = launch.start(pipelines=["demo"])
    before = server.workers("demo", "scorer")
    assert len(before) == 2
    with Load(server.endpoint, demo_trace, clients=CLIENTS, deadline_ms=DEADLINE_MS,
              timeout_s=CLIENT_TIMEOUT_S) as load:
        wait_until(lambda: load.count_ok() >= 20, 60, what="the load to get going")
        victim, (_, _, wid) = sorted(before.items())[0]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()

        def replaced():
            now = server.workers("demo", "scorer")
            fresh = {pid: key for pid, key in now.items() if pid not in before}
            return victim not in now and len(now) == 2 and fresh
        fresh = wait_until(replaced, 30, what="the supervisor to restart the killed worker")
        assert [key[2] for key in fresh.values()] == [wid]  # the same wid, a new process
        wait_until(lambda: server.info()["pipelines"]["demo"]["groups"]["scorer"]["workers"] == 2, 30,
                   what="the broker to count two scorer workers again")
        t_back = time.monotonic()
        wait_until(lambda: load.count_ok(since=t_back) >= 20, 60, what="answers after the pool grew back")
    outcomes = assert_answered_in_time(load.snapshot(), demo_trace, trace_scores, DEADLINE_MS, BOUND_S)
    assert sum(1 for r in load.records if r["outcome"] == "ok" and r["t_send"] > t_kill) >= 20, outcomes
    assert server.info()["pipelines"]["demo"]["in_flight"] == 0


def test_sigterm_under_load_answers_what_was_sent_exits_0_and_leaves_nothing(launch, demo_trace, trace_scores):
    server = launch.start(pipelines=["demo"])
    with Load(server.endpoint, demo_trace, clients=CLIENTS, deadline_ms=DEADLINE_MS,
              timeout_s=CLIENT_TIMEOUT_S, stop_on_draining=True) as load:
        wait_until(lambda: load.count_ok() >= 20, 60, what="the load to get going")
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        wait_until(lambda: not any(t.is_alive() for t in load.threads), CLIENT_TIMEOUT_S + 5,
                   what="every load client to notice the server is gone")
    sent_before = [r for r in load.records if r["t_send"] < t_term]
    assert_answered_in_time(sent_before, demo_trace, trace_scores, DEADLINE_MS, BOUND_S)
    assert server.segments() == []
    assert server.children() == {}
    assert not (server.run_dir / "backend.ipc").exists()


def test_a_clean_stop_after_a_worker_was_sigkilled_leaves_nothing_in_dev_shm(launch, demo_trace, trace_scores):
    server = launch.start(pipelines=["demo"])
    assert server.segments() != []
    victim = sorted(server.workers("demo", "scorer"))[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in server.workers() and len(server.workers("demo", "scorer")) == 2, 30,
               what="the killed worker to be replaced")
    with server.client() as c:
        user, items, recall = demo_trace[0]
        assert_topk(c.score(user, items, recall, top_k=10, deadline_ms=30_000), items, trace_scores[0], 10)
    assert server.stop() == 0
    assert server.segments() == []
    assert server.children() == {}


def test_a_sigkilled_broker_is_restarted_and_the_workers_register_again(launch, demo_trace, trace_scores):
    server = launch.start(pipelines=["demo"])
    brokers = {pid for pid, argv in server.children().items() if "jizhi.broker" in argv}
    assert len(brokers) == 1
    workers = server.workers()
    os.kill(brokers.pop(), signal.SIGKILL)

    def serving_again():
        try:
            info = server.info()
        except TimeoutError:
            return False
        return info["ready"] and info["pipelines"]["demo"]["groups"]["scorer"]["workers"] == 2
    wait_until(serving_again, 60, what="a new broker with both workers registered")
    assert server.workers() == workers  # the workers survived the broker and re-registered
    with server.client() as c:
        user, items, recall = demo_trace[1]
        assert_topk(c.score(user, items, recall, top_k=10, deadline_ms=30_000), items, trace_scores[1], 10)


SLEEPY = sleepy_pipeline_text(20)


@pytest.mark.slow
def test_a_request_still_held_at_the_drain_bound_is_answered_before_the_server_exits(launch, tmp_path, demo_trace):
    server = launch.start(pipelines=[write_text(tmp_path / "sleepy.toml", SLEEPY)],
                          config_text="[workers]\ndrain_timeout_s = 1.0\n")
    dealer = held_request(server, demo_trace)
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        # The broker is gone: whatever it answered is already here.
        assert dealer.poll(1000), "the held request was dropped without an answer"
        header, _ = protocol.decode_reply(dealer.recv_multipart()[1:])
    finally:
        dealer.close(0)
    assert header["id"] == "held"
    assert header["status"] == "error" and header["code"] in RETRIABLE, header
