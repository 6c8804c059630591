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

A cache that rarely hits costs more than it saves (a lookup and a store touch
a random slot of a table larger than the CPU caches for every candidate).
Each worker measures the hit ratio over ``qcache.eval_candidates`` looked-up
candidates; below ``qcache.min_hit_ratio`` it *bypasses* the cache: only 1 in
``qcache.sample_users`` users (by a hash of the user) is looked up and stored,
which keeps the measurement going, and the rest skip both. The sampled users
use only their share (1 / sample_users) of the table's sets: with all of it,
they would keep 16 times the history per user that the cache holds in full
use (it is bounded by its size, not its window, at high rates), and the
estimate would be 10x too high (measured: 20-27 % sampled against 2-3 % in
full use), so the cache would switch on and off. Back above the ratio, every
user uses all of the table again. After each switch the part of the table
now in use starts cold (the two uses hash to different sets), so the
candidates looked up first only warm it and are not judged: as many as the
table holds (its share of them while bypassed), at most 4 x
``qcache.eval_candidates``. ``qc_share`` tells
the ranker which requests to store and with which share (0: none). It
comes back on at twice ``qcache.min_hit_ratio`` (hysteresis).
"""
import logging
import zlib

import numpy as np

from jizhi.qcache import QueryCache as Cache
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage


def version_key(pipeline, versions):
    """The cache's uint32 version field: scores of another pipeline or version set ``{model: version}``
    never match (in a multi-model pipeline a new version of any head is a new key)."""
    return zlib.crc32((pipeline or "").encode() + b"/" + ",".join(f"{m}={v}" for m, v in sorted(versions.items())).encode())


log = logging.getLogger("jizhi.worker")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class Bypass:
    """This worker's decision to use the query cache for every user or for a sample (module docstring)."""

    def __init__(self, min_hit_ratio=0.0, sample_users=16, eval_candidates=200_000, capacity=0):
        self.min_hit_ratio = float(min_hit_ratio)
        self.sample_users = np.uint64(max(1, int(sample_users)))
        self.eval_candidates = int(eval_candidates)
        self.warmup = min(int(capacity), 4 * self.eval_candidates)   # candidates that warm the table in full use
        self.on = True
        self.warming = self.warmup             # candidates to look up before the next judgement
        self.looked = 0
        self.hits = 0

    @property
    def share(self):
        """The part of the table the requests that use the cache use (1: all; sample_users: bypassed)."""
        return 1 if self.on else int(self.sample_users)

    def users_on(self, users):
        """bool [R]: the requests that use the cache."""
        if self.on:
            return np.ones(users.shape[0], dtype=bool)
        return ((users * _GOLDEN) >> np.uint64(40)) % self.sample_users == 0

    def observe(self, looked, hits):
        if self.warming > 0:
            self.warming -= looked
            return
        self.looked += looked
        self.hits += hits
        if self.min_hit_ratio <= 0 or self.looked < self.eval_candidates:
            return
        ratio = self.hits / self.looked
        # Hysteresis: back on only at twice the ratio that keeps it on (near the threshold the
        # sampled estimate and the full use's figure straddle it).
        on = ratio >= self.min_hit_ratio * (1 if self.on else 2)
        if on != self.on:
            if on:
                log.info("query cache on again: hit ratio %.1f%% over the last %d candidates of sampled users "
                         ">= 2 x qcache.min_hit_ratio %.0f%%", 100 * ratio, self.looked, 100 * self.min_hit_ratio)
            else:
                log.info("query cache bypassed: hit ratio %.1f%% over the last %d candidates < qcache.min_hit_ratio "
                         "%.0f%% (it would cost more than it saves); 1 in %d users still uses it", 100 * ratio,
                         self.looked, 100 * self.min_hit_ratio, self.sample_users)
        if on != self.on:
            self.warming = self.warmup if on else self.warmup // int(self.sample_users)
        self.on = on
        self.looked = self.hits = 0


class QueryCache(Stage):
    name = "query_cache"
    fixed_inputs = ("item_ids",)

    @classmethod
    def outputs(cls, config, bundle):
        return (Output("qc_hit", CANDIDATE, "bool"), Output("qc_score", CANDIDATE, "float32"),
                Output("qc_epoch", REQUEST, "uint32"), Output("qc_share", REQUEST, "int32"))

    def setup(self, config, bundle):
        spec = config.get("_qcache") or {}
        self.cache = Cache.attach(spec)
        self.key = version_key(config.get("_pipeline"), config.get("_versions") or {bundle.name: bundle.version})
        self.bypass = Bypass(spec.get("min_hit_ratio", 0.0), spec.get("sample_users", 16),
                             spec.get("eval_candidates", 200_000),
                             self.cache.writers * self.cache.slots_per_writer if self.cache else 0)

    def process(self, batch):
        users, offsets, items = batch.users, batch.offsets, batch["item_ids"]
        n = items.shape[0]
        if self.cache is None:
            return {"qc_hit": np.zeros(n, bool), "qc_score": np.zeros(n, np.float32),
                    "qc_epoch": np.zeros(batch.n_requests, np.uint32), "qc_share": np.zeros(batch.n_requests, np.int32)}
        epochs = self.cache.epochs_of(users)     # before anything is computed: feedback from now on wins
        on = self.bypass.users_on(users)
        share = self.bypass.share
        if on.all():
            scores, hit = self.cache.lookup(users, offsets, items, self.key, share=share)
        else:
            scores, hit = np.zeros(n, np.float32), np.zeros(n, bool)
            if on.any():
                # The sampled requests' candidates (a loop over requests, not candidates).
                rows = np.flatnonzero(on)
                idx = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
                sub = np.concatenate([[0], np.cumsum(np.diff(offsets)[rows])]).astype(np.int64)
                scores[idx], hit[idx] = self.cache.lookup(users[rows], sub, items[idx], self.key, share=share)
        if not batch.warmup:
            self.bypass.observe(int(np.diff(offsets)[on].sum()), int(hit.sum()))
        batch.count("cached", batch.per_request_sum(hit))
        return {"qc_hit": hit, "qc_score": scores, "qc_epoch": epochs,
                "qc_share": np.where(on, share, 0).astype(np.int32),
                "_select": np.flatnonzero(~hit) if hit.any() else None}   # no hit: nothing to narrow
