"""Pool autoscaling: move workers to the worker kind that is the bottleneck, within a budget.

The supervisor runs one ``Autoscaler`` per pipeline when ``autoscale.enabled`` is true. Every
``autoscale.period_s`` it reads, per worker kind (a group: one stage or a fused chain), the
broker's cumulative busy time (the sum of its events' service times), its workers and its
queue. A kind's *utilisation* over the period is its busy time divided by (period x workers).

The bottleneck is the kind with the highest utilisation; when it is over ``autoscale.high``:

* if the pipeline has fewer workers than its budget (``autoscale.budget``; 0: the sum of the
  pipeline file's pools), the bottleneck gets one more;
* else a worker moves to it from the least utilised kind that has more than one and would stay
  under ``autoscale.high`` with one fewer.

When no kind is over ``autoscale.high`` the cores themselves may be the bottleneck: on a small
machine every kind's workers share the same cores, none of them is busy most of the time, and
yet requests queue. Then the *queue wait* decides: the p99 of the waits (time from a request's
arrival at a kind to its dispatch to a worker) of the requests the broker dispatched to each
kind during the period (a kind with fewer than 20 of them is left out). When the kind with the
longest p99 wait waits more than ``autoscale.wait_ms`` beyond its own ``batch_wait_ms`` (a partial
batch held for company is a wait no extra worker removes) and another kind with more than one
worker waits under a quarter of that and would stay under ``autoscale.high`` with one worker
fewer, a worker moves from the one to the other (the short-waiting kind's extra worker only takes its
share of the cores; the queueing kind's work gets it). Moving back the way the last move went
needs twice that evidence (a wait under an eighth), so two kinds do not trade a worker back and
forth. The mean wait per request over the period is reported with it (``last_wait_ms``).

Hysteresis: the same decision must come out of ``autoscale.sustain`` consecutive periods, and
after a change nothing moves for ``autoscale.cooldown_s`` (the new worker starts, queues drain);
a kind never goes below one worker. The autoscaler only sets desired sizes (``Pools.set``,
jizhi/supervisor/pools.py); the supervisor's ``manage()`` retires workers without dropping a request.
"""


class Autoscaler:
    def __init__(self, groups, budget, high=0.85, sustain=3, cooldown_s=10.0, wait_ms=10.0, holds=None):
        self.groups = list(groups)
        # {group: batch_wait_ms}: a partial batch held for company is a wait extra workers cannot remove.
        self.holds = dict(holds or {})
        self.budget = budget
        self.high = high
        self.wait_ms = wait_ms
        self.last_move = None        # (donor, taker) of the last move between kinds
        self.last_wait_ms = {}       # mean wait per request over the last period, by kind
        self.last_wait_p99_ms = {}   # p99 wait over the last period, by kind (what decides)
        self.blocked = None          # why a kind that queues got no worker in the last period (for the log)
        self.sustain = sustain
        self.cooldown_s = cooldown_s
        self.prev = None             # (time, {group: busy_us})
        self.pending = None          # the decision seen in the last periods, and how many times
        self.streak = 0
        self.quiet_until = 0.0
        self.last_util = {}

    def update(self, now, figures, pools):
        """``figures``: {group: {"busy_us", "workers", "queue"}} from the broker; ``pools``: {group:
        desired size}. Returns ``(changes {group: new size}, reason)``; empty when nothing moves."""
        busy = {g: float(figures[g]["busy_us"]) for g in self.groups if g in figures}
        waited = {g: (float(figures[g].get("wait_us", 0)), int(figures[g].get("requests", 0))) for g in busy}
        prev, self.prev = self.prev, (now, busy, waited)
        if prev is None or now <= prev[0]:
            return {}, None
        dt_us = (now - prev[0]) * 1e6
        util = {g: max(0.0, busy[g] - prev[1].get(g, busy[g])) / (dt_us * max(1, figures[g]["workers"]))
                for g in busy}
        mean_wait = {}
        for g, (w, n) in waited.items():
            w0, n0 = prev[2].get(g, (w, n))
            mean_wait[g] = (w - w0) / 1000.0 / (n - n0) if n > n0 else 0.0
        # The period's p99 wait (a kind with too few requests to tell is left out: neither queueing
        # nor a donor).
        wait = {g: figures[g]["wait_p99_us"] / 1000.0 for g in busy if figures[g].get("wait_p99_us") is not None}
        self.last_util, self.last_wait_ms, self.last_wait_p99_ms = util, mean_wait, wait
        if not util or now < self.quiet_until:
            self.pending, self.streak = None, 0
            return {}, None
        hot = max(util, key=lambda g: (util[g], figures[g]["queue"]))
        decision = None
        if util[hot] > self.high:
            total = sum(pools[g] for g in self.groups)
            if total < self.budget:
                decision = (None, hot)
            else:
                donors = [g for g in util if g != hot and pools[g] > 1
                          and util[g] * pools[g] / (pools[g] - 1) < self.high]
                if donors:
                    decision = (min(donors, key=lambda g: util[g]), hot)
        reason = "utilisation"
        self.blocked = None
        if decision is None and self.wait_ms > 0 and wait:
            # What a kind's requests wait beyond its own batch hold.
            excess = {g: w - self.holds.get(g, 0.0) for g, w in wait.items()}
            slow = max(excess, key=lambda g: (excess[g], figures[g]["queue"]))
            if excess[slow] > self.wait_ms:
                def spare(g):
                    back = self.last_move == (slow, g)
                    # ... and the donor stays under autoscale.high with one worker fewer.
                    return (g != slow and pools[g] > 1 and wait[g] < wait[slow] / (8 if back else 4)
                            and util[g] * pools[g] / (pools[g] - 1) < self.high)
                donors = [g for g in wait if spare(g)]
                if donors:
                    decision, reason = (min(donors, key=lambda g: (wait[g], util[g])), slow), "wait"
                elif sum(pools[g] for g in self.groups) < self.budget:
                    decision, reason = (None, slow), "wait"
                else:
                    others = ", ".join(f"{g} ({pools[g]} worker{'s' if pools[g] > 1 else ''}, p99 wait {wait[g]:.1f} ms)"
                                       for g in self.groups if g != slow and g in wait)
                    self.blocked = (f"{slow}'s requests wait {wait[slow]:.1f} ms at p99 (utilisation {util[slow]:.2f}) "
                                    f"but no kind can spare a worker (one with more than one worker waiting under "
                                    f"a quarter of that): {others}")
        if decision is None or decision != self.pending:
            self.pending, self.streak = decision, 1 if decision else 0
            if decision is None or self.sustain > 1:
                return {}, None
        else:
            self.streak += 1
            if self.streak < self.sustain:
                return {}, None
        donor, taker = decision
        self.pending, self.streak = None, 0
        self.quiet_until = now + self.cooldown_s
        changes = {taker: pools[taker] + 1}
        if donor is not None:
            changes[donor] = pools[donor] - 1
            self.last_move = (donor, taker)
        if reason == "wait":
            why = (f"{taker} is the bottleneck (requests wait {wait[taker]:.1f} ms for a worker at p99, "
                   f"{mean_wait[taker]:.1f} ms mean, utilisation {util[taker]:.2f}, queue {figures[taker]['queue']})"
                   + (f"; from {donor} (p99 wait {wait[donor]:.1f} ms)" if donor else " and the budget has room"))
        else:
            why = (f"{taker} is the bottleneck (utilisation {util[taker]:.2f}, queue {figures[taker]['queue']})"
                   + (f"; from {donor} (utilisation {util[donor]:.2f})" if donor else " and the budget has room"))
        return changes, why
