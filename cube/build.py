"""Cube building: write, read and inspect an LMDB cube offline.

Runs offline only (``jizhictl cube build|info|get``, ``jizhi.tools.demo``, the
reference scorer, tests, the ceiling), never in a serving worker:
``read_all`` pulls the whole cube into RAM.

The on-disk layout is the bundle format's ``cube/data.mdb`` (docs/formats.md):
the unnamed LMDB database, key = signature as 8 bytes little-endian uint64,
value = float32[dim] little-endian. Keys are stored in LMDB's default
lexicographic byte order, so a reader needs no special comparator.

``CubeWriter`` appends entries in that order and commits every
``txn_entries`` of them, so a large cube never needs one huge write
transaction in memory; ``build_cube`` makes a cube from input tables
(``open_table``: .npz, a directory or pair of .npy files, Parquet) and
refuses bad input with a ``TableError`` that names the file and the reason.
"""
import os
import shutil
import tomllib

import lmdb
import numpy as np

from jizhi.cube.store import opened_cube

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


def lmdb_order(keys):
    """The permutation that sorts uint64 ``keys`` in LMDB's key order.

    LMDB orders keys as bytes; little-endian bytes compare like the
    byte-swapped (big-endian) integer.
    """
    return np.argsort(np.asarray(keys, dtype=np.uint64).byteswap(), kind="stable")


class CubeWriter:
    """Appends entries to a new cube at ``path``, in LMDB key order, one chunk at a time.

    ``path`` is the LMDB directory (created; it must not already hold a
    ``data.mdb``). ``count`` and ``dim`` size the map (``map_size`` overrides).
    ``txn_entries`` bounds a write transaction: after that many entries it is
    committed and a new one begins, so the dirty pages held in memory stay
    near ``txn_entries * (dim * 4 + 18)`` bytes; None writes everything in one
    transaction (``write_cube``: the same input gives a byte-identical
    ``data.mdb``; so does the same input with the same ``txn_entries``).
    ``close()`` commits, syncs and removes ``lock.mdb`` (a bundle ships
    ``data.mdb`` only and readers open it with ``lock=False``); ``abort()``
    drops the open transaction and leaves the directory to the caller.
    """

    PUT_ENTRIES = 65536  # entries per putmulti call: the Python tuples of one call are what it costs in RAM

    def __init__(self, path, count, dim, map_size=None, txn_entries=None):
        self.path = os.fspath(path)
        self.dim = int(dim)
        self.value_bytes = self.dim * 4
        self.txn_entries = None if txn_entries is None else max(1, int(txn_entries))
        os.makedirs(self.path, exist_ok=True)
        if os.path.exists(os.path.join(self.path, "data.mdb")):
            raise FileExistsError(os.path.join(self.path, "data.mdb"))
        if map_size is None:
            map_size = _map_size(count, self.value_bytes)
        self.env = lmdb.open(self.path, map_size=map_size, subdir=True, max_dbs=0, metasync=True, sync=True)
        self.txn = self.env.begin(write=True)
        self.in_txn = 0
        self.written = 0
        self.transactions = 0   # committed with entries in them
        self._last = None   # byte-swapped value of the last key written

    def append(self, keys, vectors):
        """Write ``vectors[i]`` under ``keys[i]``: keys strictly increasing in LMDB order, after every earlier key.

        Raises ValueError otherwise (LMDB's append mode would skip them silently).
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (keys.shape[0], self.dim):
            raise ValueError(f"vectors shape {vectors.shape} does not match {keys.shape[0]} keys of dim {self.dim}")
        n = keys.shape[0]
        if n == 0:
            return
        swapped = keys.byteswap()
        if np.any(swapped[1:] <= swapped[:-1]) or (self._last is not None and swapped[0] <= self._last):
            raise ValueError("keys are not strictly increasing in LMDB order (duplicates, or unsorted)")
        key_blob = keys.astype("<u8").tobytes()
        value_blob = vectors.tobytes()
        vb = self.value_bytes
        start = 0
        while start < n:
            stop = min(n, start + self.PUT_ENTRIES)
            if self.txn_entries is not None:
                stop = min(stop, start + self.txn_entries - self.in_txn)
            items = [(key_blob[8 * i:8 * i + 8], value_blob[vb * i:vb * (i + 1)]) for i in range(start, stop)]
            consumed, added = self.txn.cursor().putmulti(items, append=True)
            # An out-of-order append is silently skipped, not raised.
            if added != stop - start:
                raise RuntimeError(f"LMDB append stored {added} of {stop - start} entries")
            self.in_txn += stop - start
            self.written += stop - start
            start = stop
            if self.txn_entries is not None and self.in_txn >= self.txn_entries:
                self.txn.commit()
                self.txn = self.env.begin(write=True)
                self.transactions += 1
                self.in_txn = 0
        self._last = swapped[-1]

    def close(self):
        self.txn.commit()
        self.transactions += int(self.in_txn > 0)
        self.txn = None
        self.env.sync(True)
        self.env.close()
        lock = os.path.join(self.path, "lock.mdb")
        if os.path.exists(lock):
            os.remove(lock)

    def abort(self):
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.env.close()


def write_cube(path, keys, vectors, map_size=None):
    """Write ``vectors[k]`` under signature ``keys[k]`` into a new cube at ``path``.

    ``path`` (str or path-like) is the LMDB directory (created; it must not already hold a
    ``data.mdb``). ``keys`` uint64 [K] must be distinct; ``vectors`` float32
    [K, dim]. ``map_size`` defaults to a size computed from K and dim with
    headroom. Entries are appended in LMDB key order in one write
    transaction, so the same input gives a byte-identical ``data.mdb``.
    ``lock.mdb`` is removed afterwards: a bundle ships ``data.mdb`` only and
    readers open it with ``lock=False``. (``build_cube`` writes large inputs
    in several transactions.)

    Raises ValueError on duplicate keys or mismatched shapes.
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != keys.shape[0]:
        raise ValueError(f"vectors shape {vectors.shape} does not match {keys.shape[0]} keys")
    order = lmdb_order(keys)
    keys = keys[order]
    if keys.shape[0] > 1 and np.any(keys[1:] == keys[:-1]):
        raise ValueError("duplicate signatures")
    writer = CubeWriter(path, keys.shape[0], vectors.shape[1], map_size=map_size)
    try:
        writer.append(keys, vectors[order])
    except BaseException:
        writer.abort()
        raise
    writer.close()


