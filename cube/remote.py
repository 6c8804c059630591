"""Cube backends that are not a local, immutable LMDB file: a slow local one, and each from its URL.

A remote backend (the interface: cube/backend.py) answers batch lookups of
sorted unique signatures, missing keys reading the default vector (zeros).
``RedisCube`` (cube/redis.py) speaks to Redis Cluster; ``SlowLocal`` stands
in for it in tests and benchmarks: a local LMDB cube behind a deliberate
delay per call and per key.

URLs (``open_backend``):

* ``slow+file:///path/to/cube?delay_ms=2&per_key_us=0.5`` -- ``SlowLocal``.
* ``redis://HOST:PORT[,HOST:PORT...]/NAME/VERSION?timeout_ms=50`` -- a cube
  pushed to Redis Cluster (cube/redis.py, ``jizhictl cube push``).
"""
import time
from urllib.parse import parse_qs, urlparse

from jizhi.cube.backend import Backend


class SlowLocal(Backend):
    """A local LMDB cube read through liblmdb, ``delay_ms`` per call plus ``per_key_us`` per key."""

    def __init__(self, path, dim, delay_ms=2.0, per_key_us=0.0):
        super().__init__()
        from jizhi.cube.store import Cube       # (imported here for the reason given in open_backend)
        self.cube = Cube(path, dim, reader="liblmdb")
        self.dim = int(dim)
        self.delay_s = float(delay_ms) / 1000.0
        self.per_key_s = float(per_key_us) / 1e6

    def lookup(self, keys):
        self.calls += 1
        self.keys_read += int(keys.shape[0])
        time.sleep(self.delay_s + self.per_key_s * keys.shape[0])
        return self.cube.lookup(keys)

    def close(self):
        self.cube.close()


def remote_url(template, bundle):
    """A stage's ``remote`` option with ``{cube}`` (the bundle's cube/), ``{name}`` and ``{version}`` filled in."""
    return template.format(cube=bundle.cube_path, name=bundle.name, version=bundle.version)


BACKGROUND_TIMEOUT_MS = 30_000


def open_backend(url, dim, background=False, required=True):
    """A backend from its URL (see the module docstring). Raises ValueError for an unknown scheme.

    ``background``: for the hot-tier builder and the disk-cache manager, whose batches are large
    and wait for no request: a Redis lookup gets ``BACKGROUND_TIMEOUT_MS`` instead of the URL's
    ``timeout_ms`` (a request's budget). ``required = False``: a Redis cube not pushed yet, or credentials
    refused, are logged and its lookups degrade until they are (the disk-cache manager), instead of an error.
    """
    u = urlparse(url)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    if u.scheme == "slow+file":
        return SlowLocal(u.path, dim, delay_ms=float(q.get("delay_ms", 2.0)),
                         per_key_us=float(q.get("per_key_us", 0.0)))
    if u.scheme in ("redis", "rediss"):
        # Imported here, not at the top: the supervisor imports this module for remote_url and never
        # reads a cube, and these modules compile Numba kernels at import (seconds on a cold cache).
        from jizhi.cube.redis import RedisCube
        return RedisCube(url, dim, timeout_ms=BACKGROUND_TIMEOUT_MS if background else None, background=background,
                         required=required)
    raise ValueError(f"unknown cube backend {url!r} (known: slow+file://PATH?delay_ms=..&per_key_us=.., "
                     f"redis[s]://[USER:PASSWORD@]HOST:PORT[,HOST:PORT]/NAME/VERSION)")
