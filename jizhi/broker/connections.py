"""Client connections of the broker's frontend: how many, and how much memory each may make it hold.

Runs in the broker process: the broker's loop (one thread) calls ``on_monitor``,
``on_message``, ``on_reply`` and ``refused_reply_sent``; a guard thread started by
``start_guard`` measures and closes connections. Nothing here crosses a process.

Why a guard: ZeroMQ bounds a frame (``ZMQ_MAXMSGSIZE``) and a count of whole
messages per connection (``ZMQ_RCVHWM``, ``ZMQ_SNDHWM``), never bytes. The
frames of a multipart message wait inside ZeroMQ until its last frame arrives
and are not counted by the high-water mark until then, so one unfinished
message can fill the machine (issue 16: 1 GiB of 250 KB frames, +1,020 MiB;
116 MiB of empty frames, +3,630 MiB: ZeroMQ keeps 64 bytes per frame).

What bounds what:

* **Requests** (per connection). The broker counts the wire bytes of every
  message it reads from a connection (its descriptor is the message's
  ``ZMQ_SRCFD``); the kernel counts the bytes ZeroMQ read from the socket
  (``TCP_INFO`` bytes received minus ``SIOCINQ``). The difference is what
  ZeroMQ holds for that connection. A well-behaved client has at most two
  requests waiting (``RCVHWM`` = ``REQUEST_QUEUE``) and one arriving, each
  under ``max_message_bytes`` + 64 KiB (``MAXMSGSIZE``); a connection holding
  more (``rx_limit``) is sending an unfinished or oversized message and is
  closed.
* **Replies** (per connection). ``SNDHWM`` = ``REPLY_QUEUE`` replies wait for
  a client at most; past that the ROUTER refuses more (``ROUTER_MANDATORY``)
  and the broker drops them, counted as ``not_reading``.
* **All connections**. The guard reads the broker's anonymous memory every
  ``TICK_S``; past ACT_AT (3/4) of ``limits.clients_memory_mb`` above its
  level at start, it closes the connections holding the most bytes (requests
  and replies), largest first, until what the others hold is estimated at
  half the budget (ZeroMQ keeps 1 to 33 bytes of memory per byte it holds:
  the growth over the bytes held says how many). The quarter left covers
  what ZeroMQ takes in before it lets go of them. Growth that the
  connections cannot account for (the broker's own) closes nobody.
* **Descriptors**. ``limits.max_connections`` connections are served at once
  (counted from the frontend's monitor: accepted, disconnected). A connection
  past the limit is *refused*: its first request is answered OVERLOADED with
  ``retry_after_ms`` and it is closed once that reply is out; one that sends
  nothing is closed after ``REFUSED_IDLE_S``, and at most ``refused_cap`` of
  them are open at once (the oldest goes first). The soft ``RLIMIT_NOFILE``
  is raised to fit both, so ZeroMQ can always accept and the refusal is
  heard (a broker out of descriptors accepts nobody and answers nothing).

Closing a connection (for what it holds, at the limit, or every one when the
broker stops: ``shut_all``): ``shutdown()`` on its descriptor (the abusive
ones with ``SO_LINGER`` 0: a reset); ZeroMQ sees the end, frees what it held
for it and closes the descriptor. A descriptor is checked against the peer address
recorded when it was accepted before it is shut down, so a descriptor ZeroMQ
closed and reused for another client in between is left alone.

Known limits: on ``ipc://`` frontends the kernel keeps no byte counts, so
only the connection limit and the reply queue apply there. ZMTP heartbeats
(PING commands, off unless a client turns them on) are bytes read that are
no message: at ~10 bytes a beat they count toward ``rx_limit`` until the
connection is closed as if it were holding them (after days of idling).
"""
import ctypes
import fcntl
import logging
import os
import resource
import socket
import struct
import sys
import termios
import threading
import time

import zmq

log = logging.getLogger("jizhi.broker")

REPLY_QUEUE = 64        # replies that may wait for one client (the frontend's SNDHWM)
REQUEST_QUEUE = 2       # whole requests that may wait from one client (RCVHWM; 1 stalls CURVE with a ZAP
                        # handler in libzmq 4.3.5: the handshake never completes)
