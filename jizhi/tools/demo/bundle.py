"""The demo bundle: ``init_demo`` writes ``<out_dir>/models/demo/1/``, synthetic, deterministic from a seed.

Runs offline, in the process that calls it (``jizhictl demo init``,
``jizhid --demo``, tests, benchmarks). The version is in the bundle format
of docs/formats.md: profiles, cube, ``dense.onnx`` (``dense``) and
``manifest.toml``.

The demo model is a small DLRM: 13 dense user features; user fields
``u_cat0..5`` (onehot), ``u_multi0..1`` (multihot, up to 5 values) and
``u_hist`` (history of up to 50 item ids, hashed into the ``i_id`` table);
item fields ``i_id`` (the item's own id), ``i_cat1..5`` (onehot) and
``i_multi0..1`` (multihot). Entity ids are distinct random uint64 below
2**63, sorted, so an id is never its row. Categorical values follow a
Zipf-like law over the vocabulary (value 1 the most frequent); about 1% of
onehot category values are missing (0), and about 0.5% of category and
multihot vocabulary signatures are left out of the cube so that a missing
signature happens in normal traffic. Histories favour popular items
(``sampling``). The same arguments give byte-identical bundle files.
"""
import contextlib
import dataclasses
import os
import shutil

import numpy as np

from jizhi.bundle import file_entries, save_array, save_field, toml_value, write_text
from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.cube.build import write_cube
from jizhi.cube.signature import sign, sign_padded
from jizhi.tools.demo.dense import DENSE_FEATURES, DIM, _write_calibrated
from jizhi.tools.demo.sampling import (_S_CUBE, _S_FIELD, _S_ITEMS, _S_USERS, _ZIPF_CATEGORY, _ZIPF_MULTIHOT,
                                       _ZIPF_POPULARITY, _distinct_ids, _popularity_order, _rng, _zipf_cdf,
                                       _zipf_draw)

NAME = "demo"
VERSION = 1
HASH_SEED = 0

_MISSING_ONEHOT = 0.01       # fraction of onehot category values that are 0
_CUBE_LEFT_OUT = 0.005       # fraction of category/multihot signatures not in the cube
_EMBEDDING_STD = 0.1


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    id: int
    side: str
    kind: str
    max_len: int
    vocab: int
    shares: str | None = None


def _fields(items):
    """The demo model's fields, in manifest (= graph column) order."""
    return (
        _Field("u_cat0", 1, "user", "onehot", 1, 1000),
        _Field("u_cat1", 2, "user", "onehot", 1, 500),
        _Field("u_cat2", 3, "user", "onehot", 1, 200),
        _Field("u_cat3", 4, "user", "onehot", 1, 100),
        _Field("u_cat4", 5, "user", "onehot", 1, 50),
        _Field("u_cat5", 6, "user", "onehot", 1, 20),
        _Field("u_multi0", 7, "user", "multihot", 5, 5000),
        _Field("u_multi1", 8, "user", "multihot", 5, 2000),
        _Field("u_hist", 9, "user", "history", 50, items, shares="i_id"),
        _Field("i_id", 10, "item", "onehot", 1, items),
        _Field("i_cat1", 11, "item", "onehot", 1, 2000),
        _Field("i_cat2", 12, "item", "onehot", 1, 500),
        _Field("i_cat3", 13, "item", "onehot", 1, 200),
        _Field("i_cat4", 14, "item", "onehot", 1, 50),
        _Field("i_cat5", 15, "item", "onehot", 1, 20),
        _Field("i_multi0", 16, "item", "multihot", 5, 5000),
        _Field("i_multi1", 17, "item", "multihot", 5, 1000),
    )


def _ragged(lens, values):
    offsets = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return values.astype(np.int64), offsets


