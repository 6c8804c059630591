"""The tie between jizhid and its children: no child outlives its supervisor.

A child of an ended run (its supervisor SIGKILLed, a crash) that goes on
serving is the worst fault jizhi can have: it keeps its ports and sockets,
takes a new run's workers and answers from segments nobody writes any more,
with status ok. Three layers keep that from happening:

* ``hold()``, the first thing a child's ``__main__`` does, before any heavy
  import: ``PR_SET_PDEATHSIG`` (the kernel signals the child when its parent
  dies), then a check that the parent is still the supervisor that started it
  (its pid is in ``JIZHI_SUPERVISOR_PID``): a parent that died before the
  death signal was armed is caught here, and the child exits at once.
* ``supervisor_alive()``: the broker's and the workers' loops ask it about once
  a second (one ``getppid``), and ``Arenas.intact()`` (jizhi/arena.py) tells
  them whether the segments they map still exist as the ones they mapped; a
  process whose supervisor or segments are gone exits with ``EXIT_STALE_RUN``.
* ``end_leftovers(instance)``: a new supervisor, once it holds the instance
  lock, ends every process of its own user still marked with its instance
  (``JIZHI_INSTANCE`` in the environment the supervisor gave its children)
  before it removes their segments or starts anything.

Runs in every jizhi process; imports nothing but the standard library.
"""
import ctypes
import os
import signal
import sys
import time

ENV_SUPERVISOR = "JIZHI_SUPERVISOR_PID"
ENV_INSTANCE = "JIZHI_INSTANCE"
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
EXIT_STALE_RUN = 6   # also in jizhi/errors.py (kept here so hold() imports nothing of jizhi)

_expected_parent = None


def child_argv(module, *args):
    """The command line of a child: a fresh interpreter running ``module``.

    ``-P``: nothing is imported from the working directory (``python -m`` would
    put it first on ``sys.path``: an ``lmdb.py`` lying there would run in every
    worker); ``PYTHONPATH`` still applies, for user stages installed that way.
    """
    return [sys.executable, "-P", "-m", module, *map(str, args)]


def child_environ(base, instance):
    """The environment the supervisor gives a child: its own pid and the instance, to be checked."""
    env = dict(base)
    env[ENV_SUPERVISOR] = str(os.getpid())
    env[ENV_INSTANCE] = instance
    return env


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl     # resolved here, never between a fork and its exec
except (OSError, AttributeError):
    _PRCTL = None


def arm(sig=signal.SIGTERM):
    """The signal the kernel sends this process when its parent dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig))


def killed_with_parent():
    """A ``preexec_fn`` for a child its parent may hold stopped (jizhi/priority.py's ``Pacer``): SIGKILL
    as its death signal from the fork on (the setting survives exec, and ``hold`` keeps it), so even a
    child stopped before its first instruction ends with its parent. Runs between fork and exec: one
    libc call."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, 9)      # SIGKILL (an int: nothing to convert in the forked child)


def _armed():
    """The death signal already set (by the parent, between fork and exec), or 0."""
    if _PRCTL is None:
        return 0
    sig = ctypes.c_int(0)
    _PRCTL(PR_GET_PDEATHSIG, ctypes.byref(sig))
    return sig.value


def hold():
    """Die with the supervisor: arm the death signal, then check the parent is still the one that started us.

    The death signal is SIGTERM, unless the supervisor set one at the fork (``killed_with_parent``:
    SIGKILL for a child it may hold stopped, which SIGTERM would never end; a loading worker arms
    SIGTERM again once it serves). Outside jizhid (no ``JIZHI_SUPERVISOR_PID``, e.g. a test running a
    broker by hand) only the death signal is armed.
    """
    global _expected_parent
    if not _armed():
        arm(signal.SIGTERM)
    want = os.environ.get(ENV_SUPERVISOR, "")
    if want.isdigit():
        _expected_parent = int(want)
        if os.getppid() != _expected_parent:
            # The supervisor died before the death signal was armed: nobody will ever stop us.
            os.write(2, f"jizhi child pid {os.getpid()}: supervisor pid {want} is gone before this process "
                        "started; exiting\n".encode())
            os._exit(EXIT_STALE_RUN)


def supervisor_alive():
    """False once the supervisor that started this process is gone (we were re-parented)."""
    return _expected_parent is None or os.getppid() == _expected_parent


def process_start():
    """When this process started, on the time.monotonic() clock (from /proc/self/stat): a child's age,
    its interpreter start and imports included."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.monotonic() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def _marked(pid, instance):
    """True when process ``pid`` belongs to our user and carries ``JIZHI_INSTANCE=instance``."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:          # gone, or not ours to read
        return False
    return f"{ENV_INSTANCE}={instance}".encode() in env


def _ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def leftovers(instance):
    """Pids of live processes of our user marked with ``instance`` (not this one, nor its ancestors)."""
    mine = _ancestors()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine and _marked(int(name), instance):
            out.append(int(name))
    return out


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _gone(pid):
    """Exited (or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def end_leftovers(instance, timeout_s=5.0):
    """SIGKILL every leftover process of ``instance``; returns [(pid, command line)] of those ended.

    Called by a new supervisor holding the instance lock, so every such process
    belongs to an ended run: none may serve again, and none holds anything we
    need (their segments are removed next). Waits (bounded) until they are gone,
    so their ports and sockets are free before anything of ours starts.
    """
    ended = []
    for pid in leftovers(instance):
        cmd = _cmdline(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            ended.append((pid, cmd))
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout_s
    while ended and time.monotonic() < end and not all(_gone(pid) for pid, _ in ended):
        time.sleep(0.02)
    return ended
