"""Hostile clients cannot make the broker hold memory or descriptors without bound (issue 16, items 3 and 8).

One jizhid serves the demo pipeline and a pipeline whose ranker sleeps 20 ms a
batch (a known service rate, for the overload test), with a small connection
limit and few request slots. Against it, clients a library would never be:

* a raw ZMTP peer (a plain TCP socket speaking ZeroMQ's wire format) sending
  an unfinished multipart message of 1 GiB, in 250 KB frames and in empty
  frames (ZeroMQ keeps ~64 bytes per frame: its worst case per byte sent);
* a raw peer that sends requests for 30 s and never reads a reply;
* more connections than ``limits.max_connections``, idle or asking;
* clients that honour ``retry_after_ms`` under overload.

The broker's RSS is read from /proc/<broker pid>/status (VmRSS) by a sampler
every 5 ms; the bounds are the ones the README documents for the defaults
(``limits.max_message_bytes`` 256 KiB, ``limits.max_candidates`` 2000).
"""
import socket
import struct
import threading
import time

import pytest

from conftest import demo_pipeline_text, wait_until, write_text
from daemon_helpers import broker_pid, log_lines, open_fds, score_ok
from jizhi import protocol
from jizhi.client import Client
from jizhi.errors import OVERLOADED, RequestError

MAX_CONNECTIONS = 48
# README, "Limits": what one connection can make the broker hold (the default figure), and all of them
# together (limits.clients_memory_mb: 256 by default, 128 here so that eight connections pass it).
CONNECTION_BOUND_MIB = 43
CLIENTS_BOUND_MIB = 128
RETRY_CLIENTS = 32
SLOTS = 8


# ---------------------------------------------------------------------------
# A raw ZMTP 3.0 peer (NULL mechanism): a DEALER over a plain socket, so a test can send what pyzmq never
# would (a message that never ends) and leave unread what pyzmq would read for its application anyway.


def zmtp_frame(payload, more=False, command=False):
    flags = (0x01 if more else 0) | (0x04 if command else 0)
    if len(payload) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(payload)) + payload
    return bytes([flags, len(payload)]) + payload


def zmtp_message(frames):
    return b"".join(zmtp_frame(bytes(f), more=i + 1 < len(frames)) for i, f in enumerate(frames))


def address(endpoint):
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


class RawPeer:
    def __init__(self, endpoint, timeout_s=10.0):
        self.sock = socket.create_connection(address(endpoint), timeout=timeout_s)
        self.sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
        self._read_exactly(64)   # the broker's greeting
        ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        self.sock.sendall(zmtp_frame(ready, command=True))

    def _read_exactly(self, n):
        got = b""
        while len(got) < n:
            chunk = self.sock.recv(n - len(got))
            if not chunk:
                raise ConnectionError("closed by the broker")
            got += chunk
        return got

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()


class RssPeak:
    """The largest VmRSS of ``pid`` while the block runs (sampled every 5 ms)."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = self.before = vm_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, vm_rss(self.pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, vm_rss(self.pid))

    @property
    def growth_mib(self):
        return (self.peak - self.before) / 2 ** 20


def vm_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def guarded(launch_module, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-pipelines")
    # 20 ms a batch of 4, one worker: 200 requests/s whatever the machine, so overload is certain.
    write_text(d / "sleepy.toml", demo_pipeline_text(
        "sleepy", processors={"rank": "tests.stages:SleepyRanker"}, options={"rank": ["sleep_s = 0.02"]}))
    return launch_module.start(pipelines=["demo", d / "sleepy.toml"],
                               config_text=f"[limits]\nmax_connections = {MAX_CONNECTIONS}\nmax_in_flight = {SLOTS}\n"
                                           f"max_waiting = {SLOTS}\n"
                                           f"clients_memory_mb = {CLIENTS_BOUND_MIB}\n")


@pytest.fixture
def warm_broker(guarded, demo_trace, trace_scores):
    """The broker's pid after it answered a request (its arenas touched, its RSS settled)."""
    with Client(guarded.endpoint, timeout_s=10.0) as c:
        for q in range(4):
            score_ok(c, demo_trace, trace_scores, q)
        assert c.info()["clients"]["bounds_mib"] == {"connection": CONNECTION_BOUND_MIB, "all": CLIENTS_BOUND_MIB}
    return broker_pid(guarded)


def still_serves(server, demo_trace, trace_scores):
    with Client(server.endpoint, timeout_s=10.0) as c:
        for q in range(3):
            score_ok(c, demo_trace, trace_scores, q)


def send_until_cut(peer, chunk, total, seconds):
    """Send ``chunk`` until ``total`` bytes or ``seconds`` passed; (bytes sent, how it ended)."""
    sent, end = 0, time.monotonic() + seconds
    try:
        while sent < total and time.monotonic() < end:
            peer.send(chunk)
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError):
        return sent, "cut"
    except socket.timeout:
        return sent, "stalled"
    return sent, "sent"


