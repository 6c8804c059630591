"""A cube on Redis Cluster (or Valkey): the remote backend, the push and the table layout.

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

Reads
-----
``RedisCube.lookup(keys)`` computes every key's slot (CRC16, Numba), groups a
batch by the master that owns the slot, and sends each master one pipeline of
MGETs (one per slot present, at most 1,024 keys each: for a tagged unit, one
MGET per 1,024 of its keys).
Commands are encoded and replies parsed by Numba kernels straight into the
output rows: no Python object per key. The masters are written to first and
read together (poll), so a batch costs one round trip of the slowest master.

Failures never hang a request: a lookup has a time budget (``timeout_ms``)
that bounds everything it does, connects and slot-map reloads included (a
connect gets at most a third of it, and masters already connected are
written first). A master that refuses, times out or breaks the protocol is
closed, marked down for ``retry_ms``, and its keys read the default vector
(zeros) and are counted as ``degraded``. A ``MOVED`` reply sends its keys to
the master it names at once; a failure reloads the slot map (at most every
``refresh_ms``, live masters asked first); either way those keys are retried
once within the budget, which is how a replica promoted by a failover takes
over. Keys of a slot in the middle of a reshard's migration (``ASK``,
``TRYAGAIN``) are read one GET each from the slot's owner, following ``ASK``
with ``ASKING`` to the importing node (a rare path, plain Python RESP). Keys
the levels above hold (disk cache, hot tier) are still served while a shard
is down. A cube that was not pushed is an error at
start; a cluster unreachable at start is retried every ``retry_ms`` within a
lookup's budget, lookups degrading meanwhile.

Every ``check_s`` (5 s) one lookup also reads the layout record: a cube gone
from the cluster (flushed, or a cluster restarted without persistence) makes
lookups degrade, counted, instead of reading every key as absent; a new push
of the same bundle is taken up without a restart.

URL: ``redis://HOST:PORT[,HOST:PORT...]/NAME/VERSION?timeout_ms=50&retry_ms=250&refresh_ms=250&check_s=5``.
"""
import json
import logging
import select
import socket
import time
from urllib.parse import parse_qs, urlparse

import numpy as np
from numba import njit

from jizhi.cube.remote import Backend

log = logging.getLogger("jizhi.cube.redis")

SLOTS = 16384
MASK64 = (1 << 64) - 1
MAX_KEYS_PER_LOOKUP = 65_536
# Redis runs one command at a time: a MGET of tens of thousands of keys would hold a shard (and every
# request waiting on it) for tens of milliseconds, so a command carries at most this many keys; the
# commands of a pipeline interleave with other clients'.
MAX_KEYS_PER_COMMAND = 1024
LAYOUT_CHECK_S = 5.0
STRATEGIES = ("key", "table", "model")
FORMAT = 1

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
def _slots(keyb, table, out):
    # Slots of fixed-length keys that carry no hash tag (the whole key is hashed).
    for i in range(keyb.shape[0]):
        c = np.uint32(0)
        for j in range(keyb.shape[1]):
            c = ((c << np.uint32(8)) & np.uint32(0xFFFF)) ^ np.uint32(table[((c >> np.uint32(8)) ^ keyb[i, j]) & 0xFF])
        out[i] = c & np.uint32(SLOTS - 1)


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


# --- RESP: encoding MGET/MSET pipelines and parsing MGET replies (Numba) ----


@njit(cache=True, nogil=True)
def _put_int(out, p, v):
    if v == 0:
        out[p] = 48
        return p + 1
    d = 0
    w = v
    while w > 0:
        w //= 10
        d += 1
    for i in range(d):
        out[p + d - 1 - i] = 48 + v % 10
        v //= 10
    return p + d


@njit(cache=True, nogil=True)
def _put(out, p, src):
    for i in range(src.shape[0]):
        out[p + i] = src[i]
    return p + src.shape[0]


@njit(cache=True, nogil=True)
def _encode(keyb, vals, order, starts, khdr, vhdr, verb, out):
    # One command per group g (keys order[starts[g]:starts[g+1]]): MGET k.. or, with vals, MSET k v ...
    p = 0
    per = 2 if vals.shape[0] else 1
    for g in range(starts.shape[0] - 1):
        n = starts[g + 1] - starts[g]
        out[p] = 42                                # *
        p = _put_int(out, p + 1, per * n + 1)
        out[p] = 13
        out[p + 1] = 10
        p = _put(out, p + 2, verb)                 # $4\r\nMGET\r\n
        for e in range(starts[g], starts[g + 1]):
            k = order[e]
            p = _put(out, p, khdr)
            p = _put(out, p, keyb[k])
            out[p] = 13
            out[p + 1] = 10
            p += 2
            if per == 2:
                p = _put(out, p, vhdr)
                p = _put(out, p, vals[k])
                out[p] = 13
                out[p + 1] = 10
                p += 2
    return p


