"""``jizhictl profiles build``: a profile snapshot from the files a team has (Parquet, CSV, JSON lines, numpy .npz).

(Reading and checking the files, chunk by chunk, is jizhi/tools/teamfiles.py; this module maps the model's
fields to columns, writes the snapshot and publishes it.)

The output is the columnar snapshot of docs/formats.md ("Columnar profile
snapshots"): ``OUT/users/`` and ``OUT/items/`` (ids sorted, one ``.npy`` per
column, the items' signatures computed for the model), plus ``OUT/profiles.toml``,
written last: what was built from what, and the size and sha256 of every file.
It is what ``jizhictl import --profiles OUT`` copies, and what a version's
``profiles/`` directory holds.

Input: one file per side, one row per entity, columns named as the model's
fields (``--model``: a version directory, whose manifest says each field's
kind, ``max_len``, table size and hashing). How the team's values map to the
model's raw values is declared once, in an optional spec (``--spec``, TOML),
never applied by hand::

    [users]
    id = "user_id"               # the id column (default "id")
    dense = ["age", "ctr_7d"]    # the dense features: one column each, or one list column (default "dense")

    [users.fields.u_city]        # a field of the model (default: every field, read from the column of its name)
    column = "city"              # the column (default: the field's name)
    first_row = 0                # the team's value of the table's first row: raw value = value - first_row + 1
                                 # (default 1: the values are raw values already)
    missing = [-1]               # values that mean "missing" (default [0] when first_row = 1, else none);
                                 # a null, an empty cell, an absent key is missing too
    sep = "|"                    # CSV: the separator between a bag's values in one cell (default " ")

A bag (multihot, history) is a list column in Parquet and JSON lines, a cell
of values separated by ``sep`` in CSV, and in .npz either a 2-D array padded
with a ``missing`` value or the pair ``<column>.values`` / ``<column>.offsets``;
the dense features are a list column (CSV: one cell of space-separated
numbers) or one column each (.npz: a 2-D float array, or one 1-D array each).

The files are read in chunks of ``--chunk-rows`` rows (a progress bar per
side), every column checked as it comes; the chunks go to temporary files in
the output's ``.incoming`` directory, then are sorted by id through memory
maps, so a catalogue larger than memory builds in bounded memory (the ids and
a permutation of them: 16 bytes per entity). A bad row stops the build with
one line naming the file, the line (CSV, JSON lines: 1-based lines of the
file) or the row (Parquet, .npz: 0-based), the column and the reason: a value
outside the table's rows, a wrong type, a multihot bag longer than
``max_len``, a duplicate id (both places), a dense value that is not
finite. A history longer than ``max_len`` keeps its newest (last)
``max_len`` values, as the data reader would serve it. Nothing is
published unless everything is good: the snapshot is renamed into place
whole, after ``profiles.toml``.
"""
import os
import shutil
import time
import tomllib
from dataclasses import dataclass, field as dc_field

import numpy as np

from jizhi.tools.teamfiles import BuildError, bag_column, dense_features, file_format, integers, raw_values, read_chunks

__all__ = ["BuildError", "build_profiles", "load_spec"]

DEFAULT_CHUNK_ROWS = 100_000
SNAPSHOT_FORMAT = 1


@dataclass
class Column:
    """How one field is read: its column, the mapping of the team's values to raw values, the missing ones."""
    field: object
    column: str
    first_row: int = 1
    missing: tuple = (0,)
    sep: str = " "
    bounded: bool = False       # the table's rows bound the raw values: 1..field.vocab


@dataclass
class Side:
    side: str
    path: str
    fmt: str
    id: str = "id"
    dense: object = "dense"     # a list column's name, or a list of columns
    columns: list = dc_field(default_factory=list)


