"""How jizhi reaches a Redis node: the URL's seeds, address mapping, TLS and authentication.

One ``Access`` per URL, used for every connection any process opens to the
cluster (the workers' batch reads, the disk-cache manager, ``cube push``,
``cube layout``, ``profiles push``, slot-map reloads, connections opened
after ``MOVED`` or a failover), so none of them can forget a password or TLS:

``redis[s]://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...][/PATH][?OPTIONS]``

* ``rediss://``: TLS (Python's ``ssl``, on the same sockets: the batch reads
  stay non-blocking with ``poll``); ``tls_ca=FILE`` the CA to trust (default:
  the system's), ``tls_cert=FILE`` and ``tls_key=FILE`` a client certificate,
  ``tls_server_name=NAME`` the name the nodes' certificates must carry
  (default: the host connected to), ``tls_verify=no`` to skip checking
  (testing only).
* ``USER:PASSWORD``: ``AUTH USER PASSWORD`` (an ACL user) or, without a user,
  ``AUTH PASSWORD`` on every new connection before anything else. So that a
  secret stays out of a pipeline file: ``password_file=FILE`` (its first
  line) or ``password_env=NAME`` (an environment variable of the process),
  percent-escapes in the URL's password decoded.
* ``map=ANNOUNCED=REACHABLE[,...]``: nodes announce their own address in
  ``CLUSTER SLOTS`` and ``MOVED``; behind NAT, in containers or Kubernetes it
  is not the one a client reaches. Each side is ``HOST:PORT``, ``[V6]:PORT``
  or a ``HOST`` alone (every port of that host).
* IPv6 seeds in brackets: ``redis://[::1]:7300``.

A wrong or missing password is ``AuthError``: one line naming the node and
Redis's own message (``WRONGPASS ...``, ``NOAUTH ...``).

Also here, the small RESP client for single commands (``call``, ``pipeline``:
slot maps, layout records, the pushes' replies) and the reading of a CLUSTER
SLOTS reply (``slot_map``, ``replica_map``); the batch reads' codec is
cube/resp.py's (Numba). Nothing here imports Numba: the supervisor checks a
cluster's credentials and eviction policy with it (``masters``, ``eviction_policy``).
"""
import os
import select
import socket
import ssl
import time
from urllib.parse import parse_qs, unquote

import numpy as np

SCHEMES = ("redis", "rediss")
SLOTS = 16384
AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM", "ERR AUTH", "ERR invalid password", "ERR Client sent AUTH")


# --- a small RESP client (single commands, the pushes' replies; the batch reads are cube/resp.py's) ---


def encode_command(args):
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


class Reader:
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


def _connect(host, port, timeout_s, access):
    if access is not None:
        return access.connect((host, int(port)), timeout_s)      # TLS and AUTH (cube/connect.py)
    return socket.create_connection((host, int(port)), timeout=timeout_s)


def call(host, port, args, timeout_s=2.0, deadline=None, access=None):
    """One command on a new connection; its reply (an error reply raises RedisError).

    ``timeout_s`` bounds each socket operation; ``deadline`` (time.monotonic) the whole call; ``access``
    (cube/connect.py) how to reach, encrypt and authenticate (none: plain TCP, no AUTH).
    """
    if deadline is not None:
        timeout_s = min(timeout_s, deadline - time.monotonic())
        if timeout_s <= 0:
            raise TimeoutError(f"{host}:{port}: no time left")
    with _connect(host, port, timeout_s, access) as s:
        s.sendall(encode_command(args))
        rd = Reader(s)
        if deadline is not None:
            rd.deadline = deadline
        r = rd.reply()
    if isinstance(r, RedisError):
        raise r
    return r


def pipeline(host, port, commands, timeout_s=10.0, deadline=None, access=None):
    """Several commands in one round trip on a new connection; their replies (errors as RedisError values)."""
    if deadline is not None:
        timeout_s = min(timeout_s, deadline - time.monotonic())
        if timeout_s <= 0:
            raise TimeoutError(f"{host}:{port}: no time left")
    with _connect(host, port, timeout_s, access) as s:
        s.sendall(b"".join(encode_command(c) for c in commands))
        rd = Reader(s)
        rd.deadline = deadline
        return [rd.reply() for _ in commands]


