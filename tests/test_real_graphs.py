"""The graph passes on graphs torch.onnx.export writes from real PyTorch code (issue 19, item 3): the reference
DLRM interaction (``cat().view()``, ``bmm``, ``Z[:, li, lj]``) and DCN-v2's cross layers, exported by the
TorchScript exporter (computed shapes, Transpose/Flatten/Gather/Reshape selection) and by dynamo (allowzero
Reshape, GatherND selection), with the fields' Concat plain, nested, or stacked and unbound.

Two sources of bundle-form graphs: ``BundleModel`` below, a torch module that takes the bundle's inputs
(``dense``, ``user_emb``, ``item_emb``, ``user_index``) and gathers per pair itself, exported here with both
exporters; and ``jizhictl import`` of the lead's fixtures (tests/torch_models.py), whose bundle's dense.onnx is
the graph. Scores are compared through onnxruntime (``structured.check``, 1e-5). FLOPs per pair are at 500
candidates per user; the floor (jizhi/graph/floor.py) is the work that depends on both a user and an item
tensor, counted by hand below.
"""
import functools

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import torch_models  # noqa: E402  (tests/torch_models.py: the models, as teams write them)
from click.testing import CliRunner  # noqa: E402

from jizhi.graph import itemside, structured  # noqa: E402
from jizhi.graph.canonical import canonicalise  # noqa: E402
from jizhi.graph.floor import floor  # noqa: E402
from jizhi.graph.session import model_session  # noqa: E402
from jizhi.tools import structbench  # noqa: E402
from jizhi.tools.commands import cli  # noqa: E402

TOLERANCE = 1e-5
F_USER, F_ITEM, DIM, DENSE = 6, 6, 16, 13
FORMS = ("plain", "nested", "stacked")
EXPORTERS = ("script", "dynamo")
SHAPES = [(1, 1), (1, 37), (5, 60), (8, 400)]
CANDIDATES = 500

# By hand, per pair: D = 16, 7 user vectors (the bottom MLP's output and 6 fields) and 6 item vectors.
# DLRM: 42 user-item dots of 16, their 42 rows of the first top layer (64 wide), then 64x32 and 32x1.
DLRM_FLOOR = 2 * (42 * 16 + 42 * 64 + 64 * 32 + 32 * 1)
# DCN: the second cross layer (208x208) and the deep MLP's second layer (64x32) read mixed rows only, then the
# head (240x1); the first cross layer and the deep MLP's first layer read user or item columns, never both.
DCN_FLOOR = 2 * (208 * 208 + 64 * 32 + 240 * 1)
DLRM_INTERACTION = ("13 vectors of 16 (7 user, 6 item), 78 entries: 21 user-user on U rows, "
                    "42 user-item and 15 item-item per pair")


# The reference network's pieces, as tests/torch_models.py writes them for the imported fixtures.
_mlp = torch_models._mlp
_interact_dot = torch_models._interact_dot


