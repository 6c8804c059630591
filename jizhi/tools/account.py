"""The CPU account of a jizhid run: where the CPU of an answered request goes (``jizhictl bench --cpu``).

Runs in the benchmark's process, never inside jizhid, and only reads. Two sources:

* ``/proc/<pid>/task/<tid>/stat`` (jizhi/tools/procfs.py, ``ServerCpu``): every thread of every process of
  the run, so a process's CPU splits into its main thread (the loop that does the work), ZeroMQ's I/O
  threads (``ZMQbg/...``: the bytes of every message) and any other thread (the broker's connection
  guard, onnxruntime's pool if it has one);
* the stats segment's CPU account (jizhi/stats.py, ``CpuPhases``): the main thread's CPU by phase, kept
  by the broker (admission, dispatch, done, reply, housekeeping) and by every worker (receive, assemble,
  each stage by name, write, done).

/proc counts in clock ticks (``SC_CLK_TCK``: 10 ms) per thread, the phases in nanoseconds: over a short
window (a few seconds) a thread's figure is off by up to a tick at each end; over a 20 s point at hundreds
of requests per second, by well under 1 %. A process's main thread less its phases is its *loop* (poll, heartbeats, what no phase names). A worker
or a broker that restarted inside the window (another pid in its row) starts its account again from
zero: its delta is what the new process did.
"""
import collections
import os

import numpy as np

from jizhi import rundir
from jizhi.stats import BANKS, BROKER_PHASES, C_PID, MAX_STAGES, WORKER_PHASES, Stats
from jizhi.tools.procfs import ServerCpu

PARTS = ("main", "zmq_io", "other_threads")   # a process's threads (ServerCpu.thread_snapshot)


class Account:
    """Snapshots of a run's CPU by process kind, thread and phase; ``report`` turns two into us/request."""

    def __init__(self, run_dir):
        self.server = ServerCpu(run_dir)
        run = rundir.read_plan(os.path.join(run_dir, "plan.msgpack"))
        self.stats = Stats.attach(run.get("stats"))
        per_group = BANKS * run["settings"]["workers.max_pool"]
        self.groups = {}    # "pipeline/group" -> (first row, rows, stage names)
        self.broker_rows = [r for k, r in (run.get("stats") or {}).get("map", {}).items() if "/" not in k]
        for pname, plan in run["pipelines"].items():
            for gname, g in plan["groups"].items():
                first = (run.get("stats") or {}).get("map", {}).get(f"{pname}/{gname}")
                if first is not None:
                    self.groups[f"{pname}/{gname}"] = (first, per_group, list(g["stages"]))

    def processes(self):
        return self.server.processes()

    def snapshot(self):
        """The run's CPU now: every thread (/proc) and the stats segment's account (one walk of /proc)."""
        snap = {"threads": self.server.thread_snapshot()}
        if self.stats is not None:
            snap["cpu_ns"] = self.stats.cpu_ns.copy()
            snap["broker_cpu_ns"] = self.stats.broker_cpu_ns.copy()
            snap["pids"] = self.stats.counters[:, C_PID].copy()
        return snap

    @staticmethod
    def per_process(snap):
        """``ServerCpu.snapshot``'s form of a snapshot: {pid: (kind, cpu seconds of its threads)}."""
        return {pid: (kind, sum(parts.values())) for pid, (kind, parts) in snap["threads"].items()}

    def report(self, before, after, answered):
        """{kind: {"us": total, "parts": {part: us}, "phases": {phase: us}}} per answered request."""
        per = max(answered, 1)
        kinds = collections.defaultdict(lambda: collections.defaultdict(float))
        for pid, (kind, parts) in after["threads"].items():
            prev = before["threads"].get(pid)
            for part, s in parts.items():
                kinds[kind][part] += s - (prev[1].get(part, 0.0) if prev and prev[0] == kind else 0.0)
        out = {}
        for kind, parts in sorted(kinds.items()):
            entry = {"us": round(sum(parts.values()) * 1e6 / per, 1),
                     "parts": {p: round(parts.get(p, 0.0) * 1e6 / per, 1) for p in PARTS if p in parts}}
            phases = self._phases(kind, before, after)
            if phases is not None:
                named = {k: v / 1e3 / per for k, v in phases.items()}
                named["loop"] = max(0.0, parts.get("main", 0.0) * 1e6 / per - sum(named.values()))
                entry["phases"] = {k: round(v, 1) for k, v in named.items()}
            out[kind] = entry
        return out

    def _phases(self, kind, before, after):
        """{phase: ns} of one kind's main threads in the window, or None when the run keeps no account."""
        if "cpu_ns" not in after or "cpu_ns" not in before:
            return None
        if kind == "broker":
            restarted = any(after["pids"][r] != before["pids"][r] for r in self.broker_rows)
            d = after["broker_cpu_ns"] - (0 if restarted else before["broker_cpu_ns"])
            return dict(zip(BROKER_PHASES, d.tolist()))
        if kind not in self.groups:
            return None
        first, n, stages = self.groups[kind]
        a, b = after["cpu_ns"][first:first + n], before["cpu_ns"][first:first + n]
        restarted = after["pids"][first:first + n] != before["pids"][first:first + n]   # a new process
        d = np.where(restarted[:, None], a, a - b).sum(axis=0)
        phases = {name: int(d[i]) for i, name in enumerate(stages[:MAX_STAGES])}
        phases.update((name, int(d[MAX_STAGES + i])) for i, name in enumerate(WORKER_PHASES))
        return phases


def format_account(account, generator_us=None, pipeline=None):
    """Lines of text: one per process kind, its threads and its main thread's phases, us per request.
    With ``pipeline``, the workers of other pipelines (idle while it is measured) share one line."""
    lines = []
    total = others = 0.0
    for kind, e in account.items():
        total += e["us"]
        if pipeline is not None and "/" in kind and not kind.startswith(pipeline + "/"):
            others += e["us"]
            continue
        parts = e["parts"]
        bits = [f"ZeroMQ I/O {parts.get('zmq_io', 0):,.0f}"] if parts.get("zmq_io") else []
        if parts.get("other_threads"):
            bits.append(f"other threads {parts['other_threads']:,.0f}")
        main = f"main {parts.get('main', 0):,.0f}"
        if "phases" in e:
            main += " (" + ", ".join(f"{k} {v:,.0f}" for k, v in e["phases"].items()) + ")"
        lines.append(f"  {kind:<24} {e['us']:>8,.0f}  " + "; ".join([main] + bits))
    if others:
        lines.append(f"  {'other pipelines':<24} {others:>8,.0f}")
    if generator_us is not None:
        total += generator_us
        lines.append(f"  {'load generator':<24} {generator_us:>8,.0f}")
    lines.append(f"  {'total':<24} {total:>8,.0f}")
    return lines
