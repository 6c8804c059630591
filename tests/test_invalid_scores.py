"""Non-finite scores: never in an ok reply, counted, and a version that gives too many is failed.

The bad versions wrap the demo's own dense.onnx (real ONNX nodes, real
onnxruntime): the score is NaN where the L1 norm of the candidate's pooled
item embeddings lies in a band ``[lo, hi)``. Two bands:

* one in the middle of the catalogue's norms (a share of the items; none of
  the 64 pairs the smoke check once scored): validation, which now scores
  every item, rejects the version before any worker maps it;
* ``[-1, 1)``: only the all-zero embedding of an item the profiles do not
  know (new items, scored with the default vectors). No catalogue item has
  it (the smallest norm is about 9), so validation passes; live traffic with
  new items gives 30 NaN of 330 candidates per request. The warm-up catches
  it when the recorded traffic had new items; otherwise the first minutes of
  serving do, and the previous version serves again.

Expected scores come from ``jizhi.tools.reference.ReferenceScorer`` on the bad
version's own directory, so every reply is checked exactly: the top-10 of the
finite reference scores, and ``invalid_scores`` equal to the reference's NaN
count.
"""
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import (Launcher, assert_topk, demo_pipeline_text, free_port, unknown_ids, wait_until,
                      write_text)
from daemon_helpers import Load, jizhictl_ok, log_lines, log_time
from jizhi.tools.demo import publish, stage_version
from jizhi.tools.reference import ReferenceScorer
from jizhi.workers.ranker import rank
from jizhi.workers.stage import CANDIDATE, INVALID_NAN_BITS, Batch, Selection

NEW_ITEMS = 30           # unknown items added to each request of the band traffic
ZERO_BAND = (-1.0, 1.0)  # L1 norms of pooled item embeddings: only the default vectors (zeros)
RATE = 40                # requests/s of the test's load


def nan_band(model, lo, hi):
    """Edit ``model`` in place: its score is NaN where sum(|item_emb|) over fields and dims is in [lo, hi)."""
    g = model.graph
    out = g.output[0].name
    inner = out + ".before_band"
    for node in g.node:
        node.output[:] = [inner if name == out else name for name in node.output]
    g.initializer.extend([numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "band.axes"),
                          numpy_helper.from_array(np.array(lo, dtype=np.float32), "band.lo"),
                          numpy_helper.from_array(np.array(hi, dtype=np.float32), "band.hi"),
                          numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "band.nan")])
    g.node.extend([helper.make_node("Abs", ["item_emb"], ["band.abs"]),
                   helper.make_node("ReduceSum", ["band.abs", "band.axes"], ["band.l1"], keepdims=0),
                   helper.make_node("GreaterOrEqual", ["band.l1", "band.lo"], ["band.ge"]),
                   helper.make_node("Less", ["band.l1", "band.hi"], ["band.lt"]),
                   helper.make_node("And", ["band.ge", "band.lt"], ["band.in"]),
                   helper.make_node("Where", ["band.in", "band.nan", inner], [out])])
    onnx.checker.check_model(model)


def stage_nan_band(models, source, version, band):
    """Stage ``version`` of the demo with ``nan_band`` applied; its manifest lists the new graph."""
    staged = Path(stage_version(models, source, version))
    old = (staged / "dense.onnx").read_bytes()
    model = onnx.load_from_string(old)
    nan_band(model, *band)
    onnx.save(model, staged / "dense.onnx")
    new = (staged / "dense.onnx").read_bytes()
    text = (staged / "manifest.toml").read_text()
    entry = f'path = "dense.onnx"\nsize = {len(old)}\nsha256 = "{hashlib.sha256(old).hexdigest()}"'
    assert text.count(entry) == 1
    write_text(staged / "manifest.toml", text.replace(entry, f'path = "dense.onnx"\nsize = {len(new)}\n'
                                                             f'sha256 = "{hashlib.sha256(new).hexdigest()}"'))
    return staged


class BandTrace:
    """The demo trace with NEW_ITEMS unknown items appended to every request (``trace[q]``)."""

    def __init__(self, trace, new_items):
        self.trace = trace
        self.new_items = new_items

    def __len__(self):
        return len(self.trace)

    def __getitem__(self, q):
        user, items, recall = self.trace[q]
        new = self.new_items[q * NEW_ITEMS % len(self.new_items):][:NEW_ITEMS]
        return user, np.concatenate([items, new]), np.concatenate([recall, np.full(NEW_ITEMS, 0.5, np.float32)])


