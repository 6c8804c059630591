"""The open-loop load generator: a trace's requests sent on their own clock, whatever the replies.

Runs in the caller's process (a benchmark in the operator's shell, or a test), never inside
jizhid. One thread runs an ``OpenLoop`` (``run``); other threads may only call ``stop`` and
``halt`` and read its arrays. Every load tool and test uses it: ``jizhictl bench`` (one point at
a time, jizhi/tools/bench.py, and through it ``tune`` and ``soak``), ``bench-reload`` (until the
reloads are done), ``bench-shape`` (a rate that follows a function of time) and the SIGTERM test.
The broker micro-benchmark (jizhi/tools/microbench.py) runs closed loop, a window of requests
in flight, on this module's socket and reply reader.

* **What is replayed**: a ``jizhi.ctl.inputs.Trace`` (a trace file) or ``Requests`` held in
  memory. A command takes ``trace_options`` (``--trace FILE``, or ``--bundle DIR`` with
  ``--requests N`` to generate one) and opens ``trace_file``.

* **Arrivals**: intended send times in seconds from the run's start ``t0`` (negative ones: a
  warm-up before it) and the trace row each sends. ``uniform_times``: a fixed count drawn
  uniformly over a window and sorted, a Poisson process conditioned on its count;
  ``poisson_times``: exponential gaps up to a horizon; ``shaped_times``: a Poisson process whose
  rate is a function of time; ``interval_times``: one every 1/rate s.
* **Sending**: one ZeroMQ DEALER (``load_socket``), a request sent when it is due, as many in
  flight as the arrivals make. Frames are encoded before the run, or (``encode_ahead``) a few
  hundred ahead of their send time, in the gaps between sends, for runs whose length is not
  known or whose frames would not fit in memory. Request ``k`` carries id ``id_base + k``: a
  late reply to another run on the same socket is recognised and dropped.
* **Per request** (arrays indexed by arrival order): ``sent_at`` (when its send began) and
  ``done_at`` (when its reply was read; monotonic seconds), ``status`` (``PENDING``, ``OK``,
  ``ERROR``, ``LOST``, ``NOT_SENT``). Latency is ``done_at - due``, from the *intended* send time,
  so a generator or server that falls behind is charged for it (no coordinated omission). An
  ``on_reply(k, header, frames)`` callback keeps whatever else a tool reads of a reply.
* **The end**: the arrivals run out or ``stop(at)`` is called (no request due at or after
  ``at`` is sent), then the **drain**: every request sent is answered, or counted ``LOST`` once
  ``lost_after_s`` (deadline + 1 s) passed since its send with no reply; ``halt()`` ends the run
  at its next turn without the drain. A send that fails at once (several nodes, none connected)
  is ``LOST`` too.
* **Beside the load**, in the same thread: ``call_at(t, fn)`` and ``every(period_s, fn)``
  (a CPU window that starts on time, a progress line, an early stop) and ``watch(socket, fn)``
  (another socket read when it has something: ``InfoProbe``, a socket monitor).

The loop does per send an encode only in ``encode_ahead`` mode and per reply one msgpack
decode; everything else over the requests (late ones, a progress figure) is numpy on the arrays.

Closed loop, ``ClientThreads``: client threads that each send one request at a time, for what
measures a client's own behaviour under load (its retries, its choice among nodes): the tests'
loads and the multi-node benchmark.
"""
import collections
import contextlib
import dataclasses
import heapq
import itertools
import math
import os
import sys
import tempfile
import threading
import time

import click
import numpy as np
import zmq

from jizhi import protocol
from jizhi.client import split_endpoints
from jizhi.ctl.inputs import resolve_bundle

PENDING, OK, ERROR, LOST, NOT_SENT = 0, 1, 2, 3, 4
ENCODE_AHEAD = 256          # requests encoded ahead of their send time in encode_ahead mode
SEND_SLACK_S = 0.001        # encode ahead only when the next send is at least this far off
MAX_WAIT_MS = 50            # the longest poll while sending: stop() from another thread acts this fast
DRAIN_WAIT_MS = 20
PROGRESS_INTERVAL_S = 0.5