# ---------------------------------------------------------------------------
# Memory


@pytest.mark.slow
@pytest.mark.parametrize("frame_bytes", [250_000, 0], ids=["250KB-frames", "empty-frames"])
def test_an_unfinished_1_gib_multipart_message_is_cut_off_with_the_broker_under_its_bound(
        guarded, warm_broker, demo_trace, trace_scores, frame_bytes):
    chunk = zmtp_frame(b"\0" * frame_bytes, more=True) * max(1, 250_000 // (frame_bytes + 2))
    peer = RawPeer(guarded.endpoint)
    t0 = time.monotonic()
    with RssPeak(warm_broker) as rss:
        peer.send(zmtp_frame(b"", more=True))
        sent, how = send_until_cut(peer, chunk, 1 << 30, 20.0)
    took = time.monotonic() - t0
    peer.close()
    print(f"\n{frame_bytes}-byte frames: {sent / 2 ** 20:.1f} MiB sent in {took:.2f} s ({how}); broker VmRSS "
          f"{rss.before / 2 ** 20:.0f} MiB before, peak +{rss.growth_mib:.1f} MiB")
    assert how == "cut", f"the broker took {sent / 2 ** 20:.0f} MiB of an unfinished message ({how})"
    assert rss.growth_mib < CONNECTION_BOUND_MIB
    wait_until(lambda: log_lines(guarded, "closed client connection"), 5, what="the log to say a connection was closed")
    still_serves(guarded, demo_trace, trace_scores)


@pytest.mark.slow
def test_eight_connections_each_under_its_bound_are_cut_to_the_budget_of_all_connections(
        guarded, warm_broker, demo_trace, trace_scores):
    peers = [RawPeer(guarded.endpoint) for _ in range(8)]
    chunk = zmtp_frame(b"", more=True) * 16_384      # 32 KiB on the wire, 1 MiB inside ZeroMQ
    live = set(range(len(peers)))
    with RssPeak(warm_broker) as rss:
        for i in range(len(peers)):
            peers[i].send(zmtp_frame(b"", more=True))
        for _ in range(18):      # 576 KiB each: under one connection's 1 MiB, 8 x 18 MiB in all
            for i in sorted(live):
                try:
                    peers[i].send(chunk)
                except (ConnectionResetError, BrokenPipeError):
                    live.discard(i)
        try:   # the guard acts within a few ticks of the growth
            wait_until(lambda: guarded.info()["clients"]["closed"].get("memory", 0) >= 1, 5,
                       what="a connection closed for the budget")
        except AssertionError:
            pass    # the assertion below says it
    for p in peers:
        p.close()
    closed = guarded.info()["clients"]["closed"]
    print(f"\n8 connections of empty frames: {len(peers) - len(live)} cut while sending, closed {closed}; broker "
          f"VmRSS {rss.before / 2 ** 20:.0f} MiB before, peak +{rss.growth_mib:.1f} MiB")
    assert closed["memory"] >= 1
    assert rss.growth_mib < CLIENTS_BOUND_MIB
    still_serves(guarded, demo_trace, trace_scores)


@pytest.mark.slow
def test_a_client_that_never_reads_its_replies_for_30_s_leaves_the_broker_under_its_bound(
        guarded, warm_broker, demo_trace, trace_scores):
    peer = RawPeer(guarded.endpoint)
    user, items, recall = demo_trace[0]
    info = zmtp_message([b""] + protocol.encode_request("info", id=0))
    score = zmtp_message([b""] + [bytes(memoryview(f)) for f in protocol.encode_request(
        id=1, pipeline="demo", user=user, item_ids=items, recall_scores=recall, ret="all", deadline_ms=5000)])
    burst = info * 50 + score
    sent = 0
    with RssPeak(warm_broker) as rss:
        end = time.monotonic() + 30.0
        while time.monotonic() < end:
            peer.send(burst)         # never a recv; a send blocked for 10 s (the broker stopped reading) fails
            sent += 51
            time.sleep(0.005)        # the offered rate (~10,000 requests/s), not a wait for a condition
        still_serves(guarded, demo_trace, trace_scores)  # a reading client is served meanwhile
    peer.close()
    print(f"\nnon-reader: {sent} requests in 30 s; broker VmRSS {rss.before / 2 ** 20:.0f} MiB before, "
          f"peak +{rss.growth_mib:.1f} MiB; replies dropped: {guarded.info()['clients']['replies_dropped']}")
    assert sent > 10_000
    assert rss.growth_mib < CONNECTION_BOUND_MIB
    assert guarded.info()["clients"]["replies_dropped"]["not_reading"] > 0


# ---------------------------------------------------------------------------
# Connections


def refused(server):
    """True when a new client's ping is refused at the connection limit."""
    with Client(server.endpoint, timeout_s=5.0) as c:
        header = c.ping().header
    return header.get("code") == OVERLOADED and "connection limit" in header["message"]


def test_a_new_client_at_the_connection_limit_gets_a_refusal_and_is_served_once_there_is_room(
        guarded, demo_trace, trace_scores):
    held = []
    try:
        while len(held) < MAX_CONNECTIONS:
            held.append(RawPeer(guarded.endpoint))
        wait_until(lambda: refused(guarded), 10, what="the broker to count the idle peers")
        user, items, recall = demo_trace[0]
        t0 = time.monotonic()
        with Client(guarded.endpoint, timeout_s=5.0) as c:
            with pytest.raises(RequestError) as e:
                c.score(user, items, recall)
        took = time.monotonic() - t0
        assert e.value.code == OVERLOADED, e.value
        assert "connection limit" in e.value.message
        assert e.value.retry_after_ms and e.value.retry_after_ms > 0
        assert took < 2.0, f"the refusal took {took:.2f} s"
    finally:
        for p in held:
            p.close()
    wait_until(lambda: not refused(guarded), 10, what="a new client to be served once the idle peers left")
    still_serves(guarded, demo_trace, trace_scores)


def test_thousands_of_idle_connections_leave_descriptors_bounded_and_new_clients_refused_not_silent(
        guarded, demo_trace, trace_scores):
    pid = broker_pid(guarded)
    fds0 = open_fds(pid)
    held, failed = [], 0
    try:
        for _ in range(2000):
            try:
                held.append(socket.create_connection(address(guarded.endpoint), timeout=5))
            except OSError:
                failed += 1
        peak_fds = wait_until(lambda: open_fds(pid), 1)
        user, items, recall = demo_trace[1]
        t0 = time.monotonic()
        with Client(guarded.endpoint, timeout_s=5.0) as c:
            with pytest.raises(RequestError) as e:
                c.score(user, items, recall)
        assert e.value.code == OVERLOADED and "connection limit" in e.value.message, e.value
        assert time.monotonic() - t0 < 3.0
        # While ZeroMQ accepts the backlog the guard closes refused ones behind it: the count settles
        # (served + refused cap + ZeroMQ's own) and stays there while the connections are held.
        bound = fds0 + 2 * MAX_CONNECTIONS + 64
        fds = wait_until(lambda: (lambda n: n if n <= bound else None)(open_fds(pid)), 15,
                         what=f"the broker's descriptors to settle under {bound}")
        print(f"\n2000 idle connections ({failed} failed): broker fds {fds0} before, {peak_fds} and {fds} with them")
    finally:
        for s in held:
            s.close()
    still_serves(guarded, demo_trace, trace_scores)


# ---------------------------------------------------------------------------
# Overload: retry_after_ms


def test_clients_that_honour_retry_after_ms_mostly_succeed_on_their_next_try(guarded, demo_trace):
    stop = threading.Event()
    lock = threading.Lock()
    tries = []          # (retry_after_ms, next try's outcome)
    oks = [0]

    def run(i):
        with Client(guarded.endpoint, timeout_s=10.0) as c:
            user, items, recall = demo_trace[i % len(demo_trace)]
            pending = None
            while not stop.is_set():
                try:
                    c.score(user, items, recall, pipeline="sleepy", deadline_ms=10_000)
                    outcome = "ok"
                except RequestError as e:
                    outcome = e.code
                    if e.code == OVERLOADED:
                        after = e.retry_after_ms
                with lock:
                    if pending is not None:
                        tries.append((pending, outcome))
                    if outcome == "ok":
                        oks[0] += 1
                pending = None
                if outcome == OVERLOADED:
                    pending = after
                    time.sleep(after / 1000.0)    # honouring the hint is the behaviour under test

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(RETRY_CLIENTS)]
    for t in threads:
        t.start()
    try:   # enough retries after OVERLOADED to judge their outcome
        wait_until(lambda: len(tries) >= 150, 30, interval_s=0.2, what="150 retries after OVERLOADED")
    except AssertionError:
        pass    # the assertions below say how many
    stop.set()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads)
    hints = sorted(h for h, _ in tries)
    ok_next = sum(1 for _, o in tries if o == "ok")
    share = ok_next / len(tries) if tries else 0.0
    print(f"\n{RETRY_CLIENTS} clients, {SLOTS} slots, 200 requests/s: {oks[0]} ok, {len(tries)} retries after "
          f"OVERLOADED; retry_after_ms p10/p50/p90 {hints[len(hints) // 10] if hints else None}/"
          f"{hints[len(hints) // 2] if hints else None}/{hints[9 * len(hints) // 10] if hints else None}; "
          f"next try ok: {ok_next} ({share:.0%})")
    assert len(tries) >= 100, "the clients did not overload the pipeline"
    assert share >= 0.8
