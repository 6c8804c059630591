"""The demo's request traces: ``generate_trace``, users and candidates against a bundle, with recall scores.

Runs offline, in the process that calls it (``jizhictl demo init`` and
``demo trace``, tests, benchmarks). A trace is the ``trace.npz`` of
docs/formats.md (``Trace``); it works against any bundle version with
profiles, and favours the items the demo's histories favour (the popularity
order of ``sampling``). Deterministic in its seed and the bundle.
"""
import math
import statistics

import numpy as np

from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.tools.demo.dense import _reference_scorer
from jizhi.tools.demo.sampling import (_S_TRACE, _ZIPF_POPULARITY, _popularity_order, _rng, _zipf_cdf,
                                       _zipf_draw_distinct)


def _normal_scores(n):
    """Normal scores of ranks 0..n-1: the standard normal quantiles of (r + 0.5) / n."""
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv((r + 0.5) / n) for r in range(n)], dtype=np.float64)


def generate_trace(bundle_dir, path, requests=2000, candidates=500, spearman=0.8, seed=1,
                   progress=True, batch_requests=64, spread=0.0):
    """Write a request trace against the bundle version ``bundle_dir`` to ``path``.

    ``bundle_dir`` is a version directory (holding ``manifest.toml``).
    Each request is a user drawn uniformly from the user profile and
    ``candidates`` distinct items drawn by popularity (a Zipf law over the
    popularity order; popular items first, in draw order). Recall scores
    follow a Gaussian copula with the reference scores of the request: the
    normal scores of the reference ranks, mixed with independent normal
    noise at correlation ``rho = 2 sin(pi * spearman / 6)``, through a
    sigmoid; so the per-request Spearman correlation between recall and
    model scores is ``spearman`` on average.

    ``spread`` > 0 makes requests differ: each draws its own Spearman
    correlation uniformly in ``spearman +- spread`` (within [0, 0.98]), and its
    recall scores are signal plus noise of a fixed level (``z = s x normal
    score + noise``, ``s = rho / sqrt(1 - rho^2)``), so a request whose recall
    agrees more with the model also has more spread-out recall scores, as a
    recall model's confident requests do (the shedding benchmark's
    heterogeneous trace). ``spread = 0`` is the form above. Deterministic in ``seed`` and
    the bundle. Saves the arrays and scalars of docs/formats.md (``Trace``)
    with ``np.savez`` (the zip's timestamps make the file bytes, not the
    arrays, differ between runs).
    """
    if not -1.0 <= spearman <= 1.0:
        raise ValueError(f"spearman {spearman} is not in [-1, 1]")
    scorer = _reference_scorer(bundle_dir)
    user_ids = scorer.profiles["user"]["ids"]
    item_ids = scorer.profiles["item"]["ids"]
    if candidates > item_ids.shape[0]:
        raise ValueError(f"{candidates} candidates > {item_ids.shape[0]} items")
    rng = _rng(seed, _S_TRACE)
    cdf = _zipf_cdf(item_ids.shape[0], _ZIPF_POPULARITY)
    order = _popularity_order(item_ids)
    rho = 2.0 * math.sin(math.pi * spearman / 6.0)
    normal = _normal_scores(candidates)

    users = user_ids[rng.integers(0, user_ids.shape[0], size=requests)]
    offsets = np.arange(requests + 1, dtype=np.int64) * candidates
    items = np.empty(requests * candidates, dtype=np.uint64)
    recall = np.empty(requests * candidates, dtype=np.float32)
    bar = _Progress("trace", requests, progress)
    for start in range(0, requests, batch_requests):
        stop = min(start + batch_requests, requests)
        q = stop - start
        lo, hi = offsets[start], offsets[stop]
        for r in range(start, stop):
            items[offsets[r]:offsets[r + 1]] = item_ids[order[_zipf_draw_distinct(rng, cdf, candidates)]]
        scores, _ = scorer.score_requests(users[start:stop], offsets[start:stop + 1] - lo, items[lo:hi])
        # Rank within each request, ties broken at random.
        request = np.repeat(np.arange(q), candidates)
        by_score = np.lexsort((rng.random(hi - lo), scores, request))
        ranks = np.empty(hi - lo, dtype=np.int64)
        ranks[by_score] = np.tile(np.arange(candidates), q)
        if spread > 0:
            sp = np.clip(spearman + rng.uniform(-spread, spread, q), 0.0, 0.98)
            r_i = 2.0 * np.sin(np.pi * sp / 6.0)
            signal = np.repeat(r_i / np.sqrt(1.0 - r_i * r_i), candidates)
            z = signal * normal[ranks] + rng.standard_normal(hi - lo)
        else:
            z = rho * normal[ranks] + math.sqrt(max(1.0 - rho * rho, 0.0)) * rng.standard_normal(hi - lo)
        recall[lo:hi] = 1.0 / (1.0 + np.exp(-z))
        bar.advance(q)
    bar.close()
    with open(path, "wb") as f:
        np.savez(f, users=users, offsets=offsets, items=items, recall_scores=recall,
                 seed=np.int64(seed), candidates=np.int64(candidates), spearman=np.float64(spearman),
                 spread=np.float64(spread))
