"""Shared-memory segments: the one place that creates, backs, attaches, verifies and unlinks them.

Every segment of a run is a file ``/dev/shm/jizhi.<instance>.<run_id>.<what>``: the arenas
(jizhi/arena.py), the overlay, the query cache, the stats, the shedding control state
(jizhi/controlstate.py), the hot tier's tables and controls (cube/hot.py). The supervisor names
them with ``segment_name()``; the sweep (``remove_instance``, at start and in the tools) finds every one by
its ``jizhi.<instance>.`` prefix, whatever follows it.

* ``create``: O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600 (an existing name, even a symbolic link,
  is refused: nothing is ever written through one). Only the supervisor, the children it
  starts to fill a segment (the hot-tier builder), and the workers of a version for the item tables
  they share under the prefix the supervisor gives them (jizhi/sharedtable.py) create.
* back: ``create`` allocates every page (``posix_fallocate``), so a full /dev/shm refuses the
  creation (``ShmFull``, naming the segment and the bytes) instead of a later first touch of a page
  killing whichever process touched it with SIGBUS (the broker included). A segment costs its
  full size from creation.
* ``attach``: ``os.open`` (O_NOFOLLOW) + ``mmap`` MAP_SHARED, read-write or read-only, in any
  process. Nothing here touches ``multiprocessing.shared_memory`` or its resource tracker, so a
  reader that exits never unlinks or "leaks" a segment, and a SIGKILLed worker leaves nothing.
* ``verify``: a mapping is of the segment now under its name while the name's (device, inode)
  is the one ``attach`` returned; after an unlink (the supervisor's stop) or a new run's sweep it
  is not, and a worker computes nothing on it.
* ``unlink``: the supervisor (at stop, or when it replaces a segment or unloads a version), and a worker
  for an item table of its version it replaced (jizhi/sharedtable.py). Unlinking a mapped
  segment is safe on Linux: a mapping keeps its pages until it is closed.
"""
import errno
import mmap
import os
from pathlib import Path

from jizhi.errors import ShmFull

SHM_DIR = Path("/dev/shm")
PREFIX = "jizhi."


def segment_name(instance, run_id, *parts):
    """``jizhi.<instance>.<run_id>.<part>.<part>...``: the name of one of a run's segments."""
    return ".".join((f"{PREFIX}{instance}", run_id, *parts))


def create(name, nbytes):
    """Create a segment of ``nbytes`` (at least 1), every page allocated; it starts zeroed.

    Fails if the name exists (FileExistsError, even for a symbolic link). Raises ShmFull when
    /dev/shm cannot hold it; the partial segment is removed. ``name`` is a name in /dev/shm or
    an absolute path.
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


def attach(name_or_path, writable=True, size=None):
    """Map an existing segment (a name in /dev/shm, or an absolute path): ``(mmap, identity)``.

    MAP_SHARED, read-write or read-only; a symbolic link is refused. With ``size``, the segment
    must hold at least that many bytes (else ValueError naming it and both sizes) and that many
    are mapped; without, all of it. ``identity`` is the mapped file's (device, inode), for ``verify``.
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


def identity(name):
    """(device, inode) of a segment, or None once it is unlinked."""
    try:
        st = os.stat(SHM_DIR / name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def verify(name, ident):
    """True while ``name`` is still the segment whose ``identity`` was ``ident`` (the one mapped):
    False once it was unlinked or replaced (its run ended: the supervisor unlinked it, or a new
    run swept it)."""
    return identity(name) == ident


def unlink(name):
    """Remove a segment; False when it was not there."""
    try:
        os.unlink(SHM_DIR / name)
        return True
    except FileNotFoundError:
        return False


def unlink_prefix(prefix):
    """Remove every segment whose name starts with ``prefix`` (the item tables workers made for a version,
    jizhi/sharedtable.py; a run's leftovers at its stop). Returns how many."""
    n = 0
    for p in SHM_DIR.glob(f"{prefix}*"):
        n += unlink(p.name)
    return n


def remove_instance(instance):
    """The sweep: remove every segment of an instance (stale ones of a crashed run, or ours at stop).
    Returns the names removed."""
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
