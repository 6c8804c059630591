"""The hot tier: a shared-memory open-addressing table of signatures and their vectors.

Every ``cube_accessor`` worker of a model version reads it with one
Numba-compiled batch lookup per micro-batch, in front of the LMDB cube
(``TieredStore``): a hit costs a hash probe and a 128-byte copy instead of
a B+tree walk. A table is *never written while readers use it*: each build
is a new segment (a new *generation*), filled by a builder process
(``python -m jizhi.cube.hot build ...``, started by the supervisor: reading
the cube's memory map can SIGBUS if its file was truncated, which must not
kill the supervisor), then published through the version's small control
segment. Readers look at the control segment at each batch boundary and
switch; the supervisor unlinks an old generation once every reader reports
(in its stats row) that it moved on.

Sizing: ``cube.hot_tier_mb``. The default budget holds the whole demo cube,
so every lookup hits; when a cube is larger, the hottest keys that fit are
chosen from the key frequencies workers sample (LFU).

Segment layouts (little-endian):

* table ``jizhi.<instance>.<run>.hot.<pipeline>.v<version>.g<generation>``:
  header int64[8] (magic, capacity, dim, n_keys, has_zero, generation, 0, 0),
  keys uint64[capacity] (0 = empty slot), vectors float32[capacity + 1, dim]
  (row ``capacity`` holds signature 0's vector when ``has_zero``).
* control ``jizhi.<instance>.<run>.hot.<pipeline>.v<version>.ctl``: int64[8]
  (generation, n_keys, capacity, built_at_ms, 0...). Written only by the
  supervisor; generation 0 = no table yet.
"""
if __name__ == "__main__":
    from jizhi import lifeline
    lifeline.hold()   # first, before the imports below: this process must never outlive jizhid
import argparse
import json
import os
import sys
import time

import numpy as np
from numba import njit

from jizhi import shm

MAGIC = 0x4A5A484F54  # "JZHOT"
HEADER_WORDS = 8
CTL_WORDS = 8
MAX_LOAD = 0.5        # keys per slot at most: short probe chains
SAMPLE_PER_BATCH = 64  # keys a worker samples per micro-batch for the LFU counts


def capacity_for(n_keys):
    """Slots for ``n_keys`` (a power of two, load factor <= MAX_LOAD)."""
    c = 16
    while c * MAX_LOAD < n_keys:
        c *= 2
    return c


def table_bytes(capacity, dim):
    return HEADER_WORDS * 8 + capacity * 8 + (capacity + 1) * dim * 4


def keys_for_budget(budget_bytes, dim):
    """How many keys a table of at most ``budget_bytes`` holds."""
    n = max(0, budget_bytes // (2 * 8 + 2 * dim * 4) - 1)
    while n > 0 and table_bytes(capacity_for(n), dim) > budget_bytes:
        n = int(n * 0.95)
    return n


@njit(cache=True, nogil=True, inline="always")
def _slot(key, mask):
    # splitmix64 finaliser: signatures are hashes already, but cheap insurance against structure.
    x = key
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x7FB5D329728EA185)
    x ^= x >> np.uint64(27)
    return x & mask


@njit(cache=True, nogil=True)
def _insert(keys, vectors, tkeys, tvals):
    mask = np.uint64(tkeys.shape[0] - 1)
    zero = tkeys.shape[0]
    has_zero = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        if k == 0:
            tvals[zero, :] = vectors[i, :]
            has_zero = 1
            continue
        s = _slot(k, mask)
        while tkeys[s] != 0 and tkeys[s] != k:
            s = (s + np.uint64(1)) & mask
        tkeys[s] = k
        tvals[s, :] = vectors[i, :]
    return has_zero


@njit(cache=True, nogil=True)
def _probe(k, tkeys, has_zero, mask):
    """Row of ``k`` in the table, -1 when absent."""
    if k == 0:
        return tkeys.shape[0] if has_zero else -1
    s = _slot(k, mask)
    while True:
        t = tkeys[s]
        if t == k:
            return np.int64(s)
        if t == 0:
            return -1
        s = (s + np.uint64(1)) & mask


@njit(cache=True, nogil=True)
def _lookup(keys, tkeys, tvals, has_zero, out, found):
    """out[i] = vector of keys[i] where present (found[i] = True); others untouched. Returns hits."""
    mask = np.uint64(tkeys.shape[0] - 1)
    hits = 0
    D = tvals.shape[1]
    for i in range(keys.shape[0]):
        row = _probe(keys[i], tkeys, has_zero, mask)
        if row < 0:
            continue
        for d in range(D):
            out[i, d] = tvals[row, d]
        found[i] = True
        hits += 1
    return hits


