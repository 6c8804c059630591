"""Dispatch and batching: channels, the order of a queue, credit, events out and DONEs back.

Runs in the broker process, on its loop's thread. Per pipeline
(``PipelineState``) one channel (a deque) per (group, version set); a request
enters the channel of every source group (``enqueue``, ``arrive``) and moves
to a group once all of that group's predecessor groups are done with it
(``advance``: fan-out and join). ``dispatch`` sends a group's queue to its
workers as events: a worker holds at most ``window`` events at once (its
credit), an event carries up to the group's ``batch`` *live* requests (one
whose deadline passed is answered DEADLINE_EXCEEDED, never computed), and a
partial batch waits while every worker is busy (it would only wait in the
worker's queue) or ``batch_wait_ms`` for company. With
``broker.dispatch = "critical_path"`` a queue is ordered least slack first
(``PipelineState.order``), else first in, first out. ``on_done`` takes a
worker's DONE: errors are answered, the sink group's requests answered ok,
the others advanced.

A request's deadline is ``deadline_s`` (jizhi/messages.py) from admission to
the stage. Per-message work is O(1) in the number of candidates: headers
are msgpack, arrays stay in shared memory.
"""
import collections
import heapq
import itertools
import logging

from jizhi import messages
from jizhi.broker.admission import RetryHints
from jizhi.broker.figures import GroupStats, RequestStats
from jizhi.errors import DEADLINE_EXCEEDED, INTERNAL
from jizhi.shedding import COLD_EVENTS, COLD_S, AdmissionCut
from jizhi.states import VersionState
from jizhi.stats import B_DISPATCH
from jizhi.workers.ab_dispatch import Router

log = logging.getLogger("jizhi.broker")


class Request:
    """One admitted request (or a warm-up's), from admission to its answer and the release of its slot."""
    __slots__ = ("crashes", "rid", "envelope", "pipe", "gen", "slot", "n", "deadline_s", "user", "top_k",
                 "ret_all", "vkey", "pending", "held", "answered", "t_recv", "t_enq", "timings", "counts", "warm",
                 "ab", "frontier", "heads", "feats", "keep", "cost", "cold")


