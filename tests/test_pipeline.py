"""The pipeline compiler names the offending stage; user processors run end to end."""
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import (JIZHID, assert_topk, demo_pipeline_text, processes_mentioning, shm_segments, unknown_ids,
                      write_text)
from jizhi.errors import INTERNAL, PipelineError, RequestError
from jizhi.pipeline import Pipeline, compile_pipeline, read_pipeline

FLOW = (("reader", "data_reader", ["features"]), ("features", "feature_processor", ["cube"]),
        ("cube", "cube_accessor", ["dnn"]), ("dnn", "model_inference", ["rank"]), ("rank", "ranker", []))


def demo_dag(name="p", order=None, edges=None, **options):
    """The demo DAG built in Python; ``edges`` overrides some stages' ``next``, ``order`` their order."""
    p = Pipeline(name, model="demo", **options)
    stages = {s: (proc, list((edges or {}).get(s, nxt))) for s, proc, nxt in FLOW}
    for s in order or [s for s, _, _ in FLOW]:
        proc, nxt = stages[s]
        p.stage(s, proc, next=nxt)
    return p


def compile_error(doc, models):
    with pytest.raises(PipelineError) as e:
        compile_pipeline(doc, models)
    return str(e.value)


# ---------------------------------------------------------------------------
# Compiler errors


@pytest.mark.parametrize("order", [
    [s for s, _, _ in FLOW],
    [s for s, _, _ in reversed(FLOW)],
])
def test_a_cycle_is_refused_naming_a_stage_on_it(demo_models, order):
    message = compile_error(demo_dag(order=order, edges={"cube": ["dnn", "features"]}).doc, demo_models)
    named = re.match(r"stage '(\w+)' is on a cycle", message)
    assert named, message
    assert named.group(1) in ("features", "cube"), message


@pytest.mark.parametrize("processor", ["no_such_processor", "tests.stages:NoSuchClass", "no_such_module:Stage"])
def test_an_unknown_processor_is_refused_naming_its_stage(demo_models, processor):
    doc = demo_dag().doc
    doc["stage"][1]["processor"] = processor
    assert compile_error(doc, demo_models).startswith(f"stage 'features': unknown processor '{processor}' (")


def test_a_processor_that_is_not_a_string_is_refused_naming_its_stage(demo_models):
    doc = demo_dag().doc
    doc["stage"][2]["processor"] = 5
    assert compile_error(doc, demo_models) == "stage 'cube': processor must be a name or module:Class"


def test_a_stage_reading_a_column_no_stage_produces_is_refused(demo_models):
    doc = demo_dag(edges={"features": ["dnn"]}).doc
    doc["stage"] = [s for s in doc["stage"] if s["name"] != "cube"]
    assert compile_error(doc, demo_models) == "stage 'dnn' reads 'user_emb', which no stage produces"


def test_a_join_missing_a_predecessor_is_refused_naming_the_reader_and_the_producer(demo_models):
    # dnn needs cube's embeddings but only hangs off reader: a join is missing the cube -> dnn edge.
    doc = demo_dag(edges={"reader": ["features", "dnn"], "cube": ["rank"]}).doc
    assert compile_error(doc, demo_models) == (
        "stage 'dnn' reads 'user_emb', produced by 'cube', which is not one of its predecessors "
        "(a join is missing an edge)")


def test_an_unknown_structured_features_mode_is_refused_naming_the_stage(demo_models):
    p = demo_dag()
    next(s for s in p.doc["stage"] if s["processor"] == "model_inference")["structured"] = "maybe"
    message = compile_error(p.doc, demo_models)
    assert "structured must be one of on, off, as_is" in message and "'maybe'" in message
    assert "dnn" in message or "model_inference" in message


