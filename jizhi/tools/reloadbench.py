"""The hot-reload benchmark: ``jizhictl bench-reload`` (``bench_reload_command``).

Runs in the operator's shell against a running jizhid, never inside it, and
answers the issue's two questions about a model switch under load: how much
worse is p99 while a new version is validated, loaded, warmed, switched in
and the old one released, than in steady state in the same run (target: at
most 1.5x), and how much extra memory does the double-buffered load take.

One run, on the time axis of the load (seconds from its first arrival):

* ``0 .. 3 s``: load, not counted (the server's caches and the generator settle);
* ``3 s .. 3 + --steady``: the **steady window**;
* then ``--reloads`` times: publish the next version (one rename into
  ``<models>/<model>/<N>``: ``t_rename``), wait until it serves and the old
  version is ``standby`` (released: its workers exited, its arenas removed;
  ``t_released``), then ``--gap`` seconds more before the next publish. The
  **switch window** of a reload is ``[t_rename, t_released + 1 s]``;
* after the last release, ``--after`` seconds more of load, then a drain.

Load: open loop, as ``jizhictl bench`` (jizhi/tools/bench.py): Poisson arrivals at
``--rate`` from one DEALER socket, the trace's requests in order, latency
from each request's *intended* send time, errors by wire code, and *lost*
for no reply within deadline + 1 s. The run's length is not known in advance
(it depends on how long the reloads take), so the requests are encoded a
little ahead of their send time instead of all before the start (~6 us each).
The versions are staged (copied into ``<models>/.incoming`` with new dense
weights, ``jizhi.tools.demo.stage_version``, ~66 MB each for the demo) *before* the
load starts: copying and hashing in the generator's process while it sends
would charge the generator's own stalls to the server. Publishing is the
rename alone, as a training pipeline does it.

Memory: a sampler thread reads, every ``--sample-interval-s`` (100 ms), the
process tree under the supervisor (``/proc/<pid>/task/*/children``): RSS and
its anonymous, file and shared-memory parts from ``/proc/<pid>/status``
(cheap counters), the CPU time from ``/proc/<pid>/stat``, and the allocated
bytes of the instance's segments ``/dev/shm/jizhi.<instance>.*``. Every
``--pss-interval-s`` it also reads ``/proc/<pid>/smaps_rollup`` for PSS,
which counts a page shared by several processes (the memory-mapped cube and
profiles, the arenas, the interpreter's libraries) once in total, where RSS
counts it once per process. Reading smaps_rollup walks the page tables: it
costs 5-8 ms of CPU per jizhi process on the 2-core benchmark machine, so
PSS every 100 ms would take 0.3-0.5 cores from the server being measured;
the default reads it every 0.5 s (the double buffer lasts seconds). The
sampler's own CPU is reported. Processes are labelled by role: supervisor,
broker, ``workers vN``, ``validate vN``, ``hot tier build``.

Report: steady and switch-window p50/p99 (all reloads pooled, and per
reload, split by the server's own timeline into validating = rename to
valid, starting = the new workers' start and setup (and the hot tier's
build) to ready, warm-up = to serving, draining = serving to released, and
the second after the release), the ratio of switch p99 to steady p99 (and
to the p99 of every request outside the switch windows, a reference with
more samples), errors and lost requests, where the time of each window's
slowest 1 % went (queue wait, service, the rest of the broker, outside
the broker), the workers' nice values, the server's timeline per reload
(``jizhictl models`` timings_ms) with the measured rename to the first
answer by the new version (the reply's ``model_versions``), the CPU of each
role in each switch window and in its validating and starting phases (and
this process's, and the other load's), and memory: the baseline (median
over the steady window), the peak in each switch window and peak extra =
peak - baseline, and the median after the release.

A shared machine: ``--max-other-cores`` waits (at most ``--settle-s``)
for other processes to use fewer cores before the load starts and before
each later publish, and every window reports the other load it ran with;
the run also waits until jizhid runs no loading work of its own (the boot
version's hot tier is built after jizhid reports ready). ``--json FILE``
(``-``: stdout) writes all of it, with a per-0.5-s latency timeline.
"""
import collections
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np
import zmq

from jizhi import protocol
from jizhi.tools.bench import drain_replies, load_socket, machine_busy_s

WARMUP_S = 3.0               # load before the steady window, not counted
RELEASE_TAIL_S = 1.0         # the switch window ends this long after the release
POLL_S = 0.1                 # control-socket polling while a reload runs
ENCODE_AHEAD = 256           # requests encoded ahead of their send time
TIMELINE_BUCKET_S = 0.5
NOT_SERVABLE = ("rejected", "refused", "failed", "removed")
MIB = 2 ** 20


class ReloadFailed(Exception):
    """A reload did not complete (rejected, failed, timed out, daemon gone); the message says which."""


# ----------------------------------------------------------------------------
# Memory and CPU of the jizhid process tree, from /proc


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:   # the process exited between listing and reading
        return None


