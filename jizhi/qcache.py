"""The query cache: user-item scores shared by every worker process.

JIZHI's user-item score cache: a later request for the same (user, item) under
the same model version reuses the score instead of recomputing it, within a
time window (``window_ms``, default 120 s), under a fixed memory bound, and
never after feedback from that user has been acknowledged.

Who does what
-------------
* The **supervisor** creates the segment (``init``: ``jizhi.shm.create``,
  then the header) before it starts the broker, puts the returned spec (a
  small msgpack-able dict) into the run plan, and unlinks the segment at stop.
* The **broker** is the single writer of the epoch table: when it admits a
  ``feedback`` message it calls ``bump_epochs(users)`` *before* it
  acknowledges the feedback. The acknowledgement is a system call, so the
  bump is visible to every other process by the time the client sees it.
* A **scoring worker** (writer index ``writer`` in ``0..writers-1``: its wid
  within the storing stage, stable and reused, so a restarted worker takes
  over its predecessor's region) calls ``epochs_of(users)`` at the start of a
  request, ``lookup`` to find what it need not compute, and ``store`` for what
  it computed, with the epochs it read at the start. A writer writes only its
  own region; a lookup probes every region.

Everything here is safe across processes without locks, fences or atomics
(Numba has none): see "Why a torn slot never reads as a score" below. All
calls take whole batches and run one Numba kernel: no Python loop over
candidates.

Segment layout (little-endian; offsets in bytes)
------------------------------------------------
::

    0     header     uint64[64]  magic "JZQCACHE", layout, writers,
                                 slots_per_writer, ways, epoch_buckets,
                                 window_ms, time base (time.monotonic_ns()
                                 of the creator), epochs offset, slots
                                 offset, words per slot; from word 16,
                                 each pipeline's mode (bypassed or on,
                                 for all its workers: H_MODES)
    512   epochs     uint32[epoch_buckets]       (padded to 64 bytes)
    ...   slots      uint64[writers, sets, ways, 6]   sets = slots / ways

A slot is six words (48 bytes; with 4 or 8 ways a set starts on a cache line)::

    0 user     1 item     2 version | epoch << 32
    3 float32 score bits (low half; high half 0)
    4 time_ms (uint64, since the header's time base)
    5 check = mix(SEED, w0, w1, w2, w3, w4), splitmix64-style

The set of (user, item) is a hash of the pair (not of the version, so the
entries of two versions of one pair compete in one set). A set holds ``ways``
entries; a store takes a never-written way (ways fill in order), else
refreshes the entry of the same (user, item, version) in place, else takes
the way stored longest ago. The kernels compute every candidate's set first
and prefetch the sets ``AHEAD`` candidates on, so the DRAM misses of a batch
overlap instead of queueing one after another.
Readers never write, so a hit does not refresh an entry: "LRU" here is
"least recently stored", which the time window makes the same thing in
practice (an entry older than the window is worthless anyway).

Why a torn slot never reads as a score
--------------------------------------
A writer stores the six words with plain stores, in whatever order the
compiler and the CPU choose; a reader loads each of the six words once into a
local (an aligned 8-byte load is never split on x86-64 or arm64), recomputes
the check from the five it loaded and compares it with the sixth it loaded;
every later decision (key, version, epoch, age) and the score it returns use
those same locals. A reader that raced a writer holds words of two (or more)
different writes; their check then matches only if the words it got from
the other write are equal to the ones that belong to the check, i.e. when
the mixture *is* a slot that was written, or by a 64-bit hash collision
(~2**-64 per torn read). So a slot reads either as exactly what one store
wrote or as a miss: never as another key's score, a stale version, an old
epoch or a half-written value. A zeroed (never written) slot fails the check
too (``mix`` of zeros is not 0), so key (0, 0) is safe; a writer killed in
the middle of a store leaves a slot that reads as a miss until it is reused.
The argument does not even need the one-writer rule: two processes storing
into one region only lose entries. The rule is there so a writer can pick
its victim from a region nobody else changes.

Epochs
------
``epochs`` is a direct-mapped uint32 table indexed by a hash of the user
(``epoch_buckets``, a power of two). An entry stores the epoch it was
computed under; a lookup compares it with the user's current epoch. Two
users sharing a bucket invalidate each other too: conservative, harmless.

Time
----
``now_ms()`` is ``time.monotonic_ns()`` minus the creator's base, in whole
milliseconds. CLOCK_MONOTONIC is one clock for every process on a host, and a
segment never outlives a boot (tmpfs). An entry stored at ``t`` hits while
``now_ms - t < window_ms``; an entry stamped slightly after the reader's
``now_ms`` (clocks read at different moments) counts as age 0.
"""
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from jizhi import shm