TICK_S = 0.005          # the guard's memory reading: ZeroMQ takes in up to ~1 GiB/s, 5 MiB a tick
INTAKE = 1 << 30        # ... that rate, bytes/s (measured: 1 GiB of 250 KB frames, loopback)
SCAN_GROWTH = 2 << 20   # memory growth since the last scan that makes the guard look at every connection
SCAN_EVERY_S = 1.0      # ... and it looks at least this often (slow senders, descriptors gone unnoticed)
REFUSED_IDLE_S = 1.0    # a refused connection that sent nothing is closed after this long
REFUSED_RETRY_MS = 1000  # the retry_after_ms of a refusal at the connection limit
HANDSHAKE_SLACK = 64 << 10   # bytes a connection reads that are no message: greeting, READY, CURVE handshake
CURVE_FRAME = 33        # CURVE sends a frame as a MESSAGE command: name 8, nonce 8, flags 1, MAC 16
AMPLIFICATION = 33      # most bytes of memory ZeroMQ keeps per byte received (empty frames: 64 for 2)
MIN_VICTIM = 64 << 10   # a connection holding less is not closed for the broker's total memory
RELEASE_S = 0.1         # the guard waits this long at most for closed connections to be let go
ACT_AT = 0.75           # share of limits.clients_memory_mb past which the guard closes the biggest holders
FD_RESERVE = 256        # descriptors kept for everything else the broker opens
PAGE = os.sysconf("SC_PAGE_SIZE")

_TCP_INFO_LEN = 136     # up to tcpi_bytes_received (Linux >= 4.1)
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)    # glibc: give freed heap pages back


def _header(n):
    return 2 if n <= 255 else 9


_statm = []     # the descriptor of /proc/self/statm, opened once: the guard reads it 200 times a second