def load_spec(spec_path, bundle, sources, bounded_of):
    """``{side: Side}`` from the spec file (or the defaults) and ``sources`` ``{side: path}``."""
    spec = {}
    if spec_path:
        try:
            with open(spec_path, "rb") as f:
                spec = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise BuildError(f"{spec_path}: {e}")
        unknown = set(spec) - {"users", "items"}
        if unknown:
            raise BuildError(f"{spec_path}: unknown table(s) {', '.join(sorted(unknown))} (expected [users], [items])")
    sides = {}
    for side, path in sources.items():
        s = spec.get(side + "s", {})
        fields = bundle.user_fields if side == "user" else bundle.item_fields
        by_name = {f.name: f for f in fields}
        given = s.get("fields", {})
        extra = set(given) - set(by_name)
        if extra:
            raise BuildError(f"{spec_path}: [{side}s.fields] names {', '.join(sorted(extra))}, not {side} fields of "
                             f"model {bundle.name} ({', '.join(by_name) or 'none'})")
        unknown = set(s) - {"id", "dense", "fields"}
        if unknown:
            raise BuildError(f"{spec_path}: [{side}s] has unknown key(s) {', '.join(sorted(unknown))} "
                             "(expected id, dense, fields)")
        columns = []
        for f in fields:
            if f.context:
                continue        # a request-level value: no profile column
            c = given.get(f.name, {})
            bad = set(c) - {"column", "first_row", "missing", "sep"}
            if bad:
                raise BuildError(f"{spec_path}: [{side}s.fields.{f.name}] has unknown key(s) {', '.join(sorted(bad))} "
                                 "(expected column, first_row, missing, sep)")
            first = c.get("first_row", 1)
            missing = c.get("missing", [0] if first == 1 else [])
            if isinstance(first, bool) or not isinstance(first, int) or not isinstance(missing, list) \
                    or not all(isinstance(m, int) and not isinstance(m, bool) for m in missing):
                raise BuildError(f"{spec_path}: [{side}s.fields.{f.name}]: first_row must be an integer and missing "
                                 "a list of integers")
            columns.append(Column(f, c.get("column", f.name), first, tuple(missing), c.get("sep", " "),
                                  bounded_of(f)))
        dense = s.get("dense", "dense")
        sides[side] = Side(side, os.fspath(path), file_format(path), s.get("id", "id"), dense, columns)
    return sides


# --- one side: chunks to temporary files, then sorted by id into the snapshot ------------------------------

def _append(tmp, name, array):
    with open(os.path.join(tmp, name + ".bin"), "ab") as f:
        np.ascontiguousarray(array).tofile(f)


def _read(tmp, name, dtype, shape=None):
    p = os.path.join(tmp, name + ".bin")
    if not os.path.exists(p) or os.path.getsize(p) == 0:
        return np.zeros((0,) + tuple(shape or ()), dtype)
    a = np.memmap(p, dtype=dtype, mode="r")
    return a.reshape((-1,) + tuple(shape)) if shape else a


def build_side(side, bundle, out, chunk_rows, progress):
    """Read, check and write one side; returns its row count."""
    from jizhi.bundle import save_array
    tmp = os.path.join(out, side.side + "s.tmp")
    os.makedirs(tmp)
    names = [side.id] + (side.dense if isinstance(side.dense, list) else [side.dense]) + [c.column for c in side.columns]
    width = bundle.dense_features if side.side == "user" else 0
    total = _rows_hint(side)
    bar = progress(f"{side.side}s ({os.path.basename(side.path)})", total) if progress else None
    seen = False
    for chunk in read_chunks(side, names, chunk_rows):
        seen = True
        ids_arr = chunk.column(side.id)
        if ids_arr is None:
            raise BuildError(f"{side.path}: no id column {side.id!r} (name it with [{side.side}s] id = \"...\")")
        ids, missing = integers(ids_arr, chunk, side.id, unsigned=True)
        if missing.any():
            raise BuildError(f"{chunk.where(int(np.argmax(missing)))}, column {side.id!r}: the id is missing")
        _append(tmp, "ids", ids)
        _append(tmp, "where", chunk.lines if chunk.lines is not None
                else np.arange(chunk.start, chunk.start + chunk.n, dtype=np.int64))
        if side.side == "user":
            _append(tmp, "dense", dense_features(chunk, side, width))
        for col in side.columns:
            f = col.field
            a = chunk.column(col.column)
            if a is None:
                raise BuildError(f"{side.path}: no column {col.column!r} for {side.side} field {f.name!r} (name its "
                                 f"column with [{side.side}s.fields.{f.name}] column = \"...\")")
            if f.kind == "onehot":
                values, miss = integers(a, chunk, col.column)
                miss = miss | np.isin(values, np.asarray(col.missing, dtype=np.int64))
                raw = np.zeros(values.shape[0], np.int64)
                keep = np.flatnonzero(~miss)
                raw[keep] = raw_values(values[keep], keep, chunk, col)
                _append(tmp, f.name, raw)
            else:
                lens, flat, rows = bag_column(a, chunk, col)
                if f.kind == "history" and (lens > f.max_len).any():
                    # A history serves its newest max_len values (the last ones): the rest are cut here.
                    keep = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lens) - lens, lens) >= \
                        np.repeat(np.maximum(lens - f.max_len, 0), lens)
                    flat, rows = flat[keep], rows[keep]
                    lens = np.minimum(lens, f.max_len)
                if (lens > f.max_len).any():
                    i = int(np.argmax(lens > f.max_len))
                    raise BuildError(f"{chunk.where(i)}, column {col.column!r} (field {f.name!r}): a bag of "
                                     f"{int(lens[i])} values, longer than the field's max_len {f.max_len}")
                _append(tmp, f.name + ".lens", lens)
                _append(tmp, f.name + ".values", raw_values(flat, rows, chunk, col))
        if bar:
            bar.advance(chunk.n)
    if bar:
        bar.close()
    if not seen or not os.path.getsize(os.path.join(tmp, "ids.bin")):
        raise BuildError(f"{side.path}: no rows")
    return _finish(side, bundle, out, tmp, width, save_array)