MAGIC = int.from_bytes(b"JZQCACHE", "little")
LAYOUT = 2
HEADER_WORDS = 64
SLOT_WORDS = 6
DEFAULT_WAYS = 4
DEFAULT_EPOCH_BUCKETS = 1 << 16
DEFAULT_WINDOW_MS = 120_000

# Header word indexes.
H_MAGIC, H_LAYOUT, H_WRITERS, H_SLOTS, H_WAYS, H_EPOCH_BUCKETS = 0, 1, 2, 3, 4, 5
H_WINDOW_MS, H_TIME_BASE_NS, H_EPOCHS_OFFSET, H_SLOTS_OFFSET, H_SLOT_WORDS = 6, 7, 8, 9, 10
# Words H_MODES.. of the header: whether every user uses the cache or a sample does (workers/query_cache.py,
# Bypass), one word per pipeline and version set (its uint32 key | mode << 32; 0: free), shared by that
# pipeline's workers: a worker's full use finds only what the others stored.
H_MODES = 16
MODE_BYPASSED, MODE_ON = 1, 2

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CHECK_SEED = np.uint64(0x6A09E667F3BCC909)
_SET_SEED = np.uint64(0xBB67AE8584CAA73B)
_EPOCH_SEED = np.uint64(0x3C6EF372FE94F82B)
_LOW32 = np.uint64(0xFFFFFFFF)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
AHEAD = 8          # candidates the kernels prefetch ahead (a set's DRAM misses overlap the work on earlier ones)


def _align64(n):
    return (n + 63) & ~63


def _layout(writers, slots_per_writer, epoch_buckets):
    epochs_offset = 8 * HEADER_WORDS
    slots_offset = epochs_offset + _align64(4 * epoch_buckets)
    total = slots_offset + 8 * SLOT_WORDS * writers * slots_per_writer
    return epochs_offset, slots_offset, total


def segment_bytes(writers, slots_per_writer, epoch_buckets):
    """Size of a query-cache segment (header, epoch table, slots)."""
    return _layout(writers, slots_per_writer, epoch_buckets)[2]


def _is_pow2(n):
    return n > 0 and (n & (n - 1)) == 0


