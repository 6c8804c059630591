"""``jizhictl cube push``: load bundles' cubes into Redis Cluster, in the layout their strategy plans.

The values go first, pipelined MSETs per master; each bundle's layout record
(cube/layout.py) last, so a reader (cube/redis.py) never sees the layout of a
cube that is not fully there.
"""
import json
import socket

import lmdb
import numpy as np

from jizhi.cube.build import read_all
from jizhi.cube.cluster import Cluster
from jizhi.cube.connect import Access, AuthError, is_auth_error
from jizhi.cube.layout import Layout, layout_key, plan_layout
from jizhi.cube.resp import MSET, Reader, RedisError, command_starts, encode_commands
from jizhi.cube.store import cube_keys, open_cube


def read_cube(bundle):
    """(keys, vectors) of a bundle's whole cube, through this process's environment if it has one open
    (LMDB refuses a second environment of one file in a process)."""
    try:
        return read_all(bundle.cube_path)
    except lmdb.Error:
        cube = open_cube(bundle.cube_path, bundle.dim)
        keys = np.sort(cube_keys(cube))
        return keys, cube.lookup(keys)[0]


def connect_cluster(url):
    """The cluster of ``url`` with its slot map, for a writer: raises ConnectionError naming the URL and why
    no node answered (an AuthError names the node and Redis's message), RuntimeError when slots are unserved."""
    access = Access(url)
    cluster = Cluster(None, timeout_s=5.0, access=access)
    if not cluster.refresh():
        why = cluster.last_error
        if is_auth_error(why):
            raise AuthError(f"{access.redacted()}: credentials refused: {why}")
        raise ConnectionError(f"no node of {access.redacted()} answers CLUSTER SLOTS (is the cluster up?): {why}")
    if np.any(cluster.owner < 0):
        raise RuntimeError(f"the cluster at {access.redacted()} does not serve every slot "
                           f"({int(np.sum(cluster.owner < 0))} unassigned)")
    return cluster


def write_values(cluster, layout, keys, vals, what, per_command=1000):
    """Write ``vals`` uint8[K, B] at the keys of ``keys`` uint64[K] in ``layout``: pipelined MSETs to each
    master (one per slot group of at most ``per_command`` keys); raises RuntimeError naming ``what`` and
    the master when one refuses a write."""
    keyb, slots = layout.keys_and_slots(keys)
    write_keyed(cluster, keyb, slots, vals, what, per_command)


def write_keyed(cluster, keyb, slots, vals, what, per_command=1000):
    """``write_values`` of keys already made: ``keyb`` uint8[K, key_len], their ``slots``."""
    owner = cluster.owner[slots]
    order = np.lexsort((slots, owner))
    vhdr = np.frombuffer(b"$%d\r\n" % vals.shape[1], dtype=np.uint8)
    for m in np.unique(owner):
        sel = order[owner[order] == m]
        starts = command_starts(slots[sel], per_command)
        kl = keyb.shape[1]
        buf = np.empty(sel.shape[0] * (kl + vals.shape[1] + 24) + starts.shape[0] * 32, dtype=np.uint8)
        n = encode_commands(keyb, vals, sel, starts, np.frombuffer(b"$%d\r\n" % kl, dtype=np.uint8), vhdr, MSET,
                            buf)
        host, port = cluster.nodes[int(m)]
        with cluster.access.connect((host, port), 30.0) if cluster.access else \
                socket.create_connection((host, port), timeout=30) as sk:
            sk.sendall(memoryview(buf)[:n])
            rd = Reader(sk)
            for _ in range(starts.shape[0] - 1):
                r = rd.reply()
                if isinstance(r, RedisError):
                    raise RuntimeError(f"{host}:{port} refused a write of {what}: {r}")


def push(bundles, url, strategy="key", progress=None, chunk_keys=20_000, per_command=1000):
    """Load the cubes of ``bundles`` (jizhi.bundle.Bundle) into the cluster at ``url``.

    Pipelined MSETs per master (one per slot group of at most
    ``per_command`` keys), the layout record of each bundle written last, so
    a reader never sees the layout of a cube not fully there. ``progress(done,
    total)`` is called after every chunk. Returns the layout documents.
    """
    cluster = connect_cluster(url)
    loaded = [(b, *read_cube(b)) for b in bundles]
    docs = plan_layout([(b, k) for b, k, _ in loaded], strategy, cluster.nodes, cluster.owner)
    total = sum(int(k.shape[0]) for _, k, _ in loaded)
    done = 0
    for (b, keys, vectors), doc in zip(loaded, docs):
        layout = Layout(doc)
        if layout.dim != vectors.shape[1]:
            raise ValueError(f"{b.cube_path}: vectors have dim {vectors.shape[1]}, the manifest says {layout.dim}")
        vals = np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8).reshape(keys.shape[0], -1)
        for lo in range(0, keys.shape[0], chunk_keys):
            part = np.arange(lo, min(lo + chunk_keys, keys.shape[0]))
            write_values(cluster, layout, keys[part], vals[part], f"{b.name} {b.version}", per_command)
            done += part.shape[0]
            if progress:
                progress(done, total)
        if layout.sentinel_slots.shape[0]:
            write_keyed(cluster, layout.sentinel_keyb, layout.sentinel_slots,
                        np.zeros((layout.sentinel_slots.shape[0], vals.shape[1]), dtype=np.uint8),
                        f"{b.name} {b.version}'s sentinels")
        cluster.command(["SET", layout_key(doc["namespace"]), json.dumps(doc)], timeout_s=5.0)
    return docs
