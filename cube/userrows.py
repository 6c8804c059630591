"""User rows on Redis Cluster: a user's features kept online, read in front of the profile snapshot.

A team's real-time user features usually live in a key-value store it
already runs. A pipeline whose ``data_reader`` stage names one
(``user_rows = "redis://HOST:PORT[,...]/NAME"``) reads, for each batch, the
rows of its users from it, over the profile snapshot's: one pipelined read per
batch through the Redis cube's client (cube/redis.py: one pipeline of MGETs
per master, a time budget that bounds everything, a master that fails marked
down, a failover followed), so the same bounded-failure rules hold: a user
whose master does not answer within ``timeout_ms`` reads the snapshot's row,
counted as degraded, never a hang. A bounded local cache (``cache_users``
users, each kept ``ttl_ms``) spares Redis the users of the last second.

Keys and values (docs/formats.md, "User rows on Redis", for writers in other
languages): the row of user ``U`` is at ``{}jzu:<NAME>:`` followed by ``U``
as 8 little-endian bytes (the whole key is hashed: users spread over every
master); its value is, little-endian and packed, ``dense`` float32[D], then
``lens`` int32[F], then ``values`` int64[F, L]: the D dense features, and for
each of the F user fields of the layout record (in its order) the number of
raw values and the raw values, padded with zeros to L. The layout record
(JSON at ``{}jzu:<NAME>:layout``, written last by ``jizhictl profiles push``)
names D, L and the fields (name, kind, max_len). A model version reads a
namespace whose fields and dense count match its own (context fields apart);
any other is refused once, logged, and its users read the snapshot.

A row replaces the user's whole snapshot row (dense features and every
field); ``feedback`` is merged over it as over a snapshot row; a request's own
``features`` replace it in turn. ``jizhictl profiles push`` writes every user
of a snapshot; ``jizhictl profiles set`` (``write_user``) changes one user's
features, seen by the next request once the local cache's ``ttl_ms`` passed (both in
jizhi/tools/profilepush.py).
"""
import itertools
import logging
import time

import numpy as np

from jizhi.cube.cluster import split_url
from jizhi.cube.layout import FORMAT
from jizhi.cube.redis import RedisCube

log = logging.getLogger("jizhi.cube.userrows")

DEFAULT_TTL_MS = 1000
DEFAULT_CACHE_USERS = 100_000


def user_namespace(name):
    if not name or any(c in name for c in "{}: \r\n/"):
        raise ValueError(f"user-row namespace {name!r}: a name without braces, colons, slashes or spaces")
    return f"jzu:{name}"


def parse_rows_url(url):
    """``(url, name, options)`` of a user-row URL ``redis://HOST:PORT[,...]/NAME[?...]``."""
    _, parts, opts = split_url(url)
    if len(parts) != 1:
        raise ValueError(f"{url!r}: a user-row URL names its namespace: redis://HOST:PORT/NAME")
    user_namespace(parts[0])
    return url, parts[0], opts


