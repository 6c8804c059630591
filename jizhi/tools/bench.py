"""The load generator and the ceiling: ``jizhictl bench`` (``bench_command``).

Runs in its own process (the operator's shell), never inside jizhid. Two
modes (one concept: offering load and reading what came back; over 700 lines
because the ceiling, the sweep report and the plot live beside the generator;
issue 18 moves the offline tools out of ``jizhi/`` and keeps one open-loop
generator for bench, reloadbench and shedbench):

* **load** (default): replays a request trace (docs/formats.md, "Trace")
  against a running jizhid over one ZeroMQ DEALER socket, open loop (several
  comma-separated endpoints: the socket connects to each and ZeroMQ spreads
  the requests round-robin over the nodes connected; nothing is retried, a
  request sent to a node that dies is counted lost): the
  arrivals of a point are a Poisson process at the offered rate (a fixed
  number ``rate x duration`` of arrival times drawn uniformly over the
  window and sorted, i.e. a Poisson process conditioned on its count), all
  request frames are encoded before the point starts, and as many requests
  are in flight as the arrivals make. Latency is measured from each
  request's *intended* send time, so a generator or server that falls behind
  is charged for it (no coordinated omission). A point is ``--warmup``
  seconds of the same arrival process (not counted) followed by
  ``--duration`` seconds that are counted, then a drain: every measured
  request is answered, or counted *lost* when no reply came within its
  deadline + 1 s of being sent.
* **ceiling** (``--ceiling``): the same trace through the same bundle
  in-process, with nothing between the stages: the five stage processors of
  the demo pipeline run back to back in one process per core (spawned,
  pinned to its core, onnxruntime on one thread), with the profiles copied
  into RAM and the cube loaded whole into a ``RamTable``, closed loop. It is
  the machine's limit for the work (the same work minus LMDB, mmap, sockets
  and shared memory), the figure jizhi's throughput is compared to.

The benchmark rule (docs/benchmarks.md): each rate point runs at least 20 s
with zero errors, latency is measured from the intended send time, and the
trace is long enough that no request repeats within a point. The trace must
therefore hold at least ``rate x duration`` requests; the command refuses a
shorter one unless ``--allow-repeat``.

Definitions used in the output (per point, over the measured window):

* offered rate: requests sent per second (and candidate pairs per second);
* goodput: candidates that received a model score in OK replies, per second
  (``n x (1 - shed_ratio)`` per reply); ``in_slo_pairs_s`` counts only OK
  replies within ``--slo-ms``;
* latency p50 / p99 / p99.9 of OK replies, from the intended send time;
* errors by wire code, ``lost`` (no reply within deadline + 1 s), and the
  generator's send lag (how late it sent, a validity check);
* the mean of each ``timings_us`` key of the OK replies (stage service
  times, ``wait_<group>`` queue waits, ``total`` in the broker);
* with ``--cpu``: the CPU time of every process of the jizhid run (found in
  /proc by the run directory's plan file), per process kind, as ms per
  second and microseconds per answered request, and the generator's own.

A point passes when p99 <= ``--slo-ms``, no error and nothing lost.
``--find-max`` doubles the rate from ``--start-rate`` until a point fails,
then bisects between the best pass and the first failure until they are
within ``--precision`` of each other; a point certain to fail (an error, or
more than 1 % of its requests over the SLO) stops early.

On a shared machine, ``--max-other-cores X`` waits before each point (at
most ``--settle-s``) until other processes use at most X cores (measured
from /proc/stat minus this generator and the jizhid run), and runs a point
that *failed* while other processes used more than X again (``--retries``
times); every point records ``other_cores``. The ceiling does the same and
keeps its fastest run.

``--plot FILE.png`` draws the load points (matplotlib, the ``plot`` extra:
``pip install 'jizhi[plot]'``): latency p50 / p99 / p99.9 with the SLO, and
goodput (OK replies/s) against the offered rate (``plot_sweep``).
"""
import collections
import datetime
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click
import msgpack
import numpy as np
import zmq

from jizhi import protocol
from jizhi.config import default_run_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")


def load_socket(endpoint, ctx=None):
    """A load generator's DEALER: no linger, no high-water mark (the generator's own queue is the
    load), connected to every node of ``endpoint`` (comma-separated). With several nodes it queues
    only on connected ones (IMMEDIATE), so a dead node takes no more requests; send with NOBLOCK
    then, so that a send with every node gone fails at once instead of blocking."""
    from jizhi.client import split_endpoints
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
RULE_MIN_DURATION_S = 20.0
PROGRESS_INTERVAL_S = 0.5
ID_BITS = 32  # a request id is (point number << ID_BITS) | index within the point


# ----------------------------------------------------------------------------
# Trace and bundle


class Trace:
    """A request trace (docs/formats.md): ``users`` uint64 [Q], ``offsets``
    int64 [Q+1], ``items`` uint64, ``recall_scores`` float32."""

    def __init__(self, path):
        self.path = str(path)
        if not zipfile.is_zipfile(path):
            raise click.BadParameter(f"{path} is not a request trace (not an .npz file; jizhictl demo trace or "
                                     "jizhictl record writes one, docs/formats.md)", param_hint="--trace")
        try:
            with np.load(path, allow_pickle=False) as data:
                self.users = np.ascontiguousarray(data["users"], dtype=np.uint64)
                self.offsets = np.ascontiguousarray(data["offsets"], dtype=np.int64)
                self.items = np.ascontiguousarray(data["items"], dtype="<u8")
                self.recall = np.ascontiguousarray(data["recall_scores"], dtype="<f4")
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:    # exit 2, one line, no traceback
            raise click.BadParameter(f"{path} is not a request trace (an .npz of users, offsets, items and "
                                     f"recall_scores, docs/formats.md): {e}", param_hint="--trace") from None
        if self.offsets.shape[0] != self.users.shape[0] + 1 or self.offsets[-1] != self.items.shape[0]:
            raise click.BadParameter(f"trace {path}: offsets do not match users and items", param_hint="--trace")
        self.counts = np.diff(self.offsets)

    def __len__(self):
        return self.users.shape[0]

    def mean_candidates(self):
        return float(self.counts.mean()) if len(self) else 0.0


