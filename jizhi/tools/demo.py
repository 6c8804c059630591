"""The demo bundle and its request trace: synthetic, deterministic from a seed.

Runs offline, in the process that calls it (``jizhictl``'s demo commands,
tests, benchmarks). ``init_demo`` writes ``<out_dir>/models/demo/1/`` in the
bundle format of docs/formats.md; ``generate_trace`` writes a ``trace.npz``
of requests against such a bundle. ``stage_version`` and ``publish`` make
further versions of a demo bundle (other dense weights, or deliberately bad
ones for tests) and drop them into the watch directory the way a model
pipeline should: copy into ``<models>/.incoming/``, then one rename.
``write_head`` (and ``python -m jizhi.tools.demo head``) writes a head bundle: a
dense graph of its own served on the demo's features (docs/formats.md).

The demo model is a small DLRM: 13 dense user features; user fields
``u_cat0..5`` (onehot), ``u_multi0..1`` (multihot, up to 5 values) and
``u_hist`` (history of up to 50 item ids, hashed into the ``i_id`` table);
item fields ``i_id`` (the item's own id), ``i_cat1..5`` (onehot) and
``i_multi0..1`` (multihot). Entity ids are distinct random uint64 below
2**63, sorted, so an id is never its row. Categorical values follow a
Zipf-like law over the vocabulary (value 1 the most frequent); about 1% of
onehot category values are missing (0), and about 0.5% of category and
multihot vocabulary signatures are left out of the cube so that a missing
signature happens in normal traffic.

Item popularity (which items histories and trace candidates favour) is a
Zipf law over a fixed permutation of the items: the items ordered by a hash
of their id (``_popularity_order``). It is derived from the bundle alone,
so it needs no extra file and the trace favours the same items as the
histories.

Every random draw comes from its own stream ``default_rng([seed, stream,
...])``, so changing one size does not reshuffle unrelated parts. The same
arguments give byte-identical bundle files.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import statistics
import sys
import tomllib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jizhi.bundle import Bundle, file_entries, find_version, save_array, save_field, toml_value, write_text
from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.cube.build import read_all, write_cube
from jizhi.cube.signature import sign, sign_padded
from jizhi.errors import BundleError

NAME = "demo"
VERSION = 1
DIM = 32
DENSE_FEATURES = 13
HASH_SEED = 0
ONNX_OPSET = 17
ONNX_IR_VERSION = 9

# Zipf exponents: category values, multihot values, item popularity.
_ZIPF_CATEGORY = 1.1
_ZIPF_MULTIHOT = 1.0
_ZIPF_POPULARITY = 1.0
_MISSING_ONEHOT = 0.01       # fraction of onehot category values that are 0
_CUBE_LEFT_OUT = 0.005       # fraction of category/multihot signatures not in the cube
_EMBEDDING_STD = 0.1
# Calibration of the final layer: pre-sigmoid logits over sampled pairs.
_LOGIT_MEAN = -0.5
_LOGIT_STD = 1.5
_CALIBRATION_USERS = 64
_CALIBRATION_ITEMS = 256
# Hash field id of the popularity order; 0 is no model field.
_POPULARITY_FIELD = 0

# Random streams, one per purpose (the second word of the rng seed).
_S_USERS, _S_ITEMS, _S_FIELD, _S_CUBE, _S_ONNX, _S_CALIBRATION, _S_TRACE = range(1, 8)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    id: int
    side: str
    kind: str
    max_len: int
    vocab: int
    shares: str | None = None


def _fields(items):
    """The demo model's fields, in manifest (= graph column) order."""
    return (
        _Field("u_cat0", 1, "user", "onehot", 1, 1000),
        _Field("u_cat1", 2, "user", "onehot", 1, 500),
        _Field("u_cat2", 3, "user", "onehot", 1, 200),
        _Field("u_cat3", 4, "user", "onehot", 1, 100),
        _Field("u_cat4", 5, "user", "onehot", 1, 50),
        _Field("u_cat5", 6, "user", "onehot", 1, 20),
        _Field("u_multi0", 7, "user", "multihot", 5, 5000),
        _Field("u_multi1", 8, "user", "multihot", 5, 2000),
        _Field("u_hist", 9, "user", "history", 50, items, shares="i_id"),
        _Field("i_id", 10, "item", "onehot", 1, items),
        _Field("i_cat1", 11, "item", "onehot", 1, 2000),
        _Field("i_cat2", 12, "item", "onehot", 1, 500),
        _Field("i_cat3", 13, "item", "onehot", 1, 200),
        _Field("i_cat4", 14, "item", "onehot", 1, 50),
        _Field("i_cat5", 15, "item", "onehot", 1, 20),
        _Field("i_multi0", 16, "item", "multihot", 5, 5000),
        _Field("i_multi1", 17, "item", "multihot", 5, 1000),
    )


