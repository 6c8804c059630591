"""Stage processors for tests, named by import path in test pipelines.

jizhid imports them as ``tests.stages:<Class>`` (the test harness puts the
repository root on PYTHONPATH). They exercise the user-processor contract
(workers/stage.py) and misbehave on purpose where a test needs it:

* ``RecallAsScore``: a per-candidate ``score`` column equal to the request's
  recall scores, for the built-in ``ranker`` to rank (a user stage in front
  of a built-in one, with its column crossing a process boundary); it
  declares its columns by overriding ``inputs`` and ``outputs``;
* ``RecallRanker``: a user sink that ranks by recall score with the built-in
  ``jizhi.workers.ranker.rank``; it declares its columns as
  ``fixed_inputs`` and ``fixed_outputs``;
* ``ExplodingRanker``: like ``RecallRanker``, but ``process`` raises for the
  user named by its stage option ``explode_user`` (a stage that crashes on
  some input);
* ``SleepyRanker``: like ``RecallRanker``, but ``process`` first sleeps for
  its stage option ``sleep_s`` seconds (a stage stuck inside a call, deaf to
  SIGTERM meanwhile).
"""
import os
import time

import numpy as np

from jizhi.workers.ranker import SINK_OUTPUTS, rank
from jizhi.workers.stage import CANDIDATE, Output, Stage


class RecallAsScore(Stage):
    @classmethod
    def inputs(cls, config):
        return ("recall_scores",)

    @classmethod
    def outputs(cls, config, bundle):
        return (Output("score", CANDIDATE, "float32"),)

    def process(self, batch):
        return {"score": np.array(batch["recall_scores"], dtype=np.float32)}


class RecallRanker(Stage):
    fixed_inputs = ("recall_scores",)
    fixed_outputs = SINK_OUTPUTS

    def process(self, batch):
        return rank(batch, batch["recall_scores"], None)


class ExplodingRanker(RecallRanker):
    def setup(self, config, bundle):
        self.explode_user = int(config["explode_user"])

    def process(self, batch):
        if np.any(batch.users == np.uint64(self.explode_user)):
            raise RuntimeError(f"exploding on user {self.explode_user}")
        return super().process(batch)


class SleepyRanker(RecallRanker):
    def setup(self, config, bundle):
        self.sleep_s = float(config["sleep_s"])

    def process(self, batch):
        time.sleep(self.sleep_s)
        return super().process(batch)


class FailingSetup(RecallRanker):
    """A stage whose setup always fails: its worker exits with the model-load code."""

    def setup(self, config, bundle):
        raise RuntimeError("this stage never loads (tests.stages:FailingSetup)")


class CrashOnVersions(RecallRanker):
    """Aborts in setup (SIGABRT, like a native crash) when its bundle is one of ``crash_versions``.

    Validation runs the built-in stages, so such a version passes it and then
    kills its own workers while loading: the fault a hot reload must contain.
    """

    def setup(self, config, bundle):
        if bundle.version in config.get("crash_versions", []):
            os.abort()
