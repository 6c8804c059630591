"""The broker stepped by hand: no process, no socket, a clock of the test's own.

``Broker`` (jizhi/broker/core.py) takes client messages (``on_client``), backend
messages (``on_backend``) and time (``fire_timers``, ``sweep``); what it says
goes to a sink that records it here. Arenas are arrays of this process. The
behaviour asserted is the broker's as the daemon tests see it: dispatch order,
batching, credit, deadlines, admission limits and a worker's loss.
"""
import logging

import msgpack
import numpy as np
import pytest

from conftest import Clock
from jizhi import config, messages, protocol
from jizhi.arena import arena_shape
from jizhi.broker.core import Broker
from jizhi.errors import BAD_REQUEST, DEADLINE_EXCEEDED, INTERNAL, OVERLOADED, UNKNOWN_PIPELINE
from jizhi.states import VersionState

RUN_ID = "run-1"


class Sink:
    """What the broker said: replies to clients (by client) and messages on the backend (by peer)."""

    def __init__(self):
        self.replies = []           # (client routing id, header, arrays)
        self.sent = []              # (peer routing id, message)
        self.unreachable = set()

    def client(self, envelope, frames):
        header, arrays = protocol.decode_reply(frames)
        self.replies.append((bytes(envelope[0]), header, arrays))

    def backend(self, ident, frames):
        if ident in self.unreachable:
            return False
        self.sent.append((ident, messages.decode(frames)))
        return True

    def events(self, ident):
        return [m for who, m in self.sent if who == ident and isinstance(m, messages.Event)]

    def to(self, ident, cls):
        return [m for who, m in self.sent if who == ident and isinstance(m, cls)]

    def reply(self, client):
        got = [h for who, h, _ in self.replies if who == client]
        assert len(got) == 1, f"{len(got)} replies to {client!r}: {got}"
        return got[0]


class MemArenas:
    """A version's arenas as arrays of this process (``Arenas``' ``cols`` and ``intact``)."""

    def __init__(self, plan, segments, slots, max_candidates):
        self.cols = {c: np.zeros(arena_shape(spec, slots, max_candidates), dtype=spec["dtype"])
                     for c, spec in plan["arenas"].items()}

    def intact(self):
        return True


def make_plan(edges=None, batch=4, batch_wait_ms=0.0, version=1):
    """A compiled plan's shape: one stage per group; ``edges`` {group: [next groups]} (default: one group "a")."""
    edges = edges or {"a": []}
    prev = {g: sorted(p for p, nxt in edges.items() if g in nxt) for g in edges}
    order = []
    while len(order) < len(edges):
        order += [g for g in edges if g not in order and all(p in order for p in prev[g])]
    groups = {g: {"name": g, "stages": [g], "pool": 1, "batch": batch, "batch_wait_ms": batch_wait_ms, "cores": [],
                  "branch": None, "next": sorted(edges[g]), "prev": prev[g], "reads": [], "writes": []}
              for g in edges}
    stages = {g: {"name": g, "processor": "jizhi.workers.noop:Passthrough", "config": {}, "inputs": [], "outputs": {}}
              for g in edges}
    arenas = {"item_ids": {"scope": "candidate", "dtype": "uint64", "shape": []},
              "recall_scores": {"scope": "candidate", "dtype": "float32", "shape": []},
              "order": {"scope": "candidate", "dtype": "int32", "shape": []},
              "out_scores": {"scope": "candidate", "dtype": "float32", "shape": []}}
    return {"name": "p", "model": "m", "version": version, "versions": {"m": version}, "stages": stages,
            "groups": groups, "group_order": order, "sources": [g for g in order if not prev[g]],
            "sink": order[-1], "arenas": arenas}


def make_broker(plan=None, **settings):
    plan = plan or make_plan()
    overrides = {"limits.max_in_flight": 16, "limits.max_candidates": 64}
    overrides.update({k.replace("__", "."): v for k, v in settings.items()})
    run = {"settings": config.load(overrides=overrides), "pipelines": {"p": plan},
           "versions": {"p": {str(plan["version"]): {"plan": plan, "segments": {}, "state": "active"}}},
           "default_pipeline": "p", "run_id": RUN_ID, "frontend": "tcp://127.0.0.1:1", "backend": "ipc://@x"}
    clock, sink = Clock(), Sink()
    return Broker(run, sink, clock=clock, attach=MemArenas), sink, clock


