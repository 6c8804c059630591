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
import torch_models as tm  # noqa: E402  (needs torch)
from test_import import jizhi_scores  # noqa: E402

from jizhi.bundle import Bundle  # noqa: E402
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


def profile_bags(bundle, side, field, rows):
    """Table rows of a field's bags for profile ``rows`` (raw value - 1), newest max_len kept."""
    base = bundle.path / "profiles" / (side + "s")
    if field.kind == "onehot":
        values = np.load(base / f"{field.name}.npy")[rows]
        return [[int(v) - 1] if v else [] for v in values]
    values = np.load(base / f"{field.name}.values.npy")
    offsets = np.load(base / f"{field.name}.offsets.npy")
    return [[int(v) - 1 for v in values[max(offsets[r], offsets[r + 1] - field.max_len):offsets[r + 1]]]
            for r in rows]


def assert_scores_like_pytorch(fixture, version):
    """Fresh random pairs: jizhi's stage processors on the bundle against the PyTorch module itself."""
    bundle = Bundle(version)
    rng = np.random.default_rng(7)
    user_ids = np.load(version / "profiles" / "users" / "ids.npy")
    item_ids = np.load(version / "profiles" / "items" / "ids.npy")
    user_rows = rng.choice(user_ids.shape[0], REQUESTS, replace=False)
    item_rows = rng.choice(item_ids.shape[0], REQUESTS * PER)
    offsets = np.arange(REQUESTS + 1, dtype=np.int64) * PER
    jizhi = np.asarray(jizhi_scores(version, user_ids[user_rows], offsets, item_ids[item_rows]))
    pair_users = np.repeat(user_rows, PER)
    dense = np.load(version / "profiles" / "users" / "dense.npy")[pair_users]
    bags = []
    for f in fixture.fields:
        rows = pair_users if f.side == "user" else item_rows
        bags.append(profile_bags(bundle, f.side, f, rows))
    original = fixture.torch_scores(dense, bags)
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


@pytest.mark.parametrize("exporter,opset,external", [("script", 11, False), ("script", 17, True),
                                                     ("dynamo", 18, True)], ids=["opset11", "opset17-external",
                                                                                  "dynamo-external"])
def test_opsets_and_external_weights_import(tmp_path, exporter, opset, external):
    fixture = tm.make("dlrm_sum", exporter, "tables", tmp_path / "export", seed=6, opset=opset, external=external)
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

