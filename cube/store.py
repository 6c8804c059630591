"""The cube: an LMDB environment of signature -> float32[dim] embeddings.

Opened read-only and memory-mapped by each process that reads it (the
``cube_accessor`` worker, the LEGACY worker). Bundles are never written while
loaded, so the environment is opened with ``lock=False``; one environment per
process (LMDB forbids opening it twice in a process; ``open_cube`` keeps one
per path).

Reads are batched: ``lookup`` takes sorted unique keys (the caller
deduplicates). They go through the Numba B+tree reader (cube/btree.py) once
it has verified itself against liblmdb on a sample of keys; otherwise through
one py-lmdb ``getmulti`` cursor pass in key byte order.
"""
import logging

import lmdb
import numpy as np

from jizhi.cube.btree import BTreeReader

log = logging.getLogger("jizhi.cube")
VERIFY_SAMPLE = 512

_OPEN = {}


class Cube:
    """A read-only view of one cube. ``dim`` is the vector length."""

    def __init__(self, path, dim, reader="auto"):
        self.path = str(path)
        self.dim = int(dim)
        self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                             max_readers=512, subdir=True)
        self._row_bytes = self.dim * 4
        # reader: "auto" (the verified Numba reader, else liblmdb) or "liblmdb".
        self.btree = self._verified_btree() if reader == "auto" else None

    def _verified_btree(self):
        """The Numba reader if it agrees with liblmdb on a sample of present and absent keys."""
        try:
            reader = BTreeReader.open(self.path, self.dim)
        except (OSError, ValueError) as e:
            log.warning("cube %s: Numba reader unavailable (%s); using liblmdb", self.path, e)
            return None
        if reader is None:
            log.warning("cube %s: not an LMDB format the Numba reader knows; using liblmdb", self.path)
            return None
        rng = np.random.default_rng(0)
        probes = rng.integers(0, 2 ** 63, VERIFY_SAMPLE, dtype=np.uint64)
        sample = []
        with self.env.begin() as txn:
            cur = txn.cursor()
            for p in probes:
                if cur.set_range(int(p).to_bytes(8, "little")):
                    sample.append(cur.key())
            if cur.first():
                sample.append(cur.key())
            if cur.last():
                sample.append(cur.key())
            keys = np.concatenate([np.frombuffer(b"".join(sample), dtype="<u8"), probes])
            want = [txn.get(k.tobytes()) for k in keys.astype("<u8")]
        got, found = reader.lookup(keys)
        for i, w in enumerate(want):
            if (w is None) != (not found[i]) or (w is not None and got[i].tobytes() != w):
                log.warning("cube %s: Numba reader disagrees with liblmdb; using liblmdb", self.path)
                return None
        return reader

    def lookup(self, keys):
        """Vectors of ``keys`` (uint64, sorted, unique) and a found mask.

        Returns ``(vectors float32[K, dim], found bool[K])``; a key that is
        not in the cube reads the default vector (zeros).
        """
        keys = np.ascontiguousarray(keys, dtype="<u8")
        if self.btree is not None and keys.shape[0]:
            return self.btree.lookup(keys)
        return getmulti(self.env, keys, self.dim)

    def close(self):
        self.env.close()
        # The process's registry must not hand out a closed environment (open_cube, opened_cube).
        if _OPEN.get(self.path) is self:
            del _OPEN[self.path]


def getmulti(env, keys, dim):
    """``(vectors float32[K, dim], found bool[K])`` of sorted unique ``keys`` through liblmdb.

    One read transaction, one cursor pass in the tree's byte order (memcmp of
    the little-endian bytes, i.e. the byte-swapped value order). Used for a
    cube the Numba reader refused and for the disk cache (cube/cache.py),
    which another process writes while it is read.
    """
    keys = np.ascontiguousarray(keys, dtype="<u8")
    k = keys.shape[0]
    out = np.zeros((k, dim), dtype=np.float32)
    found = np.zeros(k, dtype=bool)
    if k == 0:
        return out, found
    bo = np.argsort(keys.byteswap(), kind="stable")
    raw = keys[bo].tobytes()
    with env.begin(buffers=False) as txn:
        pairs = txn.cursor().getmulti([raw[i:i + 8] for i in range(0, 8 * k, 8)])
    if pairs:
        got = np.frombuffer(b"".join(p[0] for p in pairs), dtype="<u8")
        idx = np.searchsorted(keys, got)
        out[idx] = np.frombuffer(b"".join(p[1] for p in pairs), dtype="<f4").reshape(-1, dim)
        found[idx] = True
    return out, found


def cube_keys(cube):
    """Every key of a cube, from one read-only cursor pass (a builder's or the push's, not the hot path)."""
    with cube.env.begin(buffers=True) as txn:
        raw = b"".join(bytes(k) for k in txn.cursor().iternext(keys=True, values=False))
    return np.frombuffer(raw, dtype="<u8").copy()


def opened_cube(path):
    """The process's Cube for ``path`` if ``open_cube`` opened it, else None."""
    return _OPEN.get(str(path))


def open_cube(path, dim):
    """The process's one Cube for ``path`` (opening an env twice is illegal)."""
    key = str(path)
    cube = _OPEN.get(key)
    if cube is None:
        cube = _OPEN[key] = Cube(path, dim)
    return cube
