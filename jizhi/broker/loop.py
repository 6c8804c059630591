"""The broker process's loop: its two sockets, the poll, and the stop.

``python -m jizhi.broker --plan FILE`` (jizhi/broker/__main__.py) calls
``main``. One thread, one poll loop, two sockets:

* frontend ROUTER (tcp, clients): requests in, replies out; a guard thread
  bounds the connections and what each makes the broker hold
  (jizhi/broker/connections.py);
* backend ROUTER (ipc, workers and the supervisor): internal messages
  (jizhi/messages.py).

Everything a message does is the socket-free ``Broker``'s (jizhi/broker/core.py);
``SocketSink`` is how its replies and messages reach the sockets. Once a
second the loop checks that its run still exists (jizhi/lifeline.py): a
broker whose supervisor or segments are gone answers what it holds and exits
with EXIT_STALE_RUN. On SIGTERM (after the supervisor's drain) it answers
what it holds OVERLOADED with a retry hint, reads what clients sent until
then, and closes the frontend (``stop_frontend``).
"""
import argparse
import logging
import os
import signal
import time

import zmq

from jizhi import lifeline, logs, protocol, rundir
from jizhi.broker.admission import STOP_RETRY_MS, request_id
from jizhi.broker.connections import REFUSED_RETRY_MS, REPLY_QUEUE, REQUEST_QUEUE, ClientConnections
from jizhi.broker.core import Broker
from jizhi.errors import EXIT_BIND_FAILURE, EXIT_STALE_RUN, OVERLOADED
from jizhi.stats import B_ADMISSION, B_DONE, B_HOUSEKEEPING

log = logging.getLogger("jizhi.broker")

POLL_MS = 100               # the longest the loop sleeps in poll
SWEEP_S = 0.05              # heartbeat, expiry and drain checks: 20 times a second is plenty
LIFELINE_S = 1.0            # how often the loop asks whether its run still exists
BACKEND_BURST = 256         # backend messages read in a row before the frontend gets a turn
FRONTEND_BURST = 32         # client messages read in a row before the backend gets a turn again: under a lagging
                            # loop, DONEs that free slots come between admissions, not after 256 of them
STOP_READ_S = 0.1           # after SIGTERM, the frontend is read this long (then emptied) before it closes


class SocketSink:
    """Where the Broker's outputs go in the process: the frontend (replies) and the backend."""

    def __init__(self):
        self.front = None
        self.back = None
        self.clients = None

    def client(self, envelope, frames):
        try:
            # (copy=True: for frames this small a copy costs less than pyzmq's zero-copy Frames)
            self.front.send_multipart(envelope + frames, flags=zmq.DONTWAIT)
        except zmq.Again:
            # REPLY_QUEUE replies wait for this client already: it does not read them (README, "Limits").
            self.clients.dropped["not_reading"] += 1
            self.clients.note("not_reading", "dropped a reply to a client that does not read its replies "
                              "(%d such replies so far)", self.clients.dropped["not_reading"])
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self.clients.dropped["gone"] += 1    # it disconnected (a Lazy Pirate client gave up on us)
            else:
                log.warning("reply to a client failed: %s", e)
        else:
            self.clients.on_reply(envelope, frames)

    def backend(self, ident, frames):
        """Send; False when the peer is unreachable (gone, or not connected yet)."""
        try:
            self.back.send_multipart([ident] + frames)
        except zmq.ZMQError:
            return False
        return True


