"""shedder: under overload, keep only each request's best candidates by recall score.

Placed first in a pipeline (before the data reader) and fused with the stages after it, so the
cut candidates are never read, hashed, looked up or scored; they rejoin at the ranker unscored
(never in the top-K; NaN with ``return = "all"``; the reply's ``shed_ratio`` says how many).

How many each request keeps: its quota travels with it in the event (``batch.keep``, decided at
admission by the broker: jizhi/shedding.py, ``AdmissionCut``; none while shedding is off), and
the pipeline's policy turns it into a cutoff (``rule``: the quota itself; ``learned``: the quotas
shared by the predicted need of each request, from its recall-score statistics). Which policy:
the generation in the pipeline's shedding control state, one word read per batch
(jizhi/controlstate.py). Never fewer than the request's top_k.
"""
import logging

import numpy as np

from jizhi.shedding import Control, RulePolicy, keep_counts, load_policy, recall_features
from jizhi.workers.combiner import select_top
from jizhi.workers.stage import Stage

log = logging.getLogger("jizhi.worker")


class Shedder(Stage):
    name = "shedder"
    narrows = True      # the stages after it must run in its worker (the compiler checks)
    fixed_inputs = ("recall_scores",)    # and writes no column: it narrows the batch (``_select``)

    def setup(self, config, bundle):
        spec = config.get("_shed") or {}
        self.control = Control(spec["control"]) if spec.get("control") else None
        self.policy_path = spec.get("policy")
        self.policy = RulePolicy()
        self.policy_gen = -1

    def batch_boundary(self):
        if self.control is None:
            return
        st = self.control.read()
        if st["policy_generation"] != self.policy_gen:
            self.policy_gen = st["policy_generation"]
            try:
                self.policy = load_policy(self.policy_path if self.policy_gen > 0 else None)
                log.info("shedding policy now %s (generation %d)", self.policy.name, self.policy_gen)
            except (OSError, ValueError, KeyError) as e:
                log.error("shedding policy %s unreadable (%s): using the rule", self.policy_path, e)
                self.policy = RulePolicy()

    def process(self, batch):
        quota = batch.keep
        if quota is None or batch.n_candidates == 0 or (quota >= 1.0).all():
            return {}
        rs = batch["recall_scores"]
        fractions = self.policy.keep_fractions(quota, recall_features(batch.offsets, rs))
        keep = keep_counts(batch.offsets, fractions, batch.top_k)
        shed = np.diff(batch.offsets) - keep
        if not shed.any():
            return {}
        batch.count("shed", shed)
        return {"_select": select_top(batch.offsets, rs, keep=keep)}
