"""Head bundles: dense-only versions served on a base model's features (offline code, no daemon).

One small demo bundle per module and heads written on it by ``write_head``;
validation runs in this process (``jizhi.validate.validate``: a head has no
cube for it to keep open), the scores come from the real onnxruntime.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import onnx
import pytest

from jizhi.bundle import Bundle, same_features
from jizhi.tools.demo import init_demo, write_head
from jizhi.errors import BundleError
from jizhi.tools.reference import ReferenceScorer
from jizhi.validate import CHECKS, validate

USERS = 300
ITEMS = 2000
CLI_TIMEOUT_S = 120.0
NOT_A_MODEL = b"these bytes are not an ONNX model\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    init_demo(root, users=USERS, items=ITEMS, progress=False)
    return str(root / "models")


@pytest.fixture(scope="module")
def base(models):
    return os.path.join(models, "demo", "1")


@pytest.fixture(scope="module")
def head(models, base):
    return write_head(models, "ctr", base=base, hidden=(32,), seed=5)


@pytest.fixture(scope="module")
def pairs(base):
    """(users, offsets, items): 8 users x 50 items of the base's profiles."""
    scorer = ReferenceScorer(base)
    users = scorer.profiles["user"]["ids"][::USERS // 8][:8]
    items = scorer.profiles["item"]["ids"][::ITEMS // 50][:50]
    return users, np.arange(9, dtype=np.int64) * 50, np.tile(items, 8)


def manifest_of(version_dir):
    with open(os.path.join(version_dir, "manifest.toml"), "rb") as f:
        return tomllib.load(f)


def top_shapes(version_dir):
    """Weight shapes of the graph's top MLP, in layer order."""
    model = onnx.load(os.path.join(version_dir, "dense.onnx"))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [weights[f"top{i}.W"] for i in range(sum(1 for n in weights if n.startswith("top") and n.endswith(".W")))]


def edited_copy(head, target, *replacements):
    """Copy the head's manifest to ``target/manifest.toml`` with each (old, new) replaced once."""
    with open(os.path.join(head, "manifest.toml"), encoding="utf-8") as f:
        text = f.read()
    for old, new in replacements:
        assert text.count(old) >= 1, old
        text = text.replace(old, new, 1)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "manifest.toml"), "w", encoding="utf-8") as f:
        f.write(text)
    return str(target)


def test_a_head_has_the_base_fields_a_graph_and_no_cube_or_profiles(models, base, head):
    assert head == os.path.join(models, "ctr", "1")
    assert sorted(os.listdir(head)) == ["dense.onnx", "manifest.toml"]
    m, b = manifest_of(head), manifest_of(base)
    assert (m["head"], m["name"], m["version"]) == (True, "ctr", 1)
    assert m["fields"] == b["fields"]
    assert (m["dim"], m["hash_seed"], m["dense"], m["onnx"]) == (b["dim"], b["hash_seed"], b["dense"], b["onnx"])
    with open(os.path.join(head, "dense.onnx"), "rb") as f:
        onnx_bytes = f.read()
    assert m["files"] == [{"path": "dense.onnx", "size": len(onnx_bytes),
                           "sha256": hashlib.sha256(onnx_bytes).hexdigest()}]
    assert [p for p in os.listdir(os.path.dirname(head)) if p.startswith(".")] == []


def test_bundle_head_is_true_for_a_head_and_false_for_the_demo(base, head):
    assert Bundle(head).head is True
    assert Bundle(base).head is False
    assert same_features(Bundle(base), Bundle(head)) is None


def test_a_head_key_that_is_not_a_boolean_is_refused(head, tmp_path):
    copy = edited_copy(head, tmp_path / "ctr" / "1", ("head = true", "head = 1"))
    with pytest.raises(BundleError, match=r"manifest.toml: head must be true or false, got 1$"):
        Bundle(copy)


def test_a_head_validates_ok_with_the_cube_and_profiles_checks_skipped(head):
    result = validate(head, "ctr", 1)
    assert (result["ok"], result["check"], result["error"]) == (True, None, None)
    assert list(result["timings_ms"]) == ["manifest", "files", "onnx", "smoke"]
    assert result["skipped"] == ["cube", "profiles"]
    assert [c for c in CHECKS if c in result["timings_ms"] or c in result["skipped"]] == list(CHECKS)
    size = os.path.getsize(os.path.join(head, "dense.onnx"))
    assert (result["files_bytes"], result["cube_bytes"], result["onnx_bytes"]) == (size, 0, size)


