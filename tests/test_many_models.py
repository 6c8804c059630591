"""Many models in one pipeline (multi-objective heads, a cascade), A/B groups, critical-path-first dispatch.

Real daemons on a private model directory: the demo (version 1, hard links of the session's demo
bundle) and head bundles written by ``jizhi.tools.demo.write_head`` on its features. Expected scores come
from ``ReferenceScorer(demo, dense=head)``, the per-pair reference of each head.
"""
import copy
import os
import shutil

import numpy as np
import pytest

from conftest import Launcher, assert_topk, positions, wait_until, write_text
from daemon_helpers import Load, jizhictl_ok
from jizhi.tools.demo import write_head
from jizhi.errors import PipelineError
from jizhi.pipeline import Pipeline, compile_pipeline
from jizhi.tools.reference import ReferenceScorer
from jizhi.workers.ab_dispatch import Router
from jizhi.workers.combiner import select_top

def multi_objective():
    """Two heads in parallel (each its own worker kind) after the shared front, combined."""
    return (Pipeline("mo", model="demo").front(next=["ctr", "cvr"])
            .stage("ctr", "model_inference", next=["combine"], model="ctr", output="ctr")
            .stage("cvr", "model_inference", next=["combine"], model="cvr", output="cvr")
            .stage("combine", "combiner", next=["rank"], heads={"ctr": 1.0, "cvr": 0.5})
            .stage("rank", "ranker")
            .fuse("front", ["reader", "features", "cube"], batch=4)
            .fuse("merge", ["combine", "rank"]))


def cascade():
    """The light head prunes to 20 candidates per request for the demo model, all in one worker."""
    return (Pipeline("cascade", model="demo").front(next=["light"])
            .stage("light", "model_inference", next=["prune"], model="ctr", output="light")
            .stage("prune", "cascade", next=["dnn"], by="light", keep=20)
            .stage("dnn", "model_inference", next=["rank"])
            .stage("rank", "ranker")
            .fuse("scorer", ["reader", "features", "cube", "light", "prune", "dnn", "rank"]))


def ab_pipeline(fractions, salt="exp-1"):
    """Three A/B groups: the demo model, the ctr head, the cvr head."""
    p = (Pipeline("ab", model="demo").front(next=["ab"])
         .stage("ab", "ab_dispatch", next=[f"dnn_{g}" for g in fractions], salt=salt,
                groups=[{"name": g, "fraction": f, "next": f"dnn_{g}"} for g, f in fractions.items()]))
    for g, model in zip(fractions, ("demo", "ctr", "cvr")):
        p.stage(f"dnn_{g}", "model_inference", next=["rank"], model=model)
    return p.stage("rank", "ranker").fuse("front", ["reader", "features", "cube"], batch=4)


MULTI_OBJECTIVE, CASCADE = multi_objective().toml(), cascade().toml()


@pytest.fixture(scope="module")
def models(demo_models, tmp_path_factory):
    """demo 1 and two heads on its features: ctr (light) and cvr."""
    dst = tmp_path_factory.mktemp("many") / "models"
    # Hard links, but the cube is copied: LMDB refuses a second environment on the same file in
    # one process, and an earlier test of this session may hold the session's demo cube open.
    shutil.copytree(demo_models / "demo" / "1", dst / "demo" / "1", copy_function=os.link,
                    ignore=shutil.ignore_patterns("cube"))
    shutil.copytree(demo_models / "demo" / "1" / "cube", dst / "demo" / "1" / "cube")
    write_head(dst, "ctr", hidden=(32,), seed=21)
    write_head(dst, "cvr", hidden=(256, 128), seed=22)
    return dst


@pytest.fixture(scope="module")
def refs(models):
    base = models / "demo" / "1"
    return {"demo": ReferenceScorer(base), "ctr": ReferenceScorer(base, dense=models / "ctr" / "1"),
            "cvr": ReferenceScorer(base, dense=models / "cvr" / "1")}


@pytest.fixture
def launch_many(tmp_path_factory, models):
    with Launcher(tmp_path_factory, models) as launcher:
        yield launcher


def doc_of(pipeline):
    return copy.deepcopy(pipeline.doc)


# ---------------------------------------------------------------------------
# Compiling