def resolve_bundle(path):
    """A bundle version directory from ``path``: the version directory itself,
    a model directory (``<models>/<name>``: its newest version) or a directory
    holding ``models/<name>/`` (the demo layout; one model)."""
    from jizhi.bundle import find_version
    p = Path(path)
    if (p / "manifest.toml").is_file():
        return p
    if any(c.name.isdigit() for c in p.iterdir()) if p.is_dir() else False:
        return find_version(p.parent, p.name)
    models = p / "models"
    if models.is_dir():
        names = [c.name for c in models.iterdir() if c.is_dir() and not c.name.startswith(".")]
        if len(names) == 1:
            return find_version(models, names[0])
    raise click.BadParameter(f"{path} is not a bundle version directory (no manifest.toml)", param_hint="--bundle")


# ----------------------------------------------------------------------------
# CPU accounting of a jizhid run, from /proc


def _read(path, mode="rb"):
    try:
        with open(path, mode) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def proc_cpu_s(pid):
    """(cpu seconds (utime + stime), ppid) of ``pid``, or None when it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    # After the command: state(3) ppid(4) ... utime(14) stime(15).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[1])


class ServerCpu:
    """Finds the processes of one jizhid run and reads their CPU time.

    The broker and the workers are the processes started with ``--plan
    <run_dir>/plan.msgpack``; the supervisor is the broker's parent. Kinds:
    ``supervisor``, ``broker``, ``<pipeline>/<group>`` (all wids of a group
    summed). A worker that restarts between two snapshots is counted from
    its new start (the CPU of the dead one after the first snapshot is lost).
    """

    def __init__(self, run_dir):
        self.plan = os.path.realpath(os.path.join(run_dir, "plan.msgpack"))

    def processes(self):
        """{pid: kind} of the run's live processes."""
        found, broker_ppid = {}, None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            raw = _read(f"/proc/{entry}/cmdline")
            if not raw:
                continue
            args = raw.decode(errors="replace").rstrip("\0").split("\0")
            if "--plan" not in args:
                continue
            i = args.index("--plan")
            if i + 1 >= len(args):
                continue
            plan = args[i + 1]
            if not os.path.isabs(plan):
                try:
                    plan = os.path.join(os.readlink(f"/proc/{entry}/cwd"), plan)
                except OSError:
                    continue
            if os.path.realpath(plan) != self.plan:
                continue
            pid = int(entry)
            if "jizhi.broker" in args:
                found[pid] = "broker"
                st = proc_cpu_s(pid)
                broker_ppid = st[1] if st else None
            elif "jizhi.workers.run" in args:
                def arg(name):
                    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else "?"
                found[pid] = f"{arg('--pipeline')}/{arg('--group')}"
        if broker_ppid and broker_ppid > 1:
            found[broker_ppid] = "supervisor"
        return found

    def snapshot(self):
        """{pid: (kind, cpu seconds)} now."""
        snap = {}
        for pid, kind in self.processes().items():
            st = proc_cpu_s(pid)
            if st is not None:
                snap[pid] = (kind, st[0])
        return snap

    @staticmethod
    def delta(before, after):
        """CPU seconds per kind between two snapshots."""
        out = collections.defaultdict(float)
        for pid, (kind, cpu) in after.items():
            prev = before.get(pid)
            out[kind] += cpu - (prev[1] if prev and prev[0] == kind else 0.0)
        return dict(out)


def machine_busy_s():
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    line = (_read("/proc/stat", "r") or "cpu 0 0 0 0").splitlines()[0].split()
    v = [int(x) for x in line[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)   # idle + iowait
    total = sum(v[:8])                          # guest time is already in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def self_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def other_cores(server_cpu=None, interval_s=1.0):
    """Cores the machine spent over ``interval_s`` on anything but this
    process and the jizhid run of ``server_cpu`` (a shared machine's noise)."""
    m0, g0, s0, t0 = machine_busy_s(), self_cpu_s(), (server_cpu.snapshot() if server_cpu else {}), time.monotonic()
    time.sleep(interval_s)
    m1, g1, s1, t1 = machine_busy_s(), self_cpu_s(), (server_cpu.snapshot() if server_cpu else {}), time.monotonic()
    busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1e-9) * (os.cpu_count() or 1)
    ours = (sum(ServerCpu.delta(s0, s1).values()) + g1 - g0) / (t1 - t0)
    return max(0.0, busy - ours)


def wait_for_quiet(max_other_cores, settle_s, server_cpu=None, log=None):
    """Wait (at most ``settle_s``) until other processes use at most
    ``max_other_cores``; return (seconds waited, last reading)."""
    t0 = time.monotonic()
    while True:
        other = other_cores(server_cpu)
        waited = time.monotonic() - t0
        if other <= max_other_cores or waited >= settle_s:
            if log and waited > 1.5:
                log(f"  waited {waited:.0f} s for the machine: other processes use {other:.2f} cores"
                    + ("" if other <= max_other_cores else " (gave up waiting)"))
            return round(waited, 1), round(other, 2)


# ----------------------------------------------------------------------------
# The load generator


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


def _percentiles(a):
    if a.shape[0] == 0:
        return {"p50_ms": None, "p99_ms": None, "p99_9_ms": None, "max_ms": None}
    p = np.percentile(a, [50, 99, 99.9])
    return {"p50_ms": round(float(p[0]), 3), "p99_ms": round(float(p[1]), 3),
            "p99_9_ms": round(float(p[2]), 3), "max_ms": round(float(a.max()), 3)}


def check_trace_length(trace, rate, duration_s, allow_repeat):
    """The benchmark rule: a point needs rate x duration distinct requests.
    Raises UsageError when ``trace`` is shorter (unless ``allow_repeat``)."""
    need = int(round(rate * duration_s))
    if need > len(trace) and not allow_repeat:
        raise click.UsageError(
            f"the trace has {len(trace)} requests, a point at {rate:g} requests/s for {duration_s:g} s "
            f"needs {need} distinct ones (the rule: no request repeats within a point). Use a longer "
            f"trace (--bundle DIR --requests {need}) or pass --allow-repeat.")


def drain_replies(sock):
    """Every reply waiting on a DEALER ``sock`` (non-blocking): ``(request id, header)``; malformed ones skipped."""
    while True:
        try:
            rep = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            h = msgpack.unpackb(rep[1], raw=False, strict_map_key=False)
            rid = int(h["id"])
        except Exception:
            continue
        yield rid, h


