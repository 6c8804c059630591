"""Models as teams export them: small DLRM- and DCN-shaped PyTorch modules, exported by torch.onnx.export.

Test-time only (torch is a test dependency; nothing under jizhi/ imports it).
``make(family, exporter, layout, out_dir)`` builds one model from its seed,
exports it to ``out_dir/model.onnx`` with FIELDS.toml beside it
(``out_dir/fields.toml``) and returns a ``Fixture`` that can score raw ids with
the PyTorch module itself (``Fixture.torch_scores``), so a test compares
jizhi's scores with PyTorch's, not only with onnxruntime's.

Families (``FAMILIES``):

* ``dlrm_sum`` / ``dlrm_mean``: the reference DLRM (facebookresearch/dlrm,
  ``dlrm_s_pytorch.py``): bottom MLP on the dense features, ``nn.EmbeddingBag``
  per table (sum or mean), the ``dot`` interaction written as the reference
  writes it (``cat([x] + ly).view(batch, -1, d)``, ``bmm(T, T^T)``, the strict
  lower triangle picked by constant index lists ``Z[:, li, lj]``), ``cat([x,
  Zflat])`` and the top MLP with a sigmoid.
* ``dcn``: DCN-v2 (Wang et al. 2021), a second interaction family: ``x0 =
  cat(bottom(dense), embeddings)``, two cross layers ``x0 * (x W + b) + x``
  beside a deep MLP, then a linear head and a sigmoid.

Layouts (``LAYOUTS``), the inputs the exported graph takes:

* ``tables``: one ``indices`` [N] / ``offsets`` [B] pair per table
  (``nn.EmbeddingBag(indices, offsets)``), fields interleaved user, item, user...;
* ``fb``: the Criteo layout of ``dlrm_s_pytorch.py --save-onnx``: ``dense_x``
  [B, 13], ``offsets`` [F, B] and ``indices`` [F, B] (one id per bag), row k
  read by table k, the batch axis axis 1; the multi-hot fields (the same as
  ``tables``'s) stacked the same way in ``bag_offsets`` [M, B] and
  ``bag_indices`` [M, L * B] (full bags of L);
* ``bf``: fields stacked the other way and one shared ``nn.Embedding`` (row 0
  the padding row): ``user_single`` [B, S] (one-hot), ``user_multi`` [B, 2, L]
  (multi-hot, padded with 0, sum-pooled), ``item_single`` [B, S], ``item_multi``
  [B, 2, L] (S = ``Size.per_side`` - 2); the blocks are concatenated and
  unbound into field vectors before the interaction.

``Size``: ``TEST`` (small, for the tests) and ``BENCH`` (issue 20's DLRM
shape, for docs/run-real-models-bench.py). ``score_pairs`` scores pairs of
an imported bundle's profiles through jizhi's stage processors and through
the PyTorch module on the same raw ids.

Exporters (``EXPORTERS``): ``script`` (``dynamo=False``, TorchScript) and
``dynamo`` (torch's default). ``opset`` and ``external`` (weights in an
external data file) vary the file further.
"""
import dataclasses
import os

import numpy as np
import torch
from torch import nn

from test_import import jizhi_scores

FAMILIES = ("dlrm_sum", "dlrm_mean", "dcn")
EXPORTERS = ("script", "dynamo")
LAYOUTS = ("tables", "fb", "bf")


def combinations():
    """Every (family, exporter, layout) a team can bring. Not ``dlrm_mean`` in the ``bf`` layout: a mean
    over padded bags counts the padding rows (``emb(x).mean(dim=2)``), which no server that drops padding
    can reproduce; the importer refuses it, naming the node (tests/test_real_models.py)."""
    return [(f, e, l) for f in FAMILIES for e in EXPORTERS for l in LAYOUTS if (f, l) != ("dlrm_mean", "bf")]
DENSE = 13
BAG = 5                   # multi-hot bag length


