"""A cube's layout on Redis Cluster: its keys, its values and the layout record a push writes.

Keys and values
---------------
A pushed cube lives in the cluster under the namespace ``jz:<name>:<version>``
of its bundle. A value is the signature's vector, float32[dim] little-endian
(``dim * 4`` bytes, as in the LMDB cube). A key is a fixed-length byte string:
a prefix, then the signature's 8 little-endian bytes. Where a key lives is
the table-mapping strategy, recorded by ``jizhictl cube push`` in the layout
record (JSON at ``{}jz:<name>:<version>:layout``):

* ``key`` (key-hashed): prefix ``{}jz:<name>:<version>:``; Redis hashes the
  whole key (the empty ``{}`` disables hash tags), so every table is spread
  over every shard. A batch touches every master: one round trip each.
* ``table`` (table-wise, capacity-balanced): each table is a *unit* placed
  whole on one master, tables bin-packed by size (largest first onto the
  least loaded master), through a hash tag ``{jz:<name>:<version>:<unit>:<k>}``
  whose slot that master owns. A batch touches the masters holding the
  tables it reads; all of a table's keys share a slot, so it is one MGET.
* ``model`` (model-specific): the tables read by one model (one bundle) are
  one unit, kept together on one master (several bundles pushed together are
  bin-packed). A model's batch is one MGET to one master.

Which table a signature belongs to is computed from the signature itself:
signatures are ``splitmix64(seed ^ field_id * K1 ^ value * K2)`` (cube/
signature.py), an invertible function, so inverting it for a table's field id
gives the raw value, and a value in ``1..vocab`` names the table. Keys no
bounded table claims (entity ids, which may be any int64) form the ``rest``
unit. This needs no per-key index and works in every process (the
cube_accessor, the disk-cache manager, the push).

``describe`` and ``read_layout`` serve ``jizhictl cube layout``.
"""
import json
import time
import tomllib

import numpy as np
from numba import njit

from jizhi.cube.cluster import CRC_TABLE, SLOTS, Cluster, crc16, key_slots
from jizhi.cube.connect import Access

MASK64 = (1 << 64) - 1
STRATEGIES = ("key", "table", "model")
FORMAT = 1


def namespace(name, version):
    if any(c in name for c in "{}: \r\n"):
        raise ValueError(f"model name {name!r} cannot name a Redis namespace (no braces, colons or spaces)")
    return f"jz:{name}:{int(version)}"


def layout_key(ns):
    return b"{}" + ns.encode() + b":layout"


# --- which table a signature belongs to --------------------------------------

_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_K1 = 0x9E3779B97F4A7C15
_K2 = 0xC2B2AE3D27D4EB4F
_M1_INV = np.uint64(pow(_M1, -1, 1 << 64))
_M2_INV = np.uint64(pow(_M2, -1, 1 << 64))
_K2_INV = np.uint64(pow(_K2, -1, 1 << 64))


@njit(cache=True, nogil=True)
def _unmix(x):
    # The inverse of cube/signature.py's _mix (splitmix64's finaliser).
    x ^= (x >> np.uint64(31)) ^ (x >> np.uint64(62))
    x *= _M2_INV
    x ^= (x >> np.uint64(27)) ^ (x >> np.uint64(54))
    x *= _M1_INV
    x ^= (x >> np.uint64(30)) ^ (x >> np.uint64(60))
    return x


@njit(cache=True, nogil=True)
def _classify(keys, seed, fk, vocab, unit_of, rest, out):
    # out[i]: the unit of the first table t whose raw value (inverted signature) lies in 1..vocab[t].
    for i in range(keys.shape[0]):
        u = _unmix(keys[i]) ^ seed
        out[i] = rest
        for t in range(fk.shape[0]):
            v = (u ^ fk[t]) * _K2_INV
            if v >= np.uint64(1) and v <= vocab[t]:
                out[i] = unit_of[t]
                break


def table_of(keys, tables, seed):
    """Index into ``tables`` [(name, field id, vocab)] of each key's table; ``len(tables)`` for none."""
    out = np.empty(keys.shape[0], dtype=np.int32)
    _classify(np.ascontiguousarray(keys, dtype=np.uint64), np.uint64(int(seed) & MASK64),
              np.array([(int(fid) * _K1) % (1 << 64) for _, fid, _ in tables], dtype=np.uint64),
              np.array([int(v) for _, _, v in tables], dtype=np.uint64),
              np.arange(len(tables), dtype=np.int32), np.int32(len(tables)), out)
    return out


# --- the layout: units, their tags and slots ---------------------------------


