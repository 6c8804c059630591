"""Reading and writing ONNX graphs: the one copy of the helpers the graph passes
(``structured``, ``itemside``) and the model importer (``jizhi.tools.importer``)
share.

Runs in whichever process calls it (a model inference worker opening a
bundle, the validator, ``jizhictl import``, tests); pure functions of their
arguments (a ``Writer`` holds the graph being written), no onnxruntime; a
``ModelProto`` passed in is never modified.

* the bundle form of a dense graph (docs/formats.md): ``USER_INPUTS``
  (``dense`` f32[U,N], ``user_emb`` f32[U,F_user,D]: U rows),
  ``ITEM_INPUT`` (``item_emb`` f32[P,F_item,D]) and ``USER_INDEX``
  (int64[P]: each pair's user row);
* a node's attributes (``attr``), a Constant node's value
  (``constant_value``), a value_info's static dims (``static_dims``) and
  its dims with their names (``symbolic_dims``, ``symbolic_shapes``), a
  negative axis made positive (``normalize_axis``), a node's subgraphs
  (``subgraphs``, ``has_subgraph``), every node of a graph and its subgraphs
  (``walk``, ``reads``), the default domain's opset (``opset_version``);
* the nodes that compute some outputs (``live``) and a checked model made of
  them (``assemble``);
* ``Graph``: a model as the passes read it (inferred shapes, constant values,
  producers, consumers); ``Writer``: the new graph a pass writes, with fresh
  names.
"""
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

USER_INPUTS = ("dense", "user_emb")   # U rows; every other input but user_index has P rows
USER_INDEX = "user_index"
ITEM_INPUT = "item_emb"

DOMAINS = ("", "ai.onnx")             # the default domain, under either of its names


# --- nodes and values ----------------------------------------------------------------

def attr(node, name, default=None):
    """The value of ``node``'s attribute ``name`` (a Python value, a TensorProto, a GraphProto...), or ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def constant_value(node):
    """The value of a Constant node as a numpy array (int64 for ints, float32 for floats), or None."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attribute), dtype=np.int64)
        if attribute.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attribute), dtype=np.float32)
    return None


def static_dims(value_info):
    """Static dims (int, or None when symbolic/unknown) of a value_info, or None without a shape."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def normalize_axis(value, rank):
    """``value`` (an axis of a tensor of ``rank`` dims) counted from 0."""
    return value + rank if value < 0 else value


def has_subgraph(node):
    """True when ``node`` has a graph attribute (If, Loop, Scan)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def subgraphs(node):
    """The graphs held by ``node``'s attributes, in attribute order."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def walk(graph):
    """Every node of ``graph`` and of its subgraphs, each node before the nodes of its subgraphs."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from walk(sub)


def reads(graph, out):
    """Add to the set ``out`` every name read by a node of ``graph`` or of its subgraphs; return ``out``."""
    for node in walk(graph):
        out.update(n for n in node.input if n)
    return out


def opset_version(model, default=None):
    """The opset version ``model`` imports for the default domain, or ``default`` when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in DOMAINS), default)


# --- pruning and assembling -------------------------------------------------------------

def live(nodes, wanted):
    """``(kept, needed)``: the ``nodes`` (a list in topological order; kept in that order)
    that the names ``wanted`` depend on, and every name those nodes read (a subgraph's
    reads of outer names included, so their producers stay)."""
    needed, kept = set(wanted), []
    for node in reversed(nodes):
        if any(name in needed for name in node.output if name):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for sub in subgraphs(node):
                reads(sub, needed)
    kept.reverse()
    return kept, needed


def assemble(source, nodes, inputs, outputs, initializers=()):
    """``(model, kept nodes)``: a checked ModelProto with ``source``'s opsets, IR version and
    metadata, from ``inputs`` to ``outputs`` through the ``nodes`` they need (``live``),
    with those of ``source``'s initializers and of ``initializers`` the kept nodes read."""
    kept, needed = live(nodes, [o.name for o in outputs])
    graph = helper.make_graph(kept, source.graph.name, list(inputs), list(outputs),
                              initializer=[i for i in (*source.graph.initializer, *initializers) if i.name in needed])
    model = onnx.ModelProto()
    model.CopyFrom(source)
    model.graph.CopyFrom(graph)
    onnx.checker.check_model(model)
    return model, kept