@dataclasses.dataclass(frozen=True)
class Size:
    """How big a fixture is. ``per_side`` sparse fields per side; in the ``bf`` layout ``per_side - 2``
    one-hot and 2 multi-hot per side; ``rows`` per table (``bf``: of the one shared table)."""
    dim: int
    bottom: tuple         # hidden widths of the bottom MLP (its last layer outputs dim)
    top: tuple            # hidden widths of the top MLP (DLRM) or the deep MLP (DCN)
    per_side: int
    rows: int


TEST = Size(dim=16, bottom=(32,), top=(64, 32), per_side=5, rows=300)
# The shape of issue 20's DLRM: 16 sparse fields (8 user, 8 item; four multi-hot bags of 5), 13 dense
# features, bottom MLP 13-64-32, dot interaction, top MLP 256-128-1; 200,000 rows of dim 32 in all.
BENCH = Size(dim=32, bottom=(64,), top=(256, 128), per_side=8, rows=12_500)


@dataclasses.dataclass
class FieldInfo:
    name: str
    side: str
    kind: str             # onehot | multihot
    max_len: int
    rows: int             # rows of the table it reads
    padding: bool = False  # row 0 is the padding row (bf layout)


def _mlp(sizes, seed, sigmoid=False):
    torch.manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def _interact_dot(x, ly):
    """The reference DLRM's ``interact_features`` with ``arch_interaction_op == "dot"``."""
    batch_size, d = x.shape
    t = torch.cat([x] + ly, dim=1).view((batch_size, -1, d))
    z = torch.bmm(t, torch.transpose(t, 1, 2))
    _, ni, nj = z.shape
    li = torch.tensor([i for i in range(ni) for j in range(i)])
    lj = torch.tensor([j for i in range(nj) for j in range(i)])
    zflat = z[:, li, lj]
    return torch.cat([x] + [zflat], dim=1)


class _Net(nn.Module):
    """Bottom MLP, an interaction over the pooled field vectors, top MLP: the part every layout shares."""

    def __init__(self, family, n_vectors, size, seed):
        super().__init__()
        self.family = family
        self.bot = _mlp([DENSE, *size.bottom, size.dim], seed)
        if family == "dcn":
            width = size.dim * n_vectors
            torch.manual_seed(seed + 1)
            self.cross = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
            self.deep = _mlp([width, *size.top], seed + 2)
            self.head = _mlp([width + size.top[-1], 1], seed + 3, sigmoid=True)
        else:
            pairs = n_vectors * (n_vectors - 1) // 2
            self.top = _mlp([size.dim + pairs, *size.top, 1], seed + 1, sigmoid=True)

    def finish(self, dense_x, ly):
        x = self.bot(dense_x)
        if self.family != "dcn":
            return self.top(_interact_dot(x, ly))
        x0 = torch.cat([x] + ly, dim=1)
        xl = x0
        for layer in self.cross:
            xl = x0 * layer(xl) + xl
        return self.head(torch.cat([xl, self.deep(x0)], dim=1))


class TablesModel(nn.Module):
    """One EmbeddingBag per table, one (indices, offsets) input pair per table."""

    def __init__(self, family, fields, size, seed):
        super().__init__()
        mode = "mean" if family == "dlrm_mean" else "sum"
        torch.manual_seed(seed + 10)
        self.emb = nn.ModuleList([nn.EmbeddingBag(f.rows, size.dim, mode=mode) for f in fields])
        self.net = _Net(family, 1 + len(fields), size, seed)

    def forward(self, dense_x, *bags):
        ly = [e(bags[2 * k], bags[2 * k + 1]) for k, e in enumerate(self.emb)]
        return self.net.finish(dense_x, ly)


def _stack_slots(fields):
    """[(stack, slot)] of each field in the ``fb`` layout: one-hot fields in the ``indices`` stack,
    multi-hot ones in the ``bag_indices`` stack, each in field order."""
    count, out = {}, []
    for f in fields:
        stack = "bag" if f.kind == "multihot" else "one"
        out.append((stack, count.get(stack, 0)))
        count[stack] = count.get(stack, 0) + 1
    return out