@njit(cache=True, nogil=True)
def _pool_hot(sigs, lens, sums, defaults, tkeys, tvals, has_zero, out, miss_at, miss_keys, sample, step, phase):
    """Pool the bags of one block straight from the table (no dedup, no gather).

    sigs [R, F, L], lens [R, F], sums [F] (sum pooling, else mean), defaults [F, D]
    (each field's default vector: an empty bag pools to it), out [R, F, D].
    A bag's misses are left for the caller: their flat bag index r * F + f in
    ``miss_at`` and key in ``miss_keys``; the bag's hits are already scaled by
    1 / len for mean pooling. Every ``step``-th key from ``phase`` on goes into
    ``sample`` (the LFU input; a moving phase gives every position its turn).
    Returns (keys probed, hits, misses, keys sampled).
    """
    R, F = lens.shape
    D = out.shape[2]
    mask = np.uint64(tkeys.shape[0] - 1)
    acc = np.zeros(D, dtype=np.float32)
    total, hits, nm, ns = 0, 0, 0, 0
    countdown = phase % step     # keys until the next sample (no division per key)
    for r in range(R):
        for f in range(F):
            n = lens[r, f]
            acc[:] = 0.0
            for j in range(n):
                k = sigs[r, f, j]
                if countdown == 0:
                    if ns < sample.shape[0]:
                        sample[ns] = k
                        ns += 1
                    countdown = step
                countdown -= 1
                total += 1
                row = _probe(k, tkeys, has_zero, mask)
                if row < 0:
                    miss_at[nm] = r * F + f
                    miss_keys[nm] = k
                    nm += 1
                    continue
                hits += 1
                v = tvals[row]
                for d in range(D):
                    acc[d] += v[d]
            o = out[r, f]
            if n == 0:
                for d in range(D):
                    o[d] = defaults[f, d]
                continue
            scale = np.float32(1.0)
            if not sums[f]:
                scale = np.float32(1.0) / np.float32(n)
            for d in range(D):
                o[d] = acc[d] * scale
    return total, hits, nm, ns


@njit(cache=True, nogil=True)
def _add_misses(miss_at, inv, vectors, found, lens, sums, defaults, out, missing):
    """Add the slower levels' vectors of a block's misses to their bags (a key absent from every level: its
    field's default vector); count absent keys per row."""
    F = lens.shape[1]
    D = out.shape[2]
    for m in range(miss_at.shape[0]):
        b = miss_at[m]
        r, f = b // F, b % F
        v = inv[m]
        scale = np.float32(1.0) if sums[f] else np.float32(1.0) / np.float32(lens[r, f])
        if not found[v]:
            missing[r] += 1
            for d in range(D):
                out[r, f, d] += defaults[f, d] * scale
            continue
        for d in range(D):
            out[r, f, d] += vectors[v, d] * scale


def _views(mm):
    header = np.ndarray((HEADER_WORDS,), dtype=np.int64, buffer=mm)
    if int(header[0]) != MAGIC:
        raise ValueError("not a hot-tier table (bad magic)")
    capacity, dim = int(header[1]), int(header[2])
    keys = np.ndarray((capacity,), dtype=np.uint64, buffer=mm, offset=HEADER_WORDS * 8)
    vals = np.ndarray((capacity + 1, dim), dtype=np.float32, buffer=mm, offset=HEADER_WORDS * 8 + capacity * 8)
    return header, keys, vals


class HotTable:
    """One generation of a hot tier, mapped read-only."""

    def __init__(self, name):
        self.name = name
        self.mm, _ = shm.attach(name, writable=False)
        self.header, self.keys, self.vals = _views(self.mm)
        self.capacity = int(self.header[1])
        self.dim = int(self.header[2])
        self.n_keys = int(self.header[3])
        self.has_zero = int(self.header[4])
        self.generation = int(self.header[5])

    def lookup_into(self, keys, out, found):
        return _lookup(keys, self.keys, self.vals, self.has_zero, out, found)

    def pool_into(self, sigs, lens, sums, defaults, out, miss_at, miss_keys, sample, step, phase):
        return _pool_hot(sigs, lens, sums, defaults, self.keys, self.vals, self.has_zero, out, miss_at, miss_keys,
                         sample, step, phase)


