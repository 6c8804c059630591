"""The query cache in a running jizhid (pipeline demo_cached): hits skip the work, feedback and the window end them."""
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_topk

CONFIG = "[qcache]\nwindow_s = 2.0\n"


@pytest.fixture(scope="module")
def server(launch_module):
    return launch_module.start(pipelines=("demo_cached", "demo"), config_text=CONFIG)


def _score(c, user, items, recall=None, pipeline="demo_cached"):
    return c.score(user, items, recall, pipeline=pipeline, top_k=10, deadline_ms=10_000)


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_scores(server, demo_trace, trace_scores):
    user, items, recall = demo_trace[0]
    with server.client() as c:
        first = _score(c, user, items, recall)
        second = _score(c, user, items, recall)
        # Half the candidates again plus others: the cached half rejoins the computed half at the ranker.
        other = np.setdiff1d(demo_trace[1][1], items)[:150]
        mixed = np.concatenate([items[:150], other])
        third = _score(c, user, mixed)
    assert first["cached"] == 0 and second["cached"] == items.shape[0]
    assert third["cached"] == 150
    assert_topk(first, items, trace_scores[0], 10)
    assert_topk(second, items, trace_scores[0], 10)
    # The work was skipped, not only the DNN: no profile read, hashing, lookup or inference ran for the hits.
    t1, t2 = first["timings_us"], second["timings_us"]
    assert t2["cube"] < t1["cube"] and t2["dnn"] < t1["dnn"] and t2["reader"] < t1["reader"]


def test_feedback_invalidates_exactly_that_users_scores_and_the_next_score_changes(server, demo_trace):
    (u1, items1, r1), (u2, items2, r2) = demo_trace[2], demo_trace[3]
    with server.client() as c:
        before1 = c.score(u1, items1, r1, pipeline="demo_cached", ret="all", deadline_ms=10_000)
        _score(c, u2, items2, r2)
        assert _score(c, u1, items1, r1)["cached"] == items1.shape[0]
        c.feedback(u1, int(items1[0]), "click")
        after1 = c.score(u1, items1, r1, pipeline="demo_cached", ret="all", deadline_ms=10_000)
        still2 = _score(c, u2, items2, r2)
    assert after1["cached"] == 0                       # every request admitted after the ack misses u1's entries
    assert still2["cached"] == items2.shape[0]         # u2's stay
    # The click went into u1's recent behaviour (the overlay), so u1's scores really changed.
    assert not np.allclose(after1.scores, before1.scores)


def test_a_cached_score_expires_after_the_window(server, demo_trace):
    user, items, recall = demo_trace[4]
    with server.client() as c:
        _score(c, user, items, recall)
        assert _score(c, user, items, recall)["cached"] == items.shape[0]
        time.sleep(2.3)                                # qcache.window_s = 2
        assert _score(c, user, items, recall)["cached"] == 0


def test_the_plain_pipeline_of_the_same_server_never_reads_the_cache(server, demo_trace, trace_scores):
    user, items, recall = demo_trace[5]
    with server.client() as c:
        _score(c, user, items, recall)
        r = _score(c, user, items, recall, pipeline="demo")
    assert r["cached"] == 0
    assert_topk(r, items, trace_scores[5], 10)


def test_stats_report_the_query_cache_hit_ratio(server):
    import json
    from daemon_helpers import jizhictl_ok
    fig = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["demo_cached"]
    assert fig["qcache_candidates"] > 0 and 0 < fig["qcache_hits"] < fig["qcache_candidates"]
    assert fig["qcache_ratio"] == round(fig["qcache_hits"] / fig["qcache_candidates"], 4)
    assert "query cache" in jizhictl_ok("stats", run_dir=server.run_dir)


def test_a_cache_that_rarely_hits_is_bypassed_for_all_but_a_sample_of_users(launch, tmp_path, demo_trace, trace_scores):
    # qcache.min_hit_ratio: after 2,000 candidates that warm the cache (4 x eval_candidates), 500
    # looked-up candidates without a hit make the worker bypass it; then only the sampled users
    # (1 in 2 here) are looked up and stored, the others neither.
    from jizhi.workers.query_cache import Bypass
    text = (Path(__file__).parent.parent / "etc" / "pipelines" / "demo_cached.toml").read_text()
    text = text.replace('name = "demo_cached"', 'name = "cached1"').replace("pool = 2", "pool = 1")
    (tmp_path / "cached1.toml").write_text(text)
    server = launch.start(pipelines=[tmp_path / "cached1.toml"],
                          config_text="[qcache]\nmin_hit_ratio = 0.9\neval_candidates = 500\nsample_users = 2\n")
    sampler = Bypass(sample_users=2)
    sampler.on = False
    with server.client() as c:
        first = range(9)                                  # 9 x 300 candidates, no hit: bypassed from here on
        for q in first:
            _score(c, *demo_trace[q], pipeline="cached1")
        seen = {demo_trace[q][0] for q in first}
        users = [q for q in range(9, len(demo_trace)) if demo_trace[q][0] not in seen]
        on = {q: bool(sampler.users_on(np.array([demo_trace[q][0]], np.uint64))[0]) for q in users}
        sampled = [q for q in users if on[q]][:2]
        others = [q for q in users if not on[q]][:2]
        assert len(sampled) == 2 and len(others) == 2
        for q in sampled + others:
            _score(c, *demo_trace[q], pipeline="cached1")
        again = {q: _score(c, *demo_trace[q], pipeline="cached1") for q in sampled + others}
    assert "query cache bypassed" in server.log_text()
    for q in sampled:
        assert again[q]["cached"] == demo_trace[q][1].shape[0]      # still looked up and stored
    for q in others:
        assert again[q]["cached"] == 0                              # neither looked up nor stored
        assert_topk(again[q], demo_trace[q][1], trace_scores[q], 10)


def test_the_bypass_judges_after_warming_and_comes_back_on_at_twice_the_threshold():
    from jizhi.workers.query_cache import Bypass
    b = Bypass(min_hit_ratio=0.1, sample_users=4, eval_candidates=100, capacity=1000)
    b.observe(400, 0)                 # warming: min(capacity, 4 x eval) = 400 candidates are not judged
    assert b.on
    b.observe(100, 5)                 # 5 % < 10 %: bypassed
    assert not b.on and b.share == 4
    b.observe(100, 50)                # the sample's part of the table warms first (400 / 4)
    b.observe(100, 15)                # 15 %: above the threshold, under twice it
    assert not b.on
    b.observe(100, 25)                # 25 % >= 20 %: on again
    assert b.on and b.share == 1
    b.observe(400, 0)                 # warming again
    b.observe(100, 11)                # 11 % keeps it on
    assert b.on
