"""Load shedding: the pruning policies, the load controller and the control segment (training is offline: jizhi/tools/shedtrain.py).

When the server is overloaded the ``shedder`` stage (workers/shedder.py), first in a pipeline,
keeps only each request's best candidates by recall score, so the cut ones cost nothing
downstream (JIZHI, KDD 2021, section 6.2). Three parts decide how many:

* the **load controller** (``Controller``, run by the supervisor every ``shed.period_s``) turns the
  broker's live figures (p99 over the last seconds, queued requests) into a *quota*: the mean
  fraction of candidates to keep. It raises the cut fast when p99 passes ``shed.high`` x the SLO,
  releases it slowly when p99 is under ``shed.low`` x the SLO, and holds it in between, so a
  steady load gives a steady cut;
* the **policy** turns the quota into a per-request cutoff. ``rule``: every request keeps the
  quota. ``learned``: a small model predicts from the request's recall scores (the JIZHI paper's
  table 7 features: mean, standard deviation, max, min and the top-vs-median gap of the recall
  scores, and the candidate count) how much of its list the request needs to keep its top-K,
  and the quota is shared in proportion: a request whose tail is clearly weak is cut more, a
  close call less, at the same mean (the worker keeps a running mean of the predicted needs).
  The previous cutoff and the queue enter through the quota, which the controller sets from
  them;
* the **control state** (``Control``): per pipeline, one writer (the supervisor), read by every
  shedder at each batch: the generation, the mode, the quota, the policy's generation (and the
  figures the controller saw). A control state of jizhi/controlstate.py: each change is a new
  immutable dict, the per-batch read is one word.

``jizhi.tools.shedtrain.train(trace, version_dir)`` (``jizhictl shed train``, an offline tool) scores a recorded trace fully offline
with the reference scorer, finds for every request the smallest cutoff (by recall order) that
keeps its whole model top-K, and fits the need model on the features (ridge regression on the
log of the needed fraction). The policy is a small JSON file.
"""
import json
import logging

import numpy as np

from jizhi import controlstate
from jizhi.errors import ShmFull
from jizhi.rundir import write_file

log = logging.getLogger("jizhi.shedding")

MODES = ("off", "auto", "manual")
POLICIES = ("rule", "learned")
FEATURES = ("bias", "rs_mean", "rs_std", "rs_max", "rs_min", "rs_gap", "log_n")
MIN_KEEP = 0.02            # no request is cut below this fraction of its candidates (nor below top_k)

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
        return np.full(features.shape[0], quota, dtype=np.float64)


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


# --- the load controller ---------------------------------------------------------------------

class Controller:
    """The quota (mean fraction of candidates kept) from the live p99 and queue (module docstring).

    ``update(p99_ms, queued, in_flight_limit)`` once per period: above ``high`` x SLO the cut grows
    in proportion to the overshoot (at least ``step``); under ``low`` x SLO with a short queue it is
    released by ``step``; in between it holds. A queue over half the in-flight slots counts as
    over the SLO (the p99 of answers lags a queue that is building)."""

    def __init__(self, slo_ms, high=0.8, low=0.65, step=0.03, min_quota=0.05):
        self.slo_ms = slo_ms
        self.high, self.low, self.step, self.min_quota = high, low, step, min_quota
        self.quota = 1.0

    def update(self, p99_ms, queued, in_flight_limit):
        hi, lo = self.high * self.slo_ms, self.low * self.slo_ms
        over = p99_ms is not None and p99_ms > hi
        if queued > in_flight_limit / 2:
            over = True
            p99_ms = max(p99_ms or 0.0, 1.5 * hi)
        if over:
            cut = max(self.step, min(0.3, 0.5 * (p99_ms / hi - 1.0)))
            self.quota = max(self.min_quota, self.quota * (1.0 - cut))
        elif (p99_ms is None or p99_ms < lo) and queued <= in_flight_limit / 8:
            self.quota = min(1.0, self.quota + self.step)
        return self.quota


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