def test_a_multi_objective_plan_names_every_models_version(models):
    plan = compile_pipeline(doc_of(multi_objective()), models)
    assert plan["versions"] == {"demo": 1, "ctr": 1, "cvr": 1}
    assert plan["stages"]["ctr"]["config"]["model"] == "ctr"
    assert plan["stages"]["ctr"]["outputs"] == {"ctr": {"scope": "candidate", "dtype": "float32", "shape": []}}
    assert sorted(plan["groups"]["merge"]["prev"]) == ["ctr", "cvr"]
    # The heads read the cube's pooled embeddings once, from the shared front.
    assert plan["groups"]["front"]["next"] == ["ctr", "cvr"]


def test_a_head_whose_features_differ_is_refused_naming_the_difference(models, tmp_path):
    bad = tmp_path / "models"
    shutil.copytree(models, bad, copy_function=os.link)
    manifest = bad / "ctr" / "1" / "manifest.toml"
    text = manifest.read_text().replace("dim = ", "dim = 1", 1)
    manifest.unlink()
    manifest.write_text(text)
    with pytest.raises(PipelineError, match=r"model 'ctr' cannot be served on 'demo''s features: dim"):
        compile_pipeline(doc_of(multi_objective()), bad)


def test_a_head_cannot_be_a_pipelines_own_model(models):
    doc = doc_of(multi_objective())
    doc["model"] = "ctr"
    for st in doc["stage"]:
        st.pop("model", None)
    with pytest.raises(PipelineError, match="is a head bundle"):
        compile_pipeline(doc, models)


def test_only_model_inference_may_name_another_model(models):
    doc = doc_of(multi_objective())
    doc["stage"][2]["model"] = "ctr"
    with pytest.raises(PipelineError, match="stage 'cube' names model 'ctr': only a model_inference stage"):
        compile_pipeline(doc, models)


def test_a_stage_after_a_cascade_in_another_worker_is_refused(models):
    doc = doc_of(cascade())
    doc["fuse"][0]["stages"].remove("dnn")
    with pytest.raises(PipelineError, match="stage 'dnn' follows the cascade 'prune' but runs in another worker"):
        compile_pipeline(doc, models)


def test_a_combiner_without_heads_is_refused(models):
    doc = doc_of(multi_objective())
    doc["stage"][5]["heads"] = {}
    with pytest.raises(PipelineError, match="combiner needs heads"):
        compile_pipeline(doc, models)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["stage"][3]["groups"][0].update(fraction=0.6), "the fractions sum to 1.1, not 1"),
    (lambda d: d["stage"][3].update(next=["dnn_a", "dnn_b"]), "next must list each group's first stage once"),
    (lambda d: d["stage"][4].update(next=["dnn_b"]), "stage 'dnn_b' is reached by A/B groups a, b"),
    (lambda d: d.setdefault("fuse", []).append({"name": "x", "stages": ["ab", "dnn_a"]}),
     "runs in the broker: it cannot be fused"),
    (lambda d: d["fuse"].append({"name": "x", "stages": ["dnn_a", "dnn_b"]}),
     "fuses stages of different A/B branches"),
])
def test_a_bad_ab_dispatch_is_refused_with_its_reason(models, edit, message):
    doc = doc_of(ab_pipeline({"a": 0.5, "b": 0.3, "c": 0.2}))
    edit(doc)
    with pytest.raises(PipelineError, match=message):
        compile_pipeline(doc, models)


def test_ab_branches_may_write_the_same_column_and_the_router_has_no_worker(models):
    plan = compile_pipeline(doc_of(ab_pipeline({"a": 0.5, "b": 0.3, "c": 0.2})), models)
    assert plan["groups"]["ab"]["pool"] == 0 and plan["groups"]["ab"]["router"]["salt"] == "exp-1"
    assert plan["groups"]["dnn_b"]["branch"] == ["ab", "b"]
    assert plan["groups"]["rank"]["branch"] is None
    assert "score" in plan["arenas"]


# ---------------------------------------------------------------------------
# Kernels


def test_select_top_keeps_each_requests_best_candidates():
    rng = np.random.default_rng(0)
    offsets = np.array([0, 7, 7, 10, 40], dtype=np.int64)
    score = rng.standard_normal(40).astype(np.float32)
    score[12] = np.nan
    got = select_top(offsets, score, keep=3)
    want = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        s = np.where(np.isnan(score[a:b]), -np.inf, score[a:b])
        want += sorted(a + np.argsort(-s, kind="stable")[:3])
    np.testing.assert_array_equal(got, want)
    ratio = select_top(offsets, score, ratio=0.5)
    assert np.bincount(np.searchsorted(offsets, ratio, side="right") - 1, minlength=4).tolist() == [4, 0, 2, 15]


