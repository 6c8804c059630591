"""The cube: the Numba B+tree reader agrees with liblmdb; pooling; the overlay."""
import lmdb
import numpy as np
import pytest

from jizhi.cube.btree import BTreeReader
from jizhi.cube.build import write_cube
from jizhi.cube.pooling import pool_blocks
from jizhi.cube.store import Cube
from jizhi.cube.table import RamTable


def _liblmdb_lookup(path, keys, dim):
    env = lmdb.open(str(path), readonly=True, lock=False)
    out = np.zeros((len(keys), dim), np.float32)
    found = np.zeros(len(keys), bool)
    with env.begin() as txn:
        for i, k in enumerate(keys):
            v = txn.get(int(k).to_bytes(8, "little"))
            if v is not None:
                out[i] = np.frombuffer(v, "<f4")
                found[i] = True
    env.close()
    return out, found


@pytest.mark.parametrize("count,dim", [(1, 4), (300, 32), (60_000, 32), (500, 1500)])
def test_the_numba_reader_returns_exactly_what_liblmdb_returns(tmp_path, count, dim):
    # 60,000 keys make a three-level tree; dim 1500 (6000 bytes) puts values on overflow pages.
    rng = np.random.default_rng(count)
    keys = np.unique(rng.integers(0, 2 ** 64, count, dtype=np.uint64, endpoint=False))
    vecs = rng.standard_normal((keys.shape[0], dim)).astype(np.float32)
    write_cube(tmp_path / "cube", keys, vecs)
    probes = np.concatenate([keys, rng.integers(0, 2 ** 64, 200, dtype=np.uint64, endpoint=False),
                             np.array([0, 2 ** 64 - 1], np.uint64)])
    reader = BTreeReader.open(tmp_path / "cube", dim)
    assert reader is not None
    got, found = reader.lookup(probes)
    want, want_found = _liblmdb_lookup(tmp_path / "cube", probes, dim)
    assert np.array_equal(found, want_found)
    assert np.array_equal(got, want)
    assert found[:keys.shape[0]].all()


def test_a_cube_uses_the_numba_reader_only_after_verifying_it(tmp_path):
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 2 ** 63, 5000, dtype=np.uint64))
    vecs = rng.standard_normal((keys.shape[0], 8)).astype(np.float32)
    write_cube(tmp_path / "cube", keys, vecs)
    fast = Cube(tmp_path / "cube", 8)
    assert fast.btree is not None
    fast.close()
    slow = Cube(tmp_path / "cube", 8, reader="liblmdb")
    q = np.sort(np.concatenate([keys[::7], np.array([1, 2, 3], np.uint64)]))
    v_slow, f_slow = slow.lookup(q)
    slow.close()
    table = RamTable(keys, vecs)
    v_ram, f_ram = table.lookup(q)
    assert np.array_equal(f_slow, f_ram)
    assert np.array_equal(v_slow, v_ram)
    assert int(f_slow.sum()) == len(keys[::7])


def test_pooling_is_the_mean_of_found_vectors_with_missing_ones_reading_zeros():
    keys = np.array([10, 20, 30], np.uint64)
    vecs = np.array([[1, 1], [2, 4], [3, 9]], np.float32)
    table = RamTable(keys, vecs)
    sigs = np.array([[[10, 20, 0], [30, 99, 0], [0, 0, 0]]], np.uint64)   # one row, three bags
    lens = np.array([[2, 2, 0]], np.int32)
    (pooled,), (missing,) = pool_blocks(table, [(sigs, lens)], 2)
    assert pooled.tolist() == [[[1.5, 2.5], [1.5, 4.5], [0.0, 0.0]]]
    assert missing.tolist() == [1]
    # pooling = "sum" for the second field only
    (pooled,), (missing,) = pool_blocks(table, [(sigs, lens)], 2, [np.array([False, True, False])])
    assert pooled.tolist() == [[[1.5, 2.5], [3.0, 9.0], [0.0, 0.0]]]
    assert missing.tolist() == [1]


def test_the_overlay_keeps_the_last_items_per_user_in_order(tmp_path):
    from jizhi import shm
    from jizhi.overlay import Overlay, merge_history, segment_bytes
    name = f"jizhi.testoverlay{np.random.default_rng().integers(1 << 30)}.overlay"
    shm.create(name, segment_bytes(8, 3))
    try:
        ov = Overlay(name, 8, 3)
        for item in (1, 2, 3, 4):
            assert ov.append(7, item)
        assert ov.append(9, 50)
        recent, n = ov.recent(np.array([7, 9, 8], np.uint64))
        assert n.tolist() == [3, 1, 0]
        assert recent[0].tolist() == [2, 3, 4]
        assert recent[1, :1].tolist() == [50]
        vals = np.zeros((3, 1, 4), np.int64)
        vals[0, 0, :2] = [100, 101]
        lens = np.array([[2], [0], [1]], np.int32)
        merge_history(vals, lens, 0, 4, recent, n)
        assert vals[0, 0].tolist() == [101, 2, 3, 4]
        assert lens.ravel().tolist() == [4, 1, 1]
        for u in range(100, 106):   # 8 slots: 2 used above, 6 more fill it
            assert ov.append(u, 1)
        assert not ov.append(999, 1)
    finally:
        shm.unlink(name)