def anon_bytes():
    """The broker's anonymous resident memory (heap, ZeroMQ's queues), without shared memory and files.

    One ``pread`` of a descriptor kept open (1.7 us; an open, read and close took 32 us)."""
    if not _statm:
        _statm.append(os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
    fields = os.pread(_statm[0], 256, 0).split()
    return (int(fields[1]) - int(fields[2])) * PAGE


class Conn:
    """One client connection, by its descriptor (while ZeroMQ has it open)."""

    __slots__ = ("fd", "peer", "t_open", "refused", "read", "handed", "ids", "closing", "refusal_sent", "est")

    def __init__(self, fd, peer, now, refused):
        self.fd = fd
        self.peer = peer            # getpeername() when accepted: tells a reused descriptor apart
        self.t_open = now
        self.refused = refused
        self.read = 0               # wire bytes of the messages the broker read from it
        self.handed = 0             # wire bytes of the replies the broker handed to ZeroMQ for it
        self.ids = set()            # its routing ids (the replies' addresses)
        self.closing = None         # why it is being closed (once shut down)
        self.refusal_sent = None    # when its refusal went to ZeroMQ (it is closed once written)
        self.est = 0                # once closed for what it holds: that, estimated in bytes of memory


def _socket_of(fd):
    """A socket object over ``fd`` that does not own it (``detach()`` it after use); None: no socket."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        return None


def _peer(fd):
    s = _socket_of(fd)
    if s is None:
        return None
    try:
        return s.getpeername()
    except OSError:
        return None
    finally:
        s.detach()


def _kernel_counts(fd):
    """(bytes ZeroMQ read from the socket, bytes ZeroMQ wrote to it, bytes of those not yet acknowledged by
    the peer), or None when ``fd`` is no TCP socket."""
    s = _socket_of(fd)
    if s is None:
        return None
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        inq = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        outq = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None
    finally:
        s.detach()
    if len(info) < _TCP_INFO_LEN:
        return None
    acked, received = struct.unpack_from("QQ", info, 120)     # tcpi_bytes_acked, tcpi_bytes_received
    return received - inq, acked + outq, outq


class ClientConnections:
    """The frontend's connections, their limit and the memory guard (module docstring)."""

    def __init__(self, front, endpoint, settings):
        self.front = front
        self.tcp = endpoint.startswith("tcp://")
        self.curve = bool(settings.get("security.curve_server_secret"))
        frame_max = settings["limits.max_message_bytes"] + 65536
        self.rx_limit = (REQUEST_QUEUE + 1) * frame_max + HANDSHAKE_SLACK
        self.max_connections = settings["limits.max_connections"]
        self.refused_cap = max(16, self.max_connections // 4)
        self.budget = settings["limits.clients_memory_mb"] << 20
        # Largest reply: every candidate (return: all) with its id, score and up to 4 heads, and a header.
        self.reply_max = settings["limits.max_candidates"] * (8 + 4 + 4 * 4) + 8192
        self._fit_descriptors()
        self.by_fd = {}
        self.by_id = {}
        self.refused_open = {}          # fd -> Conn: the refused ones still open
        self.admitted = 0
        self.refused_total = 0
        self.cut = {"oversize": 0, "memory": 0, "refused": 0, "stopping": 0}
        self.dropped = {"not_reading": 0, "gone": 0}
        self.base = anon_bytes()
        self._lock = threading.Lock()   # cuts (guard thread) against the loop's bookkeeping
        self._stop = threading.Event()
        self._thread = None
        self.releasing = []             # connections closed for what they hold, until ZeroMQ let go of it
        self._last_log = {}
        mon = "inproc://jizhi.frontend.monitor"
        front.monitor(mon, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_ACCEPT_FAILED)
        self.monitor = front.context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)   # before connect: an unbounded pipe, no event is ever dropped
        self.monitor.connect(mon)

    def bounds_mib(self):
        """(one connection, all connections) the broker may hold, MiB: the README's figures."""
        one = AMPLIFICATION * self.rx_limit + REPLY_QUEUE * self.reply_max + INTAKE * TICK_S
        return int(-(-one // (1 << 20))), self.budget >> 20

    def _fit_descriptors(self):
        """Raise the soft descriptor limit to hold every connection served and refused, or lower the
        connection limit to what the hard limit allows."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = self.max_connections + self.refused_cap + FD_RESERVE
        if hard != resource.RLIM_INFINITY and want > hard:
            fit = max(1, (hard - FD_RESERVE) * 4 // 5)
            log.warning("limits.max_connections %d does not fit the descriptor limit %d: serving %d connections",
                        self.max_connections, hard, fit)
            self.max_connections = fit
            self.refused_cap = max(1, hard - FD_RESERVE - fit)
            want = hard
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    # -- the broker's loop ------------------------------------------------------

    def on_monitor(self):
        """Apply the frontend's pending connection events (the loop calls this when the monitor is readable)."""
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, fd = struct.unpack("=HI", frames[0][:6])
            if event == zmq.EVENT_ACCEPTED:
                self._open(fd)
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._forget(fd)
            elif event == zmq.EVENT_ACCEPT_FAILED:
                self.note("accept", "the frontend could not accept a connection (errno %d): out of descriptors?",
                           fd)

    def _open(self, fd):
        old = self.by_fd.get(fd)
        if old is not None:
            if self.tcp and old.peer is not None and old.peer == _peer(fd):
                return old       # counted already, from a message that came before its event
            self._forget(fd)     # its disconnection came after the descriptor's reuse: the record is stale
        now = time.monotonic()
        refused = self.admitted >= self.max_connections
        conn = Conn(fd, _peer(fd) if self.tcp else None, now, refused)
        with self._lock:
            self.by_fd[fd] = conn
            if refused:
                self.refused_open[fd] = conn
                self.refused_total += 1
            else:
                self.admitted += 1
        return conn

    def _forget(self, fd):
        with self._lock:
            conn = self.by_fd.pop(fd, None)
            if conn is None:
                return
            if conn.refused:
                self.refused_open.pop(fd, None)
            else:
                self.admitted -= 1
        for rid in conn.ids:
            if self.by_id.get(rid) is conn:
                del self.by_id[rid]

    def on_message(self, frames):
        """A message read from the frontend (``frames[0]`` is its routing id): count its bytes; returns
        its connection (None when unknown: not TCP, or already gone)."""
        fd = frames[0].get(zmq.SRCFD)
        conn = self.by_fd.get(fd)
        if conn is None:
            self.on_monitor()             # its ACCEPTED event may still be queued
            conn = self.by_fd.get(fd)
            if conn is None:
                if fd < 0 or (self.tcp and _peer(fd) is None):
                    return None
                conn = self._open(fd)     # an event ZeroMQ never sent: count it from here
        n = 0
        for f in frames[1:]:
            size = len(f) + (CURVE_FRAME if self.curve else 0)
            n += size + _header(size)
        conn.read += n
        rid = frames[0].bytes
        if rid not in conn.ids:
            conn.ids.add(rid)
            self.by_id[rid] = conn
        return conn

    def on_reply(self, envelope, frames):
        """A reply handed to ZeroMQ: count its bytes against the connection it goes to."""
        conn = self.by_id.get(bytes(envelope[0]))
        if conn is None:
            return
        n = 0
        for f in list(envelope[1:]) + list(frames):
            size = (f.nbytes if hasattr(f, "nbytes") else len(f)) + (CURVE_FRAME if self.curve else 0)
            n += size + _header(size)
        conn.handed += n

    def refused_reply_sent(self, conn):
        """The refusal of ``conn`` went to ZeroMQ: the guard closes the connection once it is written."""
        if conn.refusal_sent is None:
            conn.refusal_sent = time.monotonic()

    def snapshot(self):
        return {"connections": self.admitted, "limit": self.max_connections, "refused": self.refused_total,
                "closed": dict(self.cut), "replies_dropped": dict(self.dropped),
                "bounds_mib": dict(zip(("connection", "all"), self.bounds_mib()))}

    def delivered(self):
        """Every reply handed to ZeroMQ is written and acknowledged by its client (True on ipc://)."""
        for conn in list(self.by_fd.values()):
            counts = _kernel_counts(conn.fd) if self.tcp and not conn.closing else None
            if counts is not None and (counts[1] < conn.handed or counts[2] > 0):
                return False
        return True

    def shut_all(self):
        """The broker stops: shut every client connection down at once (a FIN: nothing more is read)."""
        for conn in list(self.by_fd.values()):
            self._close(conn, "stopping", "the broker stops", quiet=True)

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        try:
            self.front.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)

    # -- the guard thread -------------------------------------------------------

    def start_guard(self):
        # The loop holds the GIL while it works: let the guard have it within 1 ms, not the default 5.
        sys.setswitchinterval(0.001)
        self.base = anon_bytes()
        self._thread = threading.Thread(target=self._guard, name="jizhi-clients-guard", daemon=True)
        self._thread.start()

    def _guard(self):
        mark = self.base            # the memory at the last look at every connection (or lower since)
        next_scan = time.monotonic() + SCAN_EVERY_S
        again = False               # connections were closed for the budget: look again once they are gone
        while not self._stop.wait(TICK_S):
            try:
                now = time.monotonic()
                anon = anon_bytes()
                self._refused(now)
                if self.releasing:
                    # ZeroMQ frees a closed connection's messages once the broker's loop has seen it go.
                    left = [c for c in self.releasing if self.by_fd.get(c.fd) is c and now < c.t_open + RELEASE_S]
                    if len(left) < len(self.releasing):
                        self.releasing = left
                        if _malloc_trim is not None:
                            _malloc_trim(0)    # give back what ZeroMQ freed, so memory measures the rest
                        anon = anon_bytes()
                if anon - mark >= SCAN_GROWTH or now >= next_scan or again:
                    next_scan = now + SCAN_EVERY_S
                    again = self._scan(anon)
                    mark = anon
                mark = min(mark, anon)
            except Exception:
                if time.monotonic() - self._last_log.get("guard", 0.0) >= 10.0:
                    self._last_log["guard"] = time.monotonic()
                    log.exception("client connection guard (it goes on)")

    def _held(self, conn):
        """(request bytes, reply bytes) ZeroMQ holds for ``conn``, or None when the kernel does not say."""
        counts = _kernel_counts(conn.fd) if self.tcp else None
        if counts is None:
            return None
        read, written, _ = counts
        return max(0, read - conn.read), max(0, conn.handed - written)

    def _scan(self, anon):
        """Close the connections over their bound, then, while the broker is over its budget, the ones
        holding the most. True when one was closed."""
        closed = False
        holders = []
        for conn in list(self.by_fd.values()):
            if conn.closing:
                continue
            held = self._held(conn)
            if held is None:
                continue
            rx, tx = held
            if rx > self.rx_limit:
                closed |= self._close(conn, "oversize", f"it holds {rx >> 10} KiB of an unfinished or oversized "
                                      f"message (bound {self.rx_limit >> 10} KiB)", reset=True, est=rx)
            elif rx + tx >= MIN_VICTIM:
                holders.append((rx + tx, conn))
        # What ZeroMQ has not let go of yet for the connections closed before counts as gone.
        grown = anon - self.base - sum(c.est for c in self.releasing)
        if grown > ACT_AT * self.budget and not closed:
            # ZeroMQ keeps 1 to 33 bytes per byte it holds: from the growth and the bytes held, how many
            # here; then the largest holders go, until what is left is estimated at half the budget.
            held = sum(size for size, _ in holders)
            per_byte = min(AMPLIFICATION, max(1.0, grown / held)) if held else 0.0
            if held * AMPLIFICATION < grown - self.budget // 2:
                self.note("memory", "broker memory is %d MiB above its start (limits.clients_memory_mb %d), more "
                          "than client connections hold", grown >> 20, self.budget >> 20)
            else:
                holders.sort(key=lambda h: -h[0])
                for size, conn in holders:
                    if held * per_byte <= self.budget // 2:
                        break
                    if self._close(conn, "memory", f"the broker holds {grown >> 20} MiB for clients "
                                   f"(limits.clients_memory_mb {self.budget >> 20}) and this connection "
                                   f"{size >> 10} KiB, among the most", reset=True, est=int(size * per_byte)):
                        held -= size
                        closed = True
        return closed

    def _refused(self, now):
        """Close refused connections whose refusal is written, or that said nothing for REFUSED_IDLE_S,
        and the oldest beyond ``refused_cap``."""
        refused = [c for c in list(self.refused_open.values()) if not c.closing]
        if not refused:
            return
        excess = len(refused) - self.refused_cap
        for conn in sorted(refused, key=lambda c: c.t_open):
            if excess > 0:
                excess -= 1
                self._close(conn, "refused", "too many refused connections open", reset=True, quiet=True)
            elif conn.refusal_sent is not None:
                counts = _kernel_counts(conn.fd) if self.tcp else None
                written = counts is None or counts[1] >= conn.handed
                if written or now - conn.refusal_sent > REFUSED_IDLE_S:
                    self._close(conn, "refused", "refused at the connection limit", quiet=True)
            elif now - conn.t_open > REFUSED_IDLE_S:
                self._close(conn, "refused", "refused at the connection limit, and silent", quiet=True)

    def _close(self, conn, kind, why, reset=False, quiet=False, est=0):
        """Shut ``conn``'s socket down (ZeroMQ then frees what it holds and closes the descriptor)."""
        with self._lock:
            if conn.closing or self.by_fd.get(conn.fd) is not conn:
                return False
            s = _socket_of(conn.fd)
            try:
                if self.tcp and s.getpeername() != conn.peer:
                    return False      # ZeroMQ closed it and the descriptor is another client's now
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
            finally:
                s.detach()
            conn.closing = why
            self.cut[kind] += 1
            if reset:
                conn.est = est
                conn.t_open = time.monotonic()     # from now on: when it was closed
                self.releasing.append(conn)
        if not quiet:
            self.note(kind, "closed client connection %s: %s", conn.peer, why)
        return True

    def note(self, key, fmt, *args):
        """A warning, at most once a second per kind (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self._last_log.get(key, 0.0) >= 1.0:
            self._last_log[key] = now
            log.warning(fmt, *args)