def _field_values(seed, field, rows, item_ids, popularity_cdf, popularity_order):
    """Raw values of one field for ``rows`` entities.

    Returns int64 [rows] for onehot fields and ``(values, offsets)`` for
    multihot and history fields.
    """
    rng = _rng(seed, _S_FIELD, field.id)
    if field.name == "i_id":
        return item_ids.view(np.int64).copy()
    if field.kind == "onehot":
        values = _zipf_draw(rng, _zipf_cdf(field.vocab, _ZIPF_CATEGORY), rows) + 1
        return np.where(rng.random(rows) < _MISSING_ONEHOT, 0, values).astype(np.int64)
    lens = rng.integers(0, field.max_len + 1, size=rows)
    total = int(lens.sum())
    if field.kind == "history":
        ranks = _zipf_draw(rng, popularity_cdf, total)
        return _ragged(lens, item_ids[popularity_order[ranks]].view(np.int64))
    return _ragged(lens, _zipf_draw(rng, _zipf_cdf(field.vocab, _ZIPF_MULTIHOT), total) + 1)


def _item_signatures(fields, data, items):
    """``sigs`` uint64 [I, F_item, L] and ``sig_lens`` int32 [I, F_item] from raw values."""
    width = max(f.max_len for f in fields)
    values = np.zeros((items, len(fields), width), dtype=np.int64)
    lens = np.zeros((items, len(fields)), dtype=np.int32)
    for column, field in enumerate(fields):
        if field.kind == "onehot":
            values[:, column, 0] = data[field.name]
            lens[:, column] = data[field.name] != 0
        else:
            flat, offsets = data[field.name]
            bag_lens = np.diff(offsets)
            rows = np.repeat(np.arange(items), bag_lens)
            within = np.arange(flat.shape[0]) - np.repeat(offsets[:-1], bag_lens)
            values[rows, column, within] = flat
            lens[:, column] = bag_lens
    hash_ids = np.array([f.id for f in fields], dtype=np.int64)
    return sign_padded(hash_ids, values, lens, HASH_SEED), lens


def _cube_entries(seed, fields, item_ids):
    """Signatures and vectors of every vocabulary value of every field.

    History fields add nothing (they read the table they share). A small
    fraction of category/multihot signatures is left out on purpose.
    """
    keys, vectors = [], []
    for field in fields:
        if field.kind == "history":
            continue
        rng = _rng(seed, _S_CUBE, field.id)
        if field.name == "i_id":
            values = item_ids.view(np.int64)
            kept = np.ones(values.shape[0], dtype=bool)
        else:
            values = np.arange(1, field.vocab + 1, dtype=np.int64)
            kept = rng.random(values.shape[0]) >= _CUBE_LEFT_OUT
        field_vectors = rng.standard_normal((values.shape[0], DIM), dtype=np.float32) * np.float32(_EMBEDDING_STD)
        keys.append(sign(field.id, values[kept], HASH_SEED))
        vectors.append(field_vectors[kept])
    return np.concatenate(keys), np.concatenate(vectors)



# --- manifest ---------------------------------------------------------------