def _rows_hint(side):
    """The row count for the progress bar, where the file says it cheaply (else the file's size in lines)."""
    try:
        if side.fmt == "parquet":
            import pyarrow.parquet as pq
            return pq.ParquetFile(side.path).metadata.num_rows
        if side.fmt == "npz":
            with np.load(side.path, allow_pickle=False) as z:
                a = z[z.files[0]]
                return a.shape[0] - (1 if z.files[0].endswith(".offsets") else 0)
    except Exception:       # the read itself reports a bad file, with its own message
        return 0
    with open(side.path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) - (side.fmt == "csv")


def _finish(side, bundle, out, tmp, width, save_array):
    ids = np.array(_read(tmp, "ids", np.uint64))
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if dup.shape[0]:
        where = _read(tmp, "where", np.int64)
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        unit = "line" if side.fmt in ("csv", "jsonl") else "row"
        raise BuildError(f"{side.path}, {unit} {int(where[b])}, column {side.id!r}: duplicate id {int(ids[dup[0]])} "
                         f"(first at {unit} {int(where[a])})")
    directory = os.path.join(out, side.side + "s")
    os.makedirs(directory)
    save_array(directory, "ids", ids)
    n = ids.shape[0]
    step = 1 << 18
    if side.side == "user":
        _gather_rows(_read(tmp, "dense", np.float32, (width,)), order, os.path.join(directory, "dense.npy"),
                     np.float32, (width,), step)
    for col in side.columns:
        f = col.field
        if f.kind == "onehot":
            _gather_rows(_read(tmp, f.name, np.int64), order, os.path.join(directory, f.name + ".npy"),
                         np.int64, (), step)
        else:
            lens = np.array(_read(tmp, f.name + ".lens", np.int64))
            starts = np.zeros(n, np.int64)
            np.cumsum(lens[:-1], out=starts[1:])
            sorted_lens = lens[order]
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(sorted_lens, out=offsets[1:])
            save_array(directory, f.name + ".offsets", offsets)
            src = _read(tmp, f.name + ".values", np.int64)
            dst = np.lib.format.open_memmap(os.path.join(directory, f.name + ".values.npy"), mode="w+",
                                            dtype=np.int64, shape=(int(offsets[-1]),))
            for a in range(0, n, step):
                b = min(n, a + step)
                lo, hi = int(offsets[a]), int(offsets[b])
                if hi > lo:
                    shift = np.repeat(starts[order[a:b]] - offsets[a:b], sorted_lens[a:b])
                    dst[lo:hi] = src[np.arange(lo, hi) + shift]
            dst.flush()
            del dst
    if side.side == "item":
        _item_signatures(directory, bundle, n, step, save_array)
    shutil.rmtree(tmp)
    return n