class LoadGenerator:
    """Open-loop Poisson load on one pipeline of a jizhid, one point at a time.

    Owns one DEALER socket for its whole life; replies are matched to
    requests by id (point number and index), so a late reply from an
    earlier point is recognised and ignored.
    """

    def __init__(self, endpoint, trace, *, deadline_ms, top_k, slo_ms, cpu=None, progress=True,
                 allow_repeat=False, max_other_cores=None, settle_s=60.0, retries=2, log=None):
        self.endpoint = endpoint
        self.trace = trace
        self.deadline_ms = deadline_ms
        self.top_k = top_k
        self.slo_ms = slo_ms
        self.cpu = cpu
        self.progress = Progress(progress)
        self.allow_repeat = allow_repeat
        self.max_other_cores = max_other_cores
        self.settle_s = settle_s
        self.retries = retries
        self.log = log or (lambda text: None)
        self.cursor = 0
        self.point_no = 0
        self.ctx = zmq.Context.instance()
        self.sock = load_socket(endpoint, self.ctx)
        self.send_flags = zmq.NOBLOCK if self.sock.getsockopt(zmq.IMMEDIATE) else 0

    def close(self):
        self.sock.close(0)

    def check_rate(self, rate, duration_s):
        check_trace_length(self.trace, rate, duration_s, self.allow_repeat)

    def _encode(self, pipeline, rows, base):
        tr = self.trace
        frames = []
        for k, r in enumerate(rows):
            a, b = tr.offsets[r], tr.offsets[r + 1]
            frames.append([b""] + protocol.encode_request(
                "score", id=base | k, pipeline=pipeline, user=int(tr.users[r]), item_ids=tr.items[a:b],
                recall_scores=tr.recall[a:b], top_k=self.top_k, deadline_ms=self.deadline_ms))
        return frames

    def run_point_settled(self, pipeline, rate, duration_s, warmup_s, early_stop=False):
        """``run_point`` on a machine that is quiet enough: with
        ``max_other_cores`` set, wait for the other processes' load to drop
        below it first, and run a *failed* point again (``retries`` times)
        when other processes took more than that while it ran. A pass needs
        no second look: noise only makes a point slower."""
        earlier = []
        for attempt in range(self.retries + 1):
            quiet = None
            if self.max_other_cores is not None:
                quiet = wait_for_quiet(self.max_other_cores, self.settle_s, self.cpu, self.log)
            r = self.run_point(pipeline, rate, duration_s, warmup_s, early_stop=early_stop)
            other = r["cpu"]["foreign_cores"] if "cpu" in r else r["machine_busy_cores"]
            r["other_cores"] = other
            r["waited_for_quiet"] = quiet
            r["disturbed"] = self.max_other_cores is not None and other > self.max_other_cores
            r["earlier_attempts"] = earlier
            if r["pass"] or not r["disturbed"] or attempt == self.retries:
                return r
            self.log(f"  {rate:g} req/s failed while other processes used {other:.2f} cores: running it again")
            earlier.append({k: r[k] for k in ("offered_rps", "ok", "p99_ms", "errors", "lost", "aborted", "other_cores")})
        return r

    def run_point(self, pipeline, rate, duration_s, warmup_s, early_stop=False, label=""):
        """Run one point; return its result dict (see the module docstring)."""
        self.check_rate(rate, duration_s)
        self.point_no += 1
        base = self.point_no << ID_BITS
        q = len(self.trace)
        rng = np.random.default_rng([self.point_no, int(rate * 1000)])
        m = int(round(rate * duration_s))
        w = int(round(rate * warmup_s))
        times = np.concatenate([np.sort(rng.uniform(-warmup_s, 0.0, w)), np.sort(rng.uniform(0.0, duration_s, m))])
        total = w + m
        # Warm-up rows precede the measured rows in the trace; the measured
        # rows are distinct when m <= Q.
        rows = (self.cursor - w + np.arange(total)) % q
        self.cursor = (self.cursor + m) % q
        frames = self._encode(pipeline, rows, base)
        ncand = self.trace.counts[rows]

        sent_at = np.full(total, np.nan)
        lat_ms = np.full(total, np.nan)
        status = np.zeros(total, dtype=np.int8)   # 0 pending, 1 ok, 2 error, 3 lost, 4 not sent
        scored = np.zeros(total, dtype=np.float64)
        codes = collections.Counter()
        tsum, tcnt = collections.defaultdict(float), collections.defaultdict(int)
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        lost_after_s = self.deadline_ms / 1000.0 + 1.0
        t0 = time.monotonic() + warmup_s + 0.05
        due = t0 + times
        cpu_before = None
        k = 0
        limit = total   # an early stop sends no more
        pending = 0
        aborted = False
        over_slo = 0
        errors_measured = 0
        last_check = 0.0
        name = label or f"{pipeline} @ {rate:g}/s"
        # np.percentile's p99 of m samples lies at or above the sample at
        # floor(0.99 (m - 1)): with this many over the SLO it is over the SLO.
        fail_at = max(1, m - math.floor(0.99 * (m - 1)))
        while True:
            now = time.monotonic()
            while k < limit and due[k] <= now:
                sent_at[k] = now
                try:
                    sock.send_multipart(frames[k], flags=self.send_flags, copy=True)
                    pending += 1
                except zmq.Again:
                    status[k] = 3     # several nodes and none connected: lost
                k += 1
            if cpu_before is None and now >= t0:
                cpu_before = self.cpu.snapshot() if self.cpu else {}
                gen_before = self_cpu_s()
                mach_before = machine_busy_s()
                load_before = os.getloadavg()[0]
                t_cpu0 = time.monotonic()
            timeout = max(0, math.ceil((due[k] - now) * 1000)) if k < limit else 20
            if cpu_before is None:  # wake up at t0 to start the CPU window on time
                timeout = min(timeout, max(0, math.ceil((t0 - now) * 1000)))
            if poller.poll(timeout):
                rnow = time.monotonic()
                for rid, h in drain_replies(sock):
                    if rid >> ID_BITS != self.point_no:
                        continue  # a late reply of an earlier point
                    i = rid & ((1 << ID_BITS) - 1)
                    if i >= total or status[i] != 0:
                        continue  # unknown, or answered after it was counted lost
                    pending -= 1
                    lat_ms[i] = (rnow - due[i]) * 1000.0
                    measured = i >= w
                    if h.get("status") == "ok":
                        status[i] = 1
                        scored[i] = round(ncand[i] * (1.0 - float(h.get("shed_ratio") or 0.0)))
                        if measured:
                            if lat_ms[i] > self.slo_ms:
                                over_slo += 1
                            for key, us in (h.get("timings_us") or {}).items():
                                tsum[key] += us
                                tcnt[key] += 1
                    else:
                        status[i] = 2
                        if measured:
                            codes[h.get("code", "?")] += 1
                            errors_measured += 1
            now = time.monotonic()
            if k == limit:
                # Drain: everything sent is answered or lost.
                late = (status == 0) & (now - sent_at > lost_after_s)
                if late.any():
                    status[late] = 3
                    pending -= int(late.sum())
                if pending <= 0:
                    break
            elif early_stop and now - last_check > 0.25 and now > t0:
                last_check = now
                # The point fails for sure once an error came back, or once so
                # many requests are over the SLO (answered, or still waiting
                # past it) that the p99 of all m must be over it too.
                waiting = int(((status[w:k] == 0) & (now - due[w:k] > self.slo_ms / 1000.0)).sum())
                if errors_measured > 0 or over_slo + waiting >= fail_at:
                    aborted = True
                    limit = k
                    status[k:] = 4
            if self.progress.enabled and now - self.progress.last >= PROGRESS_INTERVAL_S:
                done_lat = lat_ms[w:][status[w:] == 1]
                p99 = f"{np.percentile(done_lat, 99):.1f}" if done_lat.shape[0] else "-"
                el = now - t0
                self.progress.show(f"{name}: {'warmup' if el < 0 else f'{el:5.1f}/{duration_s:g}s'} "
                                   f"sent {k - w if k > w else f'{k} (warm-up)'} answered {int((status[w:] == 1).sum())} "
                                   f"errors {errors_measured} p99 {p99} ms" + (" ABORTED" if aborted else ""))
        if cpu_before is None:  # an aborted point may end inside the warm-up
            cpu_before, gen_before, t_cpu0 = ({}, self_cpu_s(), time.monotonic())
            mach_before, load_before = machine_busy_s(), os.getloadavg()[0]
        cpu_after = self.cpu.snapshot() if self.cpu else {}
        gen_after = self_cpu_s()
        mach_after = machine_busy_s()
        cpu_wall_s = time.monotonic() - t_cpu0
        self.progress.show("", force=True)
        self.progress.done()

        meas = slice(w, total)
        st = status[meas]
        ok = st == 1
        lat = lat_ms[meas][ok]
        n_ok = int(ok.sum())
        n_sent = int((st != 4).sum())
        lost = int((st == 3).sum())
        sent_lag = (sent_at[meas] - due[meas])[st != 4] * 1000.0
        res = {
            "pipeline": pipeline, "offered_rps": round(m / duration_s, 3),
            "offered_pairs_s": round(float(ncand[meas].sum()) / duration_s, 1),
            "duration_s": duration_s, "warmup_s": warmup_s, "requests": m, "sent": n_sent,
            "ok": n_ok, "ok_rps": round(n_ok / duration_s, 3),
            "goodput_pairs_s": round(float(scored[meas][ok].sum()) / duration_s, 1),
            "in_slo_pairs_s": round(float(scored[meas][ok][lat <= self.slo_ms].sum()) / duration_s, 1),
            **_percentiles(lat),
            "errors": dict(codes), "lost": lost, "aborted": aborted,
            "send_lag_p99_ms": round(float(np.percentile(sent_lag, 99)), 3) if sent_lag.shape[0] else None,
            "timings_us": {key: round(tsum[key] / tcnt[key], 1) for key in sorted(tsum)},
            "distinct_requests": m <= q,
            "machine_busy_cores": round((mach_after[0] - mach_before[0]) / max(mach_after[1] - mach_before[1], 1e-9)
                                        * (os.cpu_count() or 1), 2),
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "meets_rule": bool(duration_s >= RULE_MIN_DURATION_S and m <= q and not codes and not lost),
        }
        res["pass"] = bool(not aborted and not codes and lost == 0 and n_ok == m
                           and res["p99_ms"] is not None and res["p99_ms"] <= self.slo_ms)
        if self.cpu is not None:
            res["cpu"] = cpu_report(ServerCpu.delta(cpu_before, cpu_after), gen_after - gen_before,
                                    cpu_wall_s, n_ok, pipeline)
            # CPU the machine spent on anything but this server and this generator.
            res["cpu"]["foreign_cores"] = round(max(0.0, res["machine_busy_cores"] - res["cpu"]["cores_busy"]), 2)
        return res


