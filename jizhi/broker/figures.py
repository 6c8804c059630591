"""The broker's figures: per group and per pipeline counters, and the reports built from them.

Runs in the broker process, on its loop's thread. ``GroupStats`` (queue wait,
service, events of one group) and ``RequestStats`` (answers, latency, pairs of
one pipeline or one A/B group) are updated by dispatch and by the answers;
``info`` is the ``info`` answer (clients' ``op: info``, the supervisor's
``jizhictl status``, ``/metrics``, readiness) and ``load`` the ``load``
answer (the supervisor's load controller and autoscaler). Times are
microseconds (``*_us``) or milliseconds (``*_ms``) as the key says; ``clock``
is ``time.monotonic`` unless a unit test steps its own.
"""
import os
import time

import numpy as np

RING = 2048  # samples kept per group for wait/service percentiles


class GroupStats:
    """Per-group counters kept by the broker (queue wait, service, events)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.events = 0
        self.requests = 0
        self._rate_mark = (clock(), 0)
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
        now = self.clock()
        if now - t0 >= 1.0:
            self.events_per_s = round((self.events - e0) / (now - t0), 1)
            self._rate_mark = (now, self.events)
        return {"events": self.events, "requests": self.requests, "events_per_s": self.events_per_s,
                "wait_us": self._pct(self.wait_us, self.n_wait),
                "service_us": self._pct(self.svc_us, self.n_svc)}


class RequestStats:
    """Per-pipeline request figures: OK answers, pairs/s, latency p50/p99/p99.9 (recent answers)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.ok = 0
        self.pairs = 0
        self.lat_us = np.zeros(RING, dtype=np.int64)
        self.t_ans = np.zeros(RING, dtype=np.float64)      # when each of the ring's answers went out
        # The load controller's sample: the same, without the requests a warming worker served.
        self.ctl_lat_us = np.zeros(RING, dtype=np.int64)
        self.ctl_t = np.zeros(RING, dtype=np.float64)
        self.n_ctl = 0
        self.shed = 0              # candidates the shedder cut, and candidates, of recent answers
        self.cands = 0
        self._mark = (clock(), 0, 0)
        self.rates = (0.0, 0.0)

    def add(self, total_us, pairs, control=True):
        """An ok answer; ``control``: the load controller may count it (no warming worker served it)."""
        now = self.clock()
        self.lat_us[self.ok % RING] = total_us
        self.t_ans[self.ok % RING] = now
        self.ok += 1
        self.pairs += pairs
        if control:
            self.ctl_lat_us[self.n_ctl % RING] = total_us
            self.ctl_t[self.n_ctl % RING] = now
            self.n_ctl += 1

    def recent_p99_ms(self, window_s=2.0):
        """p99 of the answers of the last ``window_s`` seconds that no warming worker served (None: none),
        for the load controller."""
        n = min(self.n_ctl, RING)
        recent = self.ctl_t[:n] >= self.clock() - window_s
        if not recent.any():
            return None
        return float(np.percentile(self.ctl_lat_us[:n][recent], 99)) / 1000.0

    def snapshot(self):
        t0, ok0, pairs0 = self._mark
        now = self.clock()
        if now - t0 >= 1.0:
            self.rates = (round((self.ok - ok0) / (now - t0), 1), round((self.pairs - pairs0) / (now - t0), 1))
            self._mark = (now, self.ok, self.pairs)
        lat = {"p50": None, "p99": None, "p99_9": None}
        if self.ok:
            a = self.lat_us[:min(self.ok, RING)]
            p = np.percentile(a, [50, 99, 99.9])
            lat = {"p50": int(p[0]), "p99": int(p[1]), "p99_9": int(p[2])}
        return {"ok": self.ok, "ok_per_s": self.rates[0], "pairs_per_s": self.rates[1], "latency_us": lat}