def fill(name, keys, vectors, generation):
    """Builder side: write ``keys``/``vectors`` into the (created, zeroed) table segment ``name``."""
    n = keys.shape[0]
    capacity = capacity_for(n)
    dim = vectors.shape[1]
    mm, _ = shm.attach(name, size=table_bytes(capacity, dim))
    try:
        header = np.ndarray((HEADER_WORDS,), dtype=np.int64, buffer=mm)
        header[1], header[2], header[3], header[5] = capacity, dim, n, generation
        header[0] = MAGIC
        _, tkeys, tvals = _views(mm)
        header[4] = _insert(np.ascontiguousarray(keys, dtype=np.uint64),
                            np.ascontiguousarray(vectors, dtype=np.float32), tkeys, tvals)
        del header, tkeys, tvals
    finally:
        mm.close()


def private_table(keys, vectors):
    """A table of all of ``keys`` in a fresh segment, mapped and already unlinked: this process's
    own (the storage micro-benchmark, the ceiling); nothing is left in /dev/shm whatever happens next."""
    name = f"{shm.PREFIX}private-{os.getpid()}-{time.monotonic_ns()}.hot.g1"
    shm.create(name, table_bytes(capacity_for(keys.shape[0]), vectors.shape[1]))
    try:
        fill(name, keys, vectors, 1)
        return HotTable(name)
    finally:
        shm.unlink(name)


class Control:
    """The control segment of one version's hot tier: which generation to read."""

    def __init__(self, name, writable=False):
        self.name = name
        self.mm, _ = shm.attach(name, writable)
        self.words = np.ndarray((CTL_WORDS,), dtype=np.int64, buffer=self.mm)

    @property
    def generation(self):
        return int(self.words[0])

    def publish(self, generation, n_keys, capacity, whole=False):
        """``whole``: the table holds every key of the cube, so a key it lacks is absent from the cube
        (word 4 names the generation this is true of; a reader of another generation ignores it)."""
        self.words[1], self.words[2], self.words[3] = n_keys, capacity, int(time.monotonic() * 1000)
        self.words[4] = generation if whole else 0
        self.words[0] = generation   # last: a reader that sees it sees a complete table

    def whole(self, generation):
        return int(self.words[4]) == generation


