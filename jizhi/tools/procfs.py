"""What a jizhid run, this process and the machine use, read from /proc: CPU and memory.

Runs in a benchmark's process (the operator's shell), never inside jizhid, and
only reads: ``/proc/<pid>/{stat,status,cmdline,smaps_rollup,task/*/children}``,
``/proc/stat``, ``/proc/cpuinfo``, ``/proc/meminfo`` and ``/dev/shm``. Used by
``jizhictl bench`` (``ServerCpu``: the CPU of a run's processes per kind; the
other processes' load, ``wait_for_quiet``), ``bench-reload``
(``MemorySampler``: the process tree's memory and CPU every 100 ms), ``tune``,
the micro-benchmark and the docs' benchmark scripts. ``environment`` describes
the machine a result was measured on.
"""
import collections
import datetime
import os
import platform
import resource
import threading
import time

import numpy as np
import zmq

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path, mode="rb"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:   # the process exited between listing and reading, or is not ours to read
        return None


def _arg(args, name):
    """The value after ``name`` in a command line (a list), or "?"."""
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else "?"


# ----------------------------------------------------------------------------
# CPU of a jizhid run, of this process and of the machine

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
                found[pid] = f"{_arg(args, '--pipeline')}/{_arg(args, '--group')}"
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

    def thread_snapshot(self):
        """{pid: (kind, {"main" | "zmq_io" | "other_threads": cpu seconds})} now: each process's main
        thread, ZeroMQ's background threads (named ``ZMQbg/...``) and the rest (jizhi/tools/account.py)."""
        snap = {}
        for pid, kind in self.processes().items():
            parts = collections.defaultdict(float)
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                st = proc_cpu_s(f"{pid}/task/{tid}")
                if st is None:
                    continue
                if tid == str(pid):
                    parts["main"] += st[0]
                elif (_read(f"/proc/{pid}/task/{tid}/comm") or b"").startswith(b"ZMQbg"):
                    parts["zmq_io"] += st[0]
                else:
                    parts["other_threads"] += st[0]
            snap[pid] = (kind, dict(parts))
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


def environment():
    """The machine and the library versions a result was measured with (imports numba and onnxruntime)."""
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


# ----------------------------------------------------------------------------
# Memory and CPU of the jizhid process tree, sampled


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
            text = _read(f"/proc/{pid}/task/{tid}/children", "r")
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

    def stop(self):
        self._halt.set()

    def role(self, pid, starttime):
        key = (pid, starttime)
        r = self.roles.get(key)
        if r is None:
            raw = _read(f"/proc/{pid}/cmdline", "r") or ""
            args = raw.rstrip("\0").split("\0")
            if pid == self.root:
                r = "supervisor"
            elif "jizhi.broker" in args:
                r = "broker"
            elif "jizhi.workers.run" in args:
                r = f"workers v{_arg(args, '--version')}"
            elif "jizhi.validate" in args:
                r = f"validate v{_arg(args, '--version')}"
            elif "jizhi.cube.hot" in args:
                r = "hot tier build"
            elif "-m" in args:
                r = _arg(args, "-m")
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
            stat = _read(f"/proc/{pid}/stat", "r")
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
            stat = _read(f"/proc/{pid}/stat", "r")
            status = _read(f"/proc/{pid}/status", "r")
            if stat is None or status is None:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            cpu = (int(f[11]) + int(f[12])) / CLK_TCK
            role = self.role(pid, f[19])
            kib = _status_kib(status, self.STATUS_KEYS)
            procs[pid] = (role, kib["VmRSS"] << 10, kib["RssAnon"] << 10, kib["RssFile"] << 10,
                          kib["RssShmem"] << 10, cpu, int(f[16]))
            if with_pss:
                text = _read(f"/proc/{pid}/smaps_rollup", "r")
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