class Loop:
    """The sockets and the poll loop around one ``Broker``."""

    def __init__(self, broker, sink):
        self.broker = broker
        self.sink = sink
        self.run = broker.run
        self.settings = broker.settings
        self.front = self.back = self.clients = self.auth = None
        self.stale = None           # why this broker exits as a process of an ended run (jizhi/lifeline.py)

    def open(self):
        ctx = zmq.Context.instance()
        self.front = ctx.socket(zmq.ROUTER)
        secret_file = self.settings.get("security.curve_server_secret")
        if secret_file:
            # CURVE authenticates nobody by itself: the ZAP handler's allow-list does.
            from zmq.auth import load_certificate
            from zmq.auth.thread import ThreadAuthenticator
            self.auth = ThreadAuthenticator(ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=self.settings["security.curve_clients_dir"])
            public, secret = load_certificate(secret_file)
            self.front.curve_secretkey = secret
            self.front.curve_publickey = public
            self.front.curve_server = True
            log.info("frontend requires CURVE; allowed client keys from %s", self.settings["security.curve_clients_dir"])
        self.front.setsockopt(zmq.LINGER, 0)
        # What one client can make us hold (jizhi/broker/connections.py): REPLY_QUEUE replies it has not
        # read (more raise, so they are counted, not queued), REQUEST_QUEUE whole requests waiting (a client
        # sending faster than we admit waits in its own queue, not in our memory) and one arriving.
        self.front.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.front.setsockopt(zmq.RCVHWM, REQUEST_QUEUE)
        self.front.setsockopt(zmq.MAXMSGSIZE, self.settings["limits.max_message_bytes"] + 65536)
        self.clients = ClientConnections(self.front, self.run["frontend"], self.settings)
        self.sink.front, self.sink.clients, self.broker.clients = self.front, self.clients, self.clients
        self.front.bind(self.run["frontend"])
        one, every = self.clients.bounds_mib()
        log.info("client connections: %d served at once (limits.max_connections); one may make the broker hold "
                 "%.0f MiB, all together %d MiB (limits.clients_memory_mb)", self.clients.max_connections, one, every)
        self.back = ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.back.setsockopt(zmq.SNDHWM, 100_000)
        self.sink.back = self.back
        self.back.bind(self.run["backend"])

    def stale_run(self):
        """Why this broker must not answer from its arenas any more (None: it may).

        Its supervisor is gone (re-parented: a SIGKILLed supervisor), or a segment it maps was
        unlinked or replaced (a new run of the instance swept it): an "ok" computed from here on
        would be read from memory nobody writes."""
        if not lifeline.supervisor_alive():
            return f"the supervisor (pid {os.environ.get(lifeline.ENV_SUPERVISOR)}) is gone"
        for pipe in self.broker.pipes.values():
            for gen in pipe.gens.values():
                if not gen.arenas.intact():
                    return f"a shared-memory segment of pipeline {pipe.name} version {gen.versions} was unlinked"
        return None

    def refuse_connection(self, conn, frames):
        """A message from a connection past ``limits.max_connections``: answer it OVERLOADED unread; the
        connection is closed once that reply is written (jizhi/broker/connections.py)."""
        envelope, body = protocol.split_envelope(frames)
        if envelope is None:
            envelope, body = [frames[0], b""], frames[1:]
        self.broker.answers.reply_error(
            envelope, request_id(body), OVERLOADED,
            f"connection limit reached: {self.clients.max_connections} client connections are served "
            "at once (limits.max_connections); this one closes now: retry later or on another node",
            REFUSED_RETRY_MS)
        self.clients.refused_reply_sent(conn)

    def read_frontend(self, most=256):
        """Handle up to ``most`` of the client messages ZeroMQ holds (a connection past the limit is
        answered its refusal, whatever it sent); returns how many there were."""
        cpu = self.broker.cpu
        cpu.enter(B_ADMISSION)
        try:
            return self._read_frontend(most)
        finally:
            cpu.leave()

    def _read_frontend(self, most):
        front = self.front
        for n in range(most):
            # The routing id as a Frame (its descriptor, ZMQ_SRCFD, tells the connection: the guard), the
            # rest as bytes: a copying receive of small frames costs less than Frame objects (measured:
            # 44 against 54 us for a 4-frame request, sent and received).
            try:
                frames = [front.recv(zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                return n
            while front.rcvmore:
                frames.append(front.recv())
            try:
                conn = self.clients.on_message(frames)
                frames[0] = frames[0].bytes
                if conn is not None and conn.refused:
                    self.refuse_connection(conn, frames)
                else:
                    self.broker.on_client(frames)
            except Exception:
                log.exception("unexpected error handling a client message")
                self.broker.admission.malformed += 1
        return most

    def read_backend(self):
        # Backend first: finishing work frees slots and credits for new work.
        cpu = self.broker.cpu
        cpu.enter(B_DONE)
        try:
            for _ in range(BACKEND_BURST):
                frames = self.back.recv_multipart()
                self.broker.on_backend(frames[0], frames[1:])
                if not self.back.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
        finally:
            cpu.leave()

    def loop(self):
        b = self.broker
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.clients.monitor, zmq.POLLIN)
        self.clients.start_guard()
        next_sweep = next_lifeline = 0.0
        while b.running:
            events = dict(poller.poll(b.dispatcher.poll_timeout_ms(b.clock(), POLL_MS)))
            if b.dispatcher.batch_timers:
                b.cpu.enter(B_HOUSEKEEPING)
                try:
                    b.fire_timers(b.clock())
                finally:
                    b.cpu.leave()
            if self.back in events:
                self.read_backend()
            if self.clients.monitor in events:
                self.clients.on_monitor()
            if self.front in events:
                self.read_frontend(FRONTEND_BURST)
            now = b.clock()
            if now < next_sweep and not b.dispatcher.deadline_due(now):
                continue
            next_sweep = now + SWEEP_S
            if now >= next_lifeline:
                next_lifeline = now + LIFELINE_S
                why = self.stale_run()
                if why:
                    log.error("%s: this broker belongs to an ended run; answering what it holds with "
                              "OVERLOADED and exiting", why)
                    self.stale = why
                    break
            b.cpu.enter(B_HOUSEKEEPING)
            try:
                b.sweep(now)
            finally:
                b.cpu.leave()
        self.stop_frontend()
        self.back.close(0)
        zmq.Context.instance().term()

    def stop_frontend(self):
        """The loop ended (SIGTERM, after the supervisor's drain; or a stale run): answer OVERLOADED, with
        retry_after_ms, every request admitted and every request a client sent before the frontend closed.

        After the "closing the frontend" line the frontend is read STOP_READ_S more, so that what a client
        sent before that line has arrived; then what ZeroMQ holds is read until nothing more comes and
        every reply is acknowledged, and every connection is shut down at once (a FIN: the client knows
        nothing more is read; a request it sent in the microseconds before finds the connection gone,
        and the Lazy Pirate client retries it). A broker that dies instead (SIGKILL, a crash) loses what
        it held: README, "Stopping"."""
        b = self.broker
        b.refuse_held()
        before = b.answers.errors[OVERLOADED]
        log.info("stopping: closing the frontend; requests sent until now are answered OVERLOADED "
                 "(retry_after_ms %d)", STOP_RETRY_MS)
        end = time.monotonic() + STOP_READ_S
        while (left := end - time.monotonic()) > 0:
            if self.front.poll(max(1, int(left * 1000))):
                self.read_frontend()
        self.clients.close()
        if self.auth is not None:
            self.auth.stop()   # its sockets live in our context: stop it before the context ends
        # Empty what ZeroMQ holds until every reply is acknowledged and nothing new came, then shut every
        # connection down at once: only a request arriving within those microseconds goes unanswered.
        end = time.monotonic() + STOP_READ_S
        while self.read_frontend(most=100_000) or not self.clients.delivered():
            if time.monotonic() > end:
                break
            self.front.poll(1)
        self.clients.shut_all()
        self.front.close(linger=1000)   # let those last replies leave before the process exits
        log.info("frontend closed: %d requests answered OVERLOADED while stopping", b.answers.errors[OVERLOADED] - before)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jizhi.broker",
                                 description="The jizhi broker (started by jizhid, not by hand).")
    ap.add_argument("--plan", required=True)
    args = ap.parse_args(argv)
    logs.setup("jizhi.broker")
    run = rundir.read_plan(args.plan)
    sink = SocketSink()
    broker = Broker(run, sink, t_start=lifeline.process_start())   # (broker_uptime_s: imports included)
    loop = Loop(broker, sink)
    try:
        loop.open()
    except zmq.ZMQError as e:
        # Not a crash to retry quietly: another process holds the address (an old jizhid?). The
        # supervisor logs the meaning of this exit code and does not report ready meanwhile.
        where = run["backend"] if loop.back is not None else run["frontend"]
        log.error("cannot bind %s: %s (is another jizhid or another program using it?); exiting with code %d",
                  where, e, EXIT_BIND_FAILURE)
        logging.shutdown()
        os._exit(EXIT_BIND_FAILURE)

    def on_term(signum, frame):
        broker.running = False
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info("broker up: frontend=%s backend=%s pipelines=%s", run["frontend"], run["backend"],
             ",".join(run["pipelines"]))
    loop.loop()
    log.info("broker stopped")
    logging.shutdown()
    os._exit(EXIT_STALE_RUN if loop.stale else 0)
