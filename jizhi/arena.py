"""Shared-memory arenas: the tensors between stages.

Ownership (DESIGN.md, "Tensors between stages"): only the supervisor creates
and unlinks segments. It creates one arena per column of the compiled plan
(``plan["arenas"]``) before it starts the broker, sized ``slots x
max_candidates x row bytes`` (per-candidate columns) or ``slots x row bytes``
(per-request columns). The broker allocates a slot at admission and frees it
when it answers; stages write into the slot named in the event and never
allocate. Everyone else attaches with ``os.open`` + ``mmap``: nothing here
touches ``multiprocessing.shared_memory`` or its resource tracker, so an
exiting reader never unlinks or "leaks" anything, and a SIGKILLed worker
leaves nothing behind.

tmpfs allocates pages on first touch, so a large arena costs only what
requests actually write.
"""
import mmap
import os
from pathlib import Path

import numpy as np

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
    """Supervisor only: create a segment of ``nbytes`` (fails if it exists)."""
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(int(nbytes), 1))
    finally:
        os.close(fd)


def attach(name, spec, slots, max_candidates):
    """Map an existing segment as an ndarray of the arena's shape (read-write)."""
    shape = arena_shape(spec, slots, max_candidates)
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return np.ndarray(shape, dtype=np.dtype(spec["dtype"]), buffer=mm)


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
        self.cols = {c: attach(segments[c], spec, slots, max_candidates) for c, spec in self.specs.items()}

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
