"""Load shedding: the pruning policies, the admission cut, the load controller, the control segment.

(Training is offline: jizhi/tools/shedtrain.py.)

When the server is overloaded the ``shedder`` stage (workers/shedder.py), first in a pipeline,
keeps only each request's best candidates by recall score, so the cut ones cost nothing
downstream (JIZHI, KDD 2021, section 6.2). Four parts decide how many:

* the **admission cut** (``AdmissionCut``, one per pipeline in the broker) gives every request,
  as it is admitted, the fraction of its candidates to keep (its *quota*), from what is known at
  that instant: the work already admitted and not yet done, the work arriving per second (both
  in worker-seconds, from a cost model of the shedder's group fitted on its measured service
  times: seconds = a x requests + b x candidates kept, a worker's time on an event as the broker
  sees it, from the event's send or the worker's previous DONE to its DONE), the group's workers,
  the free request slots and the request's own deadline. A step to 2x is met by the very next requests; a steady overload of k x gets the
  quota that makes the arriving work fit the workers (about 1/k, less the per-request costs a
  cut cannot save); work queued past ``WAIT_SET`` x the target cuts more, and no request is given
  more than can finish within the target. A worker's first ``COLD_EVENTS`` events and first
  ``COLD_S`` seconds (numba and onnxruntime warming) are left out of the cost model, and the
  requests they served out of the controller's p99: warm-up is not overload;
* the **load controller** (``Controller``, run by the supervisor every ``shed.period_s``) only
  corrects that estimate: from the broker's windowed p99 (without the requests a warming worker
  served) it sets a *trim*, the share of the workers' capacity the admission cut may
  fill: lower while p99 is over ``shed.high`` x the SLO, higher (up to ``TRIM_MAX``) while it is
  under ``shed.low`` x the SLO and candidates are being cut, held in between;
* the **policy** turns a request's quota into its cutoff. ``rule``: the request keeps its quota.
  ``learned``: a small model predicts from the request's recall scores (the JIZHI paper's
  table 7 features: mean, standard deviation, max, min and the top-vs-median gap of the recall
  scores, and the candidate count) how much of its list the request needs to keep its top-K,
  and the quota is shared in proportion: a request whose tail is clearly weak is cut more, a
  close call less, at the same mean (the worker keeps a running mean of the predicted needs);
* the **control state** (``Control``): per pipeline, one writer (the supervisor), read by every
  shedder at each batch for its policy's generation (and, for ``jizhictl shed status``, the
  mode, quota and the figures the controller saw). A control state of jizhi/controlstate.py:
  each change is a new immutable dict, the per-batch read is one word.

The quota of each request travels with it in the broker's event (``Event.keep``): mode ``auto``
the admission cut's, ``manual`` the quota of ``jizhictl shed set``, ``off`` none (keep all).

``jizhi.tools.shedtrain.train(trace, version_dir)`` (``jizhictl shed train``, an offline tool) scores a recorded trace fully offline
with the reference scorer, finds for every request the smallest cutoff (by recall order) that
keeps its whole model top-K, and fits the need model on the features (ridge regression on the
log of the needed fraction). The policy is a small JSON file.
"""
import json
import logging
import math

import numpy as np

from jizhi import controlstate
from jizhi.errors import ShmFull
from jizhi.rundir import write_file

log = logging.getLogger("jizhi.shedding")

MODES = ("off", "auto", "manual")
POLICIES = ("rule", "learned")
FEATURES = ("bias", "rs_mean", "rs_std", "rs_max", "rs_min", "rs_gap", "log_n")
MIN_KEEP = 0.02            # no request is cut below this fraction of its candidates (nor below top_k)
COLD_EVENTS = 5            # a worker's first events and seconds are its warm-up: out of the cost model and the
COLD_S = 2.0               # controller's p99

# What the control state reads before the supervisor's first publication.
UNPUBLISHED = {"generation": 0, "mode": "off", "quota": 1.0, "policy_generation": 0, "queue": 0.0, "p99_ms": 0.0}


def recall_features(offsets, rs):
    """float64 [R, len(FEATURES)]: per request, from its recall scores (vectorised over the batch)."""
    n = np.diff(offsets).astype(np.float64)
    r = n.shape[0]
    out = np.zeros((r, len(FEATURES)), dtype=np.float64)
    out[:, 0] = 1.0
    if rs.shape[0] == 0:
        return out
    x = rs.astype(np.float64)
    c1 = np.concatenate([[0.0], np.cumsum(x)])
    c2 = np.concatenate([[0.0], np.cumsum(x * x)])
    safe = np.maximum(n, 1.0)
    mean = (c1[offsets[1:]] - c1[offsets[:-1]]) / safe
    var = np.maximum((c2[offsets[1:]] - c2[offsets[:-1]]) / safe - mean * mean, 0.0)
    nonempty = n > 0
    starts = offsets[:-1][nonempty]
    mx = np.full(r, 0.0)
    mn = np.full(r, 0.0)
    mx[nonempty] = np.maximum.reduceat(x, starts)
    mn[nonempty] = np.minimum.reduceat(x, starts)
    std = np.sqrt(var)
    out[:, 1] = mean
    out[:, 2] = std
    out[:, 3] = mx
    out[:, 4] = mn
    out[:, 5] = (mx - mean) / np.maximum(std, 1e-6)     # how far the best stands out
    out[:, 6] = np.log(safe)
    return out