def _gather_rows(src, order, path, dtype, shape, step):
    dst = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(order.shape[0],) + shape)
    for a in range(0, order.shape[0], step):
        b = min(order.shape[0], a + step)
        dst[a:b] = src[order[a:b]]
    dst.flush()


def _item_signatures(directory, bundle, n, step, save_array):
    """sigs.npy, sig_lens.npy of the sorted item columns (docs/formats.md), chunk by chunk."""
    from jizhi.cube.signature import sign_padded
    fields, width = bundle.item_fields, bundle.item_len
    hash_ids = np.array([f.hash_id for f in fields], dtype=np.int64)
    sigs = np.lib.format.open_memmap(os.path.join(directory, "sigs.npy"), mode="w+", dtype=np.uint64,
                                     shape=(n, len(fields), width))
    sig_lens = np.zeros((n, len(fields)), np.int32)
    cols = {}
    for f in fields:
        if f.kind == "onehot":
            cols[f.name] = np.load(os.path.join(directory, f.name + ".npy"), mmap_mode="r")
        else:
            cols[f.name] = (np.load(os.path.join(directory, f.name + ".values.npy"), mmap_mode="r"),
                            np.load(os.path.join(directory, f.name + ".offsets.npy"), mmap_mode="r"))
    for a in range(0, n, step):
        b = min(n, a + step)
        values = np.zeros((b - a, len(fields), width), np.int64)
        for c, f in enumerate(fields):
            if f.kind == "onehot":
                v = np.asarray(cols[f.name][a:b])
                values[:, c, 0] = v
                sig_lens[a:b, c] = v != 0
            else:
                flat, offsets = cols[f.name]
                o = np.asarray(offsets[a:b + 1])
                lens = np.diff(o)
                rows = np.repeat(np.arange(b - a), lens)
                within = np.arange(int(o[-1] - o[0])) - np.repeat(o[:-1] - o[0], lens)
                values[rows, c, within] = np.asarray(flat[o[0]:o[-1]])
                sig_lens[a:b, c] = lens
        sigs[a:b] = sign_padded(hash_ids, values, sig_lens[a:b], bundle.hash_seed)
    sigs.flush()
    save_array(directory, "sig_lens", sig_lens)


# --- the whole build ---------------------------------------------------------------------------------------