@pytest.fixture
def models(private_demo_models):
    return private_demo_models


@pytest.fixture
def server(tmp_path_factory, models, tmp_path):
    """jizhid on the private model directory: the demo fused, one worker; every admitted request recorded for
    the warm-up; Prometheus on a free port."""
    launcher = Launcher(tmp_path_factory, models)
    port = free_port()
    pipeline = write_text(tmp_path / "demo.toml", demo_pipeline_text("demo", pool=1, batch=4))
    server = launcher.start(pipelines=[pipeline], config_text=(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n'
        # Loading unpaced (load_pace 1): these tests are about invalid scores, tests/test_pacing.py about pacing.
        "[models]\nwarmup_sample_every = 1\nwarmup_requests = 32\nload_pace = 1\n\n"
        # No hot tier: each version would build one (seconds of CPU the test does not need).
        "[cube]\nhot_tier_mb = 0\n"))
    server.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield server
    launcher.close()


@pytest.fixture(scope="module")
def band_trace(demo_trace, reference):
    return BandTrace(demo_trace, unknown_ids(reference, 4 * NEW_ITEMS, seed=4))


def version_state(server, version):
    versions = json.loads(jizhictl_ok("models", "--json", run_dir=server.run_dir))["demo"]["versions"]
    return next((v for v in versions if v["version"] == version), None)


def wait_state(server, version, states, timeout_s=60):
    def ready():
        v = version_state(server, version)
        return v if v is not None and v["state"] in states else None
    return wait_until(ready, timeout_s, interval_s=0.2, what=f"demo version {version} to be {'/'.join(states)}")


def check_replies(records, trace, expected):
    """Every attempt is ok and exact: the reference top-10 of its version, its NaN count as invalid_scores,
    no score that is not finite. ``expected``: {version: [reference scores by trace request]}.
    Returns {version: (replies, invalid_scores)}."""
    outcomes = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    assert outcomes == {"ok": len(records)}, outcomes
    seen = {}
    for r in records:
        reply, (_, items, _) = r["reply"], trace[r["q"]]
        version = reply["model_versions"]["demo"]
        want = expected[version][r["q"]]
        assert np.isfinite(reply.scores).all(), (version, reply.scores)
        assert_topk(reply, items, want, 10)
        assert reply["invalid_scores"] == int(np.isnan(want).sum())
        n, invalid = seen.get(version, (0, 0))
        seen[version] = (n + 1, invalid + reply["invalid_scores"])
    return seen


def prometheus_invalid(server):
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    m = re.search(r'^jizhi_invalid_scores_total\{pipeline="demo"\} (\S+)$', text, re.M)
    assert m, "no jizhi_invalid_scores_total in the metrics"
    return int(float(m.group(1)))


def reference_scores(version_dir, trace):
    scorer = ReferenceScorer(version_dir)
    return [scorer.score(*trace[q][:2])[0] for q in range(len(trace))]


def test_a_model_s_nan_and_inf_are_counted_and_never_ranked_and_a_shed_candidate_is_not_counted():
    # Two requests of 4 candidates; candidate 3 (request 0) is shed before the model (a Selection, as the
    # worker runtime narrows a batch for a shedder), so it rejoins the ranker as NaN, like the model's NaN.
    batch = Batch(np.array([1, 2], np.uint64), np.array([4, 4]), np.zeros(2, bool), np.full(2, np.inf),
                  np.array([0, 4, 8]), {"item_ids": np.arange(8, dtype=np.uint64)})
    narrow = Selection(batch, {"item_ids": CANDIDATE, "score": CANDIDATE})
    narrow.select(np.array([0, 1, 2, 4, 5, 6, 7]))
    model = np.array([0.5, np.nan, 0.7, 0.2, np.inf, -np.inf, 0.9], np.float32)
    batch.columns["score"] = batch.drop_invalid(model)
    narrow.widen()
    out = rank(batch, batch["score"], None)
    assert batch.counts["invalid_scores"].tolist() == [1, 2]
    assert batch.counts["returned"].tolist() == [2, 2]
    assert out["order"].tolist() == [2, 0, -1, -1, 3, 0, -1, -1]
    assert np.flatnonzero(np.isnan(out["out_scores"])).tolist() == [1, 3, 5, 6]
    # The broker tells them apart by their bits (it leaves the invalid ones out of a return: all reply).
    assert np.flatnonzero(out["out_scores"].view(np.uint32) == INVALID_NAN_BITS).tolist() == [1, 5, 6]
    # An infinite score from a stage that is not a model's (a combiner, a user's sink) is counted by rank.
    batch = Batch(np.array([1], np.uint64), np.array([3]), np.zeros(1, bool), np.full(1, np.inf),
                  np.array([0, 3]), {"item_ids": np.arange(3, dtype=np.uint64)})
    out = rank(batch, np.array([np.inf, 0.1, np.nan], np.float32), None)
    assert batch.counts["invalid_scores"].tolist() == [1]
    assert out["order"].tolist() == [1, -1, -1] and np.isfinite(out["out_scores"]).tolist() == [False, True, False]
    assert (out["out_scores"].view(np.uint32) == INVALID_NAN_BITS).tolist() == [True, False, False]


