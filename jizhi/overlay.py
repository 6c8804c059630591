"""The online user overlay: recent behaviour appended by ``feedback``.

A shared-memory open-addressing table, user id -> a ring of the user's most
recent item ids. The supervisor creates the segment (``jizhi.<instance>.<run>.overlay``);
exactly one process writes it, the broker, when it admits a ``feedback``
message; workers read it through a Numba kernel at batch time and merge it
over the profile snapshot's history field, so feedback changes the very
next score.

One writer, many readers, no locks: each entry has a sequence word (a
seqlock). The writer makes it odd, writes, makes it even; a reader copies the
entry and retries when the word was odd or changed meanwhile. An entry whose
word is 0 has never been used. x86-64 keeps stores in order, which this relies
on (Numba has no fences). When the table is full, feedback for a new user is
dropped and counted (``overlay_full``); it holds ``capacity`` users and the
last ``ring`` items of each. It is not persisted: a restart starts empty.
"""
import numpy as np
from numba import njit

from jizhi import shm


def segment_bytes(capacity, ring):
    return capacity * (8 + 8 + 8 + 8 * ring)


def _split(buf, capacity, ring):
    off = 0
    parts = []
    for n in (capacity, capacity, capacity, capacity * ring):
        parts.append(np.ndarray((n,), dtype=np.uint64, buffer=buf, offset=off))
        off += 8 * n
    keys, seq, count, items = parts
    return keys, seq, count, items.reshape(capacity, ring)


@njit(cache=True, nogil=True, inline="always")
def _home(user, capacity):
    x = user ^ (user >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    return np.int64(x % np.uint64(capacity))


@njit(cache=True, nogil=True)
def _find(keys, seq, user):
    cap = keys.shape[0]
    i = _home(user, cap)
    for _ in range(cap):
        if seq[i] == 0:
            return -1 - i  # free slot i (encoded) where the user would go
        if keys[i] == user:
            return i
        i += 1
        if i == cap:
            i = 0
    return -(cap + 1)  # full


@njit(cache=True, nogil=True)
def _append(keys, seq, count, items, user, item):
    i = _find(keys, seq, user)
    cap = keys.shape[0]
    if i == -(cap + 1):
        return False
    if i < 0:
        i = -1 - i
        seq[i] = np.uint64(1)          # claimed, being written
        keys[i] = user
        count[i] = 0
    else:
        seq[i] += np.uint64(1)         # odd: being written
    ring = items.shape[1]
    items[i, count[i] % np.uint64(ring)] = item
    count[i] += np.uint64(1)
    seq[i] += np.uint64(1)             # even: stable
    return True


@njit(cache=True, nogil=True)
def _read(keys, seq, count, items, users, out, out_n):
    # out [U, ring] oldest -> newest, out_n [U]
    ring = items.shape[1]
    for u in range(users.shape[0]):
        out_n[u] = 0
        i = _find(keys, seq, users[u])
        if i < 0:
            continue
        for _attempt in range(1000):
            s1 = seq[i]
            if s1 & np.uint64(1):
                continue
            c = count[i]
            n = c if c < np.uint64(ring) else np.uint64(ring)
            first = c - n
            for j in range(np.int64(n)):
                out[u, j] = items[i, (first + np.uint64(j)) % np.uint64(ring)]
            if seq[i] == s1:
                out_n[u] = np.int64(n)
                break


@njit(cache=True, nogil=True)
def _merge(vals, lens, col, max_len, recent, recent_n):
    # Append each user's recent items after the snapshot history; keep the last max_len.
    for u in range(vals.shape[0]):
        n_new = recent_n[u]
        if n_new == 0:
            continue
        n_old = lens[u, col]
        total = n_old + n_new
        keep = total if total < max_len else max_len
        buf = np.empty(total, dtype=np.int64)
        for j in range(n_old):
            buf[j] = vals[u, col, j]
        for j in range(n_new):
            buf[n_old + j] = np.int64(recent[u, j])
        start = total - keep
        for j in range(keep):
            vals[u, col, j] = buf[start + j]
        lens[u, col] = keep


class Overlay:
    """One process's mapping of the overlay segment (writer: the broker only)."""

    def __init__(self, name, capacity, ring):
        self.mm, _ = shm.attach(name, size=segment_bytes(capacity, ring))
        self.capacity, self.ring = capacity, ring
        self.keys, self.seq, self.count, self.items = _split(self.mm, capacity, ring)

    @classmethod
    def attach(cls, spec):
        """From the run plan's ``overlay`` entry (segment, capacity, ring), or None."""
        if not spec:
            return None
        return cls(spec["segment"], spec["capacity"], spec["ring"])

    def append(self, user, item):
        """Broker only: record that ``user`` acted on ``item``. False when the table is full."""
        return bool(_append(self.keys, self.seq, self.count, self.items, np.uint64(user), np.uint64(item)))

    def recent(self, users):
        """(items uint64 [U, ring] oldest first, n int64 [U]) for uint64 ``users``."""
        users = np.ascontiguousarray(users, dtype=np.uint64)
        out = np.zeros((users.shape[0], self.ring), dtype=np.uint64)
        n = np.zeros(users.shape[0], dtype=np.int64)
        _read(self.keys, self.seq, self.count, self.items, users, out, n)
        return out, n


def merge_history(vals, lens, col, max_len, recent, recent_n):
    """Merge recent items into column ``col`` of padded user bags, in place."""
    _merge(vals, lens, col, max_len, recent, recent_n)


# Compile at import.
_k = np.zeros(4, np.uint64)
_s = np.zeros(4, np.uint64)
_c = np.zeros(4, np.uint64)
_it = np.zeros((4, 2), np.uint64)
_append(_k, _s, _c, _it, np.uint64(5), np.uint64(9))
_read(_k, _s, _c, _it, np.array([5], np.uint64), np.zeros((1, 2), np.uint64), np.zeros(1, np.int64))
_merge(np.zeros((1, 1, 3), np.int64), np.zeros((1, 1), np.int32), 0, 3, np.ones((1, 2), np.uint64), np.ones(1, np.int64))