class AuthError(ConnectionError):
    """A node refused this client's credentials (or asked for some): ``host:port: Redis's message``."""


def is_auth_error(e):
    """True for an error that says the credentials are wrong or missing (from AUTH, or any command)."""
    return isinstance(e, AuthError) or (isinstance(e, RedisError) and any(m in str(e) for m in AUTH_REPLIES))


def parse_hostport(text, where):
    """``(host, port or None)`` of ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``[V6]``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{where}: {text!r}: an IPv6 address in brackets has no closing ]")
        host, rest = text[1:end], text[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            raise ValueError(f"{where}: {text!r} is not [V6]:PORT")
        return host, int(rest[1:]) if rest else None
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, None
    if not host or not port.isdigit() or ":" in host:
        raise ValueError(f"{where}: {text!r} is not HOST:PORT (an IPv6 address goes in brackets: [::1]:7000)")
    return host, int(port)


class Access:
    """Seeds and how to reach, encrypt and authenticate to the nodes of one URL (module docstring)."""

    def __init__(self, url):
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
        rest, _, query = rest.partition("?")    # (an option's value may hold slashes: a file's path)
        netloc, _, path = rest.partition("/")
        self.url = url
        self.parts = [p for p in path.split("/") if p]
        self.opts = {k: v[-1] for k, v in parse_qs(query).items()}
        userinfo, at, hosts = netloc.rpartition("@")
        self.user = self.password = None
        if at:
            user, colon, password = userinfo.partition(":")
            self.user = unquote(user) or None
            self.password = unquote(password) if colon else None
        if "password_file" in self.opts:
            try:
                with open(self.opts["password_file"]) as f:
                    self.password = f.readline().rstrip("\r\n")
            except OSError as e:
                raise ValueError(f"password_file {self.opts['password_file']}: {e.strerror}") from None
        if "password_env" in self.opts:
            name = self.opts["password_env"]
            if name not in os.environ:
                raise ValueError(f"password_env {name}: no such environment variable in this process")
            self.password = os.environ[name]
        if self.user is not None and self.password is None:
            raise ValueError(f"{self.redacted()}: user {self.user!r} without a password (in the URL, "
                             "password_file or password_env)")
        self.seeds = []
        for hp in hosts.split(","):
            host, port = parse_hostport(hp, self.redacted())
            if not host or port is None:
                raise ValueError(f"{self.redacted()}: seed {hp!r} is not HOST:PORT")
            self.seeds.append((host, port))
        self.map = {}
        for pair in filter(None, self.opts.get("map", "").split(",")):
            announced, eq, reachable = pair.partition("=")
            if not eq:
                raise ValueError(f"{self.redacted()}: map entry {pair!r} is not ANNOUNCED=REACHABLE")
            a, b = parse_hostport(announced, "map"), parse_hostport(reachable, "map")
            if (a[1] is None) != (b[1] is None):
                raise ValueError(f"map entry {pair!r}: give a port on both sides or on neither")
            self.map[a] = b
        self.tls = None
        self.server_name = self.opts.get("tls_server_name")
        if scheme == "rediss":
            try:
                ctx = ssl.create_default_context(cafile=self.opts.get("tls_ca"))
                if "tls_cert" in self.opts:
                    ctx.load_cert_chain(self.opts["tls_cert"], self.opts.get("tls_key"))
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"{self.redacted()}: TLS files: {e}") from None
            if self.opts.get("tls_verify", "yes") == "no":
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.tls = ctx
        elif any(k.startswith("tls_") for k in self.opts):
            raise ValueError(f"{self.redacted()}: tls_* options need a rediss:// URL")

    def redacted(self):
        """The URL without its password (for log lines and errors)."""
        scheme, _, rest = self.url.partition("://")
        rest, q, query = rest.partition("?")
        netloc, slash, tail = rest.partition("/")
        tail += q + query
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = userinfo.partition(":")[0] + ":***@" + hosts
        return f"{scheme}://{netloc}{slash}{tail}"

    def reach(self, addr):
        """The address to connect to for a node announced at ``addr`` (host, port)."""
        mapped = self.map.get(addr)
        if mapped is not None:
            return mapped
        host = self.map.get((addr[0], None))
        return (host[0], addr[1]) if host is not None else addr

    def connect(self, addr, timeout_s):
        """A connected socket to the node announced at ``addr``: TCP_NODELAY, TLS and AUTH done within
        ``timeout_s`` each; raises OSError (AuthError for refused credentials, naming the node)."""
        host, port = self.reach(addr)
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except socket.gaierror as e:
            raise ConnectionError(f"{host}:{port}: {e.strerror} (a node announced this address: if clients reach "
                                  "it by another, say so in the URL's map=ANNOUNCED=REACHABLE)") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name or host)
            if self.password is not None:
                sock.sendall(encode_command(["AUTH"] + ([self.user] if self.user else []) + [self.password]))
                r = Reader(sock).reply()
                if isinstance(r, RedisError):
                    raise AuthError(f"{host}:{port}: {r}")
        except ssl.SSLError as e:
            sock.close()
            raise ConnectionError(f"{host}:{port}: TLS: {e.reason or e}") from None
        except BaseException:
            sock.close()
            raise
        return sock


def idle_ok(sock):
    """False when an idle connection was closed by the server (EOF, an error, or bytes nobody asked for).
    A TLS connection may carry records that are not data (a session ticket): those are read and dropped."""
    sock.setblocking(False)
    try:
        if not select.select([sock], [], [], 0)[0]:
            return True
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.recv(1)                          # data or EOF: either way not a clean idle connection
                return False
            except ssl.SSLWantReadError:
                return True                           # only TLS housekeeping
        return False
    except OSError:
        return False


def pending(sock):
    """Bytes already decrypted and waiting in a TLS socket (which ``poll`` cannot see); 0 for plain TCP."""
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0


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


def replica_map(reply, asked="127.0.0.1"):
    """``{master (host, port): [replica (host, port), ...]}`` from a CLUSTER SLOTS reply."""
    out = {}

    def addr(e):
        h = e[0].decode() if isinstance(e[0], bytes) else e[0]
        return (h if h and h != "?" else asked, int(e[1]))
    for entry in reply:
        reps = out.setdefault(addr(entry[2]), [])
        for r in entry[3:]:
            if addr(r) not in reps:
                reps.append(addr(r))
    return out


def masters(url, timeout_s=2.0):
    """The masters serving slots, as the first node of ``url`` that answers CLUSTER SLOTS says: [(host, port)]
    (an empty list when none answers). Raises AuthError for refused credentials."""
    access = Access(url)
    for host, port in access.seeds:
        try:
            reply = call(host, port, ["CLUSTER", "SLOTS"], timeout_s=timeout_s, access=access)
        except RedisError as e:
            if is_auth_error(e):
                raise AuthError(f"{host}:{port}: {e}") from None
            continue
        except AuthError:
            raise
        except OSError:
            continue
        return slot_map(reply, asked=host)[1]
    return []


def eviction_policy(access, addr, timeout_s=2.0):
    """``(maxmemory-policy, evicted_keys)`` of one node; either None when the node does not say (a managed
    cluster may rename CONFIG)."""
    policy = evicted = None
    try:
        r = call(addr[0], addr[1], ["CONFIG", "GET", "maxmemory-policy"], timeout_s=timeout_s, access=access)
        if r and len(r) == 2:
            policy = r[1].decode() if isinstance(r[1], bytes) else r[1]
    except (OSError, RedisError):
        pass
    try:
        text = call(addr[0], addr[1], ["INFO", "stats"], timeout_s=timeout_s, access=access)
        text = text.decode() if isinstance(text, bytes) else text
        for line in text.split("\r\n"):
            if line.startswith("evicted_keys:"):
                evicted = int(line.split(":", 1)[1])
    except (OSError, RedisError, ValueError):
        pass
    return policy, evicted


def can_evict(policy):
    """True for a maxmemory-policy that may evict keys without a TTL (a pushed cube's)."""
    return bool(policy) and policy.startswith("allkeys")
