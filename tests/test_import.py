"""jizhictl import: DLRM-style ONNX models with their tables inside, made into bundles.

The models are built here with onnx.helper in the shapes exporters write
(torch.onnx.export's Loop for nn.EmbeddingBag, Gather + ReduceSum/ReduceMean
for padded bags), saved as real .onnx files, imported through the real
``jizhictl import`` (click, in this process), then checked three ways: the
command's own check passes, this module scores fresh random pairs through
jizhi's stage processors and through the original model on the same raw ids
(its own feeds, not the importer's), and ``python -m jizhi.validate``
accepts the bundle. Refusals name the node or input. Everything lives in
tmp_path.
"""
import json
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from jizhi.bundle import Bundle
from jizhi.tools.commands import cli
from jizhi.workers.builtins import load_class
from jizhi.workers.stage import Batch

DIM = 8
INT64_MAX = 2 ** 63 - 1
TOLERANCE = 1e-5            # |jizhi - original| <= TOLERANCE + TOLERANCE * |original|
USERS, ITEMS = 150, 400     # generated profiles (small: the test file must stay fast)
CHECK_PAIRS = 400
VALIDATE_TIMEOUT_S = 120.0  # a first run on a machine may compile the Numba kernels


# --- model building ------------------------------------------------------------------------

