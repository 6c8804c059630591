"""The query cache in a running jizhid (pipeline demo_cached): hits skip the work, feedback and the window end them."""
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_topk

CONFIG = "[qcache]\nwindow_s = 2.0\nstart = \"on\"\n"    # every user from the first request


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
                          config_text="[qcache]\nmin_hit_ratio = 0.9\neval_candidates = 500\nsample_users = 2\n"
                                      "start = \"on\"\n")
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


US = 1e-6


def _batch(b, looked, hits, cost_us, saved_us, narrowed=0, narrowed_us=0.0):
    """One made-up batch: ``cost_us`` per looked-up candidate, ``saved_us`` per computed candidate, and the
    narrowing of ``narrowed`` candidates at ``narrowed_us`` each."""
    b.observe(looked, hits, cost_s=looked * cost_us * US, narrowed=narrowed, narrowed_s=narrowed * narrowed_us * US,
              computed=looked - hits, down_s=(looked - hits) * saved_us * US)


def test_the_cache_pays_while_its_hit_ratio_times_what_a_hit_saves_exceeds_what_it_costs():
    from jizhi.workers.query_cache import Bypass
    b = Bypass(sample_users=4, eval_candidates=100, start_on=True)
    _batch(b, 100, 20, cost_us=0.5, saved_us=3.0)     # 20 % x 3 us = 0.6 us > 0.5 us: pays
    assert b.on and b.judgements == 1
    assert (round(b.hit_ratio, 6), round(b.saved_us, 6), round(b.cost_us, 6)) == (0.2, 3.0, 0.5)
    _batch(b, 60, 9, cost_us=0.5, saved_us=3.0)       # not judged before 100 candidates looked up
    assert b.judgements == 1
    _batch(b, 40, 6, cost_us=0.5, saved_us=3.0)       # 15 % x 3 us = 0.45 us < 0.5 us: bypassed
    assert not b.on and b.share == 4 and b.switches == 1
    _batch(b, 100, 24, cost_us=0.5, saved_us=3.0)     # 0.72 us: pays, but not 1.5 times over (hysteresis)
    assert not b.on
    _batch(b, 100, 26, cost_us=0.5, saved_us=3.0)     # 0.78 us > 1.5 x 0.5 us: on again
    assert b.on and b.share == 1 and b.switches == 2
    _batch(b, 100, 20, cost_us=0.5, saved_us=3.0)     # back to 0.6 us > 0.5 us: stays on
    assert b.on and b.judgements == 5


def test_the_narrowing_counts_per_candidate_of_the_batches_narrowed_and_the_floor_overrides_the_costs():
    from jizhi.workers.query_cache import Bypass
    b = Bypass(sample_users=4, eval_candidates=100, start_on=True)
    # Sampled while bypassed: 100 candidates looked up in batches of 1,600, narrowed around their hits.
    b.on = False
    _batch(b, 100, 40, cost_us=0.1, saved_us=3.0, narrowed=1600, narrowed_us=0.3)
    assert b.on and round(b.cost_us, 6) == 0.4        # 1.2 us > 1.5 x (0.1 + 0.3) us
    _batch(b, 100, 10, cost_us=0.1, saved_us=3.0, narrowed=100, narrowed_us=0.3)
    assert not b.on                                   # 0.3 us < 0.4 us
    floor = Bypass(min_hit_ratio=0.1, sample_users=4, eval_candidates=100, start_on=True)
    _batch(floor, 100, 8, cost_us=0.1, saved_us=100.0)    # 8 us saved > 0.1 us, but 8 % < the floor's 10 %
    assert not floor.on
    _batch(floor, 100, 14, cost_us=0.1, saved_us=100.0)   # 14 % < 1.5 x the floor
    assert not floor.on
    _batch(floor, 100, 16, cost_us=0.1, saved_us=100.0)
    assert floor.on


