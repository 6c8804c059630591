"""The importer's view of a foreign model's graph: who makes and reads each tensor (``Scope``, also
for a Loop body inside it), how messages name nodes and types, the ids chain an ids input passes
through, and the two pieces every embedding lookup shares: the table a Gather reads (``table_read``)
and the ReduceSum/ReduceMean that pools its rows (``pooling_node``); ``Lookup`` is what a lookup
found. Used by jizhi/tools/importer/lookups.py (padded and stacked ids, ``analyse``) and bags.py
(``nn.EmbeddingBag``'s loops). Runs in the importing process; reads the ModelProto, never changes it.
"""
import collections
import dataclasses

import numpy as np
from onnx import TensorProto, numpy_helper

from jizhi.graph.proto import attr, constant_value, static_dims
from jizhi.tools.importer.fields import FieldSpec, refuse


# Ops an ids tensor may pass through on its way to the Gather (input 0 only).
ID_CHAIN = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
_POOLING = {"ReduceSum": "sum", "ReduceMean": "mean"}


def node_text(node):
    """How a message names a node: its name and op type."""
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"the unnamed {node.op_type} node making {node.output[0]!r}"


class Scope:
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
            value = constant_value(scope.producer[name])
        scope._values[name] = value
        return value

    def ints(self, name):
        """A constant int list, or None."""
        if not name:
            return None
        value = self.constant(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def axes_of(scope, node):
    """The axes attribute or input (opset 13/18 forms) of a Squeeze/Unsqueeze/Reduce node, or None."""
    axes = attr(node, "axes")
    if axes is not None:
        return list(axes)
    return scope.ints(node.input[1]) if len(node.input) > 1 else None


def chain_rank(scope, node, rank):
    """Rank of the output of an ``ID_CHAIN`` node whose input has ``rank`` (None: unknown)."""
    op = node.op_type
    if op in ("Identity", "Cast"):
        return rank
    if op == "Flatten":
        return 2
    if op == "Reshape":
        shape = scope.ints(node.input[1])
        return None if shape is None else len(shape)
    axes = axes_of(scope, node)
    if rank is None or axes is None:
        return None
    return rank - len(axes) if op == "Squeeze" else rank + len(axes)


def ids_tensors(scope, name, rank):
    """{tensor: rank} of ``name`` and every tensor the ``ID_CHAIN`` ops make of it alone."""
    found, todo = {}, [(name, rank)]
    while todo:
        tensor, r = todo.pop()
        if tensor in found:
            continue
        found[tensor] = r
        for node, position in scope.consumers.get(tensor, ()):
            if node.op_type in ID_CHAIN and position == 0:
                todo.append((node.output[0], chain_rank(scope, node, r)))
    return found


def derives_from_length(scope, name, of, depth=8):
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
    input_rank: int = 2   # padded ids: rank of the field's ids as the model takes them ([B] or [B, L])
    last_offset: bool = False   # EmbeddingBag: offsets hold B+1 entries (include_last_offset)
    stack_axis: int | None = None   # a stacked input: the axis its fields are stacked on
    block: int = 0        # > 0: one Gather looks up all ``block`` fields of a stacked input at once; ``pooled``
                          # is then [B, block, D] and this field is slot ``field.index`` of it
    vectors: np.ndarray = dataclasses.field(default=None, repr=False)   # the table, float32 [V, D]


def table_read(scope, gather, field):
    """(name, array) of the table ``gather`` reads, checked to be a float32 [V, D] read by rows."""
    _, source = scope.source(gather.input[0])
    table = scope.constant(gather.input[0])
    if table is None:
        refuse(f"{node_text(gather)} gathers field {field.name!r}'s ids from {gather.input[0]!r}, which is not "
               f"a table stored in the model (an initializer or a Constant): jizhi moves stored tables into the cube")
    if table.ndim != 2:
        refuse(f"{node_text(gather)} reads field {field.name!r}'s ids from {source!r} of shape "
               f"{list(table.shape)}: an embedding table is [V, D]")
    axis = attr(gather, "axis", 0)
    if axis not in (0, -2):
        refuse(f"{node_text(gather)} gathers table {source!r} on axis {axis}: an embedding lookup gathers "
               f"rows (axis 0), so field {field.name!r} cannot be moved to the cube")
    if table.dtype != np.float32:
        refuse(f"table {source!r} of field {field.name!r} is {table.dtype}: the cube holds float32 vectors")
    return source, table


def pooling_node(scope, rows, field, bag_axis, what):
    """The ReduceSum/ReduceMean that pools ``rows`` over ``bag_axis``; (node, pooling, keepdims)."""
    readers = scope.consumers.get(rows, [])
    if len(readers) != 1:
        names = ", ".join(node_text(n) for n, _ in readers) or "nothing"
        refuse(f"field {field.name!r}: its unpooled embeddings {what} ({rows!r}) are read by {names}; "
               f"jizhi serves a bag only through one ReduceSum or ReduceMean over the bag axis")
    node = readers[0][0]
    if node.op_type not in _POOLING:
        if node.op_type.startswith("Reduce"):
            refuse(f"{node_text(node)} pools field {field.name!r}'s bag: jizhi pools bags by sum or mean only "
                   f"(ReduceSum, ReduceMean)")
        refuse(f"{node_text(node)} reads field {field.name!r}'s unpooled embeddings {what}: jizhi serves "
               f"pooled bags only (a ReduceSum or ReduceMean over the bag axis right after the lookup)")
    rank = bag_axis + 2
    axes = axes_of(scope, node)
    if axes is None:
        refuse(f"{node_text(node)} reduces field {field.name!r}'s embeddings {what} over all axes or "
               f"computed axes: a bag pools over axis {bag_axis}")
    if sorted(a % rank for a in axes) != [bag_axis]:
        refuse(f"{node_text(node)} reduces axes {axes} of field {field.name!r}'s embeddings {what}: "
               f"a bag pools over axis {bag_axis}")
    return node, _POOLING[node.op_type], bool(attr(node, "keepdims", 1))



def shape_text(dims):
    if dims is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def type_text(value_info):
    elem = value_info.type.tensor_type.elem_type
    return f"{TensorProto.DataType.Name(elem).lower()} {shape_text(static_dims(value_info))}"


