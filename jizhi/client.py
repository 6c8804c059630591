"""A Python client: ``jizhi.client.Client`` (ZeroMQ REQ, Lazy Pirate), for one jizhid node or several.

Nothing in the protocol needs Python on the other side (README, "Wire
protocol"); this is a convenience. A REQ socket that timed out is stuck, so
on a timeout the client closes it (LINGER 0) and opens a new one before the
next request.

One endpoint (the default): one attempt per request; a timeout raises
``TimeoutError`` and an error reply is returned (``score`` raises
``RequestError``); retrying is the caller's choice (only OVERLOADED and
DEADLINE_EXCEEDED are retriable; a draining server answers OVERLOADED).

Several endpoints (``Client("tcp://a:5555,tcp://b:5555")`` or a list), the
scale-out past one machine (README, "Past one machine"; nodes share no
state): one REQ socket per node, each opened on first use.

* **Spreading**: round-robin over the nodes that are not marked down; when
  every node is marked down, the one whose mark ends first (the least
  recently failed) is tried, so a request is always sent somewhere. With
  ``route="user"`` a user's requests and feedback go to one node instead
  (rendezvous hashing of the user over the endpoints: adding a node moves
  only the users it takes), and to the user's next node while that one is
  marked down, so a feedback is seen by the node that scores the user.
* **Retrying**: an attempt waits ``timeout_s`` at most; by default (no
  ``timeout_s`` given) half the request's deadline (``deadline_ms``, or the
  server's default of 1,000 ms), at least 20 ms, so a dead node costs a
  fraction of the deadline and the retry on another node still has time
  (``ATTEMPT_FRACTION``). On a timeout the
  node's socket is closed (Lazy Pirate), the node is marked down for
  ``backoff_s``, doubled on each further timeout in a row up to 16 x
  ``backoff_s``, and the same request goes at once to the next node not
  tried yet for it. A retriable error reply (``retry_codes``, by default
  ``jizhi.errors.RETRIABLE``) marks the node down for its ``retry_after_ms``
  (or ``backoff_s``) and is retried the same way. A retry to a node still
  marked down waits for the mark to end: a client honours ``retry_after_ms``
  (the broker computes it so that the next try usually succeeds). At most
  ``attempts`` attempts (default: one per node; with ``budget_s``, as many
  as the budget allows) and, with ``budget_s``, no new attempt after
  ``budget_s`` seconds from the first send, an attempt's wait cut to what
  is left. So with a budget a request that got no reply (a broker that died
  holding it loses it: README, "Stopping") is sent again, on a new socket,
  until the node is back or the budget runs out. Out of budget: the last
  retriable error reply if any attempt got one, else ``TimeoutError``
  naming every endpoint tried. An answer clears the node's mark. The node
  whose mark expired is probed by the next request sent to it; if it is
  still dead that request pays one ``timeout_s`` before its retry.
* **Counters** (``stats()``): per endpoint, attempts sent, replies
  (answered), timeouts, retries (attempts that were a retry of a request
  first sent elsewhere or earlier) and retried error replies; per client,
  logical requests and how many gave up.

A ``score`` retried on another node is harmless (scoring changes nothing).
A ``feedback`` always carries an ``idempotency_id`` (a random one when the
caller gives none): a node drops a duplicate within its dedup window, so a
retry never applies an event twice on one node. Nodes share no state,
though: when the first node applied the event but its answer was lost, the
retry applies it on a second node as well (once per node). Feedback also
reaches only the node that answered: the other nodes' overlays and query
caches do not see it. That is why ``route="user"`` exists: with it, every
client sends a user to the same node while that node is up.

Not thread-safe: one ``Client`` per thread (REQ sockets and counters are
per client).
"""
import itertools
import time
import uuid

import numpy as np
import zmq

from jizhi import protocol
from jizhi.endpoints import split as split_endpoints
from jizhi.errors import RETRIABLE, RequestError

BACKOFF_MAX_FACTOR = 16   # a node that keeps timing out is probed every 16 x backoff_s at most
# Several endpoints without a timeout_s: an attempt waits this fraction of the request's deadline
ATTEMPT_FRACTION = 0.5
MIN_ATTEMPT_MS = 20
DEFAULT_DEADLINE_MS = 1000.0    # the server's limits.default_deadline_ms, for a request that names none
SINGLE_TIMEOUT_S = 5.0          # one endpoint without a timeout_s: one attempt waits this long