def test_a_bypassed_cache_spreads_its_whole_batch_work_over_the_batch_not_over_the_sample():
    """While bypassed only the sampled users look up; the numpy work around the kernels runs over every
    candidate of the batch, as in full use: per candidate of the batch, so the estimate is full use's."""
    from jizhi.workers.query_cache import Bypass
    b = Bypass(sample_users=8, eval_candidates=500)
    # A batch of 4,000 candidates, 500 of them looked up: kernels 0.2 us each, 400 us of numpy around them.
    b.observe(500, 100, cost_s=(500 * 0.2 + 400) * US, computed=400, down_s=400 * 3.0 * US,
              kernel_s=500 * 0.2 * US, batched=4000)
    assert b.judgements == 1 and round(b.cost_us, 6) == 0.3            # 0.2 + 400 / 4,000, not 0.2 + 400 / 500
    assert b.on                                                         # 20 % x 3 us = 0.6 > 1.5 x 0.3


def test_a_pipelines_workers_share_one_mode_and_another_pipeline_keeps_its_own(tmp_path):
    """A worker alone in full use would find only its own stores: one worker's switch is every worker's of
    the same pipeline (the segment's mode word), from their next batch; a worker started later takes it."""
    import os
    from jizhi import qcache
    from jizhi.workers.query_cache import QueryCache as Stage
    name = f"jizhi.test-qmode-{os.getpid()}"
    spec = qcache.init(name, writers=2, slots_per_writer=1024)
    try:
        bundle = type("B", (), {"name": "demo", "version": 1})()
        conf = {"_qcache": dict(spec, sample_users=4, eval_candidates=100)}

        def worker(pipeline):
            w = Stage()
            w.setup(dict(conf, _pipeline=pipeline), bundle)
            return w
        a, b, other = worker("p"), worker("p"), worker("q")
        assert not a.bypass.on and not b.bypass.on and not other.bypass.on
        _batch(a.bypass, a.bypass.warming, 0, cost_us=0.1, saved_us=3.0)   # (warms the sample's share first)
        _batch(a.bypass, 100, 40, cost_us=0.1, saved_us=3.0)        # pays: a switches on
        assert a.bypass.on
        a.settle()                                                  # a publishes
        b.settle()                                                  # b follows at its next batch
        assert b.bypass.on and b.bypass.switches == 1
        other.settle()
        assert not other.bypass.on                                  # pipeline q: its own word
        late = worker("p")                                          # a restarted worker takes the state
        assert late.bypass.on
        _batch(b.bypass, b.bypass.warming, 0, cost_us=0.1, saved_us=3.0)
        _batch(b.bypass, 100, 0, cost_us=0.1, saved_us=3.0)         # b judges it does not pay
        b.settle()
        a.settle()
        late.settle()
        assert not a.bypass.on and not late.bypass.on
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_the_bypass_judges_after_warming_never_without_a_saving_measured_and_never_when_off():
    from jizhi.workers.query_cache import Bypass
    b = Bypass(sample_users=4, eval_candidates=100, capacity=1000, start_on=True)
    _batch(b, 400, 0, cost_us=1.0, saved_us=1.0)      # warming: min(capacity, 4 x eval) = 400 candidates
    assert b.on and b.judgements == 0
    _batch(b, 100, 100, cost_us=0.1, saved_us=0.0)    # everything hit, nothing computed: no saving measured yet
    assert b.on and b.judgements == 0
    _batch(b, 100, 0, cost_us=0.1, saved_us=1.0)      # 100 hits of 200 x 1 us = 0.5 us > 0.1 us
    assert b.on and b.judgements == 1 and round(b.hit_ratio, 6) == 0.5
    _batch(b, 100, 0, cost_us=0.1, saved_us=1.0)      # no hit: bypassed
    assert not b.on
    _batch(b, 100, 100, cost_us=0.1, saved_us=0.0)    # the sample's part of the table warms first (400 / 4)
    assert b.judgements == 2
    _batch(b, 100, 100, cost_us=0.1, saved_us=0.0)    # all hit: the last saving measured (1 us) stands
    assert b.on and b.judgements == 3
    forced = Bypass(sample_users=4, eval_candidates=100, always_on=True)
    _batch(forced, 100, 0, cost_us=1.0, saved_us=1.0)
    assert forced.on and forced.judgements == 1 and forced.switches == 0 and forced.cost_us == 1.0