# --- input tables (jizhictl cube build) ------------------------------------------

class TableError(ValueError):
    """An input table (or a set of them) that ``build_cube`` refuses; the message says which and why."""


PARQUET_HINT = "pip install 'jizhi[parquet]'"


class Table:
    """One input of ``build_cube``: ``keys`` uint64 [K] and ``vectors`` float32 [K, dim].

    Either may be a read-only memory map (.npy files): rows are read in the
    order the cube is written. ``name`` is what a message calls it.
    """

    def __init__(self, name, keys, vectors):
        self.name = name
        if keys.dtype.kind != "u" or keys.dtype.itemsize != 8:
            hint = " (signatures held as int64: .view(np.uint64) them)" if keys.dtype == np.int64 else ""
            raise TableError(f"{name}: keys have dtype {keys.dtype}, not uint64{hint}")
        if keys.ndim != 1:
            raise TableError(f"{name}: keys have shape {keys.shape}, not [K]")
        if vectors.dtype.kind != "f" or vectors.dtype.itemsize != 4:
            raise TableError(f"{name}: vectors have dtype {vectors.dtype}, not float32")
        if vectors.ndim != 2 or vectors.shape[0] != keys.shape[0] or vectors.shape[1] < 1:
            raise TableError(f"{name}: vectors have shape {vectors.shape}, not [{keys.shape[0]}, dim] "
                             f"(one row per key)")
        self.keys = keys
        self.vectors = vectors

    @property
    def dim(self):
        return int(self.vectors.shape[1])

    def __len__(self):
        return int(self.keys.shape[0])


def _load_npy(path, what):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise TableError(f"{path}: no such file ({what})")
    except (ValueError, OSError) as e:
        raise TableError(f"{path}: not a numpy .npy array ({e})")


def open_npy_pair(keys_path, vectors_path):
    """A table from ``keys_path`` (uint64 [K]) and ``vectors_path`` (float32 [K, dim]), memory-mapped."""
    keys = _load_npy(keys_path, "keys")
    vectors = _load_npy(vectors_path, "vectors")
    return Table(f"{keys_path} + {vectors_path}", keys, vectors)


def _open_npz(path):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TableError(f"{path}: not a numpy .npz archive ({e})")
    with data:
        missing = [a for a in ("keys", "vectors") if a not in data.files]
        if missing:
            raise TableError(f"{path}: no array {' or '.join(repr(a) for a in missing)} "
                             f"(it holds {', '.join(data.files) or 'nothing'})")
        try:
            keys, vectors = data["keys"], data["vectors"]
        except ValueError as e:
            raise TableError(f"{path}: {e}")
    return Table(str(path), keys, vectors)


