"""Models as teams export them, imported by ``jizhictl import`` and scored like PyTorch scores them.

The fixtures are built from real PyTorch code in this test session
(tests/torch_models.py: DLRM with sum and mean ``nn.EmbeddingBag`` and the
reference ``dot`` interaction, and DCN-v2), exported by ``torch.onnx.export``
with both exporters (TorchScript, ``dynamo=False``; and dynamo, torch's
default), in the three input layouts teams use (one input pair per table;
the Criteo layout of ``dlrm_s_pytorch.py``, stacked ``[F, B]``; fields stacked
``[B, F]`` / ``[B, F, L]`` on one shared table with a padding row), plus
opset 11 and weights in an external data file. Each one is imported through
the real ``jizhictl import`` and its scores, computed by jizhi's stage
processors on the new bundle's files, are compared with the PyTorch
module's own output on the same raw ids, to 1e-5. Graphs the importer cannot
serve are refused naming their node.
"""
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="torch is a test dependency (pip install -e '.[test]')")
from torch import nn  # noqa: E402
import torch_models as tm  # noqa: E402  (needs torch)
from jizhi.tools.commands import cli  # noqa: E402

TOLERANCE = 1e-5
USERS, ITEMS = 40, 150
REQUESTS, PER = 4, 40


def run_import(fixture, out, *args):
    result = CliRunner().invoke(cli, ["import", fixture.model_path, "--fields", fixture.fields_path, "--out",
                                      str(out), "--name", "m", "--users", str(USERS), "--items", str(ITEMS),
                                      "--check-pairs", "200", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_scores_like_pytorch(fixture, version):
    """Fresh random pairs: jizhi's stage processors on the bundle against the PyTorch module itself."""
    jizhi, original = tm.score_pairs(fixture, version, REQUESTS, PER)
    assert jizhi.shape == original.shape == (REQUESTS * PER,)
    diff = np.abs(jizhi.astype(np.float64) - original)
    assert np.all(diff <= TOLERANCE + TOLERANCE * np.abs(original)), f"max |jizhi - PyTorch| = {diff.max():.3g}"
    assert np.std(original) > 1e-4, "a constant model would prove little"
    return float(diff.max())


# torch.onnx.export's notes (deprecations, axis names, advanced indexing in opset 11) are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize("family,exporter,layout", [pytest.param(*c, id="/".join(c)) for c in tm.combinations()])
def test_a_model_as_torch_exports_it_imports_and_scores_like_pytorch(tmp_path, family, exporter, layout):
    fixture = tm.make(family, exporter, layout, tmp_path / "export", seed=5)
    version = tmp_path / "models" / "m" / "1"
    code, output = run_import(fixture, version)
    assert code == 0, output
    assert "PASS" in output
    assert_scores_like_pytorch(fixture, version)


@pytest.mark.parametrize("exporter,layout,opset,external", [
    ("script", "tables", 11, False), ("script", "bf", 11, False), ("script", "fb", 11, False),
    ("script", "tables", 17, True), ("dynamo", "fb", 18, True),
], ids=["opset11-tables", "opset11-bf", "opset11-fb", "opset17-external", "dynamo-external"])
def test_opsets_and_external_weights_import(tmp_path, exporter, layout, opset, external):
    # Opset 11: ReduceSum and Squeeze take their axes as an attribute; 13 and later as an input.
    fixture = tm.make("dlrm_sum", exporter, layout, tmp_path / "export", seed=6, opset=opset, external=external)
    if external:
        assert (tmp_path / "export" / "model.onnx.data").stat().st_size > 10_000
    version = tmp_path / "models" / "m" / "1"
    code, output = run_import(fixture, version)
    assert code == 0, output
    assert f"opset {opset}" in output
    assert_scores_like_pytorch(fixture, version)


def test_a_padded_mean_over_stacked_bags_is_refused_naming_the_node(tmp_path):
    fixture = tm.make("dlrm_mean", "script", "bf", tmp_path / "export", seed=5)
    code, output = run_import(fixture, tmp_path / "models" / "m" / "1")
    assert code != 0
    assert "ReduceMean" in output and "padded bags" in output and "node" in output
    assert not (tmp_path / "models" / "m" / "1").exists()


def test_the_criteo_layout_without_slots_says_how_to_name_them(tmp_path):
    fixture = tm.make("dlrm_sum", "script", "fb", tmp_path / "export", seed=5)
    text = open(fixture.fields_path).read()
    # A first try as a new user writes it: every field names the stacked inputs, no slot.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("index = "))
    fields = tmp_path / "fields.toml"
    fields.write_text(text)
    result = CliRunner().invoke(cli, ["import", fixture.model_path, "--fields", str(fields), "--out",
                                      str(tmp_path / "m" / "1")])
    assert result.exit_code != 0
    assert "index = k" in result.output



class _Bags(nn.Module):
    """One user and one item EmbeddingBag, a linear head: the smallest model of a refused pooling."""

    def __init__(self, mode, weighted):
        super().__init__()
        torch.manual_seed(0)
        self.u = nn.EmbeddingBag(50, 8, mode=mode)
        self.i = nn.EmbeddingBag(60, 8, mode="sum")
        self.lin = nn.Linear(16, 1)
        self.weighted = weighted

    def forward(self, ui, uo, ii, io, w=None):
        a = self.u(ui, uo, per_sample_weights=w) if self.weighted else self.u(ui, uo)
        return torch.sigmoid(self.lin(torch.cat([a, self.i(ii, io)], dim=1)))


_BAGS_FIELDS = """
[[fields]]
name = "u"
side = "user"
kind = "multihot"
max_len = 3
indices = "ui"
offsets = "uo"

[[fields]]
name = "i"
side = "item"
kind = "multihot"
max_len = 3
indices = "ii"
offsets = "io"
"""


@pytest.mark.parametrize("mode,weighted,dynamo,words", [
    ("max", False, False, ["node '/u/ReduceMax' (ReduceMax)", "sum or mean only"]),
    ("max", False, True, ["(Loop) pools field 'u''s bag with ReduceMax", "sum or mean only"]),
    ("sum", True, False, ["graph input 'w'", "per_sample_weights", "export the model without them"]),
    ("sum", True, True, ["graph input 'w'", "per_sample_weights", "export the model without them"]),
], ids=["max-script", "max-dynamo", "weights-script", "weights-dynamo"])
def test_a_bag_jizhi_cannot_pool_is_refused_saying_what_and_where(tmp_path, mode, weighted, dynamo, words):
    module = _Bags(mode, weighted).eval()
    args = (torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 3]))
    names = ["ui", "uo", "ii", "io"]
    if weighted:
        args += (torch.rand(5),)
        names.append("w")
    path = tmp_path / "bags.onnx"
    if dynamo:
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["prob"],
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) * len(names))
    else:
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=["prob"],
                          dynamic_axes={n: {0: "n_" + n} for n in names})
    fields = tmp_path / "fields.toml"
    fields.write_text(_BAGS_FIELDS)
    result = CliRunner().invoke(cli, ["import", str(path), "--fields", str(fields), "--out", str(tmp_path / "m" / "1")])
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output, result.output
    assert "Traceback" not in result.output