def build_profiles(model_dir, out=None, users=None, items=None, spec=None, chunk_rows=DEFAULT_CHUNK_ROWS,
                   progress=None, force=False, store=None):
    """Build the snapshot at ``out`` from ``users`` and ``items`` (paths; at least one) for the model version at
    ``model_dir``; returns ``{"users": rows, "items": rows, "path": out, "snapshot": N or None}``.

    ``store``: publish into a profile store instead (jizhi/profilestore.py): the snapshot becomes
    ``<store>/<N>``, N one past the highest ever published; a side not given is carried over from the newest
    snapshot that fits the model (its files hard-linked, or copied across file systems).
    ``progress(label, total)``: a progress bar (``jizhi.ctl.progress.ProgressBar``-like) or None. Raises
    ``BuildError`` (one line) for bad input; nothing is left at ``out`` (or in the store) then."""
    from jizhi.bundle import Bundle
    bundle = Bundle(model_dir)
    sources = {s: p for s, p in (("user", users), ("item", items)) if p}
    if not sources:
        raise BuildError("nothing to build: give --users FILE, --items FILE or both")
    if (out is None) == (store is None):
        raise BuildError("give one of --out DIR (a snapshot directory) and --store DIR (a profile store)")
    for p in sources.values():
        if not os.path.isfile(p):
            raise BuildError(f"{p}: no such file")
    if store is None:
        return _build(bundle, sources, out, spec, chunk_rows, progress, force, None)
    os.makedirs(store, exist_ok=True)
    # One build at a time per store: a build carries a side over from the newest snapshot, which a
    # concurrent build must not replace meanwhile (it would be published reverted).
    import fcntl
    with open(os.path.join(store, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BuildError(f"{store}: another jizhictl profiles build is publishing into this store; run this "
                             "one after it")
        return _build(bundle, sources, out, spec, chunk_rows, progress, force, store)


def _build(bundle, sources, out, spec, chunk_rows, progress, force, store):
    from jizhi.cube.pooling import table_is_bounded
    from jizhi.cube.store import open_cube
    from jizhi.bundle import file_entries
    from jizhi.profilestore import field_schema, newest_fitting, snapshots
    from jizhi.tomlw import toml_text
    previous = None
    if store is not None:
        have = snapshots(store)
        if len(sources) < 2:
            # The side not given comes from the newest snapshot that fits this model.
            found, refused = newest_fitting(store, bundle)
            if found is None:
                why = "; ".join(f"snapshot {n}: {w}" for n, w in refused[:2])
                raise BuildError(f"{store} has no snapshot of model {bundle.name} version {bundle.version} to carry "
                                 f"the other side over from (the first one needs --users and --items)"
                                 + (f": {why}" if why else ""))
            previous = found[1]
        # Never a number used before, even one deleted since (a worker that refused N never tries N again).
        out = os.path.join(store, str(max(have[-1] if have else 0, _last_number(store)) + 1))
    elif os.path.exists(out) and not force:
        raise BuildError(f"{out} exists (a snapshot is never changed in place: build a new one, or --force)")
    if int(chunk_rows) < 1:
        raise BuildError("--chunk-rows must be >= 1")
    cube = None
    bounded = {}

    def bounded_of(f):
        nonlocal cube
        if f.vocab <= 0 or f.raw == "ids":
            return False
        if f.raw == "rows":
            return True
        key = (f.hash_id, f.vocab)
        if key not in bounded:
            if cube is None:
                cube = open_cube(bundle.cube_path, bundle.dim)
            bounded[key] = table_is_bounded(cube, f.hash_id, f.vocab, bundle.hash_seed, f.raw)
        return bounded[key]

    sides = load_spec(spec, bundle, sources, bounded_of)
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    incoming = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.incoming-{os.getpid()}")
    shutil.rmtree(incoming, ignore_errors=True)
    os.makedirs(incoming)
    try:
        rows = {}
        for s in sides.values():
            rows[s.side + "s"] = build_side(s, bundle, incoming, int(chunk_rows), progress)
        carried = {}
        for side in ("users", "items"):
            if side not in rows and previous is not None:
                _carry(os.path.join(previous, side), os.path.join(incoming, side))
                rows[side] = int(np.load(os.path.join(incoming, side, "ids.npy"), mmap_mode="r").shape[0])
                carried[side] = previous
        files = [{"path": rel, "size": size, "sha256": digest} for rel, size, digest in file_entries(incoming)]
        doc = {"format": SNAPSHOT_FORMAT, "model": bundle.name, "model_version": bundle.version,
               "hash_seed": bundle.hash_seed, "dense_features": bundle.dense_features,
               "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
               "sources": {k + "s": os.path.abspath(v) for k, v in sources.items()},
               "fields": field_schema(bundle), "item_order": [f.name for f in bundle.item_fields],
               "item_len": bundle.item_len, "files": sorted(files, key=lambda e: e["path"])}
        if carried:
            doc["carried"] = carried
        with open(os.path.join(incoming, "profiles.toml"), "w") as f:
            f.write("# Written by jizhictl profiles build, last: the files below are complete.\n" + toml_text(doc))
        if store is None:
            if os.path.exists(out):
                shutil.rmtree(out)
            os.rename(incoming, out)
        else:
            while True:         # another build published N meanwhile: take the next number
                try:
                    os.rename(incoming, out)
                    break
                except OSError:
                    if not os.path.exists(out):
                        raise
                    out = os.path.join(store, str(int(os.path.basename(out)) + 1))
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    rows["path"] = out
    rows["snapshot"] = int(os.path.basename(out)) if store is not None else None
    if store is not None:
        with open(os.path.join(store, ".last"), "w") as f:
            f.write(f"{rows['snapshot']}\n")
    return rows


def _last_number(store):
    """The highest snapshot number ever published into ``store`` (``<store>/.last``), 0 if none."""
    try:
        with open(os.path.join(store, ".last")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _carry(src, dst):
    """A side's files from the previous snapshot: hard links (nothing copied), or copies across devices."""
    os.makedirs(dst)
    for name in os.listdir(src):
        try:
            os.link(os.path.join(src, name), os.path.join(dst, name))
        except OSError:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
