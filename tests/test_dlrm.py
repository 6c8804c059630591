"""A DLRM with its embedding tables, made into a bundle by ``python -m jizhi.tools.dlrm make`` and served by jizhid.

The command builds the ids-form model (``jizhi.tools.dlrm.build_with_tables``,
small tables here), imports it with jizhi's importer, writes a trace and the
pipeline files ``dlrm.toml`` (structured features on) and
``dlrm_per_pair.toml`` (``structured = false``: every stage per pair). A real jizhid serves both
files; every score must equal the ORIGINAL model's, run by onnxruntime on the
raw ids of the same users and items (this module's own feeds, read from the
profile files), to 1e-5. The structured-features pass must find the DLRM's
interaction and top layer in the imported graph.
"""
import subprocess
import sys
import tomllib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import Launcher
from jizhi.graph import structured
from jizhi.tools import dlrm

SEED = 3
MAX_VOCAB = 300             # every table cut to at most 300 rows: the import takes about a second
USERS, ITEMS = 60, 400
TRACE_REQUESTS, CANDIDATES = 6, 50
TOLERANCE = 1e-5
MAKE_TIMEOUT_S = 120.0
PIPELINES = ("dlrm", "dlrm_per_pair")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(OUT_DIR, the command's stdout) of ``python -m jizhi.tools.dlrm make`` with small sizes."""
    out = tmp_path_factory.mktemp("dlrm") / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jizhi.tools.dlrm", "make", str(out), "--seed", str(SEED), "--max-vocab", str(MAX_VOCAB),
         "--users", str(USERS), "--items", str(ITEMS), "--check-pairs", "300", "--trace-requests",
         str(TRACE_REQUESTS), "--candidates", str(CANDIDATES), "--pool", "1", "--quiet"],
        capture_output=True, text=True, timeout=MAKE_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def version_dir(made):
    return made[0] / "models" / "dlrm" / "1"


@pytest.fixture(scope="module")
def server(made, tmp_path_factory):
    out, _ = made
    launcher = Launcher(tmp_path_factory, out / "models")
    yield launcher.start(pipelines=[out / "dlrm.toml", out / "dlrm_per_pair.toml"])
    launcher.close()


