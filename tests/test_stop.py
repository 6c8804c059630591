"""The last requests before a stop get a reply; a broker's death costs a budgeted client nothing (issue 16, item 7).

* SIGKILL of the broker under a closed-loop load of Python clients with a
  time budget: the broker loses what it held (README, "Stopping"), the
  supervisor starts a new one, and every client's request that got no reply
  is sent again and answered with the reference scores.
* SIGTERM of jizhid under 400 requests/s from an open-loop sender (a DEALER
  sending on its clock, whatever the replies): every request sent before the
  broker logged that it closes its frontend gets a reply, and the ones the
  stop refused say OVERLOADED with ``retry_after_ms``.

Both run against one jizhid, in this order (the second stops it).
"""
import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq

from conftest import assert_topk, wait_until
from daemon_helpers import broker_pid, log_lines, log_time
from jizhi.client import Client
from jizhi.errors import OVERLOADED
from jizhi.tools import loadgen

RATE = 400
HORIZON_S = 300.0     # the open-loop sender's arrivals: far longer than the test runs


@pytest.fixture(scope="module")
def server(launch_module):
    return launch_module.start(pipelines=["demo"])


class OpenLoop:
    """One DEALER sending a trace request every 1/``rate`` s on its own clock, reading replies as they come:
    jizhi.tools.loadgen's generator, in a thread of its own.

    ``sent``: {id: time.time() of the send}; ``replies``: {id: reply header}; ``disconnected``: time.time()
    when the DEALER saw its connection end (None: it did not)."""

    def __init__(self, endpoint, trace, rate):
        requests = loadgen.Requests(trace.users, trace.offsets, trace.items, trace.recall_scores)
        due = loadgen.interval_times(rate, HORIZON_S)
        self.replies = {}
        self.disconnected = None
        self.sock = loadgen.load_socket(endpoint)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.load = loadgen.OpenLoop(self.sock, requests, pipeline="demo", due=due,
                                     rows=np.arange(due.shape[0]) % len(requests), deadline_ms=5000,
                                     encode_ahead=loadgen.ENCODE_AHEAD, on_reply=self.keep)
        self.load.watch(self.monitor, self.saw_disconnect)
        self.wall = time.time() - time.monotonic()     # monotonic -> time.time(), to compare with log lines
        self.final = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.load.stop()
        try:   # replies still on their way: until every request is answered or the connection ended
            wait_until(lambda: self.disconnected is not None or len(self.replies) >= len(self.sent), 2.0,
                       what="the last replies")
        except AssertionError:
            pass    # requests a stopped server never answers: the test counts them
        self.load.halt()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.final = self.sent

    @property
    def sent(self):
        if self.final is not None:
            return self.final
        sent_at = self.load.sent_at
        return {int(i): float(sent_at[i]) + self.wall for i in np.flatnonzero(np.isfinite(sent_at))}

    def answered(self):
        return len(self.replies)

    def keep(self, i, header, frames):
        self.replies[header["id"]] = header

    def saw_disconnect(self, now):
        self.monitor.recv_multipart()
        if self.disconnected is None:
            self.disconnected = now + self.wall

    def run(self):
        try:
            self.load.run(time.monotonic())
        finally:
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.sock.close(0)


def test_a_sigkilled_broker_loses_no_request_of_a_client_with_a_budget(server, demo_trace, trace_scores):
    stop = threading.Event()
    lock = threading.Lock()
    records, failures = [], []

    def run(i):
        with Client(server.endpoint, timeout_s=1.0, budget_s=20.0) as c:
            q = i
            while not stop.is_set():
                user, items, recall = demo_trace[q % len(demo_trace)]
                t0 = time.monotonic()
                try:
                    r = c.score(user, items, recall, deadline_ms=5000)
                except Exception as e:   # TimeoutError, RequestError: a lost request
                    with lock:
                        failures.append(repr(e))
                    continue
                with lock:
                    records.append((q % len(demo_trace), r, t0, time.monotonic()))
                q += 4

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(records) >= 40, 30, what="the load to get going")
        victim = broker_pid(server)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_until(lambda: any(t0 > t_kill + 1.0 for _, _, t0, _ in records), 30,
                   what="answers to requests sent after the new broker came up")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert broker_pid(server) != victim
    retried = [rec for rec in records if rec[1].attempts > 1]
    print(f"\nSIGKILL of the broker: {len(records)} requests answered, {len(failures)} lost, {len(retried)} sent "
          f"again (slowest {max((d - t0 for _, _, t0, d in retried), default=0):.2f} s)")
    assert not failures, failures[:5]
    assert retried, "no request was in the broker when it died"
    for q, r, _, _ in records:
        _, items, _ = demo_trace[q]
        assert_topk(r, items, trace_scores[q], 10)


def test_sigterm_under_400_requests_per_s_answers_every_request_sent_before_the_frontend_closed(server, demo_trace):
    with OpenLoop(server.endpoint, demo_trace, RATE) as load:
        wait_until(lambda: load.answered() >= RATE, 30, what="a second of answered load")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        t_exit = time.time()     # still sending to a server that is gone, a few requests
        wait_until(lambda: sum(1 for t in list(load.sent.values()) if t > t_exit) >= 10, 10,
                   what="requests sent after the server exited")
    closing = log_lines(server, "closing the frontend")
    assert len(closing) == 1, server.log_tail()
    t_close = log_time(closing[0])     # ms resolution, rounded down: "before" is strict
    before = sorted(i for i, t in load.sent.items() if t < t_close)
    lost = [i for i in before if i not in load.replies]
    after = [i for i, t in load.sent.items() if t >= t_close]
    refused = [h for h in load.replies.values() if h["status"] == "error"]
    seen = [i for i, t in load.sent.items() if load.disconnected and t < load.disconnected and i not in load.replies]
    t_closed = log_time(log_lines(server, "frontend closed")[0])   # logged right after the connections were shut
    lost_closed = [i for i, t in load.sent.items() if t < t_closed and i not in load.replies]
    print(f"\nSIGTERM at {RATE} requests/s: {len(load.sent)} sent, {len(before)} before the frontend closed, "
          f"{len(lost)} of them unanswered; {len(refused)} answered OVERLOADED; {len(after)} sent after "
          f"({sum(1 for i in after if i in load.replies)} of them answered); unanswered ones sent before the "
          f"client saw its connection end: {len(seen)}, in the last "
          f"{(load.disconnected - min((load.sent[i] for i in seen), default=load.disconnected)) * 1000:.0f} ms; "
          f"unanswered ones sent before the ms of the broker's 'frontend closed' line: {len(lost_closed)}; "
          + log_lines(server, "frontend closed")[0].split(" jizhi.broker ")[1])
    assert not lost, f"requests sent before the frontend closed got no reply: {lost[:20]}"
    assert len(before) >= RATE
    for h in refused:
        assert h["code"] == OVERLOADED and h["retry_after_ms"] > 0, h
    assert refused, "nothing was sent while the server stopped"
