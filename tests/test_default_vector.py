"""default_vector (docs/formats.md, "Default vectors"): what an empty bag and a missing signature read.

One small demo bundle, and a copy of it whose manifest says ``default_vector
= "mean"`` with a ``row:N`` for two fields and sum pooling for one. The real
stages (data_reader, feature_processor, cube_accessor, model_inference)
pool and score it in this process; every expectation is numpy on the
cube's own vectors (``cube.build.read_all``), and the reference scorer must
agree.
"""
import os

import numpy as np
import pytest

from test_validate import variant
from jizhi.bundle import Bundle
from jizhi.cube import hot
from jizhi.cube.build import read_all
from jizhi.cube.pooling import default_vectors
from jizhi.cube.signature import sign
from jizhi.errors import BundleError
from jizhi.tools.demo import init_demo
from jizhi.tools.reference import ReferenceScorer
from jizhi.workers.cube_accessor import CubeAccessor
from jizhi.workers.data_reader import DataReader
from jizhi.workers.feature_processor import FeatureProcessor
from jizhi.workers.model_inference import ModelInference
from jizhi.workers.stage import Batch

USERS = 1000
ITEMS = 5000
UNKNOWN_USER = np.uint64(12345)
UNKNOWN_ITEM = np.uint64(2 ** 62 + 17)
ROWS = {"u_cat1": 3, "i_cat2": 7}        # the fields given default_vector = "row:N"
SUM_FIELD = "u_multi0"                  # given pooling = "sum"
CONFIG = {"on_unknown": "default", "_overlay": None}


# Reference scorers by version directory, made before the stages open the version's cube (one LMDB environment
# per path and process: the reference reads the cube through its own).
REFERENCE = {}


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    path = init_demo(tmp_path_factory.mktemp("default_vector"), users=USERS, items=ITEMS, progress=False)
    REFERENCE[path] = ReferenceScorer(path)
    return path


def _mean_manifest(m):
    m["default_vector"] = "mean"
    for f in m["fields"]:
        if f["name"] in ROWS:
            f["default_vector"] = f"row:{ROWS[f['name']]}"
        if f["name"] == SUM_FIELD:
            f["pooling"] = "sum"


@pytest.fixture(scope="module")
def v2(v1):
    path = variant(v1, os.path.join(os.path.dirname(v1), "2"), manifest_edit=_mean_manifest)
    REFERENCE[path] = ReferenceScorer(path)
    return path


@pytest.fixture(scope="module")
def cube(v1):
    keys, vectors = read_all(os.path.join(v1, "cube"))
    return keys, vectors


def stored(cube, signatures):
    """(vectors float32 [n, dim] (zeros where absent), found bool [n]) of ``signatures`` in the cube."""
    keys, vectors = cube
    pos = np.minimum(np.searchsorted(keys, signatures), keys.shape[0] - 1)
    found = keys[pos] == signatures
    return np.where(found[:, None], vectors[pos], np.float32(0)), found


def expected_defaults(bundle, cube, side):
    """Each field's default vector, from the cube's vectors: the table's mean (raw values 1..vocab; the
    i_id table: the items' ids), or its row N."""
    out = []
    for f in bundle.user_fields if side == "user" else bundle.item_fields:
        if f.name in ROWS:
            v, found = stored(cube, sign(f.hash_id, [ROWS[f.name]]))
            assert found.all()
            out.append(v[0])
            continue
        if f.name in ("i_id", "u_hist"):    # the table of item ids
            values = np.load(os.path.join(bundle.path, "profiles", "items", "ids.npy")).view(np.int64)
        else:
            values = np.arange(1, f.vocab + 1)
        v, found = stored(cube, sign(f.hash_id, values))
        assert found.sum() > 0.9 * values.shape[0]
        out.append(v[found].astype(np.float64).mean(axis=0).astype(np.float32))
    return np.array(out)


def profile(bundle, side, name):
    d = os.path.join(bundle.path, "profiles", side + "s")
    if os.path.exists(os.path.join(d, name + ".npy")):
        return np.load(os.path.join(d, name + ".npy"))
    return np.load(os.path.join(d, name + ".values.npy")), np.load(os.path.join(d, name + ".offsets.npy"))


def bag(bundle, side, name, row):
    data = profile(bundle, side, name)
    if isinstance(data, tuple):
        values, offsets = data
        return values[offsets[row]:offsets[row + 1]]
    return data[row:row + 1][data[row:row + 1] != 0]


