"""Admission: a client's message read, checked and let in (or answered why not).

Runs in the broker process, on its loop's thread. ``on_client`` decodes a
client message (jizhi/protocol.py validates it: sizes, types, the limits
``limits.max_candidates`` and ``limits.max_message_bytes``); a malformed one
is counted, logged (rate-limited) and answered BAD_REQUEST. ``ping``, ``info``
and ``feedback`` are answered here; a ``score`` request is admitted to its
pipeline's serving version when a slot is free (``RetryHints`` decides whose
turn a freed slot is); else it waits in the pipeline's *line* (up to
``limits.max_waiting`` requests, in arrival order, each until its deadline)
and is admitted when a slot frees (``unpark``, after every input that can
free one), or, the line full, refused OVERLOADED with ``retry_after_ms``. A
request is refused too while the broker drains or stops (one already waiting
is still admitted while it drains), or when no version serves. The line
absorbs the onset of an overload, before the shedding cut has caught up, so
a request is refused only when waiting cannot help it (issue 23).

The deadline is converted here, once: the client's ``deadline_ms`` (a budget,
default ``limits.default_deadline_ms``) becomes ``deadline_s``, an instant of
``time.monotonic()`` (jizhi/messages.py), which the request keeps to the stage.

Admitted requests are sampled into a ring (a new version's warm-up replays
them) and, while ``jizhictl record`` runs, all recorded.
"""
import collections
import logging

import numpy as np

from jizhi import messages, protocol
from jizhi.errors import BAD_REQUEST, DEADLINE_EXCEEDED, OVERLOADED, UNKNOWN_PIPELINE, RequestError

log = logging.getLogger("jizhi.broker")

STOP_RETRY_MS = 1000        # retry_after_ms of the requests answered while the broker stops
RECORD_MAX = 200_000        # requests held between two fetches of `jizhictl record`
RECORD_ABANDONED_S = 10.0   # recording stops when nobody fetched it for this long
MALFORMED_LOG_EVERY_S = 5.0


def request_id(body):
    """The ``id`` of a request body that may be malformed (None when it has none a reply can echo)."""
    try:
        h = protocol.unpackb(body[0])
        rid = h.get("id") if isinstance(h, dict) else None
    except Exception:
        return None
    return rid if isinstance(rid, (int, str, bytes, type(None))) else None


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

    def turn(self, key, now):
        """Does ``key`` come back on its ticket, its turn come (due by the next completion burst, not
        lapsed)? (With a line of waiting requests, a client whose turn came goes to its head: no slot
        is held for it.) Its ticket is used either way."""
        if not self.tickets:
            return False
        rate = self.rate(now)
        self._lapse(now, rate)
        due = self.tickets.pop(key, None)
        return due is not None and due <= now + self.batch / rate

    def refuse(self, key, now, ahead=0):
        """A request from ``key`` is refused: its ticket, as ``retry_after_ms``; ``ahead``: the requests
        waiting in the broker for a slot, whose turns come first."""
        rate = self.rate(now)
        self._lapse(now, rate)
        self.tickets.pop(key, None)
        # After the last ticket still out (a client refused again gave its own back: a DEALER that
        # floods holds one ticket, it does not push everyone else's turn away) and after the line.
        due = max(next(reversed(self.tickets.values()), now), now + ahead / rate) + 1.0 / rate
        self.tickets[key] = due
        return max(1, int((due - now) * 1000.0 + 0.999))

    def waiting(self):
        return len(self.tickets)