def _rng(seed, *stream):
    return np.random.default_rng([int(seed), *stream])


def _distinct_ids(rng, n):
    """``n`` distinct uint64 ids in [1, 2**63), sorted ascending."""
    ids = np.empty(0, dtype=np.uint64)
    while ids.shape[0] < n:
        more = rng.integers(1, 2**63, size=n - ids.shape[0], dtype=np.uint64)
        ids = np.unique(np.concatenate([ids, more]))
    return ids


def _zipf_cdf(n, exponent):
    """CDF (float64 [n]) of a Zipf law over ranks 0..n-1 (rank 0 the most likely)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _zipf_draw(rng, cdf, size):
    """``size`` ranks drawn with replacement from ``cdf``."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), cdf.shape[0] - 1)


def _zipf_draw_distinct(rng, cdf, k):
    """``k`` distinct ranks from ``cdf``, in the order sequential draws without
    replacement would give them.

    Redrawing with replacement and keeping first appearances has exactly
    that law; it is fast while ``k`` is small next to ``len(cdf)``. For
    large ``k`` it switches to exponential keys (Efraimidis-Spirakis), which
    is the same law in O(len(cdf)).
    """
    n = cdf.shape[0]
    if k > n:
        raise ValueError(f"cannot draw {k} distinct of {n}")
    if 4 * k > n:
        weights = np.diff(cdf, prepend=0.0)
        keys = rng.exponential(size=n) / np.maximum(weights, np.finfo(np.float64).tiny)
        chosen = np.argpartition(keys, k - 1)[:k] if k < n else np.arange(n)
        return chosen[np.argsort(keys[chosen], kind="stable")]
    chosen = np.empty(0, dtype=np.int64)
    while chosen.shape[0] < k:
        draws = _zipf_draw(rng, cdf, 2 * (k - chosen.shape[0]) + 16)
        pool = np.concatenate([chosen, draws])
        _, first = np.unique(pool, return_index=True)
        chosen = pool[np.sort(first)][:k]
    return chosen


def _popularity_order(item_ids):
    """Item rows from the most to the least popular: ordered by a hash of the id."""
    return np.argsort(sign(_POPULARITY_FIELD, item_ids.view(np.int64)), kind="stable")


def _ragged(lens, values):
    offsets = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return values.astype(np.int64), offsets


def _field_values(seed, field, rows, item_ids, popularity_cdf, popularity_order):
    """Raw values of one field for ``rows`` entities.

    Returns int64 [rows] for onehot fields and ``(values, offsets)`` for
    multihot and history fields.
    """
    rng = _rng(seed, _S_FIELD, field.id)
    if field.name == "i_id":
        return item_ids.view(np.int64).copy()
    if field.kind == "onehot":
        values = _zipf_draw(rng, _zipf_cdf(field.vocab, _ZIPF_CATEGORY), rows) + 1
        return np.where(rng.random(rows) < _MISSING_ONEHOT, 0, values).astype(np.int64)
    lens = rng.integers(0, field.max_len + 1, size=rows)
    total = int(lens.sum())
    if field.kind == "history":
        ranks = _zipf_draw(rng, popularity_cdf, total)
        return _ragged(lens, item_ids[popularity_order[ranks]].view(np.int64))
    return _ragged(lens, _zipf_draw(rng, _zipf_cdf(field.vocab, _ZIPF_MULTIHOT), total) + 1)


def _item_signatures(fields, data, items):
    """``sigs`` uint64 [I, F_item, L] and ``sig_lens`` int32 [I, F_item] from raw values."""
    width = max(f.max_len for f in fields)
    values = np.zeros((items, len(fields), width), dtype=np.int64)
    lens = np.zeros((items, len(fields)), dtype=np.int32)
    for column, field in enumerate(fields):
        if field.kind == "onehot":
            values[:, column, 0] = data[field.name]
            lens[:, column] = data[field.name] != 0
        else:
            flat, offsets = data[field.name]
            bag_lens = np.diff(offsets)
            rows = np.repeat(np.arange(items), bag_lens)
            within = np.arange(flat.shape[0]) - np.repeat(offsets[:-1], bag_lens)
            values[rows, column, within] = flat
            lens[:, column] = bag_lens
    hash_ids = np.array([f.id for f in fields], dtype=np.int64)
    return sign_padded(hash_ids, values, lens, HASH_SEED), lens