class PipelineState:
    """One pipeline's channels, workers and versions inside the broker."""

    def __init__(self, plan, settings, clock):
        self.plan = plan
        self.name = plan["name"]
        self.groups = plan["groups"]
        self.sources = plan["sources"]
        self.sink = plan["sink"]
        self.gens = {}                                              # version-set key -> Generation
        self.active = None                                          # the key new admissions pin to
        self.pinned = {}                                            # version-set key -> {model: version}
        self.channels = collections.defaultdict(collections.deque)   # (group, vkey) -> deque[Request]
        self.workers = collections.defaultdict(list)                # (group, vkey) -> [WorkerRef]
        self.clock = clock
        self.stats = {g: GroupStats(clock) for g in self.groups}
        self.requests = RequestStats(clock)
        self.preds = {g: len(self.groups[g]["prev"]) for g in self.groups}
        self.slots = settings["limits.max_in_flight"]
        self.has_qcache = any(st["processor"] == "query_cache" for st in plan["stages"].values())
        self.qc_candidates = 0      # candidates of answered requests, and how many the query cache answered
        self.qc_hits = 0
        self.invalid_scores = 0     # candidates dropped from ok replies for a NaN or infinite score
        self.invalid_logged = (0.0, 0)   # when the last log line about them went out, and the count then
        self.unknown_users = 0      # ok replies whose user the profiles do not know (unknown_user 1)
        # A/B dispatch (workers/ab_dispatch.py): groups the broker routes itself, and the A/B group of
        # every group in a branch; per A/B group figures.
        self.routers = {}
        self.ab_stats = {}
        self.set_routes({g: grp["router"] for g, grp in self.groups.items() if grp.get("router")})
        self.branch = {g: tuple(grp["branch"]) for g, grp in self.groups.items() if grp.get("branch")}
        self.worker_groups = [g for g in self.groups if g not in self.routers]
        self.shedding = None        # {mode, quota, trim, policy} from the supervisor, when a shedder runs here
        # The admission cut (jizhi/shedding.py) of the group that holds the shedder, when there is one.
        shedder = next((g for g, grp in self.groups.items()
                        if any(plan["stages"][st]["processor"] == "shedder" for st in grp["stages"])), None)
        self.cut_group = shedder
        self.cut = None if shedder is None else AdmissionCut(settings["shed.high"] * settings["shed.slo_ms"] / 1000.0)
        self.refused = 0            # requests refused OVERLOADED for want of a slot (load figures)
        self.line = collections.deque()   # (envelope, message, t_recv) waiting for a slot (jizhi/broker/admission.py)
        self.waited = 0             # requests that waited in it
        self.peak_in_flight = 0     # the most requests in flight in one version since the last load figures
        # Head scores a reply can carry (heads: true): the combiners' inputs that cross processes.
        self.head_columns = [c for st in plan["stages"].values() if st["processor"] == "combiner"
                             for c in st["inputs"] if c in plan["arenas"]]
        self.critical_path = settings.get("broker.dispatch") == "critical_path"
        self.rem_s = {g: 0.0 for g in self.groups}       # remaining critical path from a group's start, seconds
        self.rem_at = 0.0
        self.retry = RetryHints(max((self.groups[g]["batch"] for g in self.worker_groups), default=1))
        self.row = None             # its row in the stats segment (jizhi/stats.py), when there is one

    def remaining(self, now):
        """Each group's remaining critical path (its service time plus the longest path after it),
        from the measured service times; refreshed at most every 100 ms."""
        if now - self.rem_at < 0.1:
            return self.rem_s
        self.rem_at = now
        for g in reversed(self.plan["group_order"]):
            after = max((self.rem_s[n] for n in self.groups[g]["next"]), default=0.0)
            self.rem_s[g] = self.stats[g].svc_ewma_us / 1e6 + after
        return self.rem_s

    def order(self, chan, group, now):
        """Critical-path-first: reorder a queue so the events whose delay delays their request come
        first, least slack first; a branch whose request still waits on a slower branch (its float:
        the request's remaining critical path minus this branch's) comes after them, least float first."""
        rem = self.remaining(now)
        mine = rem[group]

        def key(req):
            longest = max((rem[f] for f in req.frontier), default=mine)
            slack = req.deadline_s - now - longest
            floating = longest - mine
            waits_anyway = floating > 0.5 * self.stats[group].svc_ewma_us / 1e6
            return (waits_anyway, floating if waits_anyway else slack)

        ordered = sorted(chan, key=key)
        chan.clear()
        chan.extend(ordered)

    def set_routes(self, configs):
        """(Re)configure the A/B routers: ``{router group: its stage config}`` (a reload changes fractions)."""
        for g, config in configs.items():
            self.routers[g] = r = Router(config)
            stats = self.ab_stats.setdefault(g, {})
            for name in r.names:
                stats.setdefault(name, {"requests": RequestStats(self.clock), "errors": collections.Counter()})

    def add(self, gen):
        self.gens[gen.vkey] = gen
        self.pinned[gen.vkey] = gen.versions

    def serving(self):
        gen = self.gens.get(self.active)
        return gen if gen is not None and gen.state is VersionState.SERVING else None

    def has_workers(self, vkey):
        return all(self.workers.get((g, vkey)) for g in self.worker_groups)

    def has_pool(self, gen):
        """Every worker the supervisor starts for ``gen`` has joined (a warm-up must warm all of them)."""
        pool = gen.pool or {}
        return all(len(self.workers.get((g, gen.vkey), ())) >= pool.get(g, 1) for g in self.worker_groups)

    def ready(self):
        return self.serving() is not None and self.has_workers(self.active)

    def in_flight(self):
        return sum(g.in_flight() for g in self.gens.values())

    def quota(self, n, budget_s, now):
        """The fraction of its ``n`` candidates a request admitted ``now`` keeps (None: all; shedding
        off or no shedder), and the candidates it keeps (its ``cost``), counted in the admission cut's
        backlog until its shedder group is done with it."""
        sh = self.shedding
        if self.cut is None or sh is None or sh["mode"] == "off":
            return None, 0.0
        cut = self.cut
        if sh["mode"] == "manual":
            q = sh["quota"]
        else:
            cut.workers = len(self.workers.get((self.cut_group, self.active), ()))
            gen = self.gens.get(self.active)
            q = cut.quota(n, budget_s, now, len(gen.free) / gen.slots if gen is not None and gen.slots else 1.0)
        kept = max(q * n, 1e-9)
        cut.admitted(kept)
        return q, kept

    def done_with(self, req):
        """``req`` leaves the admission cut's backlog (its shedder group is done with it, or it ended)."""
        if req.cost:
            self.cut.left(req.cost, self.in_flight())
            req.cost = 0.0