def test_structured_false_moves_the_users_columns_per_pair_and_more_bytes(demo_models):
    from jizhi.pipeline import bytes_per_request
    on = compile_pipeline(demo_dag().doc, demo_models)
    doc = demo_dag().doc
    doc["structured"] = False
    off = compile_pipeline(doc, demo_models)
    for col in ("dense", "user_values", "user_sigs", "user_emb"):
        producer = next(st for st in off["stages"].values() if col in st["outputs"])
        assert producer["outputs"][col]["scope"] == "candidate"
        assert next(st for st in on["stages"].values() if col in st["outputs"])["outputs"][col]["scope"] == "request"
    dnn = next(st for st in off["stages"].values() if st["processor"] == "model_inference")
    assert dnn["config"]["structured"] == "off" and dnn["config"]["per_pair"] is True
    b_on, b_off = bytes_per_request(on, 500), bytes_per_request(off, 500)
    assert b_off["written"] > b_on["written"] and b_off["shared"] > b_on["shared"]
    doc["structured"] = "no"
    assert "structured must be true or false" in compile_error(doc, demo_models)


@pytest.mark.parametrize("per_pair", [False, True])
def test_a_batch_of_several_requests_scores_the_reference_per_request_and_per_pair(
        demo_bundle, demo_trace, trace_scores, per_pair):
    # The stage processors in one process, as a fused worker runs them, on a micro-batch of 3 requests:
    # per pair (pipeline structured = false) every user column has a row per candidate.
    from jizhi.bundle import Bundle
    from jizhi.workers.builtins import load_class
    from jizhi.workers.stage import Batch
    bundle = Bundle(demo_bundle)
    config = {"on_unknown": "default", "per_pair": per_pair, "structured": "off" if per_pair else "on"}
    stages = []
    for proc in ("data_reader", "feature_processor", "cube_accessor", "model_inference", "ranker"):
        st = load_class(proc)()
        st.setup(dict(config), bundle)
        stages.append(st)
    q = [0, 1, 2]
    offsets = np.concatenate([[0], np.cumsum([len(demo_trace[i][1]) for i in q])]).astype(np.int64)
    batch = Batch(np.array([demo_trace[i][0] for i in q], np.uint64), np.full(3, 10, np.int64), np.zeros(3, bool),
                  np.full(3, np.inf), offsets, {"item_ids": np.concatenate([demo_trace[i][1] for i in q]),
                                                "recall_scores": np.concatenate([demo_trace[i][2] for i in q])})
    for st in stages:
        batch.columns.update(st.process(batch))
    assert batch["user_emb"].shape[0] == (offsets[-1] if per_pair else 3)
    for i in q:
        np.testing.assert_allclose(batch["score"][offsets[i]:offsets[i + 1]], trace_scores[i], rtol=0, atol=1e-5)
    assert batch.counts["missing_signatures"].shape == (3,)


@pytest.mark.parametrize("per_pair", [False, True])
def test_a_request_left_without_candidates_in_a_narrowed_batch_counts_zero(demo_bundle, demo_trace, per_pair):
    # The query cache drops every candidate of some requests (all hits): the stages after it see
    # requests with no candidate, the last one included, and must count 0 for them.
    from jizhi.bundle import Bundle
    from jizhi.workers.builtins import load_class
    from jizhi.workers.stage import CANDIDATE, Batch, Selection
    bundle = Bundle(demo_bundle)
    config = {"on_unknown": "default", "per_pair": per_pair, "structured": "off" if per_pair else "on"}
    stages = []
    for proc in ("data_reader", "feature_processor", "cube_accessor", "model_inference"):
        st = load_class(proc)()
        st.setup(dict(config), bundle)
        stages.append(st)
    q = [0, 1, 2]
    offsets = np.concatenate([[0], np.cumsum([len(demo_trace[i][1]) for i in q])]).astype(np.int64)
    items = np.concatenate([demo_trace[i][1] for i in q])
    items[offsets[1]] = np.uint64(2 ** 63 + 5)      # an unknown item in request 1
    batch = Batch(np.array([demo_trace[i][0] for i in q], np.uint64), np.full(3, 10, np.int64), np.zeros(3, bool),
                  np.full(3, np.inf), offsets, {"item_ids": items,
                                                "recall_scores": np.concatenate([demo_trace[i][2] for i in q])})
    Selection(batch, {"item_ids": CANDIDATE, "recall_scores": CANDIDATE}).select(
        np.arange(offsets[1], offsets[1] + 7))       # request 1 keeps 7 candidates, requests 0 and 2 none
    for st in stages:
        batch.columns.update(st.process(batch))
    assert batch.counts["unknown_items"].tolist() == [0, 1, 0]
    assert batch.counts["missing_signatures"][[0, 2]].tolist() == [0, 0]
    assert batch["score"].shape == (7,)