class Reply:
    """A decoded reply: ``header`` (dict), ``item_ids`` and ``scores`` (arrays).

    ``endpoint``: the node that answered; ``attempts``: attempts this request took.
    """

    def __init__(self, header, arrays, endpoint=None, attempts=1):
        self.header = header
        self.item_ids = arrays.get("item_ids")
        self.scores = arrays.get("scores")
        # heads=True in a multi-objective pipeline: each head's scores of the same items, by head.
        self.heads = {k[len("head:"):]: v for k, v in arrays.items() if k.startswith("head:")}
        self.endpoint = endpoint
        self.attempts = attempts

    def __getitem__(self, key):
        return self.header[key]

    def get(self, key, default=None):
        return self.header.get(key, default)

    @property
    def ok(self):
        return self.header.get("status") == "ok"


class Node:
    """One endpoint of a client: its REQ socket (None until used or after a timeout), its down mark, its counters."""

    COUNTERS = ("sent", "answered", "timeouts", "retries", "errors_retried")

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.sock = None
        self.down_until = 0.0     # time.monotonic(); the node is skipped while this is in the future
        self.timeouts_in_row = 0
        self.sent = self.answered = self.timeouts = self.retries = self.errors_retried = 0

    def mark_down(self, now, seconds):
        self.down_until = max(self.down_until, now + seconds)

    def stats(self, now):
        return dict({k: getattr(self, k) for k in self.COUNTERS}, down=self.down_until > now)


