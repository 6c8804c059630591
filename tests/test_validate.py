"""Candidate versions: the demo's staged versions and their validation in a child process.

One small demo bundle per module; every further version is staged and
published once (``versions``), then validated by the real entry point,
``python -m jizhi.validate``, as the supervisor runs it.
"""
import json
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from jizhi.bundle import Bundle, file_entries, write_text
from jizhi.cube.signature import sign
from jizhi.tomlw import toml_text
from jizhi.tools.demo import FAULTS, init_demo, publish, stage_version
from jizhi.errors import BundleError
from jizhi.tools.reference import ReferenceScorer
from jizhi.validate import CHECKS

USERS = 500
ITEMS = 5000
VALIDATE_TIMEOUT_S = 120.0   # a first run on a machine may compile the Numba kernels

# key -> (version, stage_version options); each is staged and published once.
VERSIONS = {
    "seeded": (2, {"seed": 11}),
    "corrupt": (3, {"fault": "corrupt"}),
    "wrong_dim": (4, {"fault": "wrong_dim"}),
    "nan": (5, {"fault": "nan"}),
    "bad_onnx": (6, {"fault": "bad_onnx"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    init_demo(root, users=USERS, items=ITEMS, progress=False)
    return str(root / "models")


@pytest.fixture(scope="module")
def v1(models):
    return os.path.join(models, "demo", "1")


@pytest.fixture(scope="module")
def versions(models, v1):
    return {key: publish(stage_version(models, v1, version, **options), models)
            for key, (version, options) in VERSIONS.items()}


def run_validate(version_dir, *args):
    """(exit code, the JSON result on the last stdout line) of ``python -m jizhi.validate``."""
    proc = subprocess.run([sys.executable, "-m", "jizhi.validate", str(version_dir), *args],
                          capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; exit {proc.returncode}; stderr:\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1])


def manifest_of(version_dir):
    with open(os.path.join(version_dir, "manifest.toml"), "rb") as f:
        return tomllib.load(f)


def test_a_seeded_version_validates_ok_in_a_child_process(versions):
    version_dir = versions["seeded"]
    code, result = run_validate(version_dir, "--name", "demo", "--version", "2")
    assert code == 0
    assert (result["ok"], result["check"], result["error"]) == (True, None, None)
    assert list(result["timings_ms"]) == list(CHECKS)
    assert all(ms >= 0 for ms in result["timings_ms"].values())
    sizes = {e["path"]: e["size"] for e in manifest_of(version_dir)["files"]}
    assert result["files_bytes"] == sum(sizes.values())
    assert result["cube_bytes"] == sizes["cube/data.mdb"] == os.path.getsize(os.path.join(version_dir, "cube", "data.mdb"))
    assert result["onnx_bytes"] == sizes["dense.onnx"] == os.path.getsize(os.path.join(version_dir, "dense.onnx"))
    assert 0 < result["peak_rss_bytes"] < 2**31


@pytest.mark.parametrize("fault, check, message", [
    ("corrupt", "files", "{dir}: dense.onnx sha256 differs from the manifest"),
    ("wrong_dim", "cube", "{dir}/cube: cube vectors have 16 floats, the manifest says dim = 32"),
    ("nan", "smoke", f"{ITEMS} of {ITEMS} smoke scores are not finite (NaN or inf); "
                     "dense.onnx on every item of the catalogue, 10 to a user; the first: user {user}, item {item}"),
    ("bad_onnx", "onnx", "onnx: the graph has no output 'score' (the manifest's [onnx] output); "
                         "its outputs are score_renamed"),
], ids=("corrupt", "wrong_dim", "nan", "bad_onnx"))
def test_a_faulty_version_is_rejected_by_the_check_that_names_its_fault(versions, fault, check, message):
    version_dir = versions[fault]
    code, result = run_validate(version_dir, "--name", "demo", "--version", str(VERSIONS[fault][0]))
    assert code == 1
    first = {side: int(np.load(os.path.join(version_dir, "profiles", side + "s", "ids.npy"))[0])
             for side in ("user", "item")}
    assert (result["ok"], result["check"], result["error"]) == (False, check, message.format(dir=version_dir,
                                                                                             **first))
    assert list(result["timings_ms"]) == list(CHECKS[:CHECKS.index(check) + 1])


def test_faulty_versions_other_than_corrupt_have_consistent_manifests(versions):
    for fault in FAULTS:
        bundle = Bundle(versions[fault])
        assert bundle.version == VERSIONS[fault][0]
        if fault == "corrupt":
            with pytest.raises(BundleError):
                bundle.verify()
        else:
            assert bundle.verify()


@pytest.mark.parametrize("args, message", [
    (("--name", "demo", "--version", "3"), "{dir}: the manifest says version 2, the directory is version 3"),
    (("--name", "other", "--version", "2"), "{dir}: the manifest names model 'demo', the directory is model 'other'"),
], ids=("version", "name"))
def test_a_version_under_another_name_or_number_is_rejected_by_the_manifest_check(versions, args, message):
    version_dir = versions["seeded"]
    code, result = run_validate(version_dir, *args)
    assert code == 1
    assert (result["ok"], result["check"], result["error"]) == (False, "manifest", message.format(dir=version_dir))
    assert list(result["timings_ms"]) == ["manifest"]
    assert (result["files_bytes"], result["cube_bytes"], result["onnx_bytes"]) == (None, None, None)


def test_a_seeded_version_scores_differently_in_the_same_range(v1, versions):
    old, new = ReferenceScorer(v1), ReferenceScorer(versions["seeded"])
    users = old.profiles["user"]["ids"][:4]
    items = old.profiles["item"]["ids"][np.random.default_rng(2).choice(ITEMS, size=4 * 200, replace=False)]
    offsets = np.arange(5, dtype=np.int64) * 200
    before, _ = old.score_requests(users, offsets, items)
    after, _ = new.score_requests(users, offsets, items)
    assert np.abs(after - before).max() > 0.1
    for scores in (before, after):
        assert ((scores > 0) & (scores < 1)).all() and scores.std() > 0.05
    # Only the dense model changed.
    old_files = {e["path"]: e["sha256"] for e in manifest_of(v1)["files"]}
    new_files = {e["path"]: e["sha256"] for e in manifest_of(versions["seeded"])["files"]}
    changed = sorted(p for p in new_files if new_files[p] != old_files[p])
    assert sorted(new_files) == sorted(old_files) and changed == ["dense.onnx"]


def test_a_staged_copy_shares_no_file_with_its_source(models, v1):
    staged = stage_version(models, v1, 7)
    assert staged == os.path.join(models, ".incoming", "demo.7")
    with open(os.path.join(v1, "manifest.toml"), encoding="utf-8") as f:
        source_text = f.read()
    with open(os.path.join(staged, "manifest.toml"), encoding="utf-8") as f:
        assert f.read() == source_text.replace("\nversion = 1\n", "\nversion = 7\n", 1)
    for entry in manifest_of(v1)["files"]:
        assert not os.path.samefile(os.path.join(v1, entry["path"]), os.path.join(staged, entry["path"]))
    for path in ("dense.onnx", "cube/data.mdb"):
        os.truncate(os.path.join(staged, path), 4096)
    with pytest.raises(BundleError):
        Bundle(staged).verify()
    assert Bundle(v1).verify()


def test_publish_renames_into_place_and_refuses_an_existing_version(models, v1):
    staged = stage_version(models, v1, 8)
    final = publish(staged, models)
    assert final == os.path.join(models, "demo", "8") and not os.path.exists(staged)
    assert Bundle(final).verify()
    with pytest.raises(FileExistsError):
        stage_version(models, v1, 8)
    staged = stage_version(models, v1, 9)
    os.mkdir(os.path.join(models, "demo", "9"))   # an empty directory os.rename would replace
    with pytest.raises(FileExistsError):
        publish(staged, models)
    assert os.path.isdir(staged)


def test_stage_version_refuses_an_unknown_fault(models, v1):
    with pytest.raises(ValueError):
        stage_version(models, v1, 10, fault="slow")
    assert not os.path.exists(os.path.join(models, ".incoming", "demo.10"))


def test_stage_version_refuses_a_damaged_source_and_leaves_nothing_staged(models, versions):
    with pytest.raises(ValueError, match="dense.onnx differs from its manifest entry"):
        stage_version(models, versions["corrupt"], 11)
    assert not os.path.exists(os.path.join(models, ".incoming", "demo.11"))


# ---------------------------------------------------------------------------
# Raw values against their field's table, and default_vector (docs/formats.md, "Bounded tables")


def variant(source, dest, manifest_edit=None, profile_edit=None):
    """A copy of the version ``source`` at ``dest`` (``<models>/<name>/<version>``): ``profile_edit(dest)``
    changes its files, ``manifest_edit(manifest dict)`` its manifest, which is written again with
    ``dest``'s version number and its recomputed [[files]]. Returns ``dest``."""
    shutil.copytree(source, dest)
    if profile_edit is not None:
        profile_edit(dest)
    with open(os.path.join(dest, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)
    manifest["version"] = int(os.path.basename(dest))
    if manifest_edit is not None:
        manifest_edit(manifest)
    manifest["files"] = [{"path": p, "size": n, "sha256": h} for p, n, h in file_entries(dest)]
    write_text(os.path.join(dest, "manifest.toml"), toml_text(manifest))
    return os.fspath(dest)


def set_values(rel, change):
    """A ``profile_edit``: ``change(array)`` on the array of ``rel`` (a path in the version), saved in place."""
    def edit(version_dir):
        path = os.path.join(version_dir, rel)
        array = np.load(path)
        change(array)
        np.save(path, array, allow_pickle=False)
    return edit


def bag_start(version_dir, side, field, row):
    return int(np.load(os.path.join(version_dir, "profiles", side + "s", field + ".offsets.npy"))[row])


def first_bag(version_dir, side, field, length):
    """The first row whose ``field`` bag holds at least ``length`` values."""
    offsets = np.load(os.path.join(version_dir, "profiles", side + "s", field + ".offsets.npy"))
    return int(np.flatnonzero(np.diff(offsets) >= length)[0])


def entity_id(version_dir, side, row):
    return int(np.load(os.path.join(version_dir, "profiles", side + "s", "ids.npy"))[row])


OUT_OF_RANGE = {
    # case: (side, field, row (onehot), bag entry (None: onehot), value, further bad values [(index in the file,
    #        value)] after it, what the line ends with)
    "onehot_over_vocab": ("user", "u_cat0", 17, None, 1001, None,
                          "raw value 1001 is outside 0..1000 (vocab = 1000, 0 = missing)"),
    "onehot_negative": ("item", "i_cat2", 3, None, -2, [(9, 501)],
                        "raw value -2 is outside 0..500 (vocab = 500, 0 = missing); 1 more such value in this file"),
    "bag_over_vocab": ("item", "i_multi0", None, 2, 5001, None, "raw value 5001 is outside 1..5000 (vocab = 5000)"),
    "bag_negative": ("user", "u_multi1", None, 1, -5, [(-1, -1), (-2, 2001)],
                     "raw value -5 is outside 1..2000 (vocab = 2000); 2 more such values in this file"),
    "bag_zero": ("user", "u_multi0", None, 0, 0, None, "raw value 0 is outside 1..5000 (vocab = 5000)"),
    "history_negative": ("user", "u_hist", None, 3, -7, None,
                         "raw value -7 is negative (a raw value of a table of entity ids is an id, below 2**63)"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_a_raw_value_out_of_its_fields_range_is_refused_naming_field_row_id_and_value(models, v1, case):
    side, field, row, entry, value, more, ends = OUT_OF_RANGE[case]
    version = 20 + list(OUT_OF_RANGE).index(case)
    onehot = entry is None
    if not onehot:
        row = first_bag(v1, side, field, entry + 1)
    rel = f"profiles/{side}s/{field}.npy" if onehot else f"profiles/{side}s/{field}.values.npy"
    at = row if onehot else bag_start(v1, side, field, row) + entry

    def change(array):
        array[at] = value
        for i, v in more or ():
            array[i] = v
    version_dir = variant(v1, os.path.join(models, "demo", str(version)), profile_edit=set_values(rel, change))
    code, result = run_validate(version_dir, "--name", "demo", "--version", str(version))
    assert code == 1
    where = f", bag entry {entry}" if not onehot else ""
    assert (result["ok"], result["check"]) == (False, "profiles")
    assert result["error"] == (f"{version_dir}/{rel}: {side} field {field!r}, row {row} "
                               f"({side} id {entity_id(v1, side, row)}){where}: {ends}")


def test_entity_ids_and_bags_longer_than_max_len_are_not_refused(models, v1):
    # u_hist (max_len 50) reads the i_id table of entity ids: raw values are item ids, far above its vocab.
    items = np.load(os.path.join(v1, "profiles", "items", "ids.npy")).view(np.int64)

    def longer(version_dir):
        d = os.path.join(version_dir, "profiles", "users")
        values, offsets = (np.load(os.path.join(d, f"u_hist.{n}.npy")) for n in ("values", "offsets"))
        extra = items[:70]      # user row 0's bag becomes 70 + its own values long
        np.save(os.path.join(d, "u_hist.values.npy"), np.concatenate([extra, values]), allow_pickle=False)
        np.save(os.path.join(d, "u_hist.offsets.npy"), np.concatenate([[0], offsets[1:] + extra.shape[0]]),
                allow_pickle=False)
    version_dir = variant(v1, os.path.join(models, "demo", "30"), profile_edit=longer)
    lens = np.diff(np.load(os.path.join(version_dir, "profiles", "users", "u_hist.offsets.npy")))
    assert lens[0] > 50 and (items > 2 * ITEMS).all()
    code, result = run_validate(version_dir, "--name", "demo", "--version", "30")
    assert (code, result["ok"], result["error"]) == (0, True, None)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(default_vector="avg"),
     "{dir}/manifest.toml: default_vector = 'avg' is not one of zeros, mean, row:N "
     "(N a raw value of the field's table, e.g. row:1)"),
    (lambda m: m["fields"][2].update(default_vector="row:0"),
     "{dir}/manifest.toml: field 'u_cat2' default_vector = 'row:0' is not one of zeros, mean, row:N "
     "(N a raw value of the field's table, e.g. row:1)"),
], ids=("manifest", "field"))
def test_an_unknown_default_vector_is_refused_by_the_manifest_check(models, v1, edit, message):
    version = 31 if "avg" in message else 32
    version_dir = variant(v1, os.path.join(models, "demo", str(version)), manifest_edit=edit)
    code, result = run_validate(version_dir, "--name", "demo", "--version", str(version))
    assert (code, result["ok"], result["check"]) == (1, False, "manifest")
    assert result["error"] == message.format(dir=version_dir)


def test_a_default_row_the_table_lacks_is_refused(models, v1):
    version_dir = variant(v1, os.path.join(models, "demo", "33"),
                          manifest_edit=lambda m: m["fields"][0].update(default_vector="row:1001"))
    code, result = run_validate(version_dir, "--name", "demo", "--version", "33")
    assert (code, result["ok"], result["check"]) == (1, False, "profiles")
    assert result["error"] == (f'{version_dir}/manifest.toml: field \'u_cat0\': default_vector = "row:1001", but the '
                               f"cube stores no vector for raw value 1001 of its table "
                               f"(signature {int(sign(1, [1001])[0]):#018x})")
