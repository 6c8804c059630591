"""The broker process: ``python -m jizhi.broker --plan FILE``.

Owns the compiled pipeline DAGs. One thread, one poll loop, two sockets:

* frontend ROUTER (tcp, clients): admits requests (size limits, deadline,
  a free arena slot or OVERLOADED with ``retry_after_ms``), copies the
  request's arrays into its slot once, and answers at the end;
* backend ROUTER (ipc, workers and the supervisor): workers announce
  themselves (READY: pipeline, group, wid, versions, prefetch window),
  receive events (micro-batches of requests named by slot) and answer DONE.

Per pipeline it keeps one channel (a deque) per (group, version set); a
request enters the channel of every source group and moves to a group once
all of that group's predecessor groups are done (fan-out and join). A worker
holds at most ``window`` events at once (credits), and an event carries up to
the group's batch size of *live* requests (expired ones are answered
DEADLINE_EXCEEDED, never computed). Per-message work is O(1) in the number of
candidates: headers are msgpack, arrays stay in shared memory.

A request's slot is freed only when it has been answered *and* no worker
still holds it, so a late worker never writes into a reused slot. The events
of a worker that dies (the supervisor says so, or its heartbeats stop) go back
to the front of their channel: nothing admitted is lost.

Size: over 700 lines, several concepts in one file (admission, dispatch and
batching, the worker roster, version warm-up and switch, recording, figures),
because they share the loop's state and one poll loop; issue 18 splits them
into a package (the stop path and the retry hints first), ``on_backend``'s
if/elif into a table of handlers.
"""
if __name__ == "__main__":
    from jizhi import lifeline
    lifeline.hold()   # first, before the imports below: this process must never outlive jizhid
import argparse
import collections
import heapq
import itertools
import logging
import os
import signal
import sys
import time

import numpy as np
import zmq

from jizhi import lifeline, logs, protocol
from jizhi.arena import Arenas
from jizhi.connections import REFUSED_RETRY_MS, REPLY_QUEUE, REQUEST_QUEUE, ClientConnections
from jizhi.overlay import Overlay
from jizhi.stats import C_INVALID_SCORES, C_PID, C_REQUESTS, Stats
from jizhi.workers.stage import INVALID_NAN_BITS, INVALID_SCORES
from jizhi.errors import (BAD_REQUEST, CODES, DEADLINE_EXCEEDED, EXIT_BIND_FAILURE, EXIT_STALE_RUN, INTERNAL,
                          OVERLOADED, UNKNOWN_PIPELINE, RequestError)

log = logging.getLogger("jizhi.broker")

RING = 2048  # samples kept per group for wait/service percentiles
SUPERVISOR = b"supervisor"  # the supervisor's identity on the backend
WARMUP_DEADLINE_S = 30.0    # a warm-up request's budget (the new workers run at low priority)
RECORD_MAX = 200_000        # requests held between two fetches of `jizhictl record`
RECORD_ABANDONED_S = 10.0   # recording stops when nobody fetched it for this long
MAX_CRASHES = 2  # worker deaths a request may witness before it is answered INTERNAL
# A serving version's share of invalid scores is judged from this many candidates on: a few
# requests are too few to tell a broken version from one odd item.
WATCH_MIN_CANDIDATES = 10_000
INVALID_LOG_EVERY_S = 10.0  # the log line about invalid scores dropped, at most this often per pipeline
STOP_RETRY_MS = 1000        # retry_after_ms of the requests answered while the broker stops
STOP_READ_S = 0.1           # after SIGTERM, the frontend is read this long (then emptied) before it closes


def request_id(body):
    """The ``id`` of a request body that may be malformed (None when it has none a reply can echo)."""
    try:
        h = protocol.unpackb(body[0])
        rid = h.get("id") if isinstance(h, dict) else None
    except Exception:
        return None
    return rid if isinstance(rid, (int, str, bytes, type(None))) else None


class Request:
    __slots__ = ("crashes", "rid", "envelope", "pipe", "gen", "slot", "n", "deadline", "user", "top_k", "ret_all",
                 "vkey", "pending", "held", "answered", "t_recv", "t_enq", "timings", "counts", "warm", "ab",
                 "frontier", "heads")


class GroupStats:
    """Per-group counters kept by the broker (queue wait, service, events)."""

    def __init__(self):
        self.events = 0
        self.requests = 0
        self._rate_mark = (time.monotonic(), 0)
        self.events_per_s = 0.0
        self.wait_us = np.zeros(RING, dtype=np.int64)
        self.svc_us = np.zeros(RING, dtype=np.int64)
        self.n_wait = 0
        self.n_svc = 0
        self.svc_ewma_us = 0.0      # service time of one event, smoothed (the critical path's estimate)
        self.busy_us = 0            # service time of every event so far (the autoscaler's utilisation)
        self.wait_total_us = 0      # queue wait of every request dispatched so far (the autoscaler's queueing)
        self.load_mark = 0          # n_wait at the previous load report (the autoscaler's period)

    def add_wait(self, us):
        self.wait_us[self.n_wait % RING] = us
        self.n_wait += 1
        self.wait_total_us += us

    def add_svc(self, us):
        self.svc_us[self.n_svc % RING] = us
        self.n_svc += 1
        self.busy_us += us
        self.svc_ewma_us = us if self.n_svc == 1 else 0.9 * self.svc_ewma_us + 0.1 * us

    def period_wait_p99_us(self, min_samples=20):
        """p99 queue wait of the requests dispatched since the previous call that returned a figure (at
        most the last RING), or None with fewer than ``min_samples`` of them."""
        n = min(self.n_wait - self.load_mark, RING)
        if n < min_samples:
            return None     # the mark stays: the next period counts these requests too
        self.load_mark = self.n_wait
        idx = (np.arange(self.n_wait - n, self.n_wait) % RING)
        return int(np.percentile(self.wait_us[idx], 99))

    @staticmethod
    def _pct(ring, n):
        if n == 0:
            return {"p50": None, "p99": None}
        a = ring[:min(n, RING)]
        return {"p50": int(np.percentile(a, 50)), "p99": int(np.percentile(a, 99))}

    def snapshot(self):
        # events/s since the previous snapshot (info calls), at least 1 s apart
        t0, e0 = self._rate_mark
        now = time.monotonic()
        if now - t0 >= 1.0:
            self.events_per_s = round((self.events - e0) / (now - t0), 1)
            self._rate_mark = (now, self.events)
        return {"events": self.events, "requests": self.requests, "events_per_s": self.events_per_s,
                "wait_us": self._pct(self.wait_us, self.n_wait),
                "service_us": self._pct(self.svc_us, self.n_svc)}


