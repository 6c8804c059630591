"""The structured-features graph pass (jizhi/graph/structured.py): same scores, less work per pair.

Scores are compared through onnxruntime (``structured.check``) on random
inputs: sigmoid scores in (0, 1) to 1e-5 absolute; logits (``sigmoid=False``,
|logit| up to about 1.3 on these inputs) to 1e-5 times max(1, largest
|logit|). The float32 sums the pass reorders differ by at most about 2e-7
(scores) and 7e-7 (logits) here.
"""
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jizhi.graph import structured
from jizhi.tools import demo, dlrm
from jizhi.graph.session import session_options

TOLERANCE = 1e-5
OPTIONS = [dict(split_layers=sl, split_interactions=si) for sl in (True, False) for si in (True, False)]
# (U, P): one user with one pair, one user, several users (some with no pair), a serving-sized batch.
SHAPES = [(1, 1), (1, 37), (5, 60), (8, 400)]
DIM = 16


def _demo_model(sigmoid=True):
    fields = demo._fields(1)
    f_user = sum(1 for f in fields if f.side == "user")
    return demo._dense_model(demo._dense_weights(5), f_user, len(fields) - f_user, sigmoid=sigmoid)


MODELS = {
    "demo": _demo_model,
    "demo per pair": lambda sigmoid=True: structured.unstructure(_demo_model(sigmoid)),
    "dlrm": lambda sigmoid=True: dlrm.build(5, 64, 8, 8, sigmoid=sigmoid),
    "dlrm 3 user 5 item fields": lambda sigmoid=True: dlrm.build(6, 32, 3, 5, sigmoid=sigmoid),
}