def expected_pool(bundle, cube, side, field, row, default):
    """numpy: ``field``'s pooled vector of profile ``row``: missing signatures read ``default`` and count in the
    mean; an empty bag is ``default``."""
    values = bag(bundle, side, field.name, row)
    if values.shape[0] == 0:
        return default
    v, found = stored(cube, sign(field.hash_id, values))
    v[~found] = default
    total = v.sum(axis=0)
    return total if field.pooling == "sum" else total / np.float32(values.shape[0])


def find_rows(bundle, cube, side):
    """Profile rows of ``side`` to pool: per multihot field, one whose bag holds a signature the cube lacks and
    one whose bag is empty; per onehot field, one whose value is missing (0)."""
    rows = {}
    for f in bundle.user_fields if side == "user" else bundle.item_fields:
        data = profile(bundle, side, f.name)
        if f.kind == "multihot":
            values, offsets = data
            _, found = stored(cube, sign(f.hash_id, values))
            lacking = np.searchsorted(offsets, np.flatnonzero(~found), side="right") - 1
            assert lacking.shape[0], f"{f.name}: no bag of the demo holds a signature the cube lacks"
            rows[f.name, "missing signature"] = int(lacking[0])
            rows[f.name, "empty bag"] = int(np.flatnonzero(np.diff(offsets) == 0)[0])
        elif f.kind == "onehot" and f.name != "i_id":
            rows[f.name, "missing value"] = int(np.flatnonzero(data == 0)[0])
    return rows


def stages(bundle):
    out = []
    for cls in (DataReader, FeatureProcessor, CubeAccessor, ModelInference):
        stage = cls()
        stage.setup(dict(CONFIG), bundle)
        out.append(stage)
    return out


def run(stage_list, users, items, upto=None):
    """The stages on one request per user, every item a candidate of each: the batch after them."""
    r, p = users.shape[0], items.shape[0]
    offsets = np.arange(r + 1, dtype=np.int64) * p
    batch = Batch(users.astype(np.uint64), np.full(r, p, np.int64), np.zeros(r, bool), np.full(r, np.inf), offsets,
                  {"item_ids": np.tile(items.astype(np.uint64), r), "recall_scores": np.full(r * p, 0.5, np.float32)})
    for stage in stage_list[:upto]:
        batch.columns.update(stage.process(batch))
    return batch


