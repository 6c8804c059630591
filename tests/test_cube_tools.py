"""jizhictl cube build|info|get|bench: the real jizhictl, in a subprocess."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_until
from daemon_helpers import jizhictl, jizhictl_ok
from jizhi.cube.build import read_all
from jizhi.cube.store import Cube

DIM = 8


def _table(count, seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(1, 2 ** 64, count, dtype=np.uint64, endpoint=False))
    keys = rng.permutation(keys)        # inputs come in any order
    return keys, rng.standard_normal((keys.shape[0], dim)).astype(np.float32)


def _inputs(tmp_path, count=1000):
    """An .npz, a directory of keys.npy + vectors.npy and a named .npy pair: thirds of one table."""
    keys, vectors = _table(count)
    a, b = keys.shape[0] // 3, 2 * keys.shape[0] // 3
    np.savez(tmp_path / "part1.npz", keys=keys[:a], vectors=vectors[:a])
    (tmp_path / "part2").mkdir()
    np.save(tmp_path / "part2" / "keys.npy", keys[a:b])
    np.save(tmp_path / "part2" / "vectors.npy", vectors[a:b])
    np.save(tmp_path / "k3.npy", keys[b:])
    np.save(tmp_path / "v3.npy", vectors[b:])
    return keys, vectors


def _build(tmp_path, out="cube", *extra):
    return jizhictl("cube", "build", tmp_path / out, "--from", tmp_path / "part1.npz", "--from", tmp_path / "part2",
                    "--keys", tmp_path / "k3.npy", "--vectors", tmp_path / "v3.npy", *extra)


def _leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


def test_a_cube_built_from_an_npz_and_npy_pairs_holds_every_vector_and_nothing_else(tmp_path):
    keys, vectors = _inputs(tmp_path)
    r = _build(tmp_path)
    assert r.returncode == 0, r.stderr
    size = os.path.getsize(tmp_path / "cube" / "data.mdb")
    assert r.stdout == f"cube {tmp_path / 'cube'}: 1,000 keys, dim 8, data.mdb {size:,} bytes, 1 write transaction\n"
    assert f"{tmp_path / 'part1.npz'}: 333 keys, dim 8" in r.stderr
    assert sorted(os.listdir(tmp_path / "cube")) == ["data.mdb"]
    assert _leftovers(tmp_path) == []
    got_keys, got_vectors = read_all(tmp_path / "cube")
    order = np.argsort(keys)
    assert np.array_equal(got_keys, keys[order])
    assert np.array_equal(got_vectors, vectors[order])


def test_a_cube_written_in_several_transactions_is_read_by_the_verified_numba_reader(tmp_path):
    keys, vectors = _inputs(tmp_path, count=100_000)
    r = _build(tmp_path, "cube", "--txn-mb", "1")     # 1 MiB / 32 bytes: 32,768 entries per transaction
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(" bytes, 4 write transactions\n")
    cube = Cube(tmp_path / "cube", DIM)
    try:
        assert cube.btree is not None
        probe = np.sort(keys[::7])
        got, found = cube.lookup(probe)
    finally:
        cube.close()
    assert found.all()
    assert np.array_equal(got, vectors[::7][np.argsort(keys[::7])])


def test_info_reports_the_cube_and_says_no_daemon_runs(tmp_path):
    _inputs(tmp_path)
    assert _build(tmp_path).returncode == 0
    nowhere = tmp_path / "no-daemon"
    info = json.loads(jizhictl_ok("cube", "info", tmp_path / "cube", "--json", run_dir=nowhere))
    assert {k: info[k] for k in ("keys", "dim", "value_bytes", "depth", "page_bytes", "numba_reader_verified",
                                 "bundle", "problems")} == \
        {"keys": 1000, "dim": 8, "value_bytes": 32, "depth": 2, "page_bytes": 4096,
         "numba_reader_verified": True, "bundle": None, "problems": []}
    assert info["file_bytes"] == os.path.getsize(tmp_path / "cube" / "data.mdb")
    assert info["daemon"]["running"] is False
    text = jizhictl_ok("cube", "info", tmp_path / "cube", run_dir=nowhere).splitlines()
    assert text[1:3] == ["keys      1,000", "dim       8 (from the first value's size)"]
    assert text[5] == "reader    the Numba B+tree reader verified against liblmdb (workers use it)"
    assert text[6] == (f"hot tier  jizhid is not running (no control socket in {nowhere}): no hot-tier figures")


def test_get_prints_the_vectors_of_decimal_and_hex_signatures_and_names_the_missing_ones(tmp_path):
    keys, vectors = _inputs(tmp_path)
    assert _build(tmp_path).returncode == 0
    k0, k1 = int(keys[0]), int(keys[1])
    absent = 12
    assert absent not in set(keys.tolist())
    out = jizhictl_ok("cube", "get", tmp_path / "cube", str(k0), hex(k1), str(absent)).splitlines()
    assert out == [f"{k0} (0x{k0:016x}): " + " ".join(f"{x:.9g}" for x in vectors[0]),
                   f"{k1} (0x{k1:016x}): " + " ".join(f"{x:.9g}" for x in vectors[1]),
                   f"{absent} (0x{absent:016x}): missing: the default vector (zeros)"]
    got = json.loads(jizhictl_ok("cube", "get", tmp_path / "cube", hex(k0), "--json"))
    assert got == [{"signature": k0, "hex": f"0x{k0:016x}", "found": True, "vector": vectors[0].tolist()}]


@pytest.mark.parametrize("sig,message", [("0xZZ", "'0xZZ' is not a signature (decimal, or hex with 0x)"),
                                         (str(2 ** 64), f"{2 ** 64} is not a signature (0 .. 2**64-1)")])
def test_get_refuses_what_is_not_a_signature(tmp_path, sig, message):
    _inputs(tmp_path)
    assert _build(tmp_path).returncode == 0
    r = jizhictl("cube", "get", tmp_path / "cube", sig)
    assert r.returncode == 2
    assert message in r.stderr


def _npy(tmp_path, name, array):
    np.save(tmp_path / name, array)
    return tmp_path / name


REFUSALS = {
    # name: (make the arguments after OUT_DIR, the message expected on stderr)
    "duplicate keys across tables": (
        lambda p, k, v: ["--from", _savez(p, "a.npz", k[:10], v[:10]), "--from", _savez(p, "b.npz", k[5:15], v[5:15])],
        "duplicate signature"),
    "keys that are int64": (
        lambda p, k, v: ["--keys", _npy(p, "k.npy", k.view(np.int64)), "--vectors", _npy(p, "v.npy", v)],
        "keys have dtype int64, not uint64"),
    "vectors that are float64": (
        lambda p, k, v: ["--keys", _npy(p, "k.npy", k), "--vectors", _npy(p, "v.npy", v.astype(np.float64))],
        "vectors have dtype float64, not float32"),
    "fewer vectors than keys": (
        lambda p, k, v: ["--keys", _npy(p, "k.npy", k), "--vectors", _npy(p, "v.npy", v[:-1])],
        "vectors have shape (999, 8), not [1000, dim] (one row per key)"),
    "a NaN in a vector": (
        lambda p, k, v: ["--from", _savez(p, "a.npz", k, _poison(v, 500))],
        "holds NaN or infinity"),
    "another dim than --dim": (
        lambda p, k, v: ["--from", _savez(p, "a.npz", k, v), "--dim", "16"],
        "vectors have dim 8, not 16 (--dim)"),
    "tables of different dims": (
        lambda p, k, v: ["--from", _savez(p, "a.npz", k[:10], v[:10]), "--from", _savez(p, "b.npz", k[10:], v[10:, :4])],
        "the tables have different dims"),
    "an npz without the arrays": (
        lambda p, k, v: ["--from", _savez(p, "a.npz", k, v, names=("signatures", "vectors"))],
        "no array 'keys' (it holds signatures, vectors)"),
    "a --keys without its --vectors": (
        lambda p, k, v: ["--keys", _npy(p, "k.npy", k)],
        "1 --keys but 0 --vectors: give them in pairs"),
    "no input": (lambda p, k, v: [], "no input: give --from TABLE or --keys K.npy --vectors V.npy"),
}


def _savez(tmp_path, name, keys, vectors, names=("keys", "vectors")):
    np.savez(tmp_path / name, **{names[0]: keys, names[1]: vectors})
    return tmp_path / name


def _poison(vectors, row):
    v = vectors.copy()
    v[row, 3] = np.nan
    return v


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_build_refuses_bad_input_with_exit_2_and_writes_nothing(tmp_path, case):
    make, message = REFUSALS[case]
    keys, vectors = _table(1000)
    assert keys.shape[0] == 1000
    r = jizhictl("cube", "build", tmp_path / "out", *make(tmp_path, keys, vectors))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_build_refuses_an_existing_out_dir_and_leaves_it_alone(tmp_path):
    _inputs(tmp_path)
    (tmp_path / "cube").mkdir()
    (tmp_path / "cube" / "keep").write_text("mine")
    r = _build(tmp_path)
    assert r.returncode == 2
    assert f"{tmp_path / 'cube'} exists already (a cube is written into a new directory)" in r.stderr
    assert os.listdir(tmp_path / "cube") == ["keep"]


def test_build_from_parquet_without_pyarrow_names_the_extra_to_install(tmp_path):
    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    r = jizhictl("cube", "build", tmp_path / "out", "--from", tmp_path / "t.parquet")
    assert r.returncode == 2
    assert "reading Parquet needs pyarrow, which is not installed: pip install 'jizhi[parquet]'" in r.stderr


@pytest.mark.slow
def test_info_shows_the_hot_tier_of_the_daemon_serving_the_bundle(launch, demo_bundle, demo_trace):
    server = launch.start()
    with server.client() as c:
        user, items, recall = demo_trace[0]
        c.score(user, items, recall, top_k=10, deadline_ms=5000)
    pipelines = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]
    info = wait_until(lambda: (lambda i: i if i["daemon"]["pipelines"] else None)(
        json.loads(jizhictl_ok("cube", "info", demo_bundle, "--json", run_dir=server.run_dir))), 10,
        what="cube figures")
    d = info["daemon"]
    assert d["running"] is True
    assert d["serves_this_cube"] == [{"model": "demo", "version": 1, "state": "serving"}]
    assert sorted(d["pipelines"]) == sorted(pipelines)
    assert all(p["lookups"] > 0 and p["model"] == "demo" for p in d["pipelines"].values())
    text = jizhictl_ok("cube", "info", demo_bundle, run_dir=server.run_dir).splitlines()
    assert text[6] == (f"hot tier  jizhid (run dir {server.run_dir}) serves this cube: "
                       f"model demo version 1 (serving)")
    assert [line.split(":")[0] for line in text[7:]] == [f"  pipeline {p} (model demo)" for p in d["pipelines"]]


def test_the_storage_benchmark_runs_and_prints_every_row(tmp_path, demo_bundle):
    r = jizhictl("cube", "bench", "--bundle", demo_bundle, "--duration", "0.2", "--repeats", "2",
                 "--requests", "20", "--batch", "1024", timeout_s=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    labels = ["hot tier (HotTable.lookup_into, output allocated per batch like TieredStore)",
              "hot tier, kernel only (output preallocated)",
              "LMDB cube, Numba B+tree reader (Cube.lookup)",
              "LMDB cube, liblmdb (Cube reader=liblmdb: one getmulti)",
              "Python dict {signature: vector}, a loop over the keys",
              "numpy gather in RAM (RamTable: searchsorted + take)"]
    rows = [line for line in lines if line.startswith(tuple(labels))]
    assert [next(lb for lb in labels if row.startswith(lb)) for row in rows] == labels
    assert not any("DISAGREES" in row for row in rows)
    assert lines[1].startswith("batches of 1,024 sorted unique keys drawn by the trace's skew")
    assert lines[2].startswith("trace skew (generated: 20 requests x 500 candidates, seed 1): 20 requests")
    assert lines[-2].startswith("target: hot tier >= 10M keys/s per core: ")
    assert not list(Path("/dev/shm").glob("jizhi.cube-bench-*"))


def test_the_storage_benchmark_of_a_bare_cube_draws_keys_uniformly(tmp_path):
    _inputs(tmp_path)
    assert _build(tmp_path).returncode == 0
    r = jizhictl("cube", "bench", "--cube", tmp_path / "cube", "--duration", "0.1", "--repeats", "1",
                 "--batch", "100", "--json", timeout_s=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["draw"] == "uniform" and "skew" not in result
    assert [row["name"] for row in result["rows"]] == ["hot", "hot_kernel", "btree", "liblmdb", "dict", "gather"]
    assert all(row["agrees"] for row in result["rows"])
    assert result["batch_keys"] == 100
