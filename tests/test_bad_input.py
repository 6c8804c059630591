"""Malformed and awkward requests get their documented codes; the server keeps serving.

One jizhid serves three pipelines of the demo DAG that differ only in
``on_unknown`` (default, drop, reject); a second one has a tiny
``limits.default_deadline_ms`` and two request slots.
"""
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_topk, demo_pipeline_text, unknown_ids, wait_until, write_text
from jizhi import protocol
from jizhi.cube.signature import sign
from jizhi.errors import BAD_REQUEST, DEADLINE_EXCEEDED, OVERLOADED, UNKNOWN_PIPELINE, RequestError

MAX_CANDIDATES = 2000  # limits.max_candidates default


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipelines")
    for name, on_unknown in (("drop", "drop"), ("reject", "reject")):
        write_text(d / f"{name}.toml", demo_pipeline_text(name, on_unknown=on_unknown))
    write_text(d / "impatient.toml", demo_pipeline_text("impatient"))
    # Its ranker sleeps 50 ms per batch: requests hold their slots long enough to overload two of them.
    write_text(d / "impatient_slow.toml", demo_pipeline_text(
        "impatient_slow", processors={"rank": "tests.stages:SleepyRanker"}, options={"rank": ["sleep_s = 0.05"]}))
    return d


@pytest.fixture(scope="module")
def server(launch_module, pipeline_dir):
    return launch_module.start(pipelines=["demo", pipeline_dir / "drop.toml", pipeline_dir / "reject.toml"])


@pytest.fixture(scope="module")
def first_workers(server):
    """The worker processes as they were before any bad input arrived."""
    return server.workers()


@pytest.fixture(scope="module")
def client(server, first_workers):
    return server.client()


def valid_request(demo_trace, q=0):
    user, items, recall = demo_trace[q]
    frames = protocol.encode_request(id=f"bad-{q}", pipeline="demo", user=user, item_ids=items,
                                     recall_scores=recall, top_k=10, deadline_ms=30_000)
    return protocol.unpackb(frames[0]), [bytes(memoryview(f)) for f in frames[1:]]


def send(client, header, frames):
    reply, _ = protocol.decode_reply(client.call([protocol.packb(header)] + list(frames)))
    return reply


def assert_error(reply, code):
    assert reply["status"] == "error", reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"]


# ---------------------------------------------------------------------------
# Garbage


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_bytes_are_answered_bad_request(client, frames):
    reply, _ = protocol.decode_reply(client.call(frames))
    assert_error(reply, BAD_REQUEST)


@pytest.mark.parametrize("value", [[1, 2, 3], 7, "score", None, b"\x00\x01", 1.5])
def test_a_msgpack_value_that_is_not_a_map_is_bad_request(client, value):
    reply, _ = protocol.decode_reply(client.call([protocol.packb(value)]))
    assert_error(reply, BAD_REQUEST)
    assert reply["message"] == "frame 0 is not a msgpack map"


def test_a_truncated_array_frame_is_bad_request(client, demo_trace):
    header, frames = valid_request(demo_trace)
    reply = send(client, header, [frames[0][:-3], frames[1]])
    assert_error(reply, BAD_REQUEST)
    assert "item_ids frame has" in reply["message"]
    reply = send(client, header, [frames[0][:-8], frames[1]])
    assert_error(reply, BAD_REQUEST)


def test_an_array_frame_count_that_differs_from_the_header_is_bad_request(client, demo_trace):
    header, frames = valid_request(demo_trace)
    assert_error(send(client, header, frames[:1]), BAD_REQUEST)
    assert_error(send(client, header, frames + [frames[1]]), BAD_REQUEST)
    assert_error(send(client, header, []), BAD_REQUEST)


@pytest.mark.parametrize("array, dtype", [(0, "float64"), (0, "int64"), (0, "uint32"), (1, "float64"),
                                          (1, "float16"), (0, None), (0, 5)])
