"""Load shedding without a daemon: recall features, cutoffs, the policies, training, the controller,
the control segment. (The shedder under a real overload: tests/test_shed_daemon.py.)"""
import json

import numpy as np
import pytest

from jizhi import shm
from jizhi.tools.bench import Trace
from jizhi.shedding import (MIN_KEEP, Control, Controller, LearnedPolicy, RulePolicy, keep_counts, load_policy,
                            recall_features)
from jizhi.shedding import save_policy
from jizhi.tools.shedtrain import needed_counts, overlap_at, train
from jizhi.workers.combiner import select_top


def test_recall_features_match_a_per_request_computation_and_survive_empty_requests():
    rng = np.random.default_rng(1)
    offsets = np.array([0, 5, 5, 12, 40], dtype=np.int64)
    rs = rng.random(40).astype(np.float32)
    f = recall_features(offsets, rs)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        x = rs[a:b].astype(np.float64)
        if b == a:
            assert f[i, 1:6].tolist() == [0.0] * 5
            continue
        np.testing.assert_allclose(f[i, 1:5], [x.mean(), x.std(), x.max(), x.min()], atol=1e-9)
        np.testing.assert_allclose(f[i, 6], np.log(b - a))


def test_keep_counts_never_go_under_top_k_or_the_floor_nor_over_the_request():
    offsets = np.array([0, 100, 103, 1103], dtype=np.int64)
    keep = keep_counts(offsets, np.array([0.05, 0.5, 0.0001]), np.array([10, 10, 10]))
    assert keep.tolist() == [10, 3, max(10, int(np.ceil(MIN_KEEP * 1000)))]


def test_select_top_takes_a_keep_count_per_request():
    offsets = np.array([0, 4, 10], dtype=np.int64)
    rs = np.array([0.1, 0.9, 0.5, 0.3, 1, 2, 3, 4, 5, 6], dtype=np.float32)
    assert select_top(offsets, rs, keep=np.array([2, 3])).tolist() == [1, 2, 7, 8, 9]


def test_the_rule_keeps_the_quota_and_the_learned_policy_shares_it_by_need():
    feats = np.array([[1, 0.5, 0.1, 0.9, 0.1, 4.0, 6.0], [1, 0.5, 0.1, 0.9, 0.1, 1.0, 6.0]])
    assert RulePolicy().keep_fractions(0.3, feats).tolist() == [0.3, 0.3]
    # Need grows as the best recall scores stand out less (rs_gap weight < 0).
    doc = {"policy": "learned", "features": ["bias", "rs_mean", "rs_std", "rs_max", "rs_min", "rs_gap", "log_n"],
           "weights": [0, 0, 0, 0, 0, -0.5, 0], "mean_need": 0.2}
    p = LearnedPolicy(doc)
    need = p.need(feats)
    assert need[0] < need[1]
    kf = p.keep_fractions(0.3, feats)
    assert kf[0] < 0.3 < kf[1]
    with pytest.raises(ValueError, match="features differ"):
        LearnedPolicy(dict(doc, features=["bias"]))


def test_needed_counts_and_overlap_agree():
    rng = np.random.default_rng(3)
    n, r = 200, 30
    offsets = np.arange(r + 1, dtype=np.int64) * n
    scores = rng.standard_normal(n * r).astype(np.float32)
    recall = (scores + rng.standard_normal(n * r)).astype(np.float32)
    need = needed_counts(offsets, recall, scores, 10)
    assert (overlap_at(offsets, recall, scores, need, 10) == 1.0).all()
    assert (overlap_at(offsets, recall, scores, need - 1, 10) < 1.0).all()


def test_the_controller_cuts_under_overload_holds_under_steady_load_and_releases_after():
    c = Controller(slo_ms=50)
    quotas = [c.update(80, 10, 64) for _ in range(5)]
    assert quotas == sorted(quotas, reverse=True) and quotas[-1] < 0.5
    held = [c.update(36, 2, 64) for _ in range(20)]       # inside the band: no change, no oscillation
    assert len(set(held)) == 1
    released = [c.update(10, 0, 64) for _ in range(40)]
    assert released[-1] == 1.0 and released == sorted(released)
    c2 = Controller(slo_ms=50)
    assert c2.update(None, 40, 64) < 1.0                   # a queue building counts before any answer is late


def test_the_control_segment_is_read_as_written(tmp_path):
    name = f"jizhi.test{tmp_path.name[-8:]}.shed"
    try:
        w = Control(name, writable=True, create=True)
        r = Control(name)
        assert r.read()["generation"] == 0
        w.publish("auto", 0.4, 2, queue=7, p99=41.5)
        assert r.read() == {"generation": 1, "mode": "auto", "quota": 0.4, "policy_generation": 2,
                            "queue": 7.0, "p99_ms": 41.5}
        w.close()
        r.close()
    finally:
        shm.unlink(name)


def test_training_keeps_the_mean_kept_fraction_and_the_policy_round_trips(demo_bundle, demo_trace, tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, users=demo_trace.users, offsets=demo_trace.offsets, items=demo_trace.items,
             recall_scores=demo_trace.recall_scores)
    # The reference scorer reads the cube: in a child (LMDB refuses a second environment on a cube
    # this test process may hold open).
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        doc, report = pool.apply(train, (Trace(path), demo_bundle), {"quotas": (0.3,)})
    q = report["quality"][0]
    assert q["subset"] == "all" and abs(q["learned"]["kept"] - q["rule"]["kept"]) < 0.05
    assert 0 < report["mean_needed_fraction"] <= 1
    save_policy(doc, tmp_path / "policy.json")
    p = load_policy(tmp_path / "policy.json")
    assert isinstance(p, LearnedPolicy) and p.weights.tolist() == doc["weights"]
    assert isinstance(load_policy(None), RulePolicy)
    assert json.loads((tmp_path / "policy.json").read_text())["features"] == doc["features"]