def process_tree(root):
    """``root`` and every descendant pid (through each thread's children list)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            text = _read_text(f"/proc/{pid}/task/{tid}/children")
            if text:
                todo.extend(int(c) for c in text.split())
    return out


def _status_kib(text, keys):
    vals = dict.fromkeys(keys, 0)
    for line in text.splitlines():
        k, _, rest = line.partition(":")
        if k in vals:
            vals[k] = int(rest.split()[0])
    return vals


class MemorySampler(threading.Thread):
    """Samples memory and CPU of a jizhid (supervisor ``root`` and its descendants) until ``stop()``.

    Runs as a thread of the benchmark process; the reads are syscalls (the
    GIL is released), so the load loop is delayed at most by the parsing.
    ``samples``: one dict per tick ``{t, procs: {pid: (role, rss, anon, file,
    shmem, cpu_s, nice of the main thread)}, shm}`` (bytes, seconds); ``pss``: one dict per PSS tick
    ``{t, procs: {pid: (role, pss, pss_shmem)}}``.
    """

    STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, root, instance, interval_s=0.1, pss_interval_s=0.5):
        super().__init__(name="memory-sampler", daemon=True)
        self.root = root
        self.shm_glob = f"jizhi.{instance}."
        self.interval_s = interval_s
        self.pss_every = max(1, round(pss_interval_s / interval_s)) if pss_interval_s > 0 else 0
        self.samples = []
        self.pss = []
        self.roles = {}           # (pid, starttime) -> role
        self.cpu_s = 0.0          # this thread's own CPU
        self._halt = threading.Event()
        self.clk_tck = os.sysconf("SC_CLK_TCK")

    def stop(self):
        self._halt.set()

    def role(self, pid, starttime):
        key = (pid, starttime)
        r = self.roles.get(key)
        if r is None:
            raw = _read_text(f"/proc/{pid}/cmdline") or ""
            args = raw.rstrip("\0").split("\0")

            def arg(name):
                return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else "?"
            if pid == self.root:
                r = "supervisor"
            elif "jizhi.broker" in args:
                r = "broker"
            elif "jizhi.workers.run" in args:
                r = f"workers v{arg('--version')}"
            elif "jizhi.validate" in args:
                r = f"validate v{arg('--version')}"
            elif "jizhi.cube.hot" in args:
                r = "hot tier build"
            elif "-m" in args:
                r = arg("-m")
            else:
                # Forked by the supervisor, not yet exec'd (it still shows jizhid's command line): ask again
                # next time, the pid and start time stay the same across exec.
                return "starting"
            self.roles[key] = r
        return r

    def roles_now(self):
        """The roles of the processes in the tree now."""
        out = set()
        for pid in process_tree(self.root):
            stat = _read_text(f"/proc/{pid}/stat")
            if stat is not None:
                out.add(self.role(pid, stat[stat.rindex(")") + 2:].split()[19]))
        return out

    def shm_bytes(self):
        total = 0
        try:
            with os.scandir("/dev/shm") as it:
                for e in it:
                    if e.name.startswith(self.shm_glob):
                        try:
                            total += e.stat().st_blocks * 512   # allocated pages, not the virtual size
                        except OSError:
                            pass
        except OSError:
            pass
        return total

    def tick(self, with_pss):
        t = time.monotonic()
        procs, pss = {}, {}
        for pid in process_tree(self.root):
            stat = _read_text(f"/proc/{pid}/stat")
            status = _read_text(f"/proc/{pid}/status")
            if stat is None or status is None:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            cpu = (int(f[11]) + int(f[12])) / self.clk_tck
            role = self.role(pid, f[19])
            kib = _status_kib(status, self.STATUS_KEYS)
            procs[pid] = (role, kib["VmRSS"] << 10, kib["RssAnon"] << 10, kib["RssFile"] << 10,
                          kib["RssShmem"] << 10, cpu, int(f[16]))
            if with_pss:
                text = _read_text(f"/proc/{pid}/smaps_rollup")
                if text is not None:
                    kv = _status_kib(text, ("Pss", "Pss_Shmem"))
                    pss[pid] = (role, kv["Pss"] << 10, kv["Pss_Shmem"] << 10)
        busy, total = machine_busy_s()
        self.samples.append({"t": t, "procs": procs, "shm": self.shm_bytes(), "machine": (busy, total),
                             "self_cpu_s": time.process_time()})
        if with_pss:
            self.pss.append({"t": time.monotonic(), "procs": pss})

    def run(self):
        c0 = time.thread_time()
        n = 0
        next_t = time.monotonic()
        while not self._halt.is_set():
            self.tick(self.pss_every and n % self.pss_every == 0)
            n += 1
            next_t += self.interval_s
            self._halt.wait(max(0.0, next_t - time.monotonic()))
        self.cpu_s = time.thread_time() - c0

    # -- reading the samples ---------------------------------------------------

    @staticmethod
    def _sum(sample, index):
        return sum(p[index] for p in sample["procs"].values())

    def series(self, a, b):
        """RSS samples in [a, b): arrays t, rss, anon, shm (bytes)."""
        s = [x for x in self.samples if a <= x["t"] < b]
        return (np.array([x["t"] for x in s]), np.array([self._sum(x, 1) for x in s], dtype=np.float64),
                np.array([self._sum(x, 2) for x in s], dtype=np.float64),
                np.array([x["shm"] for x in s], dtype=np.float64))

    def pss_series(self, a, b):
        s = [x for x in self.pss if a <= x["t"] < b]
        return s, np.array([self._sum(x, 1) for x in s], dtype=np.float64)

    def other_cores(self, a, b):
        """Cores the machine spent in [a, b] on anything but jizhid's tree and this benchmark process."""
        s = [x for x in self.samples if a <= x["t"] <= b]
        if len(s) < 2:
            return None
        x, y = s[0], s[-1]
        busy = (y["machine"][0] - x["machine"][0]) / max(y["machine"][1] - x["machine"][1], 1e-9) * (os.cpu_count() or 1)
        ours = sum(self.cpu_by_role(x["t"], y["t"]).values()) + y["self_cpu_s"] - x["self_cpu_s"]
        return round(max(0.0, busy - ours / max(y["t"] - x["t"], 1e-9)), 2)

    def nice_at(self, t):
        """{role: sorted nice values of its processes} in the last sample at or before ``t``."""
        s = None
        for x in self.samples:
            if x["t"] > t:
                break
            s = x
        out = collections.defaultdict(list)
        for p in (s["procs"].values() if s else []):
            out[p[0]].append(p[6])
        return {r: sorted(v) for r, v in sorted(out.items())}

    def own_cores(self, a, b):
        """Cores this benchmark process (load generator and sampler) used in [a, b]."""
        s = [x for x in self.samples if a <= x["t"] <= b]
        if len(s) < 2:
            return None
        return round((s[-1]["self_cpu_s"] - s[0]["self_cpu_s"]) / max(s[-1]["t"] - s[0]["t"], 1e-9), 2)

    def cpu_by_role(self, a, b):
        """CPU seconds per role within [a, b] (a process's CPU after its last sample is not seen)."""
        first, last = {}, {}
        for x in self.samples:
            for pid, p in x["procs"].items():
                key = (pid, p[0])
                if x["t"] <= a:
                    first[key] = p[5]
                elif x["t"] <= b:
                    last[key] = p[5]
                    first.setdefault(key, 0.0)   # started inside the window
        out = collections.defaultdict(float)
        for key, cpu in last.items():
            out[key[1]] += cpu - first[key]
        return dict(out)


# ----------------------------------------------------------------------------
# The load: open-loop Poisson until told to stop