def test_a_wrong_dtype_is_bad_request(client, demo_trace, array, dtype):
    header, frames = valid_request(demo_trace)
    header["arrays"][array]["dtype"] = dtype
    reply = send(client, header, frames)
    assert_error(reply, BAD_REQUEST)
    assert "must have dtype" in reply["message"]


@pytest.mark.parametrize("shape", [[150, 2], [2, 150], [], [300, 1], [-300], ["300"], [300.0], [True], None, 300])
def test_a_shape_that_is_not_one_dimensional_is_bad_request(client, demo_trace, shape):
    header, frames = valid_request(demo_trace)
    header["arrays"][0]["shape"] = shape
    reply = send(client, header, frames)
    assert_error(reply, BAD_REQUEST)
    assert reply["message"] == "array item_ids must have shape [N]"


def test_a_length_in_the_header_that_differs_from_the_frame_is_bad_request(client, demo_trace):
    header, frames = valid_request(demo_trace)
    n = header["arrays"][0]["shape"][0]
    for wrong in (n - 1, n + 1, 0):
        h = dict(header, arrays=[dict(header["arrays"][0], shape=[wrong]), header["arrays"][1]])
        assert_error(send(client, h, frames), BAD_REQUEST)


def test_recall_scores_of_another_length_than_item_ids_are_bad_request(client, demo_trace):
    header, frames = valid_request(demo_trace)
    n = header["arrays"][1]["shape"][0]
    header["arrays"][1]["shape"] = [n - 1]
    reply = send(client, header, [frames[0], frames[1][:-4]])
    assert_error(reply, BAD_REQUEST)
    assert reply["message"] == "recall_scores and item_ids differ in length"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_recall_scores_are_bad_request(client, demo_trace, bad):
    user, items, recall = demo_trace[0]
    recall[17] = bad
    with pytest.raises(RequestError) as e:
        client.score(user, items, recall, deadline_ms=30_000)
    assert e.value.code == BAD_REQUEST
    assert e.value.message == "recall_scores has NaN or infinite values"


@pytest.mark.parametrize("field, value", [
    ("v", 2), ("op", "launch"), ("op", None), ("user", -1), ("user", "42"), ("user", 1.5), ("user", True),
    ("user", None), ("top_k", 0), ("top_k", -3), ("top_k", True), ("top_k", 2.5), ("return", "some"),
    ("context", [1]), ("pipeline", 7), ("id", 1.5), ("id", [1]), ("arrays", None), ("arrays", "item_ids"),
    ("deadline_ms", 0), ("deadline_ms", -5), ("deadline_ms", 600_001), ("deadline_ms", "soon"),
    ("deadline_ms", True), ("deadline_ms", float("nan")),
])
def test_a_malformed_header_field_is_bad_request(client, demo_trace, field, value):
    header, frames = valid_request(demo_trace)
    header[field] = value
    assert_error(send(client, header, frames), BAD_REQUEST)


def test_missing_or_empty_or_duplicate_arrays_are_bad_request(client, demo_trace):
    header, frames = valid_request(demo_trace)
    only_recall = dict(header, arrays=[header["arrays"][1]])
    assert_error(send(client, only_recall, [frames[1]]), BAD_REQUEST)
    empty = dict(header, arrays=[{"name": "item_ids", "dtype": "uint64", "shape": [0]}])
    assert_error(send(client, empty, [b""]), BAD_REQUEST)
    twice = dict(header, arrays=[header["arrays"][0], header["arrays"][0]])
    assert_error(send(client, twice, [frames[0], frames[0]]), BAD_REQUEST)
    stranger = dict(header, arrays=[header["arrays"][0], dict(header["arrays"][1], name="weights")])
    assert_error(send(client, stranger, frames), BAD_REQUEST)


def test_a_dealer_message_without_the_empty_delimiter_is_answered_bad_request(server, demo_trace):
    header, frames = valid_request(demo_trace)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    try:
        dealer.send_multipart([protocol.packb(header)] + frames)
        assert dealer.poll(10_000), "no reply to a DEALER message without a delimiter"
        reply = dealer.recv_multipart()
    finally:
        dealer.close(0)
    assert reply[0] == b""
    assert_error(protocol.unpackb(reply[1]), BAD_REQUEST)