def test_a_next_stage_that_is_not_defined_is_refused(demo_models):
    doc = demo_dag(edges={"cube": ["dnn", "shedder"]}).doc
    assert compile_error(doc, demo_models) == "stage 'cube': next stage 'shedder' is not defined"


def test_a_stage_naming_a_model_the_bundle_lacks_is_refused(demo_models):
    doc = demo_dag().doc
    doc["stage"][3]["model"] = "ctr_v2"
    assert compile_error(doc, demo_models) == \
        f"stage 'dnn' names model 'ctr_v2', which the model directory cannot serve: model 'ctr_v2' not found in {demo_models}"


def test_a_missing_model_is_refused_naming_the_pipeline_and_the_model(demo_models):
    doc = demo_dag(name="mine").doc
    doc["model"] = "ctr_v2"
    assert compile_error(doc, demo_models) == \
        f"pipeline 'mine': model 'ctr_v2': model 'ctr_v2' not found in {demo_models}"


def test_a_missing_model_version_is_refused(demo_models):
    doc = demo_dag(name="mine", version=7).doc
    message = compile_error(doc, demo_models)
    assert message.startswith("pipeline 'mine': model 'demo': model 'demo' has no version 7 in ")


def test_a_fusion_that_makes_a_cycle_is_refused_naming_the_fused_group(demo_models):
    # reader and cube in one process, features outside: group -> features -> group.
    p = demo_dag().fuse("front", ["reader", "cube"])
    message = compile_error(p.doc, demo_models)
    assert message.startswith("fusing stages makes a cycle between groups: group 'front' is on a cycle"), message


def test_fusing_an_undefined_stage_or_a_stage_twice_is_refused(demo_models):
    p = demo_dag().fuse("front", ["reader", "shedder"])
    assert compile_error(p.doc, demo_models) == "fuse 'front': stage 'shedder' is not defined"
    p = demo_dag().fuse("a", ["reader", "features"]).fuse("b", ["features", "cube"])
    assert compile_error(p.doc, demo_models) == "stage 'features' is fused into both 'a' and 'b'"


def test_batch_wait_ms_is_checked_and_carried_to_the_group(demo_models):
    p = demo_dag().fuse("scorer", ["reader", "features", "cube", "dnn", "rank"], batch=8, batch_wait_ms=3)
    plan = compile_pipeline(p.doc, demo_models)
    assert plan["groups"]["scorer"]["batch_wait_ms"] == 3.0
    assert plan["groups"]["scorer"]["batch"] == 8
    p = demo_dag().fuse("scorer", ["reader", "features", "cube", "dnn", "rank"], batch_wait_ms=500)
    assert compile_error(p.doc, demo_models) == \
        "stage 'scorer': batch_wait_ms must be a number of milliseconds from 0 to 100, got 500"


def test_a_pipeline_must_end_in_one_ranking_stage(demo_models):
    doc = demo_dag(edges={"dnn": []}).doc
    assert compile_error(doc, demo_models) == "pipeline 'p' must end in exactly one stage, has 2: rank, dnn"
    doc = demo_dag(order=["reader", "features", "cube", "dnn"]).doc
    doc["stage"][-1]["next"] = []
    assert compile_error(doc, demo_models) == \
        "stage 'dnn' ends the pipeline but does not output 'order' (use ranker)"


def test_malformed_stage_options_are_refused_naming_the_stage(demo_models):
    doc = demo_dag().doc
    doc["stage"].append(dict(doc["stage"][0]))
    assert compile_error(doc, demo_models) == "stage 'reader' is defined twice"
    doc = demo_dag().doc
    doc["stage"][2]["pool"] = 0
    assert compile_error(doc, demo_models) == "stage 'cube': pool must be an integer >= 1, got 0"
    assert compile_error(demo_dag(on_unknown="ignore").doc, demo_models) == \
        "pipeline 'p': on_unknown must be one of default, drop, reject"
    doc = demo_dag().doc
    doc["stage"] = []
    assert compile_error(doc, demo_models) == "pipeline 'p' has no [[stage]]"


