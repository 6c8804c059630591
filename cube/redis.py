"""A cube on Redis Cluster (or Valkey): the remote backend that reads a pushed cube.

The modules of the Redis backend: cube/resp.py (the wire protocol),
cube/cluster.py (key slots, the slot map, the URL), cube/layout.py (where a
pushed cube's keys live: the layout record), cube/push.py (``jizhictl cube
push``) and this one, ``RedisCube``.

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
closed and marked down for ``retry_ms``, doubled with each failure in a row
(up to 16x): a master frozen through a long ``cluster-node-timeout`` is not
given every batch's budget again. While it is down its replica (the slot
map's, ``READONLY``) answers for its keys; with no replica they read the
default vector (zeros), counted as ``degraded``. After a failure the slot map
is reloaded before the next batch (a third of its budget, live masters
first). A ``MOVED`` reply sends its keys to the master it names at once; a
failure reloads the slot map (at most every ``refresh_ms``); either way those
keys are retried once within the budget, which is how a replica promoted by a
failover takes over. Keys of a slot in the middle of a reshard's migration
(``ASK``, ``TRYAGAIN``) are read one GET each from the slot's owner, following
``ASK`` with ``ASKING`` to the importing node (a rare path, plain Python RESP).
Keys the levels above hold (disk cache, hot tier) are still served while a
shard is down. A cube that was not pushed is an error at start; a cluster
unreachable at start is retried every ``retry_ms`` within a lookup's budget,
lookups degrading meanwhile.

Absent is not always absent: each batch also reads, from every master it
touches, one of the push's sentinel keys (cube/layout.py, ``sentinels``); a
master answering without it lost the cube (flushed, restarted empty), and the
keys it read as absent are counted degraded in that batch. A master whose
``maxmemory-policy`` may evict (``allkeys-*``; read at the layout's load and
each check) is refused at jizhid's start unless the URL says
``evictable=accept``; then each batch that reads absent keys there reads its
evicted-key count, and once it grew, its absent keys are counted degraded.
Every ``check_s`` (5 s) one lookup also reads the layout record: a cube gone
from the cluster makes lookups degrade, counted, until it is pushed again; a
new push of the same bundle is taken up without a restart.

URL: ``redis[s]://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/NAME/VERSION?timeout_ms=50&retry_ms=250&refresh_ms=250&
check_s=5``, with cube/connect.py's options (TLS, AUTH, address mapping) and ``on_auth_error`` (``refuse``, the
default: credentials refused at start are an error naming the node and Redis's message; ``degrade``: serve the
default vectors and retry).
"""
import json
import logging
import select
import time

import numpy as np

from jizhi.cube.backend import Backend
from jizhi.cube.cluster import Cluster, parse_url
from jizhi.cube.connect import Access, AuthError, idle_ok, is_auth_error, pending as tls_pending
from jizhi.cube.lossguard import LossGuard
from jizhi.cube.layout import Layout, layout_key, namespace
from jizhi.cube.resp import (MGET, Reader, RedisError, call, command_starts, encode_command, encode_commands,
                             parse_mget, pipeline)
# docs/run-redis-bench.py pushes through this module

log = logging.getLogger("jizhi.cube.redis")

MAX_KEYS_PER_LOOKUP = 65_536
LAYOUT_CHECK_S = 5.0
MAX_DOWN_FACTOR = 16     # a master failing in a row is skipped up to 16 x retry_ms (4 s by default)


class _Node:
    __slots__ = ("addr", "sock", "down_until", "buf", "out", "fails", "readonly")

    def __init__(self, addr):
        self.addr = addr
        self.sock = None
        self.down_until = 0.0
        self.fails = 0           # failures in a row (its down time doubles with each, up to MAX_DOWN_FACTOR)
        self.readonly = False    # read as a replica (READONLY sent on each new connection)
        self.buf = np.empty(1 << 16, dtype=np.uint8)
        self.out = np.empty(1 << 16, dtype=np.uint8)

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def _grown(arr, n):
    return arr if arr.shape[0] >= n else np.empty(max(n, 2 * arr.shape[0]), dtype=np.uint8)



