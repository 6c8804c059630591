"""CPU and I/O priority of work that must not slow serving (issue 23: a reload that does not show).

Who uses it: the supervisor for a new version's loading work (the validation child, the hot
tier's builder, the new workers until they serve: ``models.load_priority``), the workers to
return to serving priority, and the tools an operator runs on a serving machine (``jizhictl demo
publish``, ``jizhictl profiles build``).

``idle(pid)``: every thread of ``pid`` (0: this process) to ``SCHED_IDLE``, which takes the CPU
only when no normal thread wants it (a serving thread that wakes preempts it at once, where nice
19 still gets its share and waits for the scheduler's granularity), and to the idle I/O class
(``ioprio_set(2)``: its disk reads and writes wait until nobody else's are pending). Threads
started later inherit both. ``normal(pid, nice)`` is the way back; leaving ``SCHED_IDLE`` needs
CAP_SYS_NICE or an ``RLIMIT_NICE`` that allows ``nice`` (``can_leave_idle``), so a process that
must come back (a new worker) is sent to idle only when it can. Linux only; each call returns
whether the kernel took it, never raises for a refusal.

Priority is not enough: what a loading process does *in the kernel* (copying files, faulting in
pages it maps or allocates, starting a process) runs to its end whatever its priority on a kernel
without full preemption (this VM's: PREEMPT_NONE), and a serving process that wakes meanwhile
waits; measured, a SCHED_IDLE publish command held a CPU 3-4 ms at a time while the load
generator waited 33 ms (docs/benchmarks.md, "A reload that does not show"). ``Pacer`` therefore
lets loading processes run only a share of the time (``SIGCONT`` for duty x 20 ms, ``SIGSTOP``
for the rest), which spreads that work thin; ``run_paced`` does the same for a command (the
tools of ``bin/jizhictl``). A process may be stopped when its pacer dies: it must arm its death
signal as SIGKILL from its fork on (``jizhi.lifeline.killed_with_parent`` as the ``preexec_fn``: a
child can be stopped before its own first instruction), which ends a stopped process where SIGTERM
would wait for a SIGCONT that never comes. Signals go through pidfds, so a pid reused
after its process was reaped is never touched.
"""
import ctypes
import os
import platform
import resource
import signal
import subprocess
import threading
import time

IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_NONE = 0       # "as its CPU priority says" (the default)
IOPRIO_CLASS_IDLE = 3
IOPRIO_WHO_PROCESS = 1      # (a thread id, despite the name)
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "armv7l": 314, "ppc64le": 273, "s390x": 282}
CAP_SYS_NICE = 23


def _ioprio_set(tid, klass):
    nr = _SYS_IOPRIO_SET.get(platform.machine())
    if nr is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(nr, IOPRIO_WHO_PROCESS, tid, klass << IOPRIO_CLASS_SHIFT) == 0


def _threads(pid):
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")]
    except OSError:
        return [pid]


def idle(pid=0):
    """SCHED_IDLE and the idle I/O class for every thread of ``pid``; False when the CPU part was
    refused (then nice 19 instead, which anyone may set)."""
    ok = True
    for tid in _threads(pid):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            ok = False
            try:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
            except OSError:
                pass
        _ioprio_set(tid, IOPRIO_CLASS_IDLE)
    return ok


def normal(pid=0, nice=0):
    """Every thread of ``pid`` back to SCHED_OTHER at ``nice`` and the default I/O class; False when
    the kernel refused (no CAP_SYS_NICE: the threads stay where they were)."""
    ok = True
    for tid in _threads(pid):
        try:
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            if os.getpriority(os.PRIO_PROCESS, tid) != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            ok = False
        _ioprio_set(tid, IOPRIO_CLASS_NONE)
    return ok


def can_leave_idle(nice=0):
    """May this process (and its children) go back from SCHED_IDLE to SCHED_OTHER at ``nice``?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_NICE & 1:
                    return True
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - nice <= soft


PACE_PERIOD_S = 0.02        # one period: run duty x this, stopped for the rest
PACED_ENV = "JIZHI_PACED"    # set in a command run_paced started (it must not pace itself again)
# The jizhictl commands an operator runs beside a serving jizhid, at the idle priority and with their
# default --pace (bin/jizhictl applies both before the command's imports; the commands declare the option).
# A profile build can run for minutes, and a copy (publish) measured no worse unpaced (docs/benchmarks.md,
# "Copying a version in"): paced only when asked.
COMMAND_PACE = {("publish",): 1.0, ("demo", "publish"): 0.25, ("profiles", "build"): 1.0}


def paced_command(argv):
    """The key of ``COMMAND_PACE`` that jizhictl's ``argv`` runs, or None."""
    return next((c for c in COMMAND_PACE if tuple(argv[1:1 + len(c)]) == c), None)


