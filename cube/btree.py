"""Numba-compiled batch lookups in an LMDB cube's memory-mapped B+tree.

Why: liblmdb through py-lmdb costs ~1-2 us per key on our machines (a
Python tuple per key, a bytes object per key and per value), and a
500-candidate request needs about two thousand distinct keys. LMDB's data
file *is* a B+tree of fixed pages in a memory map, so a Numba kernel can
walk it directly: no Python object per key, about 0.7-0.9 us per key on
the demo cube (1.1-1.5 M keys/s per core; liblmdb 0.85 M; the shared-memory
hot tier in front of it, cube/hot.py, about 25 M: docs/benchmarks.md,
"Storage micro-benchmarks").

This reads LMDB's on-disk format version 1 (liblmdb 0.9, ``MDB_DATA_VERSION``
1; magic 0xBEEFC0DE), main database only, default byte-wise key order, no
duplicate keys. ``BTreeReader.open`` checks the meta page and then *verifies*
itself against liblmdb on a sample of keys; the caller (cube/store.py) falls
back to py-lmdb's ``getmulti`` when it refuses. Safe only because a loaded
bundle is never written (docs/formats.md, "Publishing a version").

Layout used (little-endian, 64-bit):
page header 16 bytes: pgno u64, pad u16, flags u16 @10, lower u16 @12, upper u16 @14;
node pointers u16[(lower-16)/2] @16; node: lo u16, hi u16, flags u16, ksize u16, key, data;
branch child = lo | hi<<16 | flags<<32; leaf data size = lo | hi<<16;
leaf flag F_BIGDATA (0x01): data is the u64 page number of an overflow page.
meta (pages 0 and 1, header then): magic u32 @16, version u32 @20, page size
(FREE db md_pad) u32 @40, MAIN db depth u16 @94, MAIN db root u64 @128, txnid u64 @144.
"""
import numpy as np
from numba import njit

MAGIC = 0xBEEFC0DE
P_BRANCH, P_LEAF = 0x01, 0x02
F_BIGDATA = 0x01
P_INVALID = 0xFFFFFFFFFFFFFFFF


def _u(buf, off, n):
    return int.from_bytes(bytes(buf[off:off + n]), "little")


@njit(cache=True, nogil=True, inline="always")
def _u16(b, o):
    return np.uint64(b[o]) | (np.uint64(b[o + 1]) << np.uint64(8))


@njit(cache=True, nogil=True, inline="always")
def _be64(b, o):
    x = np.uint64(0)
    for i in range(8):
        x = (x << np.uint64(8)) | np.uint64(b[o + i])
    return x


G = 16  # keys searched in lockstep


@njit(cache=True, nogil=True, inline="always")
def _nodes(b, page):
    """How many nodes the page at byte offset ``page`` holds."""
    return (np.int64(_u16(b, page + 12)) - 16) >> 1


@njit(cache=True, nogil=True, inline="always")
def _node(b, page, i):
    """Byte offset of node ``i`` of the page at byte offset ``page``."""
    return page + np.int64(_u16(b, page + 16 + 2 * i))