def _open_parquet(path):
    try:     # an optional dependency (the parquet extra), imported only by the table that needs it
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: reading Parquet needs pyarrow, which is not installed: {PARQUET_HINT}")
    try:
        t = pq.read_table(path, columns=["signature", "vector"])
    except (KeyError, pa.ArrowException, OSError) as e:
        raise TableError(f"{path}: cannot read columns 'signature' and 'vector' ({e})")
    sig = t.column("signature").combine_chunks()
    vec = t.column("vector").combine_chunks()
    if sig.type not in (pa.uint64(), pa.int64()):
        raise TableError(f"{path}: column 'signature' is {sig.type}, not uint64")
    if sig.null_count or vec.null_count:
        raise TableError(f"{path}: null signatures or vectors")
    keys = sig.to_numpy(zero_copy_only=False).view(np.uint64)   # int64: the same 64 bits
    vt = vec.type
    if not (pa.types.is_list(vt) or pa.types.is_large_list(vt) or pa.types.is_fixed_size_list(vt)) \
            or vt.value_type != pa.float32():
        raise TableError(f"{path}: column 'vector' is {vt}, not list<float32>")
    values = vec.flatten()
    if values.null_count:
        raise TableError(f"{path}: null elements in column 'vector'")
    flat = values.to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(vt):
        dim = vt.list_size
    else:
        lens = vec.value_lengths().to_numpy(zero_copy_only=False)
        dim = int(lens[0]) if lens.shape[0] else 0
        if lens.shape[0] and (lens != dim).any():
            bad = int(np.flatnonzero(lens != dim)[0])
            raise TableError(f"{path}: vectors of different lengths (row 0 has {dim}, row {bad} has {int(lens[bad])})")
    if keys.shape[0] == 0:
        dim = max(dim, 1)
    return Table(str(path), keys, flat.reshape(keys.shape[0], dim))


