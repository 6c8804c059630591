"""Model versions inside the broker: a version's slots and arenas, its warm-up, the switch, its end.

Runs in the broker process, on its loop's thread. The supervisor adds a
version (VADD: plan, segments, pool); once every worker of its pool has
joined, the broker warms it up by replaying recorded requests (or the
bundle's own ids) through it, answering nobody, and says WARM; the
supervisor ACTIVATEs it (new admissions pin to it) and the version serving
before drains; once a draining version answered its last request the broker
says VIDLE, and the supervisor DROPs it after its workers stopped. A version
whose files broke is failed (VFAIL): its requests are answered OVERLOADED
with a retry hint and its workers retired.

Version states (``VersionState``, jizhi/states.py: the registry's and the
loader's words too) that a version has in the broker, and the broker's legal
transitions (``TRANSITIONS``; an illegal one is logged as a bug):

========  =========================================================  ==========================
state     meaning                                                    next
========  =========================================================  ==========================
loading   its workers join, then its warm-up runs                    warm, serving, failed
warm      the warm-up passed; waits for ACTIVATE                     serving, failed
serving   new requests are pinned to it                              draining, failed
draining  answers what it holds after a newer version took over     serving, failed
failed    its files broke or its warm-up failed; serves nothing      -
========  =========================================================  ==========================

On the wire ``info`` says ``active`` for serving (``jizhictl status`` prints
it), and a plan file's ``active`` is read as serving: ``VersionState.wire``
and ``from_wire``, jizhi/states.py.
"""
import logging

import numpy as np

from jizhi import messages
from jizhi.arena import Arenas
from jizhi.errors import OVERLOADED
from jizhi.states import VersionState

log = logging.getLogger("jizhi.broker")

SUPERVISOR = b"supervisor"  # the supervisor's identity on the backend
WARMUP_BUDGET_S = 30.0      # a warm-up request's time to its deadline (the new workers run at low priority)

V = VersionState
TRANSITIONS = {
    V.LOADING: {V.WARM, V.SERVING, V.FAILED},
    V.WARM: {V.SERVING, V.FAILED},
    V.SERVING: {V.DRAINING, V.FAILED},
    V.DRAINING: {V.SERVING, V.FAILED},
    V.FAILED: set(),
}


class Generation:
    """One model version of a pipeline inside the broker: its plan, arenas and request slots.

    A request is pinned to a generation at admission and lives in its slots
    until answered, so two versions serve side by side during a reload and
    the old one is released once its last request is answered. ``attach``
    maps the arenas (``Arenas``; a unit test gives arrays of its own).
    """

    def __init__(self, plan, segments, settings, state, warmup=None, attach=Arenas):
        self.plan = plan
        self.version = plan["version"]
        self.versions = plan.get("versions") or {plan["model"]: plan["version"]}
        self.vkey = tuple(sorted(self.versions.items()))
        self.slots = settings["limits.max_in_flight"]
        self.arenas = attach(plan, segments, self.slots, settings["limits.max_candidates"])
        self.free = list(range(self.slots - 1, -1, -1))
        self.by_slot = [None] * self.slots
        self.state = VersionState.from_wire(state)
        self.warmup_ids = warmup        # {users, items}: ids from the bundle when no traffic was recorded
        self.warm = None                # the warm-up's progress, once started
        self.idle_sent = False
        self.boot = {}                  # the slowest worker's {start_ms, load_ms}
        self.pool = None                # {group: workers} the supervisor starts for it
        self.watch = None               # {until, invalid, scored}: its first minutes of serving, judged

    def to(self, state):
        if state != self.state and state not in TRANSITIONS[self.state]:
            log.error("illegal version state transition in the broker: version %s %s -> %s (a bug; applied anyway)",
                      self.versions, self.state.value, state.value)
        self.state = state

    def in_flight(self):
        return self.slots - len(self.free)


