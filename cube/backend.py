"""The interface of a remote cube backend: what the levels above it (cube/cache.py) call.

A remote backend answers batch lookups of sorted unique signatures:
``lookup(keys uint64[K]) -> (vectors float32[K, dim], found bool[K])``,
a missing key zeros with found False (pooling then reads its field's default vector,
docs/formats.md). Every round trip costs
latency, so the levels above it (the local disk cache and the shared-memory
hot tier) exist to avoid calling it. The backends: ``SlowLocal``
(cube/remote.py, which also opens a backend from its URL) and ``RedisCube``
(cube/redis.py). This module imports nothing of theirs, so both can build on it.
"""


class Backend:
    """The interface. ``calls`` and ``keys_read`` count round trips and keys asked for."""

    dim = 0

    def __init__(self):
        self.calls = 0
        self.keys_read = 0

    def lookup(self, keys):
        raise NotImplementedError

    def key_count(self):
        """Keys of the whole cube when the backend can list them (``all_keys``), else -1."""
        return -1

    def all_keys(self):
        raise NotImplementedError

    def close(self):
        pass
