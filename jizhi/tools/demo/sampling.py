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
"""
import numpy as np

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


def _distinct_ids(rng, n):
    """``n`` distinct uint64 ids in [1, 2**63), sorted ascending."""
    ids = np.empty(0, dtype=np.uint64)
    while ids.shape[0] < n:
        more = rng.integers(1, 2**63, size=n - ids.shape[0], dtype=np.uint64)
        ids = np.unique(np.concatenate([ids, more]))
    return ids


def _zipf_cdf(n, exponent):
    """CDF (float64 [n]) of a Zipf law over ranks 0..n-1 (rank 0 the most likely)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _zipf_draw(rng, cdf, size):
    """``size`` ranks drawn with replacement from ``cdf``."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), cdf.shape[0] - 1)


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

