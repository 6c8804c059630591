"""The cube: an LMDB environment of signature -> float32[dim] embeddings.

Opened read-only and memory-mapped by each process that reads it (the
``cube_accessor`` worker, the LEGACY worker). Bundles are never written while
loaded, so the environment is opened with ``lock=False``; one environment per
process (LMDB forbids opening it twice in a process; ``open_cube`` keeps one
per path).

Reads are batched: ``lookup`` takes sorted unique keys (the caller
deduplicates) and does one ``getmulti`` cursor pass.
"""
import lmdb
import numpy as np

_OPEN = {}


class Cube:
    """A read-only view of one cube. ``dim`` is the vector length."""

    def __init__(self, path, dim):
        self.path = str(path)
        self.dim = int(dim)
        self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                             max_readers=512, subdir=True)
        self._row_bytes = self.dim * 4

    def lookup(self, keys):
        """Vectors of ``keys`` (uint64, sorted, unique) and a found mask.

        Returns ``(vectors float32[K, dim], found bool[K])``; a key that is
        not in the cube reads the default vector (zeros).
        """
        keys = np.ascontiguousarray(keys, dtype="<u8")
        k = keys.shape[0]
        out = np.zeros((k, self.dim), dtype=np.float32)
        found = np.zeros(k, dtype=bool)
        if k == 0:
            return out, found
        raw = keys.tobytes()
        key_list = [raw[i:i + 8] for i in range(0, 8 * k, 8)]
        with self.env.begin(buffers=False) as txn:
            pairs = txn.cursor().getmulti(key_list)
        if not pairs:
            return out, found
        if len(pairs) == k:
            idx = slice(None)
        else:
            got = np.frombuffer(b"".join(p[0] for p in pairs), dtype="<u8")
            idx = np.searchsorted(keys, got)
        vals = np.frombuffer(b"".join(p[1] for p in pairs), dtype="<f4").reshape(-1, self.dim)
        out[idx] = vals
        found[idx] = True
        return out, found

    def close(self):
        self.env.close()


def open_cube(path, dim):
    """The process's one Cube for ``path`` (opening an env twice is illegal)."""
    key = str(path)
    cube = _OPEN.get(key)
    if cube is None:
        cube = _OPEN[key] = Cube(path, dim)
    return cube
