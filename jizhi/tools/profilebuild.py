"""``jizhictl profiles build``: a profile snapshot from the files a team has (Parquet, CSV, JSON lines, numpy .npz).

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
import hashlib
import json
import os
import shutil
import time
import tomllib
from dataclasses import dataclass, field as dc_field

import numpy as np

from jizhi.errors import BundleError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".npz": "npz"}
DEFAULT_CHUNK_ROWS = 100_000
SNAPSHOT_FORMAT = 1


class BuildError(BundleError):
    """A bad input: one line, naming the file, the place and the reason."""


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


def file_format(path):
    for ext, fmt in FORMATS.items():
        if str(path).lower().endswith(ext):
            return fmt
    raise BuildError(f"{path}: unknown file type (expected one of {', '.join(sorted(FORMATS))})")


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


# --- reading: chunks of columns, as pyarrow arrays, with where each row came from -------------------------

class Chunk:
    """``n`` rows of a file from row ``start``; ``column(name)`` a pyarrow array (None: absent);
    ``where(i)`` row i's place in the file."""

    def __init__(self, path, fmt, start, arrays, lines=None):
        self.path, self.fmt, self.start, self.arrays, self.lines = path, fmt, start, arrays, lines
        self.n = len(next(iter(arrays.values()))) if arrays else 0

    def column(self, name):
        return self.arrays.get(name)

    def where(self, i):
        if self.lines is not None:
            return f"{self.path}, line {int(self.lines[i])}"
        return f"{self.path}, row {self.start + int(i)}"

    def line_of(self, i):
        """An int64 position (line or row) for the duplicate check."""
        return int(self.lines[i]) if self.lines is not None else self.start + int(i)


def _pa():
    try:
        import pyarrow
        return pyarrow
    except ImportError:
        raise BuildError("reading Parquet, CSV and JSON lines needs pyarrow: pip install 'jizhi[profiles]' (numpy .npz needs nothing more)")


def read_chunks(side, names, chunk_rows):
    """Yield ``Chunk`` s of the columns ``names`` (the ones the side reads) of ``side.path``."""
    path, fmt = side.path, side.fmt
    if fmt == "npz":
        yield from _npz_chunks(path, names, chunk_rows)
        return
    pa = _pa()
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            f = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise BuildError(f"{path}: not a Parquet file ({e})")
        have = set(f.schema_arrow.names)
        start = 0
        for batch in f.iter_batches(batch_size=chunk_rows, columns=[c for c in names if c in have]):
            yield Chunk(path, fmt, start, {c: batch.column(c) for c in batch.schema.names})
            start += batch.num_rows
    elif fmt == "csv":
        import pyarrow.csv as pcsv
        import csv as pycsv
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                have = [c.strip() for c in next(pycsv.reader(fh), [])]
        except (OSError, UnicodeDecodeError, pycsv.Error) as e:
            raise BuildError(f"{path}: {e}")
        wanted = [c for c in names if c in have]
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in wanted}, include_columns=wanted,
                                      strings_can_be_null=True)
        try:
            # Empty lines are rows too (of nulls: refused, with their line), so a row's line is its index + 2.
            reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 22),
                                   parse_options=pcsv.ParseOptions(ignore_empty_lines=False),
                                   convert_options=convert)
            start = 0
            for batch in reader:
                # Lines: the header is line 1, row r is line r + 2 (cells with line breaks are not supported).
                yield Chunk(path, fmt, start, {c: batch.column(c) for c in batch.schema.names},
                            np.arange(start + 2, start + 2 + batch.num_rows, dtype=np.int64))
                start += batch.num_rows
        except pa.ArrowInvalid as e:
            raise BuildError(f"{path}: not a CSV file jizhi can read ({e})")
    else:
        yield from _jsonl_chunks(path, names, chunk_rows, pa)