def join(b, ident, group="a", window=1, version=1, wid=0):
    b.on_backend(ident, messages.Ready("p", group, wid, {"m": version}, window, run=RUN_ID, pid=100 + wid).encode())


def score(b, client, user, n=4, deadline_ms=None, pipeline="default", top_k=2):
    frames = protocol.encode_request("score", id=user, pipeline=pipeline, user=user,
                                     item_ids=np.arange(1, n + 1, dtype=np.uint64), top_k=top_k,
                                     deadline_ms=deadline_ms)
    b.on_client([client, b""] + [f if isinstance(f, bytes) else f.tobytes() for f in frames])


def finish(b, ident, ev, errors=None, leave_out=()):
    """The worker's DONE for ``ev``: every request done (top 2 returned) but ``errors`` and ``leave_out``."""
    slots = [s for s in ev.slot if s not in leave_out]
    b.on_backend(ident, messages.Done(ev.eid, slots, errors or {}, {"returned": [2] * len(slots)},
                                      {"a": 120}).encode())


def users(ev):
    return list(ev.user)


# -- dispatch order, batching, credit ------------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [("fifo", [11, 12, 13]), ("critical_path", [12, 13, 11])])
def test_a_queue_goes_out_first_in_first_out_or_least_slack_first_under_critical_path(mode, expected):
    b, sink, clock = make_broker(make_plan(batch=1), broker__dispatch=mode)
    join(b, b"w1")
    score(b, b"c0", 10)
    for user, deadline_ms in ((11, 900), (12, 100), (13, 500)):
        score(b, b"c", user, deadline_ms=deadline_ms)
    order = []
    for _ in range(4):
        ev = sink.events(b"w1")[-1]
        order += users(ev)
        finish(b, b"w1", ev)
    assert order == [10] + expected


def test_an_event_carries_up_to_batch_requests_and_a_partial_batch_waits_while_the_worker_is_busy():
    b, sink, clock = make_broker(make_plan(batch=3))
    join(b, b"w1")
    for user in range(1, 8):
        score(b, b"c", user)
    assert [users(ev) for ev in sink.events(b"w1")] == [[1]]     # an idle worker takes a partial batch
    finish(b, b"w1", sink.events(b"w1")[-1])
    finish(b, b"w1", sink.events(b"w1")[-1])
    assert [users(ev) for ev in sink.events(b"w1")] == [[1], [2, 3, 4], [5, 6, 7]]


def test_batch_wait_ms_holds_a_partial_batch_for_company_until_its_timer_fires():
    b, sink, clock = make_broker(make_plan(batch=3, batch_wait_ms=5.0))
    join(b, b"w1")
    score(b, b"c", 1)
    assert sink.events(b"w1") == []
    clock.advance(0.002)
    score(b, b"c", 2)
    b.fire_timers(clock())
    assert sink.events(b"w1") == []
    clock.advance(0.0031)
    b.fire_timers(clock())
    assert [users(ev) for ev in sink.events(b"w1")] == [[1, 2]]
    finish(b, b"w1", sink.events(b"w1")[-1])
    for user in (3, 4, 5):      # a full batch does not wait
        score(b, b"c", user)
    assert [users(ev) for ev in sink.events(b"w1")][-1] == [3, 4, 5]


def test_no_worker_holds_more_events_than_its_window_and_the_least_loaded_takes_the_next():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1", window=2, wid=1)
    join(b, b"w2", window=1, wid=2)
    for user in range(1, 11):
        score(b, b"c", user)
    assert (len(sink.events(b"w1")), len(sink.events(b"w2"))) == (2, 1)
    assert [w.window - len(w.inflight) for w in (b.roster.workers[b"w1"], b.roster.workers[b"w2"])] == [0, 0]
    finish(b, b"w2", sink.events(b"w2")[0])
    assert (len(sink.events(b"w1")), len(sink.events(b"w2"))) == (2, 2)
    finish(b, b"w1", sink.events(b"w1")[0])
    assert (len(sink.events(b"w1")), len(sink.events(b"w2"))) == (3, 2)
    assert users(sink.events(b"w1")[-1]) == [5]
    assert len(b.roster.workers[b"w1"].inflight) == 2