def _validate(writers, slots_per_writer, ways, epoch_buckets, window_ms):
    if writers < 1:
        raise ValueError(f"query cache: writers must be >= 1, got {writers}")
    if ways < 1 or slots_per_writer < ways or slots_per_writer % ways:
        raise ValueError(f"query cache: slots per writer ({slots_per_writer}) must be a multiple of ways ({ways})")
    if not _is_pow2(slots_per_writer // ways):
        raise ValueError(f"query cache: slots per writer / ways must be a power of two, got {slots_per_writer // ways}")
    if not _is_pow2(epoch_buckets):
        raise ValueError(f"query cache: epoch_buckets must be a power of two, got {epoch_buckets}")
    if window_ms <= 0:
        raise ValueError(f"query cache: window_ms must be > 0, got {window_ms}")


def init(path_or_name, writers, slots_per_writer, ways=DEFAULT_WAYS,
         epoch_buckets=DEFAULT_EPOCH_BUCKETS, window_ms=DEFAULT_WINDOW_MS):
    """Supervisor only: create the segment, write its header, return its spec.

    ``path_or_name`` is a name in /dev/shm (``jizhi.<instance>.<run>.qcache``)
    or an absolute path; creating fails if it exists. The slots and the epoch
    table start zeroed (tmpfs), i.e. empty. The returned spec
    (``segment, writers, slots, ways, epoch_buckets, window_ms``) is what
    every other process passes to ``QueryCache.attach``.
    """
    writers, slots_per_writer, ways = int(writers), int(slots_per_writer), int(ways)
    epoch_buckets, window_ms = int(epoch_buckets), int(window_ms)
    _validate(writers, slots_per_writer, ways, epoch_buckets, window_ms)
    epochs_offset, slots_offset, total = _layout(writers, slots_per_writer, epoch_buckets)
    shm.create(path_or_name, total)
    mm, _ = shm.attach(path_or_name, size=total)
    header = np.ndarray((HEADER_WORDS,), dtype=np.uint64, buffer=mm)
    header[H_LAYOUT] = LAYOUT
    header[H_WRITERS] = writers
    header[H_SLOTS] = slots_per_writer
    header[H_WAYS] = ways
    header[H_EPOCH_BUCKETS] = epoch_buckets
    header[H_WINDOW_MS] = window_ms
    header[H_TIME_BASE_NS] = time.monotonic_ns()
    header[H_EPOCHS_OFFSET] = epochs_offset
    header[H_SLOTS_OFFSET] = slots_offset
    header[H_SLOT_WORDS] = SLOT_WORDS
    header[H_MAGIC] = MAGIC  # last: a header with its magic is complete
    del header
    mm.close()
    return {"segment": str(path_or_name), "writers": writers, "slots": slots_per_writer,
            "ways": ways, "epoch_buckets": epoch_buckets, "window_ms": window_ms}


# ---------------------------------------------------------------------------
# Kernels


@intrinsic
def _prefetch(typingctx, flat, index):
    """Hint the CPU to fetch the cache line holding ``flat[index]`` (LLVM's prefetch; never faults)."""
    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])   # read, keep, data cache
        return context.get_dummy_value()
    return types.void(flat, index), codegen


@njit(cache=True, nogil=True, inline="always")
def _prefetch_set(flat, set_words, s):
    # A set is ways x 6 words (192 bytes with 4 ways): every cache line of it.
    base = s * set_words
    for w in range(0, set_words, 8):
        _prefetch(flat, base + w)


@njit(cache=True, nogil=True, inline="always")
def _mix(x):
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


@njit(cache=True, nogil=True, inline="always")
def _check(w0, w1, w2, w3, w4):
    # Chained, so a word's position matters: swapping two words changes it.
    h = _mix(_CHECK_SEED ^ w0)
    h = _mix(h ^ w1 ^ _GOLDEN)
    h = _mix(h ^ w2)
    h = _mix(h ^ w3 ^ _GOLDEN)
    return _mix(h ^ w4)


@njit(cache=True, nogil=True, inline="always")
def _set_of(user, item, set_mask):
    h = _mix(_mix(user ^ _SET_SEED) ^ item)
    return np.int64(h & set_mask)


@njit(cache=True, nogil=True, inline="always")
def _bucket_of(user, bucket_mask):
    return np.int64(_mix(user ^ _EPOCH_SEED) & bucket_mask)


@njit(cache=True, nogil=True)
def _epochs_of(epochs, users, out):
    mask = np.uint64(epochs.shape[0] - 1)
    for r in range(users.shape[0]):
        out[r] = epochs[_bucket_of(users[r], mask)]


@njit(cache=True, nogil=True)
def _bump(epochs, users):
    mask = np.uint64(epochs.shape[0] - 1)
    for r in range(users.shape[0]):
        b = _bucket_of(users[r], mask)
        epochs[b] = epochs[b] + np.uint32(1)


@njit(cache=True, nogil=True)
def _buckets(users, n_buckets, out):
    mask = np.uint64(n_buckets - 1)
    for r in range(users.shape[0]):
        out[r] = _bucket_of(users[r], mask)