class OpenLoop:
    """Open-loop Poisson load on one pipeline until ``stop_at`` (monotonic), then a drain.

    The arrival times are drawn for ``horizon_s`` up front (exponential gaps
    at ``rate``); requests are the trace's rows in order. Other threads may
    set ``stop_at`` (no arrival at or after it is sent) and ``phase`` (shown
    on the progress line); the loop itself runs in the calling thread.
    Per request: intended send time, actual send time, reply time, status
    (0 pending, 1 ok, 2 error, 3 lost, 4 not sent) and the version that
    answered.
    """

    def __init__(self, endpoint, trace, *, pipeline, model, rate, seed, horizon_s, deadline_ms, top_k):
        self.trace = trace
        self.pipeline = pipeline
        self.model = model
        self.deadline_ms = deadline_ms
        self.top_k = top_k
        rng = np.random.default_rng([seed, int(rate * 1000)])
        gaps = rng.exponential(1.0 / rate, int(rate * horizon_s * 1.1) + 1000)
        due = np.cumsum(gaps)
        self.due_rel = due[due < horizon_s]
        n = self.due_rel.shape[0]
        self.n = n
        self.sent_at = np.full(n, np.nan)
        self.done_at = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int8)
        self.version = np.full(n, -1, dtype=np.int64)
        # From the reply's timings_us (ms): admission to answer in the broker, the queue waits, the stages' service.
        self.broker_ms = np.full(n, np.nan)
        self.wait_ms = np.full(n, np.nan)
        self.service_ms = np.full(n, np.nan)
        self.codes = collections.Counter()
        self.id_base = int(rng.integers(1, 2 ** 20)) << 32   # a stale reply of another run is ignored
        self.stop_at = math.inf
        self.phase = "warm-up"
        self.t0 = None
        self.horizon_reached = False
        self.sock = load_socket(endpoint)

    def close(self):
        self.sock.close(0)

    def encode(self, k):
        tr = self.trace
        r = k % len(tr)
        a, b = tr.offsets[r], tr.offsets[r + 1]
        return [b""] + protocol.encode_request(
            "score", id=self.id_base | k, pipeline=self.pipeline, user=int(tr.users[r]), item_ids=tr.items[a:b],
            recall_scores=tr.recall[a:b], top_k=self.top_k, deadline_ms=self.deadline_ms)

    def run(self, t0, progress=None):
        """Send until ``stop_at`` (or the horizon), then wait for every reply or its loss; return."""
        self.t0 = t0
        due = t0 + self.due_rel
        n, sock = self.n, self.sock
        frames = collections.deque()
        encoded = 0
        k = 0
        pending = 0
        lost_after_s = self.deadline_ms / 1000.0 + 1.0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        mask = (1 << 32) - 1
        last_shown = 0.0
        while True:
            now = time.monotonic()
            while k < n and due[k] <= now and due[k] < self.stop_at:
                if not frames:
                    frames.append(self.encode(encoded))
                    encoded += 1
                sock.send_multipart(frames.popleft(), copy=True)
                self.sent_at[k] = now
                k += 1
                pending += 1
            sending = k < n and due[k] < self.stop_at
            if sending:
                # Encode ahead a few at a time, only when the next send is not due yet.
                while encoded < min(n, k + ENCODE_AHEAD) and due[k] - time.monotonic() > 0.001:
                    frames.append(self.encode(encoded))
                    encoded += 1
                timeout = max(0, math.ceil((due[k] - time.monotonic()) * 1000))
                timeout = min(timeout, 50)   # stop_at may move while we wait
            else:
                timeout = 20
            if poller.poll(timeout):
                rnow = time.monotonic()
                for rid, h in drain_replies(sock):
                    if rid & ~mask != self.id_base:
                        continue
                    i = rid & mask
                    if i >= n or self.status[i] != 0:
                        continue   # unknown, or answered after it was counted lost
                    pending -= 1
                    self.done_at[i] = rnow
                    if h.get("status") == "ok":
                        self.status[i] = 1
                        v = (h.get("model_versions") or {}).get(self.model)
                        if v is not None:
                            self.version[i] = int(v)
                        tm = h.get("timings_us") or {}
                        if "total" in tm:
                            self.broker_ms[i] = tm["total"] / 1000.0
                            self.wait_ms[i] = sum(x for key, x in tm.items() if key.startswith("wait_")) / 1000.0
                            self.service_ms[i] = sum(x for key, x in tm.items()
                                                     if key != "total" and not key.startswith("wait_")) / 1000.0
                    else:
                        self.status[i] = 2
                        self.codes[h.get("code", "?")] += 1
            now = time.monotonic()
            if not sending:
                if k >= n and self.stop_at == math.inf:
                    self.horizon_reached = True
                late = (self.status[:k] == 0) & (now - self.sent_at[:k] > lost_after_s)
                if late.any():
                    self.status[:k][late] = 3
                    pending -= int(late.sum())
                if pending <= 0:
                    self.status[k:] = 4
                    break
            if progress is not None and now - last_shown >= 0.5:
                last_shown = now
                st = self.status[:k]
                progress(f"t {now - t0:6.1f} s  {self.phase:<34} sent {k:>6}  ok {int((st == 1).sum()):>6}  "
                         f"errors {int((st == 2).sum())}  lost {int((st == 3).sum())}")


# ----------------------------------------------------------------------------
# The reloads, in a thread beside the load


class ReloadDriver(threading.Thread):
    """Publishes the staged versions one after another and times each switch through the control socket.

    A reload is complete when the new version serves and the old one is
    ``standby`` (released). On any failure or timeout the load is stopped
    (``loop.stop_at`` = now) and ``error`` says why; ``cancel`` stops the
    driver (the load loop failed or was interrupted).
    """

    def __init__(self, loop, run_dir, models_dir, model, serving, staged, first_publish_at, *, gap_s, after_s,
                 reload_timeout_s, sampler=None, max_other_cores=None, settle_s=0.0):
        super().__init__(name="reload-driver", daemon=True)
        self.loop = loop
        self.run_dir = run_dir
        self.models_dir = models_dir
        self.model = model
        self.serving = serving
        self.staged = list(staged)          # [(version, staged path)]
        self.first_publish_at = first_publish_at
        self.gap_s = gap_s
        self.after_s = after_s
        self.reload_timeout_s = reload_timeout_s
        self.sampler = sampler
        self.max_other_cores = max_other_cores
        self.settle_s = settle_s
        self.reloads = []
        self.error = None
        self.cancel = threading.Event()

    def run(self):
        try:
            self.drive()
        except Exception as e:   # any failure ends the load: never leave it running on its own
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, ReloadFailed) else str(e)
            self.loop.stop_at = min(self.loop.stop_at, time.monotonic())
            self.loop.phase = "stopped: " + self.error[:60]

    def wait_for_quiet(self, n):
        """With ``max_other_cores``: wait (at most ``settle_s``) until the other load of the last second is
        below it. Returns the seconds waited, or None when cancelled."""
        if self.max_other_cores is None or self.sampler is None:
            return 0.0
        t = time.monotonic()
        while time.monotonic() - t < self.settle_s:
            now = time.monotonic()
            other = self.sampler.other_cores(now - 1.0, now)
            if other is not None and other <= self.max_other_cores:
                break
            self.loop.phase = f"reload {n}: waiting, other load {other} cores"
            if self.cancel.wait(0.5):
                return None
        return round(time.monotonic() - t, 1)

    def versions(self):
        from jizhi import control
        try:
            summary = control.call(self.run_dir, "models", timeout_s=5.0)
        except (ConnectionError, control.ControlError) as e:
            raise ReloadFailed(f"jizhid stopped answering on its control socket: {e}") from e
        return {v["version"]: v for v in summary[self.model]["versions"]}

    def drive(self):
        from jizhi.tools.demo import publish
        t_next = self.first_publish_at
        old = self.serving
        for n, (version, staged) in enumerate(self.staged, 1):
            if self.cancel.wait(max(0.0, t_next - time.monotonic())):
                return
            # The steady window (before the first publish) must stay as long as asked: only later
            # reloads wait for a quiet machine.
            waited = self.wait_for_quiet(n) if n > 1 else 0.0
            if waited is None:
                return
            self.loop.phase = f"reload {n}: v{old} -> v{version} published"
            publish(staged, self.models_dir)
            t_rename = time.monotonic()
            rec = {"reload": n, "from": old, "to": version, "t_rename": t_rename, "t_rename_wall": time.time(),
                   "quiet_wait_s": waited,
                   "t_serving_seen": None, "t_released": None, "states_seen": []}
            self.reloads.append(rec)
            end = t_rename + self.reload_timeout_s
            while True:
                if self.cancel.wait(POLL_S):
                    return
                now = time.monotonic()
                vs = self.versions()
                new, prev = vs.get(version), vs.get(old)
                state = new["state"] if new else "not seen"
                if not rec["states_seen"] or rec["states_seen"][-1][1] != state:
                    rec["states_seen"].append((round(now - t_rename, 3), state))
                    self.loop.phase = f"reload {n}: v{old} -> v{version} {state}"
                if state in NOT_SERVABLE:
                    raise ReloadFailed(f"reload {n}: version {version} {state}: {new.get('error')}")
                if state == "serving" and rec["t_serving_seen"] is None:
                    rec["t_serving_seen"] = now
                if state == "serving" and prev is not None and prev["state"] == "standby":
                    rec["t_released"] = now
                    rec["server"] = new
                    break
                if now > end:
                    raise ReloadFailed(f"reload {n}: version {version} not serving with version {old} released "
                                       f"within {self.reload_timeout_s:g} s (new: {state}, old: "
                                       f"{prev['state'] if prev else 'gone'})")
            self.loop.phase = f"reload {n}: v{version} serving, v{old} released"
            old = version
            t_next = rec["t_released"] + RELEASE_TAIL_S + self.gap_s
        self.loop.phase = f"after: v{old} serving"
        self.loop.stop_at = self.reloads[-1]["t_released"] + self.after_s


