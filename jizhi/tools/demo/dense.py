"""The demo's dense graph: its layers, its weights, the ONNX model and the calibration of its final layer.

Runs offline, in the process that writes a demo bundle, a further version of
one or a head (``bundle``, ``versions``, ``heads`` of this package);
``bundle_model`` also gives ``jizhi.tools.dlrm`` a bundle's graph inputs and
output, and tests and ``jizhi.tools.structbench`` build the demo's graph
with ``_dense_model`` without a bundle.

The graph (docs/formats.md, "manifest.toml"): a bottom MLP over the dense user
features, a user tower over them and the pooled user fields, gathered per
pair, dot interactions of the tower's output with each item field, a top MLP
and a sigmoid. Weights are He-normal before a ReLU, Glorot-normal on the
linear outputs, zero biases; the final layer is then rescaled
(``_write_calibrated``) so pre-sigmoid logits over sampled pairs have a
chosen mean and spread, which keeps the sigmoid away from 0 and 1.
"""
import math
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jizhi.bundle import write_text
from jizhi.tools.demo.sampling import (_S_CALIBRATION, _S_ONNX, _ZIPF_POPULARITY, _popularity_order, _rng,
                                       _zipf_cdf, _zipf_draw_distinct)

DIM = 32
DENSE_FEATURES = 13
ONNX_OPSET = 17
ONNX_IR_VERSION = 9

# Calibration of the final layer: pre-sigmoid logits over sampled pairs.
_LOGIT_MEAN = -0.5
_LOGIT_STD = 1.5
_CALIBRATION_USERS = 64
_CALIBRATION_ITEMS = 256


def _layers(hidden, dense_features=DENSE_FEATURES, f_user=9, f_item=8, dim=DIM):
    """The dense graph's layers, (name, fan_in, fan_out, followed by ReLU), in
    order: bottom MLP, user tower, then a top MLP of widths ``hidden`` and
    the final one-unit layer ``top<len(hidden)>``."""
    layers = [("bottom0", dense_features, 64, True),
              ("bottom1", 64, 32, True),
              ("tower0", 32 + f_user * dim, 256, True),
              ("tower1", 256, 128, True),
              ("tower2", 128, dim, False)]
    widths = (dim + f_item * dim + f_item,) + tuple(hidden)
    layers += [(f"top{i}", fan_in, fan_out, True) for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]))]
    layers.append((f"top{len(hidden)}", widths[-1], 1, False))
    return tuple(layers)


_LAYERS = _layers((256, 128))


def _dense_weights(seed, layers=_LAYERS):
    """Weights ``{layer: (W float32 [in, out], b float32 [out])}``: He-normal
    before a ReLU, Glorot-normal on the linear outputs, zero biases."""
    weights = {}
    for index, (name, fan_in, fan_out, relu) in enumerate(layers):
        rng = _rng(seed, _S_ONNX, index)
        std = math.sqrt(2.0 / fan_in) if relu else math.sqrt(2.0 / (fan_in + fan_out))
        w = (rng.standard_normal((fan_in, fan_out)) * std).astype(np.float32)
        weights[name] = (w, np.zeros(fan_out, dtype=np.float32))
    return weights


def _dense_model(weights, f_user, f_item, sigmoid=True, layers=_LAYERS, dense_features=DENSE_FEATURES,
                 dim=DIM, graph_name="jizhi_demo_dlrm"):
    """The ONNX model: bottom MLP, user tower, gathered per pair, dot
    interactions with each item field, top MLP, sigmoid.

    With ``sigmoid=False`` the output ``score`` is the pre-sigmoid logit
    (used only to calibrate the final layer). ``layers`` (``_layers``) and
    ``weights`` (``_dense_weights`` of the same layers) must agree.
    """
    nodes, initializers = [], []

    def dense_layer(x, name, relu):
        w, b = weights[name]
        initializers.append(numpy_helper.from_array(w, name + ".W"))
        initializers.append(numpy_helper.from_array(b, name + ".b"))
        nodes.append(helper.make_node("MatMul", [x, name + ".W"], [name + ".mm"]))
        nodes.append(helper.make_node("Add", [name + ".mm", name + ".b"], [name + ".lin"]))
        if not relu:
            return name + ".lin"
        nodes.append(helper.make_node("Relu", [name + ".lin"], [name + ".out"]))
        return name + ".out"

    def mlp(x, group):
        for name, _, _, relu in layers:
            if name.rstrip("0123456789") == group:
                x = dense_layer(x, name, relu)
        return x

    initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    initializers.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"))
    bottom = mlp("dense", "bottom")
    nodes.append(helper.make_node("Flatten", ["user_emb"], ["user_flat"], axis=1))
    nodes.append(helper.make_node("Concat", [bottom, "user_flat"], ["tower_in"], axis=1))
    tower = mlp("tower_in", "tower")
    nodes.append(helper.make_node("Gather", [tower, "user_index"], ["u"], axis=0))
    nodes.append(helper.make_node("Unsqueeze", ["u", "axis1"], ["u3"]))
    nodes.append(helper.make_node("Mul", ["u3", "item_emb"], ["u_times_item"]))
    nodes.append(helper.make_node("ReduceSum", ["u_times_item", "axis2"], ["inter"], keepdims=0))
    nodes.append(helper.make_node("Flatten", ["item_emb"], ["item_flat"], axis=1))
    nodes.append(helper.make_node("Concat", ["u", "item_flat", "inter"], ["top_in"], axis=1))
    logit = mlp("top_in", "top")
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [logit], ["prob"]))
        logit = "prob"
    nodes.append(helper.make_node("Squeeze", [logit, "axis1"], ["score"]))

    return bundle_model(nodes, initializers, graph_name, "jizhi.tools.demo", dense_features, f_user, f_item, dim)