# ----------------------------------------------------------------------------
# What is sent


@dataclasses.dataclass(frozen=True)
class Requests:
    """Requests held in memory in a trace's form (``jizhi.ctl.inputs.Trace`` reads them from a
    trace file, docs/formats.md; either serves as an ``OpenLoop``'s trace): request q is user
    ``users[q]`` with candidates ``items[offsets[q]:offsets[q + 1]]`` and their ``recall``
    scores (None: requests without them)."""
    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    recall: np.ndarray = None

    def __len__(self):
        return self.users.shape[0]


def trace_options(bundle_help):
    """The options of a command that replays a trace: ``--trace FILE``, or ``--bundle DIR`` with
    ``--requests N`` (and ``--candidates``) to generate one (``trace_file``)."""
    options = [
        click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
                     help="Request trace (trace.npz, docs/formats.md)."),
        click.option("--bundle", type=click.Path(exists=True, file_okay=False), help=bundle_help),
        click.option("--requests", type=click.IntRange(1),
                     help="Generate a trace of this many requests from --bundle."),
        click.option("--candidates", type=click.IntRange(1), default=500, show_default=True,
                     help="Candidates per request of a generated trace."),
    ]

    def decorate(fn):
        for option in reversed(options):     # as if written one above the other, in this order
            fn = option(fn)
        return fn
    return decorate


def check_trace_args(trace_path, bundle, requests):
    """Refuse (click.UsageError) a command line with no trace to replay, or with two."""
    if trace_path and requests:
        raise click.UsageError("give --trace or --requests (with --bundle), not both")
    if not trace_path and not (bundle and requests):
        raise click.UsageError("give --trace FILE, or --bundle DIR with --requests N to generate one")


@contextlib.contextmanager
def trace_file(trace_path, bundle, requests, candidates, progress):
    """The path of the trace a command replays: ``trace_path``, or a temporary file (removed on
    exit) of ``requests`` requests generated from the bundle ``bundle`` names."""
    if trace_path:
        yield trace_path
        return
    from jizhi.tools.demo import generate_trace     # (onnx: imported only when a trace is generated)
    tmp = tempfile.NamedTemporaryFile(prefix="jizhi-trace-", suffix=".npz", delete=False)
    tmp.close()
    try:
        generate_trace(str(resolve_bundle(bundle)), tmp.name, requests=requests, candidates=candidates,
                       progress=progress)
        yield tmp.name
    finally:
        os.unlink(tmp.name)


def uniform_times(rng, count, start_s, end_s):
    """``count`` arrival times drawn uniformly over [start_s, end_s), sorted: a Poisson process
    conditioned on its count (``jizhictl bench``: a point offers exactly rate x duration)."""
    return np.sort(rng.uniform(start_s, end_s, count))


def poisson_times(rng, rate, horizon_s):
    """Arrival times of a Poisson process at ``rate``/s in [0, horizon_s): exponential gaps."""
    due = np.cumsum(rng.exponential(1.0 / rate, int(rate * horizon_s * 1.1) + 1000))
    return due[due < horizon_s]