def _jsonl_chunks(path, names, chunk_rows, pa):
    objs, lines, start = [], [], 0

    def chunk():
        arrays = {}
        for c in names:
            values = [o.get(c) for o in objs]
            try:
                arrays[c] = pa.array(values)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                kinds = [_json_kind(v) for v in values]
                first = next((k for k in kinds if k != "null"), "null")
                i = next((j for j, k in enumerate(kinds) if k not in ("null", first)), None)
                if i is None:       # one kind, but mixed inside (a list of numbers and strings, ...)
                    raise BuildError(f"{path}, lines {lines[0]}-{lines[-1]}, column {c!r}: values pyarrow cannot "
                                     f"read as one type (a list mixing numbers and strings?)")
                raise BuildError(f"{path}, line {lines[i]}, column {c!r}: a {kinds[i]} ({values[i]!r:.60}) where "
                                 f"earlier lines have a {first}")
        return Chunk(path, "jsonl", start, arrays, np.array(lines, dtype=np.int64))

    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    o = json.loads(raw)
                except ValueError as e:
                    raise BuildError(f"{path}, line {number}: not valid JSON ({e})")
                if not isinstance(o, dict):
                    raise BuildError(f"{path}, line {number}: a JSON {type(o).__name__}, not an object")
                objs.append(o)
                lines.append(number)
                if len(objs) >= chunk_rows:
                    yield chunk()
                    start += len(objs)
                    objs, lines = [], []
    except OSError as e:
        raise BuildError(f"{path}: {e}")
    if objs:
        yield chunk()


def _json_kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    return "object"


def _npz_chunks(path, names, chunk_rows):
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: not a numpy .npz file ({e})")
    with z:
        keys = set(z.files)
        arrays = {}
        for c in names:
            if c in keys:
                arrays[c] = z[c]
            elif f"{c}.values" in keys and f"{c}.offsets" in keys:
                arrays[c] = (z[f"{c}.values"], z[f"{c}.offsets"])
        rows = {len(a[1]) - 1 if isinstance(a, tuple) else len(a) for a in arrays.values()}
        if len(rows) > 1:
            raise BuildError(f"{path}: its arrays have different row counts ({sorted(rows)})")
        n = rows.pop() if rows else 0
        for start in range(0, n, chunk_rows):
            end = min(n, start + chunk_rows)
            part = {}
            for c, a in arrays.items():
                if isinstance(a, tuple):
                    values, offsets = a
                    o = np.asarray(offsets[start:end + 1], dtype=np.int64)
                    part[c] = ("ragged", np.asarray(values[o[0]:o[-1]]), o - o[0])
                else:
                    part[c] = a[start:end]
            yield Chunk(path, "npz", start, part)


# --- converting and checking a chunk's columns -------------------------------------------------------------

def _int_strings(arr, chunk, name, pa, pc):
    """A pyarrow string array of integers -> int64 (or uint64 for ids) numpy; nulls and '' -> None mask."""
    trimmed = pc.utf8_trim_whitespace(arr)
    ok = pc.match_substring_regex(trimmed, r"^[-+]?[0-9]+$")
    bad = np.asarray(pc.and_(pc.invert(ok.fill_null(True)), pc.not_equal(trimmed, "").fill_null(False)))
    if bad.any():
        i = int(np.argmax(bad))
        raise BuildError(f"{chunk.where(i)}, column {name!r}: {arr[i].as_py()!r} is not an integer")
    return trimmed


def _integers(arr, chunk, name, unsigned=False):
    """(values int64 or uint64 [n], missing bool [n]) of a scalar column of integers."""
    if isinstance(arr, np.ndarray):
        if arr.ndim != 1:
            raise BuildError(f"{chunk.path}: array {name!r} has shape {arr.shape}, expected one value per row")
        return _numeric(arr, np.zeros(arr.shape[0], bool), chunk, name, unsigned)
    pa = _pa()
    import pyarrow.compute as pc
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = _int_strings(arr, chunk, name, pa, pc)
        missing = np.asarray(pc.or_(arr.is_null(), pc.equal(arr, "").fill_null(True)))
        arr = pc.if_else(pc.equal(arr, "").fill_null(True), "0", arr)
        try:
            values = np.asarray(pc.cast(arr, pa.uint64() if unsigned else pa.int64()))
        except pa.ArrowInvalid:
            values = None
        if values is None:      # out of range for the type: name the first such row
            for i in range(len(arr)):
                try:
                    int(arr[i].as_py())
                    (np.uint64 if unsigned else np.int64)(int(arr[i].as_py()))
                except (OverflowError, ValueError):
                    raise BuildError(f"{chunk.where(i)}, column {name!r}: {arr[i].as_py()} is out of range for "
                                     f"{'uint64' if unsigned else 'int64'}")
        return values, missing
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise BuildError(f"{chunk.where(0)}, column {name!r}: a column of {t}, expected integers")
    missing = np.asarray(arr.is_null())
    filled = np.asarray(arr.fill_null(0))
    return _numeric(filled, missing, chunk, name, unsigned)


