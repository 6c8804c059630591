"""The supervisor's children: the broker and the workers, and how they restart.

A ``Child`` is a process the supervisor keeps alive: the broker (there is
one), or a worker: one wid of a group of a pipeline, in one bank (each
pipeline has two banks of workers, the serving version's and a new version's
loading beside it). A child's ``key`` indexes the supervisor's children
table: ``BROKER``, or a ``WorkerKey(pipeline, group, wid, bank)``. Its
``kind`` says which; its fields name the parts of its key.

The restart policy is here too: a child that dies younger than ``YOUNG_S``
waits a backoff (doubling from ``workers.restart_backoff_s``, at most
``MAX_BACKOFF_S``) before ``manage()`` starts it again; ``RESTART_BUDGET``
such deaths in a row make it *degraded* (``jizhictl status`` says so, and the
retries go on at the slowest pace); a start that stays up ``YOUNG_S`` ends
that.

A *spawner* starts a child's process: ``spawner(argv, env)`` returns an
object with ``pid``, ``poll()``, ``send_signal()``, ``kill()`` and
``wait()``: ``popen`` (a fresh interpreter: docs/architecture.md, "Processes") in jizhid, a fake in
the unit tests that step the loop (tests/test_supervisor_steps.py).

Runs in the supervisor process only.
"""
import enum
import signal
import subprocess
from typing import NamedTuple

from jizhi import lifeline
from jizhi.shm import sigbus_cause
from jizhi.errors import (EXIT_BIND_FAILURE, EXIT_BOOT_FAILURE, EXIT_CUBE_OPEN_FAILURE, EXIT_MODEL_LOAD_FAILURE,
                          EXIT_STALE_RUN)

EXIT_MEANING = {EXIT_BOOT_FAILURE: "boot failure", EXIT_MODEL_LOAD_FAILURE: "model load failure",
                EXIT_CUBE_OPEN_FAILURE: "cube open failure",
                EXIT_STALE_RUN: "its segments were unlinked under it (another run of this instance?)",
                EXIT_BIND_FAILURE: "cannot bind its address: in use by another process (the broker's log says which)"}
YOUNG_S = 5.0        # a child that dies younger than this backs off before restart
MAX_BACKOFF_S = 10.0
RESTART_BUDGET = 5   # quick deaths in a row before a child is reported degraded


class Kind(str, enum.Enum):
    BROKER = "broker"
    WORKER = "worker"


class WorkerKey(NamedTuple):
    """A worker's place: which pipeline, group (a stage or a fused chain), wid and bank."""
    pipeline: str
    group: str
    wid: int
    bank: int


BROKER = "broker"    # the broker's key in the children table


def describe_exit(rc):
    """How a child ended, for the log and ``jizhictl status``: ``exit code 4 (model load failure)``."""
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    if rc in EXIT_MEANING:
        how += f" ({EXIT_MEANING[rc]})"
    elif rc == -signal.SIGBUS:
        how += f" ({sigbus_cause()})"
    return how


def popen(argv, env):
    """jizhid's spawner: a fresh interpreter, reading nothing from our stdin. A worker the supervisor may
    hold stopped (``--paced``) dies with it by SIGKILL from its fork on (jizhi/lifeline.py)."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=lifeline.killed_with_parent if "--paced" in argv else None)


class Child:
    """A process the supervisor keeps alive. Build one with ``Child.broker`` or ``Child.worker``."""

    def __init__(self, kind, key, argv, version=None):
        self.kind = Kind(kind)
        self.key = key          # BROKER or a WorkerKey
        self.name = BROKER if self.kind is Kind.BROKER else f"{key.pipeline}/{key.group}/{key.wid}"
        self.argv = argv
        self.version = version  # the model version a worker serves
        self.proc = None        # what the spawner returned, while the process runs
        self.started = 0.0      # supervisor clock (monotonic s)
        self.backoff_s = 0.0
        self.not_before = 0.0
        self.restarts = 0
        self.quick_deaths = 0   # deaths younger than YOUNG_S in a row; reset by a stable start
        self.last_death = None
        self.kill_at = None     # murder(): when SIGKILL follows the SIGTERM it sent
        self.retiring = False
        self.retire_by = float("inf")

    @classmethod
    def broker(cls, argv):
        return cls(Kind.BROKER, BROKER, argv)

    @classmethod
    def worker(cls, key, argv, version):
        return cls(Kind.WORKER, WorkerKey(*key), argv, version)

    @property
    def is_worker(self):
        return self.kind is Kind.WORKER

    @property
    def pipeline(self):
        return self.key.pipeline if self.is_worker else None

    @property
    def group(self):
        return self.key.group if self.is_worker else None

    @property
    def wid(self):
        return self.key.wid if self.is_worker else None

    @property
    def bank(self):
        return self.key.bank if self.is_worker else None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        """Started and not exited (polls the process)."""
        return self.proc is not None and self.proc.poll() is None

    def exited(self, rc, how, now, restart_backoff_s):
        """Account for an exit the supervisor reaped at ``now``: the backoff before the next start and
        the restart budget. Returns True when this exit spends the budget (the child is degraded)."""
        spent = False
        if rc == 0:
            self.backoff_s = 0.0
        elif now - self.started < YOUNG_S:
            self.backoff_s = min(MAX_BACKOFF_S, max(restart_backoff_s, self.backoff_s * 2))
            self.quick_deaths += 1
            self.last_death = how
            spent = self.quick_deaths == RESTART_BUDGET
        else:
            self.backoff_s = 0.0
            self.quick_deaths = 0
        self.not_before = now + self.backoff_s
        self.proc = None
        if not self.retiring:
            self.restarts += 1
        return spent

    def failing(self, now):
        """Died young and not up ``YOUNG_S`` since: failing to start (not ready)."""
        return not self.retiring and self.quick_deaths > 0 and (self.proc is None or now - self.started < YOUNG_S)

    def state(self):
        """What ``jizhictl status`` says of it: running, restarting, retiring or degraded."""
        if self.quick_deaths >= RESTART_BUDGET:
            return "degraded"
        return "retiring" if self.retiring else ("running" if self.proc else "restarting")