def test_a_request_moves_to_a_join_only_once_every_branch_before_it_is_done():
    b, sink, clock = make_broker(make_plan({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}, batch=1))
    for i, g in enumerate("abcd"):
        join(b, g.encode(), group=g, wid=i)
    score(b, b"c1", 7)
    finish(b, b"a", sink.events(b"a")[0])
    assert len(sink.events(b"b")) == len(sink.events(b"c")) == 1
    finish(b, b"b", sink.events(b"b")[0])
    assert sink.events(b"d") == []
    finish(b, b"c", sink.events(b"c")[0])
    assert users(sink.events(b"d")[0]) == [7]
    finish(b, b"d", sink.events(b"d")[0])
    reply = sink.reply(b"c1")
    assert reply["status"] == "ok" and reply["id"] == 7
    assert set(reply["timings_us"]) >= {"wait_a", "wait_b", "wait_c", "wait_d", "total"}


# -- deadlines ---------------------------------------------------------------------------------


def test_the_deadline_ms_of_a_request_becomes_its_deadline_s_once_at_admission():
    b, sink, clock = make_broker(make_plan(batch=1), limits__default_deadline_ms=1000.0)
    join(b, b"w1", window=2)
    t0 = clock()
    score(b, b"c", 1, deadline_ms=250)
    score(b, b"c", 2)
    assert [ev.deadline_s for ev in sink.events(b"w1")] == [[t0 + 0.25], [t0 + 1.0]]


def test_a_queued_request_whose_deadline_passed_is_answered_deadline_exceeded_not_dropped():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1")
    score(b, b"c0", 1)
    score(b, b"c1", 2, deadline_ms=50)
    clock.advance(0.051)
    b.sweep(clock())
    assert sink.reply(b"c1")["code"] == DEADLINE_EXCEEDED
    assert sink.reply(b"c1")["message"] == "deadline passed"
    finish(b, b"w1", sink.events(b"w1")[0])
    assert len(sink.events(b"w1")) == 1            # never computed
    assert b.pipes["p"].in_flight() == 0


def test_a_request_found_expired_at_dispatch_is_answered_with_the_group_it_waited_for():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1")
    score(b, b"c0", 1)
    score(b, b"c1", 2, deadline_ms=50)
    score(b, b"c2", 3)
    clock.advance(0.051)
    finish(b, b"w1", sink.events(b"w1")[0])      # dispatch runs before any sweep
    assert sink.reply(b"c1")["code"] == DEADLINE_EXCEEDED
    assert sink.reply(b"c1")["message"] == "deadline passed while queued for a"
    assert users(sink.events(b"w1")[-1]) == [3]


def test_a_request_expired_in_a_worker_keeps_its_slot_until_the_worker_answers():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1")
    score(b, b"c1", 1, deadline_ms=50)
    clock.advance(0.051)
    b.sweep(clock())
    assert sink.reply(b"c1")["code"] == DEADLINE_EXCEEDED
    assert b.pipes["p"].in_flight() == 1           # a late worker must not write into a reused slot
    ev = sink.events(b"w1")[0]
    finish(b, b"w1", ev, errors={ev.slot[0]: [DEADLINE_EXCEEDED, "deadline passed before the stage ran"]})
    assert b.pipes["p"].in_flight() == 0
    assert len(sink.replies) == 1


# -- admission limits --------------------------------------------------------------------------


def test_with_every_slot_taken_and_no_line_a_request_is_refused_overloaded_with_a_ticket_each_later_than_the_last():
    b, sink, clock = make_broker(limits__max_in_flight=2, limits__max_waiting=0)
    join(b, b"w1")
    score(b, b"c1", 1)
    score(b, b"c2", 2)
    score(b, b"c3", 3)
    score(b, b"c4", 4)
    r3, r4 = sink.reply(b"c3"), sink.reply(b"c4")
    assert (r3["code"], r4["code"]) == (OVERLOADED, OVERLOADED)
    # No slot freed yet: 100 per second assumed, a ticket 10 ms after the last one.
    assert (r3["retry_after_ms"], r4["retry_after_ms"]) == (10, 20)
    assert r3["message"] == ("2 requests in flight on pipeline p (2 slots) and 0 waiting for one (limits.max_waiting), "
                             "0 clients told to retry before this one")
    assert r4["message"] == ("2 requests in flight on pipeline p (2 slots) and 0 waiting for one (limits.max_waiting), "
                             "1 clients told to retry before this one")