class RequestStats:
    """Per-pipeline request figures: OK answers, pairs/s, latency p50/p99/p99.9 (recent answers)."""

    def __init__(self):
        self.ok = 0
        self.pairs = 0
        self.lat_us = np.zeros(RING, dtype=np.int64)
        self.t_ans = np.zeros(RING, dtype=np.float64)      # when each of the ring's answers went out
        self.shed = 0              # candidates the shedder cut, and candidates, of recent answers
        self.cands = 0
        self._mark = (time.monotonic(), 0, 0)
        self.rates = (0.0, 0.0)

    def add(self, total_us, pairs):
        self.lat_us[self.ok % RING] = total_us
        self.t_ans[self.ok % RING] = time.monotonic()
        self.ok += 1
        self.pairs += pairs

    def recent_p99_ms(self, window_s=2.0):
        """p99 of the answers of the last ``window_s`` seconds (None: none), for the load controller."""
        n = min(self.ok, RING)
        recent = self.t_ans[:n] >= time.monotonic() - window_s
        if not recent.any():
            return None
        return float(np.percentile(self.lat_us[:n][recent], 99)) / 1000.0

    def snapshot(self):
        t0, ok0, pairs0 = self._mark
        now = time.monotonic()
        if now - t0 >= 1.0:
            self.rates = (round((self.ok - ok0) / (now - t0), 1), round((self.pairs - pairs0) / (now - t0), 1))
            self._mark = (now, self.ok, self.pairs)
        lat = {"p50": None, "p99": None, "p99_9": None}
        if self.ok:
            a = self.lat_us[:min(self.ok, RING)]
            p = np.percentile(a, [50, 99, 99.9])
            lat = {"p50": int(p[0]), "p99": int(p[1]), "p99_9": int(p[2])}
        return {"ok": self.ok, "ok_per_s": self.rates[0], "pairs_per_s": self.rates[1], "latency_us": lat}


class WorkerRef:
    __slots__ = ("ident", "pipeline", "group", "wid", "pid", "vkey", "window", "inflight", "last_seen",
                 "retiring")


class Generation:
    """One model version of a pipeline inside the broker: its plan, arenas and request slots.

    A request is pinned to a generation at admission and lives in its slots
    until answered, so two versions serve side by side during a reload and
    the old one is released once its last request is answered. States:
    ``loading`` (workers starting, then the warm-up), ``warm``, ``active``
    (new admissions pin here), ``draining`` (answers what it holds), ``failed``.
    """

    def __init__(self, plan, segments, settings, state, warmup=None):
        self.plan = plan
        self.version = plan["version"]
        self.versions = plan.get("versions") or {plan["model"]: plan["version"]}
        self.vkey = tuple(sorted(self.versions.items()))
        self.slots = settings["limits.max_in_flight"]
        self.arenas = Arenas(plan, segments, self.slots, settings["limits.max_candidates"])
        self.free = list(range(self.slots - 1, -1, -1))
        self.by_slot = [None] * self.slots
        self.state = state
        self.warmup_ids = warmup        # {users, items}: ids from the bundle when no traffic was recorded
        self.warm = None                # the warm-up's progress, once started
        self.idle_sent = False
        self.boot = {}                  # the slowest worker's {start_ms, load_ms}
        self.pool = None                # {group: workers} the supervisor starts for it
        self.watch = None               # {until, invalid, scored}: its first minutes of serving, judged

    def in_flight(self):
        return self.slots - len(self.free)


class RetryHints:
    """When to tell a refused client to come back, so that one honouring ``retry_after_ms`` finds a slot.

    One per pipeline, used by the broker's loop only. With every slot taken a slot frees every
    1/rate seconds on average (``rate``: slots freed per second, over the last RATE_WINDOW frees
    within RATE_SPAN_S), so the work ahead of a refused request is the clients told to come back
    before it: it gets a *ticket* due 1/rate after the last one handed out, and ``retry_after_ms``
    says when that is. A freed slot is held for the tickets due within the next completion burst (a
    worker frees ``batch`` slots at once), so a client that comes back when told finds it, instead
    of losing it to a request that happened to arrive first. A ticket is known by the client's
    routing id (a REQ socket keeps it from one try to the next; a DEALER that pipelines holds one
    ticket) and lapses LAPSE_S (or four slot times) after it was due. Without the holding, later
    hints alone do not help: a freed slot goes to whoever asks first (issue 16, item 8: 10 % of
    next tries succeeded with a hint of twice the service time).
    """

    RATE_WINDOW = 256
    RATE_SPAN_S = 1.0           # older frees say nothing about now (an idle hour is no slow service)
    LAPSE_S = 0.1
    UNMEASURED_RATE = 100.0     # slots freed per second assumed before any was measured

    def __init__(self, batch):
        self.batch = max(2, batch)
        self.freed_at = collections.deque(maxlen=self.RATE_WINDOW)   # time.monotonic() of each freed slot
        self.tickets = collections.OrderedDict()    # routing id -> due (time.monotonic()), earliest first

    def freed(self, now):
        self.freed_at.append(now)

    def rate(self, now):
        while self.freed_at and self.freed_at[0] < now - self.RATE_SPAN_S:
            self.freed_at.popleft()
        n = len(self.freed_at)
        span = now - self.freed_at[0] if n else 0.0
        return n / span if n >= 8 and span > 0 else self.UNMEASURED_RATE

    def _lapse(self, now, rate):
        grace = max(self.LAPSE_S, 4.0 / rate)
        while self.tickets:
            due = next(iter(self.tickets.values()))
            if due + grace >= now:
                break
            self.tickets.popitem(last=False)

    def admit(self, key, free, now):
        """May a request from ``key`` take one of ``free`` free slots?"""
        if not self.tickets:
            return free > 0
        rate = self.rate(now)
        horizon = now + self.batch / rate
        self._lapse(now, rate)
        due = self.tickets.pop(key, None)
        if free <= 0:
            return False
        if due is not None and due <= horizon:
            return True             # its turn: a slot was held for it
        held = 0
        for d in self.tickets.values():
            if d > horizon:
                break
            held += 1
        return free > held

    def refuse(self, key, now):
        """A request from ``key`` is refused: its ticket, as ``retry_after_ms``."""
        rate = self.rate(now)
        self._lapse(now, rate)
        self.tickets.pop(key, None)
        # After the last ticket still out (a client refused again gave its own back: a DEALER that
        # floods holds one ticket, it does not push everyone else's turn away).
        due = max(next(reversed(self.tickets.values()), now), now) + 1.0 / rate
        self.tickets[key] = due
        return max(1, int((due - now) * 1000.0 + 0.999))

    def waiting(self):
        return len(self.tickets)


class PipelineState:
    """One pipeline's channels, workers and versions inside the broker."""

    def __init__(self, plan, settings):
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
        self.stats = {g: GroupStats() for g in self.groups}
        self.requests = RequestStats()
        self.preds = {g: len(self.groups[g]["prev"]) for g in self.groups}
        self.stage_names = {g: self.groups[g]["stages"] for g in self.groups}
        self.slots = settings["limits.max_in_flight"]
        self.has_qcache = any(st["processor"] == "query_cache" for st in plan["stages"].values())
        self.qc_candidates = 0      # candidates of answered requests, and how many the query cache answered
        self.qc_hits = 0
        self.invalid_scores = 0     # candidates dropped from ok replies for a NaN or infinite score
        self.invalid_logged = (0.0, 0)   # when the last log line about them went out, and the count then
        # A/B dispatch (workers/ab_dispatch.py): groups the broker routes itself, and the A/B group of
        # every group in a branch; per A/B group figures.
        self.routers = {}
        self.ab_stats = {}
        self.set_routes({g: grp["router"] for g, grp in self.groups.items() if grp.get("router")})
        self.branch = {g: tuple(grp["branch"]) for g, grp in self.groups.items() if grp.get("branch")}
        self.worker_groups = [g for g in self.groups if g not in self.routers]
        self.shedding = None        # {mode, quota, policy} from the supervisor, when a shedder runs here
        # Head scores a reply can carry (heads: true): the combiners' inputs that cross processes.
        self.head_columns = [c for st in plan["stages"].values() if st["processor"] == "combiner"
                             for c in st["inputs"] if c in plan["arenas"]]
        self.critical_path = settings.get("broker.dispatch") == "critical_path"
        self.rem_s = {g: 0.0 for g in self.groups}       # remaining critical path from a group's start, seconds
        self.rem_at = 0.0
        self.retry = RetryHints(max((self.groups[g]["batch"] for g in self.worker_groups), default=1))

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
            slack = req.deadline - now - longest
            floating = longest - mine
            waits_anyway = floating > 0.5 * self.stats[group].svc_ewma_us / 1e6
            return (waits_anyway, floating if waits_anyway else slack)

        ordered = sorted(chan, key=key)
        chan.clear()
        chan.extend(ordered)

    def set_routes(self, configs):
        """(Re)configure the A/B routers: ``{router group: its stage config}`` (a reload changes fractions)."""
        from jizhi.workers.ab_dispatch import Router
        for g, config in configs.items():
            self.routers[g] = r = Router(config)
            stats = self.ab_stats.setdefault(g, {})
            for name in r.names:
                stats.setdefault(name, {"requests": RequestStats(), "errors": collections.Counter()})

    def add(self, gen):
        self.gens[gen.vkey] = gen
        self.pinned[gen.vkey] = gen.versions

    def serving(self):
        gen = self.gens.get(self.active)
        return gen if gen is not None and gen.state == "active" else None

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


