"""``jizhictl import``: an ONNX model that holds its embedding tables -> a bundle version.

Runs offline, in the process that calls it (``jizhictl import``, tests), never
in a serving process. ``import_model`` reads a DLRM-style model trained
elsewhere (its embedding tables are initializers read by Gather nodes, pooled
by ReduceSum/ReduceMean or by the Loop ``torch.onnx.export`` writes for
``nn.EmbeddingBag``) and a FIELDS.toml that says what its inputs are
(docs/formats.md, "Importing a model"), and writes a bundle version
directory:

* ``cube/``: every row of every table, row ``v`` of field ``f`` under
  ``sign(f.id, v + 1, hash_seed)`` (raw value = row + 1: raw value 0 means
  "missing" in jizhi);
* ``dense.onnx``: the graph with the ids inputs and the lookups replaced by
  jizhi's inputs (``dense``, ``user_emb``, ``item_emb``, ``user_index``) in
  the naive per-pair form: ``Gather(dense, user_index)`` -> ``dense_pp`` and
  ``Gather(user_emb, user_index)`` -> ``user_emb_pp`` first, every pooled
  tensor read from a column of those, the rest of the graph unchanged, its
  output a float32 ``score`` [P];
* ``profiles/``: generated (seeded random valid values) or copied;
* ``manifest.toml``, written last.

Then it proves the split: random pairs scored by jizhi's own stage
processors (data_reader, feature_processor, cube_accessor, model_inference,
in this process, reading the new version's files) must match the original
model run by onnxruntime on the same raw ids within ``CHECK_ATOL +
CHECK_RTOL * |original|``. Everything is written in a hidden directory beside
the target and renamed into place only when the check passes, so a failed
import leaves nothing behind.

Refusals raise ``BundleError`` naming the FIELDS.toml entry, the graph input
or the node (its name and op type) that cannot be imported.

Size: over 700 lines: one concept (a foreign ONNX graph to a bundle) in
several passes (fields, tables, pooling loops, pruning, writing); issue 18
moves it with the other offline tools out of ``jizhi/`` and shares the graph
helpers (``_attr``, ``_constant_value``, ``_dims``) with ``structured.py``.
"""
import collections
import dataclasses
import os
import re
import shutil
import tempfile
import tomllib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from jizhi.bundle import FORMAT, KINDS, Bundle, file_entries, save_array, save_field, toml_value, write_text
from jizhi.cube.build import Table, TableError, build_cube
from jizhi.cube.signature import sign, sign_padded
from jizhi.tools.demo import _distinct_ids, _Progress
from jizhi.errors import BundleError
from jizhi.pipeline import load_class
from jizhi.workers.stage import Batch

# The check: |jizhi - original| <= CHECK_ATOL + CHECK_RTOL * |original| for every pair.
# float32 pools summed in another order differ by a few ulps; an MLP on top
# scales that by its gain, still far below 1e-5 for scores of order 1.
CHECK_ATOL = 1e-5
CHECK_RTOL = 1e-5
CHECK_USERS = 8          # requests (distinct users) the check pairs are spread over
ORIGINAL_BATCH = 256     # pairs per run of the original model: not request-aligned, on purpose
MIN_OPSET = 11           # Slice with inputs, Loop with scan outputs as torch writes them
MISSING_ONEHOT = 0.05    # generated onehot values left missing, where the model can express it

DENSE_PP = "dense_pp"
USER_EMB_PP = "user_emb_pp"
BUNDLE_INPUTS = ("dense", "user_emb", "item_emb", "user_index")
SCORE = "score"

# Ops an ids tensor may pass through on its way to the Gather (input 0 only).
_ID_CHAIN = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
_POOLING = {"ReduceSum": "sum", "ReduceMean": "mean"}
# A Slice "to the end": torch writes sys.maxsize; anything past int32 counts.
_SLICE_END = 2 ** 31 - 1