def cpu_report(by_kind, generator_s, wall_s, answered, pipeline):
    """CPU per process kind: ms per second of wall time and us per answered request."""
    per = max(answered, 1)
    kinds = {}
    server = 0.0
    for kind in sorted(by_kind):
        s = by_kind[kind]
        server += s
        kinds[kind] = {"ms_per_s": round(s * 1000.0 / wall_s, 1), "us_per_request": round(s * 1e6 / per, 1)}
    own = sum(s for kind, s in by_kind.items()
              if kind in ("broker", "supervisor") or kind.startswith(pipeline + "/"))
    return {"wall_s": round(wall_s, 3), "kinds": kinds,
            "server_us_per_request": round(server * 1e6 / per, 1),
            "pipeline_us_per_request": round(own * 1e6 / per, 1),
            "generator_ms_per_s": round(generator_s * 1000.0 / wall_s, 1),
            "generator_us_per_request": round(generator_s * 1e6 / per, 1),
            "total_us_per_request": round((server + generator_s) * 1e6 / per, 1),
            "cores_busy": round((server + generator_s) / wall_s, 2)}


def find_max(run, start_rate, max_rate, precision, max_points, log=print):
    """Search the highest passing rate: double from ``start_rate`` until a
    point fails, then bisect. Returns (points, best point or None, note)."""
    points, lo, hi = [], None, None
    rate = min(start_rate, max_rate)
    note = ""
    while len(points) < max_points:
        r = run(rate)
        points.append(r)
        log(f"  {rate:9.1f} req/s: {'pass' if r['pass'] else 'FAIL'}  p99 {r['p99_ms']} ms  "
            f"errors {r['errors'] or 0} lost {r['lost']}{' (stopped early)' if r['aborted'] else ''}"
            f"  [other processes: {r.get('other_cores', r['machine_busy_cores'])} cores]")
        if r["pass"]:
            lo = r
        else:
            hi = r
        if hi is None:
            if rate >= max_rate:
                note = f"trace-bound: passed at {max_rate:g} requests/s, the most the trace allows without repeats"
                break
            rate = min(rate * 2.0, max_rate)
        elif lo is None:
            rate = hi["offered_rps"] / 2.0
            if rate < 0.5:
                note = "nothing passes at 0.5 requests/s"
                break
        else:
            if hi["offered_rps"] - lo["offered_rps"] <= precision * lo["offered_rps"]:
                break
            rate = (lo["offered_rps"] + hi["offered_rps"]) / 2.0
        rate = round(rate, 1)
    else:
        note = f"stopped after {max_points} points"
    return points, lo, note