def test_with_every_slot_taken_requests_wait_in_arrival_order_and_past_the_line_get_a_ticket_behind_it():
    b, sink, clock = make_broker(make_plan(batch=1), limits__max_in_flight=1, limits__max_waiting=2)
    join(b, b"w1")
    for c, u in ((b"c1", 1), (b"c2", 2), (b"c3", 3), (b"c4", 4)):
        score(b, c, u, deadline_ms=1000)
        clock.advance(0.01)
    # c1 holds the slot, c2 and c3 wait, c4 is refused with a turn after the two waiting ones (100/s assumed).
    r4 = sink.reply(b"c4")
    assert (r4["code"], r4["retry_after_ms"]) == (OVERLOADED, 30)
    assert r4["message"].startswith("1 requests in flight on pipeline p (1 slots) and 2 waiting for one")
    assert [h for who, h, _ in sink.replies if who != b"c4"] == []
    fig = b.info()["pipelines"]["p"]
    assert (fig["in_flight"], fig["waiting"], fig["waited"], fig["refused"]) == (1, 2, 2, 1)
    for expect in ([1], [2], [3]):
        ev = sink.events(b"w1")[-1]
        assert users(ev) == expect
        clock.advance(0.005)
        finish(b, b"w1", ev)
    assert [sink.reply(c)["status"] for c in (b"c1", b"c2", b"c3")] == ["ok"] * 3
    assert b.pipes["p"].requests.ok == 3
    assert b.info()["pipelines"]["p"]["waiting"] == 0


def test_a_client_refused_past_the_line_that_comes_back_on_its_turn_goes_to_the_head_of_the_line():
    b, sink, clock = make_broker(make_plan(batch=1), limits__max_in_flight=1, limits__max_waiting=1)
    join(b, b"w1")
    score(b, b"c1", 1)
    score(b, b"c2", 2)
    score(b, b"back", 3)
    r = sink.reply(b"back")
    assert (r["code"], r["retry_after_ms"]) == (OVERLOADED, 20)
    clock.advance(0.02)
    score(b, b"back", 4)            # its turn: ahead of c2, although the line was full
    score(b, b"new", 5)             # no turn: refused
    assert sink.reply(b"new")["code"] == OVERLOADED
    finish(b, b"w1", sink.events(b"w1")[-1])
    assert users(sink.events(b"w1")[-1]) == [4]
    finish(b, b"w1", sink.events(b"w1")[-1])
    assert users(sink.events(b"w1")[-1]) == [2]


def test_a_waiting_request_whose_deadline_passes_is_answered_deadline_exceeded_and_never_admitted():
    b, sink, clock = make_broker(make_plan(batch=1), limits__max_in_flight=1)
    join(b, b"w1")
    score(b, b"c1", 1, deadline_ms=1000)
    score(b, b"c2", 2, deadline_ms=20)
    score(b, b"c3", 3, deadline_ms=1000)
    clock.advance(0.03)
    b.sweep(clock())
    r2 = sink.reply(b"c2")
    assert (r2["code"], r2["message"]) == (DEADLINE_EXCEEDED, "deadline passed while waiting for a request slot "
                                                              "of pipeline p")
    finish(b, b"w1", sink.events(b"w1")[-1])
    assert users(sink.events(b"w1")[-1]) == [3]
    assert len(sink.events(b"w1")) == 2


def test_a_request_that_waited_keeps_its_deadline_from_its_arrival_and_its_wait_counts_in_its_latency():
    b, sink, clock = make_broker(make_plan(batch=1), limits__max_in_flight=1)
    join(b, b"w1")
    score(b, b"c1", 1, deadline_ms=1000)
    clock.advance(0.2)
    score(b, b"c2", 2, deadline_ms=1000)
    clock.advance(0.3)
    finish(b, b"w1", sink.events(b"w1")[-1])
    ev = sink.events(b"w1")[-1]
    assert users(ev) == [2]
    assert ev.deadline_s[0] == pytest.approx(clock() - 0.3 + 1.0)     # 1 s from its arrival, not from now
    clock.advance(0.1)
    finish(b, b"w1", ev)
    assert sink.reply(b"c2")["status"] == "ok"
    assert b.pipes["p"].requests.lat_us[1] == pytest.approx(400_000, abs=1000)


