"""The worker roster: which workers serve which (group, version set), and their comings and goings.

Runs in the broker process, on its loop's thread. A worker announces itself
(READY: pipeline, group, wid, versions, prefetch window, run); it is
refused when it belongs to another run (STOP) or serves a version the
broker has not loaded. Any message from a known worker is life; one that
says nothing for 3 x ``workers.heartbeat_interval_s`` (or 30 s while it
holds events) is dropped. A worker leaves by retirement (the supervisor's
RETIRE for a scale-down, its own LEAVING to be recycled, its version
failed): it is sent nothing new and STOPped once it holds nothing, so no
request is dropped. A worker that dies (the supervisor's DEAD, its silence,
a send that fails) is dropped: its events go back to the front of their
channel, and a request that was held at more than MAX_CRASHES deaths is
answered INTERNAL instead (it may be what kills them).
"""
import logging

from jizhi import messages
from jizhi.errors import INTERNAL
from jizhi.states import VersionState

log = logging.getLogger("jizhi.broker")

MAX_CRASHES = 2  # worker deaths a request may witness before it is answered INTERNAL
SILENT_HOLDING_S = 30.0     # a worker holding events may be quiet this long (a slow batch) before it is dropped


class WorkerRef:
    """A worker as the broker knows it: ``ident`` its routing id on the backend, ``inflight``
    {eid: (requests, when sent)} the events it holds (at most ``window``), ``done`` the events it
    finished (its first ``COLD_EVENTS`` and first ``COLD_S`` are its warm-up: jizhi/shedding.py),
    ``done_at`` when the last one came back and ``joined`` when it said READY."""
    __slots__ = ("ident", "pipeline", "group", "wid", "pid", "vkey", "window", "inflight", "last_seen",
                 "retiring", "done", "done_at", "joined")