def test_every_malformed_message_is_counted_once(client):
    before = client.info()["malformed"]
    for frames in ([b"\xc1"], [protocol.packb([1])], [protocol.packb({"op": "nope"})],
                   [protocol.packb({"op": "score", "user": 1, "arrays": []})]):
        assert_error(protocol.decode_reply(client.call(frames))[0], BAD_REQUEST)
    assert client.info()["malformed"] == before + 4


# ---------------------------------------------------------------------------
# Limits, pipelines, deadlines


def test_an_unknown_pipeline_is_unknown_pipeline(client, demo_trace):
    user, items, recall = demo_trace[0]
    with pytest.raises(RequestError) as e:
        client.score(user, items, recall, pipeline="nosuch", deadline_ms=30_000)
    assert e.value.code == UNKNOWN_PIPELINE
    assert "'nosuch'" in e.value.message


def test_ten_times_the_candidate_limit_is_bad_request(client, reference):
    items = reference.profiles["item"]["ids"][:10 * MAX_CANDIDATES]
    with pytest.raises(RequestError) as e:
        client.score(1, items, deadline_ms=30_000)
    assert e.value.code == BAD_REQUEST
    assert e.value.message == f"{10 * MAX_CANDIDATES} candidates is over the limit of {MAX_CANDIDATES}"
    with pytest.raises(RequestError) as e:
        client.score(1, reference.profiles["item"]["ids"][:MAX_CANDIDATES + 1], deadline_ms=30_000)
    assert e.value.code == BAD_REQUEST


def test_exactly_the_candidate_limit_is_scored_like_the_reference(client, reference, demo_trace):
    user = demo_trace[0][0]
    items = reference.profiles["item"]["ids"][5000:5000 + MAX_CANDIDATES]
    expected, _ = reference.score(user, items)
    r = client.score(user, items, top_k=20, deadline_ms=30_000)
    assert_topk(r, items, expected, 20)


def test_an_expired_deadline_is_deadline_exceeded(client, demo_trace):
    user, items, recall = demo_trace[0]
    with pytest.raises(RequestError) as e:
        client.score(user, items, recall, deadline_ms=0.001)
    assert e.value.code == DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def impatient(launch_module, pipeline_dir):
    """A second jizhid: a tiny default deadline, only two request slots and a line of four for them."""
    return launch_module.start(pipelines=[pipeline_dir / "impatient.toml", pipeline_dir / "impatient_slow.toml"],
                               config_text="[limits]\ndefault_deadline_ms = 0.001\nmax_in_flight = 2\nmax_waiting = 4\n")


def test_a_tiny_default_deadline_in_the_config_applies_to_requests_that_name_none(
        impatient, demo_trace, trace_scores):
    c = impatient.client()
    user, items, recall = demo_trace[1]
    for _ in range(3):
        with pytest.raises(RequestError) as e:
            c.score(user, items, recall)
        assert e.value.code == DEADLINE_EXCEEDED
    r = c.score(user, items, recall, deadline_ms=30_000)
    assert_topk(r, items, trace_scores[1], 10)
    wait_until(lambda: impatient.info()["pipelines"]["impatient"]["in_flight"] == 0, 10,
               what="every slot to be free again")