def open_table(path):
    """An input table from ``path``:

    * ``*.npz``: arrays ``keys`` (uint64 [K]) and ``vectors`` (float32 [K, dim]), read into RAM;
    * a directory holding ``keys.npy`` and ``vectors.npy`` (the same arrays), memory-mapped;
    * ``*.parquet`` / ``*.pq``: columns ``signature`` (uint64; int64 is taken as the same
      64 bits) and ``vector`` (list<float32>, every list of length dim), read into RAM;
      needs pyarrow (``pip install 'jizhi[parquet]'``).

    Raises TableError naming the file and what is wrong.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        if not (os.path.exists(os.path.join(p, "keys.npy")) and os.path.exists(os.path.join(p, "vectors.npy"))):
            raise TableError(f"{p}: a directory must hold keys.npy and vectors.npy")
        return open_npy_pair(os.path.join(p, "keys.npy"), os.path.join(p, "vectors.npy"))
    if not os.path.exists(p):
        raise TableError(f"{p}: no such file")
    low = p.lower()
    if low.endswith(".npz"):
        return _open_npz(p)
    if low.endswith((".parquet", ".pq")):
        return _open_parquet(p)
    raise TableError(f"{p}: not a table jizhi reads (.npz, .parquet, or a directory of keys.npy and vectors.npy)")


class CubePlan:
    """What ``build_cube`` will write, checked: made by ``plan_cube``, written by ``write``.

    ``keys`` uint64 [K] in LMDB order; ``order`` int64 [K] the row of each in
    the tables' concatenation; ``source`` int32 [K] its table; ``dim``.
    """

    def __init__(self, out_dir, tables, keys, order, source, bases, dim):
        self.out_dir, self.tables, self.keys, self.order = out_dir, tables, keys, order
        self.source, self.bases, self.dim = source, bases, dim

    def __len__(self):
        return int(self.keys.shape[0])

    def write(self, txn_entries=None, progress=None):
        """Write the cube (see ``build_cube``); returns {"keys", "dim", "transactions", "bytes"}."""
        out_dir, dim, count = self.out_dir, self.dim, len(self)
        if os.path.lexists(out_dir):
            raise TableError(f"{out_dir} exists already (a cube is written into a new directory)")
        parent, name = os.path.split(out_dir)
        partial = os.path.join(parent, f".{name}.partial-{os.getpid()}")
        if os.path.lexists(partial):
            shutil.rmtree(partial)
        writer = CubeWriter(partial, count, dim, txn_entries=txn_entries)
        try:
            chunk = CubeWriter.PUT_ENTRIES
            for start in range(0, count, chunk):
                stop = min(count, start + chunk)
                src = self.source[start:stop]
                rows = self.order[start:stop] - self.bases[src]
                vectors = np.empty((stop - start, dim), dtype=np.float32)
                for j in np.unique(src):
                    m = src == j
                    vectors[m] = self.tables[j].vectors[rows[m]]
                bad = ~np.isfinite(vectors).all(axis=1)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    k = int(self.keys[start + i])
                    raise TableError(f"{self.tables[src[i]].name}: the vector of signature {k} (0x{k:016x}, "
                                     f"row {rows[i]}) holds NaN or infinity")
                writer.append(self.keys[start:stop], vectors)
                if progress is not None:
                    progress(stop - start)
        except BaseException:
            writer.abort()
            shutil.rmtree(partial, ignore_errors=True)
            raise
        writer.close()
        os.rename(partial, out_dir)
        return {"keys": count, "dim": dim, "transactions": writer.transactions,
                "bytes": os.path.getsize(os.path.join(out_dir, "data.mdb"))}


def plan_cube(out_dir, tables, dim=None):
    """Check ``tables`` for a new cube at ``out_dir`` and sort their keys; a ``CubePlan``.

    Refuses (TableError): ``out_dir`` exists, no tables or no keys, tables of
    different dims (or not ``dim``), a signature that appears twice (in one
    table or across tables). Memory: about 17 bytes per key.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        raise TableError(f"{out_dir} exists already (a cube is written into a new directory)")
    if not tables:
        raise TableError("no input tables")
    if dim is not None:
        wrong = [t for t in tables if t.dim != int(dim)]
        if wrong:
            raise TableError(f"{wrong[0].name}: vectors have dim {wrong[0].dim}, not {dim} (--dim)")
    dims = sorted({t.dim for t in tables})
    if len(dims) > 1:
        raise TableError("the tables have different dims: " + ", ".join(f"{t.name} {t.dim}" for t in tables))
    counts = np.array([len(t) for t in tables], dtype=np.int64)
    if counts.sum() == 0:
        raise TableError("the input tables hold no keys")
    keys = np.concatenate([np.asarray(t.keys, dtype=np.uint64) for t in tables])
    order = lmdb_order(keys)
    keys = keys[order]
    bases = np.concatenate([[0], np.cumsum(counts)])
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if dup.shape[0]:
        i = int(dup[0])
        a, b = (int(np.searchsorted(bases, order[j], side="right")) - 1 for j in (i, i + 1))
        where = tables[a].name if a == b else f"{tables[a].name} and {tables[b].name}"
        raise TableError(f"duplicate signature {int(keys[i])} (0x{int(keys[i]):016x}) in {where}; "
                         f"{dup.shape[0]} duplicate{'s' if dup.shape[0] > 1 else ''} in all")
    source = (np.searchsorted(bases, order, side="right") - 1).astype(np.int32)
    return CubePlan(out_dir, tables, keys, order, source, bases, dims[0])


def build_cube(out_dir, tables, dim=None, txn_entries=None, progress=None):
    """Write the entries of every table in ``tables`` into a new cube directory ``out_dir``.

    ``plan_cube`` checks everything it can before anything is written; then
    the entries go in LMDB key order, ``txn_entries`` per write transaction
    (None: one), into ``.<out_dir>.partial-<pid>`` beside it, a vector with a
    NaN or an infinity is refused, and the directory is renamed to
    ``out_dir`` when complete: a failed build leaves nothing behind.
    ``progress(n)`` is called after every n entries written. Vectors of
    memory-mapped inputs are read in the order written, one chunk at a time.
    Returns {"keys", "dim", "transactions", "bytes"}. Raises TableError.
    """
    return plan_cube(out_dir, tables, dim).write(txn_entries, progress)


def read_all(path):
    """The whole cube at ``path`` as ``(keys uint64 [K], vectors float32 [K, dim])``.

    Keys come back sorted ascending as integers (ready for ``searchsorted``).
    Opens the environment read-only without a lock file, so it works on a
    bundle that ships ``data.mdb`` alone; the caller must not be writing it.
    An empty cube returns float32 [0, 0] vectors.
    """
    path = os.fspath(path)
    # LMDB refuses a second environment on one file in a process: read through the one a stage opened.
    cube = opened_cube(path)
    env = cube.env if cube is not None else lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=True)
    try:
        with env.begin(buffers=False) as txn:
            entries = txn.stat()["entries"]
            key_parts = []
            value_parts = []
            for key, value in txn.cursor().iternext(keys=True, values=True):
                key_parts.append(key)
                value_parts.append(value)
    finally:
        if cube is None:
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