def test_waiting_requests_are_admitted_while_draining_and_answered_overloaded_when_the_broker_stops():
    b, sink, clock = make_broker(make_plan(batch=1), limits__max_in_flight=1)
    join(b, b"w1")
    score(b, b"c1", 1)
    score(b, b"c2", 2)
    score(b, b"c3", 3)
    b.on_backend(b"supervisor", messages.Drain().encode())
    score(b, b"late", 4)
    assert sink.reply(b"late")["message"] == "server is draining (jizhictl drain or shutdown)"
    finish(b, b"w1", sink.events(b"w1")[-1])
    assert users(sink.events(b"w1")[-1]) == [2]
    b.sweep(clock())
    assert sink.to(b"supervisor", messages.Drained) == []     # c3 still waits
    b.refuse_held()
    r2, r3 = sink.reply(b"c2"), sink.reply(b"c3")
    assert (r2["code"], r3["code"]) == (OVERLOADED, OVERLOADED)
    assert r3["message"] == "server stopping; retry on another node or later"
    assert b.admission.waiting == 0


def test_a_freed_slot_is_held_for_the_client_told_to_come_back_not_for_a_newcomer():
    b, sink, clock = make_broker(make_plan(batch=1), limits__max_in_flight=1, limits__max_waiting=0)
    join(b, b"w1")
    score(b, b"c1", 1)
    score(b, b"back", 2)
    assert sink.reply(b"back")["code"] == OVERLOADED
    finish(b, b"w1", sink.events(b"w1")[0])
    assert sink.reply(b"c1")["status"] == "ok"
    score(b, b"new", 3)
    assert sink.reply(b"new")["code"] == OVERLOADED
    clock.advance(0.005)
    score(b, b"back", 4)
    assert users(sink.events(b"w1")[-1]) == [4]


def test_while_draining_a_request_is_refused_and_drained_is_said_once_nothing_is_in_flight():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1")
    score(b, b"c1", 1)
    b.on_backend(b"supervisor", messages.Drain().encode())
    score(b, b"c2", 2)
    r = sink.reply(b"c2")
    assert (r["code"], r["retry_after_ms"], r["message"]) == (
        OVERLOADED, 1000, "server is draining (jizhictl drain or shutdown)")
    b.sweep(clock())
    assert sink.to(b"supervisor", messages.Drained) == []
    finish(b, b"w1", sink.events(b"w1")[0])
    b.sweep(clock())
    b.sweep(clock())
    assert len(sink.to(b"supervisor", messages.Drained)) == 1
    b.on_backend(b"supervisor", messages.Resume().encode())
    score(b, b"c3", 3)
    assert users(sink.events(b"w1")[-1]) == [3]


def test_a_malformed_request_is_answered_bad_request_and_an_unknown_pipeline_unknown_pipeline():
    b, sink, clock = make_broker()
    b.on_client([b"c1", b"", msgpack.packb({"v": 1, "op": "score", "id": 5, "user": -1})])
    r = sink.reply(b"c1")
    assert (r["code"], r["id"]) == (BAD_REQUEST, 5)
    assert b.admission.malformed == 1
    score(b, b"c2", 1, pipeline="nope")
    assert sink.reply(b"c2")["code"] == UNKNOWN_PIPELINE
    assert b.answers.errors == {BAD_REQUEST: 1, UNKNOWN_PIPELINE: 1}


# -- workers lost ------------------------------------------------------------------------------


def test_the_events_of_a_dead_worker_go_back_to_the_front_of_their_channel(caplog):
    b, sink, clock = make_broker(make_plan(batch=2))
    join(b, b"w1", wid=1)
    for user in (1, 2, 3, 4):
        score(b, b"c", user)
    assert [users(ev) for ev in sink.events(b"w1")] == [[1]]
    with caplog.at_level(logging.WARNING, logger="jizhi.broker"):
        b.on_backend(b"supervisor", messages.WorkerDead("p", "a", 1, 101).encode())
    assert "worker left: pipeline=p group=a wid=1 pid=101 (exited); 1 requests requeued" in caplog.text
    join(b, b"w2", wid=2)
    assert [users(ev) for ev in sink.events(b"w2")] == [[1, 2]]


def test_a_request_held_at_three_worker_deaths_is_answered_internal():
    b, sink, clock = make_broker(make_plan(batch=1))
    for i in range(3):
        ident = f"w{i}".encode()
        join(b, ident, wid=i)
        if i == 0:
            score(b, b"c1", 1)
        assert users(sink.events(ident)[0]) == [1]
        b.on_backend(b"supervisor", messages.WorkerDead("p", "a", i, 100 + i).encode())
    r = sink.reply(b"c1")
    assert (r["code"], r["message"]) == (INTERNAL, "3 workers died while holding this request")
    assert b.pipes["p"].in_flight() == 0


