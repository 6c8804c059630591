"""query_cache: scores computed recently for the same user, item and model version.

Placed first in a pipeline (after shedding, before the data reader): a hit
saves the profile read, the hashing, the cube lookups and the DNN, because
this stage drops the hit candidates (``_select``) for the rest of its worker's
stages; they rejoin at the ranker (``sees_all_candidates``), which merges
``qc_score`` for the hits and stores the newly computed scores under the
epochs read here (jizhi/qcache.py). Feedback from a user bumps that user's
epoch before it is acknowledged, so every request admitted afterwards misses
that user's old entries.

The savings need the stages it saves in the same worker (a fused group, as in
the default plan); in an unfused plan the dropped candidates are widened back
when the group writes its columns, and later groups compute them anyway.
"""
import zlib

import numpy as np

from jizhi.qcache import QueryCache as Cache
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage


def version_key(pipeline, model, version):
    """The cache's uint32 version field: scores of another pipeline, model or version never match."""
    return zlib.crc32(f"{pipeline}/{model}/{version}".encode())


class QueryCache(Stage):
    name = "query_cache"

    @classmethod
    def inputs(cls, config):
        return ("item_ids",)

    @classmethod
    def outputs(cls, config, bundle):
        return (Output("qc_hit", CANDIDATE, "bool"), Output("qc_score", CANDIDATE, "float32"),
                Output("qc_epoch", REQUEST, "uint32"))

    def setup(self, config, bundle):
        self.cache = Cache.attach(config.get("_qcache"))
        self.key = version_key(config.get("_pipeline"), bundle.name, bundle.version)

    def process(self, batch):
        users, offsets, items = batch.users, batch.offsets, batch["item_ids"]
        if self.cache is None:
            n = items.shape[0]
            return {"qc_hit": np.zeros(n, bool), "qc_score": np.zeros(n, np.float32),
                    "qc_epoch": np.zeros(batch.n_requests, np.uint32)}
        epochs = self.cache.epochs_of(users)     # before anything is computed: feedback from now on wins
        scores, hit = self.cache.lookup(users, offsets, items, self.key)
        batch.count("cached", np.add.reduceat(hit.astype(np.int64), offsets[:-1]) if items.shape[0] else
                    np.zeros(batch.n_requests, np.int64))
        return {"qc_hit": hit, "qc_score": scores, "qc_epoch": epochs, "_select": np.flatnonzero(~hit)}
