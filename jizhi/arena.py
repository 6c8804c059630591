"""Shared-memory arenas: the tensors between stages.

Ownership (DESIGN.md, "Tensors between stages"): only the supervisor creates
and unlinks segments. It creates one arena per column of the compiled plan
(``plan["arenas"]``) before it starts the broker, sized ``slots x
max_candidates x row bytes`` (per-candidate columns) or ``slots x row bytes``
(per-request columns). The broker allocates a slot at admission and frees it
when it answers; stages write into the slot named in the event and never
allocate. Everyone else attaches with ``map_segment`` (``os.open`` +
``mmap``): nothing here touches ``multiprocessing.shared_memory`` or its
resource tracker, so an exiting reader never unlinks or "leaks" anything,
and a SIGKILLed worker leaves nothing behind.

Every segment is backed when it is created (``posix_fallocate``): a full
/dev/shm refuses the creation (``ShmFull``, naming the bytes), never a later
first touch of a page (that would be a SIGBUS in whichever process touched
it, the broker included). So a segment costs its full size from creation.
"""
import errno
import mmap
import os
from pathlib import Path

import numpy as np

from jizhi.errors import ShmFull

SHM_DIR = Path("/dev/shm")
PREFIX = "jizhi."


def segment_name(instance, run_id, pipeline, column):
    return f"{PREFIX}{instance}.{run_id}.{pipeline}.{column}"


def arena_shape(spec, slots, max_candidates):
    row = tuple(spec["shape"])
    if spec["scope"] == "candidate":
        return (slots, max_candidates) + row
    return (slots,) + row


def arena_bytes(spec, slots, max_candidates):
    return int(np.prod(arena_shape(spec, slots, max_candidates), dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize


def create(name, nbytes):
    """Supervisor (and the hot-tier builder) only: create a segment of ``nbytes``, every page allocated.

    Fails if the name exists (even as a symbolic link: nothing is written through one). Raises
    ShmFull when /dev/shm cannot hold it; the partial segment is removed.
    """
    nbytes = max(int(nbytes), 1)
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.close(fd)
        unlink(name)
        if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise ShmFull(full_message(f"segment {name}", nbytes)) from None
        raise
    os.close(fd)


def free_bytes():
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def full_message(what, nbytes):
    """``/dev/shm is full: WHAT: N bytes needed (x MiB), M bytes (y MiB) free`` and what to do."""
    free = free_bytes()
    return (f"{SHM_DIR} is full: {what}: {nbytes} bytes needed ({nbytes / 2**20:.1f} MiB), {free} bytes "
            f"({free / 2**20:.1f} MiB) free (make {SHM_DIR} larger, or lower limits.max_in_flight, "
            "limits.max_candidates, overlay.capacity_users, qcache.entries or cube.hot_tier_mb)")


def sigbus_cause():
    """The likely cause of a SIGBUS, for the log line of a process that died of one."""
    free = free_bytes()
    return (f"a page of a mapped file could not be backed or read: {SHM_DIR} has {free} bytes "
            f"({free / 2**20:.1f} MiB) free, or a mapped file (a segment, a bundle's) was truncated")


def map_segment(name_or_path, writable=True, size=None):
    """Map an existing segment (a name in /dev/shm, or an absolute path): ``(mmap, identity)``.

    MAP_SHARED, read-write or read-only; a symbolic link is refused. With ``size``, the segment
    must hold at least that many bytes (else ValueError naming it and both sizes) and that many
    are mapped; without, all of it. ``identity`` is the mapped file's (device, inode): while
    ``identity(name)`` still equals it, the mapping is of the segment now under that name.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(SHM_DIR / name_or_path, flags)
    try:
        st = os.fstat(fd)
        if size is not None and st.st_size < size:
            raise ValueError(f"segment {name_or_path} has {st.st_size} bytes, {size} needed")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, st.st_size if size is None else size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    return mm, (st.st_dev, st.st_ino)


def attach(name, spec, slots, max_candidates):
    """Map an existing segment as an ndarray of the arena's shape (read-write): ``(array, identity)``."""
    mm, ident = map_segment(name)
    shape = arena_shape(spec, slots, max_candidates)
    return np.ndarray(shape, dtype=np.dtype(spec["dtype"]), buffer=mm), ident


def identity(name):
    """(device, inode) of a segment, or None once it is unlinked: a mapping of a segment whose
    identity changed belongs to a run that ended (its supervisor unlinked it, or a new run swept it)."""
    try:
        st = os.stat(SHM_DIR / name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def unlink(name):
    try:
        os.unlink(SHM_DIR / name)
        return True
    except FileNotFoundError:
        return False


def remove_instance(instance):
    """Remove every segment of an instance (stale ones of a crashed run, or ours at stop)."""
    removed = []
    for p in SHM_DIR.glob(f"{PREFIX}{instance}.*"):
        try:
            if p.lstat().st_uid != os.geteuid():
                continue    # another user's instance of the same name: not ours to remove
        except FileNotFoundError:
            continue
        if unlink(p.name):
            removed.append(p.name)
    return removed


class Arenas:
    """Every arena of one pipeline, attached in this process.

    ``cols[name]`` is the ndarray (slot first). ``read`` gathers the rows of
    several slots into one batch column; ``write`` scatters a batch column
    back into the slots.
    """

    def __init__(self, plan, segments, slots, max_candidates):
        self.specs = plan["arenas"]
        self.names = {c: segments[c] for c in self.specs}
        self.cols, self.ids = {}, {}
        for c, spec in self.specs.items():
            self.cols[c], self.ids[c] = attach(segments[c], spec, slots, max_candidates)

    def intact(self):
        """False when a segment mapped here was unlinked or replaced since: compute nothing on it."""
        return all(identity(n) == self.ids[c] for c, n in self.names.items())

    def read(self, col, slots, counts):
        arr = self.cols[col]
        if self.specs[col]["scope"] == "candidate":
            if len(slots) == 1:
                return arr[slots[0], :counts[0]]
            return np.concatenate([arr[s, :n] for s, n in zip(slots, counts)])
        return arr[np.asarray(slots, dtype=np.int64)]

    def write(self, col, slots, offsets, values):
        arr = self.cols[col]
        if self.specs[col]["scope"] == "candidate":
            for i, s in enumerate(slots):
                arr[s, :offsets[i + 1] - offsets[i]] = values[offsets[i]:offsets[i + 1]]
        else:
            arr[np.asarray(slots, dtype=np.int64)] = values