def test_a_worker_that_cannot_be_reached_is_dropped_and_its_event_goes_to_another():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1", wid=1)
    join(b, b"w2", wid=2)
    sink.unreachable.add(b"w1")
    score(b, b"c", 1)
    assert b"w1" not in b.roster.workers
    assert users(sink.events(b"w2")[0]) == [1]


def test_a_silent_worker_is_dropped_after_the_heartbeat_expiry_or_after_30_s_when_it_holds_events():
    b, sink, clock = make_broker(make_plan(batch=1), workers__heartbeat_interval_s=1.0)
    join(b, b"w1", wid=1)
    join(b, b"w2", wid=2)
    score(b, b"c", 1)
    assert users(sink.events(b"w1")[0]) == [1]    # the first of the least loaded
    clock.advance(3.1)
    b.sweep(clock())
    assert set(b.roster.workers) == {b"w1"}
    clock.advance(26.8)
    b.sweep(clock())
    assert set(b.roster.workers) == {b"w1"}
    assert sink.reply(b"c")["code"] == DEADLINE_EXCEEDED and b.pipes["p"].in_flight() == 1
    clock.advance(0.2)
    b.sweep(clock())
    assert b.roster.workers == {}
    assert b.pipes["p"].in_flight() == 0          # the slot it held is free


def test_a_done_from_a_worker_the_broker_does_not_know_asks_it_to_register_again():
    b, sink, clock = make_broker()
    b.on_backend(b"stranger", messages.Done(3, [0]).encode())
    b.on_backend(b"stranger2", messages.Heartbeat(4).encode())
    assert len(sink.to(b"stranger", messages.Resync)) == len(sink.to(b"stranger2", messages.Resync)) == 1


def test_a_worker_of_another_run_is_told_to_stop():
    b, sink, clock = make_broker()
    b.on_backend(b"w9", messages.Ready("p", "a", 9, {"m": 1}, 1, run="another").encode())
    assert len(sink.to(b"w9", messages.Stop)) == 1 and b.roster.workers == {}


def test_a_retired_worker_gets_nothing_new_and_stop_once_it_holds_nothing():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1", wid=1)
    score(b, b"c1", 1)
    b.on_backend(b"supervisor", messages.Retire("p", "a", 1, 101).encode())
    score(b, b"c2", 2)
    assert len(sink.events(b"w1")) == 1 and sink.to(b"w1", messages.Stop) == []
    finish(b, b"w1", sink.events(b"w1")[0])
    assert len(sink.to(b"w1", messages.Stop)) == 1
    assert sink.reply(b"c1")["status"] == "ok"


def test_a_done_that_fails_one_request_or_forgets_one_answers_each_alone():
    b, sink, clock = make_broker(make_plan(batch=3))
    join(b, b"w1")
    for user in (1, 2, 3):
        score(b, f"c{user}".encode(), user)
    b.on_backend(b"w1", messages.Done(99, []).encode())     # an unknown event: ignored
    finish(b, b"w1", sink.events(b"w1")[0])
    ev = sink.events(b"w1")[1]
    assert users(ev) == [2, 3]
    finish(b, b"w1", ev, errors={ev.slot[0]: ["BAD_REQUEST", "bad user"]}, leave_out=(ev.slot[1],))
    assert (sink.reply(b"c2")["code"], sink.reply(b"c2")["message"]) == (BAD_REQUEST, "bad user")
    assert (sink.reply(b"c3")["code"], sink.reply(b"c3")["message"]) == (INTERNAL, "worker of a returned no result")
    assert b.pipes["p"].in_flight() == 0


# -- versions ----------------------------------------------------------------------------------


def test_a_version_active_in_the_plan_file_serves_and_info_says_active():
    b, sink, clock = make_broker()
    gen = b.pipes["p"].serving()
    assert gen.state is VersionState.SERVING
    b.on_backend(b"supervisor", messages.Info().encode())
    info = sink.to(b"supervisor", messages.Info)[0].info
    assert info["pipelines"]["p"]["versions"]["1"]["state"] == "active"


