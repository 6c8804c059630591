"""A Python client: ``jizhi.client.Client`` (ZeroMQ REQ, Lazy Pirate).

Nothing in the protocol needs Python on the other side (README, "Wire
protocol"); this is a convenience. A REQ socket that timed out is stuck, so
on a timeout the client closes it (LINGER 0) and opens a new one before the
next request, and raises ``TimeoutError``; retrying is the caller's choice
(only OVERLOADED and DEADLINE_EXCEEDED are retriable).
"""
import itertools

import numpy as np
import zmq

from jizhi import protocol
from jizhi.errors import RequestError


class Reply:
    """A decoded reply: ``header`` (dict), ``item_ids`` and ``scores`` (arrays)."""

    def __init__(self, header, arrays):
        self.header = header
        self.item_ids = arrays.get("item_ids")
        self.scores = arrays.get("scores")
        # heads=True in a multi-objective pipeline: each head's scores of the same items, by head.
        self.heads = {k[len("head:"):]: v for k, v in arrays.items() if k.startswith("head:")}

    def __getitem__(self, key):
        return self.header[key]

    def get(self, key, default=None):
        return self.header.get(key, default)

    @property
    def ok(self):
        return self.header.get("status") == "ok"


class Client:
    def __init__(self, endpoint="tcp://127.0.0.1:5555", timeout_s=5.0, context=None,
                 server_key=None, client_key=None):
        """``server_key``: the server's public key file; ``client_key``: our secret key file (CURVE)."""
        self.endpoint = endpoint
        self.curve = None
        if server_key or client_key:
            from zmq.auth import load_certificate
            server_public, _ = load_certificate(server_key)
            public, secret = load_certificate(client_key)
            self.curve = (server_public, public, secret)
        self.timeout_ms = int(timeout_s * 1000)
        self.ctx = context or zmq.Context.instance()
        self.sock = None
        self.ids = itertools.count(1)

    def _socket(self):
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            if self.curve:
                self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = self.curve
            self.sock.connect(self.endpoint)
        return self.sock

    def close(self):
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, frames):
        """Send raw frames, return the reply's frames (for tests and other tools)."""
        sock = self._socket()
        sock.send_multipart(frames)
        if not sock.poll(self.timeout_ms):
            self.close()  # Lazy Pirate: a REQ socket that timed out cannot be reused
            raise TimeoutError(f"no reply from {self.endpoint} within {self.timeout_ms} ms")
        return sock.recv_multipart()

    def request(self, op="score", **fields):
        fields.setdefault("id", next(self.ids))
        header, arrays = protocol.decode_reply(self.call(protocol.encode_request(op, **fields)))
        return Reply(header, arrays)

    def score(self, user, item_ids, recall_scores=None, *, pipeline="default", top_k=10, ret="topk",
              deadline_ms=None, context=None, check=True, heads=False):
        """Score one request. Raises RequestError on an error reply when ``check``. ``heads``: also
        each head's scores of the returned items (``Reply.heads``) in a multi-objective pipeline."""
        r = self.request("score", user=user, item_ids=np.asarray(item_ids, dtype=np.uint64),
                         recall_scores=recall_scores, pipeline=pipeline, top_k=top_k, ret=ret,
                         deadline_ms=deadline_ms, context=context, heads=heads)
        if check and not r.ok:
            raise RequestError(r["code"], r["message"], r.get("retry_after_ms"))
        return r

    def feedback(self, user, item, event="click", idempotency_id=None):
        """Report that ``user`` acted on ``item``; the user's next scores see it."""
        return self.request("feedback", user=user, item=item, event=event, idempotency_id=idempotency_id)

    def ping(self):
        return self.request("ping")

    def info(self):
        return self.request("info").header


def wait_ready(endpoint, timeout_s=180.0):
    """Poll ``info`` until the server says it is ready; True, or False after ``timeout_s``."""
    import time
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with Client(endpoint, timeout_s=1.0) as c:
                if c.info().get("ready"):
                    return True
        except TimeoutError:
            pass
        time.sleep(0.3)
    return False


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m jizhi.client",
                                 description="Wait until a jizhid answers ready (for scripts).")
    ap.add_argument("--wait-ready", metavar="ENDPOINT", required=True)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds (default 180)")
    a = ap.parse_args()
    sys.exit(0 if wait_ready(a.wait_ready, a.timeout) else f"jizhid at {a.wait_ready} not ready in {a.timeout:g} s")
