"""Three storage levels in front of a cube that is not local: hot tier, disk cache (LMDB), slow remote."""
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jizhi import shm
from jizhi.cube import hot
from jizhi.cube.build import write_cube
from jizhi.cube.cache import DiskCache, HotLevel, Levels
from jizhi.cube.remote import SlowLocal, open_backend

DIM = 8


@pytest.fixture
def remote_cube(tmp_path):
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(1, 2 ** 64, 20_000, dtype=np.uint64, endpoint=False))
    vecs = rng.standard_normal((keys.shape[0], DIM)).astype(np.float32)
    write_cube(tmp_path / "remote", keys, vecs)
    return tmp_path / "remote", keys, vecs


def _truth(keys, vecs, probes):
    pos = np.minimum(np.searchsorted(keys, probes), keys.shape[0] - 1)
    found = keys[pos] == probes
    out = np.where(found[:, None], vecs[pos], 0.0).astype(np.float32)
    return out, found


def test_each_level_answers_only_what_the_faster_ones_lacked_and_counts_its_hits(tmp_path, remote_cube):
    path, keys, vecs = remote_cube
    backend = open_backend(f"slow+file://{path}?delay_ms=1", DIM)
    assert isinstance(backend, SlowLocal)
    seg = f"jizhi.test-cache-{__import__('os').getpid()}.g1"
    hot_keys = keys[:1000]
    shm.create(seg, hot.table_bytes(hot.capacity_for(hot_keys.shape[0]), DIM))
    try:
        hot.fill(seg, hot_keys, vecs[:1000], 1)
        cache = DiskCache(tmp_path / "disk", DIM, capacity=2000)
        added, dropped = cache.update(keys[1000:3000], backend)
        assert (added, dropped) == (2000, 0) and backend.calls == 1
        # (LMDB forbids a second handle in one process: the writer reads here; workers use DiskCacheReader.)
        levels = Levels([("hot", HotLevel(hot.HotTable(seg), DIM)), ("disk", cache), ("remote", backend)], DIM)
        absent = np.array([5, 7, 11], np.uint64)
        probes = np.unique(np.concatenate([keys[:500], keys[1500:2500], keys[5000:5300], absent]))
        out, found = levels.lookup(probes)
        want, want_found = _truth(keys, vecs, probes)
        assert np.array_equal(found, want_found) and np.array_equal(out, want)
        assert levels.hits == {"hot": 500, "disk": 1000, "remote": 300} and levels.missing == 3
        assert backend.calls == 2 and backend.keys_read == 2000 + 303   # one round trip for the 303 misses
        cache.close()
    finally:
        shm.unlink(seg)


def test_an_update_keeps_the_most_used_keys_within_capacity(tmp_path, remote_cube):
    path, keys, vecs = remote_cube
    backend = SlowLocal(path, DIM, delay_ms=0)
    cache = DiskCache(tmp_path / "disk", DIM, capacity=100)
    cache.update(keys[:100], backend)
    hottest = np.concatenate([keys[500:550], keys[:50]])   # 50 new hot keys, 50 of the old ones stay
    added, dropped = cache.update(hottest, backend)
    assert (added, dropped) == (50, 50)
    assert np.array_equal(cache.keys(), np.sort(hottest))
    out, found = cache.lookup(np.sort(hottest))
    assert found.all() and np.array_equal(out, _truth(keys, vecs, np.sort(hottest))[0])
    cache.close()


READER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from jizhi.cube.cache import DiskCacheReader
    from jizhi.cube.build import read_all
    path, remote, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    keys, vecs = read_all(remote)
    reader = DiskCacheReader(path, vecs.shape[1])
    rng = np.random.default_rng(0)
    end, reads, hits, bad = time.monotonic() + seconds, 0, 0, 0
    while time.monotonic() < end:
        idx = np.unique(rng.integers(0, 4000, 256))
        out, found = reader.lookup(keys[idx])
        hits += int(found.sum())
        bad += int((out[found] != vecs[idx][found]).any(axis=1).sum())
        reads += 1
    print(reads, hits, bad)
""")


def test_a_reader_process_reads_consistent_vectors_while_the_one_writer_rewrites_the_cache(tmp_path, remote_cube):
    path, keys, vecs = remote_cube
    backend = SlowLocal(path, DIM, delay_ms=0)
    cache = DiskCache(tmp_path / "disk", DIM, capacity=1000)
    cache.update(keys[:1000], backend)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    reader = subprocess.Popen([sys.executable, str(script), str(tmp_path / "disk"), str(path), "2.0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        end, updates = time.monotonic() + 2.0, 0
        rng = np.random.default_rng(1)
        while time.monotonic() < end:      # the hot set keeps moving inside the first 4000 keys
            start = int(rng.integers(0, 3000))
            cache.update(keys[start:start + 1000], backend)
            updates += 1
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
    reads, hits, bad = map(int, out.split())
    assert updates > 5 and reads > 10 and hits > 0
    assert bad == 0
    cache.close()