def _numeric(a, missing, chunk, name, unsigned):
    if a.dtype.kind == "f":
        nan = np.isnan(a)
        bad = ~nan & ~missing & (a != np.floor(a))
        if bad.any():
            i = int(np.argmax(bad))
            raise BuildError(f"{chunk.where(i)}, column {name!r}: {a[i]!r} is not an integer")
        missing = missing | nan
        a = np.where(nan, 0, a)
    elif a.dtype.kind not in "iu":
        raise BuildError(f"{chunk.path}: column {name!r} is {a.dtype}, expected integers")
    if unsigned:
        if a.dtype.kind in "if" and (a < 0).any():
            i = int(np.argmax(a < 0))
            raise BuildError(f"{chunk.where(i)}, column {name!r}: id {a[i]} is negative")
        return a.astype(np.uint64), missing
    if a.dtype == np.uint64 and (a > np.iinfo(np.int64).max).any():
        i = int(np.argmax(a > np.iinfo(np.int64).max))
        raise BuildError(f"{chunk.where(i)}, column {name!r}: {a[i]} is out of range for int64")
    return a.astype(np.int64), missing


def _bag(arr, chunk, col):
    """(lens int64 [n], flat int64 [nnz], where_of_flat int64 [nnz]: the row of each value) of a bag column,
    missing values dropped."""
    name = col.column
    if isinstance(arr, tuple):            # npz ragged
        _, values, offsets = arr
        lens = np.diff(offsets).astype(np.int64)
        flat, miss = _integers(np.asarray(values), chunk, name)
    elif isinstance(arr, np.ndarray):     # npz 2-D, padded with a missing value
        if arr.ndim != 2:
            raise BuildError(f"{chunk.path}: array {name!r} has shape {arr.shape}, expected [rows, values] "
                             f"(padded with a missing value) or {name}.values / {name}.offsets")
        lens = np.full(arr.shape[0], arr.shape[1], np.int64)
        flat, miss = _integers(arr.reshape(-1), chunk, name)
    else:
        pa = _pa()
        import pyarrow.compute as pc
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            arr = pc.split_pattern(pc.utf8_trim_whitespace(arr.fill_null("")), col.sep)
            t = arr.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            raise BuildError(f"{chunk.where(0)}, column {name!r}: a column of {t}, expected a bag (a list of "
                             f"integers; CSV: values separated by {col.sep!r})")
        if pa.types.is_fixed_size_list(t):
            arr = arr.cast(pa.list_(t.value_type))
        lens = np.asarray(pc.list_value_length(arr).fill_null(0)).astype(np.int64)
        values = pc.list_flatten(arr)
        if pa.types.is_string(values.type):
            # (each value checked and parsed; an empty string, from "1||2" or an empty cell, is missing)
            flat, miss = _integers(values, _Flat(chunk, lens), name)
        else:
            flat, miss = _integers(values, _Flat(chunk, lens), name)
    rows = np.repeat(np.arange(lens.shape[0], dtype=np.int64), lens)
    drop = miss | np.isin(flat, np.asarray(col.missing, dtype=np.int64))
    if drop.any():
        keep = ~drop
        flat, rows = flat[keep], rows[keep]
        lens = np.bincount(rows, minlength=lens.shape[0]).astype(np.int64)
    return lens, flat, rows


class _Flat:
    """A chunk's ``where`` for the flattened values of a bag column (value j -> its row)."""

    def __init__(self, chunk, lens):
        self.chunk, self.path = chunk, chunk.path
        self.ends = np.cumsum(lens)

    def where(self, j):
        return self.chunk.where(int(np.searchsorted(self.ends, j, side="right")))


def _raw(values, rows, chunk, col):
    """The team's values -> raw values, checked against the table (``rows``: each value's row in the chunk)."""
    f = col.field
    raw = values - np.int64(col.first_row - 1)
    low = raw < 1
    if col.bounded:
        bad = low | (raw > f.vocab)
        why = (f"outside the table's {f.vocab} rows (values {col.first_row}..{col.first_row + f.vocab - 1}; "
               f"missing: {', '.join(map(str, col.missing)) or 'null only'})")
    else:
        bad = low
        why = (f"below {col.first_row} (first_row), so not a raw value (missing: "
               f"{', '.join(map(str, col.missing)) or 'null only'})")
    if bad.any():
        j = int(np.argmax(bad))
        raise BuildError(f"{chunk.where(int(rows[j]))}, column {col.column!r} (field {f.name!r}): value "
                         f"{int(values[j])} is {why}")
    return raw


