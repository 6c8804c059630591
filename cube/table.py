"""An in-RAM embedding table with the Cube's lookup contract.

Used where the cube is deliberately not read from LMDB: the ``--ceiling`` of
``jizhictl bench`` (the machine's limit for the work) loads the whole cube
into two numpy arrays and answers lookups with a vectorised binary search.
"""
import numpy as np

from jizhi.cube.build import read_all


class RamTable:
    def __init__(self, keys, vectors):
        order = np.argsort(keys, kind="stable")
        self.keys = np.ascontiguousarray(keys[order], dtype=np.uint64)
        self.vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        self.dim = self.vectors.shape[1]

    @classmethod
    def from_cube(cls, path):
        keys, vectors = read_all(path)
        return cls(keys, vectors)

    def lookup(self, keys):
        """Same contract as ``Cube.lookup``: (vectors [K, dim], found [K])."""
        keys = np.asarray(keys, dtype=np.uint64)
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, self.keys.shape[0] - 1)
        found = self.keys[pos_c] == keys
        out = self.vectors[pos_c]
        out[~found] = 0.0
        return out, found