def test_an_activated_version_takes_new_requests_and_the_old_says_vidle_after_its_last_answer():
    b, sink, clock = make_broker(make_plan(batch=1))
    join(b, b"w1", version=1)
    score(b, b"c1", 1)
    plan2 = make_plan(batch=1, version=2)
    b.on_backend(b"supervisor", messages.VersionAdd("p", 2, plan2, {}, None, {"a": 1}).encode())
    join(b, b"w2", version=2, wid=2)          # its pool joined: a warm-up with nothing to replay
    warm = sink.to(b"supervisor", messages.Warm)
    assert len(warm) == 1 and warm[0].ok and warm[0].requests == 0
    b.on_backend(b"supervisor", messages.Activate("p", 2).encode())
    assert [g.state for g in b.pipes["p"].gens.values()] == [VersionState.DRAINING, VersionState.SERVING]
    score(b, b"c2", 2)
    assert users(sink.events(b"w2")[0]) == [2]
    assert sink.to(b"supervisor", messages.VersionIdle) == []
    finish(b, b"w1", sink.events(b"w1")[0])
    idle = sink.to(b"supervisor", messages.VersionIdle)
    assert [(m.pipeline, m.version) for m in idle] == [("p", 1)]


# -- the messages ------------------------------------------------------------------------------


def _fields_then_type(t, **fields):
    """The bytes the supervisor built by hand before jizhi/messages.py: its fields, then ``"t"``."""
    return [protocol.packb({**fields, "t": t})]


def test_the_messages_the_supervisor_sends_and_reads_keep_todays_bytes():
    enc = _fields_then_type
    pk = protocol.packb
    same = [
        (messages.WorkerDead("p", "g", 1, 42), enc(protocol.T_WORKER_DEAD, pipeline="p", group="g", wid=1, pid=42)),
        (messages.Retire("p", "g", 1, 42), enc(protocol.T_RETIRE, pipeline="p", group="g", wid=1, pid=42)),
        (messages.Drain(), enc(protocol.T_DRAIN)),
        (messages.Drain(reply=False), enc(protocol.T_DRAIN, reply=False)),
        (messages.Info(), enc(protocol.T_INFO)),
        (messages.Load(), enc(protocol.T_LOAD)),
        (messages.Activate("p", 3), enc(protocol.T_ACTIVATE, pipeline="p", version=3)),
        (messages.VersionFail("p", 3, "gone"), enc(protocol.T_VERSION_FAIL, pipeline="p", version=3, reason="gone")),
        (messages.VersionDrop("p", 3), enc(protocol.T_VERSION_DROP, pipeline="p", version=3)),
        (messages.VersionAdd("p", 3, {"x": 1}, {"c": "s"}, None, {"g": 2}),
         [pk({"t": "vadd", "pipeline": "p", "version": 3, "plan": {"x": 1}, "segments": {"c": "s"}, "warmup": None,
              "pool": {"g": 2}})]),
        (messages.Routes("p", {"g": {}}), [pk({"t": "routes", "pipeline": "p", "routes": {"g": {}}})]),
        (messages.Shed("p", "on", 0.5, "rule"),
         [pk({"t": "shed", "pipeline": "p", "mode": "on", "quota": 0.5, "policy": "rule"})]),
        (messages.Record(op="fetch"), [pk({"t": "record", "op": "fetch"})]),
        (messages.Warm("p", 3, True, None, 8, 12.5, {"load_ms": 3}),
         [pk({"t": "warm", "pipeline": "p", "version": 3, "ok": True, "error": None, "requests": 8, "took_ms": 12.5,
              "boot": {"load_ms": 3}})]),
        (messages.VersionIdle("p", 3), [pk({"t": "vidle", "pipeline": "p", "version": 3})]),
        (messages.Invalid("p", 3, 20, 10_000, 4.5),
         [pk({"t": "invalid", "pipeline": "p", "version": 3, "invalid": 20, "candidates": 10_000, "serving_s": 4.5})]),
        (messages.Info({"ready": True}), [pk({"t": "info", "info": {"ready": True}})]),
        (messages.Load({"p": {}}), [pk({"t": "load", "load": {"p": {}}})]),
        (messages.Record(records=[], dropped=0, recording=True),
         [pk({"t": "record", "records": [], "dropped": 0, "recording": True})]),
        (messages.Drained(), [pk({"t": "drained"})]),
    ]
    for msg, today in same:
        assert msg.encode() == today, type(msg).__name__
        assert messages.decode(today) == msg, type(msg).__name__
    # Its resume carries a reply flag that means nothing: read all the same.
    assert messages.decode(enc(protocol.T_RESUME, reply=False)) == messages.Resume()