class Broker:
    def __init__(self, run):
        self.run = run
        self.settings = s = run["settings"]
        self.limits = {"max_candidates": s["limits.max_candidates"],
                       "max_message_bytes": s["limits.max_message_bytes"]}
        self.default_deadline_s = s["limits.default_deadline_ms"] / 1000.0
        self.max_invalid_share = s["models.max_invalid_share"]
        self.invalid_watch_s = s["models.invalid_watch_s"]
        self.hb_expiry_s = 3 * s["workers.heartbeat_interval_s"]
        self.pipes = {name: PipelineState(plan, s) for name, plan in run["pipelines"].items()}
        for name, pipe in self.pipes.items():
            # Every version the supervisor has loaded (a restarted broker picks up where it was).
            for entry in run["versions"][name].values():
                gen = Generation(entry["plan"], entry["segments"], s, entry["state"], entry.get("warmup"))
                pipe.add(gen)
                if entry["state"] == "active":
                    pipe.active = gen.vkey
        self.stats = Stats.attach(run.get("stats"))
        for name, p in self.pipes.items():
            p.row = run["stats"]["map"][name] if self.stats else None
            if self.stats is not None:
                self.stats.counters[p.row] = 0
                self.stats.counters[p.row, C_PID] = os.getpid()
                self.stats.errors[p.row] = 0
                self.stats.hist[p.row] = 0
                self.stats.sum_us[p.row] = 0
        self.default_pipeline = run["default_pipeline"]
        # Recorded traffic: a sampled ring of recent requests (the warm-up of a new version
        # replays them) and, while `jizhictl record` runs, every admitted request.
        self.sample_every = s["models.warmup_sample_every"]
        self.ring = collections.deque(maxlen=s["models.warmup_ring"])
        self.admitted = 0
        self.recording = None       # list of records while recording, else None
        self.record_dropped = 0
        self.record_fetched_at = 0.0
        self.overlay = Overlay.attach(run.get("overlay"))
        from jizhi.qcache import QueryCache
        self.qcache = QueryCache.attach(run.get("qcache"))   # the broker is its epoch table's one writer
        self.seen_feedback = collections.OrderedDict()
        self.feedback_dedup = s["limits.feedback_dedup"]
        self.feedback_events = 0
        self.overlay_full = 0
        self.workers = {}            # ident -> WorkerRef
        self.batch_timers = {}       # (pipeline, group, vkey) -> when a held partial batch is due
        self.eids = itertools.count(1)
        self.deadlines = []          # heap of (deadline, seq, Request)
        self.seq = itertools.count()
        self.errors = collections.Counter()
        self.malformed = 0
        self.answered = 0
        self.draining = False
        self.drain_requester = None
        self.running = True
        self.stopping = False       # the loop ended: every request read is answered OVERLOADED until the close
        self.stale = None           # why this broker exits as a process of an ended run (jizhi/lifeline.py)
        self._last_malformed_log = 0.0
        from jizhi.workers.run import process_start
        self.t_start = process_start()      # (broker_uptime_s: the process's age, imports included)

    # -- sockets ------------------------------------------------------------

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
        # What one client can make us hold (jizhi/connections.py): REPLY_QUEUE replies it has not read
        # (more raise, so they are counted, not queued), REQUEST_QUEUE whole requests waiting (a client
        # sending faster than we admit waits in its own queue, not in our memory) and one arriving.
        self.front.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.front.setsockopt(zmq.RCVHWM, REQUEST_QUEUE)
        self.front.setsockopt(zmq.MAXMSGSIZE, self.settings["limits.max_message_bytes"] + 65536)
        self.clients = ClientConnections(self.front, self.run["frontend"], self.settings)
        self.front.bind(self.run["frontend"])
        one, every = self.clients.bounds_mib()
        log.info("client connections: %d served at once (limits.max_connections); one may make the broker hold "
                 "%.0f MiB, all together %d MiB (limits.clients_memory_mb)", self.clients.max_connections, one, every)
        self.back = ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.back.setsockopt(zmq.SNDHWM, 100_000)
        self.back.bind(self.run["backend"])

    # -- replies ------------------------------------------------------------

    def reply(self, envelope, frames):
        try:
            self.front.send_multipart(envelope + frames, flags=zmq.DONTWAIT, copy=False)
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

    def reply_error(self, envelope, rid, code, message, retry_after_ms=None, pipe=None):
        self.errors[code] += 1
        if self.stats is not None:
            row = (pipe or self.pipes[self.default_pipeline]).row
            self.stats.errors[row, CODES.index(code)] += 1
        self.reply(envelope, protocol.encode_error(rid, code, message, retry_after_ms))

    def answer_error(self, req, code, message, retry_after_ms=None):
        if req.answered:
            return
        req.answered = True
        if req.warm:
            self.warm_result(req, f"{code}: {message}")
        else:
            self.reply_error(req.envelope, req.rid, code, message, retry_after_ms, req.pipe)
            for router, name in req.ab.items():
                req.pipe.ab_stats[router][name]["errors"][code] += 1
        self.release_if_idle(req)

    def answer_ok(self, req):
        req.answered = True
        pipe = req.pipe
        a = req.gen.arenas.cols
        n = req.n
        scores = a["out_scores"][req.slot, :n]
        # Candidates whose score was NaN or infinite: the workers counted them and wrote INVALID_NAN (a
        # NaN, never ranked, told from a dropped candidate's NaN by its bits); a sink that is not ours
        # may have written inf uncounted, so the reply is checked too (O(k); O(n) for return: all).
        invalid = req.counts.get(INVALID_SCORES, 0)
        order = None
        if req.ret_all:
            ids = a["item_ids"][req.slot, :n]
            out_scores = scores
            # Left out of the reply; NaN stays where a candidate was dropped (shed, pruned: README).
            inf = np.isinf(scores)
            bad = inf | (scores.view(np.uint32) == INVALID_NAN_BITS)
            if bad.any():
                invalid += int(np.count_nonzero(inf))
                order = np.flatnonzero(~bad)
                ids, out_scores = ids[order], scores[order]
        else:
            k = req.counts.get("returned", 0)
            order = a["order"][req.slot, :k]
            out_scores = scores[order]
            finite = np.isfinite(out_scores)
            if not finite.all():
                invalid += int(k - np.count_nonzero(finite))
                order, out_scores = order[finite], out_scores[finite]
            ids = a["item_ids"][req.slot, :n][order]
        scored = n - req.counts.get("shed", 0)       # candidates a model was asked to score
        if req.warm:
            self.warm_result(req, None if np.isfinite(scores).any() or not n else f"none of {n} scores is finite",
                             invalid, scored)
            self.release_if_idle(req)
            return
        if invalid:
            self.count_invalid(pipe, req.gen, invalid)
        self.watch_invalid(pipe, req.gen, invalid, scored)
        more = None
        if req.heads and pipe.head_columns:
            # Each head's scores of the same items (the combiner's inputs, in shared memory).
            more = {f"head:{c}": (a[c][req.slot, :n] if order is None else a[c][req.slot, :n][order]).copy()
                    for c in pipe.head_columns if c in a}
        req.timings["total"] = total_us = int((time.monotonic() - req.t_recv) * 1e6)
        if pipe.has_qcache:
            pipe.qc_candidates += n
            pipe.qc_hits += req.counts.get("cached", 0)
        if self.stats is not None:
            self.stats.observe(pipe.row, 0, total_us)
            self.stats.counters[pipe.row, C_REQUESTS] += 1
        pairs = int(n - np.count_nonzero(np.isnan(scores)))     # pairs that got a score
        pipe.requests.add(total_us, pairs)
        if pipe.shedding is not None:
            pipe.requests.shed = 0.98 * pipe.requests.shed + 0.02 * req.counts.get("shed", 0)
            pipe.requests.cands = 0.98 * pipe.requests.cands + 0.02 * n
        extra = {"missing_signatures": req.counts.get("missing_signatures", 0), "cached": req.counts.get("cached", 0),
                 "invalid_scores": invalid}
        if req.ab:
            for router, name in req.ab.items():
                pipe.ab_stats[router][name]["requests"].add(total_us, pairs)
            # The A/B group (one dispatch), or {dispatch stage: group} when the pipeline has several.
            extra["ab_group"] = next(iter(req.ab.values())) if len(req.ab) == 1 else dict(req.ab)
        frames = protocol.encode_ok(
            req.rid, model_versions=req.gen.versions, shed_ratio=round(req.counts.get("shed", 0) / n, 4) if n else 0.0,
            unknown_items=req.counts.get("unknown_items", 0), timings_us=req.timings,
            item_ids=np.array(ids), scores=np.array(out_scores), extra=extra, more=more)
        self.answered += 1
        self.reply(req.envelope, frames)
        self.release_if_idle(req)

    def count_invalid(self, pipe, gen, invalid):
        """``invalid`` candidates of an ok reply were dropped for a NaN or infinite score: count them
        (``jizhictl stats``, Prometheus) and say so in the log, at most every INVALID_LOG_EVERY_S."""
        pipe.invalid_scores += invalid
        if self.stats is not None:
            self.stats.counters[pipe.row, C_INVALID_SCORES] += invalid
        now = time.monotonic()
        t_last, n_last = pipe.invalid_logged
        if now - t_last >= INVALID_LOG_EVERY_S:
            pipe.invalid_logged = (now, pipe.invalid_scores)
            log.warning("pipeline %s: %d candidates dropped from ok replies for a NaN or infinite score "
                        "(%d since start; version %s)", pipe.name, pipe.invalid_scores - n_last,
                        pipe.invalid_scores, gen.versions)

    def watch_invalid(self, pipe, gen, invalid, scored):
        """A version in its first ``models.invalid_watch_s`` of serving: once its share of invalid
        scores passes ``models.max_invalid_share`` (judged from WATCH_MIN_CANDIDATES candidates on),
        tell the supervisor, once; it fails the version and loads the previous good one."""
        w = gen.watch
        if w is None:
            return
        now = time.monotonic()
        if now > w["until"]:
            gen.watch = None
            return
        w["invalid"] += invalid
        w["scored"] += scored
        if w["scored"] >= WATCH_MIN_CANDIDATES and w["invalid"] > self.max_invalid_share * w["scored"]:
            gen.watch = None
            serving_s = round(self.invalid_watch_s - (w["until"] - now), 1)
            log.error("pipeline %s: version %s gave %d invalid scores of %d (%.2f%% > models.max_invalid_share "
                      "%g) in its first %.1f s of serving", pipe.name, gen.versions, w["invalid"], w["scored"],
                      100.0 * w["invalid"] / w["scored"], self.max_invalid_share, serving_s)
            self.tell_supervisor({"t": protocol.T_INVALID, "pipeline": pipe.name, "version": gen.version,
                                  "invalid": w["invalid"], "candidates": w["scored"], "serving_s": serving_s})

    def release_if_idle(self, req):
        if req.answered and req.held == 0 and req.slot is not None:
            gen = req.gen
            gen.by_slot[req.slot] = None
            gen.free.append(req.slot)
            req.slot = None
            if not req.warm:
                req.pipe.retry.freed(time.monotonic())
            if gen.state == "draining" and gen.in_flight() == 0:
                self.version_idle(req.pipe, gen)

    # -- admission ----------------------------------------------------------

    def on_frontend(self, frames):
        envelope, body = protocol.split_envelope(frames)
        if envelope is None:
            self.count_malformed("a client message without an envelope delimiter")
            # Answer anyway (routing id, empty delimiter) so a confused DEALER hears why.
            self.reply_error([frames[0], b""], None, BAD_REQUEST,
                             "message has no empty delimiter frame after the routing id")
            return
        t_recv = time.monotonic()
        try:
            req = protocol.decode_request([bytes(f) for f in body], self.limits)
        except RequestError as e:
            self.count_malformed(e.message)
            self.reply_error(envelope, request_id(body), e.code, e.message)
            return
        if self.stopping:
            # (after the drain: the same word a client was told while it lasted)
            self.reply_error(envelope, req["id"], OVERLOADED, "server draining to stop; retry on another node or "
                             "later", STOP_RETRY_MS)
            return
        op = req["op"]
        if op == "ping":
            self.reply(envelope, protocol.encode_info(req["id"], {"pong": True}))
            return
        if op == "info":
            self.reply(envelope, protocol.encode_info(req["id"], self.info()))
            return
        if op == "feedback":
            self.feedback(envelope, req)
            return
        self.admit(envelope, req, t_recv)

    def refuse_connection(self, conn, frames):
        """A message from a connection past ``limits.max_connections``: answer it OVERLOADED unread; the
        connection is closed once that reply is written (jizhi/connections.py)."""
        envelope, body = protocol.split_envelope(frames)
        if envelope is None:
            envelope, body = [frames[0], b""], frames[1:]
        self.reply_error(envelope, request_id(body), OVERLOADED,
                         f"connection limit reached: {self.clients.max_connections} client connections are served "
                         "at once (limits.max_connections); this one closes now: retry later or on another node",
                         REFUSED_RETRY_MS)
        self.clients.refused_reply_sent(conn)

    def feedback(self, envelope, m):
        """Append to the user's recent behaviour (the overlay); the next score sees it."""
        idem = m["idempotency_id"]
        if idem is not None:
            if idem in self.seen_feedback:
                self.reply(envelope, protocol.encode_info(m["id"], {"applied": False, "duplicate": True}))
                return
            self.seen_feedback[idem] = True
            if len(self.seen_feedback) > self.feedback_dedup:
                self.seen_feedback.popitem(last=False)
        if self.qcache is not None:
            # Before the acknowledgement: every request admitted after it misses this user's cached scores.
            self.qcache.bump_epoch(m["user"])
        applied = self.overlay is not None and self.overlay.append(m["user"], m["item"])
        if not applied:
            self.overlay_full += 1
            if self.overlay_full == 1 or self.overlay_full % 1000 == 0:
                log.warning("overlay full: %d feedback events dropped (raise overlay.capacity_users)",
                            self.overlay_full)
        self.feedback_events += 1
        self.reply(envelope, protocol.encode_info(m["id"], {"applied": applied, "duplicate": False}))

    def count_malformed(self, why):
        self.malformed += 1
        now = time.monotonic()
        if now - self._last_malformed_log > 5.0:
            self._last_malformed_log = now
            log.warning("bad request (%d so far): %s", self.malformed, why)

    def admit(self, envelope, m, t_recv):
        name = self.default_pipeline if m["pipeline"] == "default" else m["pipeline"]
        pipe = self.pipes.get(name)
        if pipe is None:
            self.reply_error(envelope, m["id"], UNKNOWN_PIPELINE,
                             f"pipeline {m['pipeline']!r} is not served here (served: {', '.join(self.pipes)})")
            return
        if self.draining:
            self.reply_error(envelope, m["id"], OVERLOADED, "server is draining (jizhictl drain or shutdown)", 1000)
            return
        gen = pipe.serving()
        if gen is None:
            self.reply_error(envelope, m["id"], OVERLOADED,
                             f"pipeline {name} has no serving model version (one failed; the previous one is "
                             "loading)", 500, pipe)
            return
        key = bytes(envelope[0])      # the client's routing id: who was told to come back when
        if not pipe.retry.admit(key, len(gen.free), t_recv):
            after_ms = pipe.retry.refuse(key, t_recv)
            self.reply_error(envelope, m["id"], OVERLOADED,
                             f"{gen.in_flight()} requests in flight on pipeline {name} ({gen.slots} slots), "
                             f"{pipe.retry.waiting() - 1} clients told to retry before this one", after_ms, pipe)
            return
        items, rs = m["item_ids"], m["recall_scores"]
        dl = m["deadline_ms"]
        deadline = t_recv + (dl / 1000.0 if dl is not None else self.default_deadline_s)
        req = self.enqueue(pipe, gen, envelope, m["id"], m["user"], items, rs, m["top_k"], m["ret"] == "all",
                           deadline, t_recv)
        req.heads = m.get("heads", False)
        self.admitted += 1
        if self.admitted % self.sample_every == 0:
            self.ring.append((name, req.user, np.array(items), None if rs is None else np.array(rs), req.top_k))
        if self.recording is not None:
            self.record(name, req.user, items, rs, req.top_k, t_recv)

    def enqueue(self, pipe, gen, envelope, rid, user, items, rs, top_k, ret_all, deadline, t_recv, warm=False):
        """Pin a request to ``gen`` (one of its slots) and queue it at the pipeline's sources."""
        req = Request()
        req.rid = rid
        req.envelope = envelope
        req.pipe = pipe
        req.gen = gen
        req.warm = warm
        req.slot = slot = gen.free.pop()
        gen.by_slot[slot] = req
        req.n = n = items.shape[0]
        req.deadline = deadline
        req.user = user
        req.top_k = min(top_k, n)  # never more than n; a huge top_k would overflow int64 in the worker
        req.ret_all = ret_all
        req.vkey = gen.vkey
        req.pending = dict(pipe.preds)
        req.held = 0
        req.crashes = 0
        req.answered = False
        req.t_recv = t_recv
        req.t_enq = t_recv
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
        heapq.heappush(self.deadlines, (req.deadline, next(self.seq), req))
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

    def record(self, name, user, items, rs, top_k, t_recv):
        if len(self.recording) >= RECORD_MAX:
            self.record_dropped += 1
            return
        self.recording.append((t_recv, name, user, bytes(items.data), b"" if rs is None else bytes(rs.data), top_k))

    # -- model versions -------------------------------------------------------

    def tell_supervisor(self, msg):
        try:
            self.back.send_multipart([SUPERVISOR, protocol.packb(msg)])
        except zmq.ZMQError:
            log.warning("could not tell the supervisor %s (is it restarting?)", msg.get("t"))

    def on_version_add(self, msg):
        pipe = self.pipes.get(msg.get("pipeline"))
        if pipe is None:
            return
        gen = Generation(msg["plan"], msg["segments"], self.settings, "loading", msg.get("warmup"))
        gen.pool = msg.get("pool")
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
        if gen.state != "loading" or gen.warm is not None:
            return
        n_want = min(self.settings["models.warmup_requests"], gen.slots)
        samples = [r for r in self.ring if r[0] == pipe.name][-n_want:]
        source = "recorded traffic"
        if not samples and gen.warmup_ids:
            source = "ids from the bundle (no traffic recorded yet)"
            users = np.frombuffer(gen.warmup_ids["users"], dtype=np.uint64)
            items = np.frombuffer(gen.warmup_ids["items"], dtype=np.uint64)
            per = max(1, items.shape[0] // max(1, users.shape[0]))
            samples = [(pipe.name, int(u), items[i * per:(i + 1) * per], None, 10) for i, u in enumerate(users)]
            samples = samples[:n_want]
        now = time.monotonic()
        gen.warm = {"sent": len(samples), "done": 0, "error": None, "t0": now, "invalid": 0, "scored": 0}
        log.info("pipeline %s: version %s has all its workers; warming up with %d requests (%s)",
                 pipe.name, gen.versions, len(samples), source if samples else "nothing to replay")
        if not samples:
            self.warm_done(pipe, gen)
            return
        for _, user, items, rs, top_k in samples:
            self.enqueue(pipe, gen, None, None, user, items, rs, top_k, False, now + WARMUP_DEADLINE_S, now, warm=True)

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
        w = gen.warm
        took_ms = round((time.monotonic() - w["t0"]) * 1000, 1)
        if w["error"] is None and w["invalid"] > self.max_invalid_share * w["scored"]:
            # The whole warm-up is the sample: judged whatever its size (a version that passes is
            # judged again on live traffic for models.invalid_watch_s).
            w["error"] = (f"{w['invalid']} of {w['scored']} scores not finite (NaN or infinite), "
                          f"{w['invalid'] / max(1, w['scored']):.2%} > models.max_invalid_share "
                          f"{self.max_invalid_share:g}")
        if w["error"] is None:
            gen.state = "warm"
            log.info("pipeline %s: version %s warm after %d requests in %.0f ms", pipe.name, gen.versions,
                     w["sent"], took_ms)
        else:
            log.error("pipeline %s: version %s failed its warm-up: %s", pipe.name, gen.versions, w["error"])
        self.tell_supervisor({"t": protocol.T_WARM, "pipeline": pipe.name, "version": gen.version,
                              "ok": w["error"] is None, "error": w["error"], "requests": w["sent"],
                              "took_ms": took_ms, "boot": gen.boot})

    def on_activate(self, msg):
        pipe = self.pipes.get(msg.get("pipeline"))
        gen = None if pipe is None else self.find_gen(pipe, msg.get("version"))
        if gen is None or gen.state == "failed":
            log.error("cannot activate %s version %s: not loaded here", msg.get("pipeline"), msg.get("version"))
            return
        old = pipe.gens.get(pipe.active)
        pipe.active = gen.vkey
        gen.state = "active"
        if self.invalid_watch_s > 0:
            gen.watch = {"until": time.monotonic() + self.invalid_watch_s, "invalid": 0, "scored": 0}
        for ws in [pipe.workers.get((g, gen.vkey), []) for g in pipe.groups]:
            for w in ws:
                try:
                    self.back.send_multipart([w.ident] + protocol.encode_simple(protocol.T_PRIORITY))
                except zmq.ZMQError:
                    pass
        log.info("pipeline %s: new requests now pinned to %s%s", pipe.name, gen.versions,
                 f" ({old.versions} drains {old.in_flight()} in flight)" if old is not None and old is not gen else "")
        if old is not None and old is not gen and old.state == "active":
            old.state = "draining"
            if old.in_flight() == 0:
                self.version_idle(pipe, old)

    def find_gen(self, pipe, version):
        for gen in pipe.gens.values():
            if gen.version == version:
                return gen
        return None

    def version_idle(self, pipe, gen):
        if not gen.idle_sent:
            gen.idle_sent = True
            log.info("pipeline %s: version %s answered its last request", pipe.name, gen.versions)
            self.tell_supervisor({"t": protocol.T_VERSION_IDLE, "pipeline": pipe.name, "version": gen.version})

    def on_version_fail(self, msg):
        """A version's files broke under it: answer its requests (retry) and stop feeding its workers."""
        pipe = self.pipes.get(msg.get("pipeline"))
        gen = None if pipe is None else self.find_gen(pipe, msg.get("version"))
        if gen is None:
            return
        gen.state = "failed"
        if pipe.active == gen.vkey:
            pipe.active = None
        n = 0
        for req in list(gen.by_slot):
            if req is not None and not req.answered:
                n += 1
                self.answer_error(req, OVERLOADED, f"model version {gen.versions} failed ({msg.get('reason')}); "
                                  "retry: the previous version is loading", 500)
        for g in pipe.groups:
            for w in list(pipe.workers.get((g, gen.vkey), [])):
                self.retire_worker(w)
        log.error("pipeline %s: version %s failed (%s): %d requests answered OVERLOADED for a retry",
                  pipe.name, gen.versions, msg.get("reason"), n)

    def on_version_drop(self, msg):
        pipe = self.pipes.get(msg.get("pipeline"))
        gen = None if pipe is None else self.find_gen(pipe, msg.get("version"))
        if gen is None:
            return
        for req in gen.by_slot:
            if req is not None and not req.answered:
                self.answer_error(req, OVERLOADED, "model version unloaded; retry", 100)
        for g in pipe.groups:
            for w in list(pipe.workers.get((g, gen.vkey), [])):
                self.retire_worker(w)
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

    def on_record(self, ident, msg):
        op = msg.get("op")
        now = time.monotonic()
        if op == "start":
            self.recording = []
            self.record_dropped = 0
            self.record_fetched_at = now
            log.info("recording live traffic (jizhictl record)")
        out, dropped = (self.recording or []), self.record_dropped
        if op in ("fetch", "stop"):
            self.recording = [] if op == "fetch" and self.recording is not None else None
            self.record_dropped = 0
            self.record_fetched_at = now
            if op == "stop":
                log.info("recording stopped")
        self.back.send_multipart([ident, protocol.packb({"t": protocol.T_RECORD, "records": out if op != "start" else [],
                                                         "dropped": dropped, "recording": self.recording is not None})])

    # -- dispatch -----------------------------------------------------------

    def dispatch(self, pipe, group, vkey):
        key = (group, vkey)
        chan = pipe.channels.get(key)
        workers = pipe.workers.get(key)
        if not chan or not workers:
            return
        batch_max = pipe.groups[group]["batch"]
        wait_s = pipe.groups[group].get("batch_wait_ms", 0.0) / 1000.0
        stats = pipe.stats[group]
        now = time.monotonic()
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
                    self.release_if_idle(req)
                    continue
                if req.deadline <= now:
                    self.answer_error(req, DEADLINE_EXCEEDED, "deadline passed while queued for " + group)
                    continue
                taken.append(req)
            if not taken:
                return
            eid = next(self.eids)
            rows = []
            for req in taken:
                req.held += 1
                wait_us = int((now - req.t_enq) * 1e6)
                stats.add_wait(wait_us)
                req.timings["wait_" + group] = wait_us
                rows.append([req.slot, req.n, req.deadline, req.user, req.top_k, req.ret_all])
            try:
                self.back.send_multipart([w.ident] + protocol.encode_event(eid, pipe.pinned[vkey], rows))
            except zmq.ZMQError:
                for req in taken:
                    req.held -= 1
                    chan.appendleft(req)
                self.drop_worker(w, "unreachable")
                workers = pipe.workers.get(key)
                if not workers:
                    return
                continue
            w.inflight[eid] = (taken, now)
            stats.events += 1
            stats.requests += len(taken)

    # -- backend ------------------------------------------------------------

    def on_backend(self, frames):
        ident = frames[0]
        try:
            msg = protocol.decode_internal(frames[1])
        except Exception:
            log.warning("dropping a malformed backend message from %r", ident)
            return
        t = msg["t"]
        w = self.workers.get(ident)
        if w is not None:
            w.last_seen = time.monotonic()
        if t == protocol.T_DONE and w is not None:
            self.on_done(w, msg)
        elif t == protocol.T_READY:
            self.on_ready(ident, msg)
        elif t == protocol.T_HEARTBEAT and w is not None:  # an unknown one falls through to RESYNC
            pass
        elif t == protocol.T_WORKER_DEAD:
            for cand in list(self.workers.values()):
                if (cand.pipeline, cand.group, cand.wid, cand.pid) == \
                        (msg.get("pipeline"), msg.get("group"), msg.get("wid"), msg.get("pid")):
                    self.drop_worker(cand, "exited")
        elif t == protocol.T_DRAIN:
            self.draining = True
            if msg.get("reply", True):
                self.drain_requester = ident
            log.info("draining: admitting nothing new, %d requests in flight",
                     sum(p.in_flight() for p in self.pipes.values()))
        elif t == protocol.T_LEAVING and w is not None:
            self.retire_worker(w)
        elif t == protocol.T_RESUME:
            self.draining = False
            self.drain_requester = None
            log.info("admitting again after a drain")
        elif t == protocol.T_RETIRE:
            for cand in list(self.workers.values()):
                if (cand.pipeline, cand.group, cand.wid, cand.pid) == \
                        (msg.get("pipeline"), msg.get("group"), msg.get("wid"), msg.get("pid")):
                    self.retire_worker(cand)
        elif w is None and t in (protocol.T_HEARTBEAT, protocol.T_DONE):
            # A worker of a previous broker (this one restarted): ask it to register again.
            try:
                self.back.send_multipart([ident] + protocol.encode_simple(protocol.T_RESYNC))
            except zmq.ZMQError:
                pass
        elif t == protocol.T_LOAD:
            load = {name: {"p99_ms": p.requests.recent_p99_ms(), "in_flight": p.in_flight(),
                           "queued": sum(len(c) for c in p.channels.values()),
                           "groups": {g: {"busy_us": p.stats[g].busy_us, "wait_us": p.stats[g].wait_total_us,
                                          "requests": p.stats[g].requests,
                                          "wait_p99_us": p.stats[g].period_wait_p99_us(),
                                          "queue": len(p.channels.get((g, p.active), ())),
                                          "workers": len(p.workers.get((g, p.active), ()))}
                                      for g in p.worker_groups}}
                    for name, p in self.pipes.items()}
            self.back.send_multipart([ident, protocol.packb({"t": protocol.T_LOAD, "load": load})])
        elif t == protocol.T_SHED:
            pipe = self.pipes.get(msg.get("pipeline"))
            if pipe is not None:
                pipe.shedding = {k: msg[k] for k in ("mode", "quota", "policy")}
        elif t == protocol.T_INFO:
            self.back.send_multipart([ident, protocol.packb({"t": protocol.T_INFO, "info": self.info()})])
        elif t == protocol.T_VERSION_ADD:
            self.on_version_add(msg)
        elif t == protocol.T_ACTIVATE:
            self.on_activate(msg)
        elif t == protocol.T_VERSION_FAIL:
            self.on_version_fail(msg)
        elif t == protocol.T_VERSION_DROP:
            self.on_version_drop(msg)
        elif t == protocol.T_RECORD:
            self.on_record(ident, msg)
        elif t == protocol.T_ROUTES:
            pipe = self.pipes.get(msg.get("pipeline"))
            if pipe is not None:
                pipe.set_routes(msg["routes"])
                log.info("pipeline %s: A/B fractions now %s", pipe.name,
                         {g: {n: f for n, f, _ in r.groups} for g, r in pipe.routers.items()})
        elif t == protocol.T_STOP:
            self.running = False

    def on_ready(self, ident, msg):
        if msg.get("run") != self.run["run_id"]:
            # A worker of another run (this broker outlived its supervisor, or the worker did): its
            # arenas are not ours, so whatever it computed would be answered from the wrong memory.
            log.error("worker %r belongs to run %s, this broker to run %s: telling it to stop", ident,
                      msg.get("run"), self.run["run_id"])
            try:
                self.back.send_multipart([ident] + protocol.encode_simple(protocol.T_STOP))
            except zmq.ZMQError:
                pass
            return
        pipe = self.pipes.get(msg.get("pipeline"))
        if pipe is None or msg.get("group") not in pipe.groups:
            log.warning("worker %r announced an unknown pipeline/group", ident)
            return
        w = WorkerRef()
        w.ident = ident
        w.pipeline = pipe.name
        w.group = msg["group"]
        w.wid = msg["wid"]
        w.pid = msg.get("pid")
        w.vkey = tuple(sorted((k, v) for k, v in msg["versions"].items()))
        gen = pipe.gens.get(w.vkey)
        if gen is None or gen.state == "failed":
            log.warning("worker %r serves %s, a version pipeline %s has not loaded (or failed); ignoring it",
                        ident, msg["versions"], pipe.name)
            return
        w.window = max(1, int(msg.get("window", 1)))
        for k, v in (msg.get("boot") or {}).items():
            if isinstance(v, (int, float)):
                gen.boot[k] = max(gen.boot.get(k, 0), v)
        w.inflight = {}
        w.retiring = False
        w.last_seen = time.monotonic()
        old = self.workers.get(ident)
        if old is not None:
            self.drop_worker(old, "re-registered")
        self.workers[ident] = w
        pipe.workers[(w.group, w.vkey)].append(w)
        log.info("worker joined: pipeline=%s group=%s wid=%s pid=%s versions=%s",
                 pipe.name, w.group, w.wid, w.pid, dict(w.vkey))
        if gen.state == "loading" and pipe.has_pool(gen):
            self.start_warmup(pipe, gen)
        elif gen.state == "active":
            # Joined a version that serves already (a restart, a scale-up): serve at normal priority.
            try:
                self.back.send_multipart([ident] + protocol.encode_simple(protocol.T_PRIORITY))
            except zmq.ZMQError:
                pass
        self.dispatch(pipe, w.group, w.vkey)

    def retire_worker(self, w):
        """Dispatch nothing more to ``w``; STOP it once it holds nothing (scale down, no request dropped)."""
        if w.retiring:
            return
        pipe = self.pipes[w.pipeline]
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
            try:
                self.back.send_multipart([w.ident] + protocol.encode_simple(protocol.T_STOP))
            except zmq.ZMQError:
                pass

    def drop_worker(self, w, why):
        """Forget a worker; its events go back to the front of their channel."""
        if self.workers.get(w.ident) is not w:
            return
        del self.workers[w.ident]
        pipe = self.pipes[w.pipeline]
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
                    self.release_if_idle(req)
                elif req.crashes > MAX_CRASHES:
                    # A request that was in flight at every crash may be what kills workers: stop feeding it.
                    self.answer_error(req, INTERNAL, f"{req.crashes} workers died while holding this request")
                else:
                    chan.appendleft(req)
                    requeued += 1
        w.inflight.clear()
        log.warning("worker left: pipeline=%s group=%s wid=%s pid=%s (%s); %d requests requeued",
                    w.pipeline, w.group, w.wid, w.pid, why, requeued)
        self.dispatch(pipe, w.group, w.vkey)

    def on_done(self, w, msg):
        entry = w.inflight.pop(msg.get("eid"), None)
        if entry is None:
            return
        taken, t_sent = entry
        pipe = self.pipes[w.pipeline]
        group = w.group
        stats = pipe.stats[group]
        svc = msg.get("svc", {})
        svc_total = sum(svc.values())
        stats.add_svc(svc_total)
        by_slot = {req.slot: req for req in taken}
        now = time.monotonic()
        touched = set()
        for slot, code, message, counts in msg.get("res", []):
            req = by_slot.pop(slot, None)
            if req is None:
                continue
            req.held -= 1
            req.frontier.discard(group)
            if req.answered:
                self.release_if_idle(req)
                continue
            if code is not None:
                self.answer_error(req, code, message or code)
                continue
            for k, v in counts.items():
                req.counts[k] = req.counts.get(k, 0) + v
            for s, us in svc.items():
                req.timings[s] = us
            if group == pipe.sink:
                self.answer_ok(req)
                continue
            req.t_enq = now
            self.advance(pipe, req, group, touched)
        for req in by_slot.values():  # a worker that forgot a request: never leave it hanging
            req.held -= 1
            self.answer_error(req, INTERNAL, f"worker of {group} returned no result")
        if w.retiring:
            self.stop_if_retired(w)
        else:
            self.dispatch(pipe, group, w.vkey)
        for nxt in touched:
            self.dispatch(pipe, nxt, w.vkey)

    # -- housekeeping -------------------------------------------------------

    def expire(self):
        now = time.monotonic()
        h = self.deadlines
        while h and h[0][0] <= now:
            _, _, req = heapq.heappop(h)
            if not req.answered:
                self.answer_error(req, DEADLINE_EXCEEDED, "deadline passed")
        for w in list(self.workers.values()):
            if now - w.last_seen > self.hb_expiry_s and not w.inflight:
                self.drop_worker(w, "no heartbeat")
            elif w.inflight and now - w.last_seen > max(self.hb_expiry_s, 30.0):
                self.drop_worker(w, "silent while holding events")

    def info(self):
        pipes = {}
        for name, p in self.pipes.items():
            groups = {}
            for g in p.groups:
                groups[g] = dict(p.stats[g].snapshot(),
                                 workers=sum(len(p.workers.get((g, k), ())) for k in p.gens),
                                 queue=sum(len(p.channels.get((g, k), ())) for k in p.gens),
                                 stages=p.groups[g]["stages"])
            serving = p.serving()
            versions = {str(gen.version): {"state": gen.state, "in_flight": gen.in_flight(), "models": gen.versions,
                                           "workers": sum(len(p.workers.get((g, k), ())) for g in p.groups),
                                           "boot": gen.boot}    # its slowest worker's start_ms, load_ms, warm_ms
                        for k, gen in p.gens.items()}
            pipes[name] = {"model": p.plan["model"], "version": serving.version if serving else None,
                           "model_versions": serving.versions if serving else None,
                           "versions": versions, "ready": p.ready(),
                           "in_flight": p.in_flight(), "slots": p.slots, "groups": groups,
                           "requests": p.requests.snapshot(), "invalid_scores": p.invalid_scores}
            if p.has_qcache:
                pipes[name]["query_cache"] = {"candidates": p.qc_candidates, "hits": p.qc_hits}
            if p.shedding is not None:
                pipes[name]["shedding"] = dict(p.shedding, shed_ratio_recent=round(
                    p.requests.shed / p.requests.cands, 4) if p.requests.cands else 0.0)
            if p.routers:
                pipes[name]["ab"] = {
                    g: {"fractions": {n: f for n, f, _ in r.groups},
                        "groups": {n: dict(p.ab_stats[g][n]["requests"].snapshot(),
                                           errors=dict(p.ab_stats[g][n]["errors"]),
                                           branch=[x for x, b in p.branch.items() if b == (g, n)])
                                   for n in r.names}}
                    for g, r in p.routers.items()}
        return {"ready": all(p.ready() for p in self.pipes.values()), "pipelines": pipes,
                "default_pipeline": self.default_pipeline, "answered": self.answered,
                "errors": dict(self.errors), "malformed": self.malformed, "draining": self.draining,
                "feedback": {"events": self.feedback_events, "dropped_overlay_full": self.overlay_full},
                # uptime_s: jizhid's (from the supervisor's start, as `jizhictl status` says it); the broker's
                # own age apart (it restarts when it dies).
                "uptime_s": round(time.monotonic() - self.run.get("started_monotonic", self.t_start), 1),
                "broker_uptime_s": round(time.monotonic() - self.t_start, 1), "clients": self.clients.snapshot(),
                "run_id": self.run["run_id"], "pid": os.getpid(), "instance": self.run.get("instance"),
                "frontend": self.run["frontend"],
                "limits": {k.split(".", 1)[1]: v for k, v in self.settings.items() if k.startswith("limits.")}}

    def stale_run(self):
        """Why this broker must not answer from its arenas any more (None: it may).

        Its supervisor is gone (re-parented: a SIGKILLed supervisor), or a segment it maps was
        unlinked or replaced (a new run of the instance swept it): an "ok" computed from here on
        would be read from memory nobody writes."""
        if not lifeline.supervisor_alive():
            return f"the supervisor (pid {os.environ.get(lifeline.ENV_SUPERVISOR)}) is gone"
        for pipe in self.pipes.values():
            for gen in pipe.gens.values():
                if not gen.arenas.intact():
                    return f"a shared-memory segment of pipeline {pipe.name} version {gen.versions} was unlinked"
        return None

    def read_frontend(self, most=256):
        """Handle up to ``most`` of the client messages ZeroMQ holds (a connection past the limit is
        answered its refusal, whatever it sent); returns how many there were."""
        for n in range(most):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n
            try:
                conn = self.clients.on_message(frames)
                if conn is not None and conn.refused:
                    self.refuse_connection(conn, [f.buffer for f in frames])
                else:
                    self.on_frontend([f.buffer for f in frames])
            except Exception:
                log.exception("unexpected error handling a client message")
                self.malformed += 1
        return most

    def loop(self):
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.clients.monitor, zmq.POLLIN)
        self.clients.start_guard()
        next_sweep = next_lifeline = 0.0
        while self.running:
            timeout = 100
            if self.deadlines:
                timeout = max(0, min(timeout, int((self.deadlines[0][0] - time.monotonic()) * 1000) + 1))
            if self.batch_timers:
                due = min(self.batch_timers.values())
                timeout = max(0, min(timeout, int((due - time.monotonic()) * 1000 + 0.999)))
            events = dict(poller.poll(timeout))
            if self.batch_timers:
                now = time.monotonic()
                for key, due in list(self.batch_timers.items()):
                    if due <= now:
                        del self.batch_timers[key]
                        pname, group, vkey = key
                        self.dispatch(self.pipes[pname], group, vkey)
            # Backend first: finishing work frees slots and credits for new work.
            if self.back in events:
                for _ in range(256):
                    self.on_backend(self.back.recv_multipart())
                    if not self.back.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
            if self.clients.monitor in events:
                self.clients.on_monitor()
            if self.front in events:
                self.read_frontend()
            now = time.monotonic()
            if now < next_sweep and not (self.deadlines and self.deadlines[0][0] <= now):
                continue
            next_sweep = now + 0.05   # heartbeat, expiry and drain checks: 20 times a second is plenty
            if now >= next_lifeline:
                next_lifeline = now + 1.0
                why = self.stale_run()
                if why:
                    log.error("%s: this broker belongs to an ended run; answering what it holds with "
                              "OVERLOADED and exiting", why)
                    self.stale = why
                    break
            if self.stats is not None:
                for p in self.pipes.values():
                    self.stats.heartbeat[p.row] = now
            self.expire()
            for p in self.pipes.values():
                for gen in p.gens.values():
                    # (also after a broker restart: a draining version may hold nothing already)
                    if gen.state == "draining" and not gen.idle_sent and gen.in_flight() == 0:
                        self.version_idle(p, gen)
            if self.recording is not None and now - self.record_fetched_at > RECORD_ABANDONED_S:
                log.warning("recording stopped: nobody fetched it for %.0f s (jizhictl record gone?)", RECORD_ABANDONED_S)
                self.recording = None
            if self.draining and self.drain_requester is not None and \
                    all(p.in_flight() == 0 for p in self.pipes.values()):
                try:
                    self.back.send_multipart([self.drain_requester, protocol.packb({"t": protocol.T_DRAINED})])
                except zmq.ZMQError:
                    pass
                self.drain_requester = None
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
        self.stopping = True
        for pipe in self.pipes.values():
            for req in [r for gen in pipe.gens.values() for r in gen.by_slot]:
                if req is not None and not req.answered:
                    self.answer_error(req, OVERLOADED, "server stopping; retry on another node or later",
                                      STOP_RETRY_MS)
        before = self.errors[OVERLOADED]
        log.info("stopping: closing the frontend; requests sent until now are answered OVERLOADED "
                 "(retry_after_ms %d)", STOP_RETRY_MS)
        end = time.monotonic() + STOP_READ_S
        while (left := end - time.monotonic()) > 0:
            if self.front.poll(max(1, int(left * 1000))):
                self.read_frontend()
        self.clients.close()
        if getattr(self, "auth", None) is not None:
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
        log.info("frontend closed: %d requests answered OVERLOADED while stopping", self.errors[OVERLOADED] - before)


def main(argv=None):
    from jizhi.workers.run import read_plan
    ap = argparse.ArgumentParser(prog="python -m jizhi.broker",
                                 description="The jizhi broker (started by jizhid, not by hand).")
    ap.add_argument("--plan", required=True)
    args = ap.parse_args(argv)
    logs.setup("jizhi.broker")
    run = read_plan(args.plan)
    broker = Broker(run)
    try:
        broker.open()
    except zmq.ZMQError as e:
        # Not a crash to retry quietly: another process holds the address (an old jizhid?). The
        # supervisor logs the meaning of this exit code and does not report ready meanwhile.
        where = run["backend"] if getattr(broker, "back", None) is not None else run["frontend"]
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
    broker.loop()
    log.info("broker stopped")
    logging.shutdown()
    os._exit(EXIT_STALE_RUN if broker.stale else 0)


if __name__ == "__main__":
    sys.exit(main())