_FIELD_KEYS = {"name", "id", "side", "kind", "max_len", "input", "padding_idx", "indices", "offsets"}
_DENSE_KEYS = {"input", "side", "features"}
_TOP_KEYS = {"output", "dense", "fields"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Random streams of the generated profiles and the check (second word of the rng seed).
_S_USERS, _S_ITEMS, _S_FIELD, _S_DENSE, _S_CHECK = range(1, 6)


# --- FIELDS.toml -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One ``[[fields]]`` entry of FIELDS.toml, checked."""
    name: str
    id: int
    side: str
    kind: str
    max_len: int
    input: str | None = None          # padded ids [B] or [B, max_len]
    padding_idx: int | None = None    # the row short padded bags are filled with
    indices: str | None = None        # EmbeddingBag: flat ids [N]
    offsets: str | None = None        # EmbeddingBag: bag starts [B] (or [B+1])

    @property
    def inputs(self):
        return (self.input,) if self.input is not None else (self.indices, self.offsets)


@dataclasses.dataclass(frozen=True)
class Spec:
    """FIELDS.toml: the dense input, the output and the fields, in file order."""
    path: str
    dense_input: str | None
    dense_features: int | None
    output: str | None
    fields: tuple


def _refuse(message):
    raise BundleError(message)


def _int(where, key, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _refuse(f"{where}: {key} must be an integer >= {low}, not {value!r}")
    return value


def _str(where, key, value):
    if not isinstance(value, str) or not value:
        _refuse(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def read_fields(path):
    """Parse and check FIELDS.toml (docs/formats.md, "Importing a model"); a ``Spec``.

    Checks what the file alone can tell: known keys, types, unique names, ids
    and inputs, one ids form per field, onehot fields of max_len 1, a
    user-side dense input. Raises BundleError naming the entry.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        _refuse(f"{path}: no such file")
    except tomllib.TOMLDecodeError as e:
        _refuse(f"{path}: not valid TOML: {e}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        _refuse(f"{path}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(_TOP_KEYS))})")
    output = doc.get("output")
    if output is not None:
        _str(path, "output", output)

    dense_input = dense_features = None
    if "dense" in doc:
        dense = doc["dense"]
        where = f"{path}: [dense]"
        if not isinstance(dense, dict):
            _refuse(f"{where} must be a table")
        unknown = sorted(set(dense) - _DENSE_KEYS)
        if unknown:
            _refuse(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(_DENSE_KEYS))})")
        dense_input = _str(where, "input", dense.get("input"))
        side = dense.get("side", "user")
        if side == "item":
            _refuse(f"{where}: side = \"item\": jizhi bundles carry dense features per user only "
                    f"([dense] user_features, profiles/users/dense.npy); an item-side dense input cannot be "
                    f"served. Feed item features as sparse fields, or fold them into the item embeddings")
        if side != "user":
            _refuse(f"{where}: side must be \"user\", not {side!r}")
        if "features" in dense:
            dense_features = _int(where, "features", dense["features"], 1)

    raw_fields = doc.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        _refuse(f"{path}: no [[fields]] (one per sparse feature of the model)")
    fields, names, ids, claimed = [], set(), {}, {}
    if dense_input is not None:
        claimed[dense_input] = "[dense]"
    for position, f in enumerate(raw_fields, 1):
        where = f"{path}: [[fields]] #{position}"
        if not isinstance(f, dict):
            _refuse(f"{where} must be a table")
        name = _str(where, "name", f.get("name"))
        where = f"{path}: field {name!r}"
        if not _NAME.match(name):
            _refuse(f"{where}: a field name is a file name in the profiles: letters, digits, _ . - only")
        unknown = sorted(set(f) - _FIELD_KEYS)
        if unknown:
            _refuse(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(_FIELD_KEYS))})")
        if name in names:
            _refuse(f"{where}: two fields have this name")
        names.add(name)
        field_id = _int(where, "id", f.get("id", position), 1)
        if field_id >= 2 ** 31:
            _refuse(f"{where}: id must be < 2**31")
        if field_id in ids:
            _refuse(f"{where}: id {field_id} is also field {ids[field_id]!r}'s")
        ids[field_id] = name
        side = f.get("side")
        if side not in ("user", "item"):
            _refuse(f"{where}: side must be \"user\" or \"item\", not {side!r}")
        kind = f.get("kind")
        if kind not in KINDS:
            _refuse(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        max_len = _int(where, "max_len", f.get("max_len", 1), 1)
        if kind == "onehot" and max_len != 1:
            _refuse(f"{where}: a onehot field has max_len = 1, not {max_len}")
        has_input, has_bag = "input" in f, ("indices" in f or "offsets" in f)
        if has_input == has_bag:
            _refuse(f"{where}: give either input (padded ids) or indices and offsets (an EmbeddingBag), "
                    f"not {'both' if has_input else 'neither'}")
        if has_bag and not ("indices" in f and "offsets" in f):
            _refuse(f"{where}: an EmbeddingBag field needs both indices and offsets")
        padding_idx = None
        if "padding_idx" in f:
            if not has_input:
                _refuse(f"{where}: padding_idx goes with padded ids (input); EmbeddingBag bags are not padded")
            padding_idx = _int(where, "padding_idx", f["padding_idx"], 0)
        spec = FieldSpec(name, field_id, side, kind, max_len,
                         input=_str(where, "input", f["input"]) if has_input else None,
                         padding_idx=padding_idx,
                         indices=_str(where, "indices", f["indices"]) if has_bag else None,
                         offsets=_str(where, "offsets", f["offsets"]) if has_bag else None)
        for graph_input in spec.inputs:
            if graph_input in claimed:
                _refuse(f"{where}: graph input {graph_input!r} is also claimed by {claimed[graph_input]}")
            claimed[graph_input] = f"field {name!r}"
        fields.append(spec)
    return Spec(path, dense_input, dense_features, output, tuple(fields))


# --- the model's graph ---------------------------------------------------------------

def _node_text(node):
    """How a message names a node: its name and op type."""
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"the unnamed {node.op_type} node making {node.output[0]!r}"


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _constant_value(node):
    """The value of a Constant node as a numpy array."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.int64)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.float32)
    return None


class _Scope:
    """One graph (the model's, or a Loop body inside it): who makes and who reads each name.

    ``consumers`` lists the readers in this graph only (not in its subgraphs);
    ``constant`` looks through this graph and then the enclosing ones, as
    ONNX's outer-scope rule does.
    """

    def __init__(self, graph, outer=None):
        self.graph = graph
        self.outer = outer
        self.producer = {}
        self.consumers = collections.defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for position, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, position))
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self._values = {}

    def defines(self, name):
        return name in self.producer or name in self.initializers or name in self.inputs

    def source(self, name):
        """(scope, name) of the tensor ``name`` is an Identity chain of."""
        scope = self
        while True:
            node = scope.producer.get(name)
            if node is not None and node.op_type == "Identity":
                name = node.input[0]
                continue
            if scope.defines(name) or scope.outer is None:
                return scope, name
            scope = scope.outer

    def constant(self, name):
        """The value of ``name`` when it is an initializer or a Constant (through Identity), else None."""
        scope, name = self.source(name)
        if name in scope._values:
            return scope._values[name]
        value = None
        if name in scope.initializers:
            value = numpy_helper.to_array(scope.initializers[name])
        elif name in scope.producer and scope.producer[name].op_type == "Constant":
            value = _constant_value(scope.producer[name])
        scope._values[name] = value
        return value

    def ints(self, name):
        """A constant int list, or None."""
        if not name:
            return None
        value = self.constant(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _axes(scope, node):
    """The axes attribute or input (opset 13/18 forms) of a Squeeze/Unsqueeze/Reduce node, or None."""
    axes = _attr(node, "axes")
    if axes is not None:
        return list(axes)
    return scope.ints(node.input[1]) if len(node.input) > 1 else None


def _chain_rank(scope, node, rank):
    """Rank of the output of an ``_ID_CHAIN`` node whose input has ``rank`` (None: unknown)."""
    op = node.op_type
    if op in ("Identity", "Cast"):
        return rank
    if op == "Flatten":
        return 2
    if op == "Reshape":
        shape = scope.ints(node.input[1])
        return None if shape is None else len(shape)
    axes = _axes(scope, node)
    if rank is None or axes is None:
        return None
    return rank - len(axes) if op == "Squeeze" else rank + len(axes)


def _ids_tensors(scope, name, rank):
    """{tensor: rank} of ``name`` and every tensor the ``_ID_CHAIN`` ops make of it alone."""
    found, todo = {}, [(name, rank)]
    while todo:
        tensor, r = todo.pop()
        if tensor in found:
            continue
        found[tensor] = r
        for node, position in scope.consumers.get(tensor, ()):
            if node.op_type in _ID_CHAIN and position == 0:
                todo.append((node.output[0], _chain_rank(scope, node, r)))
    return found


def _derives_from_length(scope, name, of, depth=8):
    """True when ``name`` is the length of a tensor in ``of`` (Shape/Size, then Gather/Unsqueeze/...)."""
    for _ in range(depth):
        scope_of, name = scope.source(name)
        node = scope_of.producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Shape", "Size"):
            return node.input[0] in of
        if node.op_type not in ("Gather", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Slice", "Concat"):
            return False
        name = node.input[0]
    return False


@dataclasses.dataclass
class Lookup:
    """An embedding lookup found in the graph: one field's table and its pooled tensor."""
    field: FieldSpec
    table: str            # the table's tensor name in the model
    pooled: str           # the tensor holding the pooled bags: [B, D], or [B, 1, D] when keepdim
    keepdim: bool
    pooling: str          # sum | mean, as the graph computes it (max_len 1: either)
    where: str            # the node that reads the table, for messages
    input_rank: int = 2   # padded ids: rank of the graph input ([B] or [B, L])
    last_offset: bool = False   # EmbeddingBag: offsets hold B+1 entries (include_last_offset)
    vectors: np.ndarray = dataclasses.field(default=None, repr=False)   # the table, float32 [V, D]


def _table(scope, gather, field):
    """(name, array) of the table ``gather`` reads, checked to be a float32 [V, D] read by rows."""
    _, source = scope.source(gather.input[0])
    table = scope.constant(gather.input[0])
    if table is None:
        _refuse(f"{_node_text(gather)} gathers field {field.name!r}'s ids from {gather.input[0]!r}, which is not "
                f"a table stored in the model (an initializer or a Constant): jizhi moves stored tables into the cube")
    if table.ndim != 2:
        _refuse(f"{_node_text(gather)} reads field {field.name!r}'s ids from {source!r} of shape "
                f"{list(table.shape)}: an embedding table is [V, D]")
    axis = _attr(gather, "axis", 0)
    if axis not in (0, -2):
        _refuse(f"{_node_text(gather)} gathers table {source!r} on axis {axis}: an embedding lookup gathers "
                f"rows (axis 0), so field {field.name!r} cannot be moved to the cube")
    if table.dtype != np.float32:
        _refuse(f"table {source!r} of field {field.name!r} is {table.dtype}: the cube holds float32 vectors")
    return source, table


def _pooling_node(scope, rows, field, bag_axis, what):
    """The ReduceSum/ReduceMean that pools ``rows`` over ``bag_axis``; (node, pooling, keepdims)."""
    readers = scope.consumers.get(rows, [])
    if len(readers) != 1:
        names = ", ".join(_node_text(n) for n, _ in readers) or "nothing"
        _refuse(f"field {field.name!r}: its unpooled embeddings {what} ({rows!r}) are read by {names}; "
                f"jizhi serves a bag only through one ReduceSum or ReduceMean over the bag axis")
    node = readers[0][0]
    if node.op_type not in _POOLING:
        if node.op_type.startswith("Reduce"):
            _refuse(f"{_node_text(node)} pools field {field.name!r}'s bag: jizhi pools bags by sum or mean only "
                    f"(ReduceSum, ReduceMean)")
        _refuse(f"{_node_text(node)} reads field {field.name!r}'s unpooled embeddings {what}: jizhi serves "
                f"pooled bags only (a ReduceSum or ReduceMean over the bag axis right after the lookup)")
    rank = bag_axis + 2
    axes = _axes(scope, node)
    if axes is None:
        _refuse(f"{_node_text(node)} reduces field {field.name!r}'s embeddings {what} over all axes or "
                f"computed axes: a bag pools over axis {bag_axis}")
    if sorted(a % rank for a in axes) != [bag_axis]:
        _refuse(f"{_node_text(node)} reduces axes {axes} of field {field.name!r}'s embeddings {what}: "
                f"a bag pools over axis {bag_axis}")
    return node, _POOLING[node.op_type], bool(_attr(node, "keepdims", 1))


def _padded_lookup(scope, field, graph_input):
    """The lookup of a field whose ids come padded: Gather (+ ReduceSum/ReduceMean)."""
    dims = _dims(graph_input)
    tensors = _ids_tensors(scope, field.input, len(dims) if dims is not None else None)
    gathers = [(node, tensors[t]) for t in tensors for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1]
    if not gathers:
        _refuse(f"field {field.name!r}: input {field.input!r} is not read by an embedding lookup (a Gather of "
                f"a table's rows, possibly after Cast/Reshape/Squeeze/Unsqueeze/Flatten)")
    if len(gathers) > 1:
        _refuse(f"field {field.name!r}: input {field.input!r} feeds {len(gathers)} lookups "
                f"({', '.join(_node_text(n) for n, _ in gathers)}): jizhi maps one table per field")
    gather, rank = gathers[0]
    table_name, table = _table(scope, gather, field)
    if dims is not None and len(dims) == 2 and isinstance(dims[1], int) and dims[1] != field.max_len:
        _refuse(f"field {field.name!r}: input {field.input!r} holds {dims[1]} ids per example, "
                f"FIELDS.toml says max_len = {field.max_len}")
    lookup = Lookup(field, table_name, gather.output[0], False, "mean", _node_text(gather),
                    input_rank=len(dims) if dims is not None else 2, vectors=table)
    if rank is None:
        _refuse(f"{_node_text(gather)}: cannot tell the rank of field {field.name!r}'s ids {gather.input[1]!r}")
    if rank == 1:
        if field.max_len != 1:
            _refuse(f"{_node_text(gather)} looks up one id per example for field {field.name!r}, "
                    f"which has max_len = {field.max_len}")
        return lookup
    if rank != 2:
        _refuse(f"{_node_text(gather)} looks up field {field.name!r}'s ids of rank {rank}: "
                f"expected [B] or [B, max_len]")
    if field.max_len == 1:
        # [B, 1, D]: a bag of at most one row pools to itself, whatever reduces it next.
        lookup.keepdim = True
        return lookup
    node, pooling, keepdim = _pooling_node(scope, gather.output[0], field, 1, "[B, L, D]")
    if pooling == "mean" and field.padding_idx is not None:
        _refuse(f"{_node_text(node)} averages field {field.name!r}'s padded bags: the padding rows count in "
                f"that mean, jizhi's mean counts only the bag's values. Pool by sum, use an EmbeddingBag "
                f"(indices + offsets), or drop padding_idx if every bag is always full")
    lookup.pooled, lookup.pooling, lookup.keepdim = node.output[0], pooling, keepdim
    return lookup


def _bag_bound(body, name, iteration, loop, field):
    """The outer tensor X when ``name`` is ``X[i]`` of the loop's iteration i (Gather, then Unsqueeze...)."""
    for _ in range(6):
        node = body.producer.get(name)
        if node is None:
            break
        if node.op_type == "Gather":
            index = node.input[1]
            while index in body.producer and body.producer[index].op_type in _ID_CHAIN:
                index = body.producer[index].input[0]
            if index == iteration and _attr(node, "axis", 0) == 0 and not body.defines(node.input[0]):
                return node.input[0]
            break
        if node.op_type not in _ID_CHAIN:
            break
        name = node.input[0]
    _refuse(f"{_node_text(loop)} (field {field.name!r}): the bag bound {name!r} is not offsets[i] of the "
            f"loop's iteration i (a Gather of an outer tensor by the iteration number)")


def _slice_from(scope, name, start):
    """The data X when ``name`` is ``X[start:]`` (a Slice on axis 0 to the end), else None."""
    node = scope.producer.get(name)
    if node is None or node.op_type != "Slice" or len(node.input) < 3:
        return None
    starts, ends = scope.ints(node.input[1]), scope.ints(node.input[2])
    axes = scope.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
    steps = scope.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if starts != [start] or ends is None or len(ends) != 1 or ends[0] < _SLICE_END or axes != [0] or steps != [1]:
        return None
    return node.input[0]


def _bag_lookup(scope, field, indices_input, offsets_input):
    """The lookup of an EmbeddingBag field (indices + offsets): the Loop torch.onnx.export writes.

    Outside the loop: ``O = Concat(offsets, len(indices))`` (or ``offsets``
    itself with include_last_offset), ``starts = O[0:]``, ``ends = O[1:]``;
    in the body, for iteration i: ``Slice(indices, starts[i], ends[i])``,
    ``Gather(table, that)`` (or ``Slice`` of ``Gather(table, indices)``
    computed before the loop), ``ReduceSum``/``ReduceMean`` over axis 0 into a
    scan output.
    """
    index_dims, offset_dims = _dims(indices_input), _dims(offsets_input)
    if index_dims is not None and len(index_dims) != 1 or offset_dims is not None and len(offset_dims) != 1:
        _refuse(f"field {field.name!r}: EmbeddingBag indices and offsets are 1-D; {field.indices!r} is "
                f"{_shape_text(index_dims)}, {field.offsets!r} is {_shape_text(offset_dims)}")
    indices = _ids_tensors(scope, field.indices, 1)
    offsets = _ids_tensors(scope, field.offsets, 1)
    outside = {node.output[0]: node for t in indices for node, position in scope.consumers.get(t, ())
               if node.op_type == "Gather" and position == 1}
    found = []
    for loop in scope.graph.node:
        if loop.op_type != "Loop":
            continue
        for node in _attr(loop, "body").node:
            if node.op_type == "Slice" and (node.input[0] in indices or node.input[0] in outside):
                found.append((loop, node))
    if not found:
        _refuse(f"field {field.name!r}: indices {field.indices!r} are not sliced by an EmbeddingBag loop (a Loop "
                f"whose body takes indices[offsets[i]:offsets[i+1]], gathers those rows of a table and sums or "
                f"averages them)")
    if len(found) > 1:
        _refuse(f"field {field.name!r}: indices {field.indices!r} are sliced by "
                f"{', '.join(f'{_node_text(cut)} in {_node_text(loop)}' for loop, cut in found)}: "
                f"jizhi maps one table per field")
    loop, cut = found[0]
    body_graph = _attr(loop, "body")
    body = _Scope(body_graph, outer=scope)
    if len(loop.input) != 2 or len(body_graph.input) != 2:
        _refuse(f"{_node_text(loop)} (field {field.name!r}) carries loop state: an EmbeddingBag loop has only "
                f"a trip count and a condition")
    iteration = body_graph.input[0].name
    starts = _bag_bound(body, cut.input[1], iteration, loop, field)
    ends = _bag_bound(body, cut.input[2], iteration, loop, field)
    axes = body.ints(cut.input[3]) if len(cut.input) > 3 and cut.input[3] else [0]
    steps = body.ints(cut.input[4]) if len(cut.input) > 4 and cut.input[4] else [1]
    if axes != [0] or steps != [1]:
        _refuse(f"{_node_text(cut)} in {_node_text(loop)} slices field {field.name!r}'s bag on axes {axes} "
                f"with steps {steps}: a bag is indices[offsets[i]:offsets[i+1]]")
    if cut.input[0] in indices:
        readers = body.consumers.get(cut.output[0], [])
        gathers = [n for n, position in readers if n.op_type == "Gather" and position == 1]
        if len(readers) != 1 or len(gathers) != 1:
            names = ", ".join(_node_text(n) for n, _ in readers) or "nothing"
            _refuse(f"{_node_text(loop)}: field {field.name!r}'s bag of ids is read by {names}, not by one "
                    f"Gather of a table")
        gather = gathers[0]
        table_name, table = _table(body, gather, field)
        rows = gather.output[0]
        where = f"{_node_text(gather)} in {_node_text(loop)}"
    else:
        gather = outside[cut.input[0]]
        table_name, table = _table(scope, gather, field)
        rows = cut.output[0]
        where = f"{_node_text(gather)}, sliced per bag in {_node_text(loop)}"
    node, pooling, keepdim = _pooling_node(body, rows, field, 0, f"[len(bag), D] in {_node_text(loop)}")
    body_outputs = [v.name for v in body_graph.output]
    if node.output[0] not in body_outputs[1:]:
        _refuse(f"{_node_text(node)} in {_node_text(loop)}: field {field.name!r}'s pooled bag is not a scan "
                f"output of the loop")
    pooled = loop.output[body_outputs.index(node.output[0]) - 1]

    start_of = _slice_from(scope, starts, 0) or starts
    end_of = _slice_from(scope, ends, 1)
    if end_of is None or start_of != end_of:
        _refuse(f"{_node_text(loop)} (field {field.name!r}): its bags do not run from offsets[i] to "
                f"offsets[i+1] (expected starts = O[0:] and ends = O[1:] of one offsets tensor O)")
    if start_of in offsets:
        last_offset = True
    else:
        concat = scope.producer.get(start_of)
        if (concat is None or concat.op_type != "Concat" or _attr(concat, "axis") != 0 or len(concat.input) != 2
                or concat.input[0] not in offsets or not _derives_from_length(scope, concat.input[1], indices)):
            _refuse(f"{_node_text(loop)} (field {field.name!r}): its bag bounds come from {start_of!r}, which "
                    f"is neither offsets {field.offsets!r} nor Concat(offsets, len(indices))")
        last_offset = False
    if not (_derives_from_length(scope, loop.input[0], {ends})
            or not last_offset and _derives_from_length(scope, loop.input[0], offsets)):
        _refuse(f"{_node_text(loop)} (field {field.name!r}): its trip count {loop.input[0]!r} is not the "
                f"number of bags")
    return Lookup(field, table_name, pooled, keepdim, pooling, where, last_offset=last_offset, vectors=table)


def _dims(value_info):
    """The dims of a graph input/output (int, or None for a symbolic dim), or None without a shape."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _shape_text(dims):
    if dims is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _type_text(value_info):
    elem = value_info.type.tensor_type.elem_type
    return f"{TensorProto.DataType.Name(elem).lower()} {_shape_text(_dims(value_info))}"


@dataclasses.dataclass
class Analysis:
    """What ``analyse`` found: the lookups in FIELDS.toml order and what the bundle needs of them."""
    lookups: list
    tables: dict          # table name -> float32 [V, D]
    dim: int
    dense_input: str | None
    dense_features: int   # 0: the model has no dense input
    output: str           # the graph output that is the score
    dtypes: dict          # graph input -> numpy dtype
    opset: int


def _opset(model):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def analyse(model, spec):
    """Find every field's embedding lookup in ``model`` (a loaded ModelProto); an ``Analysis``.

    Checks the graph inputs against FIELDS.toml both ways, the dense input,
    the output, every lookup's shape (docs/formats.md, "Importing a model")
    and that all tables share one dim. Raises BundleError naming the node,
    the input or the tables.
    """
    graph = model.graph
    opset = _opset(model)
    if opset < MIN_OPSET:
        _refuse(f"the model imports opset {opset}; jizhictl import reads opset {MIN_OPSET} or newer "
                f"(export with opset_version >= {MIN_OPSET})")
    scope = _Scope(graph)
    inputs = {v.name: v for v in graph.input if v.name not in scope.initializers}
    claimed = {spec.dense_input: "[dense]"} if spec.dense_input else {}
    for f in spec.fields:
        for name in f.inputs:
            claimed[name] = f"field {f.name!r}"
    for name, who in claimed.items():
        if name not in inputs:
            _refuse(f"{spec.path}: {who} names input {name!r}, which the model does not have "
                    f"(its inputs: {', '.join(inputs)})")
    for name, v in inputs.items():
        if name not in claimed:
            _refuse(f"graph input {name!r} ({_type_text(v)}) is not described in {spec.path}: name it as a "
                    f"field's input, indices or offsets, or as [dense] input")
        dims = _dims(v)
        if dims and dims[0] is not None:
            _refuse(f"graph input {name!r} has a fixed first dimension ({_type_text(v)}): jizhi scores "
                    f"batches of any size; export the model with a dynamic batch axis (dynamic_axes)")
    for f in spec.fields:
        for name in f.inputs:
            elem = inputs[name].type.tensor_type.elem_type
            if elem not in (TensorProto.INT64, TensorProto.INT32):
                _refuse(f"field {f.name!r}: input {name!r} is {_type_text(inputs[name])}; ids are int64 or int32")

    dense_features = 0
    if spec.dense_input is not None:
        v = inputs[spec.dense_input]
        dims = _dims(v)
        if v.type.tensor_type.elem_type != TensorProto.FLOAT or dims is None or len(dims) != 2:
            _refuse(f"[dense] input {spec.dense_input!r} is {_type_text(v)}; the dense input is float32 [B, N]")
        if dims[1] is None and spec.dense_features is None:
            _refuse(f"[dense] input {spec.dense_input!r} has no fixed width ({_type_text(v)}): give "
                    f"[dense] features = N in {spec.path}")
        if dims[1] is not None and spec.dense_features is not None and dims[1] != spec.dense_features:
            _refuse(f"[dense] features = {spec.dense_features}, but input {spec.dense_input!r} is {_type_text(v)}")
        dense_features = dims[1] if dims[1] is not None else spec.dense_features

    outputs = {v.name: v for v in graph.output}
    output = spec.output
    if output is None:
        if len(outputs) != 1:
            _refuse(f"the model has {len(outputs)} outputs ({', '.join(outputs)}): say which is the score "
                    f"with output = \"...\" in {spec.path}")
        output = next(iter(outputs))
    elif output not in outputs:
        _refuse(f"{spec.path}: output {output!r} is not an output of the model (its outputs: {', '.join(outputs)})")
    out = outputs[output]
    dims = _dims(out)
    if out.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        _refuse(f"output {output!r} is {_type_text(out)}: a score is a float per example")
    if dims is not None and not (len(dims) == 1 or len(dims) == 2 and dims[1] == 1):
        _refuse(f"output {output!r} is {_type_text(out)}: a score is one float per example ([B] or [B, 1])")

    lookups = []
    for f in spec.fields:
        if f.input is not None:
            lookups.append(_padded_lookup(scope, f, inputs[f.input]))
        else:
            lookups.append(_bag_lookup(scope, f, inputs[f.indices], inputs[f.offsets]))

    tables = {}
    for lk in lookups:
        tables.setdefault(lk.table, lk.vectors)
    table_dims = {t.shape[1] for t in tables.values()}
    if len(table_dims) > 1:
        _refuse("the embedding tables have different dims: "
                + ", ".join(f"{name} [{t.shape[0]}, {t.shape[1]}] (field "
                            f"{', '.join(repr(lk.field.name) for lk in lookups if lk.table == name)})"
                            for name, t in tables.items())
                + "; a jizhi bundle has one dim")
    for lk in lookups:
        p = lk.field.padding_idx
        table = tables[lk.table]
        if p is not None:
            if p >= table.shape[0] or table.shape[0] < 2:
                _refuse(f"field {lk.field.name!r}: padding_idx {p} is not a row of table {lk.table!r} "
                        f"[{table.shape[0]}, {table.shape[1]}] with other rows beside it")
            if np.any(table[p] != 0):
                _refuse(f"field {lk.field.name!r}: row {p} (padding_idx) of table {lk.table!r} is not zeros, so "
                        f"the model adds it for every padding slot; jizhi's bags have no padding")
    dtypes = {name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for name, v in inputs.items()}
    return Analysis(lookups, tables, int(table_dims.pop()), spec.dense_input, dense_features, output,
                    dtypes, opset)


# --- the rewritten graph -----------------------------------------------------------------

def _names(graph, out):
    for node in graph.node:
        out.update(node.input)
        out.update(node.output)
        for sub in _subgraphs(node):
            _names(sub, out)
    for coll in (graph.input, graph.output, graph.value_info):
        out.update(v.name for v in coll)
    out.update(t.name for t in graph.initializer)
    return out


def _rename(graph, mapping):
    """Rename tensors everywhere in ``graph`` and its subgraphs."""
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for sub in _subgraphs(node):
            _rename(sub, mapping)
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            v.name = mapping.get(v.name, v.name)
    for t in graph.initializer:
        t.name = mapping.get(t.name, t.name)


def _substitute(graph, mapping):
    """Make every reader of a tensor in ``mapping`` (here and in subgraphs) read its replacement."""
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        for sub in _subgraphs(node):
            _substitute(sub, mapping)


def _reads(graph, out):
    """Every name read by a node of ``graph`` or of its subgraphs."""
    for node in graph.node:
        out.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            _reads(sub, out)
    return out


def _prune(graph, wanted):
    """Drop the nodes and initializers ``wanted`` does not need; return the names still read."""
    needed = set(wanted)
    keep = []
    for node in reversed(graph.node):
        if any(n in needed for n in node.output if n):
            keep.append(node)
            needed.update(n for n in node.input if n)
            for sub in _subgraphs(node):
                # Outer-scope reads of the body keep their producers alive.
                _reads(sub, needed)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
    return needed


def _readers(graph, names):
    """[(node, name)]: the nodes of ``graph`` and its subgraphs reading one of ``names``, in order."""
    found = []
    for node in graph.node:
        found.extend((node, n) for n in node.input if n in names)
        for sub in _subgraphs(node):
            found.extend(_readers(sub, names))
    return found


def _leftover_reader(graph, names):
    """The first node still reading ``names`` (through the id chain ops), preferring a real consumer."""
    names = set(names)
    while True:
        readers = _readers(graph, names)
        grown = names | {node.output[0] for node, _ in readers if node.op_type in _ID_CHAIN}
        if grown == names:
            break
        names = grown
    real = [node for node, _ in readers if node.op_type not in _ID_CHAIN]
    return (real or [node for node, _ in readers] or [None])[0]


def rewrite(model, spec, analysis):
    """The bundle's graph: ``model`` with jizhi's inputs in place of ids and lookups (a new ModelProto).

    Inputs ``dense`` f32[U, N], ``user_emb`` f32[U, F_user, D], ``item_emb``
    f32[P, F_item, D], ``user_index`` int64[P]; output ``score`` f32[P]. The
    naive per-pair form: ``dense_pp`` and ``user_emb_pp`` (Gathers by
    user_index, named so jizhi/structured.py finds them) are the first
    nodes; each pooled tensor is replaced by its column of ``user_emb_pp`` or
    ``item_emb``. Tables and dead nodes are removed. Raises BundleError when a
    node that survives still reads a table or an ids input.
    """
    lookups = analysis.lookups
    out_model = onnx.ModelProto()
    out_model.CopyFrom(model)
    graph = out_model.graph
    dim, width = analysis.dim, analysis.dense_features
    columns = {}
    for side in ("user", "item"):
        for j, lk in enumerate(x for x in lookups if x.field.side == side):
            columns[lk.field.name] = (side, j)
    col_name = {name: f"{side}_emb.{name}" for name, (side, _) in columns.items()}
    # Constants of the column nodes: the Gather index (scalar), or the Slice bounds (keepdim).
    const_name = {name: [col + suffix for suffix in (".index", ".start", ".end", ".axis")]
                  for name, col in col_name.items()}
    reserved = set(BUNDLE_INPUTS) | {DENSE_PP, USER_EMB_PP, SCORE, SCORE + ".shape"}
    reserved |= set(col_name.values()) | {c for names in const_name.values() for c in names}
    used = _names(graph, set())
    renamed = {}
    for name in sorted(reserved & used):
        fresh = name + ".orig"
        while fresh in used or fresh in reserved:
            fresh += "_"
        renamed[name] = fresh
    _rename(graph, renamed)

    def r(name):
        return renamed.get(name, name)

    n_user = sum(1 for lk in lookups if lk.field.side == "user")
    n_item = len(lookups) - n_user
    head, constants, subs = [], [], {}
    if width:
        head.append(helper.make_node("Gather", ["dense", "user_index"], [DENSE_PP], axis=0,
                                     name="jizhi.gather_dense_pp"))
        subs[r(spec.dense_input)] = DENSE_PP
    if n_user:
        head.append(helper.make_node("Gather", ["user_emb", "user_index"], [USER_EMB_PP], axis=0,
                                     name="jizhi.gather_user_emb_pp"))
    for lk in lookups:
        side, j = columns[lk.field.name]
        source = USER_EMB_PP if side == "user" else "item_emb"
        column = col_name[lk.field.name]
        index, start, end, axis = const_name[lk.field.name]
        if lk.keepdim:
            # [P, 1, D], as the model's [B, 1, D].
            for name, value in ((start, j), (end, j + 1), (axis, 1)):
                constants.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            head.append(helper.make_node("Slice", [source, start, end, axis], [column],
                                         name=f"jizhi.column.{lk.field.name}"))
        else:
            constants.append(numpy_helper.from_array(np.array(j, dtype=np.int64), index))
            head.append(helper.make_node("Gather", [source, index], [column], axis=1,
                                         name=f"jizhi.column.{lk.field.name}"))
        subs[r(lk.pooled)] = column
    _substitute(graph, subs)

    output = r(analysis.output)
    out_info = next(v for v in graph.output if v.name == output)
    tail = []
    x = output
    if out_info.type.tensor_type.elem_type != TensorProto.FLOAT:
        tail.append(helper.make_node("Cast", [x], [x + ".f32"], to=TensorProto.FLOAT, name="jizhi.score_cast"))
        x = x + ".f32"
    dims = _dims(out_info)
    if dims is not None and len(dims) == 1:
        if tail:
            tail[-1].output[0] = SCORE
        else:
            _rename(graph, {output: SCORE})
    else:
        constants.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), SCORE + ".shape"))
        tail.append(helper.make_node("Reshape", [x, SCORE + ".shape"], [SCORE], name="jizhi.score_flat"))

    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    _prune(graph, [SCORE])

    for lk in lookups:
        for name in lk.field.inputs:
            node = _leftover_reader(graph, {r(name)})
            if node is not None:
                _refuse(f"field {lk.field.name!r}: input {name!r} is also read by {_node_text(node)}, which is not "
                        f"part of an embedding lookup: the bundle's graph gets pooled embeddings, not ids")
    for lk in lookups:
        node = _leftover_reader(graph, {r(lk.table)})
        if node is not None:
            _refuse(f"table {lk.table!r} (field {lk.field.name!r}) is also read by {_node_text(node)}, which is not "
                    f"an embedding lookup jizhi can move to the cube")

    del graph.input[:]
    graph.input.extend([
        helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["U", width]),
        helper.make_tensor_value_info("user_emb", TensorProto.FLOAT, ["U", n_user, dim]),
        helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["P", n_item, dim]),
        helper.make_tensor_value_info("user_index", TensorProto.INT64, ["P"]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["P"]))
    # The model's own shape annotations name its batch B and its ids: stale now.
    del graph.value_info[:]
    try:
        onnx.checker.check_model(out_model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        _refuse(f"the rewritten graph fails onnx.checker: {e}")
    return out_model


# --- loading ---------------------------------------------------------------------------

def _session_options():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3   # errors only: optimizer notes about Loop bodies are noise here
    return options


def load_model(path):
    """``(ModelProto with its weights, onnxruntime session)`` of the model at ``path``, both checked.

    ``onnx.checker.check_model`` runs on the path with ``full_check`` (strict
    shape inference; a path, not a proto, so models over 2 GB and external
    data work); weights in an external data file are read from the model's
    directory. Raises BundleError naming what failed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        _refuse(f"{path}: no such file")
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        _refuse(f"{path}: onnx.checker rejects the model: {e}")
    except Exception as e:   # protobuf's DecodeError and friends: not an ONNX file at all
        _refuse(f"{path}: onnx cannot read the model: {type(e).__name__}: {e}")
    model = onnx.load(path, load_external_data=True)
    try:
        session = ort.InferenceSession(path, sess_options=_session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime raises its own Fail/InvalidGraph/... types
        _refuse(f"{path}: onnxruntime cannot load the model: {e}")
    return model, session


# --- the bundle's files ------------------------------------------------------------------

def _ordered(lookups):
    """Lookups in manifest order: the user_emb columns, then the item_emb columns."""
    return [lk for lk in lookups if lk.field.side == "user"] + [lk for lk in lookups if lk.field.side == "item"]


def _owners(lookups):
    """{table name: the first lookup (FIELDS.toml order) reading it}: its field's id signs the table."""
    owners = {}
    for lk in lookups:
        owners.setdefault(lk.table, lk)
    return owners


def _shortest_bag(lookup):
    """The shortest bag the original model can be given: padded ids without padding_idx are always full."""
    f = lookup.field
    return f.max_len if f.input is not None and f.padding_idx is None else 0


def _raw_values(rng, lookup, n):
    """``n`` random raw values of the lookup's field: a row of its table + 1, never the padding row."""
    rows_total = lookup.vectors.shape[0]
    p = lookup.field.padding_idx
    if p is None:
        rows = rng.integers(0, rows_total, size=n)
    else:
        rows = rng.integers(0, rows_total - 1, size=n)
        rows += rows >= p
    return rows.astype(np.int64) + 1


def _generate_profiles(version_dir, analysis, users, items, seed):
    """Random valid profiles: ``users`` users and ``items`` items, deterministic in ``seed``."""
    for side, count, stream in (("user", users, _S_USERS), ("item", items, _S_ITEMS)):
        directory = os.path.join(version_dir, "profiles", side + "s")
        save_array(directory, "ids", _distinct_ids(np.random.default_rng([seed, stream]), count))
        if side == "user":
            dense = np.random.default_rng([seed, _S_DENSE]).standard_normal((count, analysis.dense_features))
            save_array(directory, "dense", dense.astype(np.float32))
        for lk in analysis.lookups:
            if lk.field.side != side:
                continue
            f = lk.field
            rng = np.random.default_rng([seed, _S_FIELD, f.id])
            shortest = _shortest_bag(lk)
            if f.kind == "onehot":
                values = _raw_values(rng, lk, count)
                if shortest == 0:
                    values[rng.random(count) < MISSING_ONEHOT] = 0
                save_field(directory, f, values)
            else:
                lens = rng.integers(shortest, f.max_len + 1, size=count)
                offsets = np.zeros(count + 1, dtype=np.int64)
                np.cumsum(lens, out=offsets[1:])
                save_field(directory, f, (_raw_values(rng, lk, int(offsets[-1])), offsets))


def _load_npy(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        _refuse(f"{path}: no such file")
    except (ValueError, OSError) as e:
        _refuse(f"{path}: not a numpy .npy array ({e})")


def _copy_profiles(source, version_dir, analysis):
    """Copy the profiles under ``source`` (``users/`` and ``items/``) after checking the model can read them.

    Every raw value must be a row of the field's table + 1 (0: missing, only
    where the model can express an empty bag) and every bag at least as long
    as the model's ids input takes (padded ids without padding_idx: max_len).
    """
    for side in ("user", "item"):
        src = os.path.join(os.fspath(source), side + "s")
        dst = os.path.join(version_dir, "profiles", side + "s")
        os.makedirs(dst, exist_ok=True)
        ids = _load_npy(os.path.join(src, "ids.npy"))
        if ids.dtype != np.uint64 or ids.ndim != 1 or ids.shape[0] == 0 or np.any(ids[1:] <= ids[:-1]):
            _refuse(f"{src}/ids.npy is {ids.dtype} {ids.shape}: expected non-empty uint64 ids, sorted ascending "
                    f"without duplicates")
        rows = ids.shape[0]
        names = ["ids"]
        if side == "user":
            dense = _load_npy(os.path.join(src, "dense.npy"))
            if dense.dtype != np.float32 or dense.shape != (rows, analysis.dense_features):
                _refuse(f"{src}/dense.npy is {dense.dtype} {dense.shape}: expected float32 "
                        f"{(rows, analysis.dense_features)} (one row per user, the model's dense width)")
            names.append("dense")
        for lk in analysis.lookups:
            f = lk.field
            if f.side != side:
                continue
            vocab, shortest = lk.vectors.shape[0], _shortest_bag(lk)
            if f.kind == "onehot":
                values = _load_npy(os.path.join(src, f.name + ".npy"))
                where = f"{src}/{f.name}.npy"
                if values.dtype != np.int64 or values.shape != (rows,):
                    _refuse(f"{where} is {values.dtype} {values.shape}: expected int64 ({rows},)")
                low = 1 if shortest else 0
                names.append(f.name)
            else:
                values = _load_npy(os.path.join(src, f.name + ".values.npy"))
                offsets = _load_npy(os.path.join(src, f.name + ".offsets.npy"))
                where = f"{src}/{f.name}.values.npy"
                if values.dtype != np.int64 or values.ndim != 1 or offsets.dtype != np.int64 \
                        or offsets.shape != (rows + 1,) or offsets[0] != 0 or offsets[-1] != values.shape[0] \
                        or np.any(np.diff(offsets) < 0):
                    _refuse(f"{src}/{f.name}.values.npy and .offsets.npy are not int64 values with {rows + 1} "
                            f"non-decreasing int64 offsets from 0 to their length")
                lens = np.diff(offsets)
                if shortest and np.any(lens < shortest):
                    r = int(np.flatnonzero(lens < shortest)[0])
                    _refuse(f"{where}: row {r} has {int(lens[r])} values, but field {f.name!r}'s input "
                            f"{f.input!r} always takes {shortest} ids (no padding_idx)")
                low = 1
                names += [f.name + ".values", f.name + ".offsets"]
            bad = (values < low) | (values > vocab)
            if np.any(bad):
                v = int(values[np.flatnonzero(bad)[0]])
                _refuse(f"{where} holds raw value {v}: field {f.name!r} reads table {lk.table!r} of {vocab} rows, "
                        f"so its raw values are 1..{vocab} (row + 1)"
                        + ("" if low else ", or 0 for missing"))
        for name in names:
            shutil.copyfile(os.path.join(src, name + ".npy"), os.path.join(dst, name + ".npy"))


def raw_bags(profile_dir, field, rows):
    """Raw values of ``field`` for profile ``rows`` as data_reader reads them.

    Returns ``(values int64 [n, max_len], lens int64 [n])``: a onehot 0 is an
    empty bag; a longer bag keeps its newest (last) ``max_len`` values;
    entries past a row's length are 0. Reads the .npy files directly, not
    through jizhi.bundle, so the check does not reuse the reader it checks.
    """
    rows = np.asarray(rows, dtype=np.int64)
    values = np.zeros((rows.shape[0], field.max_len), dtype=np.int64)
    if field.kind == "onehot":
        values[:, 0] = np.load(os.path.join(profile_dir, field.name + ".npy"), mmap_mode="r")[rows]
        return values, (values[:, 0] != 0).astype(np.int64)
    flat = np.load(os.path.join(profile_dir, field.name + ".values.npy"), mmap_mode="r")
    offsets = np.load(os.path.join(profile_dir, field.name + ".offsets.npy"), mmap_mode="r")
    ends = offsets[rows + 1]
    starts = np.maximum(offsets[rows], ends - field.max_len)
    lens = ends - starts
    valid = np.arange(field.max_len) < lens[:, None]
    values[valid] = flat[(starts[:, None] + np.arange(field.max_len))[valid]]
    return values, lens


def _write_item_signatures(version_dir, analysis, hash_ids, hash_seed):
    """profiles/items/sigs.npy and sig_lens.npy from the items' raw values (docs/formats.md)."""
    directory = os.path.join(version_dir, "profiles", "items")
    item = [lk for lk in analysis.lookups if lk.field.side == "item"]
    count = np.load(os.path.join(directory, "ids.npy"), mmap_mode="r").shape[0]
    width = max([lk.field.max_len for lk in item] or [1])
    values = np.zeros((count, len(item), width), dtype=np.int64)
    lens = np.zeros((count, len(item)), dtype=np.int32)
    for column, lk in enumerate(item):
        v, n = raw_bags(directory, lk.field, np.arange(count))
        values[:, column, :lk.field.max_len] = v
        lens[:, column] = n
    ids = np.array([hash_ids[lk.field.name] for lk in item], dtype=np.int64)
    save_array(directory, "sigs", sign_padded(ids, values, lens, hash_seed))
    save_array(directory, "sig_lens", lens)


def _write_cube(version_dir, analysis, hash_seed, progress):
    """cube/: row v of every table under sign(owner field id, v + 1, hash_seed); the key count."""
    tables = []
    for name, owner in _owners(analysis.lookups).items():
        vectors = owner.vectors
        keys = sign(owner.field.id, np.arange(1, vectors.shape[0] + 1, dtype=np.int64), hash_seed)
        tables.append(Table(f"table {name!r}", keys, vectors))
    total = sum(len(t) for t in tables)
    bar = _Progress("cube", total, progress)
    try:
        build_cube(os.path.join(version_dir, "cube"), tables, dim=analysis.dim,
                   txn_entries=max(1, (64 << 20) // (4 * analysis.dim)), progress=bar.advance)
    except TableError as e:
        _refuse(f"writing the cube: {e}")
    finally:
        bar.close()
    return total


def _manifest_text(name, version, analysis, hash_seed, source, files):
    """manifest.toml contents (docs/formats.md); ``files`` is a list of (path, size, sha256)."""
    lines = [
        f"# written by jizhictl import from {os.path.basename(source)}",
        f"format = {FORMAT}",
        f"name = {toml_value(name)}",
        f"version = {int(version)}",
        f"dim = {analysis.dim}",
        f"hash_seed = {int(hash_seed)}",
        'default_vector = "zeros"',
        "",
        "[dense]",
        f"user_features = {analysis.dense_features}",
        "",
        "[onnx]",
        'file = "dense.onnx"',
        f"output = {toml_value(SCORE)}",
    ]
    owners = _owners(analysis.lookups)
    for lk in _ordered(analysis.lookups):
        f = lk.field
        # A bag of at most one value pools the same by sum or mean: "mean" reads everywhere.
        pooling = "mean" if f.max_len == 1 else lk.pooling
        lines += ["", "[[fields]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in
                  (("name", f.name), ("id", f.id), ("side", f.side), ("kind", f.kind), ("max_len", f.max_len),
                   ("vocab", lk.vectors.shape[0]), ("pooling", pooling))]
        owner = owners[lk.table]
        if owner is not lk:
            lines.append(f"shares = {toml_value(owner.field.name)}")
    for path, size, digest in files:
        lines += ["", "[[files]]", f"path = {toml_value(path)}", f"size = {size}", f"sha256 = {toml_value(digest)}"]
    return "\n".join(lines) + "\n"


# --- the check ---------------------------------------------------------------------------

CHECK_STAGES = ("data_reader", "feature_processor", "cube_accessor", "model_inference")


@dataclasses.dataclass
class CheckResult:
    pairs: int
    users: int
    max_abs_diff: float
    ok: bool
    worst: str    # the pair farthest outside (or nearest to) the tolerance, for the message

    def line(self):
        return (f"check: {self.pairs} pairs over {self.users} users, jizhi's stages against the original model: "
                f"max |jizhi - original| = {self.max_abs_diff:.3g} (allowed: {CHECK_ATOL:g} + {CHECK_RTOL:g} * "
                f"|original|): {'PASS' if self.ok else 'FAIL'}")


def original_feeds(analysis, version_dir, user_rows, item_rows):
    """The original model's inputs for pairs (user_rows[k], item_rows[k]) of the bundle's profiles.

    Raw value r is row r - 1 of the field's table; a padded bag is filled
    with padding_idx; an EmbeddingBag's offsets are the bag starts (and the
    total with include_last_offset).
    """
    users = os.path.join(version_dir, "profiles", "users")
    items = os.path.join(version_dir, "profiles", "items")
    feeds = {}
    if analysis.dense_input is not None:
        feeds[analysis.dense_input] = np.ascontiguousarray(
            np.load(os.path.join(users, "dense.npy"), mmap_mode="r")[user_rows], dtype=np.float32)
    for lk in analysis.lookups:
        f = lk.field
        user = f.side == "user"
        values, lens = raw_bags(users if user else items, f, user_rows if user else item_rows)
        valid = np.arange(f.max_len) < lens[:, None]
        if f.input is not None:
            ids = np.full(values.shape, f.padding_idx or 0, dtype=np.int64)
            ids[valid] = values[valid] - 1
            feeds[f.input] = (ids[:, 0] if lk.input_rank == 1 else ids).astype(analysis.dtypes[f.input])
        else:
            offsets = np.zeros(lens.shape[0] + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[1:])
            feeds[f.indices] = (values[valid] - 1).astype(analysis.dtypes[f.indices])
            feeds[f.offsets] = (offsets if lk.last_offset else offsets[:-1]).astype(analysis.dtypes[f.offsets])
    return feeds


def check(version_dir, analysis, session, pairs=2000, seed=1, progress=True):
    """Score random pairs of the version's profiles both ways; a ``CheckResult``.

    jizhi: the stage processors data_reader, feature_processor,
    cube_accessor and model_inference, set up on ``version_dir`` as a worker
    sets them up, one request (a user and its candidates) per micro-batch.
    The original: ``session`` on ``original_feeds``, ``ORIGINAL_BATCH`` pairs
    per run, deliberately not aligned with the requests, so a model whose
    score depends on the rest of its batch fails. Pairs are spread over
    ``CHECK_USERS`` distinct users, candidates drawn uniformly.
    """
    bundle = Bundle(version_dir)
    stages = [load_class(name)() for name in CHECK_STAGES]
    try:
        for stage in stages:
            stage.setup({"on_unknown": "default", "_overlay": None}, bundle)
        return _check(version_dir, analysis, session, stages, pairs, seed, progress)
    finally:
        # LMDB refuses a second environment on one file in a process: close the
        # check's, so this process may open the version once it is renamed.
        cube_accessor = stages[CHECK_STAGES.index("cube_accessor")]
        cube = getattr(getattr(cube_accessor, "store", None), "cube", None)
        if cube is not None:
            cube.close()


def _check(version_dir, analysis, session, stages, pairs, seed, progress):
    user_ids = np.load(os.path.join(version_dir, "profiles", "users", "ids.npy"))
    item_ids = np.load(os.path.join(version_dir, "profiles", "items", "ids.npy"))
    rng = np.random.default_rng([seed, _S_CHECK])
    requests = max(1, min(CHECK_USERS, user_ids.shape[0], pairs))
    per = -(-pairs // requests)
    user_rows = rng.choice(user_ids.shape[0], requests, replace=False)
    item_rows = np.concatenate([rng.choice(item_ids.shape[0], per, replace=per > item_ids.shape[0])
                                for _ in range(requests)])
    total = requests * per
    bar = _Progress("check", 2 * total, progress)
    try:
        jizhi = []
        for q in range(requests):
            candidates = item_ids[item_rows[q * per:(q + 1) * per]]
            batch = Batch(user_ids[user_rows[q:q + 1]], np.array([per], dtype=np.int64), np.zeros(1, dtype=bool),
                          np.full(1, np.inf), np.array([0, per], dtype=np.int64),
                          {"item_ids": candidates, "recall_scores": np.full(per, 0.5, dtype=np.float32)})
            for stage in stages:
                batch.columns.update(stage.process(batch))
            if batch.failed:
                _refuse(f"check: jizhi failed a request: {batch.failed[0]}")
            jizhi.append(np.asarray(batch["score"], dtype=np.float32).reshape(-1))
            bar.advance(per)
        jizhi = np.concatenate(jizhi)
        pair_users = np.repeat(user_rows, per)
        original = np.empty(total, dtype=np.float32)
        for start in range(0, total, ORIGINAL_BATCH):
            stop = min(total, start + ORIGINAL_BATCH)
            feeds = original_feeds(analysis, version_dir, pair_users[start:stop], item_rows[start:stop])
            out = np.asarray(session.run([analysis.output], feeds)[0]).reshape(-1)
            if out.shape[0] != stop - start:
                _refuse(f"check: the original model's output {analysis.output!r} has {out.shape[0]} values for "
                        f"{stop - start} examples")
            original[start:stop] = out
            bar.advance(stop - start)
    finally:
        bar.close()
    diff = np.abs(jizhi.astype(np.float64) - original.astype(np.float64))
    allowed = CHECK_ATOL + CHECK_RTOL * np.abs(original.astype(np.float64))
    finite = np.isfinite(jizhi) & np.isfinite(original)
    ok = bool(finite.all() and (diff <= allowed).all())
    excess = np.where(finite, diff / allowed, np.inf)
    k = int(np.argmax(excess))
    worst = (f"user {int(user_ids[pair_users[k]])}, item {int(item_ids[item_rows[k]])}: "
             f"jizhi {float(jizhi[k]):.7g}, original {float(original[k]):.7g}")
    max_abs = float(np.max(np.where(finite, diff, np.inf)))
    return CheckResult(total, requests, max_abs, ok, worst)


# --- the command -------------------------------------------------------------------------

def import_model(model_path, fields_path, out_dir, *, name=None, version=1, users=1000, items=10000, seed=1,
                 hash_seed=0, profiles=None, check_pairs=2000, progress=True, log=print):
    """Import the ONNX model at ``model_path`` as the bundle version directory ``out_dir``; the check result.

    ``fields_path``: FIELDS.toml. ``name`` defaults to the model file's stem.
    ``profiles``: a directory holding ``users/`` and ``items/`` snapshots to
    copy; without it ``users`` users and ``items`` items are generated from
    ``seed``. ``check_pairs`` random pairs are then scored by jizhi and by
    the original model (``check``). Everything is written into a hidden
    directory beside ``out_dir`` (same filesystem) and renamed to
    ``out_dir`` only when the check passes; on any failure it is removed.
    ``log`` gets the summary lines; progress bars go to stderr when
    ``progress``. Raises BundleError (refused input, or the check failed)
    and FileExistsError when ``out_dir`` exists.
    """
    model_path = os.fspath(model_path)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        raise FileExistsError(out_dir)
    name = name or os.path.splitext(os.path.basename(model_path))[0]
    if not _NAME.match(name):
        _refuse(f"model name {name!r}: letters, digits, _ . - only (it is a directory name); give --name")
    if version < 1:
        _refuse(f"version {version} is not a positive integer")
    if hash_seed < 0:
        _refuse(f"hash seed {hash_seed} is negative")
    if profiles is None and (users < 1 or items < 1):
        _refuse("users and items must be positive")
    spec = read_fields(fields_path)
    model, session = load_model(model_path)
    analysis = analyse(model, spec)
    graph = rewrite(model, spec, analysis)
    del model
    owners = _owners(analysis.lookups)
    log(f"{model_path}: {len(analysis.lookups)} embedding lookups, dim {analysis.dim}, "
        f"{analysis.dense_features} dense user features, opset {analysis.opset}")
    for lk in _ordered(analysis.lookups):
        f = lk.field
        shared = "" if owners[lk.table] is lk else f", shares {owners[lk.table].field.name!r}'s table"
        log(f"  {f.side} field {f.name!r} ({f.kind}, max_len {f.max_len}): table {lk.table!r} "
            f"{list(lk.vectors.shape)}, {lk.pooling} pooling, read by {lk.where}{shared}")

    parent = os.path.dirname(out_dir)
    if os.path.basename(out_dir).isdigit() and (int(os.path.basename(out_dir)) != version
                                                or os.path.basename(parent) != name):
        log(f"note: the manifest says model {name!r} version {version}; jizhid serves a version only from "
            f"<models>/{name}/{version}/ (publish it there, or give --name and --version)")
    made = []     # directories this import creates, removed again if it fails
    ancestor = parent
    while not os.path.isdir(ancestor):
        made.append(ancestor)
        ancestor = os.path.dirname(ancestor)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.import-", dir=parent)
    try:
        # mkdtemp makes it 0700: give it the mode of every other directory of the model directory (0777 less
        # the umask, 0755 usually), or a jizhid running as another user could not read the version.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)
        onnx_path = os.path.join(partial, "dense.onnx")
        if graph.ByteSize() < 2 ** 31 - 1:
            onnx.save(graph, onnx_path)
        else:
            onnx.save(graph, onnx_path, save_as_external_data=True, all_tensors_to_one_file=True,
                      location="dense.onnx.data")
        del graph
        if profiles is not None:
            _copy_profiles(profiles, partial, analysis)
        else:
            _generate_profiles(partial, analysis, users, items, seed)
        hash_ids = {lk.field.name: owners[lk.table].field.id for lk in analysis.lookups}
        _write_item_signatures(partial, analysis, hash_ids, hash_seed)
        counts = [np.load(os.path.join(partial, "profiles", side, "ids.npy"), mmap_mode="r").shape[0]
                  for side in ("users", "items")]
        log(f"profiles: {counts[0]} users, {counts[1]} items "
            + (f"(from {profiles})" if profiles is not None else f"(generated, seed {seed})"))
        keys = _write_cube(partial, analysis, hash_seed, progress)
        log(f"cube: {keys} signatures from {len(owners)} tables (raw value = row + 1)")
        write_text(os.path.join(partial, "manifest.toml"),
                    _manifest_text(name, version, analysis, hash_seed, model_path, file_entries(partial)))
        result = check(partial, analysis, session, check_pairs, seed, progress)
        log(result.line())
        if not result.ok:
            _refuse(f"the imported graph does not score like the original model (worst pair: {result.worst}); "
                    f"nothing was written to {out_dir}")
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for directory in made:
            try:
                os.rmdir(directory)
            except OSError:
                break
        raise
    log(f"imported {out_dir}")
    return result
