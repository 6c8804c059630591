"""A full /dev/shm (issue 16, item 6): refused at creation with the bytes, never a SIGBUS later.

Each daemon runs in a private mount namespace whose /dev/shm is a small tmpfs of its own (``unshare
-m``, then ``mount -t tmpfs``; the machine's /dev/shm is untouched). A holder process (``sleep``)
keeps the namespace alive across the daemon's life, so the test reads and fills that tmpfs through
``/proc/<holder>/root/dev/shm`` and sees what the daemon left there after it exited.

Sizes of the demo plan at the tests' defaults: arenas 2,560,000 bytes (checked twice over at
start: room for a reload), the overlay 27,787,264, the stats 1,130,976, the hot tier 35,651,776.
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import Launcher, wait_until
from daemon_helpers import broker_pid, jizhictl_ok, log_lines, popen, rss_bytes, score_ok, wait_ready
from jizhi.client import Client
from jizhi.tools.demo import publish, stage_version

SHM_FULL = r"/dev/shm is full: {what}: (\d+) bytes needed \([\d.]+ MiB\), (\d+) bytes \([\d.]+ MiB\) free"


def _private_shm_works():
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip()


_works, _why = _private_shm_works()
pytestmark = pytest.mark.skipif(not _works, reason=f"no private mount namespace with a tmpfs here "
                                                   f"(unshare -m; mount -t tmpfs: {_why})")


@contextmanager
def private_shm(size):
    """A mount namespace whose /dev/shm is a tmpfs of ``size``: (holder pid, that /dev/shm seen from here)."""
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs -o size={size} tmpfs /dev/shm && echo mounted && exec sleep infinity"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "mounted\n"
        yield holder.pid, Path(f"/proc/{holder.pid}/root/dev/shm")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def inside(server, holder):
    """Run ``server`` (registered, not started) in the holder's mount namespace."""
    server.argv = ["nsenter", f"--target={holder}", "--mount", *server.argv]
    return popen(server)


def free_bytes(shm):
    st = os.statvfs(shm)
    return st.f_bavail * st.f_frsize


