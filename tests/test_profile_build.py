"""jizhictl profiles build (jizhi/tools/profilebuild.py): a snapshot from a team's Parquet, CSV, JSON lines and npz.

The demo bundle's own snapshot is written out as a team would hold it (rows in
another order, ids under the team's column name, onehot categories as 0-based
table rows with -1 for missing, bags as lists, or CSV cells of "|"-separated
values), built back, and compared file by file with the bundle's: the same
arrays (hence the same scores: the reader and the stages read nothing else).
Then one bad row per format is refused with its place, and nothing is written.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from jizhi.bundle import Bundle, Profiles  # noqa: E402
from jizhi.tools.profilebuild import BuildError, build_profiles  # noqa: E402
from profile_helpers import team_tables as _team_tables, write_table as _write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("parquet", "csv", "jsonl", "npz")


@pytest.fixture(scope="module")
def team(demo_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("team")
    tables, spec = _team_tables(demo_bundle)
    spec_path = d / "spec.toml"
    spec_path.write_text(spec)
    files = {}
    for fmt in FORMATS:
        ext = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl", "npz": "npz"}[fmt]
        for side in ("user", "item"):
            path = d / f"{side}s.{ext}"
            _write(fmt, tables[side], path)
            files[fmt, side] = str(path)
    return {"files": files, "spec": str(spec_path), "tables": tables, "dir": d}


def _same_snapshot(built, version_dir):
    ref = os.path.join(version_dir, "profiles")
    for side in ("users", "items"):
        names = sorted(os.listdir(os.path.join(ref, side)))
        assert sorted(os.listdir(os.path.join(built, side))) == names
        for name in names:
            a = np.load(os.path.join(built, side, name))
            b = np.load(os.path.join(ref, side, name))
            assert a.dtype == b.dtype and a.shape == b.shape, (side, name)
            assert np.array_equal(a, b), (side, name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_snapshot_built_from_each_format_is_the_bundles_own(fmt, team, demo_bundle, tmp_path):
    out = tmp_path / "snap"
    rows = build_profiles(demo_bundle, str(out), users=team["files"][fmt, "user"], items=team["files"][fmt, "item"],
                          spec=team["spec"], chunk_rows=777)     # many chunks, none aligned with anything
    b = Bundle(demo_bundle)
    assert rows["users"] == Profiles(b, "user").ids.shape[0] and rows["items"] == Profiles(b, "item").ids.shape[0]
    _same_snapshot(str(out), demo_bundle)
    manifest = (out / "profiles.toml").read_text()
    assert "users/ids.npy" in manifest and "items/sigs.npy" in manifest and "sha256" in manifest
    assert not [n for n in os.listdir(tmp_path) if "incoming" in n]


def test_the_built_snapshot_scores_as_the_bundle_does(team, demo_bundle, tmp_path):
    """Through the serving stages themselves: a copy of the version whose profiles are the built ones scores
    a trace's requests exactly as the version does."""
    import shutil
    from jizhi.tools.ceiling import CeilingScorer
    out = tmp_path / "snap"
    build_profiles(demo_bundle, str(out), users=team["files"]["parquet", "user"],
                   items=team["files"]["parquet", "item"], spec=team["spec"])
    models = tmp_path / "models" / "demo"
    models.mkdir(parents=True)
    copy = models / "1"
    shutil.copytree(demo_bundle, copy, ignore=shutil.ignore_patterns("profiles"))
    os.makedirs(copy / "profiles")
    shutil.copytree(out / "users", copy / "profiles" / "users")
    shutil.copytree(out / "items", copy / "profiles" / "items")
    rng = np.random.default_rng(3)
    b = Bundle(demo_bundle)
    users = np.asarray(Profiles(b, "user").ids)[rng.integers(0, 100, 4)]
    items = np.asarray(Profiles(b, "item").ids)[rng.integers(0, 1000, 4 * 50)]
    offsets = np.arange(5, dtype=np.int64) * 50
    recall = np.zeros(items.shape[0], np.float32)
    scores = []
    for vdir in (demo_bundle, str(copy)):
        s = CeilingScorer(vdir, mode="structured")
        batch = s.score(users, offsets, items, recall, 10, {n: 0.0 for n, _ in s.stages})
        scores.append(np.asarray(batch["score"]))
    assert np.array_equal(scores[0], scores[1])