def test_mean_and_row_defaults_are_the_tables_mean_and_the_named_row(v2, cube):
    bundle = Bundle(v2)
    for side in ("user", "item"):
        got = default_vectors(bundle, side)
        want = expected_defaults(bundle, cube, side)
        assert got.shape == want.shape == (len(bundle.user_fields if side == "user" else bundle.item_fields), 32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
        assert (np.abs(got).max(axis=1) > 0).all()      # no field fell back to zeros
    # the history reads the item-id table: the same default
    user, item = default_vectors(bundle, "user"), default_vectors(bundle, "item")
    assert np.array_equal(user[[f.name for f in bundle.user_fields].index("u_hist")],
                          item[[f.name for f in bundle.item_fields].index("i_id")])


@pytest.mark.parametrize("tier", ["lmdb", "hot"])
def test_a_missing_signature_and_an_empty_bag_pool_with_the_fields_default_vector(v2, cube, tier):
    bundle = Bundle(v2)
    chain = stages(bundle)
    if tier == "hot":
        # A hot table of every other key: hits pool in the table's kernel, misses below it.
        keys, vectors = cube
        chain[2].store.table = hot.private_table(keys[::2], vectors[::2])
        assert chain[2].store.pool_ready()
    for side in ("user", "item"):
        defaults = expected_defaults(bundle, cube, side)
        fields = bundle.user_fields if side == "user" else bundle.item_fields
        rows = find_rows(bundle, cube, side)
        row_list = sorted(set(rows.values()))
        ids = np.load(os.path.join(v2, "profiles", side + "s", "ids.npy"))[row_list]
        unknown = UNKNOWN_USER if side == "user" else UNKNOWN_ITEM
        other = np.load(os.path.join(v2, "profiles", ("item" if side == "user" else "user") + "s", "ids.npy"))[:1]
        users, items = (np.append(ids, unknown), other) if side == "user" else (other, np.append(ids, unknown))
        batch = run(chain, users, items, upto=3)
        emb = batch["user_emb"] if side == "user" else batch["item_emb"]
        assert emb.shape == (len(row_list) + 1, len(fields), 32)
        np.testing.assert_allclose(emb[-1], defaults, rtol=0, atol=1e-7)      # an unknown entity: every default
        for (name, case), row in rows.items():
            c = [f.name for f in fields].index(name)
            want = expected_pool(bundle, cube, side, fields[c], row, defaults[c])
            if case != "missing signature":
                assert np.array_equal(want, defaults[c])
            np.testing.assert_allclose(emb[row_list.index(row), c], want, rtol=0, atol=2e-7,
                                       err_msg=f"{side} {name}, {case}, row {row}")
        # the reference scorer pools them alike
        ref = REFERENCE[v2].embeddings(side, np.append(np.array(row_list, np.int64), -1))
        np.testing.assert_allclose(emb, ref, rtol=0, atol=2e-7)


def test_scores_with_mean_defaults_agree_with_the_reference_and_differ_from_zeros(v1, v2):
    rng = np.random.default_rng(3)
    users_known = np.load(os.path.join(v2, "profiles", "users", "ids.npy"))
    items_known = np.load(os.path.join(v2, "profiles", "items", "ids.npy"))
    users = np.append(users_known[rng.choice(USERS, 3, replace=False)], UNKNOWN_USER)
    items = np.append(items_known[rng.choice(ITEMS, 40, replace=False)], UNKNOWN_ITEM)
    got = {}
    for name, version in (("zeros", v1), ("mean", v2)):
        batch = run(stages(Bundle(version)), users, items)
        assert batch.counts["unknown_items"].tolist() == [1] * 4
        assert batch.counts["unknown_user"].tolist() == [0, 0, 0, 1]
        offsets = np.arange(users.shape[0] + 1, dtype=np.int64) * items.shape[0]
        want, unknown = REFERENCE[version].score_requests(users, offsets, np.tile(items, users.shape[0]))
        assert unknown == 4
        np.testing.assert_allclose(batch["score"], want, rtol=0, atol=1e-5)
        got[name] = batch["score"].reshape(users.shape[0], items.shape[0])
    # the unknown item's and the unknown user's scores move; a known pair whose bags the cube holds does not
    assert np.abs(got["mean"][:, -1] - got["zeros"][:, -1]).min() > 1e-4
    assert np.abs(got["mean"][-1] - got["zeros"][-1]).min() > 1e-4


def test_zeros_is_the_default_and_reads_zeros(v1):
    bundle = Bundle(v1)
    assert bundle.default_vector == "zeros" and {f.default_vector for f in bundle.user_fields} == {"zeros"}
    for side in ("user", "item"):
        assert not default_vectors(bundle, side).any()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(default_vector="median"), "default_vector = 'median' is not one of zeros, mean, row:N"),
    (lambda m: m["fields"][1].update(default_vector="row:x"),
     "field 'u_cat1' default_vector = 'row:x' is not one of zeros, mean, row:N"),
    (lambda m: m["fields"][1].update(default_vector="row:-3"),
     "field 'u_cat1' default_vector = 'row:-3' is not one of zeros, mean, row:N"),
    (lambda m: m.update(default_vector=0), "default_vector = 0 is not one of zeros, mean, row:N"),
], ids=("name", "row_word", "row_negative", "not_a_string"))
def test_an_invalid_default_vector_is_refused_when_the_manifest_is_read(v1, tmp_path, edit, message):
    version_dir = variant(v1, tmp_path / "demo" / "3", manifest_edit=edit)
    with pytest.raises(BundleError) as e:
        Bundle(version_dir)
    assert str(e.value) == (f"{version_dir}/manifest.toml: {message} "
                            "(N a raw value of the field's table, e.g. row:1)")


def test_a_row_the_table_lacks_is_refused_when_the_defaults_are_computed(v1, tmp_path, cube):
    # u_cat2's vocabulary signatures the demo left out of the cube: one is named as the default
    absent = np.flatnonzero(~stored(cube, sign(3, np.arange(1, 201)))[1]) + 1
    assert absent.shape[0]
    n = int(absent[0])
    version_dir = variant(v1, tmp_path / "demo" / "4",
                          manifest_edit=lambda m: m["fields"][2].update(default_vector=f"row:{n}"))
    with pytest.raises(BundleError) as e:
        default_vectors(Bundle(version_dir), "user")
    assert str(e.value) == (f'field \'u_cat2\': default_vector = "row:{n}", but the cube stores no vector for raw '
                            f"value {n} of its table (signature {int(sign(3, [n])[0]):#018x})")