class Roster:
    """The workers of the broker ``b`` (jizhi/broker/core.py), by routing id."""

    def __init__(self, b):
        self.b = b
        self.workers = {}            # ident -> WorkerRef
        self.hb_expiry_s = 3 * b.settings["workers.heartbeat_interval_s"]

    def seen(self, ident, now):
        """Any message is life: the worker ``ident`` (None when unknown)."""
        w = self.workers.get(ident)
        if w is not None:
            w.last_seen = now
        return w

    def on_ready(self, ident, m):
        b = self.b
        if m.run != b.run["run_id"]:
            # A worker of another run (this broker outlived its supervisor, or the worker did): its
            # arenas are not ours, so whatever it computed would be answered from the wrong memory.
            log.error("worker %r belongs to run %s, this broker to run %s: telling it to stop", ident,
                      m.run, b.run["run_id"])
            b.sink.backend(ident, messages.Stop().encode())
            return
        pipe = b.pipes.get(m.pipeline)
        if pipe is None or m.group not in pipe.groups:
            log.warning("worker %r announced an unknown pipeline/group", ident)
            return
        w = WorkerRef()
        w.ident = ident
        w.done = 0
        w.done_at = 0.0
        w.joined = self.b.clock()
        w.pipeline = pipe.name
        w.group = m.group
        w.wid = m.wid
        w.pid = m.pid
        w.vkey = tuple(sorted(m.versions.items()))
        gen = pipe.gens.get(w.vkey)
        if gen is None or gen.state is VersionState.FAILED:
            log.warning("worker %r serves %s, a version pipeline %s has not loaded (or failed); ignoring it",
                        ident, m.versions, pipe.name)
            return
        w.window = m.window
        for k, v in m.boot.items():
            if isinstance(v, (int, float)):
                gen.boot[k] = max(gen.boot.get(k, 0), v)
        w.inflight = {}
        w.retiring = False
        w.last_seen = b.clock()
        old = self.workers.get(ident)
        if old is not None:
            self.drop(old, "re-registered")
        self.workers[ident] = w
        pipe.workers[(w.group, w.vkey)].append(w)
        log.info("worker joined: pipeline=%s group=%s wid=%s pid=%s versions=%s",
                 pipe.name, w.group, w.wid, w.pid, dict(w.vkey))
        if gen.state is VersionState.LOADING and pipe.has_pool(gen):
            b.versions.start_warmup(pipe, gen)
        elif gen.state is VersionState.SERVING:
            # Joined a version that serves already (a restart, a scale-up): serve at normal priority.
            b.sink.backend(ident, messages.Priority().encode())
        b.dispatcher.dispatch(pipe, w.group, w.vkey)

    def on_done(self, ident, m):
        w = self.workers.get(ident)
        if w is None:
            self.resync(ident)
        else:
            self.b.dispatcher.on_done(w, m)

    def on_heartbeat(self, ident, m):
        if ident not in self.workers:
            self.resync(ident)

    def resync(self, ident):
        """A worker of a previous broker (this one restarted): ask it to register again."""
        self.b.sink.backend(ident, messages.Resync().encode())

    def on_leaving(self, ident, m):
        w = self.workers.get(ident)
        if w is not None:
            self.retire(w)

    def on_dead(self, ident, m):
        for w in self.find(m.pipeline, m.group, m.wid, m.pid):
            self.drop(w, "exited")

    def on_retire(self, ident, m):
        for w in self.find(m.pipeline, m.group, m.wid, m.pid):
            self.retire(w)

    def find(self, pipeline, group, wid, pid):
        return [w for w in list(self.workers.values()) if (w.pipeline, w.group, w.wid, w.pid) == (pipeline, group, wid, pid)]

    def retire(self, w):
        """Dispatch nothing more to ``w``; STOP it once it holds nothing (scale down, no request dropped)."""
        if w.retiring:
            return
        pipe = self.b.pipes[w.pipeline]
        lst = pipe.workers.get((w.group, w.vkey), [])
        if w in lst:
            lst.remove(w)
        w.retiring = True
        log.info("retiring worker pipeline=%s group=%s wid=%s pid=%s (%d events held)",
                 w.pipeline, w.group, w.wid, w.pid, len(w.inflight))
        self.stop_if_retired(w)

    def stop_if_retired(self, w):
        if w.retiring and not w.inflight and self.workers.get(w.ident) is w:
            del self.workers[w.ident]
            self.b.sink.backend(w.ident, messages.Stop().encode())

    def drop(self, w, why):
        """Forget a worker; its events go back to the front of their channel."""
        b = self.b
        if self.workers.get(w.ident) is not w:
            return
        del self.workers[w.ident]
        pipe = b.pipes[w.pipeline]
        lst = pipe.workers.get((w.group, w.vkey), [])
        if w in lst:
            lst.remove(w)
        chan = pipe.channels[(w.group, w.vkey)]
        requeued = 0
        for taken, _ in reversed(list(w.inflight.values())):
            for req in reversed(taken):
                req.held -= 1
                req.crashes += 1
                if req.answered:
                    b.answers.release_if_idle(req)
                elif req.crashes > MAX_CRASHES:
                    # A request that was in flight at every crash may be what kills workers: stop feeding it.
                    b.answers.error(req, INTERNAL, f"{req.crashes} workers died while holding this request")
                else:
                    chan.appendleft(req)
                    requeued += 1
        w.inflight.clear()
        log.warning("worker left: pipeline=%s group=%s wid=%s pid=%s (%s); %d requests requeued",
                    w.pipeline, w.group, w.wid, w.pid, why, requeued)
        b.dispatcher.dispatch(pipe, w.group, w.vkey)

    def expire(self, now):
        """Drop the workers gone quiet: idle ones after the heartbeat expiry, busy ones after
        SILENT_HOLDING_S (or the expiry, when longer)."""
        for w in list(self.workers.values()):
            if now - w.last_seen > self.hb_expiry_s and not w.inflight:
                self.drop(w, "no heartbeat")
            elif w.inflight and now - w.last_seen > max(self.hb_expiry_s, SILENT_HOLDING_S):
                self.drop(w, "silent while holding events")
