"""A DLRM-shaped dense model in bundle input form, written per pair (naive).

Runs offline, in the process that calls it (tests, the structured-features
benchmark, later a bundle builder). ``build`` returns a ``dense.onnx``
ModelProto with the inputs of docs/formats.md: ``dense`` f32[U,13],
``user_emb`` f32[U,F_user,dim], ``item_emb`` f32[P,F_item,dim],
``user_index`` int64[P]; output ``score`` f32[P].

The graph is the naive per-pair form a model importer produces: it first
gathers ``dense`` and ``user_emb`` per pair (``dense_pp``, ``user_emb_pp``),
then computes everything on P rows:

* bottom MLP 13 -> 512 -> 256 -> dim, ReLU after every layer;
* the 1 + F_user + F_item vectors of the dot interaction, each [P,1,dim]:
  the bottom output first, then the sparse fields interleaved user, item,
  user, item... (``field_order``; the longer side's remaining fields last),
  each field cut out of ``user_emb_pp`` / ``item_emb`` by a Slice on axis 1;
* ``T = Concat(vectors, axis=1)`` [P,F,dim], ``Z = MatMul(T, Transpose(T,
  [0,2,1]))`` [P,F,F], ``Flatten(Z, axis=1)`` and a Gather on axis 1 of the
  strictly lower triangle (i > j, row-major: DLRM's ``li, lj``), F(F-1)/2
  entries;
* ``Concat(bottom_out, interactions)`` -> top MLP 256 -> 128 -> 1 (ReLU, ReLU,
  linear), Sigmoid, Squeeze to [P].

Weights follow the reference DLRM's initialisation: W ~ N(0, 2/(fan_in +
fan_out)), b ~ N(0, 1/fan_out); each layer draws from its own stream
``default_rng([seed, layer])``, so the same arguments give the same bytes.
"""
import math

import numpy as np
from onnx import helper, numpy_helper

from jizhi.demo import bundle_model

DENSE_FEATURES = 13
BOTTOM = (512, 256)   # hidden widths; the last bottom layer outputs ``dim``
TOP = (256, 128)      # hidden widths; the last top layer outputs 1


def field_order(n_user_fields, n_item_fields):
    """The sparse fields in interaction order: ``[("user", 0), ("item", 0),
    ("user", 1), ...]``, interleaved, the longer side's remainder last."""
    order = []
    for k in range(max(n_user_fields, n_item_fields)):
        if k < n_user_fields:
            order.append(("user", k))
        if k < n_item_fields:
            order.append(("item", k))
    return order


def lower_triangle(n_vectors):
    """int64 [n(n-1)/2]: flat indices ``i * n + j`` of the entries i > j, row-major."""
    return np.array([i * n_vectors + j for i in range(n_vectors) for j in range(i)], dtype=np.int64)


def _layers(dim, n_vectors):
    """(name, fan_in, fan_out, relu) of every layer, bottom then top."""
    widths = (DENSE_FEATURES, *BOTTOM, dim)
    layers = [(f"bottom{k}", widths[k], widths[k + 1], True) for k in range(len(widths) - 1)]
    widths = (dim + n_vectors * (n_vectors - 1) // 2, *TOP, 1)
    layers += [(f"top{k}", widths[k], widths[k + 1], k + 2 < len(widths)) for k in range(len(widths) - 1)]
    return layers


def build(seed, dim=64, n_user_fields=8, n_item_fields=8, *, sigmoid=True):
    """The naive per-pair DLRM described in the module docstring, as a checked ModelProto.

    ``dim`` is the embedding dimension (the bottom MLP's output width too);
    ``n_user_fields`` and ``n_item_fields`` are F_user and F_item. With
    ``sigmoid=False`` the output ``score`` is the logit.
    """
    if n_user_fields < 1 or n_item_fields < 1:
        raise ValueError("a DLRM needs at least one user and one item field")
    n_vectors = 1 + n_user_fields + n_item_fields
    nodes, initializers = [], []

    def const(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def mlp(x, group):
        for index, (name, fan_in, fan_out, relu) in enumerate(_layers(dim, n_vectors)):
            if not name.startswith(group):
                continue
            rng = np.random.default_rng([int(seed), index])
            w = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out)).astype(np.float32)
            b = rng.normal(0.0, math.sqrt(1.0 / fan_out), fan_out).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [x, const(name + ".W", w)], [name + ".mm"]))
            nodes.append(helper.make_node("Add", [name + ".mm", const(name + ".b", b)], [name + ".lin"]))
            x = name + ".lin"
            if relu:
                nodes.append(helper.make_node("Relu", [x], [name + ".out"]))
                x = name + ".out"
        return x

    const("axis1", np.array([1], dtype=np.int64))
    nodes.append(helper.make_node("Gather", ["dense", "user_index"], ["dense_pp"], axis=0))
    nodes.append(helper.make_node("Gather", ["user_emb", "user_index"], ["user_emb_pp"], axis=0))
    bottom = mlp("dense_pp", "bottom")
    nodes.append(helper.make_node("Unsqueeze", [bottom, "axis1"], ["bottom_vec"]))
    vectors = ["bottom_vec"]
    for side, k in field_order(n_user_fields, n_item_fields):
        source = "user_emb_pp" if side == "user" else "item_emb"
        name = f"{side}_field{k}"
        nodes.append(helper.make_node(
            "Slice", [source, const(f"{name}.start", np.array([k], dtype=np.int64)),
                      const(f"{name}.end", np.array([k + 1], dtype=np.int64)), "axis1"], [name]))
        vectors.append(name)
    nodes.append(helper.make_node("Concat", vectors, ["T"], axis=1))
    nodes.append(helper.make_node("Transpose", ["T"], ["T_t"], perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", ["T", "T_t"], ["Z"]))
    nodes.append(helper.make_node("Flatten", ["Z"], ["Z_flat"], axis=1))
    nodes.append(helper.make_node("Gather", ["Z_flat", const("tri", lower_triangle(n_vectors))],
                                  ["interactions"], axis=1))
    nodes.append(helper.make_node("Concat", [bottom, "interactions"], ["top_in"], axis=1))
    logit = mlp("top_in", "top")
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [logit], ["prob"]))
        logit = "prob"
    nodes.append(helper.make_node("Squeeze", [logit, "axis1"], ["score"]))

    return bundle_model(nodes, initializers, "jizhi_dlrm", "jizhi.dlrm", DENSE_FEATURES, n_user_fields,
                        n_item_fields, dim)
