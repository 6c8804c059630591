"""The disk-level cube cache, and the lookup through every storage level.

When the cube is behind a remote backend (cube/remote.py), a local LMDB
environment keeps about 1% of its keys, the most used (LFU), so most lookups
that miss the shared-memory hot tier still avoid a round trip::

    hot tier (shared memory, cube/hot.py)  ->  disk cache (local LMDB, this module)  ->  remote backend

``Levels`` asks each level in turn for the keys the previous ones lacked and
counts hits per level. The disk cache is *written while it is read*, so,
unlike a bundle's cube, it is opened with LMDB's locking: exactly one writer
process (``DiskCache``, the cache manager) and readers in the workers
(``DiskCacheReader``: one read transaction per batch, which sees one
committed state, never a half-written one).
"""
if __name__ == "__main__":
    from jizhi import lifeline
    lifeline.hold()   # first, before the imports below: this process must never outlive jizhid
import argparse
import logging
import os
import signal
import sys
import time

import lmdb
import numpy as np

from jizhi import logs
from jizhi.cube.hot import Control, KeyCounts
from jizhi.cube.remote import open_backend
from jizhi.cube.store import getmulti
from jizhi.stats import Stats

DEFAULT_MAP_BYTES = 1 << 30


class DiskCacheReader:
    """A worker's read-only view of a disk cache another process writes (LMDB with locking)."""

    def __init__(self, path, dim, max_readers=256):
        self.dim = int(dim)
        self.env = lmdb.open(str(path), readonly=True, lock=True, subdir=True, max_readers=max_readers,
                             readahead=False)

    def lookup(self, keys):
        return getmulti(self.env, np.ascontiguousarray(keys, dtype=np.uint64), self.dim)

    def close(self):
        self.env.close()


class DiskCache:
    """The one writer of a disk cache: holds at most ``capacity`` keys, the most used first."""

    def __init__(self, path, dim, capacity, map_bytes=DEFAULT_MAP_BYTES):
        self.dim = int(dim)
        self.capacity = int(capacity)
        self.env = lmdb.open(str(path), map_size=map_bytes, subdir=True, lock=True, max_readers=256,
                             readahead=False)

    def keys(self):
        with self.env.begin(buffers=True) as txn:
            raw = b"".join(bytes(k) for k in txn.cursor().iternext(keys=True, values=False))
        return np.sort(np.frombuffer(raw, dtype="<u8").astype(np.uint64))

    def lookup(self, keys):
        return getmulti(self.env, np.ascontiguousarray(keys, dtype=np.uint64), self.dim)

    def update(self, hottest, backend):
        """Make the cache hold the first ``capacity`` of ``hottest`` (keys, most used first).

        Fetches what it lacks from ``backend`` in one batch and drops what fell
        out, in one write transaction. Returns ``(added, dropped)``.
        """
        want = np.unique(np.asarray(hottest, dtype=np.uint64)[:self.capacity])
        have = self.keys()
        add = np.setdiff1d(want, have, assume_unique=True)
        drop = np.setdiff1d(have, want, assume_unique=True)
        vectors, found = backend.lookup(add) if add.shape[0] else (np.zeros((0, self.dim), np.float32),
                                                                   np.zeros(0, bool))
        with self.env.begin(write=True) as txn:
            for k in drop:
                txn.delete(int(k).to_bytes(8, "little"))
            for k, v in zip(add[found], vectors[found]):
                txn.put(int(k).to_bytes(8, "little"), np.ascontiguousarray(v, dtype="<f4").tobytes())
        return int(found.sum()), int(drop.shape[0])

    def close(self):
        self.env.close()


class HotLevel:
    """The hot tier as a level (``lookup`` like every other level)."""

    def __init__(self, table, dim):
        self.table = table
        self.dim = dim

    def lookup(self, keys):
        out = np.zeros((keys.shape[0], self.dim), dtype=np.float32)
        found = np.zeros(keys.shape[0], dtype=bool)
        self.table.lookup_into(keys, out, found)
        return out, found


