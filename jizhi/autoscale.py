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

Hysteresis: the same decision must come out of ``autoscale.sustain`` consecutive periods, and
after a change nothing moves for ``autoscale.cooldown_s`` (the new worker starts, queues drain);
a kind never goes below one worker. Workers are retired without dropping a request
(``Supervisor.set_pool``).
"""


class Autoscaler:
    def __init__(self, groups, budget, high=0.85, sustain=3, cooldown_s=10.0):
        self.groups = list(groups)
        self.budget = budget
        self.high = high
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
        prev, self.prev = self.prev, (now, busy)
        if prev is None or now <= prev[0]:
            return {}, None
        dt_us = (now - prev[0]) * 1e6
        util = {g: max(0.0, busy[g] - prev[1].get(g, busy[g])) / (dt_us * max(1, figures[g]["workers"]))
                for g in busy}
        self.last_util = util
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
        why = (f"{taker} is the bottleneck (utilisation {util[taker]:.2f}, queue {figures[taker]['queue']})"
               + (f"; from {donor} (utilisation {util[donor]:.2f})" if donor else " and the budget has room"))
        return changes, why