# ----------------------------------------------------------------------------
# Analysis


def latency_stats(loop, a, b):
    """Latency (ms, from the intended send time) of the requests intended in [a, b) (monotonic)."""
    due = loop.t0 + loop.due_rel
    sel = (due >= a) & (due < b) & (loop.status != 4)
    st = loop.status[sel]
    ok = st == 1
    lat = (loop.done_at[sel][ok] - due[sel][ok]) * 1000.0
    lag = (loop.sent_at[sel] - due[sel]) * 1000.0
    out = {"from_s": round(a - loop.t0, 3), "to_s": round(b - loop.t0, 3), "requests": int(sel.sum()),
           "ok": int(ok.sum()), "errors": int((st == 2).sum()), "lost": int((st == 3).sum())}
    if lat.shape[0]:
        p = np.percentile(lat, [50, 99, 99.9])
        out.update(p50_ms=round(float(p[0]), 2), p99_ms=round(float(p[1]), 2), p99_9_ms=round(float(p[2]), 2),
                   max_ms=round(float(lat.max()), 2))
    else:
        out.update(p50_ms=None, p99_ms=None, p99_9_ms=None, max_ms=None)
    out["send_lag_p99_ms"] = round(float(np.percentile(lag, 99)), 2) if lag.shape[0] else None
    # Where the time of the slowest 1 % went: mean of each part over the requests at or above the p99.
    if lat.shape[0]:
        tail = lat >= np.percentile(lat, 99)
        parts = {"broker": loop.broker_ms[sel][ok], "queue_wait": loop.wait_ms[sel][ok],
                 "service": loop.service_ms[sel][ok]}
        parts["outside_broker"] = lat - parts["broker"]
        out["p99_tail_parts_ms"] = {k: (round(float(np.nanmean(v[tail])), 2) if np.isfinite(v[tail]).any()
                                        else None) for k, v in parts.items()}
    return out


def slowest(loop, a, b, t_ref, count=10):
    """The ``count`` slowest OK requests intended in [a, b): [s after t_ref, latency, broker, queue wait,
    service (ms), version]."""
    due = loop.t0 + loop.due_rel
    idx = np.nonzero((due >= a) & (due < b) & (loop.status == 1))[0]
    lat = (loop.done_at[idx] - due[idx]) * 1000.0
    top = idx[np.argsort(lat)[::-1][:count]]
    def r1(x):
        return None if not np.isfinite(x) else round(float(x), 1)
    return [[round(float(due[i] - t_ref), 3), r1((loop.done_at[i] - due[i]) * 1000.0), r1(loop.broker_ms[i]),
             r1(loop.wait_ms[i]), r1(loop.service_ms[i]), int(loop.version[i])] for i in top]


def timeline(loop):
    """Per TIMELINE_BUCKET_S of intended send time: [start s, requests, p50 ms, p99 ms, max ms]."""
    ok = loop.status == 1
    t = loop.due_rel[ok]
    lat = (loop.done_at[ok] - (loop.t0 + loop.due_rel[ok])) * 1000.0
    out = []
    if not t.shape[0]:
        return out
    b = np.floor(t / TIMELINE_BUCKET_S).astype(np.int64)
    for k in range(int(b.max()) + 1):
        x = lat[b == k]
        if x.shape[0]:
            p = np.percentile(x, [50, 99])
            out.append([round(k * TIMELINE_BUCKET_S, 1), int(x.shape[0]), round(float(p[0]), 1),
                        round(float(p[1]), 1), round(float(x.max()), 1)])
    return out


def _mib(v):
    return None if v is None else round(float(v) / MIB, 1)


def memory_window(sampler, a, b, t_ref=None, how="median"):
    """PSS, RSS, anonymous RSS and /dev/shm (MiB) over [a, b): the median, or the peak (with its time)."""
    t, rss, anon, shm = sampler.series(a, b)
    ps, pss = sampler.pss_series(a, b)
    if not rss.shape[0]:
        return None
    if how == "median":
        out = {"pss_mib": _mib(np.median(pss)) if pss.shape[0] else None, "rss_mib": _mib(np.median(rss)),
               "anon_mib": _mib(np.median(anon)), "shm_mib": _mib(np.median(shm)),
               "samples": int(rss.shape[0]), "pss_samples": int(pss.shape[0])}
        return out
    i = int(np.argmax(rss))
    out = {"rss_mib": _mib(rss[i]), "rss_at_s": round(float(t[i] - t_ref), 2), "anon_mib": _mib(anon.max()),
           "shm_mib": _mib(shm.max()), "pss_mib": None, "pss_at_s": None, "pss_by_role_mib": None,
           "processes_max": max(len(x["procs"]) for x in sampler.samples if a <= x["t"] < b)}
    if pss.shape[0]:
        j = int(np.argmax(pss))
        roles = collections.defaultdict(float)
        for role, p, _ in ps[j]["procs"].values():
            roles[role] += p
        out.update(pss_mib=_mib(pss[j]), pss_at_s=round(float(ps[j]["t"] - t_ref), 2),
                   pss_by_role_mib={r: _mib(v) for r, v in sorted(roles.items())})
    return out