class Schema:
    """The row layout: D dense features, then F fields' lengths and values (padded to L)."""

    def __init__(self, fields, dense, user_len):
        self.fields = [dict(name=f["name"], kind=f["kind"], max_len=int(f["max_len"])) for f in fields]
        self.dense = int(dense)
        self.user_len = int(user_len)
        F, L, D = len(self.fields), self.user_len, self.dense
        self.row_bytes = 4 * D + 4 * F + 8 * F * L

    @classmethod
    def of_bundle(cls, bundle):
        """The layout a model version's own user fields make (context fields apart: no profile holds them)."""
        fields = [f for f in bundle.user_fields if not f.context]
        schema = cls([dict(name=f.name, kind=f.kind, max_len=f.max_len) for f in fields], bundle.dense_features,
                     max([f.max_len for f in fields] or [1]))
        # where its fields are among the bundle's user fields (the columns of Profiles.user_features)
        schema.bundle_columns = [c for c, f in enumerate(bundle.user_fields) if not f.context]
        return schema

    def doc(self):
        return {"fields": self.fields, "dense": self.dense, "user_len": self.user_len}

    def encode(self, dense, lens, values):
        """Row bytes uint8[U, row_bytes] of ``dense`` f32[U, D], ``lens`` i32[U, F], ``values`` i64[U, F, L]."""
        U = dense.shape[0]
        out = np.empty((U, self.row_bytes), dtype=np.uint8)
        d, f = 4 * self.dense, 4 * len(self.fields)
        out[:, :d] = np.ascontiguousarray(dense, dtype="<f4").view(np.uint8).reshape(U, d)
        out[:, d:d + f] = np.ascontiguousarray(lens, dtype="<i4").view(np.uint8).reshape(U, f)
        out[:, d + f:] = np.ascontiguousarray(values, dtype="<i8").view(np.uint8).reshape(U, -1)
        return out

    def decode(self, raw):
        """(dense f32[U, D], lens i32[U, F], values i64[U, F, L]) of row bytes uint8[U, row_bytes]."""
        U = raw.shape[0]
        d, f = 4 * self.dense, 4 * len(self.fields)
        dense = np.ascontiguousarray(raw[:, :d]).view("<f4")
        lens = np.ascontiguousarray(raw[:, d:d + f]).view("<i4")
        values = np.ascontiguousarray(raw[:, d + f:]).view("<i8").reshape(U, len(self.fields), self.user_len)
        return dense, lens, values

    def mismatch(self, other):
        """Why rows of ``other`` cannot stand for this layout's (None when they can)."""
        if other.dense != self.dense:
            return f"{other.dense} dense features, the model takes {self.dense}"
        theirs = {f["name"]: f for f in other.fields}
        for f in self.fields:
            o = theirs.get(f["name"])
            if o is None:
                return f"no field {f['name']!r}"
            if (o["kind"], o["max_len"]) != (f["kind"], f["max_len"]):
                return (f"field {f['name']!r} is {o['kind']} max_len {o['max_len']}, the model's "
                        f"{f['kind']} max_len {f['max_len']}")
        return None


def layout_doc(name, schema, users, snapshot=None):
    """The layout record of a namespace of user rows: the Redis cube's layout (cube/layout.py: strategy
    ``key``, the value as ``dim`` float32 words) and the row schema."""
    ns = user_namespace(name)
    return {"format": FORMAT, "kind": "user_rows", "name": name, "namespace": ns, "dim": schema.row_bytes // 4,
            "hash_seed": 0, "strategy": "key", "keys": int(users), "tables": [], "rest_unit": 0,
            "units": [{"name": "*", "keys": int(users), "prefix": (b"{}" + ns.encode() + b":").hex(), "slot": -1,
                       "node": None}],
            "rows": schema.doc(), "snapshot": snapshot, "pushed_at": time.time()}