class Layout:
    """A pushed cube's layout record: strategy, tables -> units, each unit's key prefix and slot."""

    def __init__(self, doc):
        if doc.get("format") != FORMAT:
            raise ValueError(f"layout format {doc.get('format')!r} is not {FORMAT} (pushed by another jizhi?)")
        self.doc = doc
        self.strategy = doc["strategy"]
        self.dim = int(doc["dim"])
        self.seed = int(doc["hash_seed"])
        self.tables = [(t["name"], int(t["id"]), int(t["vocab"])) for t in doc["tables"]]
        self.unit_of_table = np.array([t["unit"] for t in doc["tables"]], dtype=np.int32)
        self.rest_unit = int(doc["rest_unit"])
        self.units = doc["units"]
        self.prefixes = np.array([np.frombuffer(bytes.fromhex(u["prefix"]), dtype=np.uint8) for u in self.units])
        self.unit_slots = np.array([u["slot"] for u in self.units], dtype=np.int32)
        self.key_len = self.prefixes.shape[1] + 8
        self._fk = np.array([(fid * _K1) % (1 << 64) for _, fid, _ in self.tables], dtype=np.uint64)
        # sentinel keys (a push's, one per slot bucket or unit): present while the cube is (absent: lost)
        sent = doc.get("sentinels") or []
        self.sentinel_keyb = np.array([np.frombuffer(bytes.fromhex(x["key"]), dtype=np.uint8) for x in sent],
                                      dtype=np.uint8).reshape(len(sent), self.key_len)
        self.sentinel_slots = np.array([x["slot"] for x in sent], dtype=np.int32)
        self._vocab = np.array([v for _, _, v in self.tables], dtype=np.uint64)

    def units_of(self, keys):
        if self.strategy == "key":
            return np.zeros(keys.shape[0], dtype=np.int32)
        out = np.empty(keys.shape[0], dtype=np.int32)
        _classify(keys, np.uint64(self.seed & MASK64), self._fk, self._vocab, self.unit_of_table,
                  np.int32(self.rest_unit), out)
        return out

    def keys_and_slots(self, keys):
        """``(key bytes uint8[K, key_len], slots int32[K])`` of signatures ``keys``."""
        keys = np.ascontiguousarray(keys, dtype="<u8")
        units = self.units_of(keys)
        keyb = np.empty((keys.shape[0], self.key_len), dtype=np.uint8)
        keyb[:, :-8] = self.prefixes[units]
        keyb[:, -8:] = keys.view(np.uint8).reshape(-1, 8)
        if self.strategy == "key":
            slots = np.empty(keys.shape[0], dtype=np.int32)
            key_slots(keyb, CRC_TABLE, slots)
        else:
            slots = self.unit_slots[units]
        return keyb, slots


def bundle_tables(bundle):
    """[(name, field id, vocab)] of the tables of a bundle: its fields that do not share another's table.

    ``vocab`` bounds the raw values of a category field (1..vocab); a field
    without one claims no keys by value (its keys join the rest unit).
    """
    with open(bundle.path / "manifest.toml", "rb") as f:
        fields = tomllib.load(f).get("fields", [])
    return [(f["name"], int(f["id"]), int(f.get("vocab", 0))) for f in fields if not f.get("shares")]


