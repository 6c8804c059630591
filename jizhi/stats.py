"""The stats path: per-wid slots in shared memory, one writer per slot.

The supervisor creates one segment (``jizhi.<instance>.<run>.stats``) with a
row per possible worker (every group gets ``2 x workers.max_pool`` rows: a bank
for the serving version's workers and one for a new version loading beside
them, indexed by bank x max_pool + wid) and a row per pipeline for the broker. A worker writes only its own
row, from the loop that does the work: a heartbeat timestamp
(``time.monotonic()``), its pid, counters, and per-stage service-time
histograms. The broker writes its pipelines' rows: request latency
histograms, errors by code, candidates dropped for a non-finite score,
ok replies to a user the profiles do not know.
The supervisor reads every row (heartbeats for
hung workers, the Prometheus endpoint, ``jizhictl stats``); nothing per event
travels to it over a socket.

Buckets are chosen for sub-millisecond to 100 ms stage times (microseconds,
upper bounds; the last is +Inf).
"""
import bisect
import os
import time

import numpy as np

from jizhi import shm
from jizhi.errors import CODES

BUCKETS_US = np.array([50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500,
                       10_000, 15_000, 20_000, 30_000, 50_000, 75_000, 100_000, 2 ** 62], dtype=np.int64)
NB = BUCKETS_US.shape[0]
_BOUNDS = BUCKETS_US.tolist()     # for bisect: 0.6 us an observation against 3.1 us through np.searchsorted
MAX_STAGES = 8
# Per-row counters (int64): index -> meaning
C_PID, C_EVENTS, C_REQUESTS, C_FAILED, C_RSS, C_LOOKUPS, C_HOT_HITS, C_HOT_GEN, C_DISK_HITS, C_REMOTE_KEYS = range(10)
# a remote cube's keys no shard answered (they read the default vector), and its round trips (one per shard per batch)
C_REMOTE_DEGRADED, C_REMOTE_TRIPS = 10, 11
# a pipeline's row (the broker): candidates dropped from ok replies because their score was NaN or infinite
C_INVALID_SCORES = 12
# a pipeline's row (the broker): ok replies whose user the profiles do not know (the reply's unknown_user)
C_UNKNOWN_USERS = 13
# a worker with a query_cache stage (workers/query_cache.py): its state (QC_ON or QC_BYPASSED; 0: no cache), and its
# last judgement: hit ratio (parts per million), what a hit saves and what the cache costs per candidate (ns), how
# many judgements and how many switches
C_QC_STATE, C_QC_HIT_PPM, C_QC_SAVED_NS, C_QC_COST_NS, C_QC_JUDGED, C_QC_SWITCHES = range(14, 20)
QC_ON, QC_BYPASSED = 1, 2
# a data_reader with user rows on Redis (cube/userrows.py): users whose row came from Redis (or its local cache),
# users whose row no master answered or whose layout was refused (they read the snapshot's), local cache hits
C_USER_ROWS, C_USER_ROWS_DEGRADED, C_USER_ROWS_CACHED = 20, 21, 22
KEY_RING = 4096   # sampled keys kept per worker row (the supervisor reads them every cube.hot_rebuild_s)
BANKS = 2   # rows per wid: the serving version's worker and a loading version's (double buffering)
N_COUNTERS = 23
# The CPU account (``jizhictl bench --cpu``): CPU nanoseconds of the thread that does a process's work, by
# phase. A worker row: its stages by index (0 .. MAX_STAGES - 1), then its runtime's phases: receive (read
# and decode an event), assemble (everything of an event outside its stages and writes: deadlines, the
# arena reads, narrowing), write (the arenas), done (encode and send). The broker: one row of its own
# (``broker_cpu_ns``): admission (the frontend's messages read and admitted), dispatch (events built and
# sent), done (every backend message: DONE, and also READY, heartbeats and the supervisor's), reply (ok
# replies built and sent; error replies count where they arise), housekeeping (timers and the sweep).
WORKER_PHASES = ("receive", "assemble", "write", "done")
W_RECEIVE, W_ASSEMBLE, W_WRITE, W_DONE = range(MAX_STAGES, MAX_STAGES + len(WORKER_PHASES))
N_CPU = MAX_STAGES + len(WORKER_PHASES)
BROKER_PHASES = ("admission", "dispatch", "done", "reply", "housekeeping")
B_ADMISSION, B_DISPATCH, B_DONE, B_REPLY, B_HOUSEKEEPING = range(len(BROKER_PHASES))


