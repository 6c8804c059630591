"""Tables derived from a version's items, built once and mapped by every worker of the version.

The item rows of a ``cube_accessor`` (``item_rows``) and the item table of a
``model_inference`` stage (``item_cache``) are functions of the version and
its item profiles only: every worker of the version would compute the same
bytes (98 MiB per worker on the demo; 1 GiB per worker on a catalogue of
1,000,000 items). So the first worker that needs one builds it into a
shared-memory segment and every other maps it read-only:

* name: ``<items prefix>.<stage>.i<inode>`` (``jizhi.<instance>.<run>.<pipeline>.v<version>.items``, given
  to the workers by the supervisor; the inode of the item profiles' ``ids.npy``, shared by the hard links
  of a snapshot whose items were carried over, so such a snapshot reuses the table);
* layout: a 4 KiB header (magic, a "complete" word, the arrays' shapes and dtypes), then each array,
  64-byte aligned;
* who builds: whoever holds ``flock(LOCK_EX)`` on the segment and finds it incomplete. A worker that
  cannot take the lock waits for it (at setup), or looks again at its next batch boundary (a new profile
  snapshot's tables, built a step per boundary: jizhi/profilestore.py). A builder that dies releases its
  lock with its last file descriptor, and the next worker to take it builds again from the start; readers
  never hold the lock once they mapped a complete table;
* who removes: a worker that switched to a newer snapshot's table unlinks the old name (workers still on
  it keep their mappings until they switch: Linux frees the pages with the last mapping); the supervisor
  unlinks every name under the version's prefix when it unloads the version, and the run's whole prefix
  at stop; the next start's sweep takes anything a crash left.

A segment that cannot be created (/dev/shm full) or read gives a private table, built in the worker as
before, with one log line. Workers are the only processes besides the supervisor and the hot-tier builder
that create segments, and only these (jizhi/shm.py).
"""
import fcntl
import logging
import os

import numpy as np

from jizhi import shm
from jizhi.errors import ShmFull

log = logging.getLogger("jizhi.worker")

MAGIC = 0x4A5A_4954_4142_4C45      # "JZITABLE"
HEADER = 4096
ALIGN = 64
READY, BUILD, BUSY = "ready", "build", "busy"
WAITING = "waiting"     # what ``building`` yields for a step that only waited (jizhi/profilestore.py steps another)


def table_name(prefix, stage, items_root):
    """The segment name of ``stage`` 's table of the items at ``items_root`` (a Profiles' items directory),
    or None without a prefix (a validation child, a tool: private tables)."""
    if not prefix:
        return None
    try:
        ino = os.stat(os.path.join(items_root, "ids.npy")).st_ino
    except OSError:
        return None
    return f"{prefix}.{stage}.i{ino}"


def _layout(specs):
    offsets, off = [], HEADER
    for shape, dtype in specs:
        offsets.append(off)
        off += int(np.prod(shape)) * np.dtype(dtype).itemsize
        off = (off + ALIGN - 1) // ALIGN * ALIGN
    return offsets, max(off, HEADER + ALIGN)


def _signature(specs):
    """The header's description of the arrays: uint64 words (count, then ndim, dims..., dtype code)."""
    words = [len(specs)]
    for shape, dtype in specs:
        words += [len(shape), *[int(d) for d in shape], np.dtype(dtype).num]
    return np.array(words, dtype=np.uint64)


