"""`jizhictl publish`: a version copied into a watched model directory, paced, renamed whole.

Real files, the real bin/jizhictl (which runs the command as a paced child); a publisher SIGKILLed in
the middle of its copy leaves nothing a server would see, and the next publish clears its leftovers.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from jizhi.bundle import Bundle
from conftest import wait_until

JIZHICTL = os.path.join(os.path.dirname(sys.executable), "jizhictl")


def publish(*args, **kw):
    return subprocess.run([JIZHICTL, "publish", *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def source(demo_bundle, tmp_path):
    """A private copy of the demo version (its files may be damaged by a test)."""
    src = tmp_path / "build" / "demo" / "1"
    shutil.copytree(demo_bundle, src)
    return src


def test_a_version_is_published_whole_with_every_file_as_its_manifest_lists_it(source, tmp_path):
    models = tmp_path / "models"
    r = publish(source, models, "--quiet")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    final = models / "demo" / "1"
    assert r.stdout == f"published {final}\n"
    Bundle(final).verify()          # every listed file, its size and sha256
    assert sorted(p.relative_to(final) for p in final.rglob("*")) == \
        sorted(p.relative_to(source) for p in source.rglob("*"))
    assert os.listdir(models / ".incoming") == []
    # Published once: the same version again is refused, in one line, and changes nothing.
    r = publish(source, models, "--quiet")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"Error: {final} exists already (a version is published once; "
                        "give the new one another version)\n")
    Bundle(final).verify()


def test_a_version_whose_files_are_not_what_its_manifest_lists_is_refused_before_anything_is_copied(
        source, tmp_path):
    models = tmp_path / "models"
    with open(source / "dense.onnx", "ab") as f:
        f.write(b"\0")
    r = publish(source, models, "--quiet")
    assert (r.returncode, r.stdout) == (2, "")
    size = os.path.getsize(source / "dense.onnx")
    assert r.stderr == f"Error: {source / 'dense.onnx'}: {size} bytes, the manifest lists {size - 1}\n"
    assert not models.exists()
    os.remove(source / "manifest.toml")
    r = publish(source, models, "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and "no manifest.toml" in r.stderr
    assert r.stderr.count("\n") == 1


def test_a_publisher_sigkilled_in_its_copy_leaves_no_version_and_the_next_publish_clears_its_leftover(
        source, tmp_path):
    models = tmp_path / "models"
    with open(source / "extra.bin", "wb") as f:         # (unlisted: copied all the same, as cp -r would)
        f.write(os.urandom(1 << 20) * 48)
    cmd = subprocess.Popen([JIZHICTL, "publish", str(source), str(models), "--pace", "0.25", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    incoming = models / ".incoming"

    def copying():
        staged = [d for d in (os.listdir(incoming) if incoming.is_dir() else ()) if d.startswith("demo.1.")]
        return staged and any((incoming / staged[0]).rglob("*"))
    wait_until(copying, 60, interval_s=0.005, what="the publisher to start copying")
    cmd.send_signal(signal.SIGKILL)     # bin/jizhictl; its paced child dies with it (SIGKILL at the fork)
    cmd.communicate()
    wait_until(lambda: not [d for d in os.listdir(incoming) if os.path.exists(f"/proc/{d.rsplit('.', 1)[1]}")],
               30, what="the paced copier to die with its parent")
    assert not (models / "demo" / "1").exists(), "the copy finished before the kill: make extra.bin larger"
    assert os.listdir(incoming), "the killed copy left nothing to clear"
    r = publish(source, models, "--quiet")
    assert r.returncode == 0, r.stderr
    assert os.listdir(incoming) == []
    Bundle(models / "demo" / "1").verify()