def _manifest_text(name, version, fields, files, *, head=False, dim=DIM, hash_seed=HASH_SEED,
                   default_vector="zeros", user_features=DENSE_FEATURES):
    """manifest.toml contents (docs/formats.md) of a demo version or a head on its features.

    ``fields``: per field its ``(key, value)`` pairs in order, strings and
    integers (``_field_entries``); ``files``: a list of (path, size, sha256).
    """
    lines = ["format = 1", f"name = {toml_value(name)}", f"version = {int(version)}"]
    if head:
        lines.append("head = true")
    lines += [
        f"dim = {int(dim)}",
        f"hash_seed = {int(hash_seed)}",
        f"default_vector = {toml_value(default_vector)}",
        "",
        "[dense]",
        f"user_features = {int(user_features)}",
        "",
        "[onnx]",
        'file = "dense.onnx"',
        'output = "score"',
    ]
    for entries in fields:
        lines += ["", "[[fields]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in entries]
    for path, size, digest in files:
        lines += ["", "[[files]]", f"path = {toml_value(path)}", f"size = {size}",
                  f"sha256 = {toml_value(digest)}"]
    return "\n".join(lines) + "\n"


def _field_entries(fields):
    """The manifest's (key, value) pairs of each of the demo's ``fields`` (``_Field``)."""
    return [(("name", f.name), ("id", f.id), ("side", f.side), ("kind", f.kind), ("max_len", f.max_len),
             ("vocab", f.vocab), ("pooling", "mean"))
            + ((("shares", f.shares),) if f.shares is not None else (("raw", _raw(f)),))
            for f in fields]


def _raw(field):
    """The manifest's ``raw`` of a demo field: ``i_id`` holds the items' own ids, the others table rows + 1
    (``u_hist`` shares ``i_id``'s table and so reads it as ids)."""
    return "ids" if field.name == "i_id" else "rows"


@contextlib.contextmanager
def _assembled(model_dir, version):
    """Write version ``version`` of ``model_dir`` the way a watcher must see it: complete or not at all.

    Yields the hidden sibling ``.<version>.partial`` (not a version name, so
    a watcher ignores it) to be filled, with ``manifest.toml`` written last;
    then renames it into place. Raises FileExistsError when the version
    exists already; a failure leaves neither the partial directory nor an
    empty model directory behind.
    """
    version_dir = os.path.join(model_dir, str(version))
    if os.path.lexists(version_dir):
        raise FileExistsError(version_dir)
    partial = os.path.join(model_dir, f".{version}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
        os.rename(partial, version_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(model_dir)     # only when empty: a model directory of no version
        raise


def init_demo(out_dir, seed=7, users=10_000, items=100_000, progress=True):
    """Write the demo bundle ``<out_dir>/models/demo/1/``; return its path.

    Deterministic: the same ``seed``, ``users`` and ``items`` give
    byte-identical files. The version is assembled in a hidden sibling
    directory (``.1.partial``, not a version name, so a watcher ignores it)
    with ``manifest.toml`` written last, then renamed into place, so the
    version appears complete or not at all (``_assembled``). Raises
    FileExistsError when the version directory exists already. Progress goes
    to stderr when ``progress`` is true.
    """
    if users < 1 or items < 1:
        raise ValueError("users and items must be positive")
    model_dir = os.path.join(os.fspath(out_dir), "models", NAME)
    fields = _fields(items)
    user_fields = [f for f in fields if f.side == "user"]
    item_fields = [f for f in fields if f.side == "item"]
    with _assembled(model_dir, VERSION) as partial:
        bar = _Progress("init-demo", len(fields) + 5, progress)
        user_ids = _distinct_ids(_rng(seed, _S_USERS), users)
        item_ids = _distinct_ids(_rng(seed, _S_ITEMS), items)
        popularity_cdf = _zipf_cdf(items, _ZIPF_POPULARITY)
        popularity_order = _popularity_order(item_ids)
        user_dir = os.path.join(partial, "profiles", "users")
        item_dir = os.path.join(partial, "profiles", "items")
        save_array(user_dir, "ids", user_ids)
        save_array(user_dir, "dense",
                   _rng(seed, _S_USERS, 1).standard_normal((users, DENSE_FEATURES), dtype=np.float32))
        save_array(item_dir, "ids", item_ids)
        bar.advance(note="ids")

        item_data = {}
        for field in fields:
            rows = users if field.side == "user" else items
            data = _field_values(seed, field, rows, item_ids, popularity_cdf, popularity_order)
            save_field(user_dir if field.side == "user" else item_dir, field, data)
            if field.side == "item":
                item_data[field.name] = data
            bar.advance(note=field.name)

        sigs, sig_lens = _item_signatures(item_fields, item_data, items)
        save_array(item_dir, "sigs", sigs)
        save_array(item_dir, "sig_lens", sig_lens)
        del sigs, sig_lens, item_data
        bar.advance(note="sigs")

        keys, vectors = _cube_entries(seed, fields, item_ids)
        write_cube(os.path.join(partial, "cube"), keys, vectors)
        del keys, vectors
        bar.advance(note="cube")

        _write_calibrated(partial, _manifest_text(NAME, VERSION, _field_entries(fields), []), seed,
                          len(user_fields), len(item_fields))
        bar.advance(note="dense.onnx")

        write_text(os.path.join(partial, "manifest.toml"),
                   _manifest_text(NAME, VERSION, _field_entries(fields), file_entries(partial)))
        bar.advance(note="manifest")
    bar.close()
    return os.path.join(model_dir, str(VERSION))
