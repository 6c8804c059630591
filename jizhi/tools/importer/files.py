"""The files of an imported bundle version (docs/formats.md): the profiles
(generated, or copied after checking the model can read them), the items'
signatures, the cube (every row of every table) and ``manifest.toml``.

Runs in the importing process, writing into the hidden directory
``import_model`` renames into place once the check passes. ``raw_bags``
reads the profiles back as data_reader does, for the check.
"""
import os
import shutil

import numpy as np

from jizhi.bundle import FORMAT, save_array, save_field, toml_value
from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.cube.build import Table, TableError, build_cube
from jizhi.cube.signature import sign, sign_padded
from jizhi.tools.demo.sampling import _distinct_ids
from jizhi.tools.importer.fields import refuse
from jizhi.tools.importer.rewrite import SCORE

MISSING_ONEHOT = 0.05    # generated onehot values left missing, where the model can express it

# Random streams of the generated profiles and the check (second word of the rng seed).
S_USERS, S_ITEMS, S_FIELD, S_DENSE, S_CHECK = range(1, 6)


def manifest_order(lookups):
    """Lookups in manifest order: the user_emb columns, then the item_emb columns."""
    return [lk for lk in lookups if lk.field.side == "user"] + [lk for lk in lookups if lk.field.side == "item"]


def table_owners(lookups):
    """{table name: the first lookup (FIELDS.toml order) reading it}: its field's id signs the table."""
    owners = {}
    for lk in lookups:
        owners.setdefault(lk.table, lk)
    return owners


def _shortest_bag(lookup):
    """The shortest bag the original model can be given: padded ids without padding_idx are always full,
    and so are the bags of a stacked EmbeddingBag input (one length of flat ids for every slot)."""
    f = lookup.field
    if f.input is not None:
        return f.max_len if f.padding_idx is None else 0
    return f.max_len if f.stacked else 0


def _raw_values(rng, lookup, n):
    """``n`` random raw values of the lookup's field: a row of its table + 1, never the padding row."""
    rows_total = lookup.vectors.shape[0]
    p = lookup.field.padding_idx
    if p is None:
        rows = rng.integers(0, rows_total, size=n)
    else:
        rows = rng.integers(0, rows_total - 1, size=n)
        rows += rows >= p
    return rows.astype(np.int64) + 1


def generate_profiles(version_dir, analysis, users, items, seed):
    """Random valid profiles: ``users`` users and ``items`` items, deterministic in ``seed``."""
    for side, count, stream in (("user", users, S_USERS), ("item", items, S_ITEMS)):
        directory = os.path.join(version_dir, "profiles", side + "s")
        save_array(directory, "ids", _distinct_ids(np.random.default_rng([seed, stream]), count))
        if side == "user":
            dense = np.random.default_rng([seed, S_DENSE]).standard_normal((count, analysis.dense_features))
            save_array(directory, "dense", dense.astype(np.float32))
        for lk in analysis.lookups:
            if lk.field.side != side:
                continue
            f = lk.field
            rng = np.random.default_rng([seed, S_FIELD, f.id])
            shortest = _shortest_bag(lk)
            if f.kind == "onehot":
                values = _raw_values(rng, lk, count)
                if shortest == 0:
                    values[rng.random(count) < MISSING_ONEHOT] = 0
                save_field(directory, f, values)
            else:
                lens = rng.integers(shortest, f.max_len + 1, size=count)
                offsets = np.zeros(count + 1, dtype=np.int64)
                np.cumsum(lens, out=offsets[1:])
                save_field(directory, f, (_raw_values(rng, lk, int(offsets[-1])), offsets))