def test_every_internal_message_type_has_a_class_that_decodes_what_it_encodes():
    types = {getattr(protocol, n) for n in dir(protocol) if n.startswith("T_")}
    assert set(messages.TYPES) == types
    ev = messages.Event(1, {"m": 1}, [0, 5], [10, 20], [1.5, 2.5], [2 ** 64 - 1, 3], [10, 5], [False, True])
    assert messages.decode(ev.encode()) == ev
    done = messages.Done(1, [0, 5], {5: ["INTERNAL", "x"]}, {"returned": [10, 0]}, {"s": 3})
    assert messages.Done.decode(done.encode()) == done
    for bad in ([b"\xc1"], [protocol.packb([1])], [protocol.packb({"t": "nope"})], [protocol.packb({"t": "ready"})],
                [protocol.packb({"t": "done", "eid": 1, "slot": [1], "counts": {"n": [1, 2]}})],
                [protocol.packb({"t": "done", "eid": 1, "slot": [1], "errors": {1: "INTERNAL"}})]):
        with pytest.raises(ValueError):
            messages.decode(bad)


# -- shedding at admission (jizhi/shedding.py, issue 23) ----------------------------------------------

def shed_plan():
    plan = make_plan(batch=1)
    plan["stages"]["a"]["processor"] = "shedder"
    return plan


def test_each_request_carries_its_quota_in_the_event_off_manual_and_auto():
    from jizhi.shedding import COLD_EVENTS
    b, sink, clock = make_broker(shed_plan(), limits__max_candidates=512, limits__max_in_flight=64)
    join(b, b"w0")
    b.on_backend(b"supervisor", messages.Shed("p", "off", 1.0, "rule").encode())
    score(b, b"c0", 1, n=500)
    assert sink.events(b"w0")[-1].keep is None          # off: nothing on the wire, the worker keeps all
    b.on_backend(b"supervisor", messages.Shed("p", "manual", 0.4, "rule").encode())
    finish(b, b"w0", sink.events(b"w0")[-1])
    score(b, b"c1", 2, n=500)
    assert sink.events(b"w0")[-1].keep == [0.4]

    # auto: nothing is cut before the cost model has seen warm events; a warming worker's are not counted
    b.on_backend(b"supervisor", messages.Shed("p", "auto", 1.0, "rule", reset=True).encode())
    cut = b.pipes["p"].cut

    def served(svc_s, shed=0):
        ev = sink.events(b"w0")[-1]
        clock.advance(svc_s)
        b.on_backend(b"w0", messages.Done(ev.eid, list(ev.slot), {}, {"shed": [shed] * len(ev.slot)},
                                          {"a": 100}).encode())
    served(0.002)
    clock.advance(3.0)          # past COLD_S: only the event count keeps the worker cold now
    for i in range(COLD_EVENTS - 2):
        score(b, b"c2", 10 + i, n=500)
        assert sink.events(b"w0")[-1].keep == [1.0]
        served(0.5)             # a stall while warming: would read as 1 ms per candidate
    assert cut.events == 0 and cut.b is None
    for i in range(cut.CALIBRATE_EVENTS + 4):
        score(b, b"c3", 100 + i, n=500)
        served(0.002)           # warm: 4 us per candidate
    assert cut.b is not None and cut.b * 500 < 0.003
    # 40 requests in 40 ms into one worker that takes 2 ms each: more than the 40 ms target (shed.high x
    # shed.slo_ms) would queue, so the later ones are cut, and none is refused.
    clock.advance(1.0)
    before = len(sink.events(b"w0"))
    for i in range(40):
        clock.advance(0.001)
        score(b, bytes([100 + i]), 1000 + i, n=500, deadline_ms=1000)
    assert not [h for _, h, _ in sink.replies if h.get("code") == OVERLOADED]
    queued = list(b.pipes["p"].channels[("a", b.pipes["p"].active)])
    keeps = [r.keep for r in queued]
    assert keeps[0] == 1.0 and keeps[-1] < 0.5 and keeps == sorted(keeps, reverse=True)
    assert cut.backlog() < 0.045 and cut.kept_recent(clock()) < 1.0