class Client:
    def __init__(self, endpoint="tcp://127.0.0.1:5555", timeout_s=None, context=None,
                 server_key=None, client_key=None, *, attempts=None, budget_s=None, backoff_s=1.0,
                 retry_codes=RETRIABLE, route="round_robin"):
        """``endpoint``: one, a comma-separated string or a list (the module docstring).

        ``timeout_s``: the wait of one attempt (default: 5 s for one endpoint; for several, a fraction of
        each request's deadline: the module docstring); ``attempts``: most attempts per
        request (default: the number of endpoints, so one for one endpoint; with
        ``budget_s``, no bound but the budget); ``budget_s``: no new attempt
        after this many seconds (default: no bound but ``attempts``);
        ``backoff_s``: how long a node that timed out is skipped at first;
        ``retry_codes``: error codes retried on another node. ``server_key``:
        the server's public key file; ``client_key``: our secret key file
        (CURVE; the same server key for every node).
        ``route``: ``"round_robin"`` or ``"user"`` (a user's requests to one node).
        """
        if route not in ("round_robin", "user"):
            raise ValueError(f"route must be 'round_robin' or 'user', not {route!r}")
        self.route = route
        self.endpoints = split_endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.nodes = [Node(e) for e in self.endpoints]
        self.curve = None
        if server_key or client_key:
            from zmq.auth import load_certificate
            server_public, _ = load_certificate(server_key)
            public, secret = load_certificate(client_key)
            self.curve = (server_public, public, secret)
        self.from_deadline = timeout_s is None and len(self.nodes) > 1
        self.timeout_ms = int((SINGLE_TIMEOUT_S if timeout_s is None else timeout_s) * 1000)
        if attempts is None:
            self.attempts = None if budget_s is not None else len(self.nodes)   # None: the budget bounds them
        else:
            self.attempts = max(1, attempts)
        self.budget_s = budget_s
        self.backoff_s = backoff_s
        self.retry_codes = frozenset(retry_codes or ())
        self.ctx = context or zmq.Context.instance()
        self.ids = itertools.count(1)
        self._next = 0                 # round-robin position
        self.requests = 0              # logical requests (call()s)
        self.gave_up = 0               # ... that ran out of attempts or budget without an answer
        self.last_endpoint = None      # the node that answered the last call
        self.last_attempts = 0

    # -- sockets --------------------------------------------------------------

    def _socket(self, node):
        if node.sock is None:
            node.sock = self.ctx.socket(zmq.REQ)
            node.sock.setsockopt(zmq.LINGER, 0)
            if self.curve:
                node.sock.curve_serverkey, node.sock.curve_publickey, node.sock.curve_secretkey = self.curve
            node.sock.connect(node.endpoint)
        return node.sock

    @staticmethod
    def _close_node(node):
        if node.sock is not None:
            node.sock.close(0)
            node.sock = None

    def close(self):
        for node in self.nodes:
            self._close_node(node)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- routing --------------------------------------------------------------

    def _pick(self, tried, now, key=None):
        """The next node for an attempt: round-robin among the untried nodes that are up; else an untried
        one whose down mark ends first; else (every node tried) the same order over all of them. With
        ``route="user"`` and a ``key`` (the user), the key's rendezvous order instead of round-robin."""
        n = len(self.nodes)
        if key is not None and self.route == "user" and n > 1:
            order = sorted(range(n), key=lambda i: -_rendezvous(key, i, self.nodes[i].endpoint))
            def rank(i):
                node = self.nodes[i]
                down = node.down_until > now
                return (node in tried, down, node.down_until if down else 0.0, order.index(i))
            return self.nodes[min(range(n), key=rank)]
        best_i, best_key = 0, None
        for k in range(n):
            i = (self._next + k) % n
            node = self.nodes[i]
            down = node.down_until > now
            key = (node in tried, down, node.down_until if down else 0.0)
            if best_key is None or key < best_key:
                best_i, best_key = i, key
        self._next = (best_i + 1) % n
        return self.nodes[best_i]

    def call(self, frames, key=None, deadline_ms=None):
        """Send raw frames, return the reply's frames (for tests and other tools), retrying as the module
        docstring says (``key``: the user, for ``route="user"``; ``deadline_ms``: the request's, which an
        attempt's wait derives from when no ``timeout_s`` was given). Raises ``TimeoutError`` when no
        attempt got an answer."""
        timeout_ms = self.timeout_ms
        if self.from_deadline:
            timeout_ms = max(MIN_ATTEMPT_MS, int(ATTEMPT_FRACTION * (deadline_ms or DEFAULT_DEADLINE_MS)))
        self.requests += 1
        t0 = time.monotonic()
        end = t0 + self.budget_s if self.budget_s is not None else None
        tried = []
        error_reply = None
        for attempt in itertools.count() if self.attempts is None else range(self.attempts):
            now = time.monotonic()
            if end is not None and attempt and now >= end:
                break
            node = self._pick(tried, now, key)
            if attempt and node.down_until > now:
                # Every node failed or said when to come back: wait for that (retry_after_ms, backoff).
                if end is not None and node.down_until >= end:
                    break
                time.sleep(node.down_until - now)
                now = time.monotonic()
            wait_ms = timeout_ms
            if end is not None:
                wait_ms = max(1, min(wait_ms, int((end - now) * 1000)))
            if attempt:
                node.retries += 1
            tried.append(node)
            sock = self._socket(node)
            sock.send_multipart(frames)
            node.sent += 1
            if not sock.poll(wait_ms):
                node.timeouts += 1
                node.timeouts_in_row += 1
                self._close_node(node)   # Lazy Pirate: a REQ socket that timed out cannot be reused
                node.mark_down(time.monotonic(), self.backoff_s * min(
                    2 ** (node.timeouts_in_row - 1), BACKOFF_MAX_FACTOR))
                continue
            reply = sock.recv_multipart()
            node.answered += 1
            node.timeouts_in_row = 0
            if self.retry_codes and (self.attempts is None or attempt + 1 < self.attempts):
                code, retry_after_ms = _error_code(reply)
                if code in self.retry_codes and (end is None or time.monotonic() < end):
                    node.errors_retried += 1
                    error_reply = reply
                    node.mark_down(time.monotonic(),
                                   retry_after_ms / 1000.0 if retry_after_ms else self.backoff_s)
                    continue
            node.down_until = 0.0
            self.last_endpoint, self.last_attempts = node.endpoint, attempt + 1
            return reply
        self.gave_up += 1
        self.last_endpoint, self.last_attempts = None, len(tried)
        if error_reply is not None:
            return error_reply
        if len(self.nodes) == 1 and len(tried) == 1:
            raise TimeoutError(f"no reply from {self.endpoint} within {timeout_ms} ms")
        counts = {}
        for node in tried:
            counts[node.endpoint] = counts.get(node.endpoint, 0) + 1
        raise TimeoutError(f"no reply in {len(tried)} attempts over {time.monotonic() - t0:.2f} s "
                           f"(at most {timeout_ms} ms each) from "
                           + ", ".join(f"{e} ({n}x)" for e, n in counts.items()))

    def stats(self):
        """``{"requests", "gave_up", "endpoints": {endpoint: {sent, answered, timeouts, retries,
        errors_retried, down}}}``: counters since this client was made."""
        now = time.monotonic()
        return {"requests": self.requests, "gave_up": self.gave_up,
                "endpoints": {node.endpoint: node.stats(now) for node in self.nodes}}

    # -- requests -------------------------------------------------------------

    def request(self, op="score", **fields):
        fields.setdefault("id", next(self.ids))
        key = fields.get("user") if op in ("score", "feedback") else None
        header, arrays = protocol.decode_reply(self.call(protocol.encode_request(op, **fields), key,
                                                         fields.get("deadline_ms")))
        return Reply(header, arrays, self.last_endpoint, self.last_attempts)

    def score(self, user, item_ids, recall_scores=None, *, pipeline="default", top_k=10, ret="topk",
              deadline_ms=None, context=None, check=True, heads=False, features=None):
        """Score one request. Raises RequestError on an error reply when ``check``. ``heads``: also
        each head's scores of the returned items (``Reply.heads``) in a multi-objective pipeline.
        ``context``: {context field: raw value or values}; ``features``: the user's own {field: raw value
        or values, "dense": [numbers]}, over the profiles' for this request (README, "Wire protocol")."""
        r = self.request("score", user=user, item_ids=np.asarray(item_ids, dtype=np.uint64),
                         recall_scores=recall_scores, pipeline=pipeline, top_k=top_k, ret=ret,
                         deadline_ms=deadline_ms, context=context, heads=heads, features=features)
        if check and not r.ok:
            raise RequestError(r["code"], r["message"], r.get("retry_after_ms"))
        return r

    def feedback(self, user, item, event="click", idempotency_id=None):
        """Report that ``user`` acted on ``item``; the next scores of the node that answered see it.

        Without ``idempotency_id`` a random one is sent, so a retry is never applied twice on one node
        (it may be applied once on each of two nodes: the module docstring)."""
        if idempotency_id is None:
            idempotency_id = uuid.uuid4().hex
        return self.request("feedback", user=user, item=item, event=event, idempotency_id=idempotency_id)

    def ping(self):
        return self.request("ping")

    def info(self):
        return self.request("info").header