class CriteoModel(nn.Module):
    """dlrm_s_pytorch.py's layout: stacked offsets [F, B] and indices [F, B], row k for table k (and the
    multi-hot fields' full bags stacked as bag_offsets [M, B], bag_indices [M, L * B])."""

    def __init__(self, family, fields, size, seed):
        super().__init__()
        mode = "mean" if family == "dlrm_mean" else "sum"
        torch.manual_seed(seed + 10)
        self.emb = nn.ModuleList([nn.EmbeddingBag(f.rows, size.dim, mode=mode) for f in fields])
        self.slots = _stack_slots(fields)
        self.net = _Net(family, 1 + len(fields), size, seed)

    def forward(self, dense_x, offsets, indices, bag_offsets, bag_indices):
        ly = [e(indices[k], offsets[k]) if stack == "one" else e(bag_indices[k], bag_offsets[k])
              for e, (stack, k) in zip(self.emb, self.slots)]
        return self.net.finish(dense_x, ly)


class StackedModel(nn.Module):
    """Fields stacked on axis 1 ([B, F] one-hot, [B, F, L] multi-hot), one shared table, row 0 padding."""

    def __init__(self, family, size, seed):
        super().__init__()
        torch.manual_seed(seed + 10)
        self.emb = nn.Embedding(size.rows, size.dim, padding_idx=0)
        self.mean = family == "dlrm_mean"
        self.net = _Net(family, 1 + 2 * size.per_side, size, seed)

    def pool(self, bags):
        return self.emb(bags).mean(dim=2) if self.mean else self.emb(bags).sum(dim=2)

    def forward(self, dense_x, user_single, user_multi, item_single, item_multi):
        us = self.emb(user_single)                  # [B, per_side - 2, D]
        um = self.pool(user_multi)                  # [B, 2, D]
        its = self.emb(item_single)
        im = self.pool(item_multi)
        vectors = torch.cat([us, um, its, im], dim=1)     # [B, 10, D]
        ly = list(torch.unbind(vectors, dim=1))
        return self.net.finish(dense_x, ly)


def fields_of(layout, size):
    """The FieldInfo list of a layout, in the model's table order."""
    if layout == "bf":
        out = []
        for side in ("user", "item"):
            out += [FieldInfo(f"{side[0]}_s{k}", side, "onehot", 1, size.rows, True)
                    for k in range(size.per_side - 2)]
            out += [FieldInfo(f"{side[0]}_m{k}", side, "multihot", BAG, size.rows, True) for k in range(2)]
        return out
    out = []
    for k in range(size.per_side):
        for side in ("user", "item"):
            multi = layout in ("tables", "fb") and k % 3 == 2
            out.append(FieldInfo(f"{side[0]}{k}", side, "multihot" if multi else "onehot",
                                 BAG if multi else 1, size.rows + 7 * k))
    return out


def fields_toml(layout, fields):
    """FIELDS.toml text for ``jizhictl import`` (docs/formats.md, "Importing a model")."""
    lines = ['output = "prob"', "", "[dense]", 'input = "dense_x"', ""]
    for k, f in enumerate(fields):
        lines += ["[[fields]]", f'name = "{f.name}"', f'side = "{f.side}"', f'kind = "{f.kind}"',
                  f"max_len = {f.max_len}"]
        if layout == "tables":
            lines += [f'indices = "idx_{k}"', f'offsets = "off_{k}"']
        elif layout == "fb":
            stack, slot = _stack_slots(fields)[k]
            prefix = "bag_" if stack == "bag" else ""
            lines += [f'indices = "{prefix}indices"', f'offsets = "{prefix}offsets"', f"index = {slot}"]
        else:
            group = f"{f.side}_{'single' if f.kind == 'onehot' else 'multi'}"
            lines += [f'input = "{group}"', f"index = {int(f.name[3:])}", "padding_idx = 0"]
        lines.append("")
    return "\n".join(lines)


