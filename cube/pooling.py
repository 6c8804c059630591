"""Signatures -> pooled embeddings, with one deduplicated lookup per batch.

``pool_blocks`` takes several padded bag blocks (user bags of a batch's
requests, item bags of its candidates), gathers every valid signature,
deduplicates them across all blocks (``np.unique``), asks the store once
(LMDB cube or RAM table: anything with ``lookup(sorted_unique_keys) ->
(vectors, found)``), and pools each bag with a Numba kernel: the mean of its
vectors, or their sum for fields the manifest marks ``pooling = "sum"``.
Empty bags and signatures missing from the store read the field's default
vector (a missing signature counts in the mean; an empty bag pools to the
default vector itself): ``default_vectors`` computes them once per process
and side from the manifest's ``default_vector`` (zeros, the mean of the
field's table, or one row of it: docs/formats.md).

A store with a shared-memory hot tier (``TieredStore`` with a table) pools
by itself (``TieredStore.pool``): a hash probe (~40 ns) costs less than the
sort that deduplication needs, so it probes every signature where it lies
and deduplicates only the misses it sends to the slower levels.
"""
import numpy as np
from numba import njit

from jizhi.bundle import parse_default_vector
from jizhi.cube.signature import sign
from jizhi.cube.store import open_cube
from jizhi.errors import BundleError
from jizhi.profilestore import profiles as store_profiles

# default_vectors: raw values looked up per step when a table is enumerated (bounded memory).
TABLE_CHUNK = 1 << 18
# table_is_bounded: raw values probed first, spread over 1..vocab, before the whole range is.
BOUND_PROBE = 4096


@njit(cache=True, nogil=True)
def _pool(lens, sums, inv, start, vectors, found, defaults, out):
    # lens [R, F]; sums [F]: sum pooling (else mean); inv: index into vectors
    # of each valid signature, in row-major order of (r, f, j < lens[r, f])
    # starting at inv[start]; a signature not found reads defaults[f], and so
    # does an empty bag.
    R, F = lens.shape
    D = vectors.shape[1]
    p = start
    for r in range(R):
        for f in range(F):
            n = lens[r, f]
            if n == 0:
                for d in range(D):
                    out[r, f, d] = defaults[f, d]
                continue
            for d in range(D):
                out[r, f, d] = 0.0
            for j in range(n):
                v = inv[p]
                p += 1
                if found[v]:
                    for d in range(D):
                        out[r, f, d] += vectors[v, d]
                else:
                    for d in range(D):
                        out[r, f, d] += defaults[f, d]
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


def pool_blocks(store, blocks, dim, sums=None, defaults=None):
    """Pool each (sigs [R, F, L] uint64, lens [R, F] int32) block.

    ``sums``: per block, bool [F] (True: sum pooling, else mean); default all
    mean. ``defaults``: per block, float32 [F, dim], each field's default
    vector (``default_vectors``); default zeros. Returns ``(pooled,
    missing)``: a list of float32 [R, F, dim] arrays and a list of int64 [R]
    counts of signatures the store lacked per row.
    """
    if sums is None:
        sums = [np.zeros(l.shape[1], dtype=np.bool_) for _, l in blocks]
    if defaults is None:
        defaults = [None] * len(blocks)
    defaults = [np.zeros((l.shape[1], dim), np.float32) if d is None else np.ascontiguousarray(d, dtype=np.float32)
                for (_, l), d in zip(blocks, defaults)]
    if getattr(store, "pool", None) is not None and store.pool_ready():
        return store.pool(blocks, sums, defaults)
    flats = [valid_signatures(s, l) for s, l in blocks]
    allsig = np.concatenate(flats) if flats else np.zeros(0, np.uint64)
    uniq, inv = np.unique(allsig, return_inverse=True)
    vectors, found = store.lookup(uniq)
    inv = inv.astype(np.int64, copy=False).reshape(-1)
    pooled, missing = [], []
    p = 0
    found = np.ascontiguousarray(found, dtype=np.bool_)
    for (s, l), sm, dv in zip(blocks, sums, defaults):
        l32 = np.ascontiguousarray(l, dtype=np.int32)
        out = np.empty((l32.shape[0], l32.shape[1], dim), dtype=np.float32)
        q = _pool(l32, np.ascontiguousarray(sm, dtype=np.bool_), inv, p, vectors, found, dv, out)
        missing.append(_missing_per_row(l32, inv, p, found))
        p = q
        pooled.append(out)
    return pooled, missing


# --- default vectors (docs/formats.md, manifest.toml: default_vector) ---------------------------

_DEFAULTS = {}      # (version directory, side) -> float32 [F, dim]: computed once per process


def _stored(cube, keys):
    """The vectors ``cube`` stores for ``keys`` (uint64), float32 [found, dim]."""
    keys = np.unique(np.asarray(keys, dtype=np.uint64))
    vectors, found = cube.lookup(keys)
    return vectors[found]


def _table_sum(cube, hash_id, values, seed):
    """(sum float64 [dim], count) of the vectors ``cube`` stores for raw ``values`` of table ``hash_id``."""
    v = _stored(cube, sign(hash_id, values, seed))
    return v.sum(axis=0, dtype=np.float64), v.shape[0]