class SharedTable:
    """Arrays of ``specs`` [(shape, dtype)] in the segment ``name`` (the module docstring)."""

    def __init__(self, name, specs):
        self.name, self.specs = name, [(tuple(int(d) for d in s), np.dtype(t)) for s, t in specs]
        self.offsets, self.nbytes = _layout(self.specs)
        self.sig = _signature(self.specs)
        self.fd = None
        self.mm = None
        self.arrays = None

    def acquire(self, wait):
        """READY (``arrays`` mapped read-only, complete), BUILD (this process holds the lock: fill ``arrays``,
        then ``publish``) or BUSY (another process builds it; only when not ``wait``). Raises ShmFull or
        OSError when the segment cannot be made or opened, ValueError when it holds other arrays."""
        if self.fd is None:
            try:
                shm.create(self.name, self.nbytes)
            except FileExistsError:
                pass
            self.fd = os.open(shm.SHM_DIR / self.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            if os.fstat(self.fd).st_size != self.nbytes:
                self.close()
                raise ValueError(f"segment {self.name} has another size than its tables need")
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    return BUSY
                fcntl.flock(self.fd, fcntl.LOCK_SH)         # until the builder is done, or dead
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                continue
            head = np.frombuffer(os.pread(self.fd, 16 + 8 * self.sig.shape[0], 0), dtype=np.uint64)
            if head[0] == MAGIC and head[1] == 1:
                if not np.array_equal(head[2:], self.sig):
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    self.close()
                    raise ValueError(f"segment {self.name} holds other tables")
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self._map(writable=False)
                self.close_fd()
                return READY
            self._map(writable=True)                         # ours to build (first, or its builder died)
            return BUILD

    def _map(self, writable):
        self.mm, _ = shm.attach(self.name, writable=writable, size=self.nbytes)   # (the lock stays on self.fd)
        self.arrays = []
        for (shape, dtype), off in zip(self.specs, self.offsets):
            a = np.frombuffer(self.mm, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)
            self.arrays.append(a)

    def publish(self):
        """The arrays are filled: mark the segment complete, release the lock, keep reading them."""
        head = np.zeros(2 + self.sig.shape[0], dtype=np.uint64)
        head[0], head[1], head[2:] = MAGIC, 1, self.sig
        self.mm.flush()
        os.pwrite(self.fd, head.tobytes(), 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.close_fd()
        for a in self.arrays:
            a.flags.writeable = False

    def close_fd(self):
        if self.fd is not None:
            os.close(self.fd)           # (a lock still held goes with it)
            self.fd = None

    def close(self):
        self.close_fd()
        self.arrays = None


def building(name, specs, fill, wait):
    """The steps of getting the arrays of ``specs``: mapped from segment ``name`` when another worker built
    them, else built by ``fill(arrays)`` (a generator of steps) into it, or into private arrays without a
    name or when the segment cannot be had. A generator; returns ``(arrays, how)``, ``how`` one of
    "attached", "built", "private". ``wait``: block while another worker builds (setup), instead of
    yielding a step at a time until it is done (a batch boundary)."""
    table = None
    if name is not None:
        table = SharedTable(name, specs)
        try:
            while True:
                state = table.acquire(wait)
                if state == READY:
                    return table.arrays, "attached"
                if state == BUILD:
                    break
                _waiting.add(name)
                yield WAITING                               # another worker builds it: look again later
        except (ShmFull, OSError, ValueError) as e:
            log.warning("item tables: no shared copy (%s); this worker builds its own", e)
            table.close()
            table = None
        finally:
            _waiting.discard(name)
    if table is None:
        arrays = [np.empty(shape, dtype=dtype) for shape, dtype in specs]
        yield from fill(arrays)
        return arrays, "private"
    try:
        yield from fill(table.arrays)
    except BaseException:
        table.close()                 # unlocked: the next worker that needs it builds it
        raise
    table.publish()
    return table.arrays, "built"


_waiting = set()       # names this process waits for another worker to build


def waiting():
    """True while this process only waits for another worker's build (an idle worker then looks again every
    few tens of milliseconds instead of spinning: workers/run.py)."""
    return bool(_waiting)


def build_now(name, specs, fill):
    """``building`` to the end, waiting for another builder: ``(arrays, how)``."""
    steps = building(name, specs, fill, wait=True)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def how(table):
    """How a worker got a table (``table.how``, ``build_s``), for its log line."""
    if table.how == "attached":
        return "mapped from the version's shared copy"
    where = "into the version's shared copy" if table.how == "built" else "(this worker's own copy)"
    return f"built in {table.build_s:.2f} s {where}"


def unlink(name):
    """Remove a table's name (the workers that map it keep it until they let it go)."""
    if name is not None:
        shm.unlink(name)
