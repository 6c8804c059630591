"""Item-side precomputation (jizhi/graph/itemside.py): the item-only part of the graph computed apart gives the
same scores, and the part left per pair does less work.

Served through jizhid (the item table built from the demo bundle's cube, unknown items computed in the
batch): tests/test_end_to_end.py, pipeline ``demo_itemcache``.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import DEMO_ITEMS, assert_topk, demo_pipeline_text, write_text
from jizhi.graph import itemside, structured
from jizhi.tools import demo, dlrm
from jizhi.graph.session import session_options

TOLERANCE = 1e-5


def _demo_model():
    fields = demo._fields(1)
    f_user = sum(1 for f in fields if f.side == "user")
    return demo._dense_model(demo._dense_weights(5), f_user, len(fields) - f_user)


MODELS = {
    "demo": _demo_model,
    "demo per pair": lambda: structured.unstructure(_demo_model()),
    "dlrm": lambda: dlrm.build(5, 64, 8, 8),
    "dlrm 3 user 5 item fields": lambda: dlrm.build(6, 32, 3, 5),
}


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


def _split_scores(split, feeds):
    """Scores of the split: the item model on item_emb, its outputs fed to the serving model."""
    names = [name for name, _ in split.frontier]
    items = _session(split.items).run(names, {"item_emb": feeds["item_emb"]})
    serving = _session(split.serving)
    wanted = {i.name for i in serving.get_inputs()}
    all_feeds = {**feeds, **dict(zip(names, items))}
    return serving.run(None, {k: v for k, v in all_feeds.items() if k in wanted})[0]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("structure_first", [True, False])
def test_the_split_gives_the_same_scores(name, structure_first):
    model = MODELS[name]()
    if structure_first:
        model, _ = structured.structure(model)
    before = model.SerializeToString()
    split = itemside.split_items(model)
    assert model.SerializeToString() == before, "split_items modified its argument"
    if name.startswith("dlrm") and not structure_first:
        # Its item embeddings meet the user's in one interaction until structure() splits it.
        assert split is None
        return
    assert split is not None
    for users, pairs, seed in ((1, 1, 0), (1, 37, 1), (8, 400, 2)):
        feeds = structured.random_inputs(model, users, pairs, seed)
        expected = _session(model).run(None, feeds)[0]
        np.testing.assert_allclose(_split_scores(split, feeds), expected, rtol=0, atol=TOLERANCE)


def test_on_the_structured_demo_model_the_first_layers_item_rows_move_out_and_two_thirds_of_the_work():
    model, _ = structured.structure(_demo_model())
    split = itemside.split_items(model)
    assert split.frontier == (("top0.mm.pair.item", (256,)),)
    assert split.layers == ("MatMul -> top0.mm.pair: 256 input rows per item, 8 per pair, 256 outputs",)
    assert split.floats_per_item == 256
    assert [n.op_type for n in split.items.graph.node] == ["Flatten", "MatMul"]
    before, after = structured.flops(model).at(500), structured.flops(split.serving).at(500)
    assert after < 0.4 * before, (before, after)
    # Still read per pair: the item embeddings themselves (the user-item dot products).
    assert "item_emb" in {i for n in split.serving.graph.node for i in n.input}


def test_on_the_structured_dlrm_the_item_item_interactions_move_out():
    model, _ = structured.structure(dlrm.build(5, 64, 8, 8))
    split = itemside.split_items(model)
    ops = [n.op_type for n in split.items.graph.node]
    assert ops.count("MatMul") == 2            # Ti @ Ti^T and its rows of the first layer
    assert split.layers == ("MatMul -> top0.mm.pair: 28 input rows per item, 72 per pair, 256 outputs",)
    assert structured.flops(split.serving).at(500) < structured.flops(model).at(500)


def _graph(nodes, initializers=()):
    inputs = [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["U", 4]),
              helper.make_tensor_value_info("user_emb", TensorProto.FLOAT, ["U", 2, 4]),
              helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["P", 3, 4]),
              helper.make_tensor_value_info("user_index", TensorProto.INT64, ["P"])]
    out = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["P"])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_a_model_whose_items_only_meet_the_user_has_nothing_to_precompute():
    axes = onnx.numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")
    model = _graph([
        helper.make_node("Gather", ["user_emb", "user_index"], ["u"], axis=0),
        helper.make_node("ReduceSum", ["u", "axes"], ["us"], keepdims=0),
        helper.make_node("ReduceSum", ["item_emb", "axes"], ["is"], keepdims=0),
        helper.make_node("Mul", ["us", "is"], ["score"]),
    ], [axes])
    assert itemside.split_items(model) is None


def test_an_item_only_tensor_that_is_not_float_is_not_precomputed():
    """The table holds float32 rows: a mask computed from the item alone stays in the graph."""
    w = onnx.numpy_helper.from_array(np.ones((12, 1), dtype=np.float32), "w")
    axes = onnx.numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")
    zero = onnx.numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero")
    model = _graph([
        helper.make_node("Flatten", ["item_emb"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["m"]),
        helper.make_node("Greater", ["m", "zero"], ["mask"]),                 # bool [P, 1]
        helper.make_node("Gather", ["user_emb", "user_index"], ["u"], axis=0),
        helper.make_node("ReduceSum", ["u", "axes"], ["us"], keepdims=0),
        helper.make_node("Unsqueeze", ["us", "one"], ["us1"]),
        helper.make_node("Where", ["mask", "us1", "zero"], ["picked"]),
        helper.make_node("Squeeze", ["picked", "one"], ["score"]),
    ], [w, axes, zero, onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "one")])
    assert itemside.split_items(model) is None
    feeds = structured.random_inputs(model, 2, 9, 0)
    assert _session(model).run(None, feeds)[0].shape == (9,)


def test_an_item_op_across_the_batch_is_not_precomputed():
    """A MatMul whose weights depend on the whole batch is not row-wise: nothing is moved, scores stay."""
    w = onnx.numpy_helper.from_array(np.ones((12, 1), dtype=np.float32), "w")
    model = _graph([
        helper.make_node("Flatten", ["item_emb"], ["flat"], axis=1),
        helper.make_node("Softmax", ["flat"], ["soft"], axis=0),       # across candidates
        helper.make_node("MatMul", ["soft", "w"], ["m"]),
        helper.make_node("Flatten", ["m"], ["m2"], axis=0),
        helper.make_node("Squeeze", ["m2"], ["score"]),
    ], [w])
    assert itemside.split_items(model) is None


def test_served_with_the_hot_tier_off_the_cube_stage_still_reads_the_cube_the_table_was_built_from(
        launch, demo_trace, trace_scores, tmp_path):
    """The table's build and the cube stage share the worker's one Cube (open_cube), which the build
    leaves open; here the stage reads every key from it (no hot tier). (Closing it would only break
    the liblmdb fallback: the Numba reader keeps its own mapping.)"""
    path = write_text(tmp_path / "itemcache.toml",
                      demo_pipeline_text("itemcache", options={"dnn": ["item_cache = true"]}))
    server = launch.start(pipelines=(str(path),), config_text='[metrics]\nlisten = ""\n[cube]\nhot_tier_mb = 0\n')
    client = server.client()
    for q in (0, 1, 2):
        user, items, recall = demo_trace[q]
        r = client.score(user, items, recall, pipeline="itemcache", ret="all", deadline_ms=30_000)
        np.testing.assert_allclose(r.scores, trace_scores[q], rtol=0, atol=1e-5)
        r = client.score(user, items, recall, pipeline="itemcache", top_k=10, deadline_ms=30_000)
        assert_topk(r, items, trace_scores[q], 10)
    assert f"item_cache: {DEMO_ITEMS} items" in server.log_text()


def test_item_rows_read_each_items_pooled_embeddings_once_per_version_with_the_same_scores(
        launch, demo_trace, trace_scores, tmp_path):
    """The cube stage's ``item_rows``: every item pooled once when the worker opens the version; a candidate
    reads its row. Same scores as pooling per batch, also for ids the profiles do not know (their fields'
    default vectors) and with the hot tier off (the rows are built from LMDB)."""
    rows = write_text(tmp_path / "itemrows.toml", demo_pipeline_text(
        "itemrows", options={"cube": ["item_rows = true"], "dnn": ["item_cache = true"]}))
    plain = write_text(tmp_path / "plain.toml", demo_pipeline_text("plain"))
    server = launch.start(pipelines=(str(rows), str(plain)),
                          config_text='[metrics]\nlisten = ""\n[cube]\nhot_tier_mb = 0\n')
    client = server.client()
    for q in (0, 1):
        user, items, recall = demo_trace[q]
        r = client.score(user, items, recall, pipeline="itemrows", ret="all", deadline_ms=30_000)
        np.testing.assert_allclose(r.scores, trace_scores[q], rtol=0, atol=1e-5)
    user, items, recall = demo_trace[2]
    unknown = np.array([2**63 + 5, 2**63 + 7], dtype=np.uint64)      # ids no profile has
    items = np.concatenate([items[:50], unknown])
    recall = np.concatenate([recall[:50], np.ones(2, np.float32)])
    a = client.score(user, items, recall, pipeline="itemrows", ret="all", deadline_ms=30_000)
    b = client.score(user, items, recall, pipeline="plain", ret="all", deadline_ms=30_000)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
    assert a["unknown_items"] == b["unknown_items"] == 2
    assert a.get("missing_signatures") == b.get("missing_signatures")
    assert f"item_rows: {DEMO_ITEMS} items' pooled embeddings" in server.log_text()
