"""jizhi/shm.py: a segment's life (create, back, attach, verify, unlink, the sweep), in one module.

Segments are real files in /dev/shm named ``jizhi.test-shm-<pid>...``, removed at the end.
(A /dev/shm that fills while a daemon runs: tests/test_full_shm.py.)
"""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jizhi import shm
from jizhi.errors import ShmFull

REPO = Path(__file__).resolve().parent.parent
INSTANCE = f"test-shm-{os.getpid()}"


@pytest.fixture
def name():
    made = []

    def make(suffix="seg"):
        made.append(shm.segment_name(INSTANCE, "r1", suffix))
        return made[-1]
    yield make
    for n in made:
        shm.unlink(n)
    assert not list(shm.SHM_DIR.glob(f"jizhi.{INSTANCE}.*"))


def test_a_segment_is_created_0600_zeroed_and_of_its_size_and_is_named_by_instance_and_run(name):
    seg = name("overlay")
    assert seg == f"jizhi.{INSTANCE}.r1.overlay"
    assert shm.segment_name(INSTANCE, "r1", "demo", "v2", "item_ids") == f"jizhi.{INSTANCE}.r1.demo.v2.item_ids"
    shm.create(seg, 10_000)
    st = os.lstat(shm.SHM_DIR / seg)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 10_000
    assert st.st_blocks * 512 >= 10_000           # backed at creation, not at a first touch
    mm, _ = shm.attach(seg, writable=False)
    assert len(mm) == 10_000 and mm[:] == bytes(10_000)
    mm.close()


def test_creating_refuses_an_existing_name_and_writes_nothing_through_a_symbolic_link(name, tmp_path):
    seg = name()
    shm.create(seg, 64)
    with pytest.raises(FileExistsError):
        shm.create(seg, 64)
    link = name("link")
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep")
    os.symlink(precious, shm.SHM_DIR / link)
    with pytest.raises(FileExistsError):
        shm.create(link, 64)
    with pytest.raises(OSError):
        shm.attach(link)
    assert precious.read_bytes() == b"keep"


def test_a_segment_larger_than_dev_shm_is_refused_with_the_bytes_and_nothing_is_left(name):
    seg = name("huge")
    st = os.statvfs(shm.SHM_DIR)
    nbytes = st.f_blocks * st.f_frsize + (1 << 20)       # more than the whole tmpfs: refused before a page
    with pytest.raises(ShmFull) as e:
        shm.create(seg, nbytes)
    assert re.fullmatch(rf"/dev/shm is full: segment {re.escape(seg)}: {nbytes} bytes needed \([\d.]+ MiB\), "
                        r"\d+ bytes \([\d.]+ MiB\) free \(make /dev/shm larger, or lower .*\)", str(e.value))
    assert shm.identity(seg) is None


def test_attach_checks_the_size_and_a_read_only_mapping_cannot_be_written(name):
    seg = name()
    shm.create(seg, 100)
    with pytest.raises(ValueError, match=rf"segment {re.escape(seg)} has 100 bytes, 101 needed"):
        shm.attach(seg, size=101)
    mm, _ = shm.attach(seg, size=64)
    assert len(mm) == 64
    mm[:3] = b"abc"
    mm.close()
    ro, _ = shm.attach(seg, writable=False)
    assert ro[:3] == b"abc"
    with pytest.raises(TypeError):
        ro[:1] = b"x"
    ro.close()


def test_a_mapping_verifies_until_its_segment_is_unlinked_or_replaced_under_the_same_name(name):
    seg = name()
    shm.create(seg, 8)
    mm, ident = shm.attach(seg)
    assert shm.verify(seg, ident) and shm.identity(seg) == ident
    assert shm.unlink(seg) is True and shm.unlink(seg) is False
    assert not shm.verify(seg, ident)
    mm[0] = 7                                   # the mapping itself stays usable (Linux keeps its pages)
    shm.create(seg, 8)                          # a new run's segment of the same name
    assert not shm.verify(seg, ident)
    mm.close()


def test_the_sweep_removes_every_segment_of_its_instance_and_nothing_of_another(name):
    ours = [name("overlay"), name("demo.shed"), name("demo.shed.g3"), name("demo.v1.hot.g2")]
    other = f"jizhi.{INSTANCE}x.r1.overlay"     # an instance whose name starts with ours
    for n in ours + [other]:
        shm.create(n, 8)
    try:
        assert sorted(shm.remove_instance(INSTANCE)) == sorted(ours)
        assert shm.identity(other) is not None
    finally:
        shm.unlink(other)


def test_creating_and_attaching_never_start_pythons_resource_tracker():
    code = ("import os; from multiprocessing import resource_tracker as rt; from jizhi import shm\n"
            f"n = 'jizhi.{INSTANCE}.r1.tracker'\n"
            "shm.create(n, 4096); mm, _ = shm.attach(n); mm.close(); shm.unlink(n)\n"
            "print(rt._resource_tracker._fd is None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "True\n"


MECHANISM = re.compile(r"\bmmap\.mmap\(|\bposix_fallocate\(|\bftruncate\(|\bSharedMemory\(|"
                       r"^\s*(from|import) multiprocessing(\.shared_memory| import .*\bshared_memory\b)")


def test_only_jizhi_shm_maps_backs_or_sizes_a_segment():
    hits = []
    for d in ("jizhi", "workers", "cube"):
        for path in sorted((REPO / d).rglob("*.py")):
            if path == REPO / "jizhi" / "shm.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if MECHANISM.search(line) and not line.lstrip().startswith("#"):
                    hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert hits == []