def _cube_entries(seed, fields, item_ids):
    """Signatures and vectors of every vocabulary value of every field.

    History fields add nothing (they read the table they share). A small
    fraction of category/multihot signatures is left out on purpose.
    """
    keys, vectors = [], []
    for field in fields:
        if field.kind == "history":
            continue
        rng = _rng(seed, _S_CUBE, field.id)
        if field.name == "i_id":
            values = item_ids.view(np.int64)
            kept = np.ones(values.shape[0], dtype=bool)
        else:
            values = np.arange(1, field.vocab + 1, dtype=np.int64)
            kept = rng.random(values.shape[0]) >= _CUBE_LEFT_OUT
        field_vectors = rng.standard_normal((values.shape[0], DIM), dtype=np.float32) * np.float32(_EMBEDDING_STD)
        keys.append(sign(field.id, values[kept], HASH_SEED))
        vectors.append(field_vectors[kept])
    return np.concatenate(keys), np.concatenate(vectors)


# --- dense.onnx ---------------------------------------------------------------

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


def _calibrate(seed, version_dir, weights, user_ids, item_ids, dense=None, last="top2",
               logit_mean=_LOGIT_MEAN, logit_std=_LOGIT_STD):
    """Rescale the final layer ``last`` so pre-sigmoid logits over sampled
    (user, popular items) pairs have mean ``logit_mean`` and std ``logit_std``.

    ``version_dir`` must hold the profiles, the cube, a logit-output
    ``dense.onnx`` and a manifest (without files) already; or, with
    ``dense`` (a head's directory holding the logit-output graph and a
    manifest), the profiles and cube the head is scored on. Returns the new
    weights.
    """
    from jizhi.tools.reference import ReferenceScorer

    rng = _rng(seed, _S_CALIBRATION)
    cdf = _zipf_cdf(item_ids.shape[0], _ZIPF_POPULARITY)
    order = _popularity_order(item_ids)
    per_request = min(_CALIBRATION_ITEMS, item_ids.shape[0])
    users = user_ids[rng.integers(0, user_ids.shape[0], size=_CALIBRATION_USERS)]
    items = np.concatenate([item_ids[order[_zipf_draw_distinct(rng, cdf, per_request)]]
                            for _ in range(_CALIBRATION_USERS)])
    offsets = np.arange(_CALIBRATION_USERS + 1, dtype=np.int64) * per_request
    logits, _ = ReferenceScorer(version_dir, dense=dense).score_requests(users, offsets, items)
    logits = logits.astype(np.float64)
    scale = logit_std / max(float(logits.std()), 1e-12)
    shift = logit_mean - scale * float(logits.mean())
    w, b = weights[last]
    calibrated = dict(weights)
    calibrated[last] = ((w * scale).astype(np.float32), (b * scale + shift).astype(np.float32))
    return calibrated


# --- manifest ---------------------------------------------------------------

def _manifest_text(fields, files, name=NAME, version=VERSION):
    """manifest.toml contents; ``files`` is a list of (path, size, sha256)."""
    lines = [
        "format = 1",
        f"name = {toml_value(name)}",
        f"version = {int(version)}",
        f"dim = {DIM}",
        f"hash_seed = {HASH_SEED}",
        'default_vector = "zeros"',
        "",
        "[dense]",
        f"user_features = {DENSE_FEATURES}",
        "",
        "[onnx]",
        'file = "dense.onnx"',
        'output = "score"',
    ]
    for f in fields:
        lines += ["", "[[fields]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in
                  (("name", f.name), ("id", f.id), ("side", f.side), ("kind", f.kind),
                   ("max_len", f.max_len), ("vocab", f.vocab), ("pooling", "mean"))]
        if f.shares is not None:
            lines.append(f"shares = {toml_value(f.shares)}")
    for path, size, digest in files:
        lines += ["", "[[files]]", f"path = {toml_value(path)}", f"size = {size}",
                  f"sha256 = {toml_value(digest)}"]
    return "\n".join(lines) + "\n"