def analyse(loop, sampler, driver, conditions):
    t0 = loop.t0
    first = driver.reloads[0]["t_rename"] if driver.reloads else loop.stop_at
    steady_a = t0 + WARMUP_S
    steady = latency_stats(loop, steady_a, first)
    steady["other_cores"] = sampler.other_cores(steady_a, first)
    steady_mem = memory_window(sampler, steady_a, first)
    reloads, pooled = [], np.zeros(loop.n, dtype=bool)
    due = t0 + loop.due_rel
    off = time.time() - time.monotonic()
    for k, r in enumerate(driver.reloads):
        done = r["t_released"] is not None
        a = r["t_rename"]
        b = (r["t_released"] + RELEASE_TAIL_S) if done else loop.stop_at
        pooled |= (due >= a) & (due < b)
        out = {"reload": r["reload"], "from": r["from"], "to": r["to"], "complete": done,
               "rename_s": round(a - t0, 3), "states_seen": r["states_seen"], "window": latency_stats(loop, a, b)}
        out["window"]["other_cores"] = sampler.other_cores(a, b)
        server = r.get("server") or {}
        t_serving = (server["serving_since"] - off) if server.get("serving_since") else r["t_serving_seen"]
        if done:
            # Sub-phases of loading from the server's timeline: rename -> validated (detection and the
            # validation child), -> the new workers ready (process start and stage setup), -> serving (warm-up).
            tm = server.get("timings_ms") or {}
            t_valid = a + ((tm.get("detection") or 0) + (tm.get("validation") or 0)) / 1000.0
            t_ready = min(t_valid + (tm.get("ready") or 0) / 1000.0, t_serving)
            out["phases"] = {
                "loading": latency_stats(loop, a, t_serving),
                "validating": latency_stats(loop, a, t_valid),
                "starting": latency_stats(loop, t_valid, t_ready),
                "warming": latency_stats(loop, t_ready, t_serving),
                "draining": latency_stats(loop, t_serving, r["t_released"]),
                "released": latency_stats(loop, r["t_released"], b)}
            for ph in out["phases"].values():
                lo, hi = t0 + ph["from_s"], t0 + ph["to_s"]
                if hi - lo >= 0.3:   # shorter than a few samples says nothing about CPU
                    ph["cpu_cores_by_role"] = {role: round(c / (hi - lo), 2) for role, c in
                                               sorted(sampler.cpu_by_role(lo, hi).items())}
                    ph["cpu_cores_by_role"]["(bench)"] = sampler.own_cores(lo, hi)
                    ph["cpu_cores_by_role"]["(other)"] = sampler.other_cores(lo, hi)
            out["timeline_ms"] = {
                "server": server.get("timings_ms"),
                "rename_to_serving": round((t_serving - a) * 1000, 1),
                "rename_to_released": round((r["t_released"] - a) * 1000, 1),
                "rename_ctime_vs_measured": round((server["renamed_at"] - r["t_rename_wall"]) * 1000, 1)
                if server.get("renamed_at") else None}
            answered = (loop.version == r["to"]) & (loop.status == 1)
            out["timeline_ms"]["rename_to_first_answer"] = (
                round(float((np.min(loop.done_at[answered]) - a) * 1000), 1) if answered.any() else None)
        wall = max(b - a, 1e-9)
        out["cpu_cores_by_role"] = {role: round(s / wall, 3) for role, s in
                                    sorted(sampler.cpu_by_role(a, b).items())}
        out["memory"] = {"peak": memory_window(sampler, a, b, t_ref=a, how="peak")}
        after_b = driver.reloads[k + 1]["t_rename"] if k + 1 < len(driver.reloads) else loop.stop_at
        if done and after_b > b:
            out["memory"]["after_release"] = memory_window(sampler, b, after_b)
            out["between"] = latency_stats(loop, b, after_b)
        out["slowest"] = slowest(loop, a, b, a)
        out["nice_at_rename"] = sampler.nice_at(a)
        out["nice_at_window_end"] = sampler.nice_at(b)
        out["quiet_wait_s"] = r.get("quiet_wait_s")
        reloads.append(out)
    if pooled.any():
        sel = pooled & (loop.status == 1)
        lat = (loop.done_at[sel] - due[sel]) * 1000.0
        p = np.percentile(lat, [50, 99, 99.9]) if lat.shape[0] else [None] * 3
        st = loop.status[pooled & (loop.status != 4)]
        switch = {"requests": int(st.shape[0]), "ok": int((st == 1).sum()), "errors": int((st == 2).sum()),
                  "lost": int((st == 3).sum()), "p50_ms": round(float(p[0]), 2) if lat.shape[0] else None,
                  "p99_ms": round(float(p[1]), 2) if lat.shape[0] else None,
                  "p99_9_ms": round(float(p[2]), 2) if lat.shape[0] else None,
                  "max_ms": round(float(lat.max()), 2) if lat.shape[0] else None,
                  "seconds": round(sum(r["window"]["to_s"] - r["window"]["from_s"] for r in reloads), 2)}
    else:
        switch = None
    last = driver.reloads[-1] if driver.reloads else None
    after = None
    if last is not None and last["t_released"] is not None and loop.stop_at > last["t_released"] + RELEASE_TAIL_S:
        after = latency_stats(loop, last["t_released"] + RELEASE_TAIL_S, loop.stop_at)
        after["other_cores"] = sampler.other_cores(last["t_released"] + RELEASE_TAIL_S, loop.stop_at)
    ratio = None
    if switch and switch["p99_ms"] and steady["p99_ms"]:
        ratio = round(switch["p99_ms"] / steady["p99_ms"], 3)
    # A second reference with more samples: every request after the warm-up outside the switch windows
    # (steady, the gaps between reloads, after): on a noisy machine 20 s of steady state is one draw.
    outside = (due >= steady_a) & (due < loop.stop_at) & ~pooled & (loop.status == 1)
    lat_out = (loop.done_at[outside] - due[outside]) * 1000.0
    elsewhere = None
    if lat_out.shape[0]:
        p = np.percentile(lat_out, [50, 99])
        elsewhere = {"requests": int(lat_out.shape[0]), "p50_ms": round(float(p[0]), 2),
                     "p99_ms": round(float(p[1]), 2),
                     "p99_ratio": round(switch["p99_ms"] / float(p[1]), 3) if switch and switch["p99_ms"] else None}
    for r in reloads:
        w = r["window"]
        r["p99_ratio"] = round(w["p99_ms"] / steady["p99_ms"], 3) if w["p99_ms"] and steady["p99_ms"] else None
        pk = r["memory"]["peak"]
        if pk and steady_mem:
            r["memory"]["peak_extra"] = {
                k: (round(pk[k] - steady_mem[k], 1) if pk.get(k) is not None and steady_mem.get(k) is not None
                    else None) for k in ("pss_mib", "rss_mib", "anon_mib", "shm_mib")}
    extras = [r["memory"].get("peak_extra") for r in reloads if r["memory"].get("peak_extra")]
    st_all = loop.status[loop.status != 4]
    return {
        **conditions,
        "steady": steady, "switch": switch, "after": after, "outside_switch_windows": elsewhere, "reloads": reloads,
        "p99_ratio": ratio, "target_ratio": 1.5, "target_met": bool(ratio is not None and ratio <= 1.5),
        "requests": int(st_all.shape[0]), "errors": dict(loop.codes), "lost": int((st_all == 3).sum()),
        "memory": {"baseline": steady_mem,
                   "peak_extra_max": {k: max((e[k] for e in extras if e.get(k) is not None), default=None)
                                      for k in ("pss_mib", "rss_mib", "anon_mib", "shm_mib")} if extras else None},
        "sampler": {"samples": len(sampler.samples), "pss_samples": len(sampler.pss),
                    "cpu_s": round(sampler.cpu_s, 3),
                    "cpu_cores": round(sampler.cpu_s / max(loop.stop_at - t0, 1e-9), 3)
                    if loop.stop_at != math.inf else None},
        "error": driver.error or ("the load horizon was reached before the reloads completed"
                                  if loop.horizon_reached else None),
        "latency_timeline": timeline(loop),
    }