def table_is_bounded(cube, hash_id, vocab, seed, raw=None):
    """True when ``vocab`` bounds the raw values of table ``hash_id``. The manifest says so with the field's
    ``raw``: ``"rows"`` (raw value = row + 1, 1..vocab: bounded), ``"ids"`` (entity ids: not bounded). A
    bundle written before ``raw`` existed says nothing: bounded when the cube stores the signature of at
    least one raw value in 1..vocab (the keys cube/layout.py's ``table_of`` gives the table), which a
    table of entity ids whose ids happen to fall in 1..vocab fools; writers say ``raw``. Probes
    BOUND_PROBE values spread over 1..vocab, then, only when they miss, the whole range in TABLE_CHUNK
    steps."""
    if vocab <= 0 or raw == "ids":
        return False
    if raw == "rows":
        return True
    probe = np.unique(np.linspace(1, vocab, min(vocab, BOUND_PROBE)).astype(np.int64))
    if _stored(cube, sign(hash_id, probe, seed)).shape[0]:
        return True
    return any(_stored(cube, sign(hash_id, np.arange(a, min(a + TABLE_CHUNK, vocab + 1), dtype=np.int64),
                                  seed)).shape[0] for a in range(1, vocab + 1, TABLE_CHUNK))


def _profile_values(bundle, hash_id, profiles):
    """Every raw value the profiles hold for the fields that read table ``hash_id`` (onehot 0, missing, left
    out): the rows a table of entity ids stores, as far as the bundle names them."""
    parts = []
    for f in bundle.user_fields + bundle.item_fields:
        if f.hash_id != hash_id or f.context:
            continue
        if f.side not in profiles:
            profiles[f.side] = store_profiles(bundle, f.side)
        col = profiles[f.side].cols[f.name]
        if f.kind == "onehot":
            col = np.asarray(col)
            parts.append(col[col != 0])
        else:
            parts.append(np.asarray(col[0]))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _table_mean(bundle, cube, field, profiles):
    """The mean of the vectors ``field``'s table stores: of raw values 1..vocab, or for a table of entity ids
    (no raw value of 1..vocab stored) of the raw values its fields' profiles hold."""
    h, seed = field.hash_id, bundle.hash_seed
    total, count = np.zeros(bundle.dim, np.float64), 0
    for a in range(1, (0 if field.raw == "ids" else field.vocab) + 1, TABLE_CHUNK):
        s, n = _table_sum(cube, h, np.arange(a, min(a + TABLE_CHUNK, field.vocab + 1), dtype=np.int64), seed)
        total += s
        count += n
    if count == 0:
        values = _profile_values(bundle, h, profiles)
        for a in range(0, values.shape[0], TABLE_CHUNK):
            s, n = _table_sum(cube, h, values[a:a + TABLE_CHUNK], seed)
            total += s
            count += n
    if count == 0:
        raise BundleError(f"field {field.name!r}: default_vector = \"mean\", but the cube stores no vector of its "
                          f"table (no raw value of 1..{field.vocab}, nor any raw value of the profiles)")
    return (total / count).astype(np.float32)


def default_vectors(bundle, side):
    """float32 [F, dim]: the default vector of each of ``side``'s fields (``"user"`` or ``"item"``), in column
    order, from the manifest's ``default_vector`` (a field's own, else the manifest's): ``zeros``; ``mean``,
    the mean of the vectors the field's table stores (``_table_mean``); ``row:N``, the vector the table
    stores for raw value N. Read from the version's own LMDB cube (``cube/data.mdb``, whatever backend
    serves the lookups), once per process and side: a worker computes them when it sets up the bundle,
    never per request. Raises BundleError naming the field when the cube lacks what it names."""
    key = (str(bundle.path), side)
    if key in _DEFAULTS:
        return _DEFAULTS[key]
    fields = bundle.user_fields if side == "user" else bundle.item_fields
    out = np.zeros((len(fields), bundle.dim), np.float32)
    cube, profiles, means = None, {}, {}
    for c, f in enumerate(fields):
        kind, n = parse_default_vector(f.default_vector)
        if kind == "zeros":
            continue
        if cube is None:
            cube = open_cube(bundle.cube_path, bundle.dim)
        if kind == "mean":
            if f.hash_id not in means:
                means[f.hash_id] = _table_mean(bundle, cube, f, profiles)
            out[c] = means[f.hash_id]
            continue
        key_n = sign(f.hash_id, np.array([n], np.int64), bundle.hash_seed)
        vectors, found = cube.lookup(key_n)
        if not found[0]:
            raise BundleError(f"field {f.name!r}: default_vector = \"row:{n}\", but the cube stores no vector for "
                              f"raw value {n} of its table (signature {int(key_n[0]):#018x})")
        out[c] = vectors[0]
    _DEFAULTS[key] = out
    return out


# Compile at import, not in the first request.
_v = np.zeros((1, 4), np.float32)
_pool(np.ones((1, 1), np.int32), np.zeros(1, np.bool_), np.zeros(1, np.int64), 0, _v, np.ones(1, np.bool_),
      np.zeros((1, 4), np.float32), np.empty((1, 1, 4), np.float32))
_missing_per_row(np.ones((1, 1), np.int32), np.zeros(1, np.int64), 0, np.ones(1, np.bool_))