def keep_counts(offsets, keep_fraction, top_k):
    """int64 [R]: candidates each request keeps: ``ceil(fraction x n)``, at least ``top_k`` and
    ``MIN_KEEP`` of them, at most all."""
    n = np.diff(offsets)
    want = np.ceil(np.asarray(keep_fraction, dtype=np.float64) * n).astype(np.int64)
    floor = np.maximum(np.minimum(np.asarray(top_k, dtype=np.int64), n), np.ceil(MIN_KEEP * n).astype(np.int64))
    return np.clip(want, floor, n)


class RulePolicy:
    name = "rule"

    def keep_fractions(self, quota, features):
        """``quota``: one for the batch or one per request."""
        return np.broadcast_to(np.asarray(quota, dtype=np.float64), (features.shape[0],)).copy()


class LearnedPolicy:
    """``need(features)``: the predicted fraction of its candidates a request must keep for its
    top-K; the quota is shared among requests in proportion to it (module docstring)."""
    name = "learned"

    def __init__(self, doc):
        if doc.get("policy") != "learned" or doc.get("features") != list(FEATURES):
            raise ValueError("not a learned shedding policy of this version (features differ)")
        self.weights = np.asarray(doc["weights"], dtype=np.float64)
        self.mean_need = float(doc.get("mean_need", 0.5))   # running mean, seeded from training
        self.doc = doc

    def need(self, features):
        return np.clip(np.exp(features @ self.weights), MIN_KEEP, 1.0)

    def keep_fractions(self, quota, features):
        need = self.need(features)
        if need.shape[0]:
            self.mean_need = 0.98 * self.mean_need + 0.02 * float(need.mean())
        return np.clip(quota * need / max(self.mean_need, 1e-6), MIN_KEEP, 1.0)


def load_policy(path):
    """The policy in a JSON file (``jizhictl shed train`` writes it), or the rule without one."""
    if not path:
        return RulePolicy()
    with open(path) as f:
        doc = json.load(f)
    return LearnedPolicy(doc) if doc.get("policy") == "learned" else RulePolicy()


def save_policy(doc, path):
    """Write a policy file (the supervisor, where its workers read it; ``jizhictl shed train``)."""
    write_file(path, json.dumps(doc, indent=1).encode(), mode=0o644)   # atomically, never through a link


# --- the admission cut -------------------------------------------------------------------------