class Levels:
    """Storage levels, fastest first: each is asked only for what the ones before it lacked.

    ``hits[name]`` counts the keys each level answered; ``missing`` the keys no
    level had (they read their field's default vector).
    """

    def __init__(self, levels, dim):
        self.levels = list(levels)      # [(name, store)]
        self.dim = int(dim)
        self.hits = {name: 0 for name, _ in self.levels}
        self.lookups = 0
        self.missing = 0

    def lookup(self, keys):
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        k = keys.shape[0]
        self.lookups += k
        out = np.zeros((k, self.dim), dtype=np.float32)
        found = np.zeros(k, dtype=bool)
        todo = np.arange(k)
        for name, store in self.levels:
            if todo.shape[0] == 0:
                break
            v, f = store.lookup(keys[todo])
            got = todo[f]
            out[got] = v[f]
            found[got] = True
            self.hits[name] += int(got.shape[0])
            todo = todo[~f]
        self.missing += int(todo.shape[0])
        return out, found


class LazyDiskCache:
    """A worker's disk-cache level: all misses until the cache manager has created the environment."""

    def __init__(self, path, dim):
        self.path = str(path)
        self.dim = int(dim)
        self.reader = None

    def lookup(self, keys):
        if self.reader is None and os.path.exists(os.path.join(self.path, "lock.mdb")):
            try:
                self.reader = DiskCacheReader(self.path, self.dim)
            except lmdb.Error:
                self.reader = None
        if self.reader is None:
            return np.zeros((keys.shape[0], self.dim), np.float32), np.zeros(keys.shape[0], bool)
        return self.reader.lookup(keys)


def manage_main(argv=None):
    """``python -m jizhi.cube.cache``: the disk cache's one writer (started and stopped by jizhid).

    Every ``--interval-s`` it folds the keys the version's cube_accessor
    workers sampled (their stats rows' rings) into decayed counts and makes the
    cache hold the ``--capacity`` most used, fetching what it lacks from the
    remote backend in one batch. While the version's hot tier (``--hot-control``)
    holds the whole cube, nothing reads the disk cache, and the manager idles.
    """
    ap = argparse.ArgumentParser(prog="python -m jizhi.cube.cache", description=manage_main.__doc__.split("\n")[0])
    ap.add_argument("--env", required=True, help="the cache's LMDB directory (created)")
    ap.add_argument("--remote", required=True, help="the backend URL (cube/remote.py)")
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--capacity", type=int, required=True, help="keys the cache holds at most")
    ap.add_argument("--stats-segment", required=True)
    ap.add_argument("--stats-rows", type=int, required=True, help="rows of the stats segment")
    ap.add_argument("--rows", required=True, help="comma-separated stats rows of the version's workers")
    ap.add_argument("--interval-s", type=float, default=1.0)
    ap.add_argument("--hot-control", help="the version's hot-tier control segment (idle while it is whole)")
    args = ap.parse_args(argv)
    logs.setup("jizhi.cube.cache")
    log = logging.getLogger("jizhi.cube.cache")
    running = [True]
    signal.signal(signal.SIGTERM, lambda s, f: running.__setitem__(0, False))
    os.makedirs(args.env, exist_ok=True)
    cache = DiskCache(args.env, args.dim, args.capacity)
    # (a cube not in the cluster, or refused credentials: logged, its lookups degrade, retried: never a crash loop)
    backend = open_backend(args.remote, args.dim, background=True, required=False)
    stats = Stats.attach({"segment": args.stats_segment, "rows": args.stats_rows})
    rows = [int(r) for r in args.rows.split(",") if r]
    counts = KeyCounts(limit=4 * args.capacity)
    seen = {}
    control = None
    idle = False
    while running[0]:
        time.sleep(args.interval_s)
        if args.hot_control and control is None:
            try:
                control = Control(args.hot_control)
            except FileNotFoundError:
                pass
        whole = control is not None and control.generation > 0 and control.whole(control.generation)
        if whole != idle:
            idle = whole
            log.info("disk cache %s: %s", args.env, "idle: the hot tier holds the whole cube" if idle else "active")
        if idle:
            for r in rows:
                seen[r] = int(stats.keys_pos[r])          # skip what was sampled meanwhile
            continue
        for r in rows:
            keys, seen[r] = stats.sampled_keys(r, seen.get(r, 0))
            counts.add(keys)
        if counts.seen:
            added, dropped = cache.update(counts.top(args.capacity), backend)
            counts.decay()
            if added or dropped:
                log.debug("disk cache %s: +%d -%d keys", args.env, added, dropped)    # (routine: every second)
    cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(manage_main())
