"""Control state: the small facts the supervisor publishes for the other processes.

Rarely written values every worker reads at batch boundaries (today: each shedding pipeline's
mode, quota and policy generation, jizhi/shedding.py), never on the per-item hot path. They go
through shared-memory-dict under the rules below, because the library used as it comes tears a
read that races a write (it rewrites one segment in place, with no lock by default), pickles,
prefixes every name with ``sm_`` (out of reach of our sweep) and attaches through
``multiprocessing.shared_memory``, whose resource tracker unlinks the segment when any attaching
process exits (on Python 3.11, every attach registers):

* **one writer** (``Writer``, in the supervisor) per state, named by a base segment
  ``jizhi.<instance>.<run_id>.<what>`` (e.g. ``....<pipeline>.shed``);
* **each change is a new, immutable dict** in a new segment ``<base>.g<generation>``: its name
  carries the instance, the run id and the generation, and the dict holds ``generation`` too.
  It is written whole (a shared-memory-dict with the JSON serializer: never pickle) before any
  reader is told of it, and never written again;
* **the generation is published in a one-word array**: the base segment is one uint64, stored
  after the dict is complete (one aligned 8-byte store: a reader sees the old or the new value,
  never a mixture). 0 means nothing was published yet;
* **readers** (``Reader``, any process) load that word at each batch (0.1 µs) and only
  when it changed attach the new dict, decode it once and drop the mapping. A dict the writer
  replaced meanwhile is gone (FileNotFoundError): the word has moved on, and the reader follows it;
* **no resource tracker anywhere**: the segments are created, mapped and unlinked by jizhi/shm.py
  (O_NOFOLLOW, 0600, backed at creation); the library only serializes into and out of them;
* **old dicts are unlinked** as soon as the next generation is published (a reader that still maps
  one keeps its pages: unlinking a mapped file is safe on Linux). The live dict is unlinked by
  ``Writer.close``, or, for a writer never closed, when its process exits; the supervisor unlinks
  the base at stop, and the sweep (``shm.remove_instance``) removes all of them after a crash.

The segments and the measurements that chose these rules: docs/architecture.md, "Shared memory".
Measured there: the per-batch check 0.10 µs (the former float64 words: 1.2 µs); a change 150 µs
in the writer and 95 µs, once, in each reader.
"""
import atexit
import os

from shared_memory_dict import SharedMemoryDict
from shared_memory_dict.serializers import JSONSerializer

from jizhi import shm

WORD_BYTES = 8
_JSON = JSONSerializer()
_ATTEMPTS = 100         # a reader chasing a writer that publishes faster than it can attach
_live = {}              # dict segment -> pid of the writer that made it and has not replaced it yet


def dict_name(base, generation):
    """The segment of generation ``generation``'s dict: ``<base>.g<generation>``."""
    return f"{base}.g{generation}"


class _Block:
    """A mapping made by jizhi/shm.py and its one view ``buf`` (of items ``fmt``), closed together
    (``close``: the view is released first, or the mapping could not close). What shared-memory-dict
    reads and writes (bytes), and a state's generation word (``"Q"``)."""

    def __init__(self, mm, fmt="B"):
        self.mm = mm
        self.buf = memoryview(mm).cast(fmt)

    def close(self):
        if self.mm is not None:
            self.buf.release()
            self.mm.close()
            self.mm = None


class _SegmentDict(SharedMemoryDict):
    """A shared-memory-dict over a segment this process mapped (not one it creates or attaches by its
    own ``sm_`` name through ``multiprocessing.shared_memory``), serialized as JSON."""

    def __init__(self, block):
        self._block = block
        super().__init__(name="", size=len(block.buf), serializer=_JSON)

    def _get_or_create_memory_block(self, name, size):
        return self._block


class Writer:
    """The one writer of a control state (the supervisor). ``publish(values)`` makes a change."""

    def __init__(self, base, create=True):
        if create:
            shm.create(base, WORD_BYTES)
        self.base = base
        self.block = _Block(shm.attach(base, size=WORD_BYTES)[0], "Q")
        self.word = self.block.buf
        self.generation = self.word[0]
        self.values = None

    def publish(self, values):
        """Write ``values`` (a dict of JSON values, str keys) as the next generation; returns it.

        Raises ShmFull (naming the bytes) when /dev/shm has no room for the dict; nothing changes then.
        """
        generation = self.generation + 1
        doc = dict(values, generation=generation)
        name = dict_name(self.base, generation)
        shm.create(name, len(_JSON.dumps(doc)))    # (a value JSON cannot hold raises before anything is made)
        try:
            mm, _ = shm.attach(name)
            d = _SegmentDict(_Block(mm))
            d.update(doc)
            d.cleanup()
        except BaseException:
            shm.unlink(name)
            raise
        _live[name] = os.getpid()
        self.word[0] = generation       # the publication: the dict is complete before this store
        if self.generation:
            _unlink(dict_name(self.base, self.generation))
        self.generation, self.values = generation, doc
        return generation

    def read(self):
        """What readers see once they look: the values last published (with ``generation``), or None."""
        return self.values

    def close(self):
        """Unlink the live dict and drop the mapping (the base is its creator's to unlink)."""
        if self.generation:
            _unlink(dict_name(self.base, self.generation))
        self.block.close()


class Reader:
    """A reader of a control state (any process). ``read()`` at each batch boundary."""

    def __init__(self, base):
        self.base = base
        self.block = _Block(shm.attach(base, writable=False, size=WORD_BYTES)[0], "Q")
        self.word = self.block.buf
        self.generation = 0
        self.values = None

    def read(self):
        """The values of the latest generation published (with ``generation``), or None before the
        first. The same dict object until the next change: callers must not change it."""
        generation = self.word[0]
        if generation != self.generation:
            self._follow(generation)
        return self.values

    def _follow(self, generation):
        for _ in range(_ATTEMPTS):
            try:
                mm, _ = shm.attach(dict_name(self.base, generation), writable=False)
            except FileNotFoundError:
                newer = self.word[0]
                if newer == generation:
                    return          # its writer closed: keep what we have
                generation = newer  # replaced meanwhile: the word names the next one already
                continue
            d = _SegmentDict(_Block(mm))
            try:
                values = dict(d.items())
            finally:
                d.cleanup()
            if values.get("generation") != generation:
                raise ValueError(f"control state {dict_name(self.base, generation)} holds generation "
                                 f"{values.get('generation')}")
            self.generation, self.values = generation, values
            return

    def close(self):
        self.block.close()


def _unlink(name):
    _live.pop(name, None)
    shm.unlink(name)


@atexit.register
def _unlink_live():
    """A writer's live dicts go with its process (a forked child that exits unlinks nothing)."""
    me = os.getpid()
    for name, pid in list(_live.items()):
        if pid == me:
            _unlink(name)