class Admission:
    """The client side of the broker ``b`` (jizhi/broker/core.py): what a client sent, and the recording."""

    def __init__(self, b, overlay, qcache):
        self.b = b
        s = b.settings
        self.limits = {"max_candidates": s["limits.max_candidates"],
                       "max_message_bytes": s["limits.max_message_bytes"]}
        self.default_budget_s = s["limits.default_deadline_ms"] / 1000.0
        self.max_waiting = s["limits.max_waiting"]
        self.malformed = 0
        self._last_malformed_log = 0.0
        self.overlay = overlay
        self.qcache = qcache        # the broker is its epoch table's one writer
        self.seen_feedback = collections.OrderedDict()
        self.feedback_dedup = s["limits.feedback_dedup"]
        self.feedback_events = 0
        self.overlay_full = 0
        # Recorded traffic: a sampled ring of recent requests (the warm-up of a new version
        # replays them) and, while `jizhictl record` runs, every admitted request.
        self.sample_every = s["models.warmup_sample_every"]
        self.ring = collections.deque(maxlen=s["models.warmup_ring"])
        self.admitted = 0
        self.recording = None       # list of records while recording, else None
        self.record_dropped = 0
        self.record_fetched_at = 0.0

    def on_client(self, frames):
        """One client message (its frames, the routing id first)."""
        b = self.b
        envelope, body = protocol.split_envelope(frames)
        if envelope is None:
            self.count_malformed("a client message without an envelope delimiter")
            # Answer anyway (routing id, empty delimiter) so a confused DEALER hears why.
            b.answers.reply_error([frames[0], b""], None, BAD_REQUEST,
                                  "message has no empty delimiter frame after the routing id")
            return
        t_recv = b.clock()
        try:
            req = protocol.decode_request([bytes(f) for f in body], self.limits)
        except RequestError as e:
            self.count_malformed(e.message)
            b.answers.reply_error(envelope, request_id(body), e.code, e.message)
            return
        if b.stopping:
            # (after the drain: the same word a client was told while it lasted)
            b.answers.reply_error(envelope, req["id"], OVERLOADED, "server draining to stop; retry on another node "
                                  "or later", STOP_RETRY_MS)
            return
        op = req["op"]
        if op == "ping":
            b.sink.client(envelope, protocol.encode_info(req["id"], {"pong": True}))
            return
        if op == "info":
            b.sink.client(envelope, protocol.encode_info(req["id"], b.info()))
            return
        if op == "feedback":
            self.feedback(envelope, req)
            return
        self.admit(envelope, req, t_recv)

    def count_malformed(self, why):
        self.malformed += 1
        now = self.b.clock()
        if now - self._last_malformed_log > MALFORMED_LOG_EVERY_S:
            self._last_malformed_log = now
            log.warning("bad request (%d so far): %s", self.malformed, why)

    def feedback(self, envelope, m):
        """Append to the user's recent behaviour (the overlay); the next score sees it."""
        b = self.b
        idem = m["idempotency_id"]
        if idem is not None:
            if idem in self.seen_feedback:
                b.sink.client(envelope, protocol.encode_info(m["id"], {"applied": False, "duplicate": True}))
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
        b.sink.client(envelope, protocol.encode_info(m["id"], {"applied": applied, "duplicate": False}))

    def admit(self, envelope, m, t_recv, now=None):
        """A valid score request received at ``t_recv``: pin it to its pipeline's serving version, let it
        wait in the line for a slot, or refuse it. ``now``: it leaves the line now (``unpark``); then
        False when it must wait on (its turn has not come), else True: admitted or answered."""
        b = self.b
        waited = now is not None
        now = t_recv if now is None else now
        name = b.default_pipeline if m["pipeline"] == "default" else m["pipeline"]
        pipe = b.pipes.get(name)
        if pipe is None:
            b.answers.reply_error(envelope, m["id"], UNKNOWN_PIPELINE,
                                  f"pipeline {m['pipeline']!r} is not served here (served: {', '.join(b.pipes)})")
            return True
        if b.draining and not waited:
            b.answers.reply_error(envelope, m["id"], OVERLOADED, "server is draining (jizhictl drain or shutdown)",
                                  1000)
            return True
        deadline_s = self.deadline_s(m, t_recv)
        if waited and deadline_s <= now:
            b.answers.reply_error(envelope, m["id"], DEADLINE_EXCEEDED, "deadline passed while waiting for a "
                                  f"request slot of pipeline {name}", pipe=pipe)
            return True
        gen = pipe.serving()
        if gen is None:
            b.answers.reply_error(envelope, m["id"], OVERLOADED,
                                  f"pipeline {name} has no serving model version (one failed; the previous one is "
                                  "loading)", 500, pipe)
            return True
        key = bytes(envelope[0])      # the client's routing id: who was told to come back when
        line = pipe.line
        if not self.max_waiting:
            ok = pipe.retry.admit(key, len(gen.free), now)  # (a freed slot held for the client whose turn it is)
        else:
            ok = bool(gen.free) and (waited or not line)    # (first come, first served)
        if not ok:
            if waited:
                return False
            if self.max_waiting and pipe.retry.turn(key, now):
                line.appendleft((envelope, m, t_recv))      # told to come back now: its turn, before the line
            elif len(line) < self.max_waiting:
                line.append((envelope, m, t_recv))
            else:
                self.refuse_slot(envelope, m, pipe, gen, key, now)
                return True
            pipe.waited += 1
            return True
        items, rs = m["item_ids"], m["recall_scores"]
        keep, cost = pipe.quota(items.shape[0], deadline_s - now, now)    # (shedding: jizhi/shedding.py)
        req = b.dispatcher.enqueue(pipe, gen, envelope, m["id"], m["user"], items, rs, m["top_k"], m["ret"] == "all",
                                   deadline_s, t_recv, feats=m.get("feats"), keep=keep, cost=cost, t_enq=now)
        req.heads = m.get("heads", False)
        self.admitted += 1
        pipe.peak_in_flight = max(pipe.peak_in_flight, gen.in_flight())
        if self.admitted % self.sample_every == 0:
            self.ring.append((name, req.user, np.array(items), None if rs is None else np.array(rs), req.top_k))
        if self.recording is not None:
            self.record(name, req.user, items, rs, req.top_k, t_recv)
        return True

    def refuse_slot(self, envelope, m, pipe, gen, key, now):
        """Every slot taken, the line full: OVERLOADED, with this client's turn as ``retry_after_ms``."""
        pipe.refused += 1         # (the shedding controller's sign that the cut lets too much in)
        after_ms = pipe.retry.refuse(key, now, len(pipe.line))
        self.b.answers.reply_error(envelope, m["id"], OVERLOADED,
                                   f"{gen.in_flight()} requests in flight on pipeline {pipe.name} ({gen.slots} slots) "
                                   f"and {len(pipe.line)} waiting for one (limits.max_waiting), "
                                   f"{pipe.retry.waiting() - 1} clients told to retry before this one", after_ms, pipe)

    @property
    def waiting(self):
        """Requests in every pipeline's line."""
        return sum(len(pipe.line) for pipe in self.b.pipes.values())

    def deadline_s(self, m, t_recv):
        """The instant (``time.monotonic()``) a request received at ``t_recv`` must be answered by."""
        budget_ms = m["deadline_ms"]
        return t_recv + (budget_ms / 1000.0 if budget_ms is not None else self.default_budget_s)

    def unpark(self):
        """Admit the waiting requests whose turn has come (a slot freed), in arrival order."""
        now = self.b.clock()
        for pipe in self.b.pipes.values():
            line = pipe.line
            while line:
                envelope, m, t_recv = line[0]
                if not self.admit(envelope, m, t_recv, now):
                    break
                line.popleft()

    def expire_waiting(self, now):
        """Answer DEADLINE_EXCEEDED the waiting requests whose deadline passed (the sweep's, 20 times a
        second: a line holds at most ``limits.max_waiting``)."""
        for pipe in self.b.pipes.values():
            line = pipe.line
            if not line:
                continue
            keep = collections.deque()
            for entry in line:
                envelope, m, t_recv = entry
                if self.deadline_s(m, t_recv) <= now:
                    self.b.answers.reply_error(envelope, m["id"], DEADLINE_EXCEEDED, "deadline passed while "
                                               f"waiting for a request slot of pipeline {pipe.name}", pipe=pipe)
                else:
                    keep.append(entry)
            pipe.line = keep

    def refuse_waiting(self, message, retry_after_ms):
        """Answer OVERLOADED every waiting request (the broker stops)."""
        for pipe in self.b.pipes.values():
            for envelope, m, _ in pipe.line:
                self.b.answers.reply_error(envelope, m["id"], OVERLOADED, message, retry_after_ms, pipe)
            pipe.line.clear()

    def record(self, name, user, items, rs, top_k, t_recv):
        if len(self.recording) >= RECORD_MAX:
            self.record_dropped += 1
            return
        self.recording.append((t_recv, name, user, bytes(items.data), b"" if rs is None else bytes(rs.data), top_k))

    def on_record(self, ident, m):
        """``jizhictl record``: start, fetch (what was recorded since the last fetch) or stop."""
        op = m.op
        now = self.b.clock()
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
        reply = messages.Record(records=out if op != "start" else [], dropped=dropped,
                                recording=self.recording is not None)
        self.b.sink.backend(ident, reply.encode())

    def abandon_recording(self, now):
        """Stop recording when nobody fetched it for RECORD_ABANDONED_S (jizhictl record gone?)."""
        if self.recording is not None and now - self.record_fetched_at > RECORD_ABANDONED_S:
            log.warning("recording stopped: nobody fetched it for %.0f s (jizhictl record gone?)", RECORD_ABANDONED_S)
            self.recording = None