def plan_layout(bundles_keys, strategy, masters, owner):
    """Layout documents of several bundles pushed together.

    ``bundles_keys``: [(bundle, keys)]; ``masters``: [(host, port)];
    ``owner``: slot -> master index. Units are bin-packed by bytes onto the
    masters (largest first, onto the least loaded); each unit's tag is
    chosen so that its slot is owned by its master.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown table-mapping strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    docs, units = [], []      # units: (bytes, doc index, unit index)
    for b, keys in bundles_keys:
        ns = namespace(b.name, b.version)
        tables = bundle_tables(b)
        t_of = table_of(keys, tables, b.hash_seed)
        counts = np.bincount(t_of, minlength=len(tables) + 1)
        tdocs = [{"name": n, "id": fid, "vocab": v, "keys": int(counts[i])} for i, (n, fid, v) in enumerate(tables)]
        rest_keys = int(counts[len(tables)])
        # the rest: keys no bounded table claims; name it after the tables that claimed none (entity ids)
        rest_name = "+".join(t["name"] for t in tdocs if t["keys"] == 0) or "rest"
        if strategy == "key":
            unit_docs = [{"name": "*", "keys": int(keys.shape[0])}]
            for t in tdocs:
                t["unit"] = 0
            rest = 0
        elif strategy == "table":
            unit_docs = [{"name": t["name"], "keys": t["keys"]} for t in tdocs if t["keys"]]
            index = {u["name"]: i for i, u in enumerate(unit_docs)}
            rest = len(unit_docs)
            unit_docs.append({"name": rest_name, "keys": rest_keys})
            for t in tdocs:
                t["unit"] = index.get(t["name"], rest)
        else:
            unit_docs = [{"name": b.name, "keys": int(keys.shape[0])}]
            for t in tdocs:
                t["unit"] = 0
            rest = 0
        if rest_keys:
            for t in tdocs:
                if t["keys"] == 0:
                    t["keys"] = rest_keys        # the rest unit is this table's (or these tables')
        doc = {"format": FORMAT, "name": b.name, "version": int(b.version), "namespace": ns, "dim": int(b.dim),
               "hash_seed": int(b.hash_seed), "strategy": strategy, "keys": int(keys.shape[0]),
               "tables": tdocs, "rest_unit": rest, "units": unit_docs, "pushed_at": time.time()}
        docs.append(doc)
        for i, u in enumerate(unit_docs):
            u["bytes"] = int(u["keys"]) * (int(b.dim) * 4 + 40)
            units.append((u["bytes"], len(docs) - 1, i))
    load = [0] * len(masters)
    for nbytes, d, i in sorted(units, key=lambda x: -x[0]):
        u = docs[d]["units"][i]
        ns = docs[d]["namespace"]
        if strategy == "key":
            u["prefix"] = (b"{}" + ns.encode() + b":").hex()
            u["slot"] = -1
            u["node"] = None
            continue
        m = min(range(len(masters)), key=lambda j: load[j])
        load[m] += nbytes
        width = max(3, len(str(len(docs[d]["units"]))))     # one key length for all units of a bundle
        for k in range(1_000_000):
            tag = f"{ns}:{i:0{width}d}:{k:06d}".encode()
            slot = crc16(tag) % SLOTS
            if owner[slot] == m:
                break
        else:
            raise RuntimeError(f"no slot owned by {masters[m]} found for unit {u['name']}")
        u["prefix"] = (b"{" + tag + b"}").hex()
        u["slot"] = int(slot)
        u["node"] = f"{masters[m][0]}:{masters[m][1]}"
    for doc in docs:
        doc["sentinels"] = sentinels(doc)
    return docs


SENTINEL_BUCKETS = 64       # strategy key: one sentinel per 256 slots, so that every master owns some


def sentinels(doc):
    """The sentinel keys of a layout: [{"key": hex, "slot": slot}]. Each is written by the push beside the
    cube's keys and read with every batch from each master the batch touches (cube/redis.py): a master
    that answers without it has lost the cube (flushed, restarted empty), so the keys it reads as absent
    are counted degraded in that very batch. Strategy ``key``: an 8-byte suffix after the namespace's
    prefix searched for each of SENTINEL_BUCKETS slot ranges; tagged strategies: each unit's prefix and
    eight 0xFF bytes (its slot is the unit's)."""
    out = []
    if doc["strategy"] == "key":
        prefix = bytes.fromhex(doc["units"][0]["prefix"])
        width = SLOTS // SENTINEL_BUCKETS
        for b in range(SENTINEL_BUCKETS):
            for k in range(1, 1_000_000):
                key = prefix + (0xFFFF_FFFF_0000_0000 + b * 1_000_000 + k).to_bytes(8, "little")
                slot = crc16(key) % SLOTS
                if slot // width == b:
                    out.append({"key": key.hex(), "slot": slot})
                    break
        return out
    for u in doc["units"]:
        out.append({"key": (bytes.fromhex(u["prefix"]) + b"\xff" * 8).hex(), "slot": int(u["slot"])})
    return out


# --- jizhictl cube layout ------------------------------------------------------


def read_layout(url, name, version):
    """The layout document of a pushed bundle, or None."""
    cluster = Cluster(None, timeout_s=2.0, access=Access(url))
    if not cluster.refresh() and cluster.last_error is not None:
        raise ConnectionError(f"no node of {cluster.access.redacted()} answers CLUSTER SLOTS: {cluster.last_error}")
    raw = cluster.command(["GET", layout_key(namespace(name, version))])
    return (json.loads(raw), cluster) if raw is not None else (None, cluster)


def describe(doc, cluster):
    """Lines for ``jizhictl cube layout``: each table's unit, slot and master, and round trips per batch."""
    lines = [f"cube {doc['namespace']} ({doc['keys']} keys, dim {doc['dim']}): strategy {doc['strategy']}, "
             f"{len(cluster.nodes)} masters"]
    units = doc["units"]
    masters = [f"{h}:{p}" for h, p in cluster.nodes]
    if doc["strategy"] == "key":
        lines.append("  every table is spread over every master (the whole key is hashed)")
        for t in doc["tables"]:
            lines.append(f"  {t['name']:<14} {t['keys']:>10} keys  on all {len(masters)} masters")
        lines.append(f"  round trips per lookup batch: {len(masters)} (one pipeline to each master, in parallel)")
        return lines
    holders = set()
    for t in doc["tables"]:
        u = units[t["unit"]]
        now = masters[cluster.owner[u["slot"]]] if cluster.owner[u["slot"]] >= 0 else "unserved"
        holders.add(now)
        lines.append(f"  {t['name']:<14} {t['keys']:>10} keys  unit {u['name']:<10} slot {u['slot']:>5}  "
                     f"on {now}" + (f" (pushed to {u['node']})" if u["node"] != now else ""))
    for m in masters:
        nbytes = sum(u["bytes"] for u in units if cluster.owner[u["slot"]] >= 0 and masters[cluster.owner[u["slot"]]] == m)
        lines.append(f"  master {m}: {nbytes / 2**20:.1f} MiB of this cube")
    lines.append(f"  round trips per lookup batch: at most {len(holders)} (one pipeline to each master holding "
                 f"a table the batch reads, in parallel; one MGET per table)")
    return lines


# Compile at import (from Numba's on-disk cache when present), not inside a lookup's budget.
_classify(np.zeros(1, np.uint64), np.uint64(0), np.zeros(1, np.uint64), np.ones(1, np.uint64),
          np.zeros(1, np.int32), np.int32(1), np.zeros(1, dtype=np.int32))