def test_ab_split_of_100000_users_is_within_1_percent_and_stable():
    users = np.random.default_rng(5).integers(0, 2 ** 63, size=100_000, dtype=np.uint64)
    r = Router({"salt": "exp-1", "groups": [{"name": "a", "fraction": 0.5, "next": "x"},
                                            {"name": "b", "fraction": 0.3, "next": "y"},
                                            {"name": "c", "fraction": 0.2, "next": "z"}]})
    groups = r.route_array(users)
    share = np.bincount(groups, minlength=3) / users.shape[0]
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.01)
    # The scalar path (the broker's) agrees with the array one, and a user's group never changes.
    assert [r.route(u) for u in users[:2000]] == groups[:2000].tolist()
    again = Router({"salt": "exp-1", "groups": [{"name": "a", "fraction": 0.5, "next": "x"},
                                                {"name": "b", "fraction": 0.3, "next": "y"},
                                                {"name": "c", "fraction": 0.2, "next": "z"}]})
    np.testing.assert_array_equal(again.route_array(users), groups)
    # Moving 0.1 from a to b moves only a's users in that part of the range.
    moved = Router({"salt": "exp-1", "groups": [{"name": "a", "fraction": 0.4, "next": "x"},
                                                {"name": "b", "fraction": 0.4, "next": "y"},
                                                {"name": "c", "fraction": 0.2, "next": "z"}]}).route_array(users)
    changed = moved != groups
    assert set(zip(groups[changed].tolist(), moved[changed].tolist())) == {(0, 1)}
    assert abs(changed.mean() - 0.1) < 0.01


# ---------------------------------------------------------------------------
# Serving


def requests(demo_trace, count):
    return [demo_trace[q] for q in range(count)]


@pytest.mark.slow
def test_multi_objective_heads_combine_and_a_new_head_version_reloads_on_its_own(
        launch_many, models, refs, demo_trace, tmp_path):
    server = launch_many.start(pipelines=(str(write_text(tmp_path / "mo.toml", MULTI_OBJECTIVE)),))
    c = server.client()
    for user, items, rs in requests(demo_trace, 6):
        r = c.score(user, items, rs, pipeline="mo", top_k=20)
        assert r.ok and r["model_versions"] == {"demo": 1, "ctr": 1, "cvr": 1}
        want = refs["ctr"].score(user, items)[0] + np.float32(0.5) * refs["cvr"].score(user, items)[0]
        assert_topk(r, items, want, 20)
    # heads: true adds each head's scores of the returned items.
    user, items, rs = demo_trace[1]
    r = c.score(user, items, rs, pipeline="mo", top_k=20, heads=True)
    pos = positions(items, r.item_ids)
    assert sorted(r.heads) == ["ctr", "cvr"]
    for h in ("ctr", "cvr"):
        np.testing.assert_allclose(r.heads[h], refs[h].score(user, items)[0][pos], atol=1e-5)
    np.testing.assert_allclose(r.scores, r.heads["ctr"] + np.float32(0.5) * r.heads["cvr"], atol=1e-6)
    assert c.score(user, items, rs, pipeline="mo", top_k=20).heads == {}
    # A new version of one head: the pipeline serves it with the others' versions unchanged.
    v2 = write_head(models, "ctr", version=2, hidden=(32,), seed=99)
    try:
        user, items, rs = demo_trace[0]
        wait_until(lambda: c.score(user, items, rs, pipeline="mo")["model_versions"] == {"demo": 1, "ctr": 2, "cvr": 1},
                   60, what="ctr version 2 to serve")
        ctr2 = ReferenceScorer(models / "demo" / "1", dense=v2)
        for user, items, rs in requests(demo_trace, 4):
            r = c.score(user, items, rs, pipeline="mo", top_k=20)
            want = ctr2.score(user, items)[0] + np.float32(0.5) * refs["cvr"].score(user, items)[0]
            assert_topk(r, items, want, 20)
        assert "now serving demo 1, ctr 2, cvr 1 (generation 2)" in server.log_text()
        info = server.info()["pipelines"]["mo"]
        assert info["model_versions"] == {"demo": 1, "ctr": 2, "cvr": 1}
    finally:
        server.stop()
        shutil.rmtree(v2)