def test_past_the_slots_requests_wait_in_line_and_past_the_line_are_overloaded_with_a_retry_hint(
        impatient, demo_trace, trace_scores):
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(impatient.endpoint)
    sent = 20
    # Encoded first, then sent back to back: 20 arrive while the first 2 (max_in_flight) sleep in the ranker;
    # 4 (max_waiting) wait for them.
    before = impatient.info()["pipelines"]["impatient_slow"]
    messages = [[b""] + protocol.encode_request(
        id=i, pipeline="impatient_slow", user=demo_trace[i % 8][0], item_ids=demo_trace[i % 8][1],
        recall_scores=demo_trace[i % 8][2], ret="all", deadline_ms=30_000) for i in range(sent)]
    try:
        for m in messages:
            dealer.send_multipart(m)
        replies = []
        for _ in range(sent):
            assert dealer.poll(30_000), "a request got no answer"
            frames = dealer.recv_multipart()
            replies.append(protocol.decode_reply(frames[1:]))
    finally:
        dealer.close(0)
    assert sorted(h["id"] for h, _ in replies) == list(range(sent))
    outcomes = {"ok": 0, OVERLOADED: 0}
    for header, arrays in replies:
        if header["status"] == "ok":
            np.testing.assert_array_equal(arrays["scores"], demo_trace[header["id"] % 8][2])   # recall order
        else:
            assert header["code"] == OVERLOADED, header
            assert isinstance(header["retry_after_ms"], int) and header["retry_after_ms"] > 0, header
        outcomes[header["status"] == "ok" and "ok" or header["code"]] += 1
    assert outcomes["ok"] >= 6 and outcomes[OVERLOADED] >= 1, outcomes
    after = wait_until(lambda: (lambda p: p if p["in_flight"] == 0 else None)(
        impatient.info()["pipelines"]["impatient_slow"]), 10, what="every slot to be free again")
    assert after["waiting"] == 0
    assert after["waited"] - before["waited"] >= 4
    assert after["refused"] - before["refused"] == outcomes[OVERLOADED]


def test_a_top_k_beyond_int64_ranks_every_candidate_without_killing_a_worker(
        server, client, first_workers, demo_trace, trace_scores):
    user, items, recall = demo_trace[2]
    r = client.score(user, items, recall, top_k=2 ** 64 - 1, deadline_ms=5_000)
    assert_topk(r, items, trace_scores[2], items.shape[0])
    assert server.workers() == first_workers


# ---------------------------------------------------------------------------
# Unknown items, unknown users, missing signatures


def with_unknown(demo_trace, reference, q, count, seed):
    user, items, recall = demo_trace[q]
    where = np.random.default_rng(seed).choice(items.shape[0], size=count, replace=False)
    items[where] = unknown_ids(reference, count, seed)
    return user, items, recall, np.sort(where)


def test_unknown_items_are_scored_with_default_vectors_and_counted(client, demo_trace, reference):
    user, items, recall, where = with_unknown(demo_trace, reference, 3, 25, seed=1)
    expected, unknown = reference.score(user, items)
    assert unknown == 25
    r = client.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=30_000)
    assert r["unknown_items"] == 25
    assert np.array_equal(r.item_ids, items)
    np.testing.assert_allclose(r.scores, expected, rtol=0, atol=1e-5)
    r = client.score(user, items, recall, pipeline="demo", top_k=40, deadline_ms=30_000)
    assert r["unknown_items"] == 25
    assert_topk(r, items, expected, 40)


def test_dropped_unknown_items_are_nan_under_return_all_and_absent_from_the_top_k(
        client, demo_trace, reference):
    user, items, recall, where = with_unknown(demo_trace, reference, 4, 30, seed=2)
    expected, _ = reference.score(user, items)
    expected[where] = np.nan
    r = client.score(user, items, recall, pipeline="drop", ret="all", deadline_ms=30_000)
    assert r["unknown_items"] == 30
    assert np.array_equal(r.item_ids, items)
    assert np.array_equal(np.flatnonzero(np.isnan(r.scores)), where)
    np.testing.assert_allclose(r.scores, expected, rtol=0, atol=1e-5)  # NaN positions must match too
    r = client.score(user, items, recall, pipeline="drop", top_k=items.shape[0], deadline_ms=30_000)
    assert r["unknown_items"] == 30
    assert not np.isin(r.item_ids, items[where]).any()
    assert_topk(r, items, expected, items.shape[0])