def fill(shm):
    """Write a file in ``shm`` until the tmpfs refuses another byte; returns the bytes written."""
    written = 0
    with open(shm / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            while True:
                try:
                    written += f.write(b"\1" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    return written


@pytest.mark.parametrize("size, what", [("4m", re.escape("the arenas, twice over (a model reload loads beside the "
                                                         "serving version)")),
                                        ("16m", r"segment jizhi\.{instance}\.[0-9a-f]{{8}}\.overlay")],
                         ids=["4m: the arenas twice over do not fit", "16m: the overlay does not fit"])
def test_a_dev_shm_without_room_refuses_the_start_naming_dev_shm_and_the_bytes(launch, size, what):
    with private_shm(size) as (holder, shm):
        server = launch.start(wait_ready=False)
        inside(server, holder)
        assert server.proc.wait(60) == 2
        log = server.log_text()
        m = re.search("jizhid: " + SHM_FULL.format(what=what.format(instance=server.instance)), log)
        assert m, server.log_tail()
        needed, free = int(m.group(1)), int(m.group(2))
        assert needed == (5_120_000 if size == "4m" else 27_787_264)
        assert free < needed
        assert "Traceback" not in log
        assert os.listdir(shm) == [], "jizhid left segments in /dev/shm"


@pytest.fixture
def launch_private(tmp_path_factory, demo_models, tmp_path):
    """A launcher on a private copy of the demo model directory (the test publishes a version in it)."""
    models = tmp_path / "models"
    shutil.copytree(demo_models / "demo" / "1", models / "demo" / "1")
    launcher = Launcher(tmp_path_factory, models)
    yield launcher
    launcher.close()


@pytest.mark.slow
def test_a_dev_shm_filled_while_serving_never_kills_the_broker_and_a_refused_hot_tier_or_reload_says_why(
        launch_private, demo_trace, trace_scores, demo_cube_keys):
    from jizhi.cube.hot import capacity_for, table_bytes
    models = launch_private.models_dir
    hot_bytes = table_bytes(capacity_for(demo_cube_keys), 32)     # the whole demo cube (dim 32)
    with private_shm("40m") as (holder, shm):
        server = launch_private.start(wait_ready=False)
        inside(server, holder)
        probe = Client(server.endpoint, timeout_s=1.0)
        try:
            wait_ready(server, probe)
        finally:
            probe.close()
        # Room for the arenas, the overlay and the stats (31.5 MB), not for the hot tier on top.
        line = wait_until(lambda: log_lines(server, "hot tier generation 1"), 60, what="the hot tier's build")[0]
        m = re.search(r"pipeline demo: version 1's hot tier generation 1 was not built \(exit code 1: "
                      + SHM_FULL.format(what=rf"segment jizhi\.{server.instance}\.[0-9a-f]{{8}}\.demo\.v1\.hot\.g1")
                      + r" \(make /dev/shm larger.*\)\); it reads the LMDB cube only$", line)
        assert m, line
        assert int(m.group(1)) == hot_bytes and int(m.group(2)) < hot_bytes
        assert fill(shm) > 0 and free_bytes(shm) == 0
        broker = broker_pid(server)
        workers = set(server.workers())
        rss_before = rss_bytes(broker)
        rng = np.random.default_rng(16)
        users = rng.integers(1 << 40, 1 << 62, size=2000, dtype=np.uint64)   # none of the trace's
        items = demo_trace[0][1]
        with server.client() as c:
            for i, user in enumerate(users):
                c.feedback(int(user), int(items[i % items.shape[0]]))
            for q in range(6):
                score_ok(c, demo_trace, trace_scores, q)
        assert broker_pid(server) == broker and set(server.workers()) == workers
        assert "died" not in server.log_text()
        assert "health ready" in jizhictl_ok("status", run_dir=server.run_dir)
        print(f"\nbroker RSS {rss_before / 2**20:.1f} -> {rss_bytes(broker) / 2**20:.1f} MiB after 2000 feedback "
              f"events with /dev/shm full ({free_bytes(shm)} bytes free)")
        # A new version cannot be loaded: refused with the bytes, and version 1 serves on.
        publish(stage_version(models, models / "demo" / "1", 2, seed=8), models)

        def v2():
            out = json.loads(jizhictl_ok("models", "--json", run_dir=server.run_dir))["demo"]["versions"]
            return next((v for v in out if v["version"] == 2 and v["state"] == "refused"), None)
        error = wait_until(v2, 60, interval_s=0.2, what="demo version 2 to be refused")["error"]
        m = re.fullmatch(SHM_FULL.format(what=rf"segment jizhi\.{server.instance}\.[0-9a-f]{{8}}\.demo\.v2\.item_ids")
                         + r" \(make /dev/shm larger.*\)", error)
        assert m and int(m.group(1)) == 1_024_000 and int(m.group(2)) == 0, error
        assert not [n for n in os.listdir(shm) if ".v2." in n]
        with server.client() as c:
            assert score_ok(c, demo_trace, trace_scores, 6)["model_versions"] == {"demo": 1}
        # A child that does die of SIGBUS is logged with its likely cause.
        os.kill(broker, signal.SIGBUS)
        line = wait_until(lambda: log_lines(server, f"broker pid={broker} died"), 30, what="the broker's death")[0]
        assert line.endswith(f"broker pid={broker} died: killed by SIGBUS (a page of a mapped file could not be "
                             "backed or read: /dev/shm has 0 bytes (0.0 MiB) free, or a mapped file (a segment, "
                             "a bundle's) was truncated)")
        wait_until(lambda: server.info()["ready"] and broker_pid(server) != broker, 60, what="a new broker")
        with server.client() as c:
            score_ok(c, demo_trace, trace_scores, 7)
        assert server.stop() == 0
        assert sorted(os.listdir(shm)) == ["filler"], "jizhid left segments in /dev/shm"