def _rendezvous(user, i, endpoint):
    """The weight of (user, node) in rendezvous hashing: splitmix64 of the user mixed with the endpoint."""
    x = (int(user) ^ _endpoint_hash(endpoint)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _endpoint_hash(endpoint, _cache={}):
    h = _cache.get(endpoint)
    if h is None:
        import hashlib
        h = _cache[endpoint] = int.from_bytes(hashlib.blake2b(endpoint.encode(), digest_size=8).digest(), "little")
    return h


def _error_code(frames):
    """(code, retry_after_ms) of an error reply; (None, None) for anything else."""
    try:
        h = protocol.unpackb(frames[0])
    except Exception:
        return None, None
    if not isinstance(h, dict) or h.get("status") != "error":
        return None, None
    return h.get("code"), h.get("retry_after_ms")


def wait_ready(endpoint, timeout_s=180.0):
    """Poll ``info`` until the server (every one of several endpoints) says it is ready; True, or False after
    ``timeout_s``."""
    end = time.monotonic() + timeout_s
    for one in split_endpoints(endpoint):
        while True:
            try:
                with Client(one, timeout_s=1.0) as c:
                    if c.info().get("ready"):
                        break
            except TimeoutError:
                pass
            if time.monotonic() >= end:
                return False
            time.sleep(0.3)
    return True


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m jizhi.client",
                                 description="Wait until a jizhid answers ready (for scripts).")
    ap.add_argument("--wait-ready", metavar="ENDPOINT", required=True,
                    help="an endpoint, or several comma-separated (every one must be ready)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds (default 180)")
    a = ap.parse_args()
    sys.exit(0 if wait_ready(a.wait_ready, a.timeout) else f"jizhid at {a.wait_ready} not ready in {a.timeout:g} s")