def _dense(chunk, side, width):
    """float32 [n, width] of the dense features."""
    if width == 0:
        return np.zeros((chunk.n, 0), np.float32)
    spec = side.dense
    if isinstance(spec, list):
        if len(spec) != width:
            raise BuildError(f"[{side.side}s] dense names {len(spec)} columns, the model has {width} dense features")
        cols = []
        for c in spec:
            a = chunk.column(c)
            if a is None:
                raise BuildError(f"{chunk.path}: no column {c!r} (a dense feature, [{side.side}s] dense)")
            cols.append(_floats(a, chunk, c))
        out = np.stack(cols, axis=1) if cols else np.zeros((chunk.n, 0))
    else:
        a = chunk.column(spec)
        if a is None:
            raise BuildError(f"{chunk.path}: no column {spec!r} (the {width} dense features: a list column, or "
                             f"name one column each with [{side.side}s] dense = [...])")
        if isinstance(a, np.ndarray):
            if a.ndim != 2 or a.shape[1] != width:
                raise BuildError(f"{chunk.path}: array {spec!r} has shape {a.shape}, expected [rows, {width}]")
            out = a.astype(np.float64)
        else:
            pa = _pa()
            import pyarrow.compute as pc
            if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
                a = pc.split_pattern(pc.utf8_trim_whitespace(a.fill_null("")), " ")
            if not (pa.types.is_list(a.type) or pa.types.is_large_list(a.type)
                    or pa.types.is_fixed_size_list(a.type)):
                raise BuildError(f"{chunk.where(0)}, column {spec!r}: a column of {a.type}, expected a list of "
                                 f"{width} numbers")
            lens = np.asarray(pc.list_value_length(a).fill_null(0))
            if (lens != width).any():
                i = int(np.argmax(lens != width))
                raise BuildError(f"{chunk.where(i)}, column {spec!r}: {int(lens[i])} dense values, the model takes "
                                 f"{width}")
            out = _floats(pc.list_flatten(a), _Flat(chunk, lens), spec).reshape(-1, width)
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad.any(axis=1)))
        raise BuildError(f"{chunk.where(i)}, dense features: {out[i][bad[i]][0]!r} is not a finite number")
    return out.astype(np.float32)


def _floats(a, chunk, name):
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "iuf":
            raise BuildError(f"{chunk.path}: array {name!r} is {a.dtype}, expected numbers")
        return a.astype(np.float64)
    pa = _pa()
    import pyarrow.compute as pc
    if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
        t = pc.utf8_trim_whitespace(a)
        try:
            return np.asarray(pc.cast(t, pa.float64()).fill_null(np.nan))
        except pa.ArrowInvalid:
            for j in range(len(t)):
                try:
                    float(t[j].as_py())
                except (TypeError, ValueError):
                    raise BuildError(f"{chunk.where(j)}, column {name!r}: {t[j].as_py()!r} is not a number")
            raise
    if not (pa.types.is_integer(a.type) or pa.types.is_floating(a.type)):
        raise BuildError(f"{chunk.where(0)}, column {name!r}: a column of {a.type}, expected numbers")
    return np.asarray(a.cast(pa.float64()).fill_null(np.nan))


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
        ids, missing = _integers(ids_arr, chunk, side.id, unsigned=True)
        if missing.any():
            raise BuildError(f"{chunk.where(int(np.argmax(missing)))}, column {side.id!r}: the id is missing")
        _append(tmp, "ids", ids)
        _append(tmp, "where", chunk.lines if chunk.lines is not None
                else np.arange(chunk.start, chunk.start + chunk.n, dtype=np.int64))
        if side.side == "user":
            _append(tmp, "dense", _dense(chunk, side, width))
        for col in side.columns:
            f = col.field
            a = chunk.column(col.column)
            if a is None:
                raise BuildError(f"{side.path}: no column {col.column!r} for {side.side} field {f.name!r} (name its "
                                 f"column with [{side.side}s.fields.{f.name}] column = \"...\")")
            if f.kind == "onehot":
                values, miss = _integers(a, chunk, col.column)
                miss = miss | np.isin(values, np.asarray(col.missing, dtype=np.int64))
                raw = np.zeros(values.shape[0], np.int64)
                keep = np.flatnonzero(~miss)
                raw[keep] = _raw(values[keep], keep, chunk, col)
                _append(tmp, f.name, raw)
            else:
                lens, flat, rows = _bag(a, chunk, col)
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
                _append(tmp, f.name + ".values", _raw(flat, rows, chunk, col))
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

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        files = []
        for top, _, names in os.walk(incoming):
            for name in sorted(names):
                full = os.path.join(top, name)
                files.append({"path": os.path.relpath(full, incoming).replace(os.sep, "/"),
                              "size": os.path.getsize(full), "sha256": _sha256(full)})
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
