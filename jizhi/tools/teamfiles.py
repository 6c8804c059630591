"""Reading a team's profile files for ``jizhictl profiles build`` (jizhi/tools/profilebuild.py): chunks of columns.

Parquet (pyarrow, row groups in batches), CSV (pyarrow's streaming reader, every column read as text and
parsed here), JSON lines (the json module, a chunk of lines at a time) and numpy ``.npz`` become ``Chunk`` s of
columns; the converters turn a chunk's column into checked numpy arrays (ids, integers, bags, dense features,
raw values against a table), and every failure is a ``BuildError`` naming the file, the line (CSV, JSON lines)
or the row (Parquet, npz), the column and the reason.
"""
import json

import numpy as np

from jizhi.errors import BundleError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".npz": "npz"}


class BuildError(BundleError):
    """A bad input: one line, naming the file, the place and the reason."""


def file_format(path):
    for ext, fmt in FORMATS.items():
        if str(path).lower().endswith(ext):
            return fmt
    raise BuildError(f"{path}: unknown file type (expected one of {', '.join(sorted(FORMATS))})")


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


def integers(arr, chunk, name, unsigned=False):
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


def bag_column(arr, chunk, col):
    """(lens int64 [n], flat int64 [nnz], where_of_flat int64 [nnz]: the row of each value) of a bag column,
    missing values dropped."""
    name = col.column
    if isinstance(arr, tuple):            # npz ragged
        _, values, offsets = arr
        lens = np.diff(offsets).astype(np.int64)
        flat, miss = integers(np.asarray(values), chunk, name)
    elif isinstance(arr, np.ndarray):     # npz 2-D, padded with a missing value
        if arr.ndim != 2:
            raise BuildError(f"{chunk.path}: array {name!r} has shape {arr.shape}, expected [rows, values] "
                             f"(padded with a missing value) or {name}.values / {name}.offsets")
        lens = np.full(arr.shape[0], arr.shape[1], np.int64)
        flat, miss = integers(arr.reshape(-1), chunk, name)
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
            flat, miss = integers(values, _Flat(chunk, lens), name)
        else:
            flat, miss = integers(values, _Flat(chunk, lens), name)
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


def raw_values(values, rows, chunk, col):
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


def dense_features(chunk, side, width):
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