@njit(cache=True, nogil=True)
def _read_int(buf, p, n):
    neg = False
    if p < n and buf[p] == 45:
        neg = True
        p += 1
    v = 0
    while p < n and buf[p] != 13:
        v = v * 10 + (buf[p] - 48)
        p += 1
    if p + 1 >= n:
        return 0, -1
    return (-v if neg else v), p + 2


@njit(cache=True, nogil=True)
def _parse_mget(buf, n, state, starts, order, rows, found, status, errat):
    # Parses MGET replies from buf[state[0]:n], writing values into rows[key] and status[key]:
    # 1 answered (found or absent), 2 MOVED/ASK, 3 another error or a value of the wrong length.
    # state = [pos, cmd, elem]: where parsing resumes (elem < 0: at the start of command cmd's reply,
    # else at element elem of its array), updated in place. errat[cmd]: where an error reply's line
    # starts (for the caller to read MOVED targets). Returns False on a protocol error.
    rb = rows.shape[1]
    C = starts.shape[0] - 1
    pos, cmd, elem = state[0], state[1], state[2]
    while cmd < C:
        p = pos
        if p >= n:
            break
        k0 = starts[cmd]
        k1 = starts[cmd + 1]
        if elem < 0:
            t = buf[p]
            if t == 42:                             # *m: m bulk strings follow
                m, p = _read_int(buf, p + 1, n)
                if p < 0:
                    break
                if m != k1 - k0:
                    return False
                pos = p
                elem = 0
            elif t == 45 or t == 43:                # -ERR ... (or an unexpected +OK)
                q = p
                while q < n and buf[q] != 13:
                    q += 1
                if q + 1 >= n:
                    break
                redirect = t == 45 and ((buf[p + 1] == 77 and buf[p + 2] == 79) or
                                        (buf[p + 1] == 65 and buf[p + 2] == 83))
                for e in range(k0, k1):
                    status[order[e]] = 2 if redirect else 3
                if t == 45:
                    errat[cmd] = p
                pos = q + 2
                cmd += 1
                continue
            else:
                return False
        while elem < k1 - k0:                       # the array's elements, each whole or not at all
            p = pos
            if p >= n:
                break
            if buf[p] != 36:
                return False
            ln, p = _read_int(buf, p + 1, n)
            if p < 0:
                break
            key = order[k0 + elem]
            if ln >= 0:
                if p + ln + 2 > n:
                    break
                if ln == rb:
                    rows[key, :] = buf[p:p + rb]
                    found[key] = True
                    status[key] = 1
                else:
                    status[key] = 3
                p += ln + 2
            else:
                status[key] = 1
            pos = p
            elem += 1
        if elem < k1 - k0:
            break
        elem = -1
        cmd += 1
    state[0] = pos
    state[1] = cmd
    state[2] = elem
    return True


# --- a small RESP client for everything that is not the batch read ---------


def _encode_command(args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class RedisError(Exception):
    """An error reply (``-ERR ...``)."""


class _Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.deadline = None

    def _recv(self, n):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply within the deadline")
            self.sock.settimeout(left)
        return self.sock.recv(n)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self._recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self._recv(max(65536, n + 2 - len(self.buf)))
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            return RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line[:40]!r}")


def call(host, port, args, timeout_s=2.0, deadline=None):
    """One command on a new connection; its reply (an error reply raises RedisError).

    ``timeout_s`` bounds each socket operation; ``deadline`` (time.monotonic) the whole call.
    """
    if deadline is not None:
        timeout_s = min(timeout_s, deadline - time.monotonic())
        if timeout_s <= 0:
            raise TimeoutError(f"{host}:{port}: no time left")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(_encode_command(args))
        rd = _Reader(s)
        if deadline is not None:
            rd.deadline = deadline
        r = rd.reply()
    if isinstance(r, RedisError):
        raise r
    return r


def pipeline(host, port, commands, timeout_s=10.0, deadline=None):
    """Several commands in one round trip on a new connection; their replies (errors as RedisError values)."""
    if deadline is not None:
        timeout_s = min(timeout_s, deadline - time.monotonic())
        if timeout_s <= 0:
            raise TimeoutError(f"{host}:{port}: no time left")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(b"".join(_encode_command(c) for c in commands))
        rd = _Reader(s)
        rd.deadline = deadline
        return [rd.reply() for _ in commands]