class _Graph:
    """Nodes and initializers of a model being built, with unique names."""

    def __init__(self, seed):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def name(self, prefix):
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, value, prefix="c"):
        """A Constant node (as torch writes them); returns its output name."""
        out = self.name(prefix)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(value), out),
                                           name=out))
        return out

    def init(self, value, name):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type, inputs, name=None, **attrs):
        out = self.name((name or op_type).lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name or out, **attrs))
        return out

    def table(self, name, rows, padding_row=None):
        t = (self.rng.standard_normal((rows, DIM)) * 0.3).astype(np.float32)
        if padding_row is not None:
            t[padding_row] = 0.0
        return self.init(t, name)

    def linear(self, x, fan_in, fan_out, relu=True):
        w = self.init((self.rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32),
                      self.name("W"))
        b = self.init((self.rng.standard_normal(fan_out) * 0.1).astype(np.float32), self.name("b"))
        y = self.op("Add", [self.op("MatMul", [x, w]), b])
        return self.op("Relu", [y]) if relu else y

    def unsqueeze(self, x, axis, opset):
        if opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array([axis], dtype=np.int64))])
        return self.op("Unsqueeze", [x], axes=[axis])

    def reduce(self, op_type, x, axis, opset, keepdims, name=None):
        """ReduceSum/Mean/Max over ``axis``: axes as an attribute before opset 13 (ReduceSum) / 18 (others)."""
        input_axes = opset >= 18 or op_type == "ReduceSum" and opset >= 13
        if input_axes:
            return self.op(op_type, [x, self.const(np.array([axis], dtype=np.int64))], name=name, keepdims=keepdims)
        return self.op(op_type, [x], name=name, axes=[axis], keepdims=keepdims)

    def embedding_bag(self, table, indices, offsets, mode, opset, table_inside, last_offset, name):
        """What torch.onnx.export writes for nn.EmbeddingBag(mode=...)(indices, offsets) (opset >= 11).

        ``table_inside``: the body gathers the table's rows (as torch writes
        it); otherwise the rows of all indices are gathered before the loop
        and the body slices them.
        """
        cond = self.op("Cast", [self.const(np.array(1, dtype=np.int64))], to=TensorProto.BOOL)
        zero = self.const(np.array([0], dtype=np.int64))
        if last_offset:
            bounds = offsets
        else:
            size = self.op("Gather", [self.op("Shape", [indices]), self.const(np.array(0, dtype=np.int64))], axis=0)
            bounds = self.op("Concat", [offsets, self.unsqueeze(size, 0, opset)], axis=0)
        one_d = [self.const(np.array([v], dtype=np.int64)) for v in (0, INT64_MAX, 0, 1)]
        starts = self.op("Slice", [bounds] + one_d)
        one_d = [self.const(np.array([v], dtype=np.int64)) for v in (1, INT64_MAX, 0, 1)]
        ends = self.op("Slice", [bounds] + one_d)
        trips = self.op("Gather", [self.op("Shape", [ends]), self.const(np.array(0, dtype=np.int64))], axis=0)
        rows_outside = None if table_inside else self.op("Gather", [table, indices], axis=0)

        body = _Graph(0)
        body.n = self.n + 1000    # body names must not repeat outer ones (ONNX scoping)
        i, cond_in = f"{name}_i", f"{name}_cond"
        lo = body.unsqueeze(body.op("Gather", [starts, i], axis=0), 0, opset)
        hi = body.unsqueeze(body.op("Gather", [ends, i], axis=0), 0, opset)
        if table_inside:
            rows = body.op("Gather", [table, body.op("Slice", [indices, lo, hi, zero])], axis=0)
        else:
            rows = body.op("Slice", [rows_outside, lo, hi, zero])
        pooled = body.reduce("ReduceSum" if mode == "sum" else "ReduceMean", rows, 0, opset, keepdims=0)
        cond_out = body.op("Cast", [cond], to=TensorProto.BOOL)
        graph = helper.make_graph(
            body.nodes, f"{name}_body",
            [helper.make_tensor_value_info(i, TensorProto.INT64, []),
             helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
             helper.make_tensor_value_info(pooled, TensorProto.FLOAT, [DIM])])
        self.n = body.n
        out = self.name(name)
        self.nodes.append(helper.make_node("Loop", [trips, cond], [out], name=name, body=graph))
        return out

    def model(self, inputs, output, opset, out_shape=("B", 1)):
        g = helper.make_graph(self.nodes, "imported", inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(out_shape))], self.inits)
        m = helper.make_model(g, producer_name="test_import", opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def _ids(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.INT64, list(dims))


def _floats(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


# Each model comes with its FIELDS.toml and, for this module's own feeds, the
# layout of each field's input: ("padded", input, rank, padding row) or
# ("bag", indices, offsets, include_last_offset).

def dlrm_sum_model(opset=13):
    """Padded bags, sum pooling, a onehot field of each shape, dot interactions and an MLP; [B, 1] output."""
    g = _Graph(1)
    bottom = g.linear("dense_x", 4, DIM)
    u_cat = g.op("Gather", [g.table("emb_u_cat", 20), "u_cat"], axis=0)                        # [B] ids
    u_tags = g.reduce("ReduceSum", g.op("Gather", [g.table("emb_u_tags", 40, padding_row=0), "u_tags"], axis=0),
                      1, opset, keepdims=0, name="pool_u_tags")
    i_cat32 = g.op("Cast", ["i_cat"], to=TensorProto.INT32)                                     # [B, 1] ids
    i_cat = g.reduce("ReduceMean", g.op("Gather", [g.table("emb_i_cat", 15), i_cat32], axis=0), 1, opset, keepdims=0)
    i_tags = g.reduce("ReduceSum", g.op("Gather", [g.table("emb_i_tags", 25, padding_row=0), "i_tags"], axis=0),
                      1, opset, keepdims=1, name="pool_i_tags")                                # [B, 1, D]
    i_tags = g.op("Squeeze", [i_tags, g.const(np.array([1], dtype=np.int64))])
    stack = g.op("Concat", [g.unsqueeze(x, 1, opset) for x in (bottom, u_cat, u_tags, i_cat, i_tags)], axis=1)
    dots = g.op("MatMul", [stack, g.op("Transpose", [stack], perm=[0, 2, 1])])
    top = g.op("Concat", [bottom, g.op("Flatten", [dots], axis=1)], axis=1)
    logit = g.linear(g.linear(top, DIM + 25, 16), 16, 1, relu=False)
    prob = g.op("Sigmoid", [logit])
    model = g.model([_floats("dense_x", "B", 4), _ids("u_cat", "B"), _ids("u_tags", "B", 5), _ids("i_cat", "B", 1),
                     _ids("i_tags", "B", 3)], prob, opset)
    fields = """
[dense]
input = "dense_x"

[[fields]]
name = "u_cat"
side = "user"
kind = "onehot"
input = "u_cat"

[[fields]]
name = "u_tags"
side = "user"
kind = "multihot"
max_len = 5
input = "u_tags"
padding_idx = 0

[[fields]]
name = "i_cat"
side = "item"
kind = "onehot"
input = "i_cat"

[[fields]]
name = "i_tags"
side = "item"
kind = "multihot"
max_len = 3
input = "i_tags"
padding_idx = 0
"""
    layout = {"u_cat": ("padded", "u_cat", 1, None), "u_tags": ("padded", "u_tags", 2, 0),
              "i_cat": ("padded", "i_cat", 2, None), "i_tags": ("padded", "i_tags", 2, 0)}
    return model, fields, layout


def bag_mean_model(opset=17, dense=True):
    """EmbeddingBag (mean) loops: a user history over the item-id table (read inside the loop body,
    offsets [B]) and item tags (rows gathered before the loop, include_last_offset); the item id
    looks up the same table directly. Output [B] (no sigmoid)."""
    g = _Graph(2)
    items = g.table("item_table", 30)
    hist = g.embedding_bag(items, "hist_idx", "hist_off", "mean", opset, table_inside=True, last_offset=False,
                           name="bag_hist")
    tags = g.embedding_bag(g.table("tag_table", 12), "tags_idx", "tags_off", "mean", opset, table_inside=False,
                           last_offset=True, name="bag_tags")
    item = g.op("Gather", [items, "item_id"], axis=0)
    parts = [hist, tags, item, g.op("Mul", [hist, item])]
    width = 4 * DIM
    if dense:
        parts.insert(0, g.linear("dense_x", 3, DIM))
        width += DIM
    logit = g.linear(g.linear(g.op("Concat", parts, axis=1), width, 16), 16, 1, relu=False)
    score = g.op("Reshape", [logit, g.const(np.array([-1], dtype=np.int64))])
    inputs = [_ids("hist_idx", "N"), _ids("hist_off", "B"), _ids("tags_idx", "M"), _ids("tags_off", "B1"),
              _ids("item_id", "B")]
    if dense:
        inputs.insert(0, _floats("dense_x", "B", 3))
    model = g.model(inputs, score, opset, out_shape=("B",))
    fields = ('[dense]\ninput = "dense_x"\n' if dense else "") + """
[[fields]]
name = "u_hist"
side = "user"
kind = "history"
max_len = 6
indices = "hist_idx"
offsets = "hist_off"

[[fields]]
name = "i_tags"
side = "item"
kind = "multihot"
max_len = 4
indices = "tags_idx"
offsets = "tags_off"

[[fields]]
name = "i_id"
side = "item"
kind = "onehot"
input = "item_id"
"""
    layout = {"u_hist": ("bag", "hist_idx", "hist_off", False), "i_tags": ("bag", "tags_idx", "tags_off", True),
              "i_id": ("padded", "item_id", 1, None)}
    return model, fields, layout


def _tiny(variant):
    """A small model with one sparse field, broken (or not) in one way; (model, FIELDS.toml text)."""
    g = _Graph(3)
    opset = 17
    table = g.table("emb", 10)
    fields = '[dense]\ninput = "dense_x"\n\n[[fields]]\nname = "f"\nside = "item"\nkind = "multihot"\nmax_len = 3\n' \
             'input = "ids"\n'
    ids = _ids("ids", "B", 3)
    rows = g.op("Gather", [table, "ids"], axis=0)
    if variant == "matmul":
        pooled = g.reduce("ReduceSum", rows, 1, opset, keepdims=0)
        tied = g.op("MatMul", ["dense_x", table], name="tied_mm")
        x = g.op("Add", [pooled, tied])
    elif variant == "max":
        x = g.reduce("ReduceMax", rows, 1, opset, keepdims=0, name="pool_max")
    elif variant == "wrong_axis":
        x = g.linear(g.reduce("ReduceSum", rows, 2, opset, keepdims=0, name="pool_axis2"), 3, DIM)
    elif variant == "axis1":
        g.nodes.pop()    # not the row lookup: this model reads the table's columns
        cols = g.op("Gather", [table, "ids"], axis=1, name="gather_cols")               # [10, B, 3]
        x = g.op("Transpose", [g.reduce("ReduceSum", cols, 2, opset, keepdims=0)], perm=[1, 0])
        x = g.op("Slice", [x, *(g.const(np.array([v], dtype=np.int64)) for v in (0, DIM, 1))])
    elif variant == "dims":
        pooled = g.reduce("ReduceSum", rows, 1, opset, keepdims=0)
        other = g.op("Gather", [g.init(np.ones((7, 6), dtype=np.float32), "emb_wide"), "other"], axis=0)
        x = g.op("Concat", [pooled, other], axis=1)
        fields += '\n[[fields]]\nname = "o"\nside = "user"\nkind = "onehot"\ninput = "other"\n'
        ids = [ids, _ids("other", "B")]
    elif variant == "ids_as_numbers":
        pooled = g.reduce("ReduceSum", rows, 1, opset, keepdims=0)
        x = g.op("Add", [pooled, g.op("Cast", [g.reduce("ReduceSum", "ids", 1, opset, keepdims=1, name="ids_sum")],
                                      to=TensorProto.FLOAT)])
    elif variant == "aux":
        pooled = g.reduce("ReduceSum", rows, 1, opset, keepdims=0)
        x = g.op("Add", [pooled, g.op("Cast", ["aux"], to=TensorProto.FLOAT)])
        fields += '\n[[fields]]\nname = "a"\nside = "user"\nkind = "onehot"\ninput = "aux"\n'
        ids = [ids, _ids("aux", "B", 1)]
    elif variant == "batch_mean":
        x = g.reduce("ReduceSum", rows, 1, opset, keepdims=0)
    else:
        raise ValueError(variant)
    x = g.op("Concat", [x, "dense_x"], axis=1)
    logit = g.linear(x, DIM + 10 if variant != "dims" else DIM + 6 + 10, 1, relu=False)
    if variant == "batch_mean":
        # Centred over the batch: the score of a pair depends on the other pairs of its batch.
        logit = g.op("Sub", [logit, g.reduce("ReduceMean", logit, 0, opset, keepdims=1)])
    inputs = [_floats("dense_x", "B", 10)] + (ids if isinstance(ids, list) else [ids])
    return g.model(inputs, logit, opset), fields


# --- running the import --------------------------------------------------------------------

def save(model, directory, name="model.onnx", external=False):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if external:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=name + ".data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def run_import(model_path, fields_text, out, *args):
    """(exit code, stdout + stderr) of ``jizhictl import`` run in this process."""
    fields = model_path.parent / "fields.toml"
    fields.write_text(fields_text)
    result = CliRunner().invoke(cli, ["import", str(model_path), "--fields", str(fields), "--out", str(out),
                                      "--users", str(USERS), "--items", str(ITEMS),
                                      "--check-pairs", str(CHECK_PAIRS), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def run_validate(version_dir):
    proc = subprocess.run([sys.executable, "-m", "jizhi.validate", str(version_dir)],
                          capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; exit {proc.returncode}; stderr:\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1])


def _bags(directory, field, rows):
    """Raw values of a field for profile rows, newest max_len kept: (list of int64 arrays)."""
    max_len = field["max_len"]
    if field["kind"] == "onehot":
        v = np.load(directory / f"{field['name']}.npy")[rows]
        return [np.array([x], dtype=np.int64) if x else np.zeros(0, dtype=np.int64) for x in v]
    values = np.load(directory / f"{field['name']}.values.npy")
    offsets = np.load(directory / f"{field['name']}.offsets.npy")
    return [values[max(offsets[r], offsets[r + 1] - max_len):offsets[r + 1]] for r in rows]


def original_scores(model_path, layout, bundle_dir, user_rows, item_rows):
    """The original model on the raw ids of the pairs (user_rows[k], item_rows[k]): raw value r is row r - 1."""
    manifest = tomllib.loads((bundle_dir / "manifest.toml").read_text())
    fields = {f["name"]: f for f in manifest["fields"]}
    feeds = {}
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    if "dense_x" in names:
        feeds["dense_x"] = np.load(bundle_dir / "profiles" / "users" / "dense.npy")[user_rows]
    for name, how in layout.items():
        f = fields[name]
        side = "users" if f["side"] == "user" else "items"
        bags = _bags(bundle_dir / "profiles" / side, f, user_rows if f["side"] == "user" else item_rows)
        if how[0] == "padded":
            _, inp, rank, pad = how
            ids = np.full((len(bags), f["max_len"]), pad if pad is not None else -1, dtype=np.int64)
            for k, bag in enumerate(bags):
                ids[k, :len(bag)] = bag - 1
            assert (ids >= 0).all(), f"field {name}: a bag the model cannot take (short, no padding)"
            feeds[inp] = ids[:, 0] if rank == 1 else ids
        else:
            _, indices, offsets, last = how
            starts = np.cumsum([0] + [len(b) for b in bags])
            feeds[indices] = np.concatenate(bags) - 1
            feeds[offsets] = starts if last else starts[:-1]
    return session.run(None, feeds)[0].reshape(-1)


def jizhi_scores(bundle_dir, users, offsets, items):
    """Scores of requests through jizhi's stage processors, set up as a worker sets them up."""
    bundle = Bundle(bundle_dir)
    batch = Batch(users, np.diff(offsets), np.zeros(users.shape[0], dtype=bool), np.full(users.shape[0], np.inf),
                  offsets, {"item_ids": items, "recall_scores": np.full(items.shape[0], 0.5, dtype=np.float32)})
    for name in ("data_reader", "feature_processor", "cube_accessor", "model_inference"):
        stage = load_class(name)()
        stage.setup({"on_unknown": "default", "_overlay": None}, bundle)
        batch.columns.update(stage.process(batch))
    assert not batch.failed
    return batch["score"]


def assert_scores_like_the_original(model_path, layout, bundle_dir, seed=99, requests=5, per=60):
    """Fresh random pairs (not the import's check pairs) score the same through jizhi and the original."""
    rng = np.random.default_rng(seed)
    user_ids = np.load(bundle_dir / "profiles" / "users" / "ids.npy")
    item_ids = np.load(bundle_dir / "profiles" / "items" / "ids.npy")
    user_rows = rng.choice(user_ids.shape[0], requests, replace=False)
    item_rows = rng.choice(item_ids.shape[0], requests * per)
    offsets = np.arange(requests + 1, dtype=np.int64) * per
    jizhi = jizhi_scores(bundle_dir, user_ids[user_rows], offsets, item_ids[item_rows])
    original = original_scores(model_path, layout, bundle_dir, np.repeat(user_rows, per), item_rows)
    assert jizhi.shape == original.shape == (requests * per,)
    assert np.all(np.abs(jizhi - original) <= TOLERANCE + TOLERANCE * np.abs(original)), \
        f"max |jizhi - original| = {np.max(np.abs(jizhi - original))}"
    # Not a constant model: the comparison would prove little.
    assert np.std(original) > 1e-3


# --- imports that work ---------------------------------------------------------------------

def test_an_embedding_bag_model_with_mean_pooling_imports_and_scores_like_the_original(tmp_path):
    model, fields, layout = bag_mean_model(opset=17)
    path = save(model, tmp_path / "src")
    out = tmp_path / "models" / "bags" / "1"
    code, output = run_import(path, fields, out, "--name", "bags")
    assert code == 0, output
    assert "PASS" in output

    manifest = tomllib.loads((out / "manifest.toml").read_text())
    assert (manifest["name"], manifest["version"], manifest["dim"]) == ("bags", 1, DIM)
    assert manifest["dense"]["user_features"] == 3
    assert [(f["name"], f["side"], f["kind"], f["max_len"], f["vocab"], f["pooling"], f.get("shares"))
            for f in manifest["fields"]] == [
        ("u_hist", "user", "history", 6, 30, "mean", None),
        ("i_tags", "item", "multihot", 4, 12, "mean", None),
        ("i_id", "item", "onehot", 1, 30, "mean", "u_hist")]
    assert Bundle(out).verify()

    graph = onnx.load(out / "dense.onnx").graph
    assert [i.name for i in graph.input] == ["dense", "user_emb", "item_emb", "user_index"]
    assert [o.name for o in graph.output] == ["score"]
    gathers = {n.output[0]: list(n.input) for n in graph.node if n.op_type == "Gather"}
    assert gathers["dense_pp"] == ["dense", "user_index"]
    assert gathers["user_emb_pp"] == ["user_emb", "user_index"]
    assert not [n for n in graph.node if n.op_type == "Loop"]
    assert not [t.name for t in graph.initializer if t.name in ("item_table", "tag_table")]

    assert_scores_like_the_original(path, layout, out)
    code, result = run_validate(out)
    assert (code, result["ok"]) == (0, True), result


def test_an_opset_18_bag_model_with_external_weights_and_no_dense_input_imports(tmp_path):
    model, fields, layout = bag_mean_model(opset=18, dense=False)
    path = save(model, tmp_path / "src", external=True)
    assert (tmp_path / "src" / "model.onnx.data").stat().st_size > 30 * DIM * 4
    out = tmp_path / "models" / "model" / "1"
    code, output = run_import(path, fields, out)
    assert code == 0, output
    assert "PASS" in output
    manifest = tomllib.loads((out / "manifest.toml").read_text())
    assert manifest["name"] == "model"
    assert manifest["dense"]["user_features"] == 0
    assert_scores_like_the_original(path, layout, out)
    code, result = run_validate(out)
    assert (code, result["ok"]) == (0, True), result


def test_given_profiles_are_copied_and_checked(tmp_path):
    model, fields, layout = bag_mean_model(opset=17)
    path = save(model, tmp_path / "src")
    first = tmp_path / "models" / "bags" / "1"
    assert run_import(path, fields, first)[0] == 0
    second = tmp_path / "models" / "bags" / "2"
    code, output = run_import(path, fields, second, "--version", "2", "--profiles", str(first / "profiles"))
    assert code == 0, output
    for rel in ("users/ids.npy", "users/u_hist.values.npy", "items/i_tags.offsets.npy", "items/sigs.npy"):
        assert (first / "profiles" / rel).read_bytes() == (second / "profiles" / rel).read_bytes()

    # A raw value past the table: refused, naming the file and the table.
    bad = tmp_path / "bad_profiles"
    shutil.copytree(first / "profiles", bad)
    values = np.load(bad / "items" / "i_id.npy")
    values[3] = 31
    np.save(bad / "items" / "i_id.npy", values)
    third = tmp_path / "models" / "bags" / "3"
    code, output = run_import(path, fields, third, "--profiles", str(bad))
    assert code == 2
    assert "i_id.npy holds raw value 31" in output and "'item_table' of 30 rows" in output
    assert sorted(os.listdir(third.parent)) == ["1", "2"]


def test_an_imported_version_has_the_modes_of_the_model_directory_readable_by_another_user(tmp_path):
    """Not mkdtemp's 0700: every directory 0777 less the umask, as os.makedirs made the model's own."""
    model, fields, _layout = bag_mean_model(opset=17)
    path = save(model, tmp_path / "src")
    out = tmp_path / "models" / "bags" / "1"
    old = os.umask(0o022)
    try:
        code, output = run_import(path, fields, out, "--name", "bags")
    finally:
        os.umask(old)
    assert code == 0, output
    modes = {p: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert (out.parent.stat().st_mode & 0o777) == 0o755
    assert {p: m for p, m in modes.items() if p.is_dir() and m != 0o755} == {}
    # Every file readable by group and others (the service user), none writable by them.
    assert {p: oct(m) for p, m in modes.items() if not p.is_dir() and (m & 0o044 != 0o044 or m & 0o022)} == {}
    assert len([p for p in modes if not p.is_dir()]) >= 8


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, words", [
    ("matmul", ["'tied_mm' (MatMul)", "table 'emb'"]),
    ("max", ["'pool_max' (ReduceMax)", "sum or mean"]),
    ("wrong_axis", ["'pool_axis2' (ReduceSum)", "axes [2]"]),
    ("axis1", ["'gather_cols' (Gather)", "axis 1"]),
    ("ids_as_numbers", ["'ids_sum' (ReduceSum)", "input 'ids'"]),
    ("aux", ["input 'aux' is not read by an embedding lookup"]),
])
def test_an_unsupported_graph_is_refused_naming_the_node(tmp_path, variant, words):
    model, fields = _tiny(variant)
    path = save(model, tmp_path / "src")
    out = tmp_path / "models" / "tiny" / "1"
    code, output = run_import(path, fields, out)
    assert code == 2, output
    for w in words:
        assert w in output, output
    assert not (tmp_path / "models").exists()


def test_tables_of_different_dims_are_refused_naming_both(tmp_path):
    model, fields = _tiny("dims")
    path = save(model, tmp_path / "src")
    out = tmp_path / "out"
    code, output = run_import(path, fields, out)
    assert code == 2
    assert "different dims" in output and "emb [10, 8]" in output and "emb_wide [7, 6]" in output
    assert not out.exists()


def test_a_model_onnx_checker_rejects_is_refused(tmp_path):
    model, fields = _tiny("max")
    model.graph.node[-1].input[0] = "no_such_tensor"
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    code, output = run_import(path, fields, tmp_path / "out")
    assert code == 2
    assert "onnx.checker rejects the model" in output and "no_such_tensor" in output


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace('input = "ids"', 'input = "idz"'), ["'idz'", "does not have", "dense_x, ids"]),
    (lambda t: t.replace('input = "dense_x"', 'input = "dense_x"\nside = "item"'), ["item-side dense input"]),
    (lambda t: t.replace('[dense]\ninput = "dense_x"\n', ""), ["graph input 'dense_x'", "not described"]),
    (lambda t: t.replace('max_len = 3', 'max_len = 3\npooling = "sum"'), ["unknown key pooling"]),
    (lambda t: t.replace('kind = "multihot"\nmax_len = 3', 'kind = "onehot"\nmax_len = 3'), ["max_len = 1"]),
])
def test_a_bad_fields_toml_is_refused_with_the_reason(tmp_path, edit, words):
    model, fields = _tiny("max")
    path = save(model, tmp_path / "src")
    code, output = run_import(path, edit(fields), tmp_path / "out")
    assert code == 2, output
    for w in words:
        assert w in output, output