def _scores(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _assert_logits_match(original, transformed, users, pairs, seed, user_index=None):
    feeds = structured.random_inputs(original, users, pairs, seed, user_index)
    expected, got = _scores(original, feeds), _scores(transformed, feeds)
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert np.max(np.abs(expected - got)) <= TOLERANCE * scale


def _structure_checked(model, **options):
    """``structured.structure``, asserting that it leaves its argument as it was."""
    before = model.SerializeToString()
    result = structured.structure(model, **options)
    assert model.SerializeToString() == before, "structure modified its argument"
    return result


def _gather_sources(model):
    """Inputs of the nodes that gather by user_index on axis 0."""
    return {n.input[0] for n in model.graph.node if n.op_type == "Gather" and list(n.input)[1:] == ["user_index"]}


def _producer(model, name):
    return next(n for n in model.graph.node if name in n.output)


# --- small hand-written models ---------------------------------------------------------

def _bundle_model(nodes, weights, f_user=2, f_item=3):
    """A bundle-form model (inputs of docs/formats.md, dim ``DIM``) from nodes and named arrays."""
    initializers = [numpy_helper.from_array(np.asarray(a), name) for name, a in weights.items()]
    graph = helper.make_graph(
        nodes, "test",
        inputs=[
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["U", 13]),
            helper.make_tensor_value_info("user_emb", TensorProto.FLOAT, ["U", f_user, DIM]),
            helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["P", f_item, DIM]),
            helper.make_tensor_value_info("user_index", TensorProto.INT64, ["P"]),
        ],
        outputs=[helper.make_tensor_value_info("score", TensorProto.FLOAT, ["P"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _weights(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32) for shape in shapes]


def _user_meets_item(user_op, weights=()):
    """Naive form: h = Relu(dense_pp @ W1) [P,8] (user-only), then the nodes
    ``user_op`` producing "h2" (with more ``weights``), then score = sum over
    axis 1 of h2 * (item_flat @ W2)."""
    w1, w2 = _weights(1, (13, 8), (3 * DIM, 8))
    nodes = [
        helper.make_node("Gather", ["dense", "user_index"], ["dense_pp"], axis=0),
        helper.make_node("MatMul", ["dense_pp", "W1"], ["h_mm"]),
        helper.make_node("Relu", ["h_mm"], ["h"]),
        *user_op,
        helper.make_node("Flatten", ["item_emb"], ["item_flat"], axis=1),
        helper.make_node("MatMul", ["item_flat", "W2"], ["it"]),
        helper.make_node("Mul", ["h2", "it"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axis1"], ["score"], keepdims=0),
    ]
    return _bundle_model(nodes, {"W1": w1, "W2": w2, "axis1": np.array([1], dtype=np.int64), **dict(weights)})


def _softmax_model(axis):
    return _user_meets_item([helper.make_node("Softmax", ["h"], ["h2"], axis=axis)])


def _batch_matmul_model():
    """h^T [8,P] @ it [P,8] mixes the pairs' rows: a MatMul on axis 0."""
    w3, = _weights(3, (3 * DIM, 8))
    return _user_meets_item([
        helper.make_node("Transpose", ["h"], ["h_t"], perm=[1, 0]),
        helper.make_node("Flatten", ["item_emb"], ["item_flat0"], axis=1),
        helper.make_node("MatMul", ["item_flat0", "W3"], ["it0"]),
        helper.make_node("MatMul", ["h_t", "it0"], ["mix"]),        # [8, 8], sums over pairs
        helper.make_node("Div", ["mix", "n"], ["mix_n"]),
        helper.make_node("MatMul", ["h", "mix_n"], ["h2"]),
    ], {"W3": w3, "n": np.array(50.0, dtype=np.float32)})


def _interaction_model(selection, *, reshape_form=True, gemm=True, select_by="Gather"):
    """A small DLRM-like model in naive form. The interaction: T = Reshape(Concat
    of [P,DIM] parts (Gather of one field on axis 1), [-1, F, DIM]) (or a Concat of
    the parts unsqueezed to [P,1,DIM]), Z = T @ T^T; the entries ``selection`` of Z
    flattened by Reshape(Z, [0, F*F]) picked by ``select_by``: "Gather" (axis 1),
    "Slice" (a range of them, as many), "all" (no selection: every entry), or
    "GatherND" (on Z transposed to [F, F, P], no flattening, transposed back to
    [P, k]) or "GatherND mixing pairs" (the same, reshaped to [P, k] without the
    Transpose: each row reads other pairs' entries). The top layer is a
    Gemm (transB=1, alpha, beta) or a MatMul and an Add."""
    f_user, f_item = 2, 3
    n = 1 + f_user + f_item
    k = n * n if select_by == "all" else len(selection)
    wb, wt, wo = _weights(7, (13, DIM), (DIM + k, 8), (8, 1))
    weights = {"Wb": wb, "Wt_t": np.ascontiguousarray(wt.T), "Wt": wt, "bt": np.full(8, 0.1, np.float32), "Wo": wo,
               "sel": np.array(selection, dtype=np.int64), "axis1": np.array([1], dtype=np.int64),
               "t_shape": np.array([-1, n, DIM], dtype=np.int64), "z_shape": np.array([0, n * n], dtype=np.int64)}
    nodes = [
        helper.make_node("Gather", ["dense", "user_index"], ["dense_pp"], axis=0),
        helper.make_node("Gather", ["user_emb", "user_index"], ["user_emb_pp"], axis=0),
        helper.make_node("MatMul", ["dense_pp", "Wb"], ["b_mm"]),
        helper.make_node("Relu", ["b_mm"], ["b"]),
    ]
    parts = ["b"]
    for side, j in (("user", 0), ("item", 0), ("item", 1), ("user", 1), ("item", 2)):
        source = "user_emb_pp" if side == "user" else "item_emb"
        weights[f"{side}{j}.k"] = np.array(j, dtype=np.int64)
        nodes.append(helper.make_node("Gather", [source, f"{side}{j}.k"], [f"{side}{j}"], axis=1))
        parts.append(f"{side}{j}")
    if reshape_form:
        nodes.append(helper.make_node("Concat", parts, ["T_flat"], axis=1))
        nodes.append(helper.make_node("Reshape", ["T_flat", "t_shape"], ["T"]))
    else:
        for part in parts:
            nodes.append(helper.make_node("Unsqueeze", [part, "axis1"], [part + ".3"]))
        nodes.append(helper.make_node("Concat", [p + ".3" for p in parts], ["T"], axis=1))
    nodes += [
        helper.make_node("Transpose", ["T"], ["T_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["T", "T_t"], ["Z"]),
    ]
    if not select_by.startswith("GatherND"):
        nodes.append(helper.make_node("Reshape", ["Z", "z_shape"], ["Z_flat"]))
    else:
        del weights["z_shape"]
    if select_by == "Slice":
        weights.update({"s0": np.array([1], np.int64), "s1": np.array([1 + k], np.int64)})
        nodes.append(helper.make_node("Slice", ["Z_flat", "s0", "s1", "axis1"], ["R"]))
    elif select_by == "all":
        nodes.append(helper.make_node("Identity", ["Z_flat"], ["R"]))
    elif select_by.startswith("GatherND"):
        weights["sel_ij"] = np.array([divmod(i, n) for i in selection], dtype=np.int64)
        nodes += [helper.make_node("Transpose", ["Z"], ["Z_last"], perm=[1, 2, 0]),
                  helper.make_node("GatherND", ["Z_last", "sel_ij"], ["R_t"])]
        if select_by == "GatherND":
            nodes.append(helper.make_node("Transpose", ["R_t"], ["R"], perm=[1, 0]))
        else:
            weights["r_shape"] = np.array([-1, k], dtype=np.int64)
            nodes.append(helper.make_node("Reshape", ["R_t", "r_shape"], ["R"]))
    else:
        nodes.append(helper.make_node("Gather", ["Z_flat", "sel"], ["R"], axis=1))
    nodes.append(helper.make_node("Concat", ["b", "R"], ["top_in"], axis=1))
    if gemm:
        nodes.append(helper.make_node("Gemm", ["top_in", "Wt_t", "bt"], ["top_lin"], transB=1, alpha=0.5, beta=2.0))
    else:
        nodes.append(helper.make_node("MatMul", ["top_in", "Wt"], ["top_mm"]))
        nodes.append(helper.make_node("Add", ["bt", "top_mm"], ["top_lin"]))
    nodes += [
        helper.make_node("Tanh", ["top_lin"], ["top"]),
        helper.make_node("MatMul", ["top", "Wo"], ["logit"]),
        helper.make_node("Squeeze", ["logit", "axis1"], ["score"]),
    ]
    return _bundle_model(nodes, weights, f_user, f_item)


N_VECTORS = 6
UPPER_WITH_DIAGONAL = [i * N_VECTORS + j for i in range(N_VECTORS) for j in range(i, N_VECTORS)]


# --- tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "layers={split_layers},interactions={split_interactions}"
                         .format(**o))
def test_structure_gives_the_same_scores_for_every_option_and_batch_shape(name, options):
    model = MODELS[name]()
    structured_model, _ = _structure_checked(model, **options)
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE
    logits = MODELS[name](sigmoid=False)
    _assert_logits_match(logits, _structure_checked(logits, **options)[0], 5, 60, seed=11)


@pytest.mark.parametrize("name", MODELS)
def test_a_user_with_a_single_candidate_and_a_user_with_none_score_the_same(name):
    model = MODELS[name]()
    structured_model, _ = structured.structure(model)
    user_index = np.array([0, 0, 0, 2, 3, 3, 3, 3, 0], dtype=np.int64)   # user 1 has none, user 2 one
    assert structured.check(model, structured_model, 4, 9, 3, user_index=user_index) <= TOLERANCE


def test_unstructure_gives_the_naive_per_pair_form_of_the_demo_model_with_the_same_scores():
    model = _demo_model()
    naive = structured.unstructure(model)
    assert _gather_sources(naive) == {"dense", "user_emb"}
    assert structured.flops(naive).per_user == 0
    assert structured.flops(naive).per_pair > structured.flops(model).per_pair
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, naive, users, pairs, seed) <= TOLERANCE
    back, _ = structured.structure(naive)
    assert structured.check(model, structured.unstructure(back), 5, 60, 1) <= TOLERANCE


def test_structure_moves_the_user_tower_of_the_naive_demo_model_to_user_rows():
    _, report = structured.structure(MODELS["demo per pair"]())
    # bottom 2 x (MatMul, Add, Relu), Flatten, Concat, tower 2 x (MatMul, Add, Relu) + (MatMul, Add), Unsqueeze
    assert len(report.moved_nodes) == 17
    assert report.split_layers == ("MatMul -> top0.lin: 32 input rows on U rows, 264 per pair, 256 outputs",)
    assert report.split_interactions == ()
    assert report.flops_before.per_user == 0
    assert report.flops_after.per_pair < report.flops_before.per_pair / 2
    assert report.flops_after.at(500) < report.flops_before.at(500) / 2


def test_structure_moves_the_bottom_mlp_and_splits_the_dlrm_interaction_and_top_layer():
    model = MODELS["dlrm"]()
    structured_model, report = structured.structure(model)
    assert len(report.moved_nodes) == 10          # bottom 3 x (MatMul, Add, Relu), Unsqueeze
    assert report.split_layers == ("MatMul -> top0.lin: 100 input rows on U rows, 100 per pair, 256 outputs",)
    assert report.split_interactions == (
        "interactions: 17 vectors of 64 (9 user, 8 item), 136 entries: "
        "36 user-user on U rows, 72 user-item and 28 item-item per pair",)
    # Per pair: top 100x256 + 256x128 + 128x1, item-user 9x8x64, item-item 8x8x64 multiply-adds.
    assert report.flops_after.per_pair == 2 * (100 * 256 + 256 * 128 + 128 + 9 * 8 * 64 + 8 * 8 * 64)
    assert report.flops_before.per_pair == 2 * (13 * 512 + 512 * 256 + 256 * 64 + 17 * 17 * 64
                                                + 200 * 256 + 256 * 128 + 128)
    assert report.flops_after.at(500) < report.flops_before.at(500) / 3
    # The user fields are read from user_emb on U rows and the item fields from item_emb, not copied per pair.
    assert _gather_sources(structured_model) == {"interactions.Tu", "top0.mm.user_b"}
    assert sorted(n.op_type for n in structured_model.graph.node if "item_emb" in n.input) == ["MatMul", "Transpose"]


def test_each_option_alone_moves_less_work_than_both():
    model = MODELS["dlrm"]()
    per_pair = {}
    for options in OPTIONS:
        _, report = structured.structure(model, **options)
        assert len(report.split_layers) == options["split_layers"]
        assert len(report.split_interactions) == options["split_interactions"]
        per_pair[tuple(options.values())] = report.flops_after.at(500)
    assert per_pair[True, True] < per_pair[True, False] < per_pair[False, False]
    assert per_pair[True, True] < per_pair[False, True] < per_pair[False, False]


@pytest.mark.parametrize("reshape_form", [True, False], ids=["reshape form", "concat form"])
@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "matmul"])
def test_an_interaction_with_any_selected_entries_is_split(reshape_form, gemm):
    model = _interaction_model(UPPER_WITH_DIAGONAL, reshape_form=reshape_form, gemm=gemm)
    for options in OPTIONS:
        structured_model, report = structured.structure(model, **options)
        assert len(report.split_interactions) == options["split_interactions"]
        assert len(report.split_layers) == options["split_layers"]
        for seed, (users, pairs) in enumerate(SHAPES):
            assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


@pytest.mark.parametrize("select_by, entries", [("Slice", 21), ("all", 36)])
def test_an_interaction_read_whole_or_sliced_is_split_and_read_in_its_original_order(select_by, entries):
    # A Slice of the flattened product is a selection of the entries it reads (the canonical pre-pass).
    model = _interaction_model(UPPER_WITH_DIAGONAL, select_by=select_by)
    structured_model, report = structured.structure(model)
    assert len(report.split_interactions) == 1 and f"{entries} entries" in report.split_interactions[0]
    assert len(report.split_layers) == 1
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


def test_a_selection_by_gathernd_on_the_transposed_product_is_split():
    # Transpose(Z, [1, 2, 0]) -> GatherND -> Transpose([1, 0]): how the dynamo exporter writes Z[:, li, lj].
    model = _interaction_model(UPPER_WITH_DIAGONAL, select_by="GatherND")
    structured_model, report = structured.structure(model)
    assert len(report.split_interactions) == 1 and "21 entries" in report.split_interactions[0]
    assert len(report.split_layers) == 1
    assert not any(n.op_type == "GatherND" for n in structured_model.graph.node)
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


def test_an_unrecognised_interaction_selection_is_left_per_pair_with_the_same_scores():
    # The probe of the region after Z reads other pairs' entries in a row: not a selection, left as it is.
    model = _interaction_model(UPPER_WITH_DIAGONAL, select_by="GatherND mixing pairs")
    structured_model, report = structured.structure(model)
    assert report.split_interactions == ()
    assert report.split_layers == ()          # R comes out of a Reshape [k, P] -> [P, k]: not provably per pair
    assert "b.U" in _gather_sources(structured_model)   # the bottom MLP still runs on U rows
    assert any(n.op_type == "GatherND" for n in structured_model.graph.node)
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


@pytest.mark.parametrize("axis", [0, -2])
def test_a_softmax_over_the_batch_axis_is_left_per_pair_with_the_same_scores(axis):
    model = _softmax_model(axis)
    structured_model, report = structured.structure(model)
    softmax = next(n for n in structured_model.graph.node if n.op_type == "Softmax")
    assert _producer(structured_model, softmax.input[0]).op_type == "Gather"   # h gathered before it
    assert len(report.moved_nodes) == 2                                        # MatMul, Relu
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


def test_computed_view_shapes_are_folded_only_where_the_batch_stays_first():
    # h [P, 8] viewed as [2P, 4] (a computed shape that doubles the batch: left computed) and back as
    # [P, 8] (Shape(h)[0] first: the canonical pre-pass makes it the constant [0, 8], and h2 moves to U rows).
    model = _user_meets_item([
        helper.make_node("Shape", ["h"], ["h_shape"]),
        helper.make_node("Gather", ["h_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Mul", ["batch", "two"], ["batch2"]),
        helper.make_node("Unsqueeze", ["batch2", "axis0"], ["batch2_1d"]),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1d"]),
        helper.make_node("Concat", ["batch2_1d", "four"], ["doubled"], axis=0),
        helper.make_node("Concat", ["batch_1d", "eight"], ["back"], axis=0),
        helper.make_node("Reshape", ["h", "doubled"], ["h_doubled"]),
        helper.make_node("Relu", ["h_doubled"], ["h_doubled_relu"]),
        helper.make_node("Reshape", ["h_doubled_relu", "back"], ["h_back"]),
        helper.make_node("Reshape", ["h", "back"], ["h_same"]),
        helper.make_node("Add", ["h_back", "h_same"], ["h2"]),
    ], {"zero": np.array(0, np.int64), "two": np.array(2, np.int64), "axis0": np.array([0], np.int64),
        "four": np.array([4], np.int64), "eight": np.array([8], np.int64)})
    structured_model, report = structured.structure(model)
    assert any("constant target [0, 8]" in line for line in report.canonical)
    assert not any("h_doubled:" in line for line in report.canonical)
    assert any(n.op_type == "Shape" for n in structured_model.graph.node)   # [2P, 4] is still computed
    assert "Reshape -> h_same" in report.moved_nodes and "Reshape -> h_back" not in report.moved_nodes
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


def test_a_softmax_over_a_feature_axis_is_moved_to_user_rows():
    model = _softmax_model(1)
    structured_model, report = structured.structure(model)
    assert len(report.moved_nodes) == 3                                        # MatMul, Relu, Softmax
    assert _gather_sources(structured_model) == {"h2.U"}
    assert structured.check(model, structured_model, 5, 60, 0) <= TOLERANCE


def test_a_matmul_mixing_pairs_is_left_per_pair_with_the_same_scores():
    model = _batch_matmul_model()
    structured_model, report = structured.structure(model)
    transpose = next(n for n in structured_model.graph.node if n.op_type == "Transpose")
    assert _producer(structured_model, transpose.input[0]).op_type == "Gather"
    assert len(report.moved_nodes) == 2
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, structured_model, users, pairs, seed) <= TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_structure_applied_to_its_own_output_changes_nothing(name):
    model = MODELS[name]()
    once, first = structured.structure(model)
    twice, second = structured.structure(once)
    assert (second.moved_nodes, second.split_layers, second.split_interactions) == ((), (), ())
    assert second.flops_after == first.flops_after
    assert structured.check(model, twice, 5, 60, 0) <= TOLERANCE
    assert structured.check(model, structured.structure(structured.unstructure(once))[0], 5, 60, 1) <= TOLERANCE


def test_a_model_with_a_subgraph_is_left_as_it_is():
    then_branch = helper.make_graph([helper.make_node("Identity", ["h"], ["h_then"])], "then", [],
                                    [helper.make_tensor_value_info("h_then", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["h"], ["h_else"])], "else", [],
                                    [helper.make_tensor_value_info("h_else", TensorProto.FLOAT, None)])
    model = _user_meets_item([helper.make_node("If", ["yes"], ["h2"], then_branch=then_branch,
                                               else_branch=else_branch)],
                             {"yes": np.array(True)})
    structured_model, report = structured.structure(model)
    assert report.note and report.moved_nodes == ()
    assert structured_model.SerializeToString() == model.SerializeToString()
    with pytest.raises(ValueError):
        structured.unstructure(model)


def test_structure_is_deterministic_and_fast():
    for name in ("demo per pair", "dlrm"):
        model = MODELS[name]()
        start = time.monotonic()
        first, _ = structured.structure(model)
        elapsed_s = time.monotonic() - start
        assert elapsed_s < 1.0
        assert structured.structure(model)[0].SerializeToString() == first.SerializeToString()
