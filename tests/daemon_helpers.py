"""Helpers for the daemon, security, fuzz and systemd tests (on top of conftest).

* ``Load``: closed-loop load of several REQ client threads
  (``jizhi.tools.loadgen.ClientThreads``), recording every attempt (send
  time, answer time, outcome, reply);
* ``jizhictl(...)``: run the real ``jizhictl`` and return the completed process;
* ``popen(server, env)`` / ``wait_ready(server, client)``: start a conftest
  server that ``Launcher.start(wait_ready=False)`` registered (so conftest's
  teardown still stops it and checks /dev/shm) with an environment or a
  readiness probe conftest does not give (NOTIFY_SOCKET, CURVE);
* ``broker_pid``, ``listening_tcp``, ``open_fds``, ``thread_count``,
  ``log_time``: what a test reads from /proc and the log.
"""
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, assert_topk, wait_until
from jizhi.client import Client
from jizhi.errors import RETRIABLE, RequestError
from jizhi.tools.loadgen import ClientThreads

JIZHICTL = Path(sys.executable).parent / "jizhictl"
JIZHID = Path(sys.executable).parent / "jizhid"


# ---------------------------------------------------------------------------
# Load


class Load(ClientThreads):
    """``clients`` threads, each a REQ client sending trace requests back to back.

    Every attempt is a dict in ``records``: ``client``, ``seq`` (the logical
    request of that client), ``q`` (trace request), ``t_send``/``t_done``
    (time.monotonic), ``wall_send`` (time.time, to compare with log lines),
    ``outcome`` ("ok", an error code, or "timeout"), ``message`` and, for
    "ok", ``reply``.

    ``rate``: requests/s offered by all clients together (each paced; a
    client whose answer comes late sends at once). ``retry``: a Lazy Pirate client. A timeout or a retriable error is retried
    (a new attempt of the same logical request, the client reopens its
    socket) until it succeeds or ``give_up_s`` passed. ``stop_on_draining``:
    a thread ends at its first timeout or "draining" refusal.
    """

    def __init__(self, endpoint, trace, *, pipeline="demo", clients=4, deadline_ms=2000, timeout_s=None,
                 retry=False, give_up_s=30.0, stop_on_draining=False, rate=None):
        self.endpoint = endpoint
        self.trace = trace
        self.pipeline = pipeline
        self.deadline_ms = deadline_ms
        self.timeout_s = timeout_s if timeout_s is not None else deadline_ms / 1000 + 4.0
        self.retry = retry
        self.give_up_s = give_up_s
        self.stop_on_draining = stop_on_draining
        self.records = []
        super().__init__(clients, rate=rate, join_s=self.timeout_s + 5 + (give_up_s if retry else 0))

    def attempt(self, client, i, seq, q):
        user, items, recall = self.trace[q]
        rec = {"client": i, "seq": seq, "q": q, "t_send": time.monotonic(), "wall_send": time.time()}
        try:
            rec["reply"] = client.score(user, items, recall, pipeline=self.pipeline, top_k=10,
                                        deadline_ms=self.deadline_ms)
            rec["outcome"] = "ok"
        except RequestError as e:
            rec["outcome"] = e.code
            rec["message"] = e.message
            rec["retry_after_ms"] = e.retry_after_ms
        except TimeoutError:
            rec["outcome"] = "timeout"
        rec["t_done"] = time.monotonic()
        with self.lock:
            self.records.append(rec)
        return rec

    def connect(self, i):
        return Client(self.endpoint, timeout_s=self.timeout_s)

    def send(self, i, client, n):
        q, seq = (i + (n + 1) * len(self.threads)) % len(self.trace), n + 1
        rec = self.attempt(client, i, seq, q)
        if self.retry:
            end = rec["t_send"] + self.give_up_s
            while rec["outcome"] != "ok" and time.monotonic() < end:
                if rec["outcome"] not in RETRIABLE and rec["outcome"] != "timeout":
                    break
                time.sleep(min(1.0, (rec.get("retry_after_ms") or 20) / 1000))   # the server's retry hint, honoured: a client's backoff, not a wait for a condition
                rec = self.attempt(client, i, seq, q)
        return self.stop_on_draining and (rec["outcome"] == "timeout" or "draining" in rec.get("message", ""))

    # -- reading the records --------------------------------------------------

    def snapshot(self):
        with self.lock:
            return list(self.records)

    def count_ok(self, since=0.0):
        """OK answers to attempts sent at or after ``since`` (time.monotonic)."""
        return sum(1 for r in self.snapshot() if r["outcome"] == "ok" and r["t_send"] >= since)

    def outcomes(self, records=None):
        out = {}
        for r in self.snapshot() if records is None else records:
            out[r["outcome"]] = out.get(r["outcome"], 0) + 1
        return out

    def first_ok_after(self, t):
        """Seconds from ``t`` to the first OK answer to an attempt sent after ``t`` (None: none)."""
        done = [r["t_done"] for r in self.snapshot() if r["outcome"] == "ok" and r["t_send"] > t]
        return min(done) - t if done else None

    def longest_gap_without_ok(self, start, end):
        """Longest time within [start, end] with no OK answer arriving."""
        marks = sorted(r["t_done"] for r in self.snapshot() if r["outcome"] == "ok" and start <= r["t_done"] <= end)
        edges = [start] + marks + [end]
        return max(b - a for a, b in zip(edges, edges[1:]))