def layout(rows):
    """Byte offsets of the arrays in a segment of ``rows`` rows."""
    parts = [("heartbeat", np.float64, (rows,)),
             ("counters", np.int64, (rows, N_COUNTERS)),
             ("errors", np.int64, (rows, len(CODES))),
             ("hist", np.int64, (rows, MAX_STAGES, NB)),
             ("sum_us", np.int64, (rows, MAX_STAGES)),
             ("cpu_ns", np.int64, (rows, N_CPU)),
             ("broker_cpu_ns", np.int64, (len(BROKER_PHASES),)),
             # cube_accessor workers: a ring of sampled looked-up keys (the hot tier's LFU input)
             ("keys", np.uint64, (rows, KEY_RING)),
             ("keys_pos", np.int64, (rows,))]
    out, off = [], 0
    for name, dt, shape in parts:
        out.append((name, dt, shape, off))
        off += int(np.prod(shape)) * np.dtype(dt).itemsize
    return out, off


def segment_bytes(rows):
    return layout(rows)[1]


def row_map(plans, max_pool):
    """{"pipeline/group": first row} for workers and {"pipeline": row} for the broker; and the row count."""
    rows, n = {}, 0
    for pname, plan in plans.items():
        rows[pname] = n
        n += 1
        for g in plan["groups"]:
            rows[f"{pname}/{g}"] = n
            n += BANKS * max_pool
    return rows, n


class Stats:
    """A mapping of the stats segment. Each process writes only its own rows."""

    def __init__(self, name, rows):
        self.mm, _ = shm.attach(name, size=segment_bytes(rows))
        for pname, dt, shape, off in layout(rows)[0]:
            setattr(self, pname, np.ndarray(shape, dtype=dt, buffer=self.mm, offset=off))
        self.rows = rows

    @classmethod
    def attach(cls, spec):
        return cls(spec["segment"], spec["rows"]) if spec else None

    def sampled_keys(self, row, last_pos):
        """The keys ``row``'s worker sampled since its ring position ``last_pos``, and the position now.

        Readers of the rings (the hot tier's LFU counts, a disk cache's manager) keep ``last_pos`` per row.
        """
        pos = int(self.keys_pos[row])
        if pos < last_pos:
            last_pos = 0        # a new worker process started the row again
        new = min(pos - last_pos, KEY_RING)
        return self.keys[row, np.arange(pos - new, pos) % KEY_RING].copy(), pos

    def observe(self, row, stage_index, us):
        """Add one observation of ``us`` microseconds to a row's histogram ``stage_index``."""
        us = int(us)
        b = bisect.bisect_left(_BOUNDS, us)     # np.searchsorted's side="left"
        self.hist[row, stage_index, b if b < NB else NB - 1] += 1
        self.sum_us[row, stage_index] += us


class CpuPhases:
    """This thread's CPU time by phase, added to ``out`` (int64 nanoseconds, indexed by phase).

    ``enter(p)`` ... ``leave()``: the CPU between them goes to ``p``, less what phases entered inside it
    took (each nanosecond counts once, in the innermost phase). A phase that raises must still ``leave``
    (``try/finally``). Each call reads the thread's CPU clock (``CLOCK_THREAD_CPUTIME_ID``: about 0.75 us
    here, a system call), so phases are per batch or per burst, a few per request at most.
    """

    __slots__ = ("out", "stack", "t")

    def __init__(self, out=None):
        self.out = np.zeros(max(N_CPU, len(BROKER_PHASES)), dtype=np.int64) if out is None else out
        self.stack = []
        self.t = 0

    def enter(self, phase):
        now = time.thread_time_ns()
        if self.stack:
            self.out[self.stack[-1]] += now - self.t
        self.stack.append(phase)
        self.t = now

    def leave(self):
        now = time.thread_time_ns()
        self.out[self.stack.pop()] += now - self.t
        self.t = now


def rss_bytes(pid=None):
    """Resident set size of a process (default: this one) from /proc, or 0."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