class TieredStore:
    """The cube as a stage reads it: the hot tier first, the LMDB cube for the rest.

    ``spec``: {"control": segment, "table": name pattern with {generation}} or None
    (no hot tier). ``refresh()`` runs at batch boundaries: a new generation is
    attached and the old one dropped. Counts the keys read (``lookups``) and
    the hot tier's hits for the stats row: the hot tier probes every signature
    of a batch, the levels below read each of its misses once per batch
    (deduplicated), so ``lookups`` = hot hits + keys read below.
    """

    def __init__(self, cube, spec):
        self.cube = cube
        self.dim = cube.dim
        self.spec = spec
        self.control = None
        self.table = None
        self.hot_hits = 0
        self.lookups = 0
        self.ring = None            # the worker's key-sample ring (jizhi/stats.py: keys, keys_pos)
        self.ring_pos = None
        # The attached table holds the whole cube: its misses are absent from the cube, and nothing
        # below is asked (a remote cube's absent keys would otherwise cost a round trip per batch).
        self.whole = False

    def attach_sampler(self, ring, pos):
        """Write up to SAMPLE_PER_BATCH of each batch's keys into ``ring`` (this worker's row only)."""
        self.ring, self.ring_pos = ring, pos

    def sample(self, keys):
        k = keys.shape[0]
        if self.ring is None or k == 0:
            return
        step = max(1, k // SAMPLE_PER_BATCH)
        s = keys[(self.lookups // 7) % step::step][:SAMPLE_PER_BATCH]   # a moving offset: every key gets its turn
        n, size = s.shape[0], self.ring.shape[0]
        p = int(self.ring_pos[0]) % size
        first = min(n, size - p)
        self.ring[p:p + first] = s[:first]
        self.ring[:n - first] = s[first:]
        self.ring_pos[0] += n

    @property
    def generation(self):
        return self.table.generation if self.table is not None else 0

    def refresh(self):
        if self.spec is None:
            return
        if self.control is None:
            try:
                self.control = Control(self.spec["control"])
            except FileNotFoundError:
                return
        gen = self.control.generation
        if gen and gen != self.generation:
            try:
                table = HotTable(self.spec["table"].format(generation=gen))
            except (FileNotFoundError, ValueError):
                return     # not there (yet, or already replaced): keep what we have
            self.table = table
            self.whole = self.control.whole(gen)

    def pool_ready(self):
        """True when a hot table is attached: ``pool`` then serves the batch (cube/pooling.py)."""
        return self.table is not None

    def pool(self, blocks, sums, defaults):
        """``pool_blocks`` through the hot table: every signature is probed where it lies, and
        only the misses (deduplicated) go to the slower levels. ``defaults``: per block, float32 [F, dim]
        (each field's default vector). Returns ``(pooled, missing)``."""
        pooled, missing, misses = [], [], []
        sample = np.zeros(SAMPLE_PER_BATCH, dtype=np.uint64)
        for (sigs, lens), sm, dv in zip(blocks, sums, defaults):
            lens = np.ascontiguousarray(lens, dtype=np.int32)
            sigs = np.ascontiguousarray(sigs, dtype=np.uint64)
            sm = np.ascontiguousarray(sm, dtype=np.bool_)
            r, f = lens.shape
            n = int(lens.sum())
            out = np.empty((r, f, self.dim), dtype=np.float32)
            miss_at = np.empty(n, dtype=np.int64)
            miss_keys = np.empty(n, dtype=np.uint64)
            step = max(1, n // SAMPLE_PER_BATCH)
            _, hits, nm, ns = self.table.pool_into(sigs, lens, sm, dv, out, miss_at, miss_keys, sample, step,
                                                   (self.lookups // 7) % step)
            self.sample(sample[:ns])
            self.lookups += hits      # the misses count once each below, when the levels read them
            self.hot_hits += hits
            pooled.append(out)
            missing.append(np.zeros(r, dtype=np.int64))
            misses.append((miss_at[:nm], miss_keys[:nm], lens, sm, dv))
        if any(m[0].shape[0] for m in misses):
            # One deduplicated read of every block's misses from the levels below.
            uniq, inv = np.unique(np.concatenate([m[1] for m in misses]), return_inverse=True)
            if self.whole:
                vectors, found = np.zeros((uniq.shape[0], self.dim), np.float32), np.zeros(uniq.shape[0], bool)
            else:
                vectors, found = self.cube.lookup(uniq)
            self.lookups += uniq.shape[0]
            inv = inv.astype(np.int64, copy=False).reshape(-1)
            p = 0
            found = np.ascontiguousarray(found, dtype=np.bool_)
            for (at, _, lens, sm, dv), out, miss in zip(misses, pooled, missing):
                _add_misses(at, inv[p:p + at.shape[0]], vectors, found, lens, sm, dv, out, miss)
                p += at.shape[0]
        return pooled, missing

    def lookup(self, keys):
        """``(vectors float32[K, dim], found bool[K])`` of sorted unique ``keys``."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        k = keys.shape[0]
        self.sample(keys)
        self.lookups += k
        if self.table is None:
            return self.cube.lookup(keys)
        out = np.zeros((k, self.dim), dtype=np.float32)
        found = np.zeros(k, dtype=bool)
        hits = self.table.lookup_into(keys, out, found)
        self.hot_hits += hits
        if hits < k and not self.whole:
            miss = np.flatnonzero(~found)
            v, f = self.cube.lookup(keys[miss])
            out[miss] = v
            found[miss] = f
        return out, found


class KeyCounts:
    """LFU input, in the supervisor: decayed counts of the keys workers sampled (a sample, not every lookup).

    ``add(keys)`` counts a batch of sampled keys; ``decay()`` halves every
    count (recent popularity wins) and forgets the coldest beyond ``limit``
    keys; ``top(n)`` is the hottest keys first.
    """

    def __init__(self, limit):
        self.limit = int(limit)
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.float64)
        self.seen = 0

    def add(self, keys):
        if keys.shape[0] == 0:
            return
        self.seen += keys.shape[0]
        u, n = np.unique(keys, return_counts=True)
        k = np.union1d(self.keys, u)
        c = np.zeros(k.shape[0])
        c[np.searchsorted(k, self.keys)] = self.counts
        c[np.searchsorted(k, u)] += n
        self.keys, self.counts = k, c

    def decay(self):
        self.counts *= 0.5
        if self.keys.shape[0] > self.limit:
            keep = np.sort(np.argpartition(-self.counts, self.limit)[:self.limit])
            self.keys, self.counts = self.keys[keep], self.counts[keep]

    def top(self, n):
        order = np.argsort(-self.counts, kind="stable")[:n]
        return self.keys[order]


def build_main(argv=None):
    """``python -m jizhi.cube.hot build``: fill a table segment from a cube (all keys, or the listed ones)."""
    ap = argparse.ArgumentParser(prog="python -m jizhi.cube.hot",
                                 description="Fill a hot-tier segment from an LMDB cube (started by jizhid).")
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--segment", required=True, help="the table segment to create (named by the supervisor, "
                                                       "which unlinks it)")
    ap.add_argument("--cube", required=True, help="the cube directory (LMDB)")
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--generation", type=int, required=True)
    ap.add_argument("--budget-bytes", type=int, required=True, help="the table's size limit (cube.hot_tier_mb)")
    ap.add_argument("--keys", help=".npy of the keys to hold, hottest first (default: the cube's keys, "
                                   "when they all fit)")
    ap.add_argument("--remote", help="read vectors from this backend (cube/remote.py) instead of --cube; "
                                     "without --keys: the whole cube when the backend can list it and it "
                                     "fits the budget, else the table starts empty")
    args = ap.parse_args(argv)
    from jizhi import logs
    logs.setup("jizhi.cube.hot")    # stderr, in the log format (a cube's reader may warn); stdout is the result
    t0 = time.monotonic()
    max_keys = keys_for_budget(args.budget_bytes, args.dim)
    if args.remote:
        from jizhi.cube.connect import RedisError
        from jizhi.cube.remote import open_backend
        try:
            cube = open_backend(args.remote, args.dim, background=True)
        except (LookupError, ValueError, OSError, RedisError) as e:
            # (a cluster that came back without the cube, credentials refused): one line, the supervisor logs it
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            return 1
        keys = np.load(args.keys) if args.keys else np.zeros(0, np.uint64)
        total = -1      # unknown: the tier holds part of it, rebuilt from the most used keys
        count = cube.key_count()
        if args.keys is None and 0 < count <= max_keys:
            # a remote cube that fits the budget is held whole, as a local one is: listed from its shards
            keys, total = cube.all_keys(), count
    else:
        from jizhi.cube.store import cube_keys, open_cube
        cube = open_cube(args.cube, args.dim)
        keys = np.load(args.keys) if args.keys else cube_keys(cube)
        total = keys.shape[0]
    keys = np.unique(keys[:max_keys].astype(np.uint64))
    vectors, found = cube.lookup(keys)
    keys, vectors = keys[found], vectors[found]
    from jizhi.errors import ShmFull
    capacity = capacity_for(keys.shape[0])
    try:
        shm.create(args.segment, table_bytes(capacity, args.dim))
    except ShmFull as e:
        print(json.dumps({"error": str(e)}))    # the supervisor logs it with the exit code
        return 1
    fill(args.segment, keys, vectors, args.generation)
    print(json.dumps({"keys": int(keys.shape[0]), "cube_keys": int(total), "capacity": capacity,
                      "bytes": table_bytes(capacity, args.dim),
                      "build_ms": round((time.monotonic() - t0) * 1000, 1)}))
    return 0


# Compile at import, not in the first request.
_tk = np.zeros(16, np.uint64)
_tv = np.zeros((17, 2), np.float32)
_insert(np.array([3], np.uint64), np.ones((1, 2), np.float32), _tk, _tv)
_lookup(np.array([3, 5], np.uint64), _tk, _tv, 0, np.zeros((2, 2), np.float32), np.zeros(2, np.bool_))
_pool_hot(np.array([[[3, 5]]], np.uint64), np.array([[2]], np.int32), np.zeros(1, np.bool_),
          np.zeros((1, 2), np.float32), _tk, _tv, 0, np.zeros((1, 1, 2), np.float32), np.zeros(2, np.int64), np.zeros(2, np.uint64),
          np.zeros(2, np.uint64), 1, 0)
_add_misses(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones((1, 2), np.float32), np.ones(1, np.bool_),
            np.ones((1, 1), np.int32), np.zeros(1, np.bool_), np.zeros((1, 2), np.float32),
            np.zeros((1, 1, 2), np.float32), np.zeros(1, np.int64))
del _tk, _tv

if __name__ == "__main__":
    sys.exit(build_main())
