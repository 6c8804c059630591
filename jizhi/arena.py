"""Shared-memory arenas: the tensors between stages.

Ownership (docs/architecture.md, "Shared memory"): only the supervisor creates
and unlinks segments. It creates one arena per column of the compiled plan
(``plan["arenas"]``) before it starts the broker, sized ``slots x
max_candidates x row bytes`` (per-candidate columns) or ``slots x row bytes``
(per-request columns). The broker allocates a slot at admission and frees it
when it answers; stages write into the slot named in the event and never
allocate. Everyone else attaches (``Arenas``). A segment's life (create,
back, attach, verify, unlink, the sweep) is jizhi/shm.py's, as for every
other segment.
"""
import numpy as np

from jizhi import shm


def arena_shape(spec, slots, max_candidates):
    row = tuple(spec["shape"])
    if spec["scope"] == "candidate":
        return (slots, max_candidates) + row
    return (slots,) + row


def arena_bytes(spec, slots, max_candidates):
    return int(np.prod(arena_shape(spec, slots, max_candidates), dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize


def attach(name, spec, slots, max_candidates):
    """Map an existing segment as an ndarray of the arena's shape (read-write): ``(array, identity)``."""
    mm, ident = shm.attach(name)
    shape = arena_shape(spec, slots, max_candidates)
    return np.ndarray(shape, dtype=np.dtype(spec["dtype"]), buffer=mm), ident


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
        return all(shm.verify(n, self.ids[c]) for c, n in self.names.items())

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