# --- inspection (jizhictl cube info|get) ------------------------------------------

def locate_cube(path):
    """``(cube_dir, manifest_dim or None, bundle_dir or None)`` for a cube directory or a bundle.

    ``path`` is a cube directory (holding ``data.mdb``), a bundle version
    directory (holding ``manifest.toml`` and ``cube/``), a model directory
    (``<models>/<name>``: its newest version) or a directory holding
    ``models/<name>/`` with one model (the demo layout). Raises TableError.
    """
    p = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(p, "data.mdb")):
        return p, None, None
    version = None
    if os.path.isfile(os.path.join(p, "manifest.toml")):
        version = p
    else:
        models = os.path.join(p, "models")
        if os.path.isdir(models):
            names = [n for n in os.listdir(models) if not n.startswith(".") and os.path.isdir(os.path.join(models, n))]
            if len(names) == 1:
                p = os.path.join(models, names[0])
        versions = [int(n) for n in os.listdir(p) if n.isdigit() and
                    os.path.isfile(os.path.join(p, n, "manifest.toml"))] if os.path.isdir(p) else []
        if versions:
            version = os.path.join(p, str(max(versions)))
    if version is None:
        raise TableError(f"{path}: neither a cube (no data.mdb) nor a bundle version (no manifest.toml)")
    with open(os.path.join(version, "manifest.toml"), "rb") as f:
        try:
            dim = int(tomllib.load(f).get("dim", 0)) or None
        except (tomllib.TOMLDecodeError, ValueError, TypeError) as e:
            raise TableError(f"{version}/manifest.toml: {e}")
    cube_dir = os.path.join(version, "cube")
    if not os.path.isfile(os.path.join(cube_dir, "data.mdb")):
        raise TableError(f"{version}: no cube/data.mdb")
    return cube_dir, dim, version


def open_readonly(cube_dir):
    """A read-only py-lmdb environment of ``cube_dir`` (no lock file: a bundle ships none)."""
    try:
        return lmdb.open(os.fspath(cube_dir), readonly=True, lock=False, subdir=True, readahead=False)
    except lmdb.Error as e:
        raise TableError(f"{cube_dir}: not an LMDB cube ({e})")


def describe(cube_dir):
    """Figures of the cube at ``cube_dir`` from LMDB's own bookkeeping (no scan): a dict.

    ``keys`` (entries), ``value_bytes`` of the first entry (dim = value_bytes
    / 4), ``file_bytes`` of data.mdb, and the main database's B+tree:
    ``depth``, ``page_bytes``, ``branch_pages``, ``leaf_pages``,
    ``overflow_pages``; ``last_page`` and ``last_txnid`` from the environment.
    """
    env = open_readonly(cube_dir)
    try:
        st = env.stat()
        info = env.info()
        with env.begin(buffers=False) as txn:
            cur = txn.cursor()
            value_bytes = len(cur.value()) if cur.first() else None
    finally:
        env.close()
    return {"keys": int(st["entries"]), "value_bytes": value_bytes,
            "file_bytes": os.path.getsize(os.path.join(os.fspath(cube_dir), "data.mdb")),
            "depth": int(st["depth"]), "page_bytes": int(st["psize"]), "branch_pages": int(st["branch_pages"]),
            "leaf_pages": int(st["leaf_pages"]), "overflow_pages": int(st["overflow_pages"]),
            "last_page": int(info["last_pgno"]), "last_txnid": int(info["last_txnid"])}


def get_vectors(cube_dir, signatures, dim):
    """``[(signature, float32[dim] or None)]`` of ``signatures`` (ints), through liblmdb: for a few keys."""
    env = open_readonly(cube_dir)
    out = []
    try:
        with env.begin(buffers=False) as txn:
            for s in signatures:
                v = txn.get(int(s).to_bytes(8, "little"))
                if v is not None and len(v) != dim * 4:
                    raise TableError(f"{cube_dir}: the value of signature {s} has {len(v)} bytes, not {dim * 4}")
                out.append((int(s), None if v is None else np.frombuffer(v, dtype="<f4").astype(np.float32)))
    finally:
        env.close()
    return out
