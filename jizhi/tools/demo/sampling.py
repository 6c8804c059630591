"""The demo's random draws: one stream per purpose, Zipf laws, item popularity.

Runs offline, in the process that writes a demo bundle, a head or a trace
(``bundle``, ``dense``, ``trace`` of this package; the importer's profile
generator borrows ``_distinct_ids``). Every draw comes from its own stream
``default_rng([seed, stream, ...])``, so changing one size does not reshuffle
unrelated parts.

Item popularity (which items histories and trace candidates favour) is a
Zipf law over a fixed permutation of the items: the items ordered by a hash
of their id (``_popularity_order``). It is derived from the bundle alone,
so it needs no extra file and the trace favours the same items as the
histories.

Large draws (a catalogue of millions: ``_ZIPF_CHUNK`` values and more) go
through ``_zipf_ranks``, a Numba kernel (a guide table in front of a short
binary search, each answer checked against the CDF) that gives exactly
``np.searchsorted``'s ranks in a fraction of its time, one chunk of uniforms
at a time; a stream's uniforms drawn in chunks are the ones drawn at once,
so sizes below and above the threshold give the same values as before.
"""
import numpy as np
from numba import njit

from jizhi.cube.signature import sign

# Zipf exponents: category values, multihot values, item popularity.
_ZIPF_CATEGORY = 1.1
_ZIPF_MULTIHOT = 1.0
_ZIPF_POPULARITY = 1.0
# Hash field id of the popularity order; 0 is no model field.
_POPULARITY_FIELD = 0

# Random streams, one per purpose (the second word of the rng seed).
_S_USERS, _S_ITEMS, _S_FIELD, _S_CUBE, _S_ONNX, _S_CALIBRATION, _S_TRACE = range(1, 8)


def _rng(seed, *stream):
    return np.random.default_rng([int(seed), *stream])


# Draws at or above this many go through the kernel, this many uniforms at a time (8 MiB of them).
_ZIPF_CHUNK = 1 << 20


def _sorted_unique(values):
    """``np.unique(values)`` by a sort (numpy 2's ``np.unique`` hashes: 9 s for 10 M uint64, the sort 0.2 s)."""
    values = np.sort(values)
    if values.shape[0] < 2:
        return values
    keep = np.empty(values.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _distinct_ids(rng, n):
    """``n`` distinct uint64 ids in [1, 2**63), sorted ascending."""
    ids = np.empty(0, dtype=np.uint64)
    while ids.shape[0] < n:
        more = rng.integers(1, 2**63, size=n - ids.shape[0], dtype=np.uint64)
        ids = _sorted_unique(np.concatenate([ids, more]))
    return ids


def _zipf_cdf(n, exponent):
    """CDF (float64 [n]) of a Zipf law over ranks 0..n-1 (rank 0 the most likely)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


@njit(cache=True, nogil=True)
def _first_greater(cdf, x, lo, hi):
    # The first index in [lo, hi) whose value is > x (hi when none).
    while lo < hi:
        mid = (lo + hi) >> 1
        if cdf[mid] > x:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True, nogil=True)
def _zipf_ranks(cdf, guide, u, out):
    """out[k] = min(searchsorted(cdf, u[k], side="right"), n - 1), exactly.

    ``guide[b]`` = searchsorted(cdf, b / m, "right") for b = 0..m: the answer
    for u in [b/m, (b+1)/m) lies in [guide[b], guide[b+1]]. The bracket is
    widened by one each side against rounding of u * m, and the answer is
    checked (cdf[i-1] <= u < cdf[i] names one i in a non-decreasing cdf);
    a failed check searches the whole cdf.
    """
    n = cdf.shape[0]
    m = guide.shape[0] - 1
    for k in range(u.shape[0]):
        x = u[k]
        b = int(x * m)
        if b < 0:
            b = 0
        elif b >= m:
            b = m - 1
        lo = max(guide[b] - 1, 0)
        hi = min(guide[b + 1] + 1, n)
        i = _first_greater(cdf, x, lo, hi)
        if (i > 0 and cdf[i - 1] > x) or (i < n and not cdf[i] > x):
            i = _first_greater(cdf, x, 0, n)
        out[k] = min(i, n - 1)


def _guide(cdf):
    """The guide table of ``_zipf_ranks`` for ``cdf``: about one slot per rank."""
    m = max(1, min(cdf.shape[0], 1 << 24))
    return np.searchsorted(cdf, np.arange(m + 1, dtype=np.float64) / m, side="right").astype(np.int64)


def _zipf_chunks(rng, cdf, size, chunk=None):
    """``_zipf_draw(rng, cdf, size)`` in pieces: yields int64 rank arrays of at most ``chunk``
    (default ``_ZIPF_CHUNK``), in order."""
    chunk = chunk or _ZIPF_CHUNK
    guide = _guide(cdf)
    for start in range(0, size, chunk):
        u = rng.random(min(chunk, size - start))
        out = np.empty(u.shape[0], dtype=np.int64)
        _zipf_ranks(cdf, guide, u, out)
        yield out


def _zipf_draw(rng, cdf, size):
    """``size`` ranks drawn with replacement from ``cdf``."""
    if size < _ZIPF_CHUNK:
        return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), cdf.shape[0] - 1)
    out = np.empty(size, dtype=np.int64)
    start = 0
    for ranks in _zipf_chunks(rng, cdf, size):
        out[start:start + ranks.shape[0]] = ranks
        start += ranks.shape[0]
    return out


def _zipf_draw_distinct(rng, cdf, k):
    """``k`` distinct ranks from ``cdf``, in the order sequential draws without
    replacement would give them.

    Redrawing with replacement and keeping first appearances has exactly
    that law; it is fast while ``k`` is small next to ``len(cdf)``. For
    large ``k`` it switches to exponential keys (Efraimidis-Spirakis), which
    is the same law in O(len(cdf)).
    """
    n = cdf.shape[0]
    if k > n:
        raise ValueError(f"cannot draw {k} distinct of {n}")
    if 4 * k > n:
        weights = np.diff(cdf, prepend=0.0)
        keys = rng.exponential(size=n) / np.maximum(weights, np.finfo(np.float64).tiny)
        chosen = np.argpartition(keys, k - 1)[:k] if k < n else np.arange(n)
        return chosen[np.argsort(keys[chosen], kind="stable")]
    chosen = np.empty(0, dtype=np.int64)
    while chosen.shape[0] < k:
        draws = _zipf_draw(rng, cdf, 2 * (k - chosen.shape[0]) + 16)
        pool = np.concatenate([chosen, draws])
        _, first = np.unique(pool, return_index=True)
        chosen = pool[np.sort(first)][:k]
    return chosen


def _popularity_order(item_ids):
    """Item rows from the most to the least popular: ordered by a hash of the id."""
    return np.argsort(sign(_POPULARITY_FIELD, item_ids.view(np.int64)), kind="stable")

