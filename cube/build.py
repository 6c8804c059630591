"""Cube building: write and read a whole LMDB cube offline.

Runs offline only (``jizhi.demo``, the reference scorer, tests, the ceiling),
never in a serving worker: ``read_all`` pulls the whole cube into RAM.

The on-disk layout is the bundle format's ``cube/data.mdb`` (docs/formats.md):
the unnamed LMDB database, key = signature as 8 bytes little-endian uint64,
value = float32[dim] little-endian. Keys are stored in LMDB's default
lexicographic byte order, so a reader needs no special comparator.
"""
import os

import lmdb
import numpy as np

_PAGE_BYTES = 4096
# LMDB node header (8) plus the page's 2-byte pointer to the node.
_NODE_OVERHEAD_BYTES = 10


def _map_size(count, value_bytes):
    """Bytes to reserve for ``count`` entries of ``value_bytes`` each.

    An entry takes key + value + node overhead in a leaf page; a value too
    large for half a page goes to its own overflow pages instead. Doubled
    for branch pages, the meta pages and partly filled pages, plus 1 MiB so
    a tiny cube still opens. On Linux the map size only reserves address
    space; the file grows to what is written.
    """
    entry = 8 + value_bytes + _NODE_OVERHEAD_BYTES
    if entry > _PAGE_BYTES // 2:
        entry = 8 + 8 + _NODE_OVERHEAD_BYTES + -(-(value_bytes + 16) // _PAGE_BYTES) * _PAGE_BYTES
    size = 2 * count * entry + (1 << 20)
    return -(-size // _PAGE_BYTES) * _PAGE_BYTES


def write_cube(path, keys, vectors, map_size=None):
    """Write ``vectors[k]`` under signature ``keys[k]`` into a new cube at ``path``.

    ``path`` (str or path-like) is the LMDB directory (created; it must not already hold a
    ``data.mdb``). ``keys`` uint64 [K] must be distinct; ``vectors`` float32
    [K, dim]. ``map_size`` defaults to a size computed from K and dim with
    headroom. Entries are appended in LMDB key order in one write
    transaction, so the same input gives a byte-identical ``data.mdb``.
    ``lock.mdb`` is removed afterwards: a bundle ships ``data.mdb`` only and
    readers open it with ``lock=False``.

    Raises ValueError on duplicate keys or mismatched shapes.
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != keys.shape[0]:
        raise ValueError(f"vectors shape {vectors.shape} does not match {keys.shape[0]} keys")
    # LMDB orders keys as bytes; little-endian bytes compare like the
    # byte-swapped (big-endian) integer.
    order = np.argsort(keys.byteswap(), kind="stable")
    keys = keys[order]
    if keys.shape[0] > 1 and np.any(keys[1:] == keys[:-1]):
        raise ValueError("duplicate signatures")
    value_bytes = vectors.shape[1] * 4
    key_blob = keys.astype("<u8").tobytes()
    value_blob = np.ascontiguousarray(vectors[order], dtype="<f4").tobytes()
    count = keys.shape[0]

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, "data.mdb")):
        raise FileExistsError(os.path.join(path, "data.mdb"))
    if map_size is None:
        map_size = _map_size(count, value_bytes)
    env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=0, metasync=True, sync=True)
    try:
        chunk = 65536
        with env.begin(write=True) as txn:
            cursor = txn.cursor()
            for start in range(0, count, chunk):
                stop = min(start + chunk, count)
                items = [(key_blob[8 * i:8 * i + 8], value_blob[value_bytes * i:value_bytes * (i + 1)])
                         for i in range(start, stop)]
                consumed, added = cursor.putmulti(items, append=True)
                # An out-of-order append is silently skipped, not raised.
                if added != stop - start:
                    raise RuntimeError(f"LMDB append stored {added} of {stop - start} entries")
        env.sync(True)
    finally:
        env.close()
    lock = os.path.join(path, "lock.mdb")
    if os.path.exists(lock):
        os.remove(lock)


def read_all(path):
    """The whole cube at ``path`` as ``(keys uint64 [K], vectors float32 [K, dim])``.

    Keys come back sorted ascending as integers (ready for ``searchsorted``).
    Opens the environment read-only without a lock file, so it works on a
    bundle that ships ``data.mdb`` alone; the caller must not be writing it.
    An empty cube returns float32 [0, 0] vectors.
    """
    path = os.fspath(path)
    env = lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=True)
    try:
        with env.begin(buffers=False) as txn:
            entries = txn.stat()["entries"]
            key_parts = []
            value_parts = []
            for key, value in txn.cursor().iternext(keys=True, values=True):
                key_parts.append(key)
                value_parts.append(value)
    finally:
        env.close()
    if entries == 0:
        return np.empty(0, dtype=np.uint64), np.empty((0, 0), dtype=np.float32)
    keys = np.frombuffer(b"".join(key_parts), dtype="<u8").astype(np.uint64)
    value_blob = b"".join(value_parts)
    dim = len(value_parts[0]) // 4
    if len(value_blob) != entries * dim * 4:
        raise ValueError(f"cube at {path}: values are not all {dim * 4} bytes")
    vectors = np.frombuffer(value_blob, dtype="<f4").astype(np.float32).reshape(entries, dim)
    order = np.argsort(keys, kind="stable")
    return keys[order], vectors[order]