def slot_map(reply, asked="127.0.0.1"):
    """``(slot -> node index int32[16384] (-1: unserved), [(host, port)])`` from a CLUSTER SLOTS reply.

    ``asked``: the host the reply came from (a node that names no endpoint means that host)."""
    owner = np.full(SLOTS, -1, dtype=np.int32)
    nodes = []
    for entry in reply:
        lo, hi, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else master[0]
        addr = (host if host and host != "?" else asked, int(master[1]))
        if addr not in nodes:
            nodes.append(addr)
        owner[lo:hi + 1] = nodes.index(addr)
    return owner, nodes


def parse_url(url):
    """``(seeds [(host, port)], name, version, options)`` of a ``redis://`` cube URL."""
    u = urlparse(url)
    if u.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    seeds = []
    for hp in u.netloc.split(","):
        host, _, port = hp.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: seed {hp!r} is not HOST:PORT")
        seeds.append((host, int(port)))
    parts = [p for p in u.path.split("/") if p]
    name = version = None
    if parts:
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{url!r}: the path must be /NAME/VERSION (a pushed bundle's), got {u.path!r}")
        name, version = parts[0], int(parts[1])
    opts = {k: v[-1] for k, v in parse_qs(u.query).items()}
    return seeds, name, version, opts


def namespace(name, version):
    if any(c in name for c in "{}: \r\n"):
        raise ValueError(f"model name {name!r} cannot name a Redis namespace (no braces, colons or spaces)")
    return f"jz:{name}:{int(version)}"


def layout_key(ns):
    return b"{}" + ns.encode() + b":layout"


class Cluster:
    """The slot map of a cluster, learned from any node that answers (seeds first, then known masters)."""

    def __init__(self, seeds, timeout_s=1.0):
        self.seeds = list(seeds)
        self.timeout_s = timeout_s
        self.owner = np.full(SLOTS, -1, dtype=np.int32)
        self.nodes = []
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
                owner, nodes = slot_map(call(host, port, ["CLUSTER", "SLOTS"], timeout_s or self.timeout_s,
                                             deadline=deadline), asked=host)
            except (OSError, RedisError, ValueError) as e:
                last = e
                continue
            if nodes:
                self.owner, self.nodes = owner, nodes
                self.refreshed = time.monotonic()
                return True
        self.refreshed = time.monotonic()
        log.debug("no node of %s answered CLUSTER SLOTS: %s", self.seeds, last)
        return False

    def command(self, args, timeout_s=None, deadline=None):
        """A single-key or keyless command on any node that answers, following one MOVED redirect."""
        last = None
        for host, port in dict.fromkeys(self.nodes + self.seeds):
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                return call(host, port, args, timeout_s or self.timeout_s, deadline=deadline)
            except RedisError as e:
                if str(e).startswith("MOVED"):
                    h, _, p = str(e).split()[2].rpartition(":")
                    return call(h or host, int(p), args, timeout_s or self.timeout_s, deadline=deadline)
                raise
            except OSError as e:
                last = e
        raise ConnectionError(f"no node of the cluster answers ({', '.join(f'{h}:{p}' for h, p in self.seeds)}): {last}")


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
            _slots(keyb, CRC_TABLE, slots)
        else:
            slots = self.unit_slots[units]
        return keyb, slots


def bundle_tables(bundle):
    """[(name, field id, vocab)] of the tables of a bundle: its fields that do not share another's table.

    ``vocab`` bounds the raw values of a category field (1..vocab); a field
    without one claims no keys by value (its keys join the rest unit).
    """
    import tomllib
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
    return docs


# --- the backend --------------------------------------------------------------


class _Node:
    __slots__ = ("addr", "sock", "down_until", "buf", "out")

    def __init__(self, addr):
        self.addr = addr
        self.sock = None
        self.down_until = 0.0
        self.buf = np.empty(1 << 16, dtype=np.uint8)
        self.out = np.empty(1 << 16, dtype=np.uint8)

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def _idle_ok(sock):
    """False when an idle connection was closed by the server (EOF or an error waiting to be read)."""
    sock.setblocking(False)          # (a socket with a timeout would wait for readability first)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False                 # EOF, or bytes nobody asked for: never read them as a reply
    except BlockingIOError:
        return True
    except OSError:
        return False


def _grown(arr, n):
    return arr if arr.shape[0] >= n else np.empty(max(n, 2 * arr.shape[0]), dtype=np.uint8)


def command_starts(s, per_command=MAX_KEYS_PER_COMMAND):
    """Boundaries of the MGETs of keys sorted by slot ``s``: a new command at every slot change
    and every ``per_command`` keys within a slot. int64 [C + 1]."""
    n = s.shape[0]
    first = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1)).astype(np.int64)
    run = np.repeat(first, np.diff(np.concatenate((first, [n]))))          # each key's slot-run start
    rank = np.arange(n, dtype=np.int64) - run
    cuts = np.flatnonzero(rank % per_command == 0)
    return np.concatenate((cuts, [n])).astype(np.int64)