# ----------------------------------------------------------------------------
# Report


def _f(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def print_report(r, out):
    out(f"bench-reload: {r['model']} v{' -> v'.join(map(str, r['versions']))} on {r['endpoint']} "
        f"({r['pipeline']}), {r['rate']:g} req/s offered (Poisson), {r['candidates_mean']:.0f} candidates/request")
    out("")
    out("latency from the intended send time, OK replies (ms)")
    out(f"  {'window':<40}{'span s':>13}{'requests':>9}{'p50':>8}{'p99':>8}{'max':>8}{'err':>5}{'lost':>5}"
        f"{'send lag p99':>14}{'other cores':>13}")

    def row(name, w):
        if w is None:
            return
        out(f"  {name:<40}{w['from_s']:>6.1f}-{w['to_s']:<6.1f}{w['requests']:>9}{_f(w['p50_ms']):>8}"
            f"{_f(w['p99_ms']):>8}{_f(w['max_ms']):>8}{w['errors']:>5}{w['lost']:>5}{_f(w['send_lag_p99_ms'], 2):>14}"
            f"{_f(w.get('other_cores'), 2):>13}")
    row("steady", r["steady"])
    for x in r["reloads"]:
        row(f"reload {x['reload']}: v{x['from']} -> v{x['to']} switch window", x["window"])
        for ph, label in (("validating", "validating (rename -> valid)"),
                          ("starting", "new workers start (-> ready)"), ("warming", "warm-up, hot tier (-> serving)"),
                          ("draining", "draining (serving -> released)"), ("released", "released + 1 s")):
            if x.get("phases"):
                row("    " + label, x["phases"][ph])
    row("after the last release", r["after"])
    s = r["switch"]
    if s:
        out(f"  {'all switch windows pooled':<40}{s['seconds']:>9.1f} s  {s['requests']:>9}{_f(s['p50_ms']):>8}"
            f"{_f(s['p99_ms']):>8}{_f(s['max_ms']):>8}{s['errors']:>5}{s['lost']:>5}")
    ratio = r["p99_ratio"]
    out(f"  switch p99 / steady p99 = {_f(ratio, 2)} (target <= 1.5: {'met' if r['target_met'] else 'MISSED'}); "
        f"per reload: {', '.join(_f(x['p99_ratio'], 2) for x in r['reloads'])}; "
        f"errors {sum(r['errors'].values())} {r['errors'] or ''} lost {r['lost']} of {r['requests']} requests")
    e = r.get("outside_switch_windows")
    if e:
        out(f"  every request outside the switch windows (steady, gaps, after; {e['requests']}): p50 {_f(e['p50_ms'])} "
            f"p99 {_f(e['p99_ms'])} ms; switch p99 / that p99 = {_f(e['p99_ratio'], 2)}")
    out("")
    out("the slowest 1 % of each window: mean ms in the broker (admission to answer: queue wait + service + "
        "the rest), and outside it (generator, sockets)")
    out(f"  {'window':<40}{'broker':>9}{'wait':>9}{'service':>9}{'outside':>9}")

    def parts(name, w):
        p = (w or {}).get("p99_tail_parts_ms")
        if p:
            out(f"  {name:<40}{_f(p['broker']):>9}{_f(p['queue_wait']):>9}{_f(p['service']):>9}"
                f"{_f(p['outside_broker']):>9}")
    parts("steady", r["steady"])
    for x in r["reloads"]:
        parts(f"reload {x['reload']} switch window", x["window"])
        for ph in ("validating", "starting", "warming", "draining", "released"):
            if x.get("phases"):
                parts("    " + ph, x["phases"][ph])
    parts("after the last release", r["after"])
    out("")
    out("nice of the workers (main thread) at the rename and at the end of each switch window:")
    for x in r["reloads"]:
        def nices(d):
            return ", ".join(f"{k} {v}" for k, v in d.items() if k.startswith("workers"))
        out(f"  reload {x['reload']}: at the rename {nices(x['nice_at_rename'])}; at the end {nices(x['nice_at_window_end'])}"
            + (f"; waited {x['quiet_wait_s']} s for a quiet machine" if x.get("quiet_wait_s") else ""))
    out("")
    out("server timeline per reload (ms): from `jizhictl models` timings_ms, and measured here")
    out(f"  {'reload':<14}{'detect':>8}{'validate':>9}{'start':>8}{'load':>8}{'ready':>8}{'warm':>8}{'switch':>8}"
        f"{'total':>8}{'-> 1st answer':>15}{'-> released':>13}")
    for x in r["reloads"]:
        tl = x.get("timeline_ms") or {}
        t = tl.get("server") or {}
        out(f"  {x['reload']}: v{x['from']}->v{x['to']:<7}{_f(t.get('detection'), 0):>8}{_f(t.get('validation'), 0):>9}"
            f"{_f(t.get('start'), 0):>8}{_f(t.get('load'), 0):>8}{_f(t.get('ready'), 0):>8}"
            f"{_f(t.get('warm_up'), 0):>8}{_f(t.get('switch'), 2):>8}{_f(t.get('total'), 0):>8}"
            f"{_f(tl.get('rename_to_first_answer'), 0):>15}{_f(tl.get('rename_to_released'), 0):>13}")
    out("")
    m = r["memory"]["baseline"] or {}
    out("memory of jizhid and its children (MiB): PSS counts a shared page once, RSS once per process; "
        "anon = anonymous RSS; shm = allocated /dev/shm/jizhi.<instance>.*")
    out(f"  {'':<34}{'PSS':>9}{'RSS':>9}{'anon':>9}{'shm':>7}")
    out(f"  {'baseline (steady window, median)':<34}{_f(m.get('pss_mib')):>9}{_f(m.get('rss_mib')):>9}"
        f"{_f(m.get('anon_mib')):>9}{_f(m.get('shm_mib')):>7}")
    for x in r["reloads"]:
        pk, ex = x["memory"].get("peak") or {}, x["memory"].get("peak_extra") or {}
        out(f"  {'reload ' + str(x['reload']) + ' peak':<34}{_f(pk.get('pss_mib')):>9}{_f(pk.get('rss_mib')):>9}"
            f"{_f(pk.get('anon_mib')):>9}{_f(pk.get('shm_mib')):>7}   PSS peak at +{_f(pk.get('pss_at_s'))} s, "
            f"{pk.get('processes_max')} processes at most")
        out(f"  {'  peak extra':<34}{_f(ex.get('pss_mib')):>9}{_f(ex.get('rss_mib')):>9}{_f(ex.get('anon_mib')):>9}"
            f"{_f(ex.get('shm_mib')):>7}")
        ar = x["memory"].get("after_release")
        if ar:
            out(f"  {'  after release (median)':<34}{_f(ar.get('pss_mib')):>9}{_f(ar.get('rss_mib')):>9}"
                f"{_f(ar.get('anon_mib')):>9}{_f(ar.get('shm_mib')):>7}")
        if pk.get("pss_by_role_mib"):
            out("    PSS at the peak by process: " + ", ".join(f"{k} {v:.0f}" for k, v in pk["pss_by_role_mib"].items()))
    out("")
    out("CPU in each switch window (cores), by process; and in its validating and starting phases:")
    for x in r["reloads"]:
        out(f"  reload {x['reload']}: " + ", ".join(f"{k} {v:.2f}" for k, v in x["cpu_cores_by_role"].items()))
        for ph in ("validating", "starting"):
            c = (x.get("phases") or {}).get(ph, {}).get("cpu_cores_by_role")
            if c:
                out(f"    {ph} (total {sum(v or 0 for v in c.values()):.2f}): "
                    + ", ".join(f"{k} {_f(v, 2)}" for k, v in c.items()))
    smp = r["sampler"]
    out(f"sampler: {smp['samples']} samples, {smp['pss_samples']} with PSS, its own CPU {smp['cpu_s']} s "
        f"({_f(smp['cpu_cores'], 3)} cores)")
    if r["error"]:
        out(f"INCOMPLETE: {r['error']}")


# ----------------------------------------------------------------------------
# The command


def _next_version(models_dir, model):
    base = Path(models_dir) / model
    have = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(have, default=0) + 1


@click.command("bench-reload", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default="tcp://127.0.0.1:5555", show_default=True, help="jizhid's client endpoint.")
@click.option("--run-dir", type=click.Path(file_okay=False), required=True,
              help="jizhid's run directory (control socket: version states, the supervisor's pid).")
@click.option("--models", "models_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="The model directory jizhid watches; new versions are published into it.")
@click.option("--pipeline", default="default", show_default=True, help="Pipeline to load.")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              help="Request trace (trace.npz, docs/formats.md).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="Bundle version directory to generate a trace from (with --requests).")
@click.option("--requests", type=click.IntRange(1), help="Generate a trace of this many requests from --bundle.")
@click.option("--candidates", type=click.IntRange(1), default=500, show_default=True,
              help="Candidates per request of a generated trace.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Offered load, requests/s: about 50 % of the rate `jizhictl bench --find-max` sustains.")
@click.option("--steady", "steady_s", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="Seconds of steady load measured before the first publish (after 3 s not counted).")
@click.option("--after", "after_s", type=click.FloatRange(min=2), default=10.0, show_default=True,
              help="Seconds of load after the last old version is released.")
@click.option("--reloads", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Versions published in a row, each after the previous switch completed and its old version "
                   "was released, plus --gap.")
@click.option("--gap", "gap_s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Settle seconds between a switch window's end and the next publish.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Arrivals and the new versions' dense weights (version N gets seed + N).")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Deadline sent with every request; no reply within deadline + 1 s counts as lost.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--reload-timeout", "reload_timeout_s", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Longest wait, per reload, for the new version to serve and the old to be released.")
@click.option("--sample-interval-s", type=click.FloatRange(min=0.01), default=0.1, show_default=True,
              help="Memory sampler period (RSS, CPU, /dev/shm).")
@click.option("--pss-interval-s", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Read PSS (smaps_rollup, 5-8 ms of CPU per process) this often; 0: never.")
@click.option("--max-other-cores", type=click.FloatRange(min=0), default=None,
              help="A shared machine: before the load starts, wait until other processes use at most this many "
                   "cores (at most --settle-s). Every window reports the other load it ran with.")
@click.option("--settle-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="--max-other-cores: longest wait for a quiet machine.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the results as JSON to this file ('-': stdout, the table then goes to stderr).")
@click.option("--quiet", is_flag=True, help="No progress line on stderr.")
def bench_reload_command(endpoint, run_dir, models_dir, pipeline, trace_path, bundle, requests, candidates, rate,
                         steady_s, after_s, reloads, gap_s, seed, deadline_ms, top_k, reload_timeout_s,
                         sample_interval_s, pss_interval_s, max_other_cores, settle_s, json_path, quiet):
    """Measure hot reload under load: p99 while new versions are switched in against steady p99, and the extra memory.

    Open-loop Poisson load at --rate (use about half the rate `jizhictl bench
    --find-max` sustains) for 3 s + --steady s, then --reloads new versions
    of the served demo model, each staged beforehand (a copy with new dense
    weights in MODELS/.incoming) and published by one rename once the
    previous old version was released. The switch window of a reload runs
    from the rename to 1 s after the old version is released (standby).
    Memory (RSS, PSS, /dev/shm) of jizhid and every child is sampled
    throughout. Example:

    \b
      jizhictl bench-reload --endpoint tcp://127.0.0.1:5601 --run-dir /tmp/rb/run \\
          --models /tmp/rb/models --trace trace.npz --rate 160 --json reload.json
    """
    from jizhi import control
    from jizhi.tools.bench import Progress, ServerCpu, Trace, environment, resolve_bundle, wait_for_quiet
    from jizhi.client import Client
    from jizhi.tools.demo import stage_version

    if trace_path and requests:
        raise click.UsageError("give --trace or --requests (with --bundle), not both")
    if not trace_path and not (bundle and requests):
        raise click.UsageError("give --trace FILE, or --bundle DIR with --requests N to generate one")
    out = (lambda s: click.echo(s, err=True)) if json_path == "-" else click.echo
    note = (lambda s: click.echo(s, err=True))

    # -- the daemon, its model and its processes
    try:
        status = control.call(run_dir, "status", timeout_s=5.0)
        summary = control.call(run_dir, "models", timeout_s=5.0)
    except ConnectionError as e:
        note(f"jizhictl bench-reload: jizhid is not answering on its control socket in {run_dir} ({e}); "
             "is it running, and is this its --run-dir?")
        sys.exit(1)
    try:
        with Client(endpoint, timeout_s=5.0) as c:
            info = c.info()
    except TimeoutError:
        note(f"jizhictl bench-reload: no answer from {endpoint} within 5 s: is this jizhid's frontend?")
        sys.exit(1)
    pipe = info["default_pipeline"] if pipeline == "default" else pipeline
    if pipe not in info["pipelines"]:
        raise click.UsageError(f"pipeline {pipeline!r} is not served (served: {', '.join(info['pipelines'])})")
    if not info.get("ready"):
        raise click.ClickException("jizhid is not ready (some pool has no worker)")
    if len(summary) != 1:
        raise click.ClickException(f"jizhid serves models {', '.join(summary)}: bench-reload drives one model")
    model, m = next(iter(summary.items()))
    if not m["policy"].startswith("latest"):
        raise click.ClickException(f"model {model} is {m['policy']} ({m['policy_from']}): a new version would not "
                                   "be switched in (jizhictl unpin)")
    serving = [v for v in m["versions"] if v["state"] == "serving"]
    busy = [v for v in m["versions"] if v["state"] in ("validating", "loading", "warming", "draining")]
    if len(serving) != 1 or busy:
        states = ", ".join(f"v{v['version']} {v['state']}" for v in m["versions"])
        raise click.ClickException(f"model {model} is mid-reload ({states}); wait until one version serves")
    serving = serving[0]
    source = Path(serving["path"])
    if source.resolve().parent.parent != Path(models_dir).resolve():
        raise click.UsageError(f"jizhid serves {source}, which is not in --models {models_dir}")
    instance, sup_pid = status["instance"], status["pid"]

    tmp = None
    if not trace_path:
        import tempfile

        from jizhi.tools.demo import generate_trace
        tmp = tempfile.NamedTemporaryFile(prefix="jizhi-trace-", suffix=".npz", delete=False)
        tmp.close()
        trace_path = tmp.name
        generate_trace(str(resolve_bundle(bundle)), trace_path, requests=requests, candidates=candidates,
                       progress=not quiet)
    staged = []
    try:
        trace = Trace(trace_path)
        env = environment()
        # -- stage every version before the load (copy + sha256 of ~66 MB each)
        first_version = _next_version(models_dir, model)
        for k in range(reloads):
            v = first_version + k
            t = time.monotonic()
            staged.append((v, stage_version(models_dir, source, v, seed=seed + v)))
            note(f"staged {model} version {v} from version {serving['version']} (dense weights seed {seed + v}) "
                 f"in {time.monotonic() - t:.1f} s")
        horizon_s = (WARMUP_S + steady_s + after_s + 10.0
                     + reloads * (reload_timeout_s + RELEASE_TAIL_S + gap_s + (settle_s if max_other_cores is not None else 0)))
        loop = OpenLoop(endpoint, trace, pipeline=pipe, model=model, rate=rate, seed=seed, horizon_s=horizon_s,
                        deadline_ms=deadline_ms, top_k=top_k)
        expected = rate * (WARMUP_S + steady_s + reloads * (10.0 + RELEASE_TAIL_S + gap_s) + after_s)
        if expected > len(trace):
            note(f"note: the trace has {len(trace)} requests; about {expected:.0f} will be sent, so requests repeat")
        # The steady window must not hold the boot's own loading work (the hot tier of the serving
        # version is built by a child after jizhid reports ready): wait until only the supervisor, the
        # broker and the serving version's workers run.
        idle_by = time.monotonic() + 120.0
        probe = MemorySampler(sup_pid, instance)
        while True:
            extra = probe.roles_now() - {"supervisor", "broker", f"workers v{serving['version']}"}
            if not extra:
                break
            if time.monotonic() > idle_by:
                raise click.ClickException(f"jizhid still runs {', '.join(sorted(extra))} after 120 s; "
                                           "start when it has finished loading")
            note(f"waiting for jizhid to finish its own loading work ({', '.join(sorted(extra))})")
            time.sleep(2.0)
        quiet_wait = None
        if max_other_cores is not None:
            quiet_wait = wait_for_quiet(max_other_cores, settle_s, ServerCpu(run_dir), note)
        sampler = MemorySampler(sup_pid, instance, sample_interval_s, pss_interval_s)
        t0 = time.monotonic() + 0.2
        driver = ReloadDriver(loop, run_dir, models_dir, model, serving["version"], staged,
                              t0 + WARMUP_S + steady_s, gap_s=gap_s, after_s=after_s,
                              reload_timeout_s=reload_timeout_s, sampler=sampler,
                              max_other_cores=max_other_cores, settle_s=settle_s)
        note(f"load: {rate:g} req/s on {pipe}; steady {steady_s:g} s after {WARMUP_S:g} s, then {reloads} reloads "
             f"(v{first_version}..v{first_version + reloads - 1}), {after_s:g} s after the last")
        progress = Progress(not quiet)
        sampler.start()
        driver.start()
        try:
            loop.run(t0, progress=lambda s: progress.show(s))
        finally:
            driver.cancel.set()
            loop.stop_at = min(loop.stop_at, time.monotonic())
            driver.join(timeout=10.0)
            sampler.stop()
            sampler.join(timeout=10.0)
            loop.close()
            progress.show("", force=True)
            progress.done()
        conditions = {"environment": env, "command": sys.argv, "endpoint": endpoint, "pipeline": pipe,
                      "model": model, "versions": [serving["version"]] + [v for v, _ in staged[:len(driver.reloads)]],
                      "rate": rate, "steady_s": steady_s, "warmup_s": WARMUP_S, "after_s": after_s,
                      "gap_s": gap_s, "reloads_asked": reloads, "seed": seed, "deadline_ms": deadline_ms,
                      "top_k": top_k, "trace": str(trace_path), "trace_requests": len(trace),
                      "candidates_mean": trace.mean_candidates(),
                      "distinct_requests": bool(int((loop.status != 4).sum()) <= len(trace)),
                      "instance": instance, "supervisor_pid": sup_pid,
                      "sample_interval_s": sample_interval_s, "pss_interval_s": pss_interval_s,
                      "waited_for_quiet": quiet_wait}
        result = analyse(loop, sampler, driver, conditions)
    finally:
        for v, path in staged:
            if os.path.isdir(path):     # staged but never published (an early stop)
                shutil.rmtree(path, ignore_errors=True)
        if tmp is not None:
            os.unlink(tmp.name)
    print_report(result, out)
    if json_path:
        text = json.dumps(result, indent=1)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")
            note(f"results written to {json_path}")
    if result["error"]:
        raise click.ClickException(f"the run did not complete: {result['error']}")


if __name__ == "__main__":
    bench_reload_command(prog_name="python -m jizhi.tools.reloadbench")
