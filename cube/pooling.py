"""Signatures -> pooled embeddings, with one deduplicated lookup per batch.

``pool_blocks`` takes several padded bag blocks (user bags of a batch's
requests, item bags of its candidates), gathers every valid signature,
deduplicates them across all blocks (``np.unique``), asks the store once
(LMDB cube or RAM table: anything with ``lookup(sorted_unique_keys) ->
(vectors, found)``), and pools each bag with a Numba kernel: the mean of its
vectors, or their sum for fields the manifest marks ``pooling = "sum"``.
Empty bags and signatures missing from the store read the default vector
(zeros).

A store with a shared-memory hot tier (``TieredStore`` with a table) pools
by itself (``TieredStore.pool``): a hash probe (~40 ns) costs less than the
sort that deduplication needs, so it probes every signature where it lies
and deduplicates only the misses it sends to the slower levels.
"""
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _pool(lens, sums, inv, start, vectors, out):
    # lens [R, F]; sums [F]: sum pooling (else mean); inv: index into vectors
    # of each valid signature, in row-major order of (r, f, j < lens[r, f])
    # starting at inv[start].
    R, F = lens.shape
    D = vectors.shape[1]
    p = start
    for r in range(R):
        for f in range(F):
            n = lens[r, f]
            for d in range(D):
                out[r, f, d] = 0.0
            if n == 0:
                continue
            for j in range(n):
                v = inv[p]
                p += 1
                for d in range(D):
                    out[r, f, d] += vectors[v, d]
            if sums[f]:
                continue
            inv_n = np.float32(1.0) / np.float32(n)
            for d in range(D):
                out[r, f, d] *= inv_n
    return p


@njit(cache=True, nogil=True)
def _missing_per_row(lens, inv, start, found):
    R, F = lens.shape
    out = np.zeros(R, dtype=np.int64)
    p = start
    for r in range(R):
        for f in range(F):
            for j in range(lens[r, f]):
                if not found[inv[p]]:
                    out[r] += 1
                p += 1
    return out


def valid_signatures(sigs, lens):
    """The valid signatures of padded bags, flat, in row-major bag order."""
    L = sigs.shape[-1]
    mask = np.arange(L, dtype=np.int32) < lens[..., None]
    return sigs[mask]


def pool_blocks(store, blocks, dim, sums=None):
    """Pool each (sigs [R, F, L] uint64, lens [R, F] int32) block.

    ``sums``: per block, bool [F] (True: sum pooling, else mean); default all
    mean. Returns ``(pooled, missing)``: a list of float32 [R, F, dim] arrays
    and a list of int64 [R] counts of signatures the store lacked per row.
    """
    if sums is None:
        sums = [np.zeros(l.shape[1], dtype=np.bool_) for _, l in blocks]
    if getattr(store, "pool", None) is not None and store.pool_ready():
        return store.pool(blocks, sums)
    flats = [valid_signatures(s, l) for s, l in blocks]
    allsig = np.concatenate(flats) if flats else np.zeros(0, np.uint64)
    uniq, inv = np.unique(allsig, return_inverse=True)
    vectors, found = store.lookup(uniq)
    inv = inv.astype(np.int64, copy=False).reshape(-1)
    pooled, missing = [], []
    p = 0
    for (s, l), sm in zip(blocks, sums):
        l32 = np.ascontiguousarray(l, dtype=np.int32)
        out = np.empty((l32.shape[0], l32.shape[1], dim), dtype=np.float32)
        q = _pool(l32, np.ascontiguousarray(sm, dtype=np.bool_), inv, p, vectors, out)
        missing.append(_missing_per_row(l32, inv, p, found))
        p = q
        pooled.append(out)
    return pooled, missing


# Compile at import, not in the first request.
_v = np.zeros((1, 4), np.float32)
_pool(np.ones((1, 1), np.int32), np.zeros(1, np.bool_), np.zeros(1, np.int64), 0, _v, np.empty((1, 1, 4), np.float32))
_missing_per_row(np.ones((1, 1), np.int32), np.zeros(1, np.int64), 0, np.ones(1, np.bool_))