class AdmissionCut:
    """Each request's quota (fraction of candidates kept), decided at its admission (module docstring).

    One per pipeline with a shedder, in the broker, on its loop's thread. ``quota(n, budget_s, now)``
    for a request of ``n`` candidates whose deadline is ``budget_s`` away, then ``admitted(kept)``
    with ``kept = quota x n`` (kept with the request) and ``left(kept, in_flight)`` once its shedder
    group is done with it (or it ended before). ``observe(requests, kept, svc_s)``
    feeds one event's measured service time to the cost model (not a warming worker's). The backlog
    is kept as requests and candidates (``backlog_req``, ``backlog_kept``), priced with the model as
    it is at each admission, so requests admitted before it was fitted count too.

    Fluid reasoning: ``workers`` x ``trim`` worker-seconds are served per second; the work
    arriving per second at full lists is ``a x req_rate + b x cand_rate`` (exponentially weighted
    rates, ``RATE_TAU_S``); the quota that makes it fit is ``(capacity - a x req_rate) / (b x
    cand_rate)``. The backlog (admitted, not done) waits ``backlog / workers``: past ``WAIT_SET``
    of the target the wait, smoothed over ``WAIT_TAU_S`` (a burst of arrivals is not a trend),
    shrinks the quota in proportion, to nothing at the target; and the request is never given
    more than finishes by the target (or its own deadline, when nearer) behind the backlog as it
    is. Until the cost model has ``CALIBRATE_EVENTS`` events, only the free request slots cut (under
    ``SLOTS_LOW`` of them free, in proportion): a fresh server hit at once by 2x its capacity would
    otherwise fill its slots and its line at full quota before the model knows a price."""

    RATE_TAU_S = 0.25          # the arrival rates' memory
    WAIT_TAU_S = 0.1           # the smoothed wait's
    FORGET = 0.99              # the cost model's weight of an event, per later event (~100 events)
    CALIBRATE_EVENTS = 4
    PRIOR_FIXED = 0.1          # the share of a full request's cost assumed per request until cuts tell
    WAIT_SET = 0.3             # share of the target a backlog may wait before it cuts more
    SLOTS_LOW = 0.5            # share of the request slots free under which it cuts more

    def __init__(self, target_s, floor=MIN_KEEP):
        self.target_s = target_s
        self.floor = floor
        self.trim = 1.0
        self.workers = 0
        self.backlog_req = 0       # requests admitted and not done, and the candidates they keep
        self.backlog_kept = 0.0
        self.wait = 0.0            # their wait, smoothed (seconds)
        self.req_rate = 0.0    # requests and candidates arriving per second
        self.cand_rate = 0.0
        self.t_rate = None
        self.events = 0
        self.s = np.zeros((2, 2))    # the cost model's weighted normal equations
        self.r = np.zeros(2)
        self.a = self.b = None       # seconds per request, per kept candidate
        self.kept_mean = 1.0         # recent mean quota given (kept_recent)
        self.t_last = None           # the last admission

    def reset(self):
        """A fresh start (``jizhictl shed auto``): rates forgotten, trim 1; the cost model stays."""
        self.trim, self.req_rate, self.cand_rate, self.t_rate, self.kept_mean = 1.0, 0.0, 0.0, None, 1.0
        self.wait, self.t_last = 0.0, None

    def observe(self, requests, kept, svc_s):
        if requests <= 0 or svc_s <= 0:
            return
        x = np.array([float(requests), float(kept)])
        self.s = self.FORGET * self.s + np.outer(x, x)
        self.r = self.FORGET * self.r + x * svc_s
        self.events += 1
        if self.events < self.CALIBRATE_EVENTS:
            return
        # A weak pull of ``a`` towards PRIOR_FIXED of the mean per-request cost: with every list kept
        # whole (kept = n x requests) the two costs cannot be told apart, and the fit stays put.
        per_req = self.r[0] / max(self.s[0, 0], 1e-12)
        a0 = self.PRIOR_FIXED * per_req
        ridge = 0.01 * self.s[0, 0]
        m = self.s + np.array([[ridge, 0.0], [0.0, 0.0]])
        try:
            a, b = np.linalg.solve(m, self.r + np.array([ridge * a0, 0.0]))
        except np.linalg.LinAlgError:
            return
        if b > 0 and a >= 0:
            self.a, self.b = float(a), float(b)
        elif b > 0:             # (a negative fixed cost: noise; all of it per candidate)
            self.a, self.b = 0.0, float(self.r[1] / max(self.s[1, 1], 1e-12))

    def backlog(self):
        """Worker-seconds admitted and not done, at the model's prices now."""
        if self.b is None:
            return 0.0
        return self.a * self.backlog_req + self.b * self.backlog_kept

    def quota(self, n, budget_s, now, free_share=1.0):
        """The fraction of its ``n`` candidates a request admitted ``now`` keeps (1: no cut);
        ``free_share``: the pipeline's free request slots, a share of all (under SLOTS_LOW of them
        free, the quota shrinks in proportion: an overload is cut, not refused for want of a slot)."""
        if self.t_rate is None:
            self.t_rate = now
        dt = max(now - self.t_rate, 0.0)
        decay = math.exp(-dt / self.RATE_TAU_S)
        self.t_rate = now
        self.req_rate = self.req_rate * decay + 1.0 / self.RATE_TAU_S
        self.cand_rate = self.cand_rate * decay + n / self.RATE_TAU_S
        if self.b is None or self.workers <= 0 or n <= 0:
            # No cost model yet (a fresh server's first events): nothing is cut on a guess, but the
            # request slots still say when the work piles up.
            return self._by_slots(1.0, free_share)
        capacity = self.workers * self.trim
        q = (capacity - self.a * self.req_rate) / max(self.b * self.cand_rate, 1e-12)
        target = min(self.target_s, budget_s)
        backlog = self.backlog()
        w = math.exp(-dt / self.WAIT_TAU_S)
        self.wait = w * self.wait + (1.0 - w) * backlog / self.workers
        if self.wait > self.WAIT_SET * target:
            q *= max(0.0, 1.0 - (self.wait - self.WAIT_SET * target) / ((1.0 - self.WAIT_SET) * target))
        # Never more than finishes by the target: what waits ahead, then its own share of a worker.
        q = self._by_slots(min(q, (target * self.workers - backlog - self.a) / (self.b * n)), free_share)
        self.kept_mean = 0.99 * self.kept_mean + 0.01 * q
        self.t_last = now
        return q

    def _by_slots(self, q, free_share):
        """``q`` shrunk in proportion under ``SLOTS_LOW`` free request slots, then held to [floor, 1]."""
        if free_share < self.SLOTS_LOW:
            q *= free_share / self.SLOTS_LOW
        return min(1.0, max(self.floor, q))

    def kept_recent(self, now, idle_s=1.0):
        """The mean quota of the last hundred or so admissions; 1 after ``idle_s`` without one."""
        return self.kept_mean if self.t_last is not None and now - self.t_last < idle_s else 1.0

    def admitted(self, kept):
        """A request that keeps about ``kept`` candidates joins the backlog."""
        self.backlog_req += 1
        self.backlog_kept += kept

    def left(self, kept, in_flight):
        """It leaves (``in_flight``: requests still in the pipeline; none: the backlog is empty)."""
        if in_flight:
            self.backlog_req -= 1
            self.backlog_kept -= kept
        else:
            self.backlog_req, self.backlog_kept = 0, 0.0       # (no drift)