def shaped_times(fn, duration_s, seed=0, bin_s=0.1):
    """Sorted arrival times in [0, duration_s) of a Poisson process whose rate is ``fn(t)``
    requests/s: per ``bin_s`` bin a Poisson count at the rate of the bin's middle, uniform
    times within the bin."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(int(math.ceil(duration_s / bin_s))):
        t = b * bin_s
        n = rng.poisson(max(0.0, fn(t + bin_s / 2)) * bin_s)
        out.append(np.sort(rng.uniform(t, min(t + bin_s, duration_s), n)))
    return np.concatenate(out) if out else np.zeros(0)


def interval_times(rate, horizon_s):
    """One arrival every 1/``rate`` s in [0, horizon_s): a fixed clock, no randomness."""
    return np.arange(int(math.ceil(rate * horizon_s))) / rate


def percentiles(lat_ms):
    """p50, p99, p99.9 and the max of latencies ``lat_ms`` (ms, rounded to the microsecond; None when empty)."""
    if lat_ms.shape[0] == 0:
        return {"p50_ms": None, "p99_ms": None, "p99_9_ms": None, "max_ms": None}
    p = np.percentile(lat_ms, [50, 99, 99.9])
    return {"p50_ms": round(float(p[0]), 3), "p99_ms": round(float(p[1]), 3),
            "p99_9_ms": round(float(p[2]), 3), "max_ms": round(float(lat_ms.max()), 3)}


# ----------------------------------------------------------------------------
# The socket


def load_socket(endpoint, ctx=None):
    """A load generator's DEALER: no linger, no high-water mark (the generator's own queue is the
    load), connected to every node of ``endpoint`` (comma-separated). With several nodes it queues
    only on connected ones (IMMEDIATE), so a dead node takes no more requests; send with NOBLOCK
    then, so that a send with every node gone fails at once instead of blocking."""
    sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    endpoints = split_endpoints(endpoint)
    if len(endpoints) > 1:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    for e in endpoints:
        sock.connect(e)
    return sock


def read_replies(sock):
    """Every reply waiting on a DEALER ``sock`` (non-blocking): ``(request id, header, frames)``;
    malformed ones skipped."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            header = protocol.unpackb(frames[1])
            rid = int(header["id"])
        except Exception:
            continue
        yield rid, header, frames


def drain_replies(sock):
    """Every reply waiting on a DEALER ``sock`` (non-blocking): ``(request id, header)``; malformed ones skipped."""
    for rid, header, _ in read_replies(sock):
        yield rid, header


# ----------------------------------------------------------------------------
# The generator