def assert_answered_in_time(records, trace, trace_scores, deadline_ms, bound_s=1.0, allowed=RETRIABLE):
    """Every attempt is OK (equal to the reference) or an ``allowed`` error, within deadline + bound."""
    assert records, "the load sent nothing"
    outcomes = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    bad = {o: n for o, n in outcomes.items() if o != "ok" and o not in allowed}
    assert not bad, f"requests without an allowed answer: {bad} (all outcomes: {outcomes})"
    slowest = max(r["t_done"] - r["t_send"] for r in records)
    assert slowest <= deadline_ms / 1000 + bound_s, f"an answer took {slowest:.3f} s (outcomes: {outcomes})"
    for r in records:
        if r["outcome"] == "ok":
            _, items, _ = trace[r["q"]]
            assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    return outcomes


def score_ok(client, trace, trace_scores, q, deadline_ms=30_000):
    """One trace request through ``client``; asserts the reference top-10."""
    user, items, recall = trace[q]
    r = client.score(user, items, recall, pipeline="default", top_k=10, deadline_ms=deadline_ms)
    assert_topk(r, items, trace_scores[q], 10)
    return r


# ---------------------------------------------------------------------------
# jizhictl


def jizhictl(*args, run_dir=None, timeout_s=60):
    """Run ``jizhictl ARGS [--run-dir RUN_DIR]``; returns the CompletedProcess (text)."""
    argv = [str(JIZHICTL), *map(str, args)]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    env = dict(os.environ)
    env.pop("JIZHI_RUN_DIR", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env,
                          stdin=subprocess.DEVNULL)


def jizhictl_ok(*args, run_dir=None):
    r = jizhictl(*args, run_dir=run_dir)
    assert r.returncode == 0, f"jizhictl {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}{r.stdout}"
    return r.stdout


# ---------------------------------------------------------------------------
# Starting a conftest server ourselves


def popen(server, extra_env=None):
    """Start ``server`` (registered by ``Launcher.start(wait_ready=False)``) as conftest would, plus ``extra_env``.

    conftest strips NOTIFY_SOCKET/WATCHDOG_* so a test never talks to the
    runner's systemd; tests that need them set them here. The Launcher's
    teardown still stops the server and checks its segments.
    """
    env = dict(os.environ)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra_env or {})
    server._log = open(server.log_path, "ab")   # conftest's kill_group closes it
    server.proc = subprocess.Popen(server.argv, stdin=subprocess.DEVNULL, stdout=server._log,
                                   stderr=subprocess.STDOUT, env=env, cwd=server.run_dir,
                                   start_new_session=True)
    return server


def wait_ready(server, probe, timeout_s=90.0):
    """Poll ``probe.info()`` (a Client of the caller's making) until every pool is full."""
    def full():
        if server.proc.poll() is not None:
            raise AssertionError(f"jizhid exited with {server.proc.returncode}\n{server.log_tail()}")
        return server.pool_sizes(probe) == server.desired_pool_sizes() if server.plan_path.exists() else False
    wait_until(full, timeout_s, interval_s=0.1, what=f"every pool of jizhid {server.instance} to be full")
    return server


# ---------------------------------------------------------------------------
# /proc and the log


def broker_pid(server):
    pids = [pid for pid, argv in server.children().items() if "jizhi.broker" in argv]
    assert len(pids) == 1, f"expected one broker process, found {pids}"
    return pids[0]


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def socket_inodes(pid):
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            out.add(int(m.group(1)))
    return out


def listening_tcp(pids):
    """{(pid, address, port)} of TCP (v4 and v6) sockets in LISTEN state held by ``pids``."""
    listen = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], int(f[9])
            if state != "0A":   # TCP_LISTEN
                continue
            addr, port = local.rsplit(":", 1)
            listen[inode] = (addr, int(port, 16))
    out = set()
    for pid in pids:
        for inode in socket_inodes(pid) & set(listen):
            out.add((pid,) + listen[inode])
    return out


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line):
    """time.time() of a log line (logging's default asctime, local time, ms resolution)."""
    m = _LOG_TIME.match(line)
    assert m, f"no timestamp in log line {line!r}"
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_lines(server, text):
    return [line for line in server.log_text().splitlines() if text in line]


def held_request(server, trace, pipeline="sleepy"):
    """A DEALER socket that sent trace request 0 to ``pipeline`` (a stage that holds it, tests/stages.py)
    with a 60 s deadline, returned once the broker counts it in flight. The caller closes it."""
    import zmq
    from jizhi import protocol
    user, items, recall = trace[0]
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    dealer.send_multipart([b""] + protocol.encode_request(
        id="held", pipeline=pipeline, user=user, item_ids=items, recall_scores=recall, deadline_ms=60_000))
    wait_until(lambda: server.info()["pipelines"][pipeline]["in_flight"] == 1, 10,
               what=f"the request to be held by the {pipeline} stage")
    return dealer


def sleepy_pipeline_text(sleep_s):
    """A one-stage pipeline "sleepy" whose ranker sleeps ``sleep_s`` per batch of one (tests/stages.py):
    a request it holds stays in flight that long."""
    return ('name = "sleepy"\nmodel = "demo"\n[[stage]]\nname = "rank"\n'
            f'processor = "tests.stages:SleepyRanker"\nbatch = 1\nsleep_s = {sleep_s}\n')