def symbolic_dims(value_info):
    """A value_info's dims: an int when static, the dim's name (a str) when symbolic, None when unknown;
    None without a shape."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)


def _shapes(model, dims_of):
    """{tensor: ``dims_of(value_info)``} of a model's inputs, value_infos and outputs, and its initializers'
    dims."""
    shapes = {}
    for value_info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = dims_of(value_info)
        if dims is not None:
            shapes[value_info.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def symbolic_shapes(model):
    """{tensor: ``symbolic_dims``} of a model's inputs, value_infos, outputs and initializers."""
    return _shapes(model, symbolic_dims)


def value_shapes(model):
    """{tensor: static dims} of a model's inputs, value_infos, outputs (``static_dims``) and initializers."""
    return _shapes(model, static_dims)


# --- a pass's input and output ------------------------------------------------------------

class Graph:
    """The input model as a pass reads it: shapes (onnx shape inference; ``data_prop``: with
    its propagation of shape values), symbolic dims (``symbols``: int, dim name or None),
    constant values (initializers and Constant nodes), producers, consumers."""

    def __init__(self, model, data_prop=False):
        self.model = model
        graph = model.graph
        self.opset = opset_version(model, 1)
        try:
            inferred = shape_inference.infer_shapes(model, data_prop=data_prop)
        except Exception:  # a graph shape inference rejects is simply not understood
            inferred = model
        self.shapes = value_shapes(inferred)
        self.symbols = symbolic_shapes(inferred)
        self.types = {}     # tensor -> ONNX element type, where inference tells
        for value_info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            if value_info.type.HasField("tensor_type"):
                self.types[value_info.name] = value_info.type.tensor_type.elem_type
        # Constant values, converted when first read (weights can be large).
        self.initializers = {init.name: init for init in graph.initializer}
        self.values = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DOMAINS:
                value = constant_value(node)
                if value is not None:
                    self.values[node.output[0]] = value
                    self.shapes[node.output[0]] = tuple(value.shape)
                    self.symbols[node.output[0]] = tuple(value.shape)
        self.constants = set(self.initializers) | set(self.values)
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = [o.name for o in graph.output]
        self.names = set(self.constants) | {i.name for i in graph.input} | set(self.outputs)
        for node in graph.node:
            self.names.update(n for n in (*node.input, *node.output) if n)
            if node.name:
                self.names.add(node.name)

    def shape(self, name):
        return self.shapes.get(name)

    def rank(self, name):
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def value(self, name):
        """The value (numpy) of an initializer or a Constant node's output, or None."""
        if name not in self.values and name in self.initializers:
            self.values[name] = numpy_helper.to_array(self.initializers[name])
        return self.values.get(name)

    def ints(self, name):
        """A constant's values as a list of ints, or None."""
        value = self.value(name)
        if value is None or value.dtype.kind not in "iu":
            return None
        return [int(v) for v in value.reshape(-1)]


class Writer:
    """The new graph's nodes and new initializers, with fresh names that collide
    with nothing in the input graph nor with each other."""

    def __init__(self, g):
        self.g = g
        self.used = set(g.names)
        self.nodes = []
        self.initializers = []
        self.origin = {}   # id(new node) -> original node it computes on U rows

    def fresh(self, base):
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}.{k}"
        self.used.add(name)
        return name

    def node(self, op, inputs, outputs, **attrs):
        """Append a node; ``outputs`` are used as given. Returns the node."""
        node = helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"{op}:{outputs[0]}"), **attrs)
        self.nodes.append(node)
        return node

    def op(self, op, inputs, base, **attrs):
        """Append a single-output node with a fresh output name based on ``base``; return that name."""
        out = self.fresh(base)
        self.node(op, inputs, [out], **attrs)
        return out

    def copy(self, node, inputs, outputs):
        """Append a copy of ``node`` (op, domain, attributes) on other inputs and outputs."""
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[:] = inputs
        new.output[:] = outputs
        new.name = self.fresh(node.name or f"{node.op_type}:{next((o for o in outputs if o), '')}")
        self.nodes.append(new)
        return new

    def const(self, base, array):
        name = self.fresh(base)
        array = np.asarray(array)    # np.ascontiguousarray would make a scalar 1-D
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array) if array.ndim else array, name))
        return name

    def concat(self, names, axis, base):
        return names[0] if len(names) == 1 else self.op("Concat", names, base, axis=axis)

    def model(self, source):
        """The finished ModelProto: unused nodes and initializers dropped, the
        source's inputs, outputs, opsets, IR version and metadata kept. The nodes
        kept are ``self.kept`` afterwards (``origin`` is keyed by their ids)."""
        model, self.kept = assemble(source, self.nodes, source.graph.input, source.graph.output, self.initializers)
        return model
