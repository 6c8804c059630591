"""Training the learned shedding policy offline (``jizhictl shed train``).

``train(trace, version_dir)`` scores a recorded trace fully offline with the reference scorer, finds
for every request the smallest cutoff (by recall order) that keeps its whole model top-K, and fits
the need model of ``jizhi.shedding.LearnedPolicy`` on the recall-score features (ridge regression
on the log of the needed fraction). The policy is a small JSON file (``save_policy``), which the
server reads with ``jizhi.shedding.load_policy``.
"""
import os

import numpy as np

from jizhi.shedding import FEATURES, MIN_KEEP, LearnedPolicy, keep_counts, recall_features


def _requests(offsets, top_k):
    """``(i, a, b, k)`` for each request ``i`` of ``offsets`` with a candidate: its candidates are
    ``[a, b)`` and its top-K is the best ``k = min(top_k, b - a)`` of them."""
    for i in range(offsets.shape[0] - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if b > a and top_k > 0:
            yield i, a, b, min(top_k, b - a)


def _best(scores, k):
    """Positions of the ``k`` (>= 1) largest of ``scores``, in no order."""
    return np.argpartition(-scores, k - 1)[:k]


def needed_counts(offsets, recall, scores, top_k):
    """int64 [R]: for each request, the smallest number of its best candidates by recall score that
    holds its whole top-``top_k`` by model score (a loop over requests; offline only)."""
    out = np.zeros(offsets.shape[0] - 1, dtype=np.int64)
    for i, a, b, k in _requests(offsets, top_k):
        rank = np.empty(b - a, dtype=np.int64)
        rank[np.argsort(-recall[a:b], kind="stable")] = np.arange(b - a)
        out[i] = int(rank[_best(scores[a:b], k)].max()) + 1
    return out


def overlap_at(offsets, recall, scores, keep, top_k):
    """float64 [R]: overlap of the top-``top_k`` (by model score) of each request's ``keep`` best
    candidates by recall with its full top-``top_k`` (1 for a request without candidates)."""
    out = np.ones(offsets.shape[0] - 1, dtype=np.float64)
    for i, a, b, k in _requests(offsets, top_k):
        kept = np.argsort(-recall[a:b], kind="stable")[:keep[i]]
        full = set(_best(scores[a:b], k).tolist())
        kk = min(k, kept.shape[0])
        mine = kept[_best(scores[a:b][kept], kk)] if kk else kept[:0]
        out[i] = len(full.intersection(mine.tolist())) / k
    return out


def train(trace, version_dir, top_k=10, ridge=1e-3, quotas=(0.2, 0.3, 0.5), progress=None):
    """Fit the learned policy on a trace (``jizhi.tools.bench.Trace``) scored offline by the reference
    scorer of ``version_dir``. Returns ``(policy doc, report)``; the report compares the rule and
    the learned policy at the same mean keep fractions (``quotas``) on the trace itself and on a
    held-out quarter (the fit sees the other three quarters)."""
    from jizhi.tools.reference import ReferenceScorer
    ref = ReferenceScorer(version_dir)
    q = len(trace)
    scores = np.empty(trace.items.shape[0], dtype=np.float32)
    chunk = 64
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        a, b = trace.offsets[s], trace.offsets[e]
        scores[a:b], _ = ref.score_requests(trace.users[s:e], trace.offsets[s:e + 1] - a, trace.items[a:b])
        if progress:
            progress(e, q)
    need = needed_counts(trace.offsets, trace.recall, scores, top_k)
    n = np.diff(trace.offsets)
    frac = np.clip(need / np.maximum(n, 1), MIN_KEEP, 1.0)
    feats = recall_features(trace.offsets, trace.recall)
    held = np.arange(q) % 4 == 3
    fit = ~held
    y = np.log(frac)
    x = feats[fit]
    w = np.linalg.solve(x.T @ x + ridge * fit.sum() * np.eye(x.shape[1]), x.T @ y[fit])
    pred = feats @ w
    r2 = 1.0 - float(((y[held] - pred[held]) ** 2).mean() / max(y[held].var(), 1e-12))
    doc = {"policy": "learned", "features": list(FEATURES), "weights": w.tolist(), "top_k": top_k,
           "mean_need": float(np.clip(np.exp(pred), MIN_KEEP, 1).mean()),
           "trained_on": {"trace": getattr(trace, "path", None), "requests": int(q), "bundle": os.fspath(version_dir)}}
    report = {"requests": int(q), "mean_needed_fraction": float(frac.mean()),
              "median_needed_fraction": float(np.median(frac)), "held_out_r2_log_need": round(r2, 3),
              "quality": []}
    learned = LearnedPolicy(dict(doc))
    for quota in quotas:
        for subset, mask in (("all", np.ones(q, bool)), ("held_out", held)):
            offs = np.concatenate([[0], np.cumsum(n[mask])])
            sel = np.concatenate([np.arange(trace.offsets[i], trace.offsets[i + 1]) for i in np.flatnonzero(mask)])
            rec, sco, f = trace.recall[sel], scores[sel], feats[mask]
            rule_keep = keep_counts(offs, np.full(mask.sum(), quota), top_k)
            lf = np.clip(quota * learned.need(f) / learned.need(f).mean(), MIN_KEEP, 1.0)
            learned_keep = keep_counts(offs, lf, top_k)
            report["quality"].append({
                "quota": quota, "subset": subset,
                "rule": {"kept": round(float(rule_keep.sum() / offs[-1]), 4),
                         "overlap": round(float(overlap_at(offs, rec, sco, rule_keep, top_k).mean()), 4)},
                "learned": {"kept": round(float(learned_keep.sum() / offs[-1]), 4),
                            "overlap": round(float(overlap_at(offs, rec, sco, learned_keep, top_k).mean()), 4)}})
    return doc, report
