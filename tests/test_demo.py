"""The demo bundle, its trace and the reference scorer (offline code, no daemon)."""
import hashlib
import os
import tomllib

import numpy as np
import onnxruntime as ort
import pytest

from jizhi.cube.build import read_all, write_cube
from jizhi.cube.signature import sign
from jizhi.tools.demo import generate_trace, init_demo
from jizhi.tools.reference import ReferenceScorer

USERS = 500
ITEMS = 5000
TRACE_REQUESTS = 200
TRACE_CANDIDATES = 300


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return init_demo(tmp_path_factory.mktemp("demo"), seed=7, users=USERS, items=ITEMS, progress=False)


@pytest.fixture(scope="session")
def manifest(bundle):
    with open(os.path.join(bundle, "manifest.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="session")
def scorer(bundle):
    return ReferenceScorer(bundle)


@pytest.fixture(scope="session")
def trace(bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    generate_trace(bundle, path, requests=TRACE_REQUESTS, candidates=TRACE_CANDIDATES,
                   spearman=0.8, seed=1, progress=False)
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ranks(x):
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.shape[0])
    return ranks


def test_the_same_seed_writes_a_byte_identical_bundle(bundle, manifest, tmp_path):
    again = init_demo(tmp_path, seed=7, users=USERS, items=ITEMS, progress=False)
    assert _sha256(os.path.join(again, "manifest.toml")) == _sha256(os.path.join(bundle, "manifest.toml"))
    with open(os.path.join(again, "manifest.toml"), "rb") as f:
        assert tomllib.load(f)["files"] == manifest["files"]


def test_a_different_seed_writes_a_different_bundle(manifest, tmp_path):
    other = init_demo(tmp_path, seed=8, users=USERS, items=ITEMS, progress=False)
    with open(os.path.join(other, "manifest.toml"), "rb") as f:
        digests = {entry["path"]: entry["sha256"] for entry in tomllib.load(f)["files"]}
    for entry in manifest["files"]:
        assert digests[entry["path"]] != entry["sha256"], entry["path"]


def test_init_demo_refuses_to_overwrite_a_version(bundle):
    with pytest.raises(FileExistsError):
        init_demo(os.path.dirname(os.path.dirname(os.path.dirname(bundle))), users=10, items=10, progress=False)


def test_the_manifest_lists_every_file_with_its_size_and_sha256(bundle, manifest):
    on_disk = sorted(
        os.path.relpath(os.path.join(root, name), bundle).replace(os.sep, "/")
        for root, _, names in os.walk(bundle) for name in names)
    listed = [entry["path"] for entry in manifest["files"]]
    assert listed == [path for path in on_disk if path != "manifest.toml"]
    assert "cube/lock.mdb" not in on_disk
    for entry in manifest["files"]:
        path = os.path.join(bundle, entry["path"])
        assert os.path.getsize(path) == entry["size"]
        assert _sha256(path) == entry["sha256"]


def test_the_manifest_describes_the_demo_model(manifest):
    assert (manifest["format"], manifest["name"], manifest["version"]) == (1, "demo", 1)
    assert (manifest["dim"], manifest["hash_seed"], manifest["default_vector"]) == (32, 0, "zeros")
    assert manifest["dense"] == {"user_features": 13}
    assert manifest["onnx"] == {"file": "dense.onnx", "output": "score"}
    names = [f["name"] for f in manifest["fields"]]
    assert names == ["u_cat0", "u_cat1", "u_cat2", "u_cat3", "u_cat4", "u_cat5", "u_multi0", "u_multi1",
                     "u_hist", "i_id", "i_cat1", "i_cat2", "i_cat3", "i_cat4", "i_cat5", "i_multi0", "i_multi1"]
    assert [f["id"] for f in manifest["fields"]] == list(range(1, 18))
    hist = manifest["fields"][names.index("u_hist")]
    assert (hist["kind"], hist["max_len"], hist["shares"], hist["vocab"]) == ("history", 50, "i_id", ITEMS)
    assert all(f["pooling"] == "mean" for f in manifest["fields"])


def test_profiles_have_the_documented_dtypes_and_shapes(bundle, manifest):
    def load(side, name):
        return np.load(os.path.join(bundle, "profiles", side, name + ".npy"), allow_pickle=False)

    for side, rows in (("users", USERS), ("items", ITEMS)):
        ids = load(side, "ids")
        assert ids.dtype == np.uint64 and ids.shape == (rows,)
        assert np.all(ids[1:] > ids[:-1])
        assert np.all(ids < np.uint64(2**63))
        for field in manifest["fields"]:
            if field["side"] != side[:-1]:
                continue
            if field["kind"] == "onehot":
                values = load(side, field["name"])
                assert values.dtype == np.int64 and values.shape == (rows,)
            else:
                values = load(side, field["name"] + ".values")
                offsets = load(side, field["name"] + ".offsets")
                assert values.dtype == np.int64 and offsets.dtype == np.int64
                assert offsets.shape == (rows + 1,) and offsets[0] == 0 and offsets[-1] == values.shape[0]
                assert np.diff(offsets).min() >= 0 and np.diff(offsets).max() <= field["max_len"]
    dense = load("users", "dense")
    assert dense.dtype == np.float32 and dense.shape == (USERS, 13)
    item_ids = load("items", "ids")
    assert np.array_equal(load("items", "i_id"), item_ids.view(np.int64))
    assert np.isin(load("users", "u_hist.values"), item_ids.view(np.int64)).all()
    assert load("items", "sigs").dtype == np.uint64 and load("items", "sigs").shape == (ITEMS, 8, 5)
    assert load("items", "sig_lens").dtype == np.int32 and load("items", "sig_lens").shape == (ITEMS, 8)


def test_sigs_npy_matches_signatures_recomputed_from_raw_values(bundle, manifest):
    directory = os.path.join(bundle, "profiles", "items")
    sigs = np.load(os.path.join(directory, "sigs.npy"))
    sig_lens = np.load(os.path.join(directory, "sig_lens.npy"))
    fields = [f for f in manifest["fields"] if f["side"] == "item"]
    sample = np.random.default_rng(0).choice(ITEMS, size=300, replace=False)
    for column, field in enumerate(fields):
        if field["kind"] == "onehot":
            raw = np.load(os.path.join(directory, field["name"] + ".npy"))
            bags = [raw[r:r + 1][raw[r:r + 1] != 0] for r in sample]
        else:
            values = np.load(os.path.join(directory, field["name"] + ".values.npy"))
            offsets = np.load(os.path.join(directory, field["name"] + ".offsets.npy"))
            bags = [values[offsets[r]:offsets[r + 1]] for r in sample]
        for r, bag in zip(sample, bags):
            assert sig_lens[r, column] == bag.shape[0]
            assert np.array_equal(sigs[r, column, :bag.shape[0]], sign(field["id"], bag, 0))
            assert not sigs[r, column, bag.shape[0]:].any()


def test_some_item_category_values_are_missing(bundle):
    sig_lens = np.load(os.path.join(bundle, "profiles", "items", "sig_lens.npy"))
    missing = (sig_lens[:, 1:6] == 0).mean()
    assert 0.002 < missing < 0.03
    assert (sig_lens[:, 0] == 1).all()


def test_the_cube_holds_every_item_id_and_misses_a_few_category_signatures(bundle, manifest):
    keys, vectors = read_all(os.path.join(bundle, "cube"))
    assert keys.dtype == np.uint64 and vectors.dtype == np.float32 and vectors.shape == (keys.shape[0], 32)
    item_ids = np.load(os.path.join(bundle, "profiles", "items", "ids.npy"))
    assert np.isin(sign(10, item_ids.view(np.int64)), keys).all()
    vocab_sigs = np.concatenate([sign(f["id"], np.arange(1, f["vocab"] + 1)) for f in manifest["fields"]
                                 if f["kind"] != "history" and f["name"] != "i_id"])
    present = np.isin(vocab_sigs, keys).mean()
    assert 0.98 < present < 1.0


def test_write_cube_and_read_all_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**64 - 1, size=1000, dtype=np.uint64, endpoint=True)
    vectors = rng.standard_normal((1000, 8)).astype(np.float32)
    write_cube(tmp_path / "cube", keys, vectors)
    assert sorted(os.listdir(tmp_path / "cube")) == ["data.mdb"]
    read_keys, read_vectors = read_all(tmp_path / "cube")
    order = np.argsort(keys)
    assert np.array_equal(read_keys, keys[order])
    assert np.array_equal(read_vectors, vectors[order])


def test_write_cube_rejects_duplicate_signatures(tmp_path):
    with pytest.raises(ValueError):
        write_cube(tmp_path / "cube", np.array([5, 5], dtype=np.uint64), np.zeros((2, 4), dtype=np.float32))


def test_the_onnx_model_scores_a_request_in_zero_one_with_spread(bundle, manifest, scorer):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(bundle, "dense.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["dense", "user_emb", "item_emb", "user_index"]
    assert [o.name for o in session.get_outputs()] == ["score"]
    user = scorer.profiles["user"]["ids"][17]
    items = scorer.profiles["item"]["ids"][np.random.default_rng(1).choice(ITEMS, size=400, replace=False)]
    scores, unknown = scorer.score(user, items)
    assert unknown == 0
    assert scores.dtype == np.float32 and scores.shape == (400,)
    assert ((scores > 0) & (scores < 1)).all()
    assert scores.std() > 0.05


def test_unknown_items_are_counted_and_score_like_an_item_with_empty_bags(scorer):
    user = scorer.profiles["user"]["ids"][3]
    known = scorer.profiles["item"]["ids"][:2]
    unknown_ids = np.array([1, 2], dtype=np.uint64)
    assert not np.isin(unknown_ids, scorer.profiles["item"]["ids"]).any()
    scores, unknown = scorer.score(user, np.concatenate([known, unknown_ids]))
    assert unknown == 2
    assert scores[2] == scores[3]
    batched, _ = scorer.score_requests(np.array([user, user], dtype=np.uint64), np.array([0, 2, 4]),
                                       np.concatenate([known, unknown_ids]))
    np.testing.assert_allclose(batched, scores, rtol=0, atol=1e-6)


def test_the_trace_has_the_documented_arrays(trace, scorer):
    assert sorted(trace) == ["candidates", "items", "offsets", "recall_scores", "seed", "spearman", "spread", "users"]
    assert trace["users"].dtype == np.uint64 and trace["users"].shape == (TRACE_REQUESTS,)
    assert trace["offsets"].dtype == np.int64 and trace["offsets"].shape == (TRACE_REQUESTS + 1,)
    assert np.array_equal(trace["offsets"], np.arange(TRACE_REQUESTS + 1) * TRACE_CANDIDATES)
    assert trace["items"].dtype == np.uint64 and trace["items"].shape == (TRACE_REQUESTS * TRACE_CANDIDATES,)
    assert trace["recall_scores"].dtype == np.float32 and trace["recall_scores"].shape == trace["items"].shape
    assert (int(trace["seed"]), int(trace["candidates"]), float(trace["spearman"])) == (1, TRACE_CANDIDATES, 0.8)
    assert np.isin(trace["users"], scorer.profiles["user"]["ids"]).all()
    assert np.isin(trace["items"], scorer.profiles["item"]["ids"]).all()
    per_request = trace["items"].reshape(TRACE_REQUESTS, TRACE_CANDIDATES)
    assert all(np.unique(row).shape[0] == TRACE_CANDIDATES for row in per_request)


def test_recall_scores_follow_the_model_at_the_target_spearman(trace, scorer):
    correlations = []
    for q in range(TRACE_REQUESTS):
        lo, hi = trace["offsets"][q], trace["offsets"][q + 1]
        model, _ = scorer.score(trace["users"][q], trace["items"][lo:hi])
        correlations.append(np.corrcoef(_ranks(model), _ranks(trace["recall_scores"][lo:hi]))[0, 1])
    assert abs(np.mean(correlations) - 0.8) < 0.05