@dataclasses.dataclass
class Fixture:
    family: str
    exporter: str
    layout: str
    model_path: str
    fields_path: str
    fields: list
    module: nn.Module

    @property
    def label(self):
        return f"{self.family}/{self.exporter}/{self.layout}"

    def inputs(self, dense, bags):
        """The module's inputs for B examples: ``dense`` f32 [B, 13]; ``bags[k]``: a list of B
        lists of table rows (the field's bag, no padding) for field k."""
        b = dense.shape[0]
        args = [torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))]
        if self.layout == "tables":
            for bag in bags:
                lens = np.array([len(x) for x in bag], dtype=np.int64)
                flat = np.array([v for x in bag for v in x], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
                args += [torch.from_numpy(flat), torch.from_numpy(offsets)]
        elif self.layout == "fb":
            for stack in ("one", "bag"):
                rows = [bag for bag, (s, _) in zip(bags, _stack_slots(self.fields)) if s == stack]
                lengths = {len(x) for bag in rows for x in bag}
                assert len(lengths) == 1, f"the {stack} stack takes full bags of one length, not {lengths}"
                n = lengths.pop()
                indices = np.array([[v for x in bag for v in x] for bag in rows], dtype=np.int64)
                offsets = np.tile(np.arange(b, dtype=np.int64) * n, (len(rows), 1))
                args += [torch.from_numpy(offsets), torch.from_numpy(indices)]
        else:
            groups = {}
            for f, bag in zip(self.fields, bags):
                width = f.max_len
                padded = np.zeros((b, width), dtype=np.int64)
                for r, x in enumerate(bag):
                    padded[r, :len(x)] = x
                groups.setdefault((f.side, f.kind), []).append(padded)
            for side in ("user", "item"):
                args.append(torch.from_numpy(np.stack(groups[(side, "onehot")], axis=1)[:, :, 0].copy()))
                args.append(torch.from_numpy(np.stack(groups[(side, "multihot")], axis=1)))
        return tuple(args)

    def torch_scores(self, dense, bags):
        with torch.no_grad():
            return self.module(*self.inputs(dense, bags)).numpy().reshape(-1)


def _example_bags(fields, b, rng, full=False):
    bags = []
    for f in fields:
        low = 1 if f.padding else 0
        if f.kind == "onehot":
            bags.append([[int(rng.integers(low, f.rows))] for _ in range(b)])
        else:
            bags.append([list(rng.integers(low, f.rows, size=f.max_len if full else int(rng.integers(1, f.max_len + 1))))
                         for _ in range(b)])
    return bags


def make(family, exporter, layout, out_dir, *, size=TEST, seed=1, opset=None, external=False):
    """Build, export and describe one fixture in ``out_dir``; a ``Fixture``."""
    os.makedirs(out_dir, exist_ok=True)
    fields = fields_of(layout, size)
    if layout == "tables":
        module = TablesModel(family, fields, size, seed)
    elif layout == "fb":
        module = CriteoModel(family, fields, size, seed)
    else:
        module = StackedModel(family, size, seed)
    module.eval()
    model_path = os.path.join(out_dir, "model.onnx")
    fields_path = os.path.join(out_dir, "fields.toml")
    fixture = Fixture(family, exporter, layout, model_path, fields_path, fields, module)
    rng = np.random.default_rng(seed)
    b = 4
    example = fixture.inputs(rng.standard_normal((b, DENSE)).astype(np.float32),
                             _example_bags(fields, b, rng, full=layout == "fb"))
    names = ["dense_x"]
    if layout == "tables":
        for k in range(len(fields)):
            names += [f"idx_{k}", f"off_{k}"]
    elif layout == "fb":
        names += ["offsets", "indices", "bag_offsets", "bag_indices"]
    else:
        names += ["user_single", "user_multi", "item_single", "item_multi"]
    kwargs = dict(input_names=names, output_names=["prob"], external_data=external)
    if exporter == "script":
        if layout == "tables":
            axes = {n: {0: ("N" + n[4:] if n.startswith("idx") else "B")} for n in names}
        elif layout == "fb":
            axes = {"dense_x": {0: "B"}, "offsets": {1: "B"}, "indices": {1: "B"}, "bag_offsets": {1: "B"},
                    "bag_indices": {1: "LB"}}
        else:
            axes = {n: {0: "B"} for n in names}
        axes["prob"] = {0: "B"}
        torch.onnx.export(module, example, model_path, dynamo=False, opset_version=opset or 17,
                          dynamic_axes=axes, **kwargs)
    else:
        batch = torch.export.Dim("B", min=2)
        if layout == "tables":
            # forward(dense_x, *bags): the varargs are one tuple in dynamic_shapes; a bag count may
            # equal the batch in the example, so let torch.export relate the dims itself (DYNAMIC).
            shapes = [{0: batch}, tuple({0: torch.export.Dim.DYNAMIC} for _ in range(2 * len(fields)))]
        elif layout == "fb":
            shapes = [{0: batch}, {1: batch}, {1: batch}, {1: batch}, {1: torch.export.Dim.DYNAMIC}]
        else:
            shapes = [{0: batch}] * 5
        torch.onnx.export(module, example, model_path, dynamo=True, opset_version=opset or 18,
                          dynamic_shapes=tuple(shapes), **kwargs)
    if external:
        import onnx   # the weights moved to model.onnx.data beside the model, as large models ship
        model = onnx.load(model_path)
        onnx.save_model(model, model_path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")   # onnx's default threshold: shape constants stay inline
    with open(fields_path, "w") as f:
        f.write(fields_toml(layout, fields))
    return fixture


# --- jizhi against PyTorch ---------------------------------------------------------------

def _profile_bags(version, field, rows):
    """Table rows of a field's bags for profile ``rows`` (raw value - 1), the newest max_len kept."""
    base = os.path.join(version, "profiles", field.side + "s")
    if field.kind == "onehot":
        values = np.load(os.path.join(base, f"{field.name}.npy"))[rows]
        return [[int(v) - 1] if v else [] for v in values]
    values = np.load(os.path.join(base, f"{field.name}.values.npy"))
    offsets = np.load(os.path.join(base, f"{field.name}.offsets.npy"))
    return [[int(v) - 1 for v in values[max(offsets[r], offsets[r + 1] - field.max_len):offsets[r + 1]]]
            for r in rows]


def score_pairs(fixture, version, requests=4, per=40, seed=7):
    """(jizhi, pytorch): scores of ``requests`` random users x ``per`` random items of the imported
    ``version``'s profiles, by jizhi's stages and by the fixture's PyTorch module on the same raw ids."""
    version = os.fspath(version)
    rng = np.random.default_rng(seed)
    user_ids = np.load(os.path.join(version, "profiles", "users", "ids.npy"))
    item_ids = np.load(os.path.join(version, "profiles", "items", "ids.npy"))
    user_rows = rng.choice(user_ids.shape[0], requests, replace=False)
    item_rows = rng.choice(item_ids.shape[0], requests * per)
    offsets = np.arange(requests + 1, dtype=np.int64) * per
    jizhi = np.asarray(jizhi_scores(version, user_ids[user_rows], offsets, item_ids[item_rows]), dtype=np.float32)
    pair_users = np.repeat(user_rows, per)
    dense = np.load(os.path.join(version, "profiles", "users", "dense.npy"))[pair_users]
    bags = [_profile_bags(version, f, pair_users if f.side == "user" else item_rows) for f in fixture.fields]
    return jizhi, fixture.torch_scores(dense, bags)