class BundleModel(torch.nn.Module):
    """A DLRM (bottom MLP 13-32-16, the reference dot interaction, top MLP 64-32-1) or a DCN-v2 (two cross
    layers ``x0 * (x W + b) + x`` beside a deep MLP 64-32, then a linear head), as tests/torch_models.py
    writes them, on the bundle's inputs: ``dense[user_index]``, ``user_emb[user_index]``; field vectors cut
    with ``x[:, k]`` and Concat'ed with the bottom MLP's output ("plain"), or first Concat'ed among themselves
    ("nested"), or cut as [B, 3, D] blocks, Concat'ed and unbound ("stacked")."""

    def __init__(self, family, form, seed=1):
        super().__init__()
        self.family, self.form = family, form
        n_vectors = 1 + F_USER + F_ITEM
        self.bot = _mlp([DENSE, 32, DIM], seed)
        if family == "dcn":
            width = DIM * n_vectors
            torch.manual_seed(seed + 1)
            self.cross = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(2)])
            self.deep = _mlp([width, 64, 32], seed + 2)
            self.head = _mlp([width + 32, 1], seed + 3, sigmoid=True)
        else:
            self.top = _mlp([DIM + n_vectors * (n_vectors - 1) // 2, 64, 32, 1], seed + 1, sigmoid=True)

    def forward(self, dense, user_emb, item_emb, user_index):
        dense_pp = dense[user_index]
        user_emb_pp = user_emb[user_index]
        if self.form == "stacked":
            blocks = [user_emb_pp[:, :3], user_emb_pp[:, 3:], item_emb[:, :3], item_emb[:, 3:]]
            ly = list(torch.unbind(torch.cat(blocks, dim=1), dim=1))
        else:
            ly = [user_emb_pp[:, k] for k in range(F_USER)] + [item_emb[:, k] for k in range(F_ITEM)]
            if self.form == "nested":
                ly = [torch.cat(ly, dim=1)]
        x = self.bot(dense_pp)
        if self.family != "dcn":
            return self.top(_interact_dot(x, ly)).reshape(-1)
        x0 = torch.cat([x] + ly, dim=1)
        xl = x0
        for layer in self.cross:
            xl = x0 * layer(xl) + xl
        return self.head(torch.cat([xl, self.deep(x0)], dim=1)).reshape(-1)


@functools.lru_cache(maxsize=None)
def exported(family, form, exporter):
    """The ONNX model of ``BundleModel(family, form)`` written by ``exporter`` (cached: one export per module)."""
    import io
    import warnings
    module = BundleModel(family, form).eval()
    rng = torch.Generator().manual_seed(0)
    example = (torch.randn(3, DENSE, generator=rng), torch.randn(3, F_USER, DIM, generator=rng),
               torch.randn(5, F_ITEM, DIM, generator=rng), torch.tensor([0, 1, 2, 1, 0]))
    names = ["dense", "user_emb", "item_emb", "user_index"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "script":
            axes = {"dense": {0: "U"}, "user_emb": {0: "U"}, "item_emb": {0: "P"}, "user_index": {0: "P"},
                    "score": {0: "P"}}
            torch.onnx.export(module, example, buffer, dynamo=False, opset_version=17, input_names=names,
                              output_names=["score"], dynamic_axes=axes)
            return onnx.load_from_string(buffer.getvalue())
        users, pairs = torch.export.Dim("U", min=1), torch.export.Dim("P", min=1)
        program = torch.onnx.export(module, example, dynamo=True, opset_version=18, input_names=names,
                                    output_names=["score"], dynamic_shapes=({0: users}, {0: users}, {0: pairs},
                                                                            {0: pairs}), verbose=False)
    return program.model_proto


def _split_scores(split, feeds):
    names = [name for name, _ in split.frontier]
    items = model_session(split.items).run(names, {"item_emb": feeds["item_emb"]})
    serving = model_session(split.serving)
    wanted = {i.name for i in serving.get_inputs()}
    return serving.run(None, {k: v for k, v in {**feeds, **dict(zip(names, items))}.items() if k in wanted})[0]


def _assert_same_scores(model, transformed):
    for seed, (users, pairs) in enumerate(SHAPES):
        assert structured.check(model, transformed, users, pairs, seed) <= TOLERANCE


def _assert_dlrm_split(model):
    """The interaction and the first top layer split, the same scores, and with the item table the floor."""
    before = model.SerializeToString()
    structured_model, report = structured.structure(model)
    assert model.SerializeToString() == before, "structure modified its argument"
    print(report.summary(CANDIDATES))
    assert len(report.split_interactions) == 1 and report.split_interactions[0].endswith(DLRM_INTERACTION)
    assert len(report.split_layers) == 1 and "37 input rows on U rows, 57 per pair, 64 outputs" \
        in report.split_layers[0]
    assert report.not_split == ()
    _assert_same_scores(model, structured_model)
    _, again = structured.structure(structured_model)
    assert (again.split_layers, again.split_interactions, again.not_split) == ((), (), ())
    assert again.flops_after == report.flops_after
    split = itemside.split_items(structured_model)
    assert split is not None and len(split.layers) == 1 and "15 input rows per item, 42 per pair" in split.layers[0]
    for users, pairs, seed in ((1, 1, 0), (5, 60, 1), (8, 400, 2)):
        feeds = structured.random_inputs(model, users, pairs, seed)
        expected = model_session(model).run(None, feeds)[0]
        np.testing.assert_allclose(_split_scores(split, feeds), expected, rtol=0, atol=TOLERANCE)
    naive = structured.flops(structured.unstructure(model)).at(CANDIDATES)
    served = structured.flops(split.serving).at(CANDIDATES)
    assert floor(model).per_pair == DLRM_FLOOR
    assert report.flops_after.at(CANDIDATES) < 0.6 * naive
    assert served <= 1.1 * DLRM_FLOOR, (naive, report.flops_after.at(CANDIDATES), served, DLRM_FLOOR)
    return report


# --- the bundle-form torch module, both exporters ----------------------------------------------

@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("form", FORMS)
def test_the_dlrm_interaction_and_first_layer_are_split_and_the_item_table_reaches_the_floor(form, exporter):
    _assert_dlrm_split(exported("dlrm_sum", form, exporter))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("form", ["plain", "nested"])
def test_dcn_cross_layers_are_reported_not_split_by_name_and_scores_are_kept(form, exporter):
    model = exported("dcn", form, exporter)
    structured_model, report = structured.structure(model)
    assert report.split_interactions == ()
    assert len(report.not_split) == 2
    assert all(line.startswith("cross layer (x0 * (x W + b) + x) -> ") and line.endswith(": not split")
               for line in report.not_split)
    # x0's user columns of the first cross layer and of the deep MLP's first layer move to U rows.
    assert len(report.split_layers) == 2 and all("112 input rows on U rows, 96 per pair" in line
                                                 for line in report.split_layers)
    _assert_same_scores(model, structured_model)
    assert floor(model).per_pair == DCN_FLOOR
    split = itemside.split_items(structured_model)
    assert structured.flops(split.serving).at(CANDIDATES) <= 1.1 * DCN_FLOOR


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("form", FORMS)
def test_the_canonical_form_keeps_the_scores_and_is_its_own_canonical_form(form, exporter):
    model = exported("dlrm_sum", form, exporter)
    canonical = canonicalise(model)
    assert canonical.changes
    _assert_same_scores(model, canonical.model)
    again = canonicalise(canonical.model)
    assert again.changes == () and again.model is canonical.model
    # No shape computation, GatherND or computed Reshape target is left; T is a Concat of [P, k, D] parts.
    ops = [n.op_type for n in canonical.model.graph.node]
    assert "Shape" not in ops and "GatherND" not in ops and "Squeeze" not in ops
    reshapes = [n for n in canonical.model.graph.node if n.op_type == "Reshape"]
    constants = {i.name for i in canonical.model.graph.initializer} | {
        n.output[0] for n in canonical.model.graph.node if n.op_type == "Constant"}
    assert all(n.input[1] in constants for n in reshapes)


def test_the_floor_is_the_same_on_every_form_of_one_model():
    model = exported("dlrm_sum", "plain", "script")
    structured_model, _ = structured.structure(model)
    split = itemside.split_items(structured_model)
    for form in (model, structured.unstructure(model), structured_model, split.serving):
        assert floor(form).per_pair == DLRM_FLOOR
        assert floor(form).unknown == 0


def test_the_report_command_prints_the_four_figures_and_what_is_not_split():
    dlrm = structbench.report(exported("dlrm_sum", "nested", "dynamo"), CANDIDATES, "dlrm")
    dcn = structbench.report(exported("dcn", "plain", "dynamo"), CANDIDATES, "dcn")
    print(dlrm, dcn, sep="\n")
    for text in (dlrm, dcn):
        for label in ("per-pair graph (unstructure)", "structured", "structured + item table", "floor"):
            assert f"  {label}" in text
    assert f"{DLRM_FLOOR:12,.0f}" in dlrm and "not split" not in dlrm and "not recognised" not in dlrm
    assert dcn.count("cross layer (x0 * (x W + b) + x)") == 2


def test_an_interaction_of_two_different_tensors_is_reported_not_recognised():
    # Z = T @ U^T with U another tensor (T with its item rows negated): not the T @ T^T the pass splits.
    model = exported("dlrm_sum", "plain", "script")
    graph = model.graph
    matmul = next(n for n in graph.node if n.op_type == "MatMul")
    transpose = next(n for n in graph.node if n.output[0] == matmul.input[1])
    flip = onnx.numpy_helper.from_array(np.where(np.arange(13) % 2 == 0, 1, -1).astype(np.float32)
                                        .reshape(1, 13, 1), "flip")
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer.append(flip)
    nodes = list(changed.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.output[0] == transpose.output[0])
    nodes.insert(index, onnx.helper.make_node("Mul", [transpose.input[0], "flip"], ["T_flipped"]))
    nodes[index + 1].input[0] = "T_flipped"
    del changed.graph.node[:]
    changed.graph.node.extend(nodes)
    structured_model, report = structured.structure(changed)
    assert report.split_interactions == ()
    assert report.not_split == (f"interaction at node {matmul.name}: not recognised",)
    _assert_same_scores(changed, structured_model)


# --- jizhictl import of tests/torch_models.py's fixtures ---------------------------------------------

def _imported(tmp_path, family, exporter, layout):
    """(fixture, the bundle's dense graph) of ``jizhictl import`` of one of tests/torch_models.py's fixtures."""
    fixture = torch_models.make(family, exporter, layout, str(tmp_path / "src"))
    out = tmp_path / "models" / "m" / "1"
    result = CliRunner().invoke(cli, ["import", fixture.model_path, "--fields", fixture.fields_path, "--out",
                                      str(out), "--users", "20", "--items", "60", "--check-pairs", "50"])
    assert result.exit_code == 0, result.output
    return fixture, onnx.load(str(out / "dense.onnx"))


# Every layout with TorchScript; with dynamo the two whose export takes seconds, not ten (tables: one
# EmbeddingBag loop per table). The bundle-form module above covers both exporters on every form.
IMPORTED = [("script", "tables"), ("script", "fb"), ("script", "bf"), ("dynamo", "fb"), ("dynamo", "bf")]


@pytest.mark.parametrize("exporter, layout", IMPORTED)
def test_the_imported_dlrm_is_split_and_its_item_table_reaches_the_floor(tmp_path, exporter, layout):
    fixture, model = _imported(tmp_path, "dlrm_sum", exporter, layout)
    n_user = 1 + sum(f.side == "user" for f in fixture.fields)
    n_item = len(fixture.fields) + 1 - n_user
    structured_model, report = structured.structure(model)
    print(report.summary(CANDIDATES))
    assert len(report.split_interactions) == 1
    assert f"{n_user + n_item} vectors of" in report.split_interactions[0]
    assert f"({n_user} user, {n_item} item)" in report.split_interactions[0]
    assert f"{n_user * n_item} user-item" in report.split_interactions[0]
    assert len(report.split_layers) == 1 and report.not_split == ()
    _assert_same_scores(model, structured_model)
    split = itemside.split_items(structured_model)
    assert split is not None
    floor_flops = floor(model).per_pair
    assert floor_flops == floor(structured.unstructure(model)).per_pair
    assert structured.flops(split.serving).at(CANDIDATES) <= 1.1 * floor_flops


@pytest.mark.parametrize("exporter, layout", [("script", "tables"), ("dynamo", "bf")])
def test_the_imported_dcn_is_reported_not_split_by_name(tmp_path, exporter, layout):
    _, model = _imported(tmp_path, "dcn", exporter, layout)
    structured_model, report = structured.structure(model)
    assert report.split_interactions == ()
    assert len(report.not_split) == 2 and all(line.startswith("cross layer") for line in report.not_split)
    _assert_same_scores(model, structured_model)