class OpenLoop:
    """One run of open-loop load on one pipeline (see the module docstring).

    ``sock``: a ``load_socket`` (the caller owns it; several runs may use it in turn).
    ``trace``: a ``jizhi.ctl.inputs.Trace`` or ``Requests``.
    ``due``: intended send times, s from ``t0``, sorted; ``rows``: the trace row of each.
    ``encode_ahead``: None, every frame is encoded here, before the run; N: at most N ahead
    of the next send, during the run. ``lost_after_s``: default deadline + 1 s.
    """

    def __init__(self, sock, trace, *, pipeline, due, rows, deadline_ms, top_k=10, id_base=0,
                 encode_ahead=None, lost_after_s=None, on_reply=None):
        self.sock = sock
        self.send_flags = zmq.NOBLOCK if sock.getsockopt(zmq.IMMEDIATE) else 0
        self.trace = trace
        self.pipeline = pipeline
        self.deadline_ms = deadline_ms
        self.top_k = top_k
        self.id_base = id_base
        self.due_rel = np.asarray(due, dtype=np.float64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.n = n = self.due_rel.shape[0]
        if self.rows.shape[0] != n:
            raise ValueError(f"{n} arrival times but {self.rows.shape[0]} rows")
        self.lost_after_s = deadline_ms / 1000.0 + 1.0 if lost_after_s is None else lost_after_s
        self.on_reply = on_reply
        self.encode_ahead = encode_ahead
        self.sent_at = np.full(n, np.nan)
        self.done_at = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int8)
        self.t0 = None
        self.due = None               # absolute (monotonic) once the run starts
        self.sent = 0                 # requests sent so far (read by timers, progress lines)
        self.stop_at = math.inf
        self.horizon_reached = False  # the arrivals ran out before stop() was called
        self._halted = False
        self._timers = []             # heap of (time, seq, fn, period or None)
        self._seq = itertools.count()
        self._watched = {}
        self._frames = collections.deque(self.encode(k) for k in range(n)) if encode_ahead is None \
            else collections.deque()

    def encode(self, k):
        """The DEALER frames of request ``k``."""
        tr = self.trace
        r = self.rows[k]
        a, b = tr.offsets[r], tr.offsets[r + 1]
        return [b""] + protocol.encode_request(
            "score", id=self.id_base + k, pipeline=self.pipeline, user=int(tr.users[r]), item_ids=tr.items[a:b],
            recall_scores=None if tr.recall is None else tr.recall[a:b], top_k=self.top_k,
            deadline_ms=self.deadline_ms)

    # -- control, from any thread ----------------------------------------------

    def stop(self, at=None):
        """Send no request due at or after ``at`` (monotonic; default: now), then drain."""
        self.stop_at = min(self.stop_at, time.monotonic() if at is None else at)

    def halt(self):
        """End the run at its next turn (within MAX_WAIT_MS), without the drain."""
        self._halted = True

    # -- beside the load, set up before run() -----------------------------------

    def call_at(self, t, fn):
        """Call ``fn(now)`` once, in the load's thread, at monotonic time ``t``."""
        heapq.heappush(self._timers, (t, next(self._seq), fn, None))

    def every(self, period_s, fn, start=None):
        """Call ``fn(now)`` every ``period_s`` from ``start`` (monotonic; default: the run's first turn)."""
        heapq.heappush(self._timers, (0.0 if start is None else start, next(self._seq), fn, period_s))

    def watch(self, sock, fn):
        """Call ``fn(now)`` whenever ``sock`` has something to read (it must read it)."""
        self._watched[sock] = fn

    # -- the run -----------------------------------------------------------------

    def latency_ms(self):
        """Per request, ms from its intended send time to its reply (NaN: none)."""
        return (self.done_at - self.due) * 1000.0

    def run(self, t0):
        """Send each request when due (``t0 + due``) until the arrivals run out or ``stop``,
        then drain; returns when every request sent is answered or lost (or on ``halt``)."""
        self.t0 = t0
        due = self.due = t0 + self.due_rel
        n, sock, flags, ahead = self.n, self.sock, self.send_flags, self.encode_ahead
        status, sent_at, frames, timers = self.status, self.sent_at, self._frames, self._timers
        monotonic = time.monotonic
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for other in self._watched:
            poller.register(other, zmq.POLLIN)
        k = pending = 0
        while not self._halted:
            now = monotonic()
            stop_at = self.stop_at
            while k < n and due[k] <= now and due[k] < stop_at:
                frame = frames.popleft() if frames else self.encode(k)
                try:
                    sock.send_multipart(frame, flags=flags, copy=True)
                    pending += 1
                except zmq.Again:
                    status[k] = LOST      # several nodes and none connected
                sent_at[k] = now
                k += 1
                now = monotonic()
            self.sent = k
            if timers and timers[0][0] <= now:
                self._fire(now)
            sending = k < n and due[k] < self.stop_at
            if sending:
                if ahead:   # in the gap before the next send only
                    while len(frames) < ahead and k + len(frames) < n and due[k] - monotonic() > SEND_SLACK_S:
                        frames.append(self.encode(k + len(frames)))
                timeout = min(MAX_WAIT_MS, max(0, math.ceil((due[k] - monotonic()) * 1000)))
            else:
                timeout = DRAIN_WAIT_MS
            if timers:
                timeout = min(timeout, max(0, math.ceil((timers[0][0] - monotonic()) * 1000)))
            events = poller.poll(timeout)
            if events:
                rnow = monotonic()
                for ready, _ in events:
                    if ready is sock:
                        pending -= self._take(rnow)
                    else:
                        self._watched[ready](rnow)
            if not sending:
                now = monotonic()
                late = (status[:k] == PENDING) & (now - sent_at[:k] > self.lost_after_s)
                if late.any():
                    status[:k][late] = LOST
                    pending -= int(late.sum())
                if pending <= 0:
                    break
        self.sent = k
        status[k:] = NOT_SENT
        self.horizon_reached = k >= n and self.stop_at == math.inf

    def _take(self, rnow):
        """Read the replies waiting; return how many answered a pending request of this run."""
        status, done_at, base, n, on_reply = self.status, self.done_at, self.id_base, self.n, self.on_reply
        taken = 0
        for rid, header, frames in read_replies(self.sock):
            k = rid - base
            if not 0 <= k < n or status[k] != PENDING:
                continue    # another run's, or answered after it was counted lost
            taken += 1
            done_at[k] = rnow
            status[k] = OK if header.get("status") == "ok" else ERROR
            if on_reply is not None:
                on_reply(k, header, frames)
        return taken

    def _fire(self, now):
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, fn, period = heapq.heappop(timers)
            if period is not None:
                heapq.heappush(timers, (now + period, next(self._seq), fn, period))
            fn(now)