def test_a_model_whose_score_depends_on_its_batch_fails_the_check_and_leaves_nothing(tmp_path):
    model, fields = _tiny("batch_mean")
    path = save(model, tmp_path / "src")
    out = tmp_path / "models" / "tiny" / "1"
    code, output = run_import(path, fields, out)
    assert code == 2, output
    assert "FAIL" in output and "does not score like the original model" in output
    # Neither the version nor its hidden partial directory, nor the directories made for them.
    assert not (tmp_path / "models").exists()


# --- last: sum pooling needs cube/pooling.py to read pooling = "sum" -----------------------------

def test_a_sum_pooled_padded_model_with_dot_interactions_imports_and_scores_like_the_original(tmp_path):
    model, fields, layout = dlrm_sum_model(opset=13)
    path = save(model, tmp_path / "src")
    out = tmp_path / "models" / "dlrm" / "3"
    code, output = run_import(path, fields, out, "--name", "dlrm", "--version", "3")
    assert code == 0, output
    assert "PASS" in output
    manifest = tomllib.loads((out / "manifest.toml").read_text())
    assert [(f["name"], f["pooling"]) for f in manifest["fields"]] == [
        ("u_cat", "mean"), ("u_tags", "sum"), ("i_cat", "mean"), ("i_tags", "sum")]
    assert_scores_like_the_original(path, layout, out)
    code, result = run_validate(out)
    assert (code, result["ok"]) == (0, True), result