def _swap_first_two_fields(text):
    """FIELDS.toml with its first two [[fields]] entries in the other order."""
    head, *entries = text.split("[[fields]]")
    entries[0], entries[1] = entries[1], entries[0]
    return head + "".join("[[fields]]" + e for e in entries)


@pytest.mark.parametrize("layout,edit,words", [
    ("bf", _swap_first_two_fields, ["one after another in slot order", "[B, 3, D] block"]),
    ("fb", lambda t: t.replace("index = 7\n", "index = 2\n"), ["slot 2 is also claimed by field 'u1'"]),
    ("fb", lambda t: t[:t.rindex("[[fields]]")], ["slot(s) [7] are not described"]),
    ("fb", lambda t: t.replace("index = 0\n", "index = 0\naxis = 1\n", 1).replace("index = 1\n", "index = 1\naxis = 0\n", 1),
     ["give different axes [0, 1]"]),
    ("fb", lambda t: t.replace("index = 0\n", "index = 0\naxis = 1\n", 1),
     ["stacked on axis 1, so axis 0 is the batch axis, which is fixed"]),
    ("bf", lambda t: t.replace('max_len = 5\ninput = "user_multi"', 'max_len = 4\ninput = "user_multi"', 1),
     ["every field of a stacked input read whole has max_len = 5"]),
], ids=["block-out-of-order", "slot-twice", "slot-missing", "two-axes", "wrong-axis", "bag-length"])
def test_a_stacked_input_described_wrong_is_refused_saying_what_to_write(tmp_path, layout, edit, words):
    fixture = tm.make("dlrm_sum", "script", layout, tmp_path / "export", seed=5)
    fields = tmp_path / "fields.toml"
    fields.write_text(edit(open(fixture.fields_path).read()))
    result = CliRunner().invoke(cli, ["import", fixture.model_path, "--fields", str(fields), "--out",
                                      str(tmp_path / "m" / "1")])
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output, result.output
    assert not (tmp_path / "m").exists()