class UserRows:
    """A worker's reader of one namespace of user rows (the module docstring), for one model version."""

    def __init__(self, url, bundle):
        url, self.name, opts = parse_rows_url(url)
        self.schema = Schema.of_bundle(bundle)
        self.ttl_s = float(opts.get("ttl_ms", DEFAULT_TTL_MS)) / 1000
        self.cache_users = int(opts.get("cache_users", DEFAULT_CACHE_USERS))
        self.cube = RedisCube(url, ns=user_namespace(self.name), required=False)
        self.cache = {}              # user -> (expires, row bytes or None: not in Redis)
        self.pushed = None           # the layout record whose rows we read (its fields checked)
        self.usable = False
        self.read_users = 0          # users whose row came from Redis (or the cache)
        self.cache_hits = 0
        self.degraded = 0            # users whose row no master answered: they read the snapshot's
        self.refused = 0             # users of a batch read while the namespace's layout is refused

    def _check(self):
        layout = self.cube.layout
        if layout is None:
            self.pushed, self.usable = None, False
            return False
        if layout.doc is not self.pushed:
            self.pushed = layout.doc
            rows = layout.doc.get("rows") or {}
            try:
                theirs = Schema(rows.get("fields", []), rows.get("dense", -1), rows.get("user_len", 0))
                why = self.schema.mismatch(theirs)
            except (KeyError, TypeError, ValueError) as e:
                why = f"an unreadable layout record ({e})"
            if why is None and layout.dim * 4 != theirs.row_bytes:
                why = "its value length does not match its fields"
            self.usable = why is None
            if why is not None:
                log.error("user rows %s: cannot stand for this model's user rows (%s); its users read the "
                          "profile snapshot", self.cube.url, why)
            else:
                # the same layout: rows are read as they come (no conversion)
                self.theirs = self.schema if theirs.doc() == self.schema.doc() else theirs
                index = {f["name"]: i for i, f in enumerate(self.theirs.fields)}
                self.columns = np.array([index[f["name"]] for f in self.schema.fields], dtype=np.int64)
                log.info("user rows %s: %d users pushed (snapshot %s)", self.cube.url, layout.doc.get("keys", 0),
                         layout.doc.get("snapshot"))
        return self.usable

    def read(self, users):
        """``(found bool[U], dense f32[U, D], lens i32[U, F], values i64[U, F, L])`` of ``users`` uint64[U]
        in this model's layout (its non-context user fields); a user not found reads zeros."""
        users = np.asarray(users, dtype=np.uint64)
        U = users.shape[0]
        raw = np.zeros((U, self.schema.row_bytes), dtype=np.uint8)
        found = np.zeros(U, dtype=bool)
        now = time.monotonic()
        ask = []
        for i, u in enumerate(users.tolist()):      # the batch's users: a few per batch, never its candidates
            hit = self.cache.get(u)
            if hit is not None and hit[0] > now:
                self.cache_hits += 1
                if hit[1] is not None:
                    raw[i], found[i] = hit[1], True
            else:
                ask.append(i)
        if ask:
            want = np.unique(users[ask])
            before = self.cube.degraded
            vec, got = self.cube.lookup(want)
            lost = self.cube.degraded - before
            if self.cube.layout is None or not self._check():
                self.refused += len(ask) if self.cube.layout is not None else 0
                self.degraded += len(ask) if self.cube.layout is None else 0
            else:
                theirs = vec.view(np.uint8)
                if theirs.shape[1] != self.theirs.row_bytes:
                    theirs = theirs[:, :self.theirs.row_bytes]
                mine = self._convert(theirs) if self.theirs is not self.schema else theirs
                pos = np.searchsorted(want, users[ask])
                raw[ask], found[ask] = mine[pos], got[pos]
                self.degraded += lost and int(np.sum(~got[pos]))    # (the absent ones of a failed batch too)
                if not lost:                                       # nothing failed: absences are real
                    over = len(self.cache) + want.shape[0] - self.cache_users
                    if over > 0:                                   # the oldest entries go (insertion order)
                        for k in list(itertools.islice(self.cache, over)):
                            del self.cache[k]
                    exp = now + self.ttl_s
                    for j, u in enumerate(want.tolist()):
                        self.cache[u] = (exp, mine[j].copy() if got[j] else None)
        self.read_users += int(found.sum())
        dense, lens, values = self.schema.decode(raw)
        return found, dense, lens, values

    def _convert(self, theirs):
        """Rows of the pushed layout -> this model's (its fields by name; the same kinds and lengths)."""
        d, l, v = self.theirs.decode(theirs)
        L = self.schema.user_len
        values = np.zeros((theirs.shape[0], len(self.schema.fields), L), dtype=np.int64)
        n = min(L, self.theirs.user_len)
        values[:, :, :n] = v[:, self.columns, :n]
        return self.schema.encode(d, l[:, self.columns], values)

    def stats(self):
        return {"users": self.read_users, "cache_hits": self.cache_hits, "degraded": self.degraded,
                "refused": self.refused, **{f"redis_{k}": v for k, v in self.cube.stats().items()}}

    def close(self):
        self.cube.close()