# ----------------------------------------------------------------------------
# The ceiling


def _in_ram(obj):
    """Replace every array attribute of ``obj`` (also inside dicts and tuples)
    by a private in-RAM copy: no memory map is read afterwards."""
    def copy(v):
        if isinstance(v, np.ndarray):
            return np.array(v)  # subok=False: a plain ndarray, never a memmap
        if isinstance(v, tuple):
            return tuple(copy(x) for x in v)
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v
    for name, value in vars(obj).items():
        setattr(obj, name, copy(value))
    return obj


class CeilingScorer:
    """The demo pipeline's five stage processors, back to back in one process,
    reading RAM instead of LMDB and memory maps. Each processor is set up as a
    worker sets it up, then its stores are swapped: the profiles' columns
    for in-RAM copies, the cube for a hot-tier table of the whole cube (the
    fastest store jizhi has, cube/hot.py), private to this process. The
    ``process`` code is the fused worker's."""

    def __init__(self, version_dir):
        from jizhi.bundle import Bundle
        from jizhi.cube.hot import private_table
        from jizhi.cube.table import RamTable
        from jizhi.cube.build import read_all
        from jizhi.pipeline import load_class
        bundle = Bundle(version_dir)
        # Read the whole cube before cube_accessor opens it: LMDB forbids one
        # environment open twice in a process.
        keys, vectors = read_all(bundle.cube_path)
        table = private_table(keys, vectors)     # mapped, its segment already unlinked
        config = {"on_unknown": "default"}
        self.stages = []
        for name, proc in (("reader", "data_reader"), ("features", "feature_processor"), ("cube", "cube_accessor"),
                           ("dnn", "model_inference"), ("rank", "ranker")):
            stage = load_class(proc)()
            stage.setup(dict(config), bundle)
            self.stages.append((name, stage))
        reader, cube = self.stages[0][1], self.stages[2][1]
        _in_ram(reader.users)
        _in_ram(reader.items)
        cube.store.table = table
        cube.store.cube = RamTable(keys, vectors)   # what the table lacks (signatures absent from the cube)

    def score(self, users, offsets, items, recall, top_k, stage_us):
        from jizhi.workers.stage import Batch
        r = users.shape[0]
        batch = Batch(users, np.full(r, top_k, dtype=np.int64), np.zeros(r, dtype=bool),
                      np.full(r, np.inf), offsets, {"item_ids": items, "recall_scores": recall})
        for name, proc in self.stages:
            t = time.perf_counter()
            batch.columns.update(proc.process(batch))
            stage_us[name] += (time.perf_counter() - t) * 1e6
        return batch