@pytest.fixture(scope="module")
def trace(made):
    with np.load(made[0] / "trace.npz", allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _requests(trace):
    for q in range(trace["users"].shape[0]):
        a, b = trace["offsets"][q], trace["offsets"][q + 1]
        yield int(trace["users"][q]), trace["items"][a:b], trace["recall_scores"][a:b]


def _rows(profile, ids):
    known = np.load(profile / "ids.npy")
    rows = np.searchsorted(known, np.asarray(ids, dtype=np.uint64))
    assert np.array_equal(known[rows], ids)
    return rows


def original_scores(out, user, items):
    """Scores of the original ids-form model (OUT_DIR/model.onnx) for ``user`` and ``items``.

    Feeds from the bundle's profiles: raw value r is table row r - 1; a
    multihot bag is its values, padded with ``padding_idx`` to max_len
    (without padding_idx every bag is full).
    """
    spec = tomllib.loads((out / "fields.toml").read_text())
    profiles = out / "models" / "dlrm" / "1" / "profiles"
    n = items.shape[0]
    user_row = _rows(profiles / "users", [user])[0]
    rows = {"user": np.full(n, user_row), "item": _rows(profiles / "items", items)}
    dense = np.load(profiles / "users" / "dense.npy")
    feeds = {spec["dense"]["input"]: np.repeat(dense[user_row][None, :], n, axis=0)}
    for f in spec["fields"]:
        directory = profiles / (f["side"] + "s")
        if f["kind"] == "onehot":
            values = np.load(directory / (f["name"] + ".npy"))[rows[f["side"]]]
            assert np.all(values > 0)
            feeds[f["input"]] = values - 1
            continue
        flat = np.load(directory / (f["name"] + ".values.npy"))
        offsets = np.load(directory / (f["name"] + ".offsets.npy"))
        ids = np.full((n, f["max_len"]), f.get("padding_idx", -1), dtype=np.int64)
        for k, row in enumerate(rows[f["side"]]):
            bag = flat[offsets[row]:offsets[row + 1]][-f["max_len"]:]
            ids[k, :bag.shape[0]] = bag - 1
        assert np.all(ids >= 0), f"a short bag of {f['name']} without padding_idx"
        feeds[f["input"]] = ids
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run([spec["output"]], feeds)[0].reshape(-1)


def test_make_writes_the_model_its_fields_the_imported_version_the_trace_and_both_pipelines(made, version_dir):
    out, stdout = made
    for name in ("model.onnx", "fields.toml", "trace.npz", "dlrm.toml", "dlrm_per_pair.toml"):
        assert (out / name).is_file()
        assert str(out / name) in stdout
    assert str(version_dir) in stdout
    manifest = tomllib.loads((version_dir / "manifest.toml").read_text())
    assert (manifest["name"], manifest["version"], manifest["dim"]) == ("dlrm", 1, 64)
    assert manifest["dense"]["user_features"] == 13
    fields = dlrm.table_fields(8, 8, MAX_VOCAB)
    assert [(f["name"], f["side"], f["kind"], f["max_len"], f["vocab"], f["pooling"]) for f in manifest["fields"]] == \
        [(f.name, f.side, f.kind, f.max_len, f.vocab, f.pooling) for f in fields]
    assert [f.vocab for f in fields] == [MAX_VOCAB, MAX_VOCAB, MAX_VOCAB, 100, MAX_VOCAB, MAX_VOCAB, MAX_VOCAB,
                                         MAX_VOCAB, MAX_VOCAB, MAX_VOCAB, MAX_VOCAB, MAX_VOCAB, 200, 100, MAX_VOCAB,
                                         MAX_VOCAB]
    assert np.load(version_dir / "profiles" / "users" / "ids.npy").shape == (USERS,)
    assert np.load(version_dir / "profiles" / "items" / "ids.npy").shape == (ITEMS,)
    per_pair = tomllib.loads((out / "dlrm_per_pair.toml").read_text())
    fused = tomllib.loads((out / "dlrm.toml").read_text())
    assert (fused["name"], fused["model"], per_pair["name"], per_pair["model"]) == \
        ("dlrm", "dlrm", "dlrm_per_pair", "dlrm")
    assert "structured" not in fused and per_pair["structured"] is False
    assert fused["fuse"] == per_pair["fuse"] == [{"name": "scorer", "stages": ["reader", "features", "cube", "dnn",
                                                                               "rank"],
                                                  "pool": 1, "batch": 8, "batch_wait_ms": 3}]


def test_the_trace_asks_for_distinct_known_items_of_known_users(trace, version_dir):
    profiles = version_dir / "profiles"
    assert trace["users"].shape == (TRACE_REQUESTS,)
    assert np.array_equal(trace["offsets"], np.arange(TRACE_REQUESTS + 1) * CANDIDATES)
    assert np.all(np.isin(trace["users"], np.load(profiles / "users" / "ids.npy")))
    assert np.all(np.isin(trace["items"], np.load(profiles / "items" / "ids.npy")))
    for _, items, recall in _requests(trace):
        assert np.unique(items).shape == (CANDIDATES,)
        assert np.all((recall > 0) & (recall < 1))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_both_pipelines_score_like_the_original_model_on_the_raw_ids(made, server, trace, pipeline):
    out, _ = made
    client = server.client()
    for user, items, recall in _requests(trace):
        r = client.score(user, items, recall, pipeline=pipeline, ret="all", deadline_ms=30_000)
        assert r["status"] == "ok"
        assert r["model_versions"] == {"dlrm": 1}
        assert (r["unknown_items"], r["missing_signatures"]) == (0, 0)
        assert np.array_equal(r.item_ids, items)
        expected = original_scores(out, user, items)
        assert np.max(np.abs(r.scores - expected)) <= TOLERANCE
        assert np.std(expected) > 100 * TOLERANCE      # the items' embeddings weigh in the scores compared


def test_structure_splits_the_interaction_and_the_top_layer_of_the_imported_graph(version_dir):
    imported = onnx.load(str(version_dir / "dense.onnx"))
    structured_model, report = structured.structure(imported)
    print(report.summary(500))
    assert report.split_interactions == (
        "interactions: 17 vectors of 64 (9 user, 8 item), 136 entries: "
        "36 user-user on U rows, 72 user-item and 28 item-item per pair",)
    assert report.split_layers == ("MatMul -> top0.lin: 100 input rows on U rows, 100 per pair, 256 outputs",)
    # The same work per pair and per user as build()'s bundle-form DLRM, structured.
    _, bundle_form = structured.structure(dlrm.build(SEED, 64, 8, 8))
    assert report.flops_after == bundle_form.flops_after
    assert report.flops_before == bundle_form.flops_before
    assert structured.check(imported, structured_model, 5, 60, 0) <= TOLERANCE