# --- the load controller ---------------------------------------------------------------------

class Controller:
    """The admission cut's *trim* from the windowed p99 (module docstring).

    ``update(p99_ms, cutting, refused, slots_used)`` once per period: above ``high`` x SLO the trim
    falls in proportion to the overshoot (at least ``step``), and by ``2 x step`` when requests were
    refused for want of a slot in the period (``refused``) or the most in flight came near the slots
    (``slots_used``, a share, over SLOTS_FULL): what was let in is more than can be held; under
    ``low`` x SLO with the slots below SLOTS_EASY it rises by ``up`` while candidates are being cut
    (``cutting``; up to TRIM_MAX: the estimate was too cautious, and the smallest cut that holds
    the SLO is the goal), else it goes back towards 1; in between it holds."""

    TRIM_MAX = 1.3
    SLOTS_FULL = 0.85
    SLOTS_EASY = 0.7

    def __init__(self, slo_ms, high=0.8, low=0.65, step=0.03, up=0.05, min_trim=0.3):
        self.slo_ms = slo_ms
        self.high, self.low, self.step, self.up, self.min_trim = high, low, step, up, min_trim
        self.trim = 1.0

    def update(self, p99_ms, cutting=True, refused=False, slots_used=0.0):
        hi, lo = self.high * self.slo_ms, self.low * self.slo_ms
        late = p99_ms is not None and p99_ms > hi
        full = refused or slots_used > self.SLOTS_FULL
        if late or full:
            cut = max(self.step * (2.0 if full else 1.0), min(0.3, 0.5 * (p99_ms / hi - 1.0)) if late else 0.0)
            self.trim = max(self.min_trim, self.trim * (1.0 - cut))
        elif (p99_ms is None or p99_ms < lo) and slots_used < self.SLOTS_EASY:
            if cutting:
                self.trim = min(self.TRIM_MAX, self.trim + self.up)
            elif self.trim != 1.0:
                self.trim = min(1.0, self.trim + self.up) if self.trim < 1.0 else max(1.0, self.trim - self.up)
        return self.trim


# --- the control state ---------------------------------------------------------------------------

class Control:
    """The shedding control state of one pipeline, segment ``jizhi.<instance>.<run>.<pipeline>.shed``
    (its generation word; each generation's dict beside it). One writer: the supervisor
    (``writable=True``; ``create=True`` makes the segment); every shedder reads it per batch."""

    def __init__(self, name, writable=False, create=False):
        self.name = name
        self.full = False       # the last publication found /dev/shm full
        if writable:
            self.state = controlstate.Writer(name, create=create)
        else:
            self.state = controlstate.Reader(name)

    def publish(self, mode, quota, policy_gen, queue=0.0, p99=0.0):
        """False when /dev/shm had no room for the change: the shedders keep the values published
        before (said once in the log, and once when a change gets through again)."""
        if mode not in MODES:
            raise ValueError(f"shedding mode {mode!r} is not one of {', '.join(MODES)}")
        try:
            self.state.publish({"mode": mode, "quota": float(quota), "policy_generation": int(policy_gen),
                                "queue": float(queue), "p99_ms": float(p99)})
        except ShmFull as e:
            if not self.full:
                log.error("shedding control %s: a change was not published, the shedders keep the previous "
                          "values: %s", self.name, e)
            self.full = True
            return False
        if self.full:
            log.info("shedding control %s: changes are published again", self.name)
            self.full = False
        return True

    def read(self):
        """``{generation, mode, quota, policy_generation, queue, p99_ms}``; the same dict until the next
        change (do not change it). Generation 0: nothing published yet (mode off, quota 1)."""
        values = self.state.read()
        return values if values is not None else UNPUBLISHED

    def close(self):
        """Drop the mapping; the writer also unlinks its live dict (the supervisor unlinks the segment)."""
        self.state.close()