def test_a_pipeline_file_that_is_missing_or_not_toml_is_refused(tmp_path):
    with pytest.raises(PipelineError) as e:
        read_pipeline(str(tmp_path / "absent.toml"))
    assert str(e.value) == f"pipeline '{tmp_path / 'absent.toml'}': no file {tmp_path / 'absent.toml'}"
    broken = write_text(tmp_path / "broken.toml", "name = \n")
    with pytest.raises(PipelineError) as e:
        read_pipeline(str(broken))
    assert str(e.value).startswith(f"pipeline file {broken} is not valid TOML")


def test_jizhid_refuses_a_bad_pipeline_with_exit_code_2_and_creates_nothing(tmp_path, demo_models):
    doc_text = demo_pipeline_text("cyclic", fused=False).replace(
        'name = "cube"\nprocessor = "cube_accessor"\nnext = ["dnn"]',
        'name = "cube"\nprocessor = "cube_accessor"\nnext = ["dnn", "features"]')
    assert 'next = ["dnn", "features"]' in doc_text
    pipeline = write_text(tmp_path / "cyclic.toml", doc_text)
    config = write_text(tmp_path / "jizhi.toml", '[metrics]\nlisten = ""\n')
    instance = f"t{os.getpid()}bad"
    run_dir = tmp_path / "run"
    r = subprocess.run([str(JIZHID), "--models", str(demo_models), "--instance", instance, "--frontend",
                        "tcp://127.0.0.1:1", "--pipelines", str(pipeline), "--run-dir", str(run_dir),
                        "--config", str(config)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert "jizhid: stage 'features' is on a cycle" in r.stderr
    assert shm_segments(instance) == []
    assert processes_mentioning(str(run_dir)) == {}


# ---------------------------------------------------------------------------
# Valid pipelines


def test_a_python_built_fused_pipeline_compiles_to_one_worker_kind(demo_models):
    p = demo_dag(name="built").fuse("scorer", [s for s, _, _ in FLOW], pool=3, batch=6)
    plan = compile_pipeline(p.doc, demo_models)
    assert (plan["name"], plan["model"], plan["version"], plan["on_unknown"]) == ("built", "demo", 1, "default")
    assert plan["stage_order"] == ["reader", "features", "cube", "dnn", "rank"]
    assert list(plan["groups"]) == ["scorer"]
    scorer = plan["groups"]["scorer"]
    assert (scorer["stages"], scorer["pool"], scorer["batch"]) == (plan["stage_order"], 3, 6)
    assert (scorer["prev"], scorer["next"], scorer["reads"], scorer["writes"]) == ([], [], ["item_ids"],
                                                                                   ["order", "out_scores"])
    assert (plan["sources"], plan["sink"]) == (["scorer"], "scorer")
    assert sorted(plan["arenas"]) == ["item_ids", "order", "out_scores", "recall_scores"]


def test_a_python_built_unfused_pipeline_puts_every_crossing_column_in_shared_memory(demo_models):
    plan = compile_pipeline(demo_dag(name="built").doc, demo_models)
    assert plan["group_order"] == ["reader", "features", "cube", "dnn", "rank"]
    assert (plan["sources"], plan["sink"]) == (["reader"], "rank")
    assert plan["groups"]["cube"]["prev"] == ["features"]
    assert plan["groups"]["cube"]["next"] == ["dnn"]
    assert sorted(plan["groups"]["cube"]["reads"]) == ["item_lens", "item_sigs", "user_lens", "user_sigs"]
    assert sorted(plan["arenas"]) == sorted([
        "item_ids", "recall_scores", "user_values", "user_lens", "user_sigs", "item_sigs", "item_lens",
        "dense", "user_emb", "item_emb", "score", "keep", "order", "out_scores"])
    assert plan["arenas"]["item_emb"]["scope"] == "candidate"
    assert plan["arenas"]["user_emb"]["scope"] == "request"


def test_a_user_processor_named_by_import_path_compiles(demo_models):
    p = Pipeline("recall", model="demo")
    p.stage("recall", "tests.stages:RecallAsScore", next=["rank"])
    p.stage("rank", "ranker")
    plan = compile_pipeline(p.doc, demo_models)
    assert plan["stages"]["recall"]["class"] == "tests.stages:RecallAsScore"
    assert plan["arenas"]["score"] == {"scope": "candidate", "dtype": "float32", "shape": []}


# ---------------------------------------------------------------------------
# User processors, served by jizhid


CUSTOM = {
    "recall": """
name = "recall"
model = "demo"
[[stage]]
name = "recall"
processor = "tests.stages:RecallAsScore"
next = ["rank"]
[[stage]]
name = "rank"
processor = "ranker"
""",
    "recall_sink": """
name = "recall_sink"
model = "demo"
[[stage]]
name = "rank"
processor = "tests.stages:RecallRanker"
batch = 2
""",
    "joined": """
name = "joined"
model = "demo"
on_unknown = "drop"
# Two sources joined at the ranker: keep (reader) and score (recall).
[[stage]]
name = "reader"
processor = "data_reader"
next = ["rank"]
[[stage]]
name = "recall"
processor = "tests.stages:RecallAsScore"
next = ["rank"]
[[stage]]
name = "rank"
processor = "ranker"
""",
    "exploding": """
name = "exploding"
model = "demo"
[[stage]]
name = "rank"
processor = "tests.stages:ExplodingRanker"
batch = 1
explode_user = 13
""",
}


@pytest.fixture(scope="module")
def custom(launch_module, tmp_path_factory):
    d = tmp_path_factory.mktemp("custom-pipelines")
    return launch_module.start(pipelines=[write_text(d / f"{n}.toml", t) for n, t in CUSTOM.items()])


@pytest.fixture(scope="module")
def custom_client(custom):
    return custom.client()


@pytest.mark.parametrize("pipeline", ["recall", "recall_sink"])
def test_a_user_processor_serves_the_top_k_of_recall_scores(custom_client, demo_trace, pipeline):
    for q in range(4):
        user, items, recall = demo_trace[q]
        r = custom_client.score(user, items, recall, pipeline=pipeline, top_k=15, deadline_ms=30_000)
        assert r["model_versions"] == {"demo": 1}
        assert_topk(r, items, recall, 15, atol=0)
        r = custom_client.score(user, items, recall, pipeline=pipeline, ret="all", deadline_ms=30_000)
        assert np.array_equal(r.item_ids, items)
        assert np.array_equal(r.scores, recall)


def test_a_join_of_two_source_stages_ranks_with_columns_from_both(custom_client, demo_trace, reference):
    user, items, recall = demo_trace[5]
    where = np.array([3, 40, 41, 299])
    items[where] = unknown_ids(reference, where.shape[0], seed=9)
    expected = recall.copy()
    expected[where] = np.nan
    r = custom_client.score(user, items, recall, pipeline="joined", ret="all", deadline_ms=30_000)
    assert r["unknown_items"] == 4
    assert np.array_equal(r.scores, expected, equal_nan=True)
    r = custom_client.score(user, items, recall, pipeline="joined", top_k=20, deadline_ms=30_000)
    assert_topk(r, items, expected, 20, atol=0)


def test_a_stage_that_raises_fails_only_its_request_and_its_worker_keeps_serving(custom, custom_client, demo_trace):
    workers = custom.workers("exploding")
    user, items, recall = demo_trace[6]
    with pytest.raises(RequestError) as e:
        custom_client.score(13, items, recall, pipeline="exploding", deadline_ms=30_000)
    assert e.value.code == INTERNAL
    assert "exploding on user 13" in e.value.message
    r = custom_client.score(user, items, recall, pipeline="exploding", top_k=5, deadline_ms=30_000)
    assert_topk(r, items, recall, 5, atol=0)
    assert custom.workers("exploding") == workers