def pipeline_info(p):
    """One pipeline's part of ``info`` (``p``: its PipelineState, jizhi/broker/dispatch.py)."""
    groups = {}
    for g in p.groups:
        groups[g] = dict(p.stats[g].snapshot(),
                         workers=sum(len(p.workers.get((g, k), ())) for k in p.gens),
                         queue=sum(len(p.channels.get((g, k), ())) for k in p.gens),
                         stages=p.groups[g]["stages"])
    serving = p.serving()
    versions = {str(gen.version): {"state": gen.state.wire, "in_flight": gen.in_flight(), "models": gen.versions,
                                   "workers": sum(len(p.workers.get((g, k), ())) for g in p.groups),
                                   "boot": gen.boot}    # its slowest worker's start_ms, load_ms, warm_ms
                for k, gen in p.gens.items()}
    out = {"model": p.plan["model"], "version": serving.version if serving else None,
           "model_versions": serving.versions if serving else None,
           "versions": versions, "ready": p.ready(),
           "in_flight": p.in_flight(), "slots": p.slots, "waiting": len(p.line), "waited": p.waited,
           "refused": p.refused, "groups": groups,
           "requests": p.requests.snapshot(), "invalid_scores": p.invalid_scores,
           "unknown_users": p.unknown_users}
    if p.has_qcache:
        out["query_cache"] = {"candidates": p.qc_candidates, "hits": p.qc_hits}
    if p.shedding is not None:
        out["shedding"] = dict(p.shedding, shed_ratio_recent=round(
            p.requests.shed / p.requests.cands, 4) if p.requests.cands else 0.0)
        cut = p.cut
        if cut is not None:     # the admission cut's estimate (jizhi/shedding.py)
            out["shedding"]["admission"] = {
                "kept_recent": round(cut.kept_recent(p.clock()), 4), "workers": cut.workers,
                "per_request_ms": None if cut.a is None else round(cut.a * 1e3, 3),
                "per_candidate_us": None if cut.b is None else round(cut.b * 1e6, 3),
                "backlog_ms": round(cut.backlog() * 1e3, 2), "arriving_per_s": round(cut.req_rate, 1)}
    if p.routers:
        out["ab"] = {
            g: {"fractions": {n: f for n, f, _ in r.groups},
                "groups": {n: dict(p.ab_stats[g][n]["requests"].snapshot(),
                                   errors=dict(p.ab_stats[g][n]["errors"]),
                                   branch=[x for x, b in p.branch.items() if b == (g, n)])
                           for n in r.names}}
            for g, r in p.routers.items()}
    return out


def info(b):
    """The broker's figures (``b``: the Broker, jizhi/broker/core.py); docs/protocol.md lists them."""
    now = b.clock()
    adm = b.admission
    return {"ready": all(p.ready() for p in b.pipes.values()),
            "pipelines": {name: pipeline_info(p) for name, p in b.pipes.items()},
            "default_pipeline": b.default_pipeline, "answered": b.answers.answered,
            "errors": dict(b.answers.errors), "malformed": adm.malformed, "draining": b.draining,
            "feedback": {"events": adm.feedback_events, "dropped_overlay_full": adm.overlay_full},
            # uptime_s: jizhid's (from the supervisor's start, as `jizhictl status` says it); the broker's
            # own age apart (it restarts when it dies).
            "uptime_s": round(now - b.run.get("started_monotonic", b.t_start), 1),
            "broker_uptime_s": round(now - b.t_start, 1),
            "clients": b.clients.snapshot() if b.clients is not None else {},
            "run_id": b.run["run_id"], "pid": os.getpid(), "instance": b.run.get("instance"),
            "frontend": b.run["frontend"],
            "limits": {k.split(".", 1)[1]: v for k, v in b.settings.items() if k.startswith("limits.")}}


def load(pipes):
    """The ``load`` answer: per pipeline its recent p99, requests in flight and queued, the admission cut's
    recent mean quota, the requests refused for want of a slot so far, the most in flight since the last
    ``load`` (and the slots), and per worker
    group (of the serving version) busy and waiting time, requests, the period's p99 wait, queue, workers."""
    out = {name: {"p99_ms": p.requests.recent_p99_ms(), "in_flight": p.in_flight(),
                  "peak_in_flight": p.peak_in_flight, "slots": p.slots,
                  "kept_recent": round(p.cut.kept_recent(p.clock()), 4) if p.cut is not None else 1.0,
                  "refused": p.refused, "waiting": len(p.line),
                  "queued": sum(len(c) for c in p.channels.values()),
                  "groups": {g: {"busy_us": p.stats[g].busy_us, "wait_us": p.stats[g].wait_total_us,
                                 "requests": p.stats[g].requests,
                                 "wait_p99_us": p.stats[g].period_wait_p99_us(),
                                 "queue": len(p.channels.get((g, p.active), ())),
                                 "workers": len(p.workers.get((g, p.active), ()))}
                             for g in p.worker_groups}}
           for name, p in pipes.items()}
    for p in pipes.values():
        p.peak_in_flight = 0        # (the next period's peak: from the next admission on)
    return out