def test_a_cascade_scores_only_the_light_models_best_with_the_heavy_model(launch_many, refs, demo_trace, tmp_path):
    server = launch_many.start(pipelines=(str(write_text(tmp_path / "cascade.toml", CASCADE)),))
    c = server.client()
    for user, items, rs in requests(demo_trace, 6):
        r = c.score(user, items, rs, pipeline="cascade", ret="all")
        assert r.ok
        light = refs["ctr"].score(user, items)[0]
        survivors = np.sort(np.argsort(-light, kind="stable")[:20])
        scored = np.flatnonzero(~np.isnan(r.scores))
        np.testing.assert_array_equal(scored, survivors)
        np.testing.assert_allclose(r.scores[scored], refs["demo"].score(user, items)[0][scored], atol=1e-5)
        top = c.score(user, items, rs, pipeline="cascade", top_k=10)
        want = np.full(items.shape[0], np.nan, np.float32)
        want[survivors] = refs["demo"].score(user, items)[0][survivors]
        assert_topk(top, items, want, 10)


@pytest.mark.slow
def test_ab_groups_route_by_user_stay_across_requests_and_reloads_and_split_stats(
        launch_many, refs, demo_trace, tmp_path):
    fractions = {"a": 0.5, "b": 0.3, "c": 0.2}
    path = write_text(tmp_path / "ab.toml", ab_pipeline(fractions).toml())
    server = launch_many.start(pipelines=(str(path),))
    c = server.client()
    model_of = {"a": "demo", "b": "ctr", "c": "cvr"}
    router = Router({"salt": "exp-1", "groups": [{"name": g, "fraction": f, "next": "-"}
                                                 for g, f in fractions.items()]})
    _, items, rs = demo_trace[0]
    users = np.unique(demo_trace.users)[:60]
    seen = {}
    for user in list(users) + list(users[:20]):
        r = c.score(int(user), items, rs, pipeline="ab", top_k=5)
        assert r.ok
        g = r["ab_group"]
        assert g == router.names[router.route(int(user))]
        assert seen.setdefault(int(user), g) == g, "a user changed group between requests"
        assert_topk(r, items, refs[model_of[g]].score(int(user), items)[0], 5)
        # Only its branch ran: the other groups' stages are not in its timings.
        assert {k for k in r["timings_us"] if k.startswith("dnn_")} == {f"dnn_{g}"}
    assert set(seen.values()) == {"a", "b", "c"}
    ab = server.info()["pipelines"]["ab"]["ab"]["ab"]
    assert ab["fractions"] == fractions
    counts = {g: sum(1 for u in list(users) + list(users[:20]) if seen[int(u)] == g) for g in fractions}
    assert {g: x["ok"] for g, x in ab["groups"].items()} == counts

    # A reload with other fractions: users move only as the new intervals say; unchanged ones stay.
    new = {"a": 0.2, "b": 0.3, "c": 0.5}
    write_text(path, ab_pipeline(new).toml())
    out = jizhictl_ok("reload", run_dir=server.run_dir)
    assert "A/B fractions a=0.2, b=0.3, c=0.5" in out
    router2 = Router({"salt": "exp-1", "groups": [{"name": g, "fraction": f, "next": "-"} for g, f in new.items()]})
    for user in users:
        r = c.score(int(user), items, rs, pipeline="ab", top_k=5)
        assert r["ab_group"] == router2.names[router2.route(int(user))]
    assert server.info()["pipelines"]["ab"]["ab"]["ab"]["fractions"] == new
    table = jizhictl_ok("stats", run_dir=server.run_dir)
    assert "ab/ab A/B groups" in table
    for g, f in new.items():
        assert any(line.split()[:2] == [g, f"{f:.3f}"] and f"(dnn_{g})" in line for line in table.splitlines()), table


@pytest.mark.slow
def test_critical_path_dispatch_serves_the_multi_objective_pipeline_correctly_under_load(
        launch_many, refs, demo_trace, tmp_path):
    server = launch_many.start(pipelines=(str(write_text(tmp_path / "mo.toml", MULTI_OBJECTIVE)),),
                               config_text='[broker]\ndispatch = "critical_path"\n')
    with Load(server.endpoint, demo_trace, pipeline="mo", clients=6) as load:
        wait_until(lambda: load.count_ok() >= 60, 60, what="60 answers")
    records = load.snapshot()
    assert {rec["outcome"] for rec in records} == {"ok"}
    for rec in records[:12]:
        user, items, _ = demo_trace[rec["q"]]
        want = refs["ctr"].score(user, items)[0] + np.float32(0.5) * refs["cvr"].score(user, items)[0]
        assert_topk(rec["reply"], items, want, 10)
