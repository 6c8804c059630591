"""Load shedding without a daemon: recall features, cutoffs, the policies, training, the controller,
the control segment. (The shedder under a real overload: tests/test_shed_daemon.py.)"""
import json

import numpy as np
import pytest

from jizhi import shm
from jizhi.tools.bench import Trace
from jizhi.shedding import (MIN_KEEP, AdmissionCut, Control, Controller, LearnedPolicy, RulePolicy, keep_counts, load_policy,
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


def test_the_controller_trims_under_overload_holds_under_steady_load_and_releases_after():
    c = Controller(slo_ms=50)
    trims = [c.update(80) for _ in range(5)]
    assert trims == sorted(trims, reverse=True) and trims[-1] < 0.5
    held = [c.update(36) for _ in range(20)]        # inside the band: no change, no oscillation
    assert len(set(held)) == 1
    released = [c.update(10, cutting=False) for _ in range(40)]
    assert released[-1] == 1.0 and released == sorted(released)
    # Still cutting with p99 well under the SLO: the estimate was too cautious, the trim passes 1.
    loosened = [c.update(10, cutting=True) for _ in range(40)]
    assert loosened[-1] == Controller.TRIM_MAX and loosened == sorted(loosened)
    assert [c.update(10, cutting=False) for _ in range(20)][-1] == 1.0    # no cut: back to 1
    assert Controller(slo_ms=50).update(None, cutting=False) == 1.0      # no answer yet: nothing to correct
    # Requests refused for want of a slot: too much was let in, whatever the p99 of those admitted.
    c3 = Controller(slo_ms=50)
    assert c3.update(20, cutting=True, refused=True) == pytest.approx(0.94)
    assert c3.update(20, cutting=True, slots_used=0.9) == pytest.approx(0.94 * 0.94)    # or nearly
    assert c3.update(20, cutting=True, slots_used=0.75) == pytest.approx(0.94 * 0.94)   # held: slots not easy


def simulate(k, a=0.0004, b=0.00002, n=500, workers=2, seconds=20.0, seed=0, target_s=0.04, step_at=None):
    """A fluid-enough server: ``workers`` FIFO servers, a request costs ``a + b x kept`` seconds, Poisson
    arrivals at ``k`` x the rate the workers serve at full lists (from ``step_at`` on; half before).
    The admission cut decides each request's quota as the broker does, the controller trims it every
    0.5 s from the p99 of the last 2 s as the supervisor does (SLO 50 ms). Returns (arrival times,
    quotas, latencies)."""
    rng = np.random.default_rng(seed)
    full = workers / (a + b * n)                 # requests/s at full lists
    t, times = 0.0, []
    while t < seconds:
        rate = k * full if step_at is None or t >= step_at else 0.5 * full
        t += rng.exponential(1.0 / rate)
        times.append(t)
    cut = AdmissionCut(target_s)
    cut.workers = workers
    free_at = [0.0] * workers
    pending = []            # (finish time, cost, observed service)
    quotas, lat = [], []
    ctl, next_ctl = Controller(slo_ms=50), 0.5
    for t in times:
        if t >= next_ctl:
            recent = np.array([x for x, y in zip(lat, times) if y >= t - 2.0])
            p99 = float(np.percentile(recent, 99)) * 1000 if recent.shape[0] else None
            cut.trim = ctl.update(p99, cutting=bool(quotas) and np.mean(quotas[-50:]) < 0.995)
            next_ctl += 0.5
        pending.sort()
        while pending and pending[0][0] <= t:
            _, cost, svc, kept = pending.pop(0)
            cut.observe(1, kept, svc)
            cut.left(cost, True)
        q = cut.quota(n, 1.0, t)
        cost = q * n
        cut.admitted(cost)
        kept = max(10, int(np.ceil(q * n)))
        svc = a + b * kept
        w = int(np.argmin(free_at))
        start = max(t, free_at[w])
        free_at[w] = start + svc
        pending.append((free_at[w], cost, svc, kept))
        quotas.append(q)
        lat.append(free_at[w] - t)
    return np.array(times), np.array(quotas), np.array(lat)


@pytest.mark.parametrize("k", [1.5, 2.0, 3.0])
def test_the_admission_cut_keeps_what_fits_at_a_steady_overload_and_holds_the_target(k):
    a, b, n = 0.0004, 0.00002, 500          # 4 % of a full request's cost is per request
    times, q, lat = simulate(k, a=a, b=b, n=n)
    fit = (1.0 / k * (a + b * n) - a) / (b * n)     # the quota that makes k x the work fit exactly
    steady = times > 2.0
    assert abs(q[steady].mean() - fit) < 0.06, (q[steady].mean(), fit)
    assert np.percentile(lat, 99) < 0.05 and lat.max() < 0.1
    # Spread little from one request to the next: the learned policy, not the instant, spreads the cut.
    assert np.std(q[steady]) < 0.13


def test_a_step_to_twice_the_load_is_met_by_the_next_requests():
    times, q, lat = simulate(2.0, step_at=5.0, seconds=10.0)
    after = times >= 5.0
    assert (q[~after][times[~after] > 1.0] == 1.0).mean() > 0.95     # half load: (almost) nothing cut
    first = after & (times < 5.2)                                    # the step's first 200 ms
    assert np.percentile(lat[first], 99) < 0.05 and q[first].mean() < 0.8


def test_no_cut_before_the_cost_model_has_seen_events_but_what_full_slots_say():
    cut = AdmissionCut(0.04)
    cut.workers = 2
    assert [cut.quota(500, 1.0, t * 1e-4) for t in range(100)] == [1.0] * 100
    # A fresh server hit at once: the slots filling cut before the model has a price.
    assert [cut.quota(500, 1.0, 0.01 + t * 1e-4, free_share=f) for t, f in enumerate((0.5, 0.25, 0.0))] == \
        [1.0, 0.5, MIN_KEEP]


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