class RedisCube(Backend):
    """The cube of one pushed bundle, read from Redis Cluster (see the module docstring)."""

    def __init__(self, url, dim=None, timeout_ms=None, retry_ms=None, refresh_ms=None, background=False):
        """``background``: a hot-tier builder's or disk-cache manager's reader: big batches go in
        pieces of 8,192 keys with a 5 ms pause between them, so they never crowd out requests."""
        super().__init__()
        self.piece = 8192 if background else MAX_KEYS_PER_LOOKUP
        self.pause_s = 0.005 if background else 0.0
        seeds, name, version, opts = parse_url(url)
        if name is None:
            raise ValueError(f"{url!r}: name the pushed bundle: redis://HOST:PORT/NAME/VERSION")
        self.url = url
        self.ns = namespace(name, version)
        self.timeout_s = float(timeout_ms if timeout_ms is not None else opts.get("timeout_ms", 50)) / 1000
        self.retry_s = float(retry_ms if retry_ms is not None else opts.get("retry_ms", 250)) / 1000
        self.refresh_s = float(refresh_ms if refresh_ms is not None else opts.get("refresh_ms", 250)) / 1000
        # how often a lookup checks that the layout record is still there (and the same push)
        self.check_s = float(opts.get("check_s", LAYOUT_CHECK_S))
        self.cluster = Cluster(seeds, timeout_s=max(self.timeout_s, 0.2))
        self.expect_dim = int(dim) if dim else None
        self.dim = self.expect_dim or 0
        self.layout = None
        self.nodes = {}
        self.round_trips = 0        # pipelines sent to a master
        self.degraded = 0           # keys no master answered (read the default vector)
        self.refreshes = 0
        self.errors = {}            # kind -> count
        self.cpu_ns = 0             # this thread's CPU time in lookup()
        self._next_try = 0.0
        self._next_check = 0.0
        self._said_absent = False
        self._ensure_layout(initial=True)

    # -- set-up --

    def _ensure_layout(self, initial=False):
        """Load the layout record once. At start (``initial``) a cube that is not pushed, or pushed
        with another dim, raises; later (a cluster that was down at start), attempts are spaced by
        ``retry_ms`` and bounded by one lookup budget, and failures only log and degrade."""
        now = time.monotonic()
        if self.layout is not None:
            if now >= self._next_check:
                self._check_layout(now)
            return self.layout is not None
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        deadline = None if initial else now + self.timeout_s
        try:
            self.cluster.refresh(timeout_s=self.cluster.timeout_s, deadline=deadline)
            raw = self.cluster.command(["GET", layout_key(self.ns)], deadline=deadline)
        except (OSError, RedisError) as e:
            (log.warning if initial else log.debug)(
                "cube %s: cluster %s unreachable (%s); lookups read the default vector until it answers",
                self.ns, self.url, e)
            self._count("unreachable")
            return False
        try:
            if raw is None:
                raise LookupError(f"cube {self.ns} is not in the cluster at {self.url}: run jizhictl cube push first")
            layout = Layout(json.loads(raw))
            if self.expect_dim and layout.dim != self.expect_dim:
                raise ValueError(f"cube {self.ns} in the cluster has dim {layout.dim}, the bundle {self.expect_dim}")
        except (LookupError, ValueError) as e:
            if initial:
                raise
            if not self._said_absent:
                log.error("%s; lookups read the default vector", e)
                self._said_absent = True
            self._count("no layout")
            return False
        if self._said_absent:
            log.info("cube %s is in the cluster again", self.ns)
            self._said_absent = False
        self.layout = layout
        self.dim = layout.dim
        self._next_check = time.monotonic() + self.check_s
        log.info("cube %s: %s layout on %d masters (%s)", self.ns, layout.strategy, len(self.cluster.nodes),
                 self.url)
        return True

    def _check_layout(self, now):
        """Every ``check_s``: the layout record still there and the same push? A cluster flushed or
        restarted without persistence has lost the cube: its keys would read as absent, silently.
        Then lookups degrade (counted) until the cube is pushed again; a new push is taken up."""
        self._next_check = now + self.check_s
        try:
            raw = self.cluster.command(["GET", layout_key(self.ns)], deadline=now + self.timeout_s)
        except (OSError, RedisError):
            return                            # unreachable: the lookups' own failures say so
        if raw is None:
            log.error("cube %s is gone from the cluster at %s (flushed, or restarted without persistence): "
                      "lookups read the default vector until it is pushed again", self.ns, self.url)
            self._count("cube gone")
            self.layout = None
            self._said_absent = True
            return
        doc = json.loads(raw)
        if doc.get("pushed_at") != self.layout.doc.get("pushed_at"):
            try:
                layout = Layout(doc)
            except (ValueError, KeyError) as e:
                log.error("cube %s: a new layout record is unreadable (%s); keeping the old one", self.ns, e)
                return
            if not self.expect_dim or layout.dim == self.expect_dim:
                log.info("cube %s: pushed again (%s layout); reading it", self.ns, layout.strategy)
                self.layout = layout

    def _count(self, kind, n=1):
        self.errors[kind] = self.errors.get(kind, 0) + n

    def _node(self, i):
        addr = self.cluster.nodes[i]
        node = self.nodes.get(addr)
        if node is None:
            node = self.nodes[addr] = _Node(addr)
        return node

    def _fail(self, node, kind):
        node.close()
        node.down_until = time.monotonic() + self.retry_s
        self._count(kind)
        log.warning("cube %s: master %s:%d %s; its keys read the default vector for %.0f ms",
                    self.ns, node.addr[0], node.addr[1], kind, 1000 * self.retry_s)

    # -- reads --

    def lookup(self, keys):
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        deadline = time.monotonic() + self.timeout_s
        if keys.shape[0] <= self.piece:
            return self._lookup(keys, deadline)
        # a big batch (hot-tier build, disk cache fill): in bounded pieces, within one budget
        parts = []
        for i in range(0, keys.shape[0], self.piece):
            if i and self.pause_s:
                time.sleep(self.pause_s)
            parts.append(self._lookup(keys[i:i + self.piece], deadline))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _lookup(self, keys, deadline):
        t0 = time.thread_time_ns()
        k = keys.shape[0]
        self.calls += 1
        self.keys_read += k
        dim = self.dim or self.expect_dim or 1
        out = np.zeros((k, dim), dtype=np.float32)
        found = np.zeros(k, dtype=bool)
        if k == 0:
            return out, found
        if not self._ensure_layout():
            self.degraded += k
            return out, found
        if not self.cluster.nodes and time.monotonic() - self.cluster.refreshed >= self.refresh_s:
            self.cluster.refresh(timeout_s=self.cluster.timeout_s, deadline=deadline)
        keyb, slots = self.layout.keys_and_slots(keys)
        status = np.zeros(k, dtype=np.uint8)
        rows = out.view(np.uint8).reshape(k, dim * 4)
        todo = np.arange(k, dtype=np.int64)
        for attempt in range(2):
            moved_to, migrating = self._round(keyb, slots, todo, rows, found, status, deadline)
            if migrating is not None and time.monotonic() < deadline:
                self._read_migrating(keyb, slots, migrating, rows, found, status, deadline)
            todo = todo[status[todo] != 1]
            if not todo.shape[0]:
                break
            now = time.monotonic()
            if attempt or now >= deadline:
                break
            before = self.cluster.owner[slots[todo]].copy()
            if moved_to:
                # MOVED names the slot's new master: follow it at once (a map reload may be older)
                for slot, addr in moved_to.items():
                    if addr not in self.cluster.nodes:
                        self.cluster.nodes.append(addr)
                    self.cluster.owner[slot] = self.cluster.nodes.index(addr)
            elif now - self.cluster.refreshed >= self.refresh_s:
                self.refreshes += 1
                down = {a for a, n in self.nodes.items() if n.down_until > now}
                self.cluster.refresh(timeout_s=self.cluster.timeout_s, deadline=deadline, avoid=down)
            if not np.any(self.cluster.owner[slots[todo]] != before):
                break                       # nowhere else to ask: these keys degrade
            status[todo] = 0
        self.degraded += int(todo.shape[0])
        self.cpu_ns += time.thread_time_ns() - t0
        return out, found

    def _round(self, keyb, slots, todo, rows, found, status, deadline):
        """One pipeline per master of the keys ``todo``. Returns ({slot: (host, port)} of MOVED replies,
        the keys answered ASK or TRYAGAIN or None)."""
        owner = self.cluster.owner[slots[todo]]
        status[todo[owner < 0]] = 3
        order = np.lexsort((slots[todo], owner))
        todo, owner = todo[order], owner[order]
        cut = np.flatnonzero(np.diff(owner)) + 1
        groups = []
        now = time.monotonic()
        for idx in np.split(np.arange(todo.shape[0]), cut):
            if not idx.shape[0] or owner[idx[0]] < 0:
                continue
            node = self._node(int(owner[idx[0]]))
            if now < node.down_until:
                status[todo[idx]] = 3
                continue
            groups.append((node, todo[idx]))
        # masters with an open connection first: a connect to a dead host must not delay the others
        groups.sort(key=lambda g: g[0].sock is None)
        pending = []
        moved_to, migrating = {}, []
        try:
            for node, keys_of in groups:
                starts = command_starts(slots[keys_of])
                if not self._send(node, keyb, keys_of, starts, deadline):
                    status[keys_of] = 3
                    continue
                cap = keys_of.shape[0] * (rows.shape[1] + 24) + (starts.shape[0] - 1) * 160 + 64
                node.buf = _grown(node.buf, cap)
                errat = np.full(starts.shape[0] - 1, -1, dtype=np.int64)
                # node, order, starts, filled, parse state [pos, cmd, elem], error line of each command
                pending.append([node, keys_of, starts, 0, np.array([0, 0, -1], np.int64), errat])
                self.round_trips += 1
            poller = select.poll()
            by_fd = {}
            for p in pending:
                by_fd[p[0].sock.fileno()] = p
                poller.register(p[0].sock, select.POLLIN)
            while by_fd:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for fd, _ in poller.poll(max(1, int(left * 1000))):
                    p = by_fd[fd]
                    node, order, starts = p[0], p[1], p[2]
                    if p[3] >= node.buf.shape[0]:
                        got, why = -1, "overran its reply"
                    else:
                        try:
                            got, why = node.sock.recv_into(memoryview(node.buf)[p[3]:]), "closed the connection"
                        except OSError as e:
                            got, why = 0, f"failed ({e.__class__.__name__}: {e})"
                    if got <= 0:
                        poller.unregister(fd)
                        del by_fd[fd]
                        self._fail(node, why)
                        continue
                    p[3] += got
                    if not _parse_mget(node.buf, p[3], p[4], starts, order, rows, found, status, p[5]):
                        poller.unregister(fd)
                        del by_fd[fd]
                        self._fail(node, "broke the protocol")
                        continue
                    if p[4][1] == starts.shape[0] - 1:
                        poller.unregister(fd)
                        del by_fd[fd]
                        self._redirects(node, p[5], moved_to, order, starts, migrating)
            for p in by_fd.values():         # no whole answer within the budget: its stream is unusable now
                self._fail(p[0], f"did not answer within {1000 * self.timeout_s:.0f} ms")
                by_fd = {}
        except BaseException:
            for p in pending:                # replies still in flight must never be read as a later lookup's
                if p[4][1] < p[2].shape[0] - 1:
                    p[0].close()
            raise
        return moved_to, (np.concatenate(migrating) if migrating else None)

    def _redirects(self, node, errat, moved_to, order, starts, migrating):
        """Reads a node's error replies: MOVED -> ``moved_to`` {slot: (host, port)}; ASK and TRYAGAIN
        (a slot being migrated) -> the keys of that command into ``migrating``; every kind counted."""
        for c in np.flatnonzero(errat >= 0):
            pos = errat[c]
            end = pos
            while end < node.buf.shape[0] and node.buf[end] != 13:
                end += 1
            line = node.buf[pos + 1:end].tobytes().decode("ascii", "replace").split()
            kind = line[0] if line else "error reply"
            if len(line) == 3 and kind == "MOVED":
                host, _, port = line[2].rpartition(":")
                moved_to[int(line[1])] = (host or node.addr[0], int(port))
            elif kind in ("ASK", "TRYAGAIN"):
                migrating.append(order[starts[c]:starts[c + 1]])
            self._count(kind)

    def _read_migrating(self, keyb, slots, keys, rows, found, status, deadline):
        """Keys of slots in the middle of a migration, one GET each to the slot's owner and, for the keys
        it answers ASK, ``ASKING`` + GET to the node it names (Redis Cluster's rule). A rare path (a
        reshard in progress): plain RESP, a connection per node, bounded by ``deadline``."""
        owner = self.cluster.owner[slots[keys]]
        by_node = {}
        for k, i in zip(keys, owner):
            if i >= 0:
                by_node.setdefault(self.cluster.nodes[i], []).append(k)
        asks = {}
        for addr, ks in by_node.items():
            try:
                replies = pipeline(addr[0], addr[1], [["GET", bytes(keyb[k])] for k in ks], deadline=deadline)
            except (OSError, RedisError):
                continue
            for k, r in zip(ks, replies):
                if isinstance(r, RedisError):
                    parts = str(r).split()
                    if parts[0] == "ASK" and len(parts) == 3:
                        host, _, port = parts[2].rpartition(":")
                        asks.setdefault((host or addr[0], int(port)), []).append(k)
                else:
                    self._store_value(k, r, rows, found, status)
        for addr, ks in asks.items():
            cmds = []
            for k in ks:
                cmds += [["ASKING"], ["GET", bytes(keyb[k])]]
            try:
                replies = pipeline(addr[0], addr[1], cmds, deadline=deadline)
            except (OSError, RedisError):
                continue
            for k, r in zip(ks, replies[1::2]):
                if not isinstance(r, RedisError):
                    self._store_value(k, r, rows, found, status)

    @staticmethod
    def _store_value(k, value, rows, found, status):
        if value is None:
            status[k] = 1
        elif len(value) == rows.shape[1]:
            rows[k] = np.frombuffer(value, dtype=np.uint8)
            found[k] = True
            status[k] = 1

    def _send(self, node, keyb, order, starts, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if node.sock is not None and not _idle_ok(node.sock):
                node.close()                 # the server closed it while idle (restart, timeout): reconnect
            if node.sock is None:
                # at most a third of the budget for a connect: a blackholed host must leave time for the rest
                node.sock = socket.create_connection(node.addr, timeout=max(0.001, min(left, self.timeout_s / 3)))
                node.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            node.sock.settimeout(max(0.001, deadline - time.monotonic()))
            kl = keyb.shape[1]
            khdr = np.frombuffer(b"$%d\r\n" % kl, dtype=np.uint8)
            cap = order.shape[0] * (khdr.shape[0] + kl + 2) + (starts.shape[0] - 1) * 32
            node.out = _grown(node.out, cap)
            n = _encode(keyb, np.empty((0, 0), np.uint8), order, starts, khdr, khdr[:0], _MGET, node.out)
            node.sock.sendall(memoryview(node.out)[:n])
            return True
        except OSError as e:
            self._fail(node, f"refused or failed ({e.__class__.__name__}: {e})")
            return False

    def key_count(self):
        """Keys of the pushed cube (its layout record), or -1 when the layout is not loaded."""
        return int(self.layout.doc["keys"]) if self._ensure_layout() else -1

    def all_keys(self, count=10_000):
        """Every signature of the pushed cube, sorted: SCAN of each master for the namespace's keys.

        For a background process (the hot-tier builder of a cube that fits its budget); a master
        that does not answer leaves its keys out (they are then read through the levels below).
        """
        if not self._ensure_layout():
            return np.zeros(0, dtype=np.uint64)
        tagged = self.layout.strategy != "key"
        pattern = (b"{" if tagged else b"{}") + self.ns.encode() + b":*"
        klen = self.layout.key_len
        found = []
        for host, port in list(self.cluster.nodes):
            cursor = b"0"
            try:
                while True:
                    cursor, batch = call(host, port, ["SCAN", cursor, "MATCH", pattern, "COUNT", count],
                                         timeout_s=10.0)
                    raw = b"".join(k[-8:] for k in batch if len(k) == klen)
                    if raw:
                        found.append(np.frombuffer(raw, dtype="<u8"))
                    if cursor in (b"0", 0, "0"):
                        break
            except (OSError, RedisError) as e:
                log.warning("cube %s: listing %s:%d failed (%s); its keys stay out of the hot tier", self.ns,
                            host, port, e)
        keys = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype="<u8")
        return keys.astype(np.uint64)

    def stats(self):
        return {"calls": self.calls, "keys": self.keys_read, "round_trips": self.round_trips,
                "degraded": self.degraded, "refreshes": self.refreshes, "errors": dict(self.errors),
                "cpu_us_per_call": round(self.cpu_ns / 1000 / self.calls, 1) if self.calls else None}

    def close(self):
        for node in self.nodes.values():
            node.close()