class Versions:
    """The version verbs of the broker ``b`` (jizhi/broker/core.py): the supervisor's VADD, ACTIVATE,
    VFAIL, VDROP, ROUTES and SHED, the warm-up, and what the broker tells the supervisor (WARM, VIDLE,
    INVALID)."""

    def __init__(self, b):
        self.b = b

    def tell_supervisor(self, msg):
        if not self.b.sink.backend(SUPERVISOR, msg.encode()):
            log.warning("could not tell the supervisor %s (is it restarting?)", msg.T)

    def find(self, pipe, version):
        for gen in pipe.gens.values():
            if gen.version == version:
                return gen
        return None

    def on_add(self, ident, m):
        b = self.b
        pipe = b.pipes.get(m.pipeline)
        if pipe is None:
            return
        gen = Generation(m.plan, m.segments, b.settings, VersionState.LOADING, m.warmup, b.attach)
        gen.pool = m.pool
        old = pipe.gens.get(gen.vkey)
        if old is not None and old.in_flight():
            log.warning("version %s of %s added again while it holds requests; keeping the old one",
                        gen.versions, pipe.name)
            return
        pipe.add(gen)
        log.info("pipeline %s: version %s added (loading; waiting for its workers)", pipe.name, gen.versions)
        if pipe.has_pool(gen):
            self.start_warmup(pipe, gen)

    def start_warmup(self, pipe, gen):
        """Replay recorded requests (or the bundle's own ids) through a loading version, answering nobody."""
        if gen.state is not VersionState.LOADING or gen.warm is not None:
            return
        b = self.b
        n_want = min(b.settings["models.warmup_requests"], gen.slots)
        samples = [r for r in b.admission.ring if r[0] == pipe.name][-n_want:]
        source = "recorded traffic"
        if not samples and gen.warmup_ids:
            source = "ids from the bundle (no traffic recorded yet)"
            users = np.frombuffer(gen.warmup_ids["users"], dtype=np.uint64)
            items = np.frombuffer(gen.warmup_ids["items"], dtype=np.uint64)
            per = max(1, items.shape[0] // max(1, users.shape[0]))
            samples = [(pipe.name, int(u), items[i * per:(i + 1) * per], None, 10) for i, u in enumerate(users)]
            samples = samples[:n_want]
        now = b.clock()
        gen.warm = {"sent": len(samples), "done": 0, "error": None, "t0": now, "invalid": 0, "scored": 0}
        log.info("pipeline %s: version %s has all its workers; warming up with %d requests (%s)",
                 pipe.name, gen.versions, len(samples), source if samples else "nothing to replay")
        if not samples:
            self.warm_done(pipe, gen)
            return
        for _, user, items, rs, top_k in samples:
            b.dispatcher.enqueue(pipe, gen, None, None, user, items, rs, top_k, False, now + WARMUP_BUDGET_S, now,
                                 warm=True)

    def warm_result(self, req, error, invalid=0, scored=0):
        gen, pipe = req.gen, req.pipe
        w = gen.warm
        if w is None:
            return
        w["done"] += 1
        w["invalid"] += invalid
        w["scored"] += scored
        if error and w["error"] is None:
            w["error"] = error
        if w["done"] == w["sent"]:
            self.warm_done(pipe, gen)

    def warm_done(self, pipe, gen):
        b = self.b
        w = gen.warm
        took_ms = round((b.clock() - w["t0"]) * 1000, 1)
        if w["error"] is None and w["invalid"] > b.max_invalid_share * w["scored"]:
            # The whole warm-up is the sample: judged whatever its size (a version that passes is
            # judged again on live traffic for models.invalid_watch_s).
            w["error"] = (f"{w['invalid']} of {w['scored']} scores not finite (NaN or infinite), "
                          f"{w['invalid'] / max(1, w['scored']):.2%} > models.max_invalid_share "
                          f"{b.max_invalid_share:g}")
        if w["error"] is None:
            gen.to(VersionState.WARM)
            log.info("pipeline %s: version %s warm after %d requests in %.0f ms", pipe.name, gen.versions,
                     w["sent"], took_ms)
        else:
            log.error("pipeline %s: version %s failed its warm-up: %s", pipe.name, gen.versions, w["error"])
        self.tell_supervisor(messages.Warm(pipe.name, gen.version, w["error"] is None, w["error"], w["sent"],
                                           took_ms, gen.boot))

    def on_activate(self, ident, m):
        b = self.b
        pipe = b.pipes.get(m.pipeline)
        gen = None if pipe is None else self.find(pipe, m.version)
        if gen is None or gen.state is VersionState.FAILED:
            log.error("cannot activate %s version %s: not loaded here", m.pipeline, m.version)
            return
        old = pipe.gens.get(pipe.active)
        pipe.active = gen.vkey
        gen.to(VersionState.SERVING)
        if b.invalid_watch_s > 0:
            gen.watch = {"until": b.clock() + b.invalid_watch_s, "invalid": 0, "scored": 0}
        for g in pipe.groups:
            for w in pipe.workers.get((g, gen.vkey), []):
                b.sink.backend(w.ident, messages.Priority().encode())
        log.info("pipeline %s: new requests now pinned to %s%s", pipe.name, gen.versions,
                 f" ({old.versions} drains {old.in_flight()} in flight)" if old is not None and old is not gen else "")
        if old is not None and old is not gen and old.state is VersionState.SERVING:
            old.to(VersionState.DRAINING)
            if old.in_flight() == 0:
                self.idle(pipe, old)

    def idle(self, pipe, gen):
        """A draining version answered its last request: tell the supervisor, once."""
        if not gen.idle_sent:
            gen.idle_sent = True
            log.info("pipeline %s: version %s answered its last request", pipe.name, gen.versions)
            self.tell_supervisor(messages.VersionIdle(pipe.name, gen.version))

    def on_fail(self, ident, m):
        """A version's files broke under it: answer its requests (retry) and stop feeding its workers."""
        b = self.b
        pipe = b.pipes.get(m.pipeline)
        gen = None if pipe is None else self.find(pipe, m.version)
        if gen is None:
            return
        gen.to(VersionState.FAILED)
        if pipe.active == gen.vkey:
            pipe.active = None
        n = 0
        for req in list(gen.by_slot):
            if req is not None and not req.answered:
                n += 1
                b.answers.error(req, OVERLOADED, f"model version {gen.versions} failed ({m.reason}); "
                                "retry: the previous version is loading", 500)
        for g in pipe.groups:
            for w in list(pipe.workers.get((g, gen.vkey), [])):
                b.roster.retire(w)
        log.error("pipeline %s: version %s failed (%s): %d requests answered OVERLOADED for a retry",
                  pipe.name, gen.versions, m.reason, n)

    def on_drop(self, ident, m):
        b = self.b
        pipe = b.pipes.get(m.pipeline)
        gen = None if pipe is None else self.find(pipe, m.version)
        if gen is None:
            return
        for req in gen.by_slot:
            if req is not None and not req.answered:
                b.answers.error(req, OVERLOADED, "model version unloaded; retry", 100)
        for g in pipe.groups:
            for w in list(pipe.workers.get((g, gen.vkey), [])):
                b.roster.retire(w)
            pipe.channels.pop((g, gen.vkey), None)
            pipe.workers.pop((g, gen.vkey), None)
        del pipe.gens[gen.vkey]
        pipe.pinned.pop(gen.vkey, None)
        # Let go of the mappings now (each holds an fd of an unlinked segment), not at some later GC:
        # requests still in the deadline heap point at the generation, not at its arrays.
        gen.by_slot = [None] * gen.slots
        gen.arenas = None
        if pipe.active == gen.vkey:
            pipe.active = None
        log.info("pipeline %s: version %s released", pipe.name, gen.versions)

    def on_routes(self, ident, m):
        pipe = self.b.pipes.get(m.pipeline)
        if pipe is not None:
            pipe.set_routes(m.routes)
            log.info("pipeline %s: A/B fractions now %s", pipe.name,
                     {g: {n: f for n, f, _ in r.groups} for g, r in pipe.routers.items()})

    def on_shed(self, ident, m):
        pipe = self.b.pipes.get(m.pipeline)
        if pipe is not None:
            pipe.shedding = {"mode": m.mode, "quota": m.quota, "trim": m.trim, "policy": m.policy}
            if pipe.cut is not None:
                pipe.cut.trim = m.trim
                if m.reset:
                    pipe.cut.reset()