def _load_npy(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        refuse(f"{path}: no such file")
    except (ValueError, OSError) as e:
        refuse(f"{path}: not a numpy .npy array ({e})")


def copy_profiles(source, version_dir, analysis):
    """Copy the profiles under ``source`` (``users/`` and ``items/``) after checking the model can read them.

    Every raw value must be a row of the field's table + 1 (0: missing, only
    where the model can express an empty bag) and every bag at least as long
    as the model's ids input takes (padded ids without padding_idx: max_len).
    """
    for side in ("user", "item"):
        src = os.path.join(os.fspath(source), side + "s")
        dst = os.path.join(version_dir, "profiles", side + "s")
        os.makedirs(dst, exist_ok=True)
        ids = _load_npy(os.path.join(src, "ids.npy"))
        if ids.dtype != np.uint64 or ids.ndim != 1 or ids.shape[0] == 0 or np.any(ids[1:] <= ids[:-1]):
            refuse(f"{src}/ids.npy is {ids.dtype} {ids.shape}: expected non-empty uint64 ids, sorted ascending "
                   f"without duplicates")
        rows = ids.shape[0]
        names = ["ids"]
        if side == "user":
            dense = _load_npy(os.path.join(src, "dense.npy"))
            if dense.dtype != np.float32 or dense.shape != (rows, analysis.dense_features):
                refuse(f"{src}/dense.npy is {dense.dtype} {dense.shape}: expected float32 "
                       f"{(rows, analysis.dense_features)} (one row per user, the model's dense width)")
            names.append("dense")
        for lk in analysis.lookups:
            f = lk.field
            if f.side != side:
                continue
            vocab, shortest = lk.vectors.shape[0], _shortest_bag(lk)
            if f.kind == "onehot":
                values = _load_npy(os.path.join(src, f.name + ".npy"))
                where = f"{src}/{f.name}.npy"
                if values.dtype != np.int64 or values.shape != (rows,):
                    refuse(f"{where} is {values.dtype} {values.shape}: expected int64 ({rows},)")
                low = 1 if shortest else 0
                names.append(f.name)
            else:
                values = _load_npy(os.path.join(src, f.name + ".values.npy"))
                offsets = _load_npy(os.path.join(src, f.name + ".offsets.npy"))
                where = f"{src}/{f.name}.values.npy"
                if values.dtype != np.int64 or values.ndim != 1 or offsets.dtype != np.int64 \
                        or offsets.shape != (rows + 1,) or offsets[0] != 0 or offsets[-1] != values.shape[0] \
                        or np.any(np.diff(offsets) < 0):
                    refuse(f"{src}/{f.name}.values.npy and .offsets.npy are not int64 values with {rows + 1} "
                           f"non-decreasing int64 offsets from 0 to their length")
                lens = np.diff(offsets)
                if shortest and np.any(lens < shortest):
                    r = int(np.flatnonzero(lens < shortest)[0])
                    refuse(f"{where}: row {r} has {int(lens[r])} values, but field {f.name!r}'s input "
                           f"{f.inputs[0]!r} always takes {shortest} ids (no padding_idx, or a stacked EmbeddingBag input)")
                low = 1
                names += [f.name + ".values", f.name + ".offsets"]
            bad = (values < low) | (values > vocab)
            if np.any(bad):
                v = int(values[np.flatnonzero(bad)[0]])
                refuse(f"{where} holds raw value {v}: field {f.name!r} reads table {lk.table!r} of {vocab} rows, "
                       f"so its raw values are 1..{vocab} (row + 1)"
                        + ("" if low else ", or 0 for missing"))
        for name in names:
            shutil.copyfile(os.path.join(src, name + ".npy"), os.path.join(dst, name + ".npy"))


def raw_bags(profile_dir, field, rows):
    """Raw values of ``field`` for profile ``rows`` as data_reader reads them.

    Returns ``(values int64 [n, max_len], lens int64 [n])``: a onehot 0 is an
    empty bag; a longer bag keeps its newest (last) ``max_len`` values;
    entries past a row's length are 0. Reads the .npy files directly, not
    through jizhi.bundle, so the check does not reuse the reader it checks.
    """
    rows = np.asarray(rows, dtype=np.int64)
    values = np.zeros((rows.shape[0], field.max_len), dtype=np.int64)
    if field.kind == "onehot":
        values[:, 0] = np.load(os.path.join(profile_dir, field.name + ".npy"), mmap_mode="r")[rows]
        return values, (values[:, 0] != 0).astype(np.int64)
    flat = np.load(os.path.join(profile_dir, field.name + ".values.npy"), mmap_mode="r")
    offsets = np.load(os.path.join(profile_dir, field.name + ".offsets.npy"), mmap_mode="r")
    ends = offsets[rows + 1]
    starts = np.maximum(offsets[rows], ends - field.max_len)
    lens = ends - starts
    valid = np.arange(field.max_len) < lens[:, None]
    values[valid] = flat[(starts[:, None] + np.arange(field.max_len))[valid]]
    return values, lens


def write_item_signatures(version_dir, analysis, hash_ids, hash_seed):
    """profiles/items/sigs.npy and sig_lens.npy from the items' raw values (docs/formats.md)."""
    directory = os.path.join(version_dir, "profiles", "items")
    item = [lk for lk in analysis.lookups if lk.field.side == "item"]
    count = np.load(os.path.join(directory, "ids.npy"), mmap_mode="r").shape[0]
    width = max([lk.field.max_len for lk in item] or [1])
    values = np.zeros((count, len(item), width), dtype=np.int64)
    lens = np.zeros((count, len(item)), dtype=np.int32)
    for column, lk in enumerate(item):
        v, n = raw_bags(directory, lk.field, np.arange(count))
        values[:, column, :lk.field.max_len] = v
        lens[:, column] = n
    ids = np.array([hash_ids[lk.field.name] for lk in item], dtype=np.int64)
    save_array(directory, "sigs", sign_padded(ids, values, lens, hash_seed))
    save_array(directory, "sig_lens", lens)


def write_cube(version_dir, analysis, hash_seed, progress):
    """cube/: row v of every table under sign(owner field id, v + 1, hash_seed); the key count."""
    tables = []
    for name, owner in table_owners(analysis.lookups).items():
        vectors = owner.vectors
        keys = sign(owner.field.id, np.arange(1, vectors.shape[0] + 1, dtype=np.int64), hash_seed)
        tables.append(Table(f"table {name!r}", keys, vectors))
    total = sum(len(t) for t in tables)
    bar = _Progress("cube", total, progress)
    try:
        build_cube(os.path.join(version_dir, "cube"), tables, dim=analysis.dim,
                   txn_entries=max(1, (64 << 20) // (4 * analysis.dim)), progress=bar.advance)
    except TableError as e:
        refuse(f"writing the cube: {e}")
    finally:
        bar.close()
    return total


def manifest_text(name, version, analysis, hash_seed, source, files):
    """manifest.toml contents (docs/formats.md); ``files`` is a list of (path, size, sha256)."""
    lines = [
        f"# written by jizhictl import from {os.path.basename(source)}",
        f"format = {FORMAT}",
        f"name = {toml_value(name)}",
        f"version = {int(version)}",
        f"dim = {analysis.dim}",
        f"hash_seed = {int(hash_seed)}",
        'default_vector = "zeros"',
        "",
        "[dense]",
        f"user_features = {analysis.dense_features}",
        "",
        "[onnx]",
        'file = "dense.onnx"',
        f"output = {toml_value(SCORE)}",
    ]
    owners = table_owners(analysis.lookups)
    for lk in manifest_order(analysis.lookups):
        f = lk.field
        # A bag of at most one value pools the same by sum or mean: "mean" reads everywhere.
        pooling = "mean" if f.max_len == 1 else lk.pooling
        lines += ["", "[[fields]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in
                  (("name", f.name), ("id", f.id), ("side", f.side), ("kind", f.kind), ("max_len", f.max_len),
                   ("vocab", lk.vectors.shape[0]), ("pooling", pooling))]
        owner = owners[lk.table]
        if owner is not lk:
            lines.append(f"shares = {toml_value(owner.field.name)}")
        else:
            lines.append('raw = "rows"')     # raw value = table row + 1, 1..vocab
    for path, size, digest in files:
        lines += ["", "[[files]]", f"path = {toml_value(path)}", f"size = {size}", f"sha256 = {toml_value(digest)}"]
    return "\n".join(lines) + "\n"