def init_demo(out_dir, seed=7, users=10_000, items=100_000, progress=True):
    """Write the demo bundle ``<out_dir>/models/demo/1/``; return its path.

    Deterministic: the same ``seed``, ``users`` and ``items`` give
    byte-identical files. The version is assembled in a hidden sibling
    directory (``.1.partial``, not a version name, so a watcher ignores it)
    with ``manifest.toml`` written last, then renamed into place, so the
    version appears complete or not at all. Raises FileExistsError when the
    version directory exists already. Progress goes to stderr when
    ``progress`` is true.
    """
    if users < 1 or items < 1:
        raise ValueError("users and items must be positive")
    model_dir = os.path.join(os.fspath(out_dir), "models", NAME)
    version_dir = os.path.join(model_dir, str(VERSION))
    if os.path.exists(version_dir):
        raise FileExistsError(version_dir)
    partial = os.path.join(model_dir, f".{VERSION}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)

    fields = _fields(items)
    user_fields = [f for f in fields if f.side == "user"]
    item_fields = [f for f in fields if f.side == "item"]
    bar = _Progress("init-demo", len(fields) + 5, progress)

    user_ids = _distinct_ids(_rng(seed, _S_USERS), users)
    item_ids = _distinct_ids(_rng(seed, _S_ITEMS), items)
    popularity_cdf = _zipf_cdf(items, _ZIPF_POPULARITY)
    popularity_order = _popularity_order(item_ids)
    user_dir = os.path.join(partial, "profiles", "users")
    item_dir = os.path.join(partial, "profiles", "items")
    save_array(user_dir, "ids", user_ids)
    save_array(user_dir, "dense", _rng(seed, _S_USERS, 1).standard_normal((users, DENSE_FEATURES), dtype=np.float32))
    save_array(item_dir, "ids", item_ids)
    bar.advance(note="ids")

    item_data = {}
    for field in fields:
        rows = users if field.side == "user" else items
        data = _field_values(seed, field, rows, item_ids, popularity_cdf, popularity_order)
        save_field(user_dir if field.side == "user" else item_dir, field, data)
        if field.side == "item":
            item_data[field.name] = data
        bar.advance(note=field.name)

    sigs, sig_lens = _item_signatures(item_fields, item_data, items)
    save_array(item_dir, "sigs", sigs)
    save_array(item_dir, "sig_lens", sig_lens)
    del sigs, sig_lens, item_data
    bar.advance(note="sigs")

    keys, vectors = _cube_entries(seed, fields, item_ids)
    write_cube(os.path.join(partial, "cube"), keys, vectors)
    del keys, vectors
    bar.advance(note="cube")

    weights = _dense_weights(seed)
    onnx_path = os.path.join(partial, "dense.onnx")
    onnx.save(_dense_model(weights, len(user_fields), len(item_fields), sigmoid=False), onnx_path)
    write_text(os.path.join(partial, "manifest.toml"), _manifest_text(fields, []))
    weights = _calibrate(seed, partial, weights, user_ids, item_ids)
    onnx.save(_dense_model(weights, len(user_fields), len(item_fields), sigmoid=True), onnx_path)
    os.remove(os.path.join(partial, "manifest.toml"))
    bar.advance(note="dense.onnx")

    write_text(os.path.join(partial, "manifest.toml"), _manifest_text(fields, file_entries(partial)))
    os.rename(partial, version_dir)
    bar.advance(note="manifest")
    bar.close()
    return version_dir


# --- trace ------------------------------------------------------------------

def _normal_scores(n):
    """Normal scores of ranks 0..n-1: the standard normal quantiles of (r + 0.5) / n."""
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv((r + 0.5) / n) for r in range(n)], dtype=np.float64)


