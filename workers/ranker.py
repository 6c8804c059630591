"""ranker: top-K per request.

Writes ``order`` (positions of the candidates within the request, best
first; only the first ``returned`` are meaningful) and ``out_scores`` (the
score of every candidate in request order, NaN where a candidate was
dropped: shed, pruned, or its score was not finite). The broker builds the
reply from these two columns and the request's item ids, so the ranker never
copies ids. An infinite score is never ranked either: it is counted in
``invalid_scores`` like a model's NaN (workers/stage.py, ``drop_invalid``).
"""
import time

import numpy as np

from jizhi.workers.stage import CANDIDATE, INVALID_NAN, INVALID_SCORES, Output, Stage


# What every sink stage writes (the broker builds replies from these two columns).
SINK_OUTPUTS = (Output("order", CANDIDATE, "int32"), Output("out_scores", CANDIDATE, "float32"))


class Ranker(Stage):
    name = "ranker"
    sees_all_candidates = True   # candidates dropped earlier (query-cache hits) rejoin here
    fixed_inputs = ("score", "keep?", "item_ids", "qc_hit?", "qc_score?", "qc_epoch?", "qc_share?")
    fixed_outputs = SINK_OUTPUTS

    def setup(self, config, bundle):
        from jizhi.qcache import QueryCache
        from jizhi.profilestore import source as profile_source
        from jizhi.workers.query_cache import entry_key, version_key
        self.cache = QueryCache.attach(config.get("_qcache"))
        self.writer = config.get("_wid", 0)
        if self.cache is not None and self.writer >= self.cache.writers:
            self.cache = None    # more workers than the cache has regions: this one only reads
        self.key = version_key(config.get("_pipeline"),
                                config.get("_versions") or {bundle.name: bundle.version}) if bundle else 0
        self.profiles = profile_source(bundle) if getattr(bundle, "profile_store", None) is not None else None
        self.entry_key = entry_key

    def process(self, batch):
        score, keep = batch["score"], batch.columns.get("keep")
        hit = batch.columns.get("qc_hit")
        if hit is not None:
            score, keep = self.merge_cached(batch, score, keep, hit)
        return rank(batch, score, keep)

    def merge_cached(self, batch, score, keep, hit):
        """Cached scores rejoin; what was computed here is stored under the epochs read before computing it,
        for the requests that use the cache (``qc_share`` > 0). The time this takes is the query cache's
        cost, and this stage's start ends what its hits save (``batch.qcache``, workers/query_cache.py)."""
        t0 = time.thread_time()
        account = batch.qcache
        if account is not None:
            account.arrive(t0)
            if not account.looked:
                return score, keep      # nobody in this batch used the cache: no hit, nothing to store
        share = batch.columns.get("qc_share")
        if share is None:
            share = np.ones(batch.n_requests, np.int32)
        stores = share > 0           # requests bypassing the cache store nothing
        if self.cache is not None and not batch.warmup and stores.any():
            fresh = ~hit & np.isfinite(score)
            if not stores.all():
                fresh &= np.repeat(stores, np.diff(batch.offsets))
            if keep is not None:
                fresh &= keep
            if fresh.any():
                # One share per batch (the query_cache stage decides it per batch).
                k0 = time.thread_time()
                self.cache.store(self.writer, batch.users, batch.offsets, batch["item_ids"], score,
                                 self.entry_key(self.key, self.profiles), batch["qc_epoch"], mask=fresh,
                                 share=int(share.max()))
                if account is not None:
                    account.kernel_s += time.thread_time() - k0
        if hit.any():
            if keep is not None:
                keep = keep | hit
            score = np.where(hit, batch["qc_score"], score)
        if account is not None and account.looked:     # (without a lookup, this was the bypass's cost)
            account.cost_s += time.thread_time() - t0
        return score, keep


def rank(batch, score, keep):
    """Shared by every sink stage: (order, out_scores) columns and the 'returned' count."""
    score = np.asarray(score, dtype=np.float32)
    out_scores = score.copy()
    inf = np.isinf(out_scores)
    if keep is not None:
        inf &= keep
        out_scores[~keep] = np.nan
    if inf.any():
        # Not a drop mark (NaN is): a stage other than a model's made it (a combiner, a user's stage).
        batch.count(INVALID_SCORES, batch.per_request_sum(inf))
        out_scores[inf] = INVALID_NAN
    order = np.empty(score.shape[0], dtype=np.int32)
    returned = np.zeros(batch.n_requests, dtype=np.int64)
    off = batch.offsets
    # One vectorised sort per request (R <= batch size), never per candidate.
    for i in range(batch.n_requests):
        s = out_scores[off[i]:off[i + 1]]
        n = s.shape[0]
        valid = int(n - np.isnan(s).sum())
        k = min(int(batch.top_k[i]), valid)
        key = np.where(np.isnan(s), -np.inf, s)
        if k < n:
            part = np.argpartition(-key, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
        else:
            part = np.arange(n)
        top = part[np.argsort(-key[part], kind="stable")][:k]
        order[off[i]:off[i] + k] = top
        order[off[i] + k:off[i + 1]] = -1
        returned[i] = k
    batch.count("returned", returned)
    return {"order": order, "out_scores": out_scores}
