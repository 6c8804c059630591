"""Redis Cluster as the cube's reader and push see it: key slots, the slot map, the cube URL.

A key's slot is CRC16 (XMODEM) of the key, or of its hash tag (the part
between the first ``{`` and the next ``}``, when not empty), modulo 16,384;
``key_slots`` computes the slots of a batch of fixed-length keys in one
Numba kernel (compiled at import); a CLUSTER SLOTS reply is read by
cube/connect.py's ``slot_map`` and ``replica_map`` (Numba-free: the
supervisor reads one too). ``Cluster`` holds which master owns each
slot, learned with CLUSTER SLOTS from any node that answers, and sends the
few single commands (GET, SET of a layout record) to one that does.
"""
import logging
import time

import numpy as np
from numba import njit

from jizhi.cube.connect import SLOTS, Access, AuthError, is_auth_error, replica_map, slot_map  # noqa: F401
from jizhi.cube.resp import RedisError, call

# (one logger for every module of the Redis backend: its lines keep the name they always had)
log = logging.getLogger("jizhi.cube.redis")



# --- CRC16 (XMODEM), Redis Cluster's key hash ------------------------------


def _crc_table():
    t = np.zeros(256, dtype=np.uint16)
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else (c << 1)
        t[i] = c & 0xFFFF
    return t


CRC_TABLE = _crc_table()


def crc16(data):
    c = 0
    for b in data:
        c = ((c << 8) & 0xFFFF) ^ int(CRC_TABLE[((c >> 8) ^ b) & 0xFF])
    return c


def keyslot(key):
    """Redis Cluster's slot of ``key`` (bytes), hash tags included."""
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    return crc16(key) % SLOTS


@njit(cache=True, nogil=True)
def key_slots(keyb, table, out):
    # Slots of fixed-length keys that carry no hash tag (the whole key is hashed).
    for i in range(keyb.shape[0]):
        c = np.uint32(0)
        for j in range(keyb.shape[1]):
            c = ((c << np.uint32(8)) & np.uint32(0xFFFF)) ^ np.uint32(table[((c >> np.uint32(8)) ^ keyb[i, j]) & 0xFF])
        out[i] = c & np.uint32(SLOTS - 1)


def split_url(url):
    """``(seeds [(host, port)], path parts, options)`` of a ``redis://`` or ``rediss://`` URL (cube/connect.py)."""
    a = Access(url)
    return a.seeds, a.parts, a.opts


def parse_url(url):
    """``(seeds [(host, port)], name, version, options)`` of a ``redis://`` cube URL."""
    a = Access(url)
    name = version = None
    if a.parts:
        if len(a.parts) != 2 or not a.parts[1].isdigit():
            raise ValueError(f"{a.redacted()!r}: the path must be /NAME/VERSION (a pushed bundle's), got "
                             f"{'/' + '/'.join(a.parts)!r}")
        name, version = a.parts[0], int(a.parts[1])
    return a.seeds, name, version, a.opts


class Cluster:
    """The slot map of a cluster, learned from any node that answers (seeds first, then known masters)."""

    def __init__(self, seeds, timeout_s=1.0, access=None):
        """``access`` (cube/connect.py): how every connection reaches, encrypts and authenticates; with it,
        ``seeds`` may be None (the URL's)."""
        self.access = access
        self.seeds = list(seeds if seeds is not None else access.seeds)
        self.timeout_s = timeout_s
        self.last_error = None      # why the last refresh found no node (an AuthError names the node)
        self.owner = np.full(SLOTS, -1, dtype=np.int32)
        self.nodes = []
        self.replicas = {}          # master (host, port) -> its replicas, as the last slot map said
        self.refreshed = 0.0

    def refresh(self, timeout_s=None, deadline=None, avoid=()):
        """Reload the slot map; True when a node answered.

        Asks the known masters, then the seeds, those in ``avoid`` (marked down) last, each for at
        most ``timeout_s`` and all together until ``deadline`` (time.monotonic) if given.
        """
        last = None
        order = list(dict.fromkeys(self.nodes + self.seeds))
        order = [a for a in order if a not in avoid] + [a for a in order if a in avoid]
        for host, port in order:
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                reply = call(host, port, ["CLUSTER", "SLOTS"], timeout_s or self.timeout_s, deadline=deadline,
                             access=self.access)
                owner, nodes = slot_map(reply, asked=host)
                replicas = replica_map(reply, asked=host)
            except (OSError, RedisError, ValueError) as e:
                last = e if not isinstance(e, RedisError) else RedisError(f"{host}:{port}: {e}")
                continue
            if nodes:
                self.owner, self.nodes, self.replicas = owner, nodes, replicas
                self.refreshed = time.monotonic()
                self.last_error = None
                return True
        self.refreshed = time.monotonic()
        self.last_error = last
        log.debug("no node of %s answered CLUSTER SLOTS: %s", self.seeds, last)
        return False

    def command(self, args, timeout_s=None, deadline=None):
        """A single-key or keyless command on any node that answers, following one MOVED redirect."""
        last = None
        for host, port in dict.fromkeys(self.nodes + self.seeds):
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                return call(host, port, args, timeout_s or self.timeout_s, deadline=deadline, access=self.access)
            except RedisError as e:
                if str(e).startswith("MOVED"):
                    h, _, p = str(e).split()[2].rpartition(":")
                    return call(h or host, int(p), args, timeout_s or self.timeout_s, deadline=deadline,
                                access=self.access)
                if is_auth_error(e):
                    raise AuthError(f"{host}:{port}: {e}") from None
                raise
            except OSError as e:
                last = e
        raise ConnectionError(f"no node of the cluster answers ({', '.join(f'{h}:{p}' for h, p in self.seeds)}): {last}")


# Compile at import (from Numba's on-disk cache when present), not inside a lookup's budget.
key_slots(np.zeros((1, 10), dtype=np.uint8), CRC_TABLE, np.zeros(1, dtype=np.int32))