def generate_trace(bundle_dir, path, requests=2000, candidates=500, spearman=0.8, seed=1,
                   progress=True, batch_requests=64, spread=0.0):
    """Write a request trace against the bundle version ``bundle_dir`` to ``path``.

    ``bundle_dir`` is a version directory (holding ``manifest.toml``).
    Each request is a user drawn uniformly from the user profile and
    ``candidates`` distinct items drawn by popularity (a Zipf law over the
    popularity order; popular items first, in draw order). Recall scores
    follow a Gaussian copula with the reference scores of the request: the
    normal scores of the reference ranks, mixed with independent normal
    noise at correlation ``rho = 2 sin(pi * spearman / 6)``, through a
    sigmoid; so the per-request Spearman correlation between recall and
    model scores is ``spearman`` on average.

    ``spread`` > 0 makes requests differ: each draws its own Spearman
    correlation uniformly in ``spearman +- spread`` (within [0, 0.98]), and its
    recall scores are signal plus noise of a fixed level (``z = s x normal
    score + noise``, ``s = rho / sqrt(1 - rho^2)``), so a request whose recall
    agrees more with the model also has more spread-out recall scores, as a
    recall model's confident requests do (the shedding benchmark's
    heterogeneous trace). ``spread = 0`` is the form above. Deterministic in ``seed`` and
    the bundle. Saves the arrays and scalars of docs/formats.md (``Trace``)
    with ``np.savez`` (the zip's timestamps make the file bytes, not the
    arrays, differ between runs).
    """
    from jizhi.tools.reference import ReferenceScorer

    if not -1.0 <= spearman <= 1.0:
        raise ValueError(f"spearman {spearman} is not in [-1, 1]")
    scorer = ReferenceScorer(bundle_dir)
    user_ids = scorer.profiles["user"]["ids"]
    item_ids = scorer.profiles["item"]["ids"]
    if candidates > item_ids.shape[0]:
        raise ValueError(f"{candidates} candidates > {item_ids.shape[0]} items")
    rng = _rng(seed, _S_TRACE)
    cdf = _zipf_cdf(item_ids.shape[0], _ZIPF_POPULARITY)
    order = _popularity_order(item_ids)
    rho = 2.0 * math.sin(math.pi * spearman / 6.0)
    normal = _normal_scores(candidates)

    users = user_ids[rng.integers(0, user_ids.shape[0], size=requests)]
    offsets = np.arange(requests + 1, dtype=np.int64) * candidates
    items = np.empty(requests * candidates, dtype=np.uint64)
    recall = np.empty(requests * candidates, dtype=np.float32)
    bar = _Progress("trace", requests, progress)
    for start in range(0, requests, batch_requests):
        stop = min(start + batch_requests, requests)
        q = stop - start
        lo, hi = offsets[start], offsets[stop]
        for r in range(start, stop):
            items[offsets[r]:offsets[r + 1]] = item_ids[order[_zipf_draw_distinct(rng, cdf, candidates)]]
        scores, _ = scorer.score_requests(users[start:stop], offsets[start:stop + 1] - lo, items[lo:hi])
        # Rank within each request, ties broken at random.
        request = np.repeat(np.arange(q), candidates)
        by_score = np.lexsort((rng.random(hi - lo), scores, request))
        ranks = np.empty(hi - lo, dtype=np.int64)
        ranks[by_score] = np.tile(np.arange(candidates), q)
        if spread > 0:
            sp = np.clip(spearman + rng.uniform(-spread, spread, q), 0.0, 0.98)
            r_i = 2.0 * np.sin(np.pi * sp / 6.0)
            signal = np.repeat(r_i / np.sqrt(1.0 - r_i * r_i), candidates)
            z = signal * normal[ranks] + rng.standard_normal(hi - lo)
        else:
            z = rho * normal[ranks] + math.sqrt(max(1.0 - rho * rho, 0.0)) * rng.standard_normal(hi - lo)
        recall[lo:hi] = 1.0 / (1.0 + np.exp(-z))
        bar.advance(q)
    bar.close()
    with open(path, "wb") as f:
        np.savez(f, users=users, offsets=offsets, items=items, recall_scores=recall,
                 seed=np.int64(seed), candidates=np.int64(candidates), spearman=np.float64(spearman),
                 spread=np.float64(spread))


# --- further versions (hot reload) -------------------------------------------

#: Deliberately bad versions ``stage_version`` can make, for tests of validation and reload.
FAULTS = ("corrupt", "wrong_dim", "nan", "bad_onnx")
_WRONG_DIM = 16
_CORRUPT_BYTES = 16


def _read_demo_manifest(version_dir):
    """(manifest dict, fields) of a version whose manifest ``_manifest_text`` wrote.

    Raises ValueError for any other manifest: re-rendering it from the parsed
    values must give the same text, so nothing in it is silently dropped.
    """
    path = os.path.join(version_dir, "manifest.toml")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    manifest = tomllib.loads(text)
    fields = tuple(_Field(f["name"], f["id"], f["side"], f["kind"], f["max_len"], f["vocab"], f.get("shares"))
                   for f in manifest.get("fields", []))
    files = [(e["path"], e["size"], e["sha256"]) for e in manifest.get("files", [])]
    if not files or _manifest_text(fields, files, manifest.get("name", ""), manifest.get("version", 0)) != text:
        raise ValueError(f"{path}: not a complete manifest written by jizhi.tools.demo")
    return manifest, fields


def _edit_onnx(path, edit):
    """Load the model at ``path``, apply ``edit(model)``, check it and save it in place."""
    model = onnx.load(path)
    edit(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _poison_final_bias(model):
    # NaN in the last bias reaches every score, whatever the inputs.
    for init in model.graph.initializer:
        if init.name == "top2.b":
            bias = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.full(bias.shape, np.nan, dtype=np.float32), init.name))
            return
    raise ValueError("dense.onnx has no initializer top2.b")


def _rename_output(old, new):
    def edit(model):
        for node in model.graph.node:
            node.output[:] = [new if name == old else name for name in node.output]
        for output in model.graph.output:
            if output.name == old:
                output.name = new
    return edit


def _flip_bytes_in_the_middle(path):
    with open(path, "r+b") as f:
        middle = os.fstat(f.fileno()).st_size // 2
        f.seek(middle)
        block = f.read(_CORRUPT_BYTES)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in block))