def test_a_full_bundle_runs_every_check_and_skips_none(base):
    # In a child: validating a full bundle keeps its cube open in the process,
    # and LMDB refuses the reference scorer a second environment on it.
    proc = subprocess.run([sys.executable, "-m", "jizhi.validate", base, "--name", "demo", "--version", "1"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["ok"], result["skipped"], list(result["timings_ms"])) == (True, [], list(CHECKS))


def test_a_head_scores_the_base_features_differently_as_an_unsaturated_probability(base, head, pairs):
    users, offsets, items = pairs
    base_scores, _ = ReferenceScorer(base).score_requests(users, offsets, items)
    head_scores, unknown = ReferenceScorer(base, dense=head).score_requests(users, offsets, items)
    assert head_scores.shape == (400,) and head_scores.dtype == np.float32 and unknown == 0
    assert np.isfinite(head_scores).all()
    assert ((head_scores > 0) & (head_scores < 1)).all()
    assert np.abs(head_scores - base_scores).max() > 0.05
    logits = np.log(head_scores / (1 - head_scores))
    assert 0.5 < logits.std() < 2.0


def test_write_head_is_deterministic_and_its_width_changes_the_graph(models, base, head, tmp_path):
    again = write_head(tmp_path / "models", "ctr", base=base, hidden=(32,), seed=5)
    heavy = write_head(tmp_path / "models", "heavy", base=base, hidden=(512, 256, 128), seed=5)
    with open(os.path.join(head, "dense.onnx"), "rb") as a, open(os.path.join(again, "dense.onnx"), "rb") as b:
        assert a.read() == b.read()
    assert manifest_of(again)["files"] == manifest_of(head)["files"]
    # The top MLP's input: the user tower (dim), the item fields (8 x dim) and their 8 dot products.
    assert top_shapes(head) == [(296, 32), (32, 1)]
    assert top_shapes(heavy) == [(296, 512), (512, 256), (256, 128), (128, 1)]
    assert validate(heavy, "heavy", 1)["ok"] is True


def test_write_head_refuses_the_base_name_and_an_existing_version_and_leaves_nothing(models, base, head):
    with pytest.raises(ValueError, match="head name 'demo' is the base model's"):
        write_head(models, "demo", version=2, base=base)
    with pytest.raises(FileExistsError):
        write_head(models, "ctr", base=base)
    with pytest.raises(ValueError, match=r"hidden must be one or more positive layer widths, got \(\)"):
        write_head(models, "empty", base=base, hidden=())
    assert not os.path.exists(os.path.join(models, "empty"))
    assert sorted(os.listdir(os.path.join(models, "demo"))) == ["1"]
    assert [p for p in os.listdir(os.path.join(models, "ctr")) if p.startswith(".")] == []


@pytest.mark.parametrize("replacements, message", [
    ((('name = "i_cat2"\nid = 12\nside = "item"\nkind = "onehot"\nmax_len = 1',
       'name = "i_cat2"\nid = 12\nside = "item"\nkind = "multihot"\nmax_len = 1'),),
     "field 'i_cat2' (item field 2): kind is 'onehot' in the base, 'multihot' in the head"),
    ((('name = "u_cat3"', 'name = "u_age"'),),
     "field 'u_cat3' (user field 3): name is 'u_cat3' in the base, 'u_age' in the head"),
    ((('shares = "i_id"', 'shares = "i_cat1"'),),
     "field 'u_hist' (user field 8): hash id (the id of the field it shares) is 10 in the base, 11 in the head"),
    ((("dim = 32", "dim = 16"),), "dim is 32 in the base, 16 in the head"),
    ((("hash_seed = 0", "hash_seed = 3"),), "hash_seed is 0 in the base, 3 in the head"),
    ((('[[fields]]\nname = "i_multi1"', '[[not_fields]]\nname = "i_multi1"'),),
     "the number of item fields is 8 in the base, 7 in the head"),
], ids=("kind", "name", "shares", "dim", "hash_seed", "count"))
def test_same_features_names_the_first_difference_and_the_reference_scorer_refuses_it(
        base, head, tmp_path, replacements, message):
    other = edited_copy(head, tmp_path / "ctr" / "1", *replacements)
    where = " (base demo version 1, head ctr version 1)"
    assert same_features(Bundle(base), Bundle(other)) == message + where
    with pytest.raises(BundleError) as e:
        ReferenceScorer(base, dense=other)
    assert str(e.value) == f"{other}: cannot be scored on the features of {base}: {message}{where}"


def test_the_reference_scorer_refuses_a_dense_bundle_that_is_not_a_head(base):
    with pytest.raises(BundleError) as e:
        ReferenceScorer(base, dense=base)
    assert str(e.value) == f"{base}: not a head bundle (its manifest lacks head = true)"


def test_a_head_whose_graph_is_not_a_model_fails_the_onnx_check(models, base, head):
    broken = os.path.join(models, "ctr", "2")
    shutil.copytree(head, broken)
    with open(os.path.join(broken, "dense.onnx"), "wb") as f:
        f.write(NOT_A_MODEL)
    entry = manifest_of(head)["files"][0]
    edited_copy(head, broken, ("version = 1", "version = 2"),
                (f"size = {entry['size']}", f"size = {len(NOT_A_MODEL)}"),
                (entry["sha256"], hashlib.sha256(NOT_A_MODEL).hexdigest()))
    assert Bundle(broken).verify()
    result = validate(broken, "ctr", 2)
    assert (result["ok"], result["check"]) == (False, "onnx")
    assert result["error"].startswith("InvalidProtobuf: ")
    assert f"{broken}/dense.onnx" in result["error"]
    assert (list(result["timings_ms"]), result["skipped"]) == (["manifest", "files", "onnx"], [])


def test_a_head_listing_a_cube_file_fails_the_files_check(models, head):
    listed = os.path.join(models, "ctr", "3")
    shutil.copytree(head, listed)
    os.makedirs(os.path.join(listed, "cube"))
    with open(os.path.join(listed, "cube", "data.mdb"), "wb") as f:
        f.write(b"x")
    edited_copy(head, listed, ("version = 1", "version = 3"),
                ("[[files]]", '[[files]]\npath = "cube/data.mdb"\nsize = 1\n'
                              f'sha256 = "{hashlib.sha256(b"x").hexdigest()}"\n\n[[files]]'))
    result = validate(listed, "ctr", 3)
    assert (result["ok"], result["check"], result["error"]) == (
        False, "files", f"{listed}: a head bundle has no cube or profiles (it is served on its base model's), "
                        "the manifest lists cube/data.mdb")


def test_python_m_jizhi_demo_head_writes_a_head_and_refuses_an_existing_version(models, base):
    argv = [sys.executable, "-m", "jizhi.tools.demo", "head", "--models", models, "--name", "light",
            "--base", base, "--hidden", "16", "--seed", "3", "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    path = os.path.join(models, "light", "1")
    assert proc.stdout.splitlines()[0] == f"head: {path}"
    assert manifest_of(path)["head"] is True
    again = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert again.returncode == 2
    assert again.stderr == f"python -m jizhi.tools.demo head: {path} exists already (choose another --version)\n"
    usage = subprocess.run([sys.executable, "-m", "jizhi.tools.demo", "head", "--help"],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert usage.returncode == 0 and "head = true" in usage.stdout and "no cube and no profiles" in usage.stdout


def test_a_head_whose_scores_are_nan_fails_the_smoke_check(models, head):
    poisoned = os.path.join(models, "ctr", "4")
    shutil.copytree(head, poisoned)
    model = onnx.load(os.path.join(poisoned, "dense.onnx"))
    for init in model.graph.initializer:
        if init.name == "top1.b":   # the final layer of hidden=(32,)
            init.CopyFrom(onnx.numpy_helper.from_array(np.full(1, np.nan, dtype=np.float32), init.name))
    onnx.save(model, os.path.join(poisoned, "dense.onnx"))
    with open(os.path.join(poisoned, "dense.onnx"), "rb") as f:
        data = f.read()
    entry = manifest_of(head)["files"][0]
    edited_copy(head, poisoned, ("version = 1", "version = 4"),
                (f"size = {entry['size']}", f"size = {len(data)}"),
                (entry["sha256"], hashlib.sha256(data).hexdigest()))
    result = validate(poisoned, "ctr", 4)
    assert (result["ok"], result["check"], result["error"]) == (
        False, "smoke", "64 of 64 smoke scores are not finite (NaN or inf); "
                        "dense.onnx on 2 users x 32 items of random pooled embeddings (a head bundle)")
    assert result["skipped"] == ["cube", "profiles"]


def test_a_head_stage_asked_for_an_item_table_logs_why_and_serves_without_it(head, caplog):
    """A head has no item profiles nor cube to build the table from (model_inference item_cache)."""
    from jizhi.workers.model_inference import ModelInference
    stage = ModelInference()
    with caplog.at_level("WARNING", logger="jizhi.worker"):
        stage.setup({"item_cache": True, "model": "ctr"}, Bundle(head))
    assert stage.item_table is None
    assert any("item_cache: no item table" in r.getMessage() for r in caplog.records)