def test_by_default_the_cache_starts_bypassed_and_comes_on_once_its_sample_shows_it_pays():
    """qcache.start = "bypassed": traffic that does not repeat never pays for every user's lookups, even
    before the first judgement; the sampled users warm their share of the table, then are judged."""
    from jizhi.workers.query_cache import Bypass
    b = Bypass(sample_users=4, eval_candidates=100, capacity=1000)
    assert not b.on and b.share == 4 and b.warming == 100           # the sample's share of min(1000, 400)
    users = np.arange(1, 4001, dtype=np.uint64)
    assert 0.2 < b.users_on(users).mean() < 0.3                      # 1 in 4 users looks it up
    _batch(b, 100, 50, cost_us=0.1, saved_us=3.0)                   # warming: not judged
    assert not b.on and b.judgements == 0
    _batch(b, 100, 10, cost_us=0.5, saved_us=3.0)                   # 0.3 us saved < 1.5 x 0.5 us: stays bypassed
    assert not b.on and b.judgements == 1 and b.switches == 0
    _batch(b, 100, 40, cost_us=0.1, saved_us=3.0)                   # 1.2 us > 1.5 x 0.1 us: on for every user
    assert b.on and b.share == 1 and b.switches == 1


@pytest.fixture(scope="module")
def judged(launch_module, tmp_path_factory):
    """A jizhid judging its query cache every 500 candidates (after 2,000 that warm it): pipeline ``fresh``
    gets traffic that does not repeat, ``again`` every request 4 times; one worker each."""
    d = tmp_path_factory.mktemp("judged")
    text = (Path(__file__).parent.parent / "etc" / "pipelines" / "demo_cached.toml").read_text()
    paths = []
    for name in ("fresh", "again"):
        paths.append(d / f"{name}.toml")
        paths[-1].write_text(text.replace('name = "demo_cached"', f'name = "{name}"').replace("pool = 2", "pool = 1"))
    return launch_module.start(pipelines=paths, config_text="[qcache]\nentries = 16384\neval_candidates = 500\nstart = \"on\"\n")


def _judgement(server, pipeline):
    import json
    from daemon_helpers import jizhictl_ok
    fig = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"][pipeline]["qcache_workers"]
    line = next(x for x in jizhictl_ok("stats", run_dir=server.run_dir).splitlines()
                if x.startswith(f"{pipeline}: query cache ") and "workers" in x)
    return fig, line


def test_on_traffic_that_does_not_repeat_the_cache_bypasses_itself_and_jizhictl_stats_says_why(judged, demo_trace):
    with judged.client() as c:
        for q in range(len(demo_trace)):      # 24 users x 300 candidates, each once
            _score(c, *demo_trace[q], pipeline="fresh")
    fig, line = _judgement(judged, "fresh")
    assert (fig["workers"], fig["judged"], fig["bypassed"], fig["switches"]) == (1, 1, 1, 1)
    assert fig["saves_us"] < fig["costs_us"]
    assert line == (f"fresh: query cache bypassed by 1 of 1 workers: hit ratio {100 * fig['hit_ratio']:.1f}%, "
                    f"saves {fig['saves_us']:.2f} us per candidate ({fig['hit_saves_us']:.2f} us per hit), "
                    f"costs {fig['costs_us']:.2f} us; 1 switches since start")
    assert "query cache bypassed: hit ratio" in judged.log_text()


def test_on_traffic_that_repeats_the_cache_stays_on_and_answers_every_repeat(judged, demo_trace):
    with judged.client() as c:
        for q in range(10):                   # 10 users x 300 candidates, each 4 times in a row
            user, items, recall = demo_trace[q]
            _score(c, user, items, recall, pipeline="again")
            for _ in range(3):
                assert _score(c, user, items, recall, pipeline="again")["cached"] == items.shape[0]
    fig, line = _judgement(judged, "again")
    assert (fig["workers"], fig["judged"], fig["bypassed"], fig["switches"]) == (1, 1, 0, 0)
    assert fig["saves_us"] > fig["costs_us"] and fig["hit_ratio"] >= 0.5
    assert line.startswith(f"again: query cache on in 1 of 1 workers: hit ratio {100 * fig['hit_ratio']:.1f}%, saves ")