_MGET = np.frombuffer(b"$4\r\nMGET\r\n", dtype=np.uint8)
_MSET = np.frombuffer(b"$4\r\nMSET\r\n", dtype=np.uint8)


def _compile():
    """Compile the kernels at import (from Numba's on-disk cache when present), not inside a lookup's budget."""
    keyb = np.zeros((1, 10), dtype=np.uint8)
    slots = np.zeros(1, dtype=np.int32)
    _slots(keyb, CRC_TABLE, slots)
    cls = np.zeros(1, dtype=np.int32)
    _classify(np.zeros(1, np.uint64), np.uint64(0), np.zeros(1, np.uint64), np.ones(1, np.uint64),
              np.zeros(1, np.int32), np.int32(1), cls)
    order, starts = np.zeros(1, np.int64), np.array([0, 1], np.int64)
    buf = np.empty(256, dtype=np.uint8)
    khdr = np.frombuffer(b"$10\r\n", dtype=np.uint8)
    _encode(keyb, np.empty((0, 0), np.uint8), order, starts, khdr, khdr[:0], _MGET, buf)
    _encode(keyb, np.zeros((1, 4), np.uint8), order, starts, khdr, khdr, _MSET, buf)
    reply = np.frombuffer(b"*1\r\n$4\r\nabcd\r\n", dtype=np.uint8).copy()
    _parse_mget(reply, reply.shape[0], np.array([0, 0, -1], np.int64), starts, order, np.zeros((1, 4), np.uint8),
                np.zeros(1, bool), np.zeros(1, np.uint8), np.full(1, -1, np.int64))


