"""The broker without its sockets: its state, a table of handlers per message type, its timers.

Runs in the broker process, on its loop's thread (jizhi/broker/loop.py), and
in unit tests that step it by hand (tests/test_broker_steps.py). Inputs are
calls: ``on_client(frames)`` for a client's message, ``on_backend(ident,
frames)`` for a worker's or the supervisor's, ``fire_timers(now)`` and
``sweep(now)`` for time; outputs go through ``sink`` (``client(envelope,
frames)``, ``backend(ident, frames) -> sent``), and ``clock`` is the time
(``time.monotonic`` in the process). Nothing here touches a socket.

The verbs live with their concept, one module each: admission
(``Admission``: client messages, limits, retry hints, recording), dispatch
(``Dispatcher``: channels, batching, credit, DONE), answers (``Answers``:
replies, slots), the roster (``Roster``: workers), versions (``Versions``:
warm-up, switch, failure) and figures (``info``, ``load``). A request
followed through them: ``admission.admit`` -> ``dispatcher.enqueue`` ->
``arrive`` -> ``dispatch`` (an Event to a worker) -> ``on_done`` ->
``advance`` ... -> ``answers.ok`` -> ``release_if_idle``.
"""
import logging
import os
import time

from jizhi import messages
from jizhi.arena import Arenas
from jizhi.broker import figures
from jizhi.broker.admission import STOP_RETRY_MS, Admission
from jizhi.broker.answers import Answers
from jizhi.broker.dispatch import Dispatcher, PipelineState
from jizhi.broker.roster import Roster
from jizhi.broker.versions import Generation, Versions
from jizhi.errors import OVERLOADED
from jizhi.overlay import Overlay
from jizhi.qcache import QueryCache
from jizhi.states import VersionState
from jizhi.stats import C_PID, CpuPhases, Stats

log = logging.getLogger("jizhi.broker")


