"""jizhid on the demo bundle, over a real socket, against the reference scorer."""
import os

import numpy as np
import pytest
import zmq

from conftest import assert_topk, demo_pipeline_text, unknown_ids, write_text
from jizhi import protocol

# demo runs its dense graph through the structured-features pass (the default); demo_per_pair (pipeline
# structured = false, unfused) moves the user's columns per pair through every stage and runs the naive
# per-pair graph; legacy scores one sample per pair; demo_pinned is a session group (its workers pinned
# to core 0, two intra-op threads) running the per-pair graph on per-request columns (dnn structured = "off");
# demo_itemcache reads the item-only part of its graph from a table built per item when the worker starts
# (dnn item_cache = true, jizhi/graph/itemside.py).
PIPELINES = ("demo", "demo_unfused", "legacy", "demo_per_pair", "demo_pinned", "demo_itemcache")
REQUESTS = (0, 1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def server(launch_module, tmp_path_factory):
    d = tmp_path_factory.mktemp("pipelines")
    per_pair = demo_pipeline_text("demo_per_pair", fused=False)
    write_text(d / "demo_per_pair.toml", per_pair.replace('on_unknown = "default"', 'on_unknown = "default"\nstructured = false'))
    write_text(d / "demo_pinned.toml", demo_pipeline_text(
        "demo_pinned", options={"dnn": ["intra_op_threads = 2", 'structured = "off"']}) + "cores = [0]\n")
    write_text(d / "demo_itemcache.toml", demo_pipeline_text("demo_itemcache", options={"dnn": ["item_cache = true"]}))
    return launch_module.start(pipelines=list(PIPELINES[:3]) + [d / "demo_per_pair.toml", d / "demo_pinned.toml",
                                                                d / "demo_itemcache.toml"])


def test_a_session_group_runs_its_workers_on_its_cores_only(server, client, demo_trace):
    user, items, recall = demo_trace[0]
    assert client.score(user, items, recall, pipeline="demo_pinned", deadline_ms=30_000)["status"] == "ok"
    pinned = server.workers("demo_pinned")
    assert pinned
    for pid in pinned:
        threads = os.listdir(f"/proc/{pid}/task")
        assert {frozenset(os.sched_getaffinity(int(t))) for t in threads} == {frozenset({0})}
    others = server.workers("demo")
    assert others and all(os.sched_getaffinity(pid) == os.sched_getaffinity(0) for pid in others)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipeline_returns_the_reference_top_k_of_several_trace_requests(
        client, demo_trace, trace_scores, pipeline):
    for q in REQUESTS:
        user, items, recall = demo_trace[q]
        r = client.score(user, items, recall, pipeline=pipeline, top_k=10, deadline_ms=30_000)
        assert r["status"] == "ok"
        assert_topk(r, items, trace_scores[q], 10)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_return_all_gives_every_candidate_its_reference_score_in_request_order(
        client, demo_trace, trace_scores, pipeline):
    for q in REQUESTS[:3]:
        user, items, recall = demo_trace[q]
        r = client.score(user, items, recall, pipeline=pipeline, ret="all", deadline_ms=30_000)
        assert np.array_equal(r.item_ids, items)
        np.testing.assert_allclose(r.scores, trace_scores[q], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_reply_names_the_model_version_counts_and_timings(client, demo_trace, pipeline):
    user, items, recall = demo_trace[6]
    r = client.score(user, items, recall, pipeline=pipeline, top_k=5, deadline_ms=30_000)
    assert r["model_versions"] == {"demo": 1}
    assert r["unknown_items"] == 0
    assert isinstance(r["missing_signatures"], int)
    assert r["timings_us"]["total"] > 0
    assert r["id"] is not None


def test_the_item_table_is_built_and_unknown_items_are_computed_in_the_batch(server, client, demo_trace, reference):
    n = reference.profiles["item"]["ids"].shape[0]
    assert f"item_cache: {n} items x 256 floats (top0.mm.pair.item) in {n * 256 * 4 / 2**20:.0f} MiB" in server.log_text()
    user, items, recall = demo_trace[8]
    where = np.random.default_rng(8).choice(items.shape[0], size=25, replace=False)
    items[where] = unknown_ids(reference, 25, seed=8)
    expected, unknown = reference.score(user, items)
    assert unknown == 25
    r = client.score(user, items, recall, pipeline="demo_itemcache", ret="all", deadline_ms=30_000)
    assert r["unknown_items"] == 25
    np.testing.assert_allclose(r.scores, expected, rtol=0, atol=1e-5)
    r = client.score(user, items, recall, pipeline="demo_itemcache", top_k=40, deadline_ms=30_000)
    assert_topk(r, items, expected, 40)


def test_a_top_k_larger_than_the_request_returns_every_candidate_best_first(client, demo_trace, trace_scores):
    user, items, recall = demo_trace[7]
    r = client.score(user, items, recall, top_k=10 * items.shape[0], deadline_ms=30_000)
    assert_topk(r, items, trace_scores[7], items.shape[0])


def test_requests_without_recall_scores_are_scored_the_same(client, demo_trace, trace_scores):
    user, items, _ = demo_trace[8]
    r = client.score(user, items, None, top_k=10, deadline_ms=30_000)
    assert_topk(r, items, trace_scores[8], 10)


def test_the_default_pipeline_is_the_first_one_served(client, demo_trace, trace_scores):
    user, items, recall = demo_trace[9]
    r = client.score(user, items, recall, pipeline="default", top_k=10, deadline_ms=30_000)
    assert_topk(r, items, trace_scores[9], 10)
    assert client.info()["default_pipeline"] == "demo"


def test_a_dealer_client_with_the_empty_delimiter_gets_the_same_answers_as_req(
        server, client, demo_trace, trace_scores):
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    try:
        # Pipelined: three requests on the wire before any reply; replies are matched by id.
        for q in (10, 11, 12):
            user, items, recall = demo_trace[q]
            dealer.send_multipart([b""] + protocol.encode_request(
                id=f"dealer-{q}", pipeline="demo", user=user, item_ids=items, recall_scores=recall,
                top_k=10, ret="all", deadline_ms=30_000))
        replies = {}
        for _ in range(3):
            assert dealer.poll(30_000), "no reply to a DEALER request"
            frames = dealer.recv_multipart()
            assert frames[0] == b""
            header, arrays = protocol.decode_reply(frames[1:])
            replies[header["id"]] = (header, arrays)
    finally:
        dealer.close(0)
    assert sorted(replies) == ["dealer-10", "dealer-11", "dealer-12"]
    for q in (10, 11, 12):
        header, arrays = replies[f"dealer-{q}"]
        user, items, recall = demo_trace[q]
        via_req = client.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=30_000)
        assert header["status"] == "ok"
        assert header["model_versions"] == {"demo": 1}
        assert np.array_equal(arrays["item_ids"], items)
        assert np.array_equal(arrays["item_ids"], via_req.item_ids)
        np.testing.assert_allclose(arrays["scores"], via_req.scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose(arrays["scores"], trace_scores[q], rtol=0, atol=1e-5)


def test_ping_answers_pong_with_the_request_id(client):
    r = client.request("ping", id="p-1")
    assert r.header == {"v": 1, "status": "ok", "id": "p-1", "pong": True}


def test_info_describes_every_pipeline_and_its_worker_pools(client):
    info = client.info()
    assert info["status"] == "ok"
    assert info["ready"] is True
    assert info["draining"] is False
    assert sorted(info["pipelines"]) == sorted(PIPELINES)
    demo = info["pipelines"]["demo"]
    assert (demo["model"], demo["version"], demo["ready"]) == ("demo", 1, True)
    assert sorted(demo["groups"]) == ["scorer"]
    assert demo["groups"]["scorer"]["workers"] == 2
    assert demo["groups"]["scorer"]["stages"] == ["reader", "features", "cube", "dnn", "rank"]
    unfused = info["pipelines"]["demo_unfused"]
    assert sorted(unfused["groups"]) == ["cube", "dnn", "features", "rank", "reader"]
    assert {g: v["workers"] for g, v in unfused["groups"].items()} == \
        {"reader": 1, "features": 1, "cube": 1, "dnn": 2, "rank": 1}
    assert info["pipelines"]["legacy"]["groups"]["legacy"]["workers"] == 2