def bundle_model(nodes, initializers, graph_name, producer, dense_features, f_user, f_item, dim):
    """A checked ModelProto of ``nodes`` with a bundle's inputs (dense, user_emb, item_emb,
    user_index) and output (score [P]), docs/formats.md."""
    graph = helper.make_graph(
        nodes, graph_name,
        inputs=[
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["U", dense_features]),
            helper.make_tensor_value_info("user_emb", TensorProto.FLOAT, ["U", f_user, dim]),
            helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["P", f_item, dim]),
            helper.make_tensor_value_info("user_index", TensorProto.INT64, ["P"]),
        ],
        outputs=[helper.make_tensor_value_info("score", TensorProto.FLOAT, ["P"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, producer_name=producer, producer_version="1",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def _reference_scorer(version_dir, dense=None):
    """A ``ReferenceScorer`` of ``version_dir`` whose profiles are memory-mapped, not read.

    The calibration and the trace score a few thousand pairs: with mapped
    profiles they read only those rows (and the ids), so a catalogue of
    10 M users costs them seconds and no GiB of RAM; the scores are the
    same (the same files, read-only).
    """
    from jizhi.tools.reference import ReferenceScorer

    class MappedScorer(ReferenceScorer):
        mmap_mode = "r"

    return MappedScorer(version_dir, dense=dense)


def _calibrate(seed, version_dir, weights, dense=None, last="top2", logit_mean=_LOGIT_MEAN, logit_std=_LOGIT_STD):
    """Rescale the final layer ``last`` so pre-sigmoid logits over sampled
    (user, popular items) pairs have mean ``logit_mean`` and std ``logit_std``.

    ``version_dir`` must hold the profiles, the cube, a logit-output
    ``dense.onnx`` and a manifest (without files) already; or, with
    ``dense`` (a head's directory holding the logit-output graph and a
    manifest), the profiles and cube the head is scored on. Returns the new
    weights.
    """
    scorer = _reference_scorer(version_dir, dense=dense)
    user_ids, item_ids = scorer.profiles["user"]["ids"], scorer.profiles["item"]["ids"]
    rng = _rng(seed, _S_CALIBRATION)
    cdf = _zipf_cdf(item_ids.shape[0], _ZIPF_POPULARITY)
    order = _popularity_order(item_ids)
    per_request = min(_CALIBRATION_ITEMS, item_ids.shape[0])
    users = user_ids[rng.integers(0, user_ids.shape[0], size=_CALIBRATION_USERS)]
    items = np.concatenate([item_ids[order[_zipf_draw_distinct(rng, cdf, per_request)]]
                            for _ in range(_CALIBRATION_USERS)])
    offsets = np.arange(_CALIBRATION_USERS + 1, dtype=np.int64) * per_request
    logits, _ = scorer.score_requests(users, offsets, items)
    logits = logits.astype(np.float64)
    scale = logit_std / max(float(logits.std()), 1e-12)
    shift = logit_mean - scale * float(logits.mean())
    w, b = weights[last]
    calibrated = dict(weights)
    calibrated[last] = ((w * scale).astype(np.float32), (b * scale + shift).astype(np.float32))
    return calibrated


def _write_calibrated(directory, manifest_text, seed, f_user, f_item, base=None, logit_std=_LOGIT_STD, **graph):
    """Write ``<directory>/dense.onnx``: the graph of ``_dense_weights(seed)`` with its final layer calibrated.

    The calibration scores pairs with the graph itself (``_calibrate``), so
    the logit-output graph and ``manifest_text`` (a manifest listing no
    files) stand in ``directory`` while it runs; the manifest is removed
    after, for the caller to write the final one. The pairs' features come
    from ``directory`` (a full version being assembled) or, for a head, from
    its ``base`` version. ``graph``: ``_dense_model``'s shape arguments
    (``layers``, ``dense_features``, ``dim``, ``graph_name``).
    """
    layers = graph.get("layers", _LAYERS)
    onnx_path = os.path.join(directory, "dense.onnx")
    manifest_path = os.path.join(directory, "manifest.toml")
    weights = _dense_weights(seed, layers)
    onnx.save(_dense_model(weights, f_user, f_item, sigmoid=False, **graph), onnx_path)
    write_text(manifest_path, manifest_text)
    weights = _calibrate(seed, base or directory, weights, dense=directory if base else None, last=layers[-1][0],
                         logit_std=logit_std)
    onnx.save(_dense_model(weights, f_user, f_item, sigmoid=True, **graph), onnx_path)
    os.remove(manifest_path)
