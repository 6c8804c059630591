"""Signatures: a universal hash of (field id, raw value) -> uint64.

Runs in any process (data_reader, feature_processor, cube building, the
ceiling). The kernels are Numba-compiled with ``cache=True`` at import of this
module, so a worker loads machine code instead of compiling it on its first
request. Set ``NUMBA_CACHE_DIR`` to a writable place when the source tree is
read-only.

The hash is splitmix64's finaliser applied to ``seed ^ (field_id * K1) ^
(value * K2)``; for a fixed (field id, value) the result is stable across
processes, machines and versions of jizhi (it is part of the bundle format:
``manifest.toml`` records ``hash_seed``).
"""
import numpy as np
from numba import njit

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)


@njit(cache=True, nogil=True)
def _mix(x):
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@njit(cache=True, nogil=True)
def _sign_flat(field_id, values, seed, out):
    f = np.uint64(field_id) * np.uint64(0x9E3779B97F4A7C15)
    for i in range(values.shape[0]):
        out[i] = _mix(np.uint64(seed) ^ f ^ (np.uint64(values[i]) * np.uint64(0xC2B2AE3D27D4EB4F)))


@njit(cache=True, nogil=True)
def _sign_padded(field_ids, values, lens, seed, out):
    # values, out: [R, F, L]; lens: [R, F]; only the first lens[r, f] entries count.
    R, F, L = values.shape
    for f in range(F):
        fk = np.uint64(field_ids[f]) * np.uint64(0x9E3779B97F4A7C15)
        for r in range(R):
            n = lens[r, f]
            for j in range(n):
                out[r, f, j] = _mix(np.uint64(seed) ^ fk ^ (np.uint64(values[r, f, j]) * np.uint64(0xC2B2AE3D27D4EB4F)))
            for j in range(n, L):
                out[r, f, j] = 0


def sign(field_id, values, seed=0):
    """Signatures of ``values`` (any integer array) in field ``field_id``."""
    values = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
    out = np.empty(values.shape[0], dtype=np.uint64)
    _sign_flat(int(field_id), values, int(seed), out)
    return out


def sign_padded(field_ids, values, lens, seed=0):
    """Signatures of padded bags: ``values`` int64 [R, F, L], ``lens`` [R, F].

    ``field_ids`` int64 [F] is the hash field of each bag column (a history
    field hashes with the id of the field whose table it shares). Padding
    positions come back as 0.
    """
    out = np.empty(values.shape, dtype=np.uint64)
    _sign_padded(np.ascontiguousarray(field_ids, dtype=np.int64),
                 np.ascontiguousarray(values, dtype=np.int64),
                 np.ascontiguousarray(lens, dtype=np.int32), int(seed), out)
    return out


# Compile at import (from the on-disk cache when present), not in a request.
sign(1, np.zeros(1, dtype=np.int64))
sign_padded(np.zeros(1, dtype=np.int64), np.zeros((1, 1, 1), dtype=np.int64), np.ones((1, 1), dtype=np.int32))
