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
"""
import ctypes
import os
import platform
import resource

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