def _bad(team, fmt, side, tmp_path, change):
    """A copy of the team's ``side`` table with ``change(cols)`` applied, written in ``fmt``: its path."""
    cols = {k: (list(v) if isinstance(v, list) else np.array(v)) for k, v in team["tables"][side].items()}
    change(cols)
    ext = fmt
    path = tmp_path / f"bad_{side}s.{ext}"
    _write(fmt, cols, path)
    return str(path)


def _refused(demo_bundle, team, tmp_path, **files):
    out = tmp_path / "snap"
    with pytest.raises(BuildError) as e:
        build_profiles(demo_bundle, str(out), spec=team["spec"], chunk_rows=500, **files)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if "incoming" in n]
    return str(e.value)


def test_a_value_outside_the_table_in_parquet_is_refused_with_its_row(team, demo_bundle, tmp_path):
    def change(cols):
        cols["u_cat1"][1234] = 500          # 0-based rows of a 500-row table: 0..499
    msg = _refused(demo_bundle, team, tmp_path, users=_bad(team, "parquet", "user", tmp_path, change))
    assert "bad_users.parquet, row 1234, column 'u_cat1'" in msg and "value 500 is outside the table's 500 rows" in msg


def test_a_value_that_is_not_an_integer_in_csv_is_refused_with_its_line(team, demo_bundle, tmp_path):
    path = _bad(team, "csv", "item", tmp_path, lambda cols: None)
    lines = open(path).read().split("\n")
    header = lines[0].split(",")
    cells = lines[600].split(",")            # line 601 of the file (the header is line 1)
    cells[header.index("i_cat2")] = "seven"
    lines[600] = ",".join(cells)
    open(path, "w").write("\n".join(lines))
    msg = _refused(demo_bundle, team, tmp_path, items=path)
    assert "bad_items.csv, line 601, column 'i_cat2': 'seven' is not an integer" in msg


def test_a_multihot_bag_longer_than_max_len_in_jsonl_is_refused_with_its_line(team, demo_bundle, tmp_path):
    def change(cols):
        cols["i_multi1"][999] = [1, 2, 3, 4, 5, 6]
    msg = _refused(demo_bundle, team, tmp_path, items=_bad(team, "jsonl", "item", tmp_path, change))
    assert "bad_items.jsonl, line 1000, column 'i_multi1'" in msg and "a bag of 6 values, longer than the " \
        "field's max_len 5" in msg


def test_a_duplicate_id_in_npz_is_refused_with_both_rows(team, demo_bundle, tmp_path):
    def change(cols):
        cols["user_id"][77] = cols["user_id"][12]
    msg = _refused(demo_bundle, team, tmp_path, users=_bad(team, "npz", "user", tmp_path, change))
    assert "bad_users.npz, row 77, column 'user_id': duplicate id" in msg and "(first at row 12)" in msg


def test_a_history_longer_than_max_len_keeps_its_newest_values(team, demo_bundle, tmp_path):
    def change(cols):
        cols["u_hist"][0] = list(range(1, 81)) + list(cols["u_hist"][0])[-20:]
    path = _bad(team, "parquet", "user", tmp_path, change)
    out = tmp_path / "snap"
    build_profiles(demo_bundle, str(out), users=path, spec=team["spec"])
    uid = int(team["tables"]["user"]["user_id"][0])
    ids = np.load(out / "users" / "ids.npy")
    r = int(np.searchsorted(ids, uid))
    values, offsets = np.load(out / "users" / "u_hist.values.npy"), np.load(out / "users" / "u_hist.offsets.npy")
    bag = values[offsets[r]:offsets[r + 1]].tolist()
    assert bag == (list(range(1, 81)) + list(team["tables"]["user"]["u_hist"][0])[-20:])[-50:]


def test_jizhictl_profiles_build_says_what_it_built_and_refuses_in_one_line(team, demo_bundle, tmp_path):
    out = tmp_path / "snap"
    cmd = [sys.executable, os.path.join(ROOT, "bin", "jizhictl"), "profiles", "build", "--model", demo_bundle,
           "--users", team["files"]["csv", "user"], "--items", team["files"]["npz", "item"], "--spec", team["spec"],
           "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"built {out}:" in r.stdout and "users" in r.stdout and "items" in r.stdout
    _same_snapshot(str(out), demo_bundle)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)        # --out exists now
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