@njit(cache=True, nogil=True)
def _lookup(buf, psize, root, depth, keys, out_bytes, found):
    # Keys are looked up G at a time, in lockstep: the binary-search probes of
    # G keys are independent loads, so their cache misses overlap instead of
    # queueing one after another (a leaf probe is a miss on a cube larger than
    # the caches). keys: uint64 values whose little-endian bytes are the LMDB
    # keys; the tree orders them by memcmp, i.e. by the byte-swapped value.
    K = keys.shape[0]
    vbytes = out_bytes.shape[1]
    kb = np.empty(G, np.uint64)
    pg = np.empty(G, np.uint64)
    base = np.empty(G, np.int64)
    lo = np.empty(G, np.int64); hi = np.empty(G, np.int64); best = np.empty(G, np.int64)
    for start in range(0, K, G):
        m = min(G, K - start)
        for g in range(m):
            v = keys[start + g]
            x = np.uint64(0)
            for i in range(8):
                x = (x << np.uint64(8)) | ((v >> np.uint64(8 * i)) & np.uint64(0xFF))
            kb[g] = x
            pg[g] = root
            found[start + g] = False
        # Branch levels (depth-1 of them): the last node whose key is at most the key's (node 0 has
        # none: it covers everything below node 1's). Two search loops, not one with a flag: one
        # loop for both levels measured 1.5-2.5 % slower per key (2 M keys, depth 3).
        for level in range(depth - 1):
            for g in range(m):
                base[g] = np.int64(pg[g]) * psize
                lo[g] = 1; hi[g] = _nodes(buf, base[g]) - 1; best[g] = 0
            active = True
            while active:
                active = False
                for g in range(m):
                    if lo[g] <= hi[g]:
                        active = True
                        mid = (lo[g] + hi[g]) >> 1
                        if _be64(buf, _node(buf, base[g], mid) + 8) <= kb[g]:
                            best[g] = mid
                            lo[g] = mid + 1
                        else:
                            hi[g] = mid - 1
            for g in range(m):
                node = _node(buf, base[g], best[g])
                pg[g] = _u16(buf, node) | (_u16(buf, node + 2) << np.uint64(16)) | (_u16(buf, node + 4) << np.uint64(32))
        # leaf level: the node whose key equals the key's
        for g in range(m):
            base[g] = np.int64(pg[g]) * psize
            lo[g] = 0; hi[g] = _nodes(buf, base[g]) - 1; best[g] = -1
        active = True
        while active:
            active = False
            for g in range(m):
                if lo[g] <= hi[g]:
                    active = True
                    mid = (lo[g] + hi[g]) >> 1
                    node = _node(buf, base[g], mid)
                    nk = _be64(buf, node + 8)
                    if nk == kb[g]:
                        best[g] = node
                        lo[g] = 1; hi[g] = 0
                    elif nk < kb[g]:
                        lo[g] = mid + 1
                    else:
                        hi[g] = mid - 1
        for g in range(m):
            node = best[g]
            if node < 0:
                continue
            dsize = np.int64(_u16(buf, node) | (_u16(buf, node + 2) << np.uint64(16)))
            data = node + 8 + np.int64(_u16(buf, node + 6))
            if _u16(buf, node + 4) & np.uint64(F_BIGDATA):
                opg = np.int64(0)
                for i in range(8):
                    opg |= np.int64(buf[data + i]) << (8 * i)
                data = opg * psize + 16
            if dsize == vbytes:
                q = start + g
                for i in range(vbytes):
                    out_bytes[q, i] = buf[data + i]
                found[q] = True


class BTreeReader:
    """Lookups in one cube's data.mdb by a Numba kernel over its mmap."""

    def __init__(self, data, psize, root, depth, dim):
        self.data = data
        self.psize = psize
        self.root = root
        self.depth = depth
        self.dim = dim

    @classmethod
    def open(cls, path, dim):
        """A reader, or None when the file is not a format this module reads."""
        data = np.memmap(f"{path}/data.mdb", dtype=np.uint8, mode="r")
        if data.shape[0] < 2 * 4096:
            return None
        metas = []
        psize = _u(data, 40, 4)
        if psize < 512 or psize > 65536 or psize & (psize - 1):
            return None
        for p in (0, 1):
            b = p * psize
            if _u(data, b + 16, 4) != MAGIC or _u(data, b + 20, 4) != 1:
                return None
            metas.append((_u(data, b + 144, 8), _u(data, b + 128, 8), _u(data, b + 94, 2)))
        txnid, root, depth = max(metas)
        if root == P_INVALID or not 1 <= depth <= 32:
            return None
        return cls(np.asarray(data), psize, root, depth, dim)

    def lookup(self, keys):
        """(vectors float32 [K, dim], found bool [K]) for uint64 ``keys`` (any order)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.zeros((keys.shape[0], self.dim), dtype=np.float32)
        found = np.zeros(keys.shape[0], dtype=np.bool_)
        _lookup(self.data, self.psize, np.uint64(self.root), self.depth, keys, out.view(np.uint8), found)
        return out, found


_b = np.zeros(4096 * 3, np.uint8)
_b[4096 * 2 + 12] = 16   # an empty leaf at page 2
_b[4096 * 2 + 10] = P_LEAF
_lookup(_b, 4096, np.uint64(2), 1, np.zeros(1, np.uint64), np.zeros((1, 4), np.uint8), np.zeros(1, np.bool_))