_compile()


# --- push ----------------------------------------------------------------------


def _read_cube(bundle):
    """(keys, vectors) of a bundle's whole cube, through this process's environment if it has one open
    (LMDB refuses a second environment of one file in a process)."""
    import lmdb
    from jizhi.cube.build import read_all
    try:
        return read_all(bundle.cube_path)
    except lmdb.Error:
        from jizhi.cube.hot import cube_keys
        from jizhi.cube.store import open_cube
        cube = open_cube(bundle.cube_path, bundle.dim)
        keys = np.sort(cube_keys(cube))
        return keys, cube.lookup(keys)[0]


def push(bundles, url, strategy="key", progress=None, chunk_keys=20_000, per_command=1000):
    """Load the cubes of ``bundles`` (jizhi.bundle.Bundle) into the cluster at ``url``.

    Pipelined MSETs per master (one per slot group of at most
    ``per_command`` keys), the layout record of each bundle written last, so
    a reader never sees the layout of a cube not fully there. ``progress(done,
    total)`` is called after every chunk. Returns the layout documents.
    """
    seeds, _, _, _ = parse_url(url)
    cluster = Cluster(seeds, timeout_s=5.0)
    if not cluster.refresh():
        raise ConnectionError(f"no node of {url} answers CLUSTER SLOTS (is the cluster up?)")
    if np.any(cluster.owner < 0):
        raise RuntimeError(f"the cluster at {url} does not serve every slot ({int(np.sum(cluster.owner < 0))} unassigned)")
    loaded = [(b, *_read_cube(b)) for b in bundles]
    docs = plan_layout([(b, k) for b, k, _ in loaded], strategy, cluster.nodes, cluster.owner)
    total = sum(int(k.shape[0]) for _, k, _ in loaded)
    done = 0
    for (b, keys, vectors), doc in zip(loaded, docs):
        layout = Layout(doc)
        if layout.dim != vectors.shape[1]:
            raise ValueError(f"{b.cube_path}: vectors have dim {vectors.shape[1]}, the manifest says {layout.dim}")
        vals = np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8).reshape(keys.shape[0], -1)
        vhdr = np.frombuffer(b"$%d\r\n" % vals.shape[1], dtype=np.uint8)
        for lo in range(0, keys.shape[0], chunk_keys):
            part = np.arange(lo, min(lo + chunk_keys, keys.shape[0]))
            keyb, slots = layout.keys_and_slots(keys[part])
            owner = cluster.owner[slots]
            order = np.lexsort((slots, owner))
            for m in np.unique(owner):
                sel = order[owner[order] == m]
                starts = command_starts(slots[sel], per_command)
                kl = keyb.shape[1]
                buf = np.empty(sel.shape[0] * (kl + vals.shape[1] + 24) + starts.shape[0] * 32, dtype=np.uint8)
                n = _encode(keyb, vals[part], sel, starts, np.frombuffer(b"$%d\r\n" % kl, dtype=np.uint8),
                            vhdr, _MSET, buf)
                host, port = cluster.nodes[int(m)]
                with socket.create_connection((host, port), timeout=30) as sk:
                    sk.sendall(memoryview(buf)[:n])
                    rd = _Reader(sk)
                    for _ in range(starts.shape[0] - 1):
                        r = rd.reply()
                        if isinstance(r, RedisError):
                            raise RuntimeError(f"{host}:{port} refused a write of {b.name} {b.version}: {r}")
            done += part.shape[0]
            if progress:
                progress(done, total)
        cluster.command(["SET", layout_key(doc["namespace"]), json.dumps(doc)], timeout_s=5.0)
    return docs


def read_layout(url, name, version):
    """The layout document of a pushed bundle, or None."""
    seeds, _, _, _ = parse_url(url)
    cluster = Cluster(seeds, timeout_s=2.0)
    cluster.refresh()
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