def _signal(fd, sig):
    """Send ``sig`` through a pidfd; False when the process is gone (reaped, or a zombie's pidfd)."""
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return False


def _ours(fd):
    """Is the process of pidfd ``fd`` a child of ours (waitid answers only for a child; WNOWAIT: it
    reaps nothing)?"""
    try:
        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


class Pacer:
    """Processes that run only ``duty`` of the time (module docstring): a thread that sends SIGCONT,
    sleeps duty x period, sends SIGSTOP, sleeps the rest. ``add`` a process, ``release`` it (it runs
    on, not paced; synchronous: it is running when ``release`` returns), ``close`` releases them all.
    A process that ended is dropped by itself. ``duty`` >= 1: nothing is ever stopped."""

    def __init__(self, duty, period_s=PACE_PERIOD_S):
        self.duty = float(duty)
        self.period_s = period_s
        self.fds = {}                       # pid -> pidfd
        self.names = {}                     # pid -> what it is (for the log)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.thread = None

    def add(self, pid, name=""):
        """Pace ``pid`` from now on; False when pacing is off or the process is already gone."""
        if self.duty >= 1.0 or self.closed:
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        if not _ours(fd):     # only a child of ours is ever stopped (a test's made-up pid is not)
            os.close(fd)
            return False
        with self.lock:
            old = self.fds.pop(pid, None)
            if old is not None:
                os.close(old)
            self.fds[pid] = fd
            self.names[pid] = name
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="jizhi-pacer", daemon=True)
                self.thread.start()
        self.wake.set()
        return True

    def release(self, pids):
        """These processes run on, not paced (each gets SIGCONT now)."""
        with self.lock:
            for pid in pids:
                fd = self.fds.pop(pid, None)
                self.names.pop(pid, None)
                if fd is not None:
                    _signal(fd, signal.SIGCONT)
                    os.close(fd)

    def paced(self):
        with self.lock:
            return dict(self.names)

    def close(self):
        self.closed = True
        self.release(list(self.fds))
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=1.0)

    def _each(self, sig):
        with self.lock:
            for pid, fd in list(self.fds.items()):
                if not _signal(fd, sig):
                    os.close(self.fds.pop(pid))
                    self.names.pop(pid, None)
            return bool(self.fds)

    def _run(self):
        on_s = self.duty * self.period_s
        off_s = self.period_s - on_s
        while not self.closed:
            if not self._each(signal.SIGCONT):
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            time.sleep(on_s)
            if self.closed:
                break
            if self._each(signal.SIGSTOP):
                time.sleep(off_s)
        self._each(signal.SIGCONT)


def run_paced(argv, duty, env=None, preexec_fn=None):
    """Run ``argv`` (at the idle priority: it lowers it itself when it sees ``JIZHI_PACED``) paced at
    ``duty``. On SIGINT (which a terminal sends the command too: it is in our process group) or SIGTERM
    (passed on) the command is let go, to handle it at full speed. ``preexec_fn``: jizhi.lifeline's
    ``killed_with_parent`` (its death signal SIGKILL from the fork on). Returns its exit code (a
    signal's: 128 + the signal)."""
    env = dict(os.environ if env is None else env, **{PACED_ENV: "1"})
    proc = subprocess.Popen(argv, env=env, preexec_fn=preexec_fn)
    pacer = Pacer(duty)
    pacer.add(proc.pid, "command")

    def forward(signum, frame):
        pacer.release([proc.pid])
        if signum == signal.SIGTERM:
            try:
                proc.send_signal(signum)
            except OSError:
                pass
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        pacer.close()
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - rc if rc < 0 else rc


def pace_share(argv, default):
    """The ``--pace SHARE`` of a command line (``default`` when absent; None when it is not a number
    in (0, 1]: the command's own option parsing then names the error)."""
    for i, a in enumerate(argv):
        if a == "--pace" and i + 1 < len(argv):
            v = argv[i + 1]
        elif a.startswith("--pace="):
            v = a.split("=", 1)[1]
        else:
            continue
        try:
            v = float(v)
        except ValueError:
            return None
        return v if 0 < v <= 1 else None
    return default