class RedisCube(LossGuard, Backend):
    """The cube of one pushed bundle, read from Redis Cluster (see the module docstring)."""

    def __init__(self, url, dim=None, timeout_ms=None, retry_ms=None, refresh_ms=None, background=False,
                 ns=None, required=True):
        """``background``: a hot-tier builder's or disk-cache manager's reader: big batches go in
        pieces of 8,192 keys with a 5 ms pause between them, so they never crowd out requests.

        ``ns``: read this namespace's fixed-length values instead of a pushed bundle's (the URL's path is
        then not read: cube/userrows.py); ``required = False``: a namespace not pushed at start is logged
        and read as degraded until it is, instead of an error."""
        super().__init__()
        self.piece = 8192 if background else MAX_KEYS_PER_LOOKUP
        self.pause_s = 0.005 if background else 0.0
        self.required = required
        self.access = Access(url)
        if ns is None:
            _, name, version, opts = parse_url(url)
            if name is None:
                raise ValueError(f"{self.access.redacted()!r}: name the pushed bundle: redis://HOST:PORT/NAME/VERSION")
            ns = namespace(name, version)
        opts = self.access.opts
        self.url = self.access.redacted()        # (for log lines: never the password)
        self.ns = ns
        # a node refusing our credentials at start: "refuse" (an error: the worker does not start) or
        # "degrade" (serve the default vectors, retrying every retry_ms, until they are accepted)
        self.on_auth_error = opts.get("on_auth_error", "refuse")
        if self.on_auth_error not in ("refuse", "degrade"):
            raise ValueError(f"{self.url}: on_auth_error must be refuse or degrade, got {self.on_auth_error!r}")
        self.timeout_s = float(timeout_ms if timeout_ms is not None else opts.get("timeout_ms", 50)) / 1000
        self.retry_s = float(retry_ms if retry_ms is not None else opts.get("retry_ms", 250)) / 1000
        self.refresh_s = float(refresh_ms if refresh_ms is not None else opts.get("refresh_ms", 250)) / 1000
        # how often a lookup checks that the layout record is still there (and the same push)
        self.check_s = float(opts.get("check_s", LAYOUT_CHECK_S))
        self.cluster = Cluster(None, timeout_s=max(self.timeout_s, 0.2), access=self.access)
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
        self._said_auth = False
        self._said_lost = set()
        self._refresh_due = False    # a master failed: reload the slot map before the next batch
        self._evictable = {}         # (host, port) -> its watch (a master whose maxmemory-policy may evict)
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
            if not self.cluster.refresh(timeout_s=self.cluster.timeout_s, deadline=deadline) and \
                    is_auth_error(self.cluster.last_error):
                raise self.cluster.last_error
            raw = self.cluster.command(["GET", layout_key(self.ns)], deadline=deadline)
        except (OSError, RedisError) as e:
            if is_auth_error(e):
                self._count("auth")
                if initial and self.on_auth_error == "refuse" and self.required:
                    raise AuthError(f"cube {self.ns}: the cluster at {self.url} refused our credentials: {e} "
                                    "(fix the URL's user and password, password_file or password_env; "
                                    "on_auth_error=degrade serves degraded and keeps retrying)") from None
                if initial or not self._said_auth:
                    log.error("cube %s: the cluster at %s refused our credentials: %s; lookups read the default "
                              "vector, retrying every %.0f ms", self.ns, self.url, e, 1000 * self.retry_s)
                    self._said_auth = True
                return False
            (log.warning if initial else log.debug)(
                "cube %s: cluster %s unreachable (%s); lookups read the default vector until it answers",
                self.ns, self.url, e)
            self._count("unreachable")
            return False
        if self._said_auth:
            log.info("cube %s: the cluster at %s accepts our credentials again", self.ns, self.url)
            self._said_auth = False
        try:
            if raw is None:
                raise LookupError(f"cube {self.ns} is not in the cluster at {self.url}: run jizhictl cube push first")
            layout = Layout(json.loads(raw))
            if self.expect_dim and layout.dim != self.expect_dim:
                raise ValueError(f"cube {self.ns} in the cluster has dim {layout.dim}, the bundle {self.expect_dim}")
        except (LookupError, ValueError) as e:
            if initial and self.required:
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
        self._read_policies()
        self._next_check = time.monotonic() + self.check_s
        log.info("cube %s: %s layout on %d masters (%s)", self.ns, layout.strategy, len(self.cluster.nodes),
                 self.url)
        return True

    def _check_layout(self, now):
        """Every ``check_s``: the layout record still there and the same push? A cluster flushed or
        restarted without persistence has lost the cube: its keys would read as absent, silently.
        Then lookups degrade (counted) until the cube is pushed again; a new push is taken up. The masters'
        eviction policies are read again."""
        self._next_check = now + self.check_s
        if self.layout is not None:
            self._read_policies()
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

    def _probe(self, node, deadline):
        """A master that failed is back from its down time and has a replica: a PING (a fifth of the budget at
        most) decides whether this batch's keys go to it, or to its replica while it stays marked down (its
        down time doubled): a frozen master costs a probe, not a batch's budget and keys."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError("no time left")
            call(node.addr[0], node.addr[1], ["PING"], timeout_s=max(0.001, min(left, self.timeout_s / 5)),
                 access=self.access)
            node.fails = 0
        except (OSError, RedisError) as e:
            self._fail(node, f"did not answer a probe ({e.__class__.__name__})")

    def _replicas_for(self, owners, now):
        """True when a master of ``owners`` (node indices) is marked down and has a replica to ask instead."""
        for i in np.unique(owners).tolist():
            if i >= 0:
                node = self.nodes.get(self.cluster.nodes[i])
                if node is not None and now < node.down_until and self.cluster.replicas.get(node.addr):
                    return True
        return False

    def _replica_of(self, master, now):
        """A replica of ``master`` not marked down (its _Node, READONLY), or None."""
        for addr in self.cluster.replicas.get(master.addr, ()):
            node = self.nodes.get(addr)
            if node is None:
                node = self.nodes[addr] = _Node(addr)
            if now >= node.down_until:
                node.readonly = True
                return node
        return None

    def _fail(self, node, kind):
        """A master failed: closed, marked down (``retry_ms``, doubled with each failure in a row up to
        MAX_DOWN_FACTOR times: a master frozen through a long ``cluster-node-timeout`` is not given every
        batch's budget again), and the slot map is reloaded before the next batch (a failover may have
        moved its slots)."""
        node.close()
        node.fails += 1
        down = self.retry_s * min(2 ** (node.fails - 1), MAX_DOWN_FACTOR)
        node.down_until = time.monotonic() + down
        self._refresh_due = True
        self._count(kind)
        log.warning("cube %s: master %s:%d %s; marked down for %.0f ms (%s)", self.ns, node.addr[0], node.addr[1],
                    kind, 1000 * down, "its replica answers meanwhile" if self.cluster.replicas.get(node.addr)
                    else "its keys read the default vector")

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
        now = time.monotonic()
        if (not self.cluster.nodes or self._refresh_due) and now - self.cluster.refreshed >= self.refresh_s:
            # after a failure: the slot map first (a third of the budget at most; live masters asked first),
            # so this batch is not spent on a master whose slots a failover moved
            self._refresh_due = False
            self.refreshes += 1
            down = {a for a, n in self.nodes.items() if n.down_until > now}
            self.cluster.refresh(timeout_s=max(0.001, self.timeout_s / 3), deadline=now + self.timeout_s / 3,
                                 avoid=down)
        keyb, slots = self.layout.keys_and_slots(keys)
        # One sentinel per master the batch reads (cube/layout.py, ``sentinels``), read with its keys.
        sent = self._sentinels(slots)
        if sent.shape[0]:
            keyb = np.concatenate([keyb, self.layout.sentinel_keyb[sent]])
            slots = np.concatenate([slots, self.layout.sentinel_slots[sent]])
            out = np.zeros((k + sent.shape[0], dim), dtype=np.float32)
            found = np.zeros(k + sent.shape[0], dtype=bool)
        status = np.zeros(keyb.shape[0], dtype=np.uint8)
        rows = out.view(np.uint8).reshape(keyb.shape[0], dim * 4)
        todo = np.arange(keyb.shape[0], dtype=np.int64)
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
            if not np.any(self.cluster.owner[slots[todo]] != before) and not self._replicas_for(before, now):
                break                       # nowhere else to ask: these keys degrade
            status[todo] = 0
        self.degraded += int(todo[todo < k].shape[0])
        if sent.shape[0]:
            self._check_sentinels(slots, status, found, k)
        if self._evictable:
            self._check_evictions(slots, status, found, k, deadline)
        if sent.shape[0]:
            out, found = out[:k], found[:k]
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
            if node.fails and now >= node.down_until and self.cluster.replicas.get(node.addr):
                self._probe(node, deadline)       # (a master that failed: a PING first, not this batch's keys)
                now = time.monotonic()
            if now < node.down_until:
                # a master marked down: its replica answers for it (stale by replication lag at most, and a
                # pushed cube does not change), until a failover promotes one
                node = self._replica_of(node, now)
                if node is None:
                    status[todo[idx]] = 3
                    continue
                self._count("read from a replica", int(idx.shape[0]))
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
                # (bytes a TLS socket already decrypted are invisible to poll: read those first)
                ready = [(fd, 0) for fd, p in by_fd.items() if tls_pending(p[0].sock)]
                for fd, _ in ready or poller.poll(max(1, int(left * 1000))):
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
                    if not parse_mget(node.buf, p[3], p[4], starts, order, rows, found, status, p[5]):
                        poller.unregister(fd)
                        del by_fd[fd]
                        self._fail(node, "broke the protocol")
                        continue
                    if p[4][1] == starts.shape[0] - 1:
                        poller.unregister(fd)
                        del by_fd[fd]
                        node.fails = 0               # a whole answer: its next failure starts from retry_ms
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
                replies = pipeline(addr[0], addr[1], [["GET", bytes(keyb[k])] for k in ks], deadline=deadline,
                                   access=self.access)
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
                replies = pipeline(addr[0], addr[1], cmds, deadline=deadline, access=self.access)
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
            if node.sock is not None and not idle_ok(node.sock):
                node.close()                 # the server closed it while idle (restart, timeout): reconnect
            if node.sock is None:
                # at most a third of the budget for a connect (and TLS, AUTH): a blackholed host must leave
                # time for the rest
                node.sock = self.access.connect(node.addr, max(0.001, min(left, self.timeout_s / 3)))
                if node.readonly:
                    node.sock.sendall(encode_command(["READONLY"]))
                    r = Reader(node.sock).reply()
                    if isinstance(r, RedisError):
                        raise ConnectionError(f"READONLY refused: {r}")
            node.sock.settimeout(max(0.001, deadline - time.monotonic()))
            kl = keyb.shape[1]
            khdr = np.frombuffer(b"$%d\r\n" % kl, dtype=np.uint8)
            cap = order.shape[0] * (khdr.shape[0] + kl + 2) + (starts.shape[0] - 1) * 32
            node.out = _grown(node.out, cap)
            n = encode_commands(keyb, np.empty((0, 0), np.uint8), order, starts, khdr, khdr[:0], MGET, node.out)
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
                                         timeout_s=10.0, access=self.access)
                    raw = b"".join(k[-8:] for k in batch if len(k) == klen)
                    if raw:
                        found.append(np.frombuffer(raw, dtype="<u8"))
                    if cursor in (b"0", 0, "0"):
                        break
            except (OSError, RedisError) as e:
                log.warning("cube %s: listing %s:%d failed (%s); its keys stay out of the hot tier", self.ns,
                            host, port, e)
        keys = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype="<u8")
        if self.layout.sentinel_slots.shape[0]:      # (the push's sentinels are no signatures)
            sent = np.ascontiguousarray(self.layout.sentinel_keyb[:, -8:]).view("<u8").reshape(-1)
            keys = np.setdiff1d(keys, sent, assume_unique=True)
        return keys.astype(np.uint64)

    def stats(self):
        return {"calls": self.calls, "keys": self.keys_read, "round_trips": self.round_trips,
                "degraded": self.degraded, "refreshes": self.refreshes, "errors": dict(self.errors),
                "cpu_us_per_call": round(self.cpu_ns / 1000 / self.calls, 1) if self.calls else None}

    def close(self):
        for node in self.nodes.values():
            node.close()