def _ceiling_worker(version_dir, trace_path, core, start, batch_size, top_k, warmup_s, duration_s,
                    ready, go, t0_value, results):
    # ready, results: Queues; go: Event; t0_value: the shared start time (monotonic s).
    """One ceiling process (spawned): pin, load, wait for the start, loop closed."""
    os.sched_setaffinity(0, {core})
    scorer = CeilingScorer(version_dir)
    tr = Trace(trace_path)
    q = len(tr)
    stage_us = collections.defaultdict(float)
    i = start % q

    def take(i):
        rows = (i + np.arange(batch_size)) % q
        if batch_size == 1:
            r = rows[0]
            a, b = tr.offsets[r], tr.offsets[r + 1]
            return tr.users[rows], np.array([0, b - a], dtype=np.int64), tr.items[a:b], tr.recall[a:b], rows
        counts = tr.counts[rows]
        offsets = np.zeros(batch_size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        items = np.concatenate([tr.items[tr.offsets[r]:tr.offsets[r + 1]] for r in rows])
        recall = np.concatenate([tr.recall[tr.offsets[r]:tr.offsets[r + 1]] for r in rows])
        return tr.users[rows], offsets, items, recall, rows

    for _ in range(3):  # first calls: onnxruntime and numba warm paths, not measured
        scorer.score(*take(i)[:4], top_k, collections.defaultdict(float))
    ready.put(core)
    go.wait()
    t0 = t0_value.value
    t_meas, t_end = t0 + warmup_s, t0 + warmup_s + duration_s
    lat, n_req, n_pairs = [], 0, 0
    cpu0 = None
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        measured = now >= t_meas
        if measured and cpu0 is None:
            cpu0 = self_cpu_s()
            stage_us.clear()
        users, offsets, items, recall, rows = take(i)
        t = time.perf_counter()
        scorer.score(users, offsets, items, recall, top_k, stage_us if measured else collections.defaultdict(float))
        dt_ms = (time.perf_counter() - t) * 1000.0
        i = (i + batch_size) % q
        if measured:
            lat.extend([dt_ms] * batch_size)
            n_req += batch_size
            n_pairs += int(offsets[-1])
    cpu = self_cpu_s() - (cpu0 if cpu0 is not None else self_cpu_s())
    results.put({"core": core, "requests": n_req, "pairs": n_pairs, "lat_ms": lat, "cpu_s": cpu,
                 "stage_us": dict(stage_us)})


def _collect(queue, procs, doing):
    """One message per process from ``queue``; fail when a process dies first."""
    import queue as queue_mod
    got = []
    while len(got) < len(procs):
        try:
            got.append(queue.get(timeout=1.0))
        except queue_mod.Empty:
            if any(p.exitcode for p in procs) or all(p.exitcode is not None for p in procs):
                raise click.ClickException(f"a ceiling process died while {doing} (exit codes "
                                           f"{[p.exitcode for p in procs]}); its traceback is above")
    return got


def run_ceiling_settled(version_dir, trace_path, *, max_other_cores=None, settle_s=60.0, retries=2, log=None,
                        **kw):
    """``run_ceiling``, waiting for a quiet machine first when ``max_other_cores``
    is set and running again (``retries`` times) when other processes took
    more than that during the run; keeps the fastest run (noise only slows)."""
    runs = []
    for attempt in range(retries + 1):
        quiet = wait_for_quiet(max_other_cores, settle_s, None, log) if max_other_cores is not None else None
        c = run_ceiling(version_dir, trace_path, **kw)
        c["waited_for_quiet"] = quiet
        c["disturbed"] = max_other_cores is not None and c["foreign_cores"] > max_other_cores
        runs.append(c)
        if not c["disturbed"]:
            break
        if log and attempt < retries:
            log(f"  ceiling ran while other processes used {c['foreign_cores']:.2f} cores: running it again")
    best = max(runs, key=lambda c: c["pairs_s"])
    best["attempts"] = [{k: c[k] for k in ("pairs_s", "rps", "cpu_us_per_request", "foreign_cores")} for c in runs]
    return best


def run_ceiling(version_dir, trace_path, *, duration_s, warmup_s, top_k, batch_size, processes=None):
    """The ceiling: one pinned process per core, closed loop; returns the result dict."""
    import multiprocessing as mp
    cores = sorted(os.sched_getaffinity(0))
    n = processes or len(cores)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    go = ctx.Event()
    t0 = ctx.Value("d", 0.0)
    results = ctx.Queue()
    q = len(Trace(trace_path))
    procs = [ctx.Process(target=_ceiling_worker,
                         args=(str(version_dir), str(trace_path), cores[j % len(cores)], j * q // n, batch_size,
                               top_k, warmup_s, duration_s, ready, go, t0, results), daemon=True)
             for j in range(n)]
    for p in procs:
        p.start()
    try:
        _collect(ready, procs, "setting up")
        t0.value = start = time.monotonic() + 0.05
        go.set()
        time.sleep(max(0.0, start + warmup_s - time.monotonic()))
        mach0 = machine_busy_s()
        time.sleep(max(0.0, start + warmup_s + duration_s - time.monotonic()))
        mach1 = machine_busy_s()
        out = _collect(results, procs, "scoring")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    lat = np.array([x for o in out for x in o["lat_ms"]], dtype=np.float64)
    reqs = sum(o["requests"] for o in out)
    pairs = sum(o["pairs"] for o in out)
    cpu = sum(o["cpu_s"] for o in out)
    stage = collections.defaultdict(float)
    for o in out:
        for k, v in o["stage_us"].items():
            stage[k] += v
    return {"processes": n, "cores": cores, "batch": batch_size, "duration_s": duration_s, "warmup_s": warmup_s,
            "requests": reqs, "rps": round(reqs / duration_s, 1), "pairs_s": round(pairs / duration_s, 1),
            **_percentiles(lat),
            "stage_us_per_request": {k: round(stage[k] / max(reqs, 1), 1) for k in ("reader", "features", "cube", "dnn", "rank")},
            "cpu_us_per_request": round(cpu * 1e6 / max(reqs, 1), 1),
            "cores_busy": round(cpu / duration_s, 2),
            "foreign_cores": round(max(0.0, (mach1[0] - mach0[0]) / max(mach1[1] - mach0[1], 1e-9) * (os.cpu_count() or 1)
                                       - cpu / duration_s), 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------
# Reporting


def environment():
    import numba
    import onnxruntime
    model = "?"
    for line in (_read("/proc/cpuinfo", "r") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in (_read("/proc/meminfo", "r") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "cpu_model": model, "cpus": os.cpu_count(),
            "mem_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "numba": numba.__version__,
            "pyzmq": zmq.__version__, "loadavg": os.getloadavg()}


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def print_points(points, out=print):
    out(f"{'pipeline':<14}{'offered/s':>10}{'ok/s':>10}{'goodput pairs/s':>17}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p99.9 ms':>10}{'errors':>18}{'lost':>6}  result")
    for r in points:
        errs = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        out(f"{r['pipeline']:<14}{_fmt(r['offered_rps']):>10}{_fmt(r['ok_rps']):>10}{_fmt(r['goodput_pairs_s'], 0):>17}"
            f"{_fmt(r['p50_ms']):>9}{_fmt(r['p99_ms']):>9}{_fmt(r['p99_9_ms']):>10}{errs:>18}{r['lost']:>6}  "
            f"{'pass' if r['pass'] else 'fail'}{' (stopped early)' if r['aborted'] else ''}")


def print_detail(r, out=print):
    t = r["timings_us"]
    if t:
        out(f"  mean timings_us of OK replies ({r['pipeline']} @ {r['offered_rps']:g}/s): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in t.items()))
    c = r.get("cpu")
    if c:
        out(f"  CPU over {c['wall_s']:.1f} s: this server and generator {c['cores_busy']} cores, anything else "
            f"{c.get('foreign_cores', '?')} cores (load average {r['loadavg_1m'][0]} -> {r['loadavg_1m'][1]}); "
            f"generator send lag p99 {r['send_lag_p99_ms']} ms:")
        out(f"    {'process kind':<28}{'ms/s':>8}{'us/request':>12}")
        for kind, v in c["kinds"].items():
            out(f"    {kind:<28}{v['ms_per_s']:>8,.1f}{v['us_per_request']:>12,.1f}")
        out(f"    {'load generator':<28}{c['generator_ms_per_s']:>8,.1f}{c['generator_us_per_request']:>12,.1f}")
        out(f"    server {c['server_us_per_request']:,.0f} us/request (this pipeline + broker + supervisor: "
            f"{c['pipeline_us_per_request']:,.0f}); with the generator {c['total_us_per_request']:,.0f}")


def print_ceiling(c, out=print):
    out(f"ceiling: {c['processes']} processes (cores {c['cores']}), batch {c['batch']}: "
        f"{c['pairs_s']:,.0f} pairs/s, {c['rps']:,.1f} requests/s, latency p50 {c['p50_ms']} ms "
        f"p99 {c['p99_ms']} ms, CPU {c['cpu_us_per_request']:,.0f} us/request ({c['cores_busy']} cores busy, "
        f"anything else {c['foreign_cores']} cores)")
    out("  mean us per request by stage: " + ", ".join(f"{k} {v:,.0f}" for k, v in c["stage_us_per_request"].items()))


def plot_sweep(runs, path, slo_ms, title):
    """A PNG of load points: latency percentiles and goodput (OK replies/s) against offered requests/s.

    One line per pipeline; points that fail (p99 over the SLO, an error, a
    lost request, stopped early) are marked with an x on the goodput panel.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'jizhi[plot]'")
    fig, (lat, good) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top = 0.0
    for i, run in enumerate(runs):
        color = f"C{i}"
        pts = sorted(run["points"], key=lambda r: r["offered_rps"])
        x = [r["offered_rps"] for r in pts]
        top = max([top] + x)
        for key, label, style in (("p50_ms", "p50", ":"), ("p99_ms", "p99", "-"), ("p99_9_ms", "p99.9", "--")):
            lat.plot(x, [np.nan if r[key] is None else r[key] for r in pts], color=color, linestyle=style,
                     marker="o", markersize=4, label=f"{run['pipeline']} {label}")
        good.plot(x, [r["ok_rps"] for r in pts], color=color, marker="o", markersize=4,
                  label=f"{run['pipeline']} OK replies/s")
        bad = [r for r in pts if not r["pass"]]
        if bad:
            good.plot([r["offered_rps"] for r in bad], [r["ok_rps"] for r in bad], linestyle="none", marker="x",
                      markersize=9, color="red", label="failed point" if i == 0 else None)
    lat.axhline(slo_ms, color="red", linestyle="--", linewidth=1, label=f"SLO: p99 <= {slo_ms:g} ms")
    lat.set_yscale("log")
    lat.set_ylabel("latency, ms (log)")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(loc="upper left", fontsize=8)
    good.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="offered")
    good.set_xlabel("offered load, requests/s")
    good.set_ylabel("goodput, OK replies/s")
    good.set_xlim(left=0)
    good.set_ylim(bottom=0)
    good.grid(True, alpha=0.3)
    good.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------
# The command


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default="tcp://127.0.0.1:5555", show_default=True,
              help="jizhid's client endpoint; several comma-separated: requests spread round-robin over the "
                   "nodes connected, no retry (a request sent to a node that dies counts as lost).")
@click.option("--pipeline", default="default", show_default=True,
              help="Pipeline to load; a comma-separated list runs each in turn.")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              help="Request trace (trace.npz, docs/formats.md).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="Bundle version directory: generates the trace (with --requests) and is what --ceiling scores.")
@click.option("--requests", type=click.IntRange(1), help="Generate a trace of this many requests from --bundle.")
@click.option("--candidates", type=click.IntRange(1), default=500, show_default=True,
              help="Candidates per request of a generated trace.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Offered load, requests/s (one point).")
@click.option("--rates", help="A sweep: comma-separated requests/s.")
@click.option("--find-max", is_flag=True, help="Search the highest rate with p99 <= --slo-ms and no errors.")
@click.option("--start-rate", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="--find-max: first rate tried (doubled until a point fails).")
@click.option("--precision", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="--find-max: stop bisecting when the gap is below this fraction of the best pass.")
@click.option("--max-points", type=click.IntRange(1), default=10, show_default=True,
              help="--find-max: most points per pipeline.")
@click.option("--slo-ms", type=float, default=50.0, show_default=True, help="Latency objective (p99) of a passing point.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Seconds measured per point (the rule: at least 20).")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds of load before each point, not counted.")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Deadline sent with every request; no reply within deadline + 1 s counts as lost.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--allow-repeat", is_flag=True, help="Allow a trace shorter than rate x duration (requests repeat).")
@click.option("--cpu", is_flag=True, help="Measure the CPU of jizhid's processes (found through --run-dir).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="--cpu: jizhid's run directory (default: server.run_dir's default for instance 'default').")
@click.option("--ceiling", is_flag=True, help="Run the in-process ceiling instead of loading a server (needs --bundle).")
@click.option("--batch", "ceiling_batch", type=click.IntRange(1), default=1, show_default=True,
              help="--ceiling: requests scored per call.")
@click.option("--max-other-cores", type=click.FloatRange(min=0), default=None,
              help="A shared machine: before each point wait until other processes use at most this many cores, "
                   "and run a failed point again when they used more while it ran.")
@click.option("--settle-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="--max-other-cores: longest wait for a quiet machine before a point.")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="--max-other-cores: how often a disturbed, failed point is run again.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw latency p50/p99/p99.9 and goodput against offered load (PNG; needs "
                   "pip install 'jizhi[plot]').")
@click.option("--quiet", is_flag=True, help="No progress line on stderr.")
def bench_command(endpoint, pipeline, trace_path, bundle, requests, candidates, rate, rates, find_max,
                  start_rate, precision, max_points, slo_ms, duration_s, warmup_s, deadline_ms, top_k,
                  allow_repeat, cpu, run_dir, ceiling, ceiling_batch, max_other_cores, settle_s, retries, json_path,
                  plot_path, quiet):
    """Measure throughput and latency: open-loop Poisson load on a running
    jizhid (--rate, --rates or --find-max), or the in-process ceiling
    (--ceiling).

    Every point: --warmup s of load, then --duration s measured, latency from
    each request's intended send time. A point passes with p99 <= --slo-ms,
    no error and nothing lost. Goodput counts the candidates that received a
    model score in OK replies. Examples:

    \b
      jizhictl bench --trace trace.npz --rate 200
      jizhictl bench --trace trace.npz --find-max --pipeline demo,legacy --cpu --run-dir /run/jizhi
      jizhictl bench --trace trace.npz --rates 100,200,300 --plot sweep.png
      jizhictl bench --ceiling --bundle models/demo/1 --trace trace.npz
    """
    modes = sum([rate is not None, rates is not None, find_max])
    if ceiling and modes:
        raise click.UsageError("--ceiling runs closed loop: it takes no --rate, --rates or --find-max")
    if not ceiling and modes != 1:
        raise click.UsageError("give exactly one of --rate, --rates, --find-max (or --ceiling)")
    if ceiling and not bundle:
        raise click.UsageError("--ceiling needs --bundle (the version directory it scores)")
    if trace_path and requests:
        raise click.UsageError("give --trace or --requests (with --bundle), not both")
    if not trace_path and not (bundle and requests):
        raise click.UsageError("give --trace FILE, or --bundle DIR with --requests N to generate one")
    if plot_path and ceiling:
        raise click.UsageError("--plot draws load points (--rate, --rates or --find-max), not --ceiling")
    if plot_path:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:   # said now, not after the points ran
            raise click.ClickException("--plot needs matplotlib: pip install 'jizhi[plot]'")
    if duration_s < RULE_MIN_DURATION_S:
        click.echo(f"note: points of {duration_s:g} s are shorter than the rule's {RULE_MIN_DURATION_S:g} s", err=True)
    version_dir = resolve_bundle(bundle) if bundle else None
    tmp = None
    if not trace_path:
        from jizhi.tools.demo import generate_trace
        tmp = tempfile.NamedTemporaryFile(prefix="jizhi-trace-", suffix=".npz", delete=False)
        tmp.close()
        trace_path = tmp.name
        generate_trace(str(version_dir), trace_path, requests=requests, candidates=candidates, progress=not quiet)
    try:
        result = {"environment": environment(), "command": sys.argv, "trace": str(trace_path)}
        if ceiling:
            click.echo(f"ceiling: {version_dir}, {len(os.sched_getaffinity(0))} cores, {duration_s:g} s "
                       f"after {warmup_s:g} s warm-up", err=True)
            c = run_ceiling_settled(version_dir, trace_path, max_other_cores=max_other_cores, settle_s=settle_s,
                                    retries=retries, log=lambda t: click.echo(t, err=True), duration_s=duration_s,
                                    warmup_s=warmup_s, top_k=top_k, batch_size=ceiling_batch)
            result["ceiling"] = c
            print_ceiling(c, click.echo)
        else:
            result["runs"] = _load(endpoint, pipeline, trace_path, rate, rates, find_max, start_rate, precision,
                                   max_points, slo_ms, duration_s, warmup_s, deadline_ms, top_k, allow_repeat,
                                   cpu, run_dir, quiet, max_other_cores, settle_s, retries)
            if plot_path:
                pts = [r for run in result["runs"] for r in run["points"]]
                ncand = sum(r["offered_pairs_s"] for r in pts) / max(sum(r["offered_rps"] for r in pts), 1e-9)
                plot_sweep(result["runs"], plot_path, slo_ms,
                           f"jizhictl bench: {', '.join(run['pipeline'] for run in result['runs'])}, "
                           f"{ncand:.0f} candidates/request, {duration_s:g} s per point, "
                           f"{result['environment']['cpus']} CPUs")
                click.echo(f"plot written to {plot_path}", err=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
            click.echo(f"results written to {json_path}", err=True)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


def _load(endpoint, pipeline, trace_path, rate, rates, find_max_flag, start_rate, precision, max_points, slo_ms,
          duration_s, warmup_s, deadline_ms, top_k, allow_repeat, cpu, run_dir, quiet, max_other_cores, settle_s,
          retries):
    from jizhi.client import Client
    trace = Trace(trace_path)
    todo = []
    if not find_max_flag:
        todo = [rate] if rate is not None else [float(x) for x in rates.split(",") if x.strip()]
        if not todo or min(todo) <= 0:
            raise click.BadParameter("rates must be positive numbers", param_hint="--rates")
        for r in todo:
            check_trace_length(trace, r, duration_s, allow_repeat)
    infos = {}
    for one in (e.strip() for e in endpoint.split(",") if e.strip()):
        try:
            with Client(one, timeout_s=5.0) as c:
                infos[one] = c.info()
        except TimeoutError:
            click.echo(f"jizhictl bench: no answer from {one} within 5 s: is jizhid running, and is this its "
                       f"frontend (server.frontend)?", err=True)
            sys.exit(1)
    names = []
    for name in (p.strip() for p in pipeline.split(",") if p.strip()):
        for one, info in infos.items():
            # "default" is resolved here so the CPU of its groups is attributed to it.
            real = info["default_pipeline"] if name == "default" else name
            if real not in info["pipelines"]:
                raise click.UsageError(f"pipeline {name!r} is not served by {one} "
                                       f"(served: {', '.join(info['pipelines'])})")
        names.append(real)
    if not all(info.get("ready") for info in infos.values()):
        click.echo("warning: jizhid says it is not ready yet (some pool has no worker)", err=True)
    server_cpu = None
    if cpu:
        run_dir = run_dir or default_run_dir("default")
        server_cpu = ServerCpu(run_dir)
        found = server_cpu.processes()
        if not found:
            raise click.UsageError(f"--cpu: no process of a jizhid run found for run dir {run_dir} "
                                   f"(looked for --plan {server_cpu.plan} in /proc/*/cmdline)")
        click.echo(f"cpu: {len(found)} processes of the run in {run_dir}", err=True)
    gen = LoadGenerator(endpoint, trace, deadline_ms=deadline_ms, top_k=top_k, slo_ms=slo_ms, cpu=server_cpu,
                        progress=not quiet, allow_repeat=allow_repeat, max_other_cores=max_other_cores,
                        settle_s=settle_s, retries=retries, log=lambda t: click.echo(t, err=True))
    runs = []
    try:
        for name in names:
            click.echo(f"== {name}: trace {len(trace)} requests x {trace.mean_candidates():.0f} candidates, "
                       f"{duration_s:g} s per point, SLO p99 <= {slo_ms:g} ms", err=True)
            if find_max_flag:
                cap = len(trace) / duration_s if not allow_repeat else float("inf")
                points, best, note = find_max(
                    lambda r: gen.run_point_settled(name, r, duration_s, warmup_s, early_stop=True),
                    start_rate, cap, precision, max_points, log=lambda s: click.echo(s, err=True))
                run = {"pipeline": name, "points": points, "max": best, "note": note}
            else:
                points = [gen.run_point_settled(name, r, duration_s, warmup_s) for r in todo]
                run = {"pipeline": name, "points": points}
            runs.append(run)
            click.echo("")
            print_points(points, click.echo)
            detail = run.get("max") if find_max_flag else None
            for p in ([detail] if detail else points):
                print_detail(p, click.echo)
            if find_max_flag:
                if run["max"]:
                    click.echo(f"  max: {run['max']['offered_rps']:g} requests/s = "
                               f"{run['max']['goodput_pairs_s']:,.0f} pairs/s at p99 {run['max']['p99_ms']} ms"
                               + (f" ({note})" if note else ""))
                else:
                    click.echo(f"  max: no passing point ({note or 'every point failed'})")
    finally:
        gen.close()
    return runs


if __name__ == "__main__":
    bench_command(prog_name="python -m jizhi.tools.bench")