@njit(cache=True, nogil=True)
def _sets(users, offsets, items, n_sets, out):
    mask = np.uint64(n_sets - 1)
    for r in range(users.shape[0]):
        for i in range(offsets[r], offsets[r + 1]):
            out[i] = _set_of(users[r], items[i], mask)


@njit(cache=True, nogil=True)
def _lookup(slots, epochs, users, offsets, items, version, now_ms, window_ms, score_bits, hit, share):
    # slots [W, sets, ways, 6]; score_bits uint32 [N] (a float32 view); hit bool [N].
    # Returns the number of slots whose key matched but whose check did not
    # (torn by a concurrent store, or left half-written by a killed writer).
    W, n_sets, ways = slots.shape[0], slots.shape[1], slots.shape[2]
    bucket_mask = np.uint64(epochs.shape[0] - 1)
    set_words = ways * slots.shape[3]
    flat = slots.reshape(-1)
    sets = np.empty(items.shape[0], dtype=np.int64)
    _sets(users, offsets, items, n_sets // share, sets)
    n = items.shape[0]
    torn = 0
    for r in range(users.shape[0]):
        user = users[r]
        want_ve = version | (np.uint64(epochs[_bucket_of(user, bucket_mask)]) << _S32)
        for i in range(offsets[r], offsets[r + 1]):
            if i + AHEAD < n:
                for w in range(W):
                    _prefetch_set(flat, set_words, w * n_sets + sets[i + AHEAD])
            item = items[i]
            s = sets[i]
            hit[i] = False
            score_bits[i] = 0
            found = False
            for w in range(W):
                for k in range(ways):
                    w0 = slots[w, s, k, 0]
                    if w0 != user:
                        continue
                    w1 = slots[w, s, k, 1]
                    if w1 != item:
                        continue
                    w2 = slots[w, s, k, 2]
                    w3 = slots[w, s, k, 3]
                    w4 = slots[w, s, k, 4]
                    w5 = slots[w, s, k, 5]
                    if w5 != _check(w0, w1, w2, w3, w4):
                        torn += 1
                        continue
                    if w2 != want_ve:
                        continue
                    if now_ms - np.int64(w4) >= window_ms:
                        continue
                    score_bits[i] = np.uint32(w3 & _LOW32)
                    hit[i] = True
                    found = True
                    break
                if found:
                    break
    return torn


@njit(cache=True, nogil=True)
def _store(region, users, offsets, items, score_bits, version, epochs_in, now_ms, mask, use_mask, share):
    # region [sets, ways, 6]: this writer's own, so its reads of it are stable. The victim: a
    # never-written way (check word 0), else the entry of the same (user, item, version), else the
    # way stored longest ago (a time in the future can only be a store a killed predecessor left
    # half-done: reused first). No check word is computed to choose, only the stored entry's,
    # which is what readers verify.
    n_sets, ways = region.shape[0], region.shape[1]
    set_words = ways * region.shape[2]
    flat = region.reshape(-1)
    sets = np.empty(items.shape[0], dtype=np.int64)
    _sets(users, offsets, items, n_sets // share, sets)
    n = items.shape[0]
    t = np.uint64(now_ms)
    stored = 0
    for r in range(users.shape[0]):
        user = users[r]
        ve = version | (np.uint64(epochs_in[r]) << _S32)
        for i in range(offsets[r], offsets[r + 1]):
            if i + AHEAD < n and (not use_mask or mask[i + AHEAD]):
                _prefetch_set(flat, set_words, sets[i + AHEAD])     # (not the sets of masked candidates)
            if use_mask and not mask[i]:
                continue
            item = items[i]
            s = sets[i]
            victim = 0
            oldest = ~np.uint64(0)
            for k in range(ways):
                if region[s, k, 5] == 0:
                    victim = k  # never written (ways fill in order, so every later one is empty too)
                    break
                if region[s, k, 0] == user and region[s, k, 1] == item and (region[s, k, 2] & _LOW32) == version:
                    victim = k  # the same entry: refresh it in place
                    break
                w4 = region[s, k, 4]
                age = w4 if w4 <= t else np.uint64(0)
                if age < oldest:
                    victim, oldest = k, age
            w3 = np.uint64(score_bits[i])
            region[s, victim, 0] = user
            region[s, victim, 1] = item
            region[s, victim, 2] = ve
            region[s, victim, 3] = w3
            region[s, victim, 4] = t
            region[s, victim, 5] = _check(user, item, ve, w3, t)
            stored += 1
    return stored


@njit(cache=True, nogil=True)
def _stats(slots, now_ms, window_ms, valid, fresh):
    W, n_sets, ways = slots.shape[0], slots.shape[1], slots.shape[2]
    for w in range(W):
        v = 0
        f = 0
        for s in range(n_sets):
            for k in range(ways):
                w4 = slots[w, s, k, 4]
                if slots[w, s, k, 5] == _check(slots[w, s, k, 0], slots[w, s, k, 1],
                                               slots[w, s, k, 2], slots[w, s, k, 3], w4):
                    v += 1
                    if now_ms - np.int64(w4) < window_ms:
                        f += 1
        valid[w] = v
        fresh[w] = f


# ---------------------------------------------------------------------------
# One process's mapping


def _u64(a):
    return np.ascontiguousarray(a, dtype=np.uint64)


def _offsets(offsets, n_requests, n_items):
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    # The kernels do not bounds-check: bad offsets would read or write out of
    # the arrays, so they are checked here (O(requests), not O(candidates)).
    if offsets.shape != (n_requests + 1,) or offsets[0] != 0 or offsets[-1] != n_items \
            or (n_requests and np.any(offsets[1:] < offsets[:-1])):
        raise ValueError(f"query cache: offsets must be int64[{n_requests + 1}] from 0 to {n_items}, non-decreasing")
    return offsets


def _version(version):
    version = int(version)
    if not 0 <= version <= 0xFFFFFFFF:
        raise ValueError(f"query cache: version must fit uint32, got {version}")
    return np.uint64(version)


class QueryCache:
    """One process's mapping of the query-cache segment.

    ``header``, ``epochs`` and ``slots`` are plain numpy views on the mapping
    (``slots``: uint64 [writers, sets, ways, 6]). Safe to use from any number
    of processes at once, provided each writer index is used by one process
    at a time and only the broker bumps epochs. ``window_ms`` is a lookup
    policy (entries store their time, not their expiry): it comes from the
    spec, else from the header, and may be changed on a live cache.
    ``torn`` counts, in this process, key-matching slots that failed their
    check (a store raced the lookup): they were misses.
    """

    def __init__(self, segment, writers, slots, ways, epoch_buckets, window_ms=None):
        self.segment = segment
        self.mm, _ = shm.attach(segment, size=segment_bytes(writers, slots, epoch_buckets))
        self.header = np.ndarray((HEADER_WORDS,), dtype=np.uint64, buffer=self.mm)
        h = [int(x) for x in self.header[:H_SLOT_WORDS + 1]]
        expect = {H_MAGIC: MAGIC, H_LAYOUT: LAYOUT, H_WRITERS: writers, H_SLOTS: slots,
                  H_WAYS: ways, H_EPOCH_BUCKETS: epoch_buckets, H_SLOT_WORDS: SLOT_WORDS}
        bad = [i for i, v in expect.items() if h[i] != v]
        if bad:
            raise ValueError(f"query cache {segment}: header {h} does not match the spec "
                             f"(writers={writers}, slots={slots}, ways={ways}, epoch_buckets={epoch_buckets})")
        self.writers, self.slots_per_writer, self.ways = writers, slots, ways
        self.sets = slots // ways
        self.epoch_buckets = epoch_buckets
        self.window_ms = int(window_ms) if window_ms is not None else h[H_WINDOW_MS]
        self.time_base_ns = h[H_TIME_BASE_NS]
        self.epochs = np.ndarray((epoch_buckets,), dtype=np.uint32, buffer=self.mm,
                                 offset=h[H_EPOCHS_OFFSET])
        self.slots = np.ndarray((writers, self.sets, ways, SLOT_WORDS), dtype=np.uint64,
                                buffer=self.mm, offset=h[H_SLOTS_OFFSET])
        self.torn = 0

    @classmethod
    def attach(cls, spec):
        """From the run plan's ``qcache`` entry (the dict ``init`` returned), or None."""
        if not spec:
            return None
        return cls(spec["segment"], int(spec["writers"]), int(spec["slots"]), int(spec["ways"]),
                   int(spec["epoch_buckets"]), spec.get("window_ms"))

    def close(self):
        """Drop this process's mapping (the segment stays; the supervisor unlinks it)."""
        self.header = self.epochs = self.slots = None
        self.mm.close()

    def mode_slot(self, key, mode):
        """The header word of ``key`` 's mode (claimed with ``mode`` if no word holds the key yet), or None
        when every word is taken (the caller decides alone then). Words are aligned 8-byte words, read and
        written whole; two processes claiming one free word for two keys leave one of them: the other finds
        its key gone at its next ``mode_of`` and claims again."""
        key = (int(key) & 0xFFFFFFFF) or 1
        words = self.header[H_MODES:]
        mine = np.flatnonzero((words & np.uint64(0xFFFFFFFF)) == np.uint64(key))
        if mine.shape[0]:
            return H_MODES + int(mine[0])
        free = np.flatnonzero(words == 0)
        if not free.shape[0]:
            return None
        self.header[H_MODES + int(free[0])] = np.uint64(key | (int(mode) << 32))
        return H_MODES + int(free[0])

    def mode_of(self, slot, key):
        """The mode in word ``slot`` if it still holds ``key``, else 0."""
        w = int(self.header[slot])
        return w >> 32 if (w & 0xFFFFFFFF) == ((int(key) & 0xFFFFFFFF) or 1) else 0

    def set_mode(self, slot, key, mode):
        self.header[slot] = np.uint64(((int(key) & 0xFFFFFFFF) or 1) | (int(mode) << 32))

    def now_ms(self):
        """Milliseconds since the segment's time base (one clock for every process)."""
        return (time.monotonic_ns() - self.time_base_ns) // 1_000_000

    def epochs_of(self, users):
        """Current epochs (uint32 [R]) of uint64 ``users``: read at a request's start."""
        users = _u64(users)
        out = np.empty(users.shape[0], dtype=np.uint32)
        _epochs_of(self.epochs, users, out)
        return out

    def bump_epochs(self, users):
        """Broker only, before acknowledging feedback: invalidate these users' entries."""
        _bump(self.epochs, _u64(np.atleast_1d(users)))

    def bump_epoch(self, user):
        self.bump_epochs(np.array([user], dtype=np.uint64))

    def _share(self, share):
        share = int(share)
        if share < 1 or share & (share - 1) or share > self.sets:
            raise ValueError(f"query cache: share must be a power of two from 1 to {self.sets}, got {share}")
        return share

    def lookup(self, users, offsets, items, version, now_ms=None, share=1):
        """Cached scores of a batch: ``(scores float32 [N], hit bool [N])``.

        ``share``: use only the first 1/share of each region's sets (a sample
        of users gets its share of the table: workers/query_cache.py); a
        store and a lookup of an entry must use the same share.

        ``users`` uint64 [R], ``offsets`` int64 [R+1] (CSR over requests),
        ``items`` uint64 [N]. A hit has the exact score stored for (user,
        item, version) under the user's current epoch, at most ``window_ms``
        ago; a miss has score 0. Any process may call it.
        """
        users, items = _u64(users), _u64(items)
        offsets = _offsets(offsets, users.shape[0], items.shape[0])
        if now_ms is None:
            now_ms = self.now_ms()
        bits = np.empty(items.shape[0], dtype=np.uint32)
        hit = np.empty(items.shape[0], dtype=np.bool_)
        self.torn += _lookup(self.slots, self.epochs, users, offsets, items, _version(version),
                             np.int64(now_ms), np.int64(self.window_ms), bits, hit, self._share(share))
        return bits.view(np.float32), hit

    def store(self, writer, users, offsets, items, scores, version, epochs, now_ms=None, mask=None, share=1):
        """Writer ``writer`` only: store computed scores into its own region.

        ``epochs`` uint32 [R] are the epochs ``epochs_of`` returned at the
        request's start (so feedback that landed meanwhile invalidates what is
        stored now). ``mask`` bool [N] selects the candidates to store (those
        computed, not the hits); None stores all. Returns how many were stored.
        """
        writer = int(writer)
        if not 0 <= writer < self.writers:
            raise ValueError(f"query cache: writer {writer} not in 0..{self.writers - 1}")
        users, items = _u64(users), _u64(items)
        offsets = _offsets(offsets, users.shape[0], items.shape[0])
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        epochs = np.ascontiguousarray(epochs, dtype=np.uint32)
        if scores.shape != items.shape or epochs.shape != users.shape:
            raise ValueError("query cache: scores must be float32 [N] and epochs uint32 [R]")
        use_mask = mask is not None
        if use_mask:
            mask = np.ascontiguousarray(mask, dtype=np.bool_)
            if mask.shape != items.shape:
                raise ValueError("query cache: mask must be bool [N]")
        else:
            mask = _NO_MASK
        if now_ms is None:
            now_ms = self.now_ms()
        return int(_store(self.slots[writer], users, offsets, items, scores.view(np.uint32),
                          _version(version), epochs, np.int64(now_ms), mask, use_mask, self._share(share)))

    def epoch_bucket(self, users):
        """Epoch-table index (int64 [R]) of each user: for tests and diagnostics."""
        users = _u64(users)
        out = np.empty(users.shape[0], dtype=np.int64)
        _buckets(users, self.epoch_buckets, out)
        return out

    def set_of(self, users, offsets, items):
        """Set index (int64 [N]) of each candidate: for tests and diagnostics."""
        users, items = _u64(users), _u64(items)
        offsets = _offsets(offsets, users.shape[0], items.shape[0])
        out = np.empty(items.shape[0], dtype=np.int64)
        _sets(users, offsets, items, self.sets, out)
        return out

    def stats(self, now_ms=None):
        """Per region: ``entries`` (valid slots) and ``fresh`` (within the window)."""
        if now_ms is None:
            now_ms = self.now_ms()
        valid = np.zeros(self.writers, dtype=np.int64)
        fresh = np.zeros(self.writers, dtype=np.int64)
        _stats(self.slots, np.int64(now_ms), np.int64(self.window_ms), valid, fresh)
        return {"capacity": self.slots_per_writer, "entries": valid.tolist(), "fresh": fresh.tolist()}


_NO_MASK = np.zeros(0, dtype=np.bool_)

# Compile at import, with the types the methods pass.
_sl = np.zeros((1, 1, 1, SLOT_WORDS), np.uint64)
_ep = np.zeros(1, np.uint32)
_us = np.ones(1, np.uint64)
_of = np.array([0, 1], np.int64)
_epochs_of(_ep, _us, np.empty(1, np.uint32))
_bump(_ep, _us)
_buckets(_us, 1, np.empty(1, np.int64))
_sets(_us, _of, _us, 1, np.empty(1, np.int64))
_store(_sl[0], _us, _of, _us, np.zeros(1, np.uint32), np.uint64(0), _ep, np.int64(0), _NO_MASK, False, 1)
_lookup(_sl, _ep, _us, _of, _us, np.uint64(0), np.int64(0), np.int64(1), np.empty(1, np.uint32), np.empty(1, np.bool_), 1)
_stats(_sl, np.int64(0), np.int64(1), np.zeros(1, np.int64), np.zeros(1, np.int64))
del _sl, _ep, _us, _of