class Broker:
    """The broker's state and verbs for the run ``run`` (the plan file's contents).

    ``attach`` maps a version's arenas (``Arenas``); ``t_start`` is when the process started
    (``broker_uptime_s``; default: now); ``clients`` the frontend's connections (their figures in
    ``info``), set by the loop once it opened the frontend.
    """

    def __init__(self, run, sink, clock=time.monotonic, attach=Arenas, t_start=None):
        self.run = run
        self.settings = s = run["settings"]
        self.sink = sink
        self.clock = clock
        self.attach = attach
        self.clients = None
        self.t_start = clock() if t_start is None else t_start
        self.max_invalid_share = s["models.max_invalid_share"]
        self.invalid_watch_s = s["models.invalid_watch_s"]
        self.pipes = {name: PipelineState(plan, s, clock) for name, plan in run["pipelines"].items()}
        for name, pipe in self.pipes.items():
            # Every version the supervisor has loaded (a restarted broker picks up where it was).
            for entry in run["versions"][name].values():
                gen = Generation(entry["plan"], entry["segments"], s, entry["state"], entry.get("warmup"), attach)
                pipe.add(gen)
                if gen.state is VersionState.SERVING:
                    pipe.active = gen.vkey
        self.stats = Stats.attach(run.get("stats"))
        if self.stats is not None:
            for name, p in self.pipes.items():
                p.row = run["stats"]["map"][name]
                self.stats.counters[p.row] = 0
                self.stats.counters[p.row, C_PID] = os.getpid()
                self.stats.errors[p.row] = 0
                self.stats.hist[p.row] = 0
                self.stats.sum_us[p.row] = 0
        # The CPU account of the loop's thread by phase (jizhi/stats.py, BROKER_PHASES; `jizhictl bench --cpu`).
        self.cpu = CpuPhases(self.stats.broker_cpu_ns if self.stats is not None else None)
        if self.stats is not None:
            self.stats.broker_cpu_ns[:] = 0
        self.default_pipeline = run["default_pipeline"]
        self.draining = False
        self.drain_requester = None
        self.running = True
        self.stopping = False       # the loop ended: every request read is answered OVERLOADED until the close
        self.answers = Answers(self)
        self.dispatcher = Dispatcher(self)
        self.roster = Roster(self)
        self.versions = Versions(self)
        self.admission = Admission(self, Overlay.attach(run.get("overlay")), QueryCache.attach(run.get("qcache")))
        # What the backend's messages do: one handler per type, each given (sender's routing id, message).
        # A type missing here (one the broker itself sends) is ignored.
        self.handlers = {
            messages.Ready: self.roster.on_ready,
            messages.Done: self.roster.on_done,
            messages.Heartbeat: self.roster.on_heartbeat,
            messages.Leaving: self.roster.on_leaving,
            messages.WorkerDead: self.roster.on_dead,
            messages.Retire: self.roster.on_retire,
            messages.Drain: self.on_drain,
            messages.Resume: self.on_resume,
            messages.Info: self.on_info,
            messages.Load: self.on_load,
            messages.Stop: self.on_stop,
            messages.VersionAdd: self.versions.on_add,
            messages.Activate: self.versions.on_activate,
            messages.VersionFail: self.versions.on_fail,
            messages.VersionDrop: self.versions.on_drop,
            messages.Routes: self.versions.on_routes,
            messages.Shed: self.versions.on_shed,
            messages.Record: self.admission.on_record,
        }

    # -- inputs ---------------------------------------------------------------

    def on_client(self, frames):
        """A client's message (its routing id first)."""
        self.admission.on_client(frames)

    def on_backend(self, ident, frames):
        """A worker's or the supervisor's message (``frames`` after the routing id ``ident``)."""
        try:
            msg = messages.decode(frames)
        except ValueError:
            log.warning("dropping a malformed backend message from %r", ident)
            return
        self.roster.seen(ident, self.clock())
        handler = self.handlers.get(type(msg))
        if handler is not None:
            handler(ident, msg)
            if self.admission.waiting:      # (a DONE, a new version serving, a dead worker's answers free slots)
                self.admission.unpark()

    def fire_timers(self, now):
        """The held partial batches whose ``batch_wait_ms`` is over go out (a request found expired frees
        its slot)."""
        self.dispatcher.fire_timers(now)
        if self.admission.waiting:
            self.admission.unpark()

    def sweep(self, now):
        """Housekeeping, about 20 times a second: heartbeats, deadlines, silent workers, idle versions,
        an abandoned recording, the answer to a drain."""
        if self.stats is not None:
            for p in self.pipes.values():
                self.stats.heartbeat[p.row] = now
        self.dispatcher.expire(now)
        if self.admission.waiting:
            self.admission.expire_waiting(now)
            self.admission.unpark()         # (also a slot held for a client told to retry, once its ticket lapsed)
        self.roster.expire(now)
        for p in self.pipes.values():
            for gen in p.gens.values():
                # (also after a broker restart: a draining version may hold nothing already)
                if gen.state is VersionState.DRAINING and not gen.idle_sent and gen.in_flight() == 0:
                    self.versions.idle(p, gen)
        self.admission.abandon_recording(now)
        if self.draining and self.drain_requester is not None and not self.admission.waiting \
                and all(p.in_flight() == 0 for p in self.pipes.values()):
            self.sink.backend(self.drain_requester, messages.Drained().encode())
            self.drain_requester = None

    # -- the broker's own messages ----------------------------------------------

    def on_drain(self, ident, m):
        self.draining = True
        if m.reply:
            self.drain_requester = ident
        log.info("draining: admitting nothing new, %d requests in flight, %d waiting for a slot",
                 sum(p.in_flight() for p in self.pipes.values()), self.admission.waiting)

    def on_resume(self, ident, m):
        self.draining = False
        self.drain_requester = None
        log.info("admitting again after a drain")

    def on_info(self, ident, m):
        self.sink.backend(ident, messages.Info(self.info()).encode())

    def on_load(self, ident, m):
        self.sink.backend(ident, messages.Load(figures.load(self.pipes)).encode())

    def on_stop(self, ident, m):
        self.running = False

    def info(self):
        return figures.info(self)

    def refuse_held(self):
        """The broker stops: answer OVERLOADED, with retry_after_ms, every request it holds."""
        self.stopping = True
        self.admission.refuse_waiting("server stopping; retry on another node or later", STOP_RETRY_MS)
        for pipe in self.pipes.values():
            for req in [r for gen in pipe.gens.values() for r in gen.by_slot]:
                if req is not None and not req.answered:
                    self.answers.error(req, OVERLOADED, "server stopping; retry on another node or later",
                                       STOP_RETRY_MS)