def test_a_request_of_only_unknown_items_under_drop_returns_an_empty_top_k(client, reference):
    items = unknown_ids(reference, 50, seed=3)
    r = client.score(5, items, pipeline="drop", top_k=10, deadline_ms=30_000)
    assert r["status"] == "ok"
    assert r["unknown_items"] == 50
    assert r.item_ids.shape == (0,) and r.scores.shape == (0,)


def test_unknown_items_under_reject_are_bad_request(client, demo_trace, reference, trace_scores):
    user, items, recall, _ = with_unknown(demo_trace, reference, 5, 1, seed=4)
    with pytest.raises(RequestError) as e:
        client.score(user, items, recall, pipeline="reject", deadline_ms=30_000)
    assert e.value.code == BAD_REQUEST
    assert "unknown item" in e.value.message
    user, items, recall = demo_trace[5]
    r = client.score(user, items, recall, pipeline="reject", deadline_ms=30_000)
    assert r["unknown_items"] == 0
    assert_topk(r, items, trace_scores[5], 10)


def test_an_unknown_user_is_scored_with_default_features_and_counted(client, demo_trace, reference):
    _, items, recall = demo_trace[6]
    known_users = reference.profiles["user"]["ids"]
    user = 12345
    assert not np.isin(np.uint64(user), known_users)
    expected, _ = reference.score(user, items)
    before = client.info()["pipelines"]["demo"]["unknown_users"]
    r = client.score(user, items, recall, ret="all", deadline_ms=30_000)
    np.testing.assert_allclose(r.scores, expected, rtol=0, atol=1e-5)
    assert r["unknown_user"] == 1
    assert client.score(demo_trace[6][0], items, recall, deadline_ms=30_000)["unknown_user"] == 0
    # counted once per reply to an unknown user, in the broker's figures (jizhictl stats)
    assert client.info()["pipelines"]["demo"]["unknown_users"] == before + 1


def expected_missing_signatures(reference, user, items):
    """Bag entries (user's and every candidate's) whose signature the cube lacks."""
    keys = reference.cube_keys  # sorted, as the reference reads them
    total = 0
    for side, ids in (("user", np.array([user], dtype=np.uint64)), ("item", items)):
        rows = reference.rows(side, ids)
        for field in reference.fields[side]:
            values, lens = reference._bag(side, field, rows)
            valid = np.arange(values.shape[1]) < lens[:, None]
            sigs = sign(field["hash_id"], values[valid], reference.hash_seed)
            found = keys[np.minimum(np.searchsorted(keys, sigs), keys.shape[0] - 1)] == sigs
            total += int(np.count_nonzero(~found))
    return total


def test_signatures_missing_from_the_cube_are_counted_and_not_an_error(client, demo_trace, trace_scores, reference):
    counts = {q: expected_missing_signatures(reference, *demo_trace[q][:2]) for q in range(len(demo_trace))}
    with_missing = [q for q, n in counts.items() if n > 0]
    assert with_missing, "the demo trace should meet signatures the demo cube omits"
    for q in with_missing[:4] + [q for q, n in counts.items() if n == 0][:1]:
        user, items, recall = demo_trace[q]
        r = client.score(user, items, recall, ret="all", deadline_ms=30_000)
        assert r["missing_signatures"] == counts[q]
        np.testing.assert_allclose(r.scores, trace_scores[q], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# After all of it


def test_after_all_the_bad_input_the_same_workers_still_answer_correctly(
        server, client, first_workers, demo_trace, trace_scores):
    for q in range(8):
        user, items, recall = demo_trace[q]
        for pipeline in ("demo", "drop", "reject"):
            r = client.score(user, items, recall, pipeline=pipeline, top_k=10, deadline_ms=30_000)
            assert_topk(r, items, trace_scores[q], 10)
    assert server.workers() == first_workers
    info = client.info()
    assert info["ready"] is True
    assert info["malformed"] > 0
    assert {p: v["in_flight"] for p, v in info["pipelines"].items()} == {"demo": 0, "drop": 0, "reject": 0}