def test_validation_scores_every_item_and_rejects_a_graph_nan_on_a_band_of_the_catalogue(
        models, reference, capsys):
    # Pooled item embeddings of every item, computed by the reference scorer. The band: the widest stretch
    # of the catalogue's norms between two of the 32 items the old smoke check scored (so it missed it),
    # with its edges in the widest gaps between neighbouring norms (float sums of the serving stages and
    # of the reference differ in their last bits, never by that much).
    ids = reference.profiles["item"]["ids"]
    norms = np.abs(reference.embeddings("item", np.arange(ids.shape[0]))).sum(axis=(1, 2))
    ordered = np.sort(norms)
    old_sample = np.unique(np.linspace(0, ids.shape[0] - 1, 32).astype(np.int64))
    pos = np.searchsorted(ordered, np.sort(norms[old_sample]))
    a = int(np.argmax(np.diff(pos)))

    def widest_gap(k0, k1):
        k = np.arange(k0, k1)
        return int(k[np.argmax(ordered[k] - ordered[k - 1])])
    i, j = widest_gap(pos[a] + 1, pos[a] + 200), widest_gap(pos[a + 1] - 199, pos[a + 1] + 1)
    lo, hi = (ordered[i - 1] + ordered[i]) / 2, (ordered[j - 1] + ordered[j]) / 2
    in_band = (norms >= lo) & (norms < hi)
    assert in_band.sum() == j - i > 0.03 * ids.shape[0] and not in_band[old_sample].any()
    version_dir = publish(stage_nan_band(models, models / "demo" / "1", 2, (lo, hi)), models)
    proc = subprocess.run([sys.executable, "-m", "jizhi.validate", str(version_dir), "--name", "demo",
                           "--version", "2"], capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (proc.returncode, result["ok"], result["check"]) == (1, False, "smoke"), result
    prefix = (f"{j - i} of {ids.shape[0]} smoke scores are not finite (NaN or inf); dense.onnx on every item "
              f"of the catalogue, 10 to a user; the first: user ")
    assert result["error"].startswith(prefix), result["error"]
    first_item = int(result["error"].rsplit("item ", 1)[1])
    assert first_item == int(ids[np.flatnonzero(in_band)[0]])
    with capsys.disabled():
        print(f"\nvalidation: {j - i} of {ids.shape[0]} items in the band ({100 * (j - i) / ids.shape[0]:.1f} %), "
              f"rejected by the smoke check in {result['timings_ms']['smoke']:.0f} ms: {result['error']}")


def test_a_version_nan_on_new_items_never_answers_nan_and_is_failed_in_its_first_seconds_or_at_its_warm_up(
        server, models, demo_trace, trace_scores, band_trace, capsys):
    v1 = models / "demo" / "1"
    with Load(server.endpoint, demo_trace, clients=2, rate=RATE, deadline_ms=5000) as load:
        # The warm-up ring: catalogue items only, so version 2's warm-up sees no NaN.
        wait_until(lambda: load.count_ok() >= 40, 30, what="40 answers")
    check_replies(load.snapshot(), demo_trace, {1: trace_scores})
    v2 = publish(stage_nan_band(models, v1, 2, ZERO_BAND), models)
    expected = {1: reference_scores(v1, band_trace), 2: reference_scores(v2, band_trace)}
    share = sum(np.isnan(s).sum() for s in expected[2]) / sum(s.shape[0] for s in expected[2])
    assert all(np.isnan(s).sum() == NEW_ITEMS for s in expected[2])     # exactly the new items
    assert not any(np.isnan(s).any() for s in expected[1])
    wait_state(server, 2, ("serving",))
    # return: all (3 requests, 990 candidates: too few to judge the version): the new items are left out.
    with server.client() as c:
        for q in range(3):
            user, items, recall = band_trace[q]
            r = c.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=5000)
            known = ~np.isnan(expected[2][q])
            assert (r["model_versions"]["demo"], r["invalid_scores"]) == (2, NEW_ITEMS)
            assert np.array_equal(r.item_ids, items[known]) and np.isfinite(r.scores).all()
            np.testing.assert_allclose(r.scores, expected[2][q][known], rtol=0, atol=1e-5)
    with Load(server.endpoint, band_trace, clients=2, rate=RATE, deadline_ms=5000) as load:
        # Served: version 2 is judged on live traffic, which has new items.
        failed2 = wait_state(server, 2, ("failed",), timeout_s=30)
        back = wait_until(lambda: [r for r in load.snapshot() if r["outcome"] == "ok"
                                   and r["reply"]["model_versions"]["demo"] == 1], 60,
                          what="answers by version 1 again")
        v1_back = wait_state(server, 1, ("serving",))
        # The ring now holds requests with new items: version 3 (the same graph) fails its warm-up.
        publish(stage_nan_band(models, v1, 3, ZERO_BAND), models)
        failed3 = wait_state(server, 3, ("failed",), timeout_s=60)
        t_failed3 = time.monotonic()
        wait_until(lambda: load.count_ok(since=t_failed3) >= 10, 30, what="10 answers after version 3 failed")
    records = load.snapshot()
    seen = check_replies(records, band_trace, expected)
    assert sorted(seen) == [1, 2] and seen[2][0] >= 28, seen
    # Version 2 answered until version 1 was warm, then drained: nothing was refused meanwhile.
    last_v2 = max(r["t_done"] for r in records if r["reply"]["model_versions"]["demo"] == 2)
    assert last_v2 <= back[0]["t_done"] + 1.0
    # Judged at the first reply that made 10,000 candidates: the 31st with the 3 above (31 x 330 = 10,230).
    assert re.fullmatch(r"930 of 10230 scores not finite \(NaN or infinite\), 9\.09% > models\.max_invalid_share "
                        r"0\.001, in its first [\d.]+ s of serving", failed2["error"]), failed2["error"]
    assert failed3["error"] == (f"warm-up: {32 * NEW_ITEMS} of {32 * (300 + NEW_ITEMS)} scores not finite "
                                f"(NaN or infinite), 9.09% > models.max_invalid_share 0.001")
    assert [version_state(server, v)["state"] for v in (1, 2, 3)] == ["serving", "failed", "failed"]
    total = seen[2][1] + 3 * NEW_ITEMS
    assert seen[1][1] == 0 and seen[2][1] == NEW_ITEMS * seen[2][0]
    stats = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))
    assert stats["pipelines"]["demo"]["invalid_scores"] == total
    table = jizhictl_ok("stats", run_dir=server.run_dir).splitlines()
    assert table[1].split()[-1] == "invalid" and table[2].split()[-1] == f"{total:,}"
    assert prometheus_invalid(server) == total
    assert log_lines(server, "candidates dropped from ok replies for a NaN or infinite score")
    status = json.loads(jizhictl_ok("status", "--json", run_dir=server.run_dir))
    assert sorted(p.split(":")[0] for p in status["model_problems"]) == ["demo 2", "demo 3"]
    activated = version_state(server, 2)["serving_since"]
    judged = log_time(log_lines(server, "version 2 failed: ")[0])
    with capsys.disabled():
        print(f"\nversion 2 NaN on {share:.1%} of the band traffic's candidates (none of the catalogue's); "
              f"{len(records)} replies ({seen[2][0]} by version 2, {seen[1][0]} by version 1, none refused, "
              f"no NaN), {total} invalid candidates dropped; version 2 failed {judged - activated:.1f} s after "
              f"it began serving, version 1 serving again {v1_back['serving_since'] - judged:.1f} s later; "
              f"version 2: {failed2['error']}; version 3: {failed3['error']}")