# ----------------------------------------------------------------------------
# Closed loop


class ClientThreads:
    """Closed-loop load: ``threads`` threads, each with a client of its own sending one logical
    request at a time (its retries, its choice among several nodes are the client's), back to back,
    or, with ``rate`` (requests/s of all the threads together), each every ``threads / rate`` s: a
    thread whose answer came late sends at once, and one that fell behind makes up at most one
    interval. For what wants a client's own behaviour under load (the tests' loads, the multi-node
    benchmark); a rate that must not depend on the answers is ``OpenLoop``'s.

    A subclass gives ``connect(i)``, thread ``i``'s client (made on that thread, closed when it
    ends; ``clients[i]``, whose figures stay readable after), and ``send(i, client, n)``, the
    thread's ``n``-th logical request (from 0), recorded as the subclass wants under ``lock``;
    ``send`` returns True to end its thread. ``start()`` (or ``with``) starts the threads, ``stop()``
    ends them: each finishes the request it is in, within ``join_s``, or AssertionError ("a load
    client is stuck").
    """

    def __init__(self, threads, rate=None, join_s=60.0):
        self.interval_s = threads / rate if rate else 0.0
        self.join_s = join_s
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.clients = [None] * threads
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def connect(self, i):
        raise NotImplementedError

    def send(self, i, client, n):
        raise NotImplementedError

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(self.join_s)
        assert not any(t.is_alive() for t in self.threads), "a load client is stuck"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self, i):
        client = self.clients[i] = self.connect(i)
        next_send = time.monotonic() + i * self.interval_s / len(self.threads)
        try:
            for n in itertools.count():
                if self.stopping.is_set():
                    return
                if self.interval_s:
                    delay = next_send - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_send = max(next_send + self.interval_s, time.monotonic() - self.interval_s)
                if self.send(i, client, n):
                    return
        finally:
            client.close()


class InfoProbe:
    """Asks jizhid's ``info`` every ``every_s`` while a run lasts, one question at a time, on a
    DEALER of its own (an answer that comes late is followed by the next question at once).
    ``infos``: ``[(s from t0, info)]``. The caller closes it."""

    def __init__(self, endpoint, every_s=1.0, ctx=None):
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.every_s = every_s
        self.infos = []
        self.loop = None
        self.t0 = None
        self.waiting = False
        self.overdue = False

    def attach(self, loop, t0):
        """Ask first at ``t0`` (the run's start), then every ``every_s`` while ``loop`` runs."""
        self.loop, self.t0 = loop, t0
        loop.watch(self.sock, self.answer)
        loop.call_at(t0, self.ask)

    def ask(self, now):
        if self.waiting:
            self.overdue = True
            return
        self.sock.send_multipart([b""] + protocol.encode_request("info", id=-1))
        self.waiting = True
        self.loop.call_at(now + self.every_s, self.ask)

    def answer(self, now):
        frames = self.sock.recv_multipart()
        self.infos.append((now - self.t0, protocol.unpackb(frames[1])))
        self.waiting = False
        if self.overdue:
            self.overdue = False
            self.ask(now)

    def close(self):
        self.sock.close(0)


class Progress:
    """One ``\\r``-rewritten status line on stderr (silent when disabled)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.last = 0.0

    def show(self, text, force=False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < PROGRESS_INTERVAL_S):
            return
        self.last = now
        sys.stderr.write("\r" + text.ljust(100)[:140])
        sys.stderr.flush()

    def done(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