def _fill_staged(staged, source, manifest, fields, version, seed, fault):
    """Write the staged version's files into the empty directory ``staged`` (see ``stage_version``)."""
    name = manifest["name"]
    for entry in manifest["files"]:
        target = os.path.join(staged, entry["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(source, entry["path"]), target)

    onnx_file = manifest["onnx"]["file"]
    onnx_path = os.path.join(staged, onnx_file)
    manifest_path = os.path.join(staged, "manifest.toml")
    rewritten = set()
    if seed is not None:
        f_user = sum(1 for f in fields if f.side == "user")
        f_item = len(fields) - f_user
        user_ids = np.load(os.path.join(staged, "profiles", "users", "ids.npy"))
        item_ids = np.load(os.path.join(staged, "profiles", "items", "ids.npy"))
        weights = _dense_weights(seed)
        onnx.save(_dense_model(weights, f_user, f_item, sigmoid=False), onnx_path)
        write_text(manifest_path, _manifest_text(fields, [], name, version))
        weights = _calibrate(seed, staged, weights, user_ids, item_ids)
        onnx.save(_dense_model(weights, f_user, f_item, sigmoid=True), onnx_path)
        os.remove(manifest_path)
        rewritten.add(onnx_file)
    if fault == "nan":
        _edit_onnx(onnx_path, _poison_final_bias)
        rewritten.add(onnx_file)
    elif fault == "bad_onnx":
        output = manifest["onnx"]["output"]
        _edit_onnx(onnx_path, _rename_output(output, output + "_renamed"))
        rewritten.add(onnx_file)
    elif fault == "wrong_dim":
        cube_dir = os.path.join(staged, "cube")
        keys, vectors = read_all(cube_dir)
        os.remove(os.path.join(cube_dir, "data.mdb"))
        write_cube(cube_dir, keys, vectors[:, :_WRONG_DIM])
        rewritten.add("cube/data.mdb")

    entries = file_entries(staged)
    # Recomputing [[files]] must not launder a damaged source into a consistent version.
    expected = {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]}
    if sorted(expected) != [path for path, _, _ in entries]:
        raise ValueError(f"{staged}: staged files differ from the source's manifest")
    for path, size, digest in entries:
        if path not in rewritten and expected[path] != (size, digest):
            raise ValueError(f"{source}: {path} differs from its manifest entry; not staging a damaged version")
    write_text(manifest_path, _manifest_text(fields, entries, name, version))
    if fault == "corrupt":
        _flip_bytes_in_the_middle(onnx_path)


def stage_version(models_dir, source_version_dir, version, seed=None, fault=None):
    """Stage a new version of a demo bundle in ``<models_dir>/.incoming/<name>.<version>/``; return its path.

    Runs offline (tests, benchmarks of hot reload), never in a serving
    process. The listed files of ``source_version_dir`` (a version
    ``init_demo`` or this function wrote) are copied, byte for byte and
    never hardlinked (a version's files must not change when another
    version's are truncated), then the manifest is rewritten with
    ``version`` and recomputed [[files]], written last.

    With ``seed``, ``dense.onnx`` gets the dense weights of that seed,
    calibrated as ``init_demo`` calibrates them, so the version scores
    differently from its source in the same range. ``fault`` (one of
    ``FAULTS``) makes a deliberately bad version:

    * ``"corrupt"``: bytes in the middle of dense.onnx are flipped after the
      manifest is written, so its sha256 no longer matches;
    * ``"wrong_dim"``: the cube holds 16-float vectors while the manifest
      and the graph keep dim 32 (manifest consistent);
    * ``"nan"``: the final layer's bias is NaN, so every score is NaN
      (manifest consistent);
    * ``"bad_onnx"``: the graph's output is not named the manifest's
      ``[onnx] output`` (manifest consistent).

    The staged directory is hidden from a watcher (``.incoming``);
    ``publish`` makes it a version. Raises FileExistsError when the staged
    directory or the version exists already, ValueError for an unknown
    fault, a non-positive version, or a source that is not a demo bundle
    or whose files differ from its manifest; a failed staging leaves no
    directory behind.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    version = int(version)
    if version < 1:
        raise ValueError(f"version {version} is not a positive integer")
    source = os.fspath(source_version_dir)
    manifest, fields = _read_demo_manifest(source)
    name = manifest["name"]
    models_dir = os.fspath(models_dir)
    if os.path.lexists(os.path.join(models_dir, name, str(version))):
        raise FileExistsError(os.path.join(models_dir, name, str(version)))
    incoming = os.path.join(models_dir, ".incoming")
    os.makedirs(incoming, exist_ok=True)
    staged = os.path.join(incoming, f"{name}.{version}")
    os.mkdir(staged)
    try:
        _fill_staged(staged, source, manifest, fields, version, seed, fault)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def publish(staged_path, models_dir):
    """Make a staged version visible: rename it to ``<models_dir>/<name>/<version>``; return that path.

    The one atomic step of a version's arrival (DESIGN.md, "Model bundle"):
    a watcher sees the version complete or not at all. ``staged_path`` must
    be on the same filesystem (``stage_version`` puts it in
    ``<models_dir>/.incoming``). Name and version come from its manifest.
    Raises FileExistsError when the version exists already (checked before
    the rename; two concurrent publishers of one version are not guarded).
    """
    staged_path = os.fspath(staged_path)
    with open(os.path.join(staged_path, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)
    model_dir = os.path.join(os.fspath(models_dir), manifest["name"])
    final = os.path.join(model_dir, str(int(manifest["version"])))
    os.makedirs(model_dir, exist_ok=True)
    if os.path.lexists(final):
        raise FileExistsError(final)
    os.rename(staged_path, final)
    return final


# --- head bundles (dense only) ------------------------------------------------

#: Top MLP widths of a head like the demo's own (``hidden`` of ``write_head``).
HEAD_HIDDEN = (256, 128)
# A head's logits over sampled pairs: spread enough to rank, far from saturating the sigmoid.
_HEAD_LOGIT_STD = 1.0


def _head_manifest_text(base_manifest, name, version, files):
    """manifest.toml of a head bundle: the base's dim, hash_seed, default_vector,
    [dense] and [[fields]] (every key copied), ``head = true``, its own graph and files."""
    lines = [
        "format = 1",
        f"name = {toml_value(name)}",
        f"version = {int(version)}",
        "head = true",
        f"dim = {int(base_manifest['dim'])}",
        f"hash_seed = {int(base_manifest.get('hash_seed', 0))}",
        f"default_vector = {toml_value(base_manifest.get('default_vector', 'zeros'))}",
        "",
        "[dense]",
        f"user_features = {int(base_manifest.get('dense', {}).get('user_features', 0))}",
        "",
        "[onnx]",
        'file = "dense.onnx"',
        'output = "score"',
    ]
    for f in base_manifest["fields"]:
        lines += ["", "[[fields]]"]
        for key, value in f.items():
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"field {f.get('name')!r}: cannot copy {key} = {value!r} (strings and integers only)")
            lines.append(f"{key} = {toml_value(value)}")
    for path, size, digest in files:
        lines += ["", "[[files]]", f"path = {toml_value(path)}", f"size = {size}",
                  f"sha256 = {toml_value(digest)}"]
    return "\n".join(lines) + "\n"


def write_head(models_dir, name, version=1, base=None, hidden=HEAD_HIDDEN, seed=11, progress=False):
    """Write the head bundle ``<models_dir>/<name>/<version>/`` for ``base``'s features; return its path.

    Runs offline (tests, benchmarks of multi-model pipelines). A head bundle
    (docs/formats.md, "Head bundles") is a dense graph only: ``manifest.toml``
    (``head = true``, the base's dim, hash_seed, [dense] and [[fields]]) and
    ``dense.onnx``, no cube and no profiles; a pipeline serves it on its
    base model's features (``[[stage]] processor = "model_inference"``,
    ``model = "<name>"``). ``base`` is a full bundle's version directory
    (default: the newest version of ``demo`` in ``models_dir``).

    The graph is the demo's (``_dense_model``: bottom MLP, user tower, dot
    interactions with each item field, top MLP, sigmoid) with a top MLP of
    widths ``hidden`` (``(32,)`` light, ``(512, 256, 128)`` heavy) and
    weights from ``seed``; its final layer is rescaled so the logits over
    pairs sampled from the base's profiles (scored by the ReferenceScorer)
    have std ``_HEAD_LOGIT_STD``, which keeps the sigmoid away from 0 and 1.
    Deterministic: the same base and arguments give byte-identical files.

    Assembled in the hidden sibling ``.<version>.partial`` with the manifest
    written last, then renamed into place, like ``init_demo``. Raises
    FileExistsError when the version exists, ValueError for bad arguments
    (a name that is not a plain directory name or is the base's, empty or
    non-positive widths), BundleError for a base that is not a full bundle.
    """
    models_dir = os.fspath(models_dir)
    if not isinstance(name, str) or not name or name.startswith(".") or os.sep in name or name in (".", ".."):
        raise ValueError(f"head name {name!r} is not a plain directory name")
    version = int(version)
    if version < 1:
        raise ValueError(f"version {version} is not a positive integer")
    hidden = tuple(hidden)
    if not hidden or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in hidden):
        raise ValueError(f"hidden must be one or more positive layer widths, got {hidden!r}")
    base = os.fspath(base) if base is not None else os.fspath(find_version(models_dir, NAME))
    base_bundle = Bundle(base)
    if base_bundle.head:
        raise BundleError(f"{base} is a head bundle: a head's base must have the cube and profiles")
    if name == base_bundle.name:
        raise ValueError(f"head name {name!r} is the base model's: a head is a model of its own")
    with open(os.path.join(base, "manifest.toml"), "rb") as f:
        base_manifest = tomllib.load(f)

    model_dir = os.path.join(models_dir, name)
    version_dir = os.path.join(model_dir, str(version))
    if os.path.lexists(version_dir):
        raise FileExistsError(version_dir)
    partial = os.path.join(model_dir, f".{version}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    bar = _Progress(f"head {name}", 3, progress)
    try:
        f_user, f_item = len(base_bundle.user_fields), len(base_bundle.item_fields)
        layers = _layers(hidden, base_bundle.dense_features, f_user, f_item, base_bundle.dim)
        shape = {"layers": layers, "dense_features": base_bundle.dense_features, "dim": base_bundle.dim,
                 "graph_name": "jizhi_demo_head"}
        weights = _dense_weights(seed, layers)
        onnx_path = os.path.join(partial, "dense.onnx")
        manifest_path = os.path.join(partial, "manifest.toml")
        onnx.save(_dense_model(weights, f_user, f_item, sigmoid=False, **shape), onnx_path)
        write_text(manifest_path, _head_manifest_text(base_manifest, name, version, []))
        bar.advance(note="dense.onnx")
        user_ids = np.load(os.path.join(base, "profiles", "users", "ids.npy"), allow_pickle=False)
        item_ids = np.load(os.path.join(base, "profiles", "items", "ids.npy"), allow_pickle=False)
        weights = _calibrate(seed, base, weights, user_ids, item_ids, dense=partial,
                             last=layers[-1][0], logit_std=_HEAD_LOGIT_STD)
        onnx.save(_dense_model(weights, f_user, f_item, sigmoid=True, **shape), onnx_path)
        os.remove(manifest_path)
        bar.advance(note="calibrated")
        write_text(manifest_path, _head_manifest_text(base_manifest, name, version, file_entries(partial)))
        os.rename(partial, version_dir)
        bar.advance(note="manifest")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(model_dir)     # only when empty: a model directory of no version
        raise
    finally:
        bar.close()
    return version_dir


# --- python -m jizhi.tools.demo -----------------------------------------------------

def _widths(text):
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated layer widths, e.g. 256,128")
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: layer widths must be positive")
    return widths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jizhi.tools.demo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    h = commands.add_parser(
        "head", help="write a head bundle (dense only) on the demo's features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a head bundle MODELS/NAME/VERSION: a model that is only a dense graph\n"
                    "(manifest.toml with head = true, and dense.onnx), with no cube and no profiles\n"
                    "of its own. A pipeline serves it on its base model's features: the base's\n"
                    "reader, feature and cube stages compute the pooled embeddings once, and a\n"
                    "model_inference stage naming the head (model = \"NAME\", output = \"NAME\") runs\n"
                    "its graph; the head is versioned and reloaded on its own. Its dim, hash_seed,\n"
                    "[dense] and [[fields]] are copied from the base, which they must equal.\n\n"
                    "The graph is the demo's (bottom MLP, user tower, dot interactions, top MLP,\n"
                    "sigmoid) with top MLP widths --hidden and weights from --seed, its last layer\n"
                    "scaled so logits over pairs of the base's profiles have std 1.")
    h.add_argument("--models", required=True, metavar="DIR", help="the models directory jizhid watches")
    h.add_argument("--name", required=True, help="the head's model name (a directory of MODELS)")
    h.add_argument("--version", type=int, default=1, help="the head's version (default 1)")
    h.add_argument("--base", metavar="DIR", default=None,
                   help="the base model's version directory (default: the newest MODELS/demo/<version>)")
    h.add_argument("--hidden", type=_widths, default=HEAD_HIDDEN, metavar="W,W,...",
                   help="top MLP layer widths: 32 is light, 512,256,128 heavy (default 256,128, the demo's)")
    h.add_argument("--seed", type=int, default=11, help="the dense weights' seed (default 11)")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        path = write_head(args.models, args.name, version=args.version, base=args.base, hidden=args.hidden,
                          seed=args.seed, progress=not args.quiet)
    except FileExistsError as e:
        print(f"python -m jizhi.tools.demo head: {e} exists already (choose another --version)", file=sys.stderr)
        return 2
    except (BundleError, ValueError) as e:
        print(f"python -m jizhi.tools.demo head: {e}", file=sys.stderr)
        return 2
    print(f"head: {path}")
    print(f'a pipeline on its base serves it with a stage:\n  [[stage]]\n  processor = "model_inference"\n'
          f'  model = "{args.name}"\n  output = "{args.name}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
