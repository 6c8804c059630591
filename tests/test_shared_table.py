"""One copy of a version's item tables in shared memory (issue 21, item 5; jizhi/sharedtable.py).

The item rows (``item_rows``) and the item table (``item_cache``) of a version are built by the first worker
that needs them into a segment every other worker maps: shown on a real jizhid with two workers (one builds,
one maps, the same scores as pooling per batch, nothing left in /dev/shm after the stop), and with real
processes for the lock: a builder SIGKILLed in the middle leaves the table to the next one, which builds it
whole; a reader never sees a half-built table.
"""
import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest

from conftest import assert_topk, demo_pipeline_text, write_text
from jizhi import shm
from jizhi.sharedtable import BUILD, BUSY, READY, SharedTable, build_now

SPECS = [((1000, 4), np.float32), ((1000,), np.int64)]

HOLDER = r"""
import sys, numpy as np
from jizhi.sharedtable import SharedTable, BUILD
t = SharedTable(sys.argv[1], [((1000, 4), np.float32), ((1000,), np.int64)])
assert t.acquire(wait=True) == BUILD
t.arrays[0][:500] = 7.0          # half built, then it hangs until killed
print("building", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def name():
    n = f"jizhi.test{os.getpid()}.{uuid.uuid4().hex[:8]}.items.cube.i1"
    yield n
    shm.unlink(n)


def _fill(value):
    def fill(arrays):
        arrays[0][:] = value
        arrays[1][:] = np.arange(1000)
        yield
    return fill


def test_the_first_process_builds_and_the_next_maps_the_same_bytes_read_only(name):
    arrays, how = build_now(name, SPECS, _fill(3.0))
    assert how == "built" and (arrays[0] == 3.0).all()
    again, how = build_now(name, SPECS, _fill(9.0))          # complete: mapped, never built again
    assert how == "attached" and (again[0] == 3.0).all() and np.array_equal(again[1], np.arange(1000))
    assert not again[0].flags.writeable
    with pytest.raises(ValueError, match="another size"):
        SharedTable(name, [((10,), np.float32)]).acquire(wait=True)


def test_a_builder_killed_mid_build_leaves_the_table_to_the_next_which_builds_it_whole(name):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "building"
        other = SharedTable(name, SPECS)
        assert other.acquire(wait=False) == BUSY                # held by a live builder: not read half built
        p.kill()
        p.wait(10)
        assert other.acquire(wait=True) == BUILD                # its lock died with it: ours to build again
        other.arrays[0][:] = 1.0
        other.arrays[1][:] = 5
        other.publish()
    finally:
        p.kill()
        p.wait(10)
    third = SharedTable(name, SPECS)
    assert third.acquire(wait=False) == READY and (third.arrays[0] == 1.0).all()


FULL = r"""
import numpy as np
from jizhi.sharedtable import build_now
def fill(arrays):
    arrays[0][:] = 2.0
    yield
arrays, how = build_now("jizhi.t.r.p.v1.items.cube.i1", [((100_000, 4), np.float32)], fill)
print(how, float(arrays[0].sum()))
"""


def test_without_room_in_dev_shm_a_worker_builds_its_own_copy():
    """In a private mount namespace whose /dev/shm is a 1 MiB tmpfs (as tests/test_full_shm.py), a table of
    1.6 MB cannot be shared: the worker builds its own, logs why, and serves on."""
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c '{FULL}'"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "mount" in r.stderr and "jizhi" not in r.stderr:
        pytest.skip(f"no private mount namespace with a tmpfs here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["private", str(float(2.0 * 400_000))]
    assert "/dev/shm is full" in r.stderr and "this worker builds its own" in r.stderr


def test_two_workers_of_a_version_share_one_copy_of_its_item_tables(launch, demo_trace, trace_scores, tmp_path):
    path = write_text(tmp_path / "shared.toml", demo_pipeline_text(
        "shared", pool=2, options={"cube": ["item_rows = true"], "dnn": ["item_cache = true"]}))
    server = launch.start(pipelines=(str(path),), config_text='[metrics]\nlisten = ""\n')
    with server.client(timeout_s=30) as c:
        for q in range(4):
            user, items, recall = demo_trace[q]
            assert_topk(c.score(user, items, recall, pipeline="shared", top_k=10, deadline_ms=30_000), items,
                        trace_scores[q], 10)
    log = server.log_text()
    for what in ("item_rows: ", "item_cache: "):
        lines = [line for line in log.splitlines() if what in line and "MiB" in line]
        assert len(lines) == 2, lines
        assert sum("into the version's shared copy" in line for line in lines) == 1
        assert sum("mapped from the version's shared copy" in line for line in lines) == 1
    tables = [p for p in os.listdir("/dev/shm") if ".shared.v1.items." in p]
    assert len(tables) == 2                                     # the cube's rows and the dnn's table, once each
    assert server.stop() == 0
    assert not [p for p in os.listdir("/dev/shm") if ".shared.v1.items." in p]