class Dispatcher:
    """The request path of the broker ``b`` (jizhi/broker/core.py) from a slot to the last group's DONE."""

    def __init__(self, b):
        self.b = b
        self.deadlines = []          # heap of (deadline_s, seq, Request)
        self.seq = itertools.count()
        self.eids = itertools.count(1)
        self.batch_timers = {}       # (pipeline, group, vkey) -> when a held partial batch is due

    def enqueue(self, pipe, gen, envelope, rid, user, items, rs, top_k, ret_all, deadline_s, t_recv, warm=False,
                feats=None, keep=None, cost=0.0, t_enq=None):
        """Pin a request to ``gen`` (one of its slots) and queue it at the pipeline's sources. ``feats``: the
        request's own features (protocol ``_request_features``), carried to every worker in the event;
        ``keep``, ``cost``: its quota and predicted cost (``PipelineState.quota``); ``t_enq``: when it is
        queued, if later than received (it waited for a slot)."""
        req = Request()
        req.feats = feats
        req.keep = keep
        req.cost = cost
        req.cold = False
        req.rid = rid
        req.envelope = envelope
        req.pipe = pipe
        req.gen = gen
        req.warm = warm
        req.slot = slot = gen.free.pop()
        gen.by_slot[slot] = req
        req.n = n = items.shape[0]
        req.deadline_s = deadline_s
        req.user = user
        req.top_k = min(top_k, n)  # never more than n; a huge top_k would overflow int64 in the worker
        req.ret_all = ret_all
        req.vkey = gen.vkey
        req.pending = dict(pipe.preds)
        req.held = 0
        req.crashes = 0
        req.answered = False
        req.t_recv = t_recv
        req.t_enq = t_recv if t_enq is None else t_enq
        req.timings = {}
        req.counts = {}
        req.ab = {}
        req.frontier = set()
        req.heads = False
        a = gen.arenas.cols
        a["item_ids"][slot, :n] = items
        if rs is not None:
            a["recall_scores"][slot, :n] = rs
        else:
            a["recall_scores"][slot, :n] = 0.0
        heapq.heappush(self.deadlines, (deadline_s, next(self.seq), req))
        touched = set()
        for g in pipe.sources:
            self.arrive(pipe, req, g, touched)
        for g in touched:
            self.dispatch(pipe, g, req.vkey)
        return req

    def arrive(self, pipe, req, group, touched):
        """``req`` has every input of ``group``: queue it there, or pass the group here: route it (an
        A/B dispatch) or skip it (a branch of another A/B group)."""
        branch = pipe.branch.get(group)
        if branch is not None and req.ab.get(branch[0]) != branch[1]:
            self.advance(pipe, req, group, touched)
            return
        router = pipe.routers.get(group)
        if router is not None:
            req.ab[group] = router.names[router.route(req.user)]
            self.advance(pipe, req, group, touched)
            return
        pipe.channels[(group, req.vkey)].append(req)
        req.frontier.add(group)
        touched.add(group)

    def advance(self, pipe, req, group, touched):
        """``group`` is done with ``req``: the groups after it whose inputs are all there receive it."""
        for nxt in pipe.groups[group]["next"]:
            req.pending[nxt] -= 1
            if req.pending[nxt] == 0:
                self.arrive(pipe, req, nxt, touched)

    def dispatch(self, pipe, group, vkey):
        """Send ``group``'s queue (of version set ``vkey``) to its workers, as far as their credit goes."""
        b = self.b
        key = (group, vkey)
        chan = pipe.channels.get(key)
        workers = pipe.workers.get(key)
        if not chan or not workers:
            return
        batch_max = pipe.groups[group]["batch"]
        wait_s = pipe.groups[group].get("batch_wait_ms", 0.0) / 1000.0
        stats = pipe.stats[group]
        wait_key = "wait_" + group
        now = b.clock()
        if pipe.critical_path and len(chan) > 1:
            pipe.order(chan, group, now)
        while chan:
            w = min(workers, key=lambda x: len(x.inflight))
            if len(w.inflight) >= w.window:
                return
            if len(chan) < batch_max:
                if w.inflight:
                    # Every worker is busy: a partial batch would only wait in its queue.
                    # Keep collecting; the next DONE finds an idle worker and a fuller batch.
                    return
                due = chan[0].t_enq + wait_s
                if due > now:
                    # batch_wait_ms: hold a partial batch a little for company (latency for throughput).
                    self.batch_timers[(pipe.name, group, vkey)] = due
                    return
            taken = []
            while chan and len(taken) < batch_max:
                req = chan.popleft()
                if req.answered:
                    b.answers.release_if_idle(req)
                    continue
                if req.deadline_s <= now:
                    b.answers.error(req, DEADLINE_EXCEEDED, "deadline passed while queued for " + group)
                    continue
                taken.append(req)
            if not taken:
                return
            b.cpu.enter(B_DISPATCH)
            try:
                sent = self.send_event(pipe, vkey, w, taken, now, stats, wait_key)
            finally:
                b.cpu.leave()
            if not sent:
                for req in taken:
                    req.held -= 1
                    chan.appendleft(req)
                b.roster.drop(w, "unreachable")
                workers = pipe.workers.get(key)
                if not workers:
                    return

    def send_event(self, pipe, vkey, w, taken, now, stats, wait_key):
        """One Event of the requests ``taken`` to worker ``w``; False when it is unreachable."""
        b = self.b
        eid = next(self.eids)
        rows = []
        for req in taken:
            req.held += 1
            wait_us = int((now - req.t_enq) * 1e6)
            stats.add_wait(wait_us)
            req.timings[wait_key] = wait_us
            rows.append((req.slot, req.n, req.deadline_s, req.user, req.top_k, req.ret_all, req.feats, req.keep))
        ev = messages.Event(eid, pipe.pinned[vkey], *zip(*rows))    # rows to columns, in one call
        if not b.sink.backend(w.ident, ev.encode()):
            return False
        w.inflight[eid] = (taken, now)
        stats.events += 1
        stats.requests += len(taken)
        return True

    def on_done(self, w, done):
        """Worker ``w`` finished an event: answer its failures, the sink group's requests, advance the rest."""
        b = self.b
        entry = w.inflight.pop(done.eid, None)
        if entry is None:
            return
        taken, t_sent = entry
        pipe = b.pipes[w.pipeline]
        group = w.group
        svc = done.svc_us
        pipe.stats[group].add_svc(sum(svc.values()))
        now = b.clock()
        # The worker's time on this event, as the broker sees it: from when it was sent, or from the
        # worker's previous DONE if it was still busy then (its queue), to this DONE.
        occupied_s = now - max(t_sent, w.done_at)
        w.done_at = now
        w.done += 1
        cold = w.done <= COLD_EVENTS or now - w.joined < COLD_S
        if group == pipe.cut_group:
            if not cold:
                shed = done.counts.get("shed")
                kept = sum(req.n for req in taken) - (sum(shed) if shed else 0)
                pipe.cut.observe(len(taken), kept, occupied_s)
            for req in taken:
                pipe.done_with(req)
        by_slot = {req.slot: req for req in taken}
        errors = done.errors
        counts = done.counts.items()
        touched = set()
        for i, slot in enumerate(done.slot):
            req = by_slot.pop(slot, None)
            if req is None:
                continue
            req.held -= 1
            req.frontier.discard(group)
            req.cold = req.cold or cold
            if req.answered:
                b.answers.release_if_idle(req)
                continue
            err = errors.get(slot)
            if err is not None:
                b.answers.error(req, err[0], err[1] or err[0])
                continue
            for k, col in counts:
                # (a snapshot number is not a count: branches that each read the profiles read the same one)
                req.counts[k] = max(req.counts.get(k, 0), col[i]) if k == "profile_snapshot" \
                    else req.counts.get(k, 0) + col[i]
            req.timings.update(svc)
            if group == pipe.sink:
                b.answers.ok(req)
                continue
            req.t_enq = now
            self.advance(pipe, req, group, touched)
        for req in by_slot.values():  # a worker that forgot a request: never leave it hanging
            req.held -= 1
            b.answers.error(req, INTERNAL, f"worker of {group} returned no result")
        if w.retiring:
            b.roster.stop_if_retired(w)
        else:
            self.dispatch(pipe, group, w.vkey)
        for nxt in touched:
            self.dispatch(pipe, nxt, w.vkey)

    def expire(self, now):
        """Answer DEADLINE_EXCEEDED every request whose deadline passed (queued or held by a worker)."""
        h = self.deadlines
        while h and h[0][0] <= now:
            _, _, req = heapq.heappop(h)
            if not req.answered:
                self.b.answers.error(req, DEADLINE_EXCEEDED, "deadline passed")

    def fire_timers(self, now):
        """Dispatch the partial batches whose ``batch_wait_ms`` is over."""
        for key, due in list(self.batch_timers.items()):
            if due <= now:
                del self.batch_timers[key]
                pname, group, vkey = key
                self.dispatch(self.b.pipes[pname], group, vkey)

    def poll_timeout_ms(self, now, most):
        """How long the loop may wait for a message (ms): ``most``, or less when a deadline or a held
        batch comes before (a deadline a millisecond late, a held batch on time)."""
        timeout = most
        if self.deadlines:
            timeout = max(0, min(timeout, int((self.deadlines[0][0] - now) * 1000) + 1))
        if self.batch_timers:
            due = min(self.batch_timers.values())
            timeout = max(0, min(timeout, int((due - now) * 1000 + 0.999)))
        return timeout

    def deadline_due(self, now):
        return bool(self.deadlines) and self.deadlines[0][0] <= now
