"""Answers: a request's reply (ok or error), its figures, and the release of its slot.

Runs in the broker process, on its loop's thread. ``ok`` reads the sink
group's outputs from the request's arena slot (its scores, the order of its
top-k, each head's scores), leaves out the candidates whose score is NaN or
infinite (counted; a serving version that gives too many in its first
``models.invalid_watch_s`` is reported to the supervisor, INVALID) and
replies; ``error`` replies an error code. A warm-up request is answered to
its version's warm-up (jizhi/broker/versions.py), not to a client.

A request's slot is freed only when it has been answered *and* no worker
still holds it (``release_if_idle``), so a late worker never writes into a
reused slot.
"""
import collections
import logging

import numpy as np

from jizhi import messages, protocol
from jizhi.errors import CODES
from jizhi.states import VersionState
from jizhi.stats import B_REPLY, C_INVALID_SCORES, C_REQUESTS, C_UNKNOWN_USERS
from jizhi.workers.stage import INVALID_NAN_BITS, INVALID_SCORES

log = logging.getLogger("jizhi.broker")

# A serving version's share of invalid scores is judged from this many candidates on: a few
# requests are too few to tell a broken version from one odd item.
WATCH_MIN_CANDIDATES = 10_000
INVALID_LOG_EVERY_S = 10.0  # the log line about invalid scores dropped, at most this often per pipeline


class Answers:
    """The replies of the broker ``b`` (jizhi/broker/core.py), through its sink, and their counts."""

    def __init__(self, b):
        self.b = b
        self.errors = collections.Counter()     # code -> error replies
        self.answered = 0                       # ok replies

    def reply_error(self, envelope, rid, code, message, retry_after_ms=None, pipe=None):
        b = self.b
        self.errors[code] += 1
        if b.stats is not None:
            row = (pipe or b.pipes[b.default_pipeline]).row
            b.stats.errors[row, CODES.index(code)] += 1
        b.sink.client(envelope, protocol.encode_error(rid, code, message, retry_after_ms))

    def error(self, req, code, message, retry_after_ms=None):
        if req.answered:
            return
        req.answered = True
        if req.warm:
            self.b.versions.warm_result(req, f"{code}: {message}")
        else:
            self.reply_error(req.envelope, req.rid, code, message, retry_after_ms, req.pipe)
            for router, name in req.ab.items():
                req.pipe.ab_stats[router][name]["errors"][code] += 1
        self.release_if_idle(req)

    def ok(self, req):
        """Answer ``req`` from its slot: the top-k (or every candidate) and their scores."""
        self.b.cpu.enter(B_REPLY)
        try:
            self._ok(req)
        finally:
            self.b.cpu.leave()

    def _ok(self, req):
        b = self.b
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
            b.versions.warm_result(req, None if np.isfinite(scores).any() or not n else f"none of {n} scores is finite",
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
        req.timings["total"] = total_us = int((b.clock() - req.t_recv) * 1e6)
        if pipe.has_qcache:
            pipe.qc_candidates += n
            pipe.qc_hits += req.counts.get("cached", 0)
        if b.stats is not None:
            b.stats.observe(pipe.row, 0, total_us)
            b.stats.counters[pipe.row, C_REQUESTS] += 1
        # 0 or 1: a pipeline whose branches each read the profiles counts the user once per branch.
        unknown_user = 1 if req.counts.get("unknown_user", 0) else 0
        if unknown_user:
            pipe.unknown_users += 1
            if b.stats is not None:
                b.stats.counters[pipe.row, C_UNKNOWN_USERS] += 1
        pairs = int(n - np.count_nonzero(np.isnan(scores)))     # pairs that got a score
        pipe.requests.add(total_us, pairs, control=not req.cold)
        if pipe.shedding is not None:
            pipe.requests.shed = 0.98 * pipe.requests.shed + 0.02 * req.counts.get("shed", 0)
            pipe.requests.cands = 0.98 * pipe.requests.cands + 0.02 * n
        extra = {"missing_signatures": req.counts.get("missing_signatures", 0), "cached": req.counts.get("cached", 0),
                 "invalid_scores": invalid, "unknown_user": unknown_user}
        if "profile_snapshot" in req.counts:      # a version reading a profile store: the snapshot it read
            extra["profile_snapshot"] = int(req.counts["profile_snapshot"])
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
        b.sink.client(req.envelope, frames)
        self.release_if_idle(req)

    def count_invalid(self, pipe, gen, invalid):
        """``invalid`` candidates of an ok reply were dropped for a NaN or infinite score: count them
        (``jizhictl stats``, Prometheus) and say so in the log, at most every INVALID_LOG_EVERY_S."""
        b = self.b
        pipe.invalid_scores += invalid
        if b.stats is not None:
            b.stats.counters[pipe.row, C_INVALID_SCORES] += invalid
        now = b.clock()
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
        b = self.b
        w = gen.watch
        if w is None:
            return
        now = b.clock()
        if now > w["until"]:
            gen.watch = None
            return
        w["invalid"] += invalid
        w["scored"] += scored
        if w["scored"] >= WATCH_MIN_CANDIDATES and w["invalid"] > b.max_invalid_share * w["scored"]:
            gen.watch = None
            serving_s = round(b.invalid_watch_s - (w["until"] - now), 1)
            log.error("pipeline %s: version %s gave %d invalid scores of %d (%.2f%% > models.max_invalid_share "
                      "%g) in its first %.1f s of serving", pipe.name, gen.versions, w["invalid"], w["scored"],
                      100.0 * w["invalid"] / w["scored"], b.max_invalid_share, serving_s)
            b.versions.tell_supervisor(messages.Invalid(pipe.name, gen.version, w["invalid"], w["scored"], serving_s))

    def release_if_idle(self, req):
        """Free ``req``'s slot once it is answered and no worker holds it; a draining version that holds
        nothing more is idle."""
        if req.answered and req.held == 0 and req.slot is not None:
            gen = req.gen
            gen.by_slot[req.slot] = None
            gen.free.append(req.slot)
            req.slot = None
            req.pipe.done_with(req)
            if not req.warm:
                req.pipe.retry.freed(self.b.clock())
            if gen.state is VersionState.DRAINING and gen.in_flight() == 0:
                self.b.versions.idle(req.pipe, gen)
