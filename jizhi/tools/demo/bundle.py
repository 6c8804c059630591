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

Scale (``jizhictl demo init --users 10000000 --items 1000000``): the users'
bags (multihot, history) are drawn and written one chunk of values at a
time straight into their ``.npy`` files, so memory stays near a chunk
whatever the catalogue, the ranks of large draws come from the sampling
kernel, and the cube is written from one table per field (``plan_cube``)
without first concatenating them. ``vocab_scale`` multiplies the
vocabularies of the category and multihot fields (not ``i_id``, not the
history), making the cube larger than a small ``cube.hot_tier_mb``.
These paths give the default demo's files byte for byte as before.
"""
import contextlib
import dataclasses
import os
import shutil

import numpy as np

from jizhi.bundle import file_entries, save_array, save_field, toml_value, write_text
from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.cube.build import Table, plan_cube
from jizhi.cube.signature import sign, sign_padded
from jizhi.tools.demo.dense import DENSE_FEATURES, DIM, _write_calibrated
from jizhi.tools.demo.sampling import (_S_CUBE, _S_FIELD, _S_ITEMS, _S_USERS, _ZIPF_CATEGORY, _ZIPF_CHUNK,
                                       _ZIPF_MULTIHOT, _ZIPF_POPULARITY, _distinct_ids, _popularity_order, _rng,
                                       _zipf_cdf, _zipf_chunks, _zipf_draw)

NAME = "demo"
VERSION = 1
HASH_SEED = 0

_MISSING_ONEHOT = 0.01       # fraction of onehot category values that are 0
_CUBE_LEFT_OUT = 0.005       # fraction of category/multihot signatures not in the cube
_EMBEDDING_STD = 0.1
_CUBE_TICK = 1 << 20         # cube entries written per progress tick


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    id: int
    side: str
    kind: str
    max_len: int
    vocab: int
    shares: str | None = None


def _fields(items, vocab_scale=1):
    """The demo model's fields, in manifest (= graph column) order.

    ``vocab_scale`` multiplies the vocabulary of every field whose raw values
    are table rows (the categories and multihots; not ``i_id``, not ``u_hist``).
    """
    fields = (
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
    if vocab_scale == 1:
        return fields
    return tuple(dataclasses.replace(f, vocab=f.vocab * int(vocab_scale)) if _raw(f) == "rows" and f.shares is None
                 else f for f in fields)


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


def _save_ragged(directory, seed, field, rows, history_values, popularity_cdf, advance=None):
    """Draw and save a multihot or history field of ``rows`` entities, the values streamed to disk.

    The same values and files as ``_field_values`` then ``save_field``: the
    field's stream draws the lengths, then the uniforms of every value, in
    order; the values are written to ``<name>.values.npy`` one chunk of
    ``_ZIPF_CHUNK`` at a time. ``history_values`` int64 [items]: the item ids
    from the most to the least popular. ``advance(n)`` is called after each
    chunk of n values written.
    """
    rng = _rng(seed, _S_FIELD, field.id)
    lens = rng.integers(0, field.max_len + 1, size=rows)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    del lens
    total = int(offsets[-1])
    save_array(directory, field.name + ".offsets", offsets)
    del offsets
    if field.kind == "history":
        cdf = popularity_cdf
    else:
        cdf = _zipf_cdf(field.vocab, _ZIPF_MULTIHOT)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False, "shape": (total,)}
    chunks = _zipf_chunks(rng, cdf, total) if total >= _ZIPF_CHUNK else [_zipf_draw(rng, cdf, total)]
    with open(os.path.join(directory, field.name + ".values.npy"), "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for ranks in chunks:
            values = history_values[ranks] if field.kind == "history" else ranks + 1
            np.ascontiguousarray(values, dtype="<i8").tofile(f)
            if advance is not None:
                advance(values.shape[0])


def _ticker(bar, ticks, per, note):
    """Progress of a long step that was given ``ticks`` ticks of ``bar`` (besides its own one).

    Returns ``(add, done)``: ``add(n)`` after each n units of work advances
    one tick per ``per`` units, never past ``ticks``; ``done()`` advances
    what is left of them and the step's own tick.
    """
    ticked, units = [0], [0]

    def add(n):
        units[0] += n
        due = min(units[0] // per, ticks) - ticked[0]
        if due > 0:
            ticked[0] += due
            bar.advance(due, note=note)

    def done():
        bar.advance(ticks - ticked[0] + 1, note=note)
    return add, done


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


def _cube_tables(seed, fields, item_ids):
    """One ``Table`` per field (``jizhi.cube.build``): the signatures and vectors of its vocabulary values.

    History fields add nothing (they read the table they share). A small
    fraction of category/multihot signatures is left out on purpose.
    """
    tables = []
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
        field_vectors = rng.standard_normal((values.shape[0], DIM), dtype=np.float32)
        field_vectors *= np.float32(_EMBEDDING_STD)
        tables.append(Table(field.name, sign(field.id, values[kept], HASH_SEED),
                            field_vectors if kept.all() else field_vectors[kept]))
    return tables



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


def init_demo(out_dir, seed=7, users=10_000, items=100_000, progress=True, vocab_scale=1):
    """Write the demo bundle ``<out_dir>/models/demo/1/``; return its path.

    Deterministic: the same ``seed``, ``users``, ``items`` and
    ``vocab_scale`` give byte-identical files. ``vocab_scale`` (a positive
    integer, default 1) multiplies the category and multihot vocabularies
    (``_fields``): a larger cube. The version is assembled in a hidden sibling
    directory (``.1.partial``, not a version name, so a watcher ignores it)
    with ``manifest.toml`` written last, then renamed into place, so the
    version appears complete or not at all (``_assembled``). Raises
    FileExistsError when the version directory exists already. Progress goes
    to stderr when ``progress`` is true: one tick per step, and per chunk of
    values of the users' bags, the cube's writes and their checksums.
    """
    if users < 1 or items < 1:
        raise ValueError("users and items must be positive")
    if int(vocab_scale) != vocab_scale or vocab_scale < 1:
        raise ValueError(f"vocab_scale must be a positive integer, got {vocab_scale!r}")
    model_dir = os.path.join(os.fspath(out_dir), "models", NAME)
    fields = _fields(items, int(vocab_scale))
    user_fields = [f for f in fields if f.side == "user"]
    item_fields = [f for f in fields if f.side == "item"]
    streamed = [f for f in user_fields if f.kind != "onehot"]
    # Extra ticks of the long steps: a bag's chunks of values (about max_len / 2 per user), the cube's entries.
    bag_ticks = {f.name: users * f.max_len // (2 * _ZIPF_CHUNK) for f in streamed}
    cube_ticks = (items + sum(f.vocab for f in fields if f.kind != "history" and f.name != "i_id")) // _CUBE_TICK
    with _assembled(model_dir, VERSION) as partial:
        bar = _Progress("init-demo", len(fields) + 5 + sum(bag_ticks.values()) + cube_ticks, progress)
        user_ids = _distinct_ids(_rng(seed, _S_USERS), users)
        item_ids = _distinct_ids(_rng(seed, _S_ITEMS), items)
        popularity_cdf = _zipf_cdf(items, _ZIPF_POPULARITY)
        popularity_order = _popularity_order(item_ids)
        user_dir = os.path.join(partial, "profiles", "users")
        item_dir = os.path.join(partial, "profiles", "items")
        save_array(user_dir, "ids", user_ids)
        del user_ids
        save_array(user_dir, "dense",
                   _rng(seed, _S_USERS, 1).standard_normal((users, DENSE_FEATURES), dtype=np.float32))
        save_array(item_dir, "ids", item_ids)
        bar.advance(note="ids")

        item_data = {}
        by_popularity = item_ids[popularity_order].view(np.int64)
        for field in fields:
            if field in streamed:
                add, done = _ticker(bar, bag_ticks[field.name], _ZIPF_CHUNK, field.name)
                _save_ragged(user_dir, seed, field, users, by_popularity, popularity_cdf, add)
                done()
                continue
            rows = users if field.side == "user" else items
            data = _field_values(seed, field, rows, item_ids, popularity_cdf, popularity_order)
            save_field(user_dir if field.side == "user" else item_dir, field, data)
            if field.side == "item":
                item_data[field.name] = data
            del data
            bar.advance(note=field.name)
        del by_popularity

        sigs, sig_lens = _item_signatures(item_fields, item_data, items)
        save_array(item_dir, "sigs", sigs)
        save_array(item_dir, "sig_lens", sig_lens)
        del sigs, sig_lens, item_data
        bar.advance(note="sigs")

        add, done = _ticker(bar, cube_ticks, _CUBE_TICK, "cube")
        plan_cube(os.path.join(partial, "cube"), _cube_tables(seed, fields, item_ids)).write(progress=add)
        done()

        _write_calibrated(partial, _manifest_text(NAME, VERSION, _field_entries(fields), []), seed,
                          len(user_fields), len(item_fields))
        bar.advance(note="dense.onnx")

        write_text(os.path.join(partial, "manifest.toml"),
                   _manifest_text(NAME, VERSION, _field_entries(fields), file_entries(partial)))
        bar.advance(note="manifest")
    bar.close()
    return os.path.join(model_dir, str(VERSION))
