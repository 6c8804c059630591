"""The structured-features pass's walk over a graph: each tensor's kind, the
nodes moved to U rows, the meet points gathered per pair, and the layer split.

``structure`` (jizhi/graph/structured.py, whose module docstring is the
contract: the kinds, the row-wise ops, the recognised forms) runs one
``Structurer`` per model. The walk visits the nodes in order and gives every
tensor a kind (jizhi/graph/rows.py): a node on pair-of-user tensors only is
computed on their U forms (``_on_user_rows``); a node that meets pair
tensors, or one that is not row-wise, reads its pair-of-user inputs gathered
by user_index (``_pair``: once per tensor); a recognised interaction or first
layer is split (the interaction split: jizhi/graph/interactions.py, mixed
in; the layer split: here). Deterministic; runs in the caller's process.
"""
import numpy as np

from jizhi.graph.interactions import InteractionSplit
from jizhi.graph.proto import DOMAINS, USER_INDEX, USER_INPUTS, Graph, Writer, attr, has_subgraph, normalize_axis
from jizhi.graph.rows import (CONST, OTHER, PAIR, PAIR_OF_USER, PAIR_SIDE, USER, USER_SIDE, Segment, is_user_gather,
                              rowwise)


class Structurer(InteractionSplit):
    """One ``structure`` pass over one model: ``Structurer(model, ...).run()`` -> the new model;
    ``layers``, ``interactions`` and ``w.origin`` / ``w.kept`` feed the report."""

    def __init__(self, model, split_layers, split_interactions):
        self.g = Graph(model)
        self.w = Writer(self.g)
        self.split_layers_on = split_layers
        self.split_interactions_on = split_interactions
        self.kind = {}
        self.uform = {}          # pair-of-user tensor -> its U-row tensor
        self.gathered = set()    # pair-of-user tensors already gathered per pair
        self.segments = {}       # tensor -> [Segment] (last-axis decomposition)
        self.absorbed = set()    # outputs of nodes a layer split computed already
        self.layers, self.interactions = [], []
        self.not_split = []      # the report's lines on interactions left per pair
        graph = model.graph
        for value_info in graph.input:
            name = value_info.name
            self.kind[name] = USER if name in USER_INPUTS else OTHER if name == USER_INDEX else PAIR
        for name in self.g.constants:
            self.kind[name] = CONST

    def run(self):
        g = self.g
        for node in g.model.graph.node:
            if tuple(node.output) in self.absorbed:
                continue
            kinds = {self.kind.get(name, OTHER) for name in node.input if name}
            if has_subgraph(node):
                self._per_pair(node)
            elif kinds <= {CONST}:
                self.w.copy(node, node.input, node.output)
                self._set(node, CONST)
            elif is_user_gather(node, g) and self.kind.get(node.input[0]) == USER:
                self.kind[node.output[0]] = PAIR_OF_USER
                self.uform[node.output[0]] = node.input[0]
            elif kinds <= {CONST, USER}:
                self.w.copy(node, node.input, node.output)
                self._set(node, USER if rowwise(node, g, self._batch(node, {USER})) else OTHER)
            elif kinds <= {CONST, PAIR_OF_USER} and rowwise(node, g, self._batch(node, {PAIR_OF_USER})):
                self._on_user_rows(node)
            elif self.split_interactions_on and self.split_interaction(node):
                pass
            elif self.split_layers_on and self._split_layer(node):
                pass
            else:
                self._per_pair(node)
                if self.split_layers_on and node.op_type == "Concat":
                    self._decompose_concat(node)
        for name in g.outputs:
            self._pair(name)
        new = self.w.model(g.model)
        self._unsplit({o for node in self.w.kept for o in node.output})
        return new

    # -- what is left per pair --

    def _unsplit(self, alive):
        """Name the interactions left per pair in the new model: a product of two tensors of
        which one mixes user and item data (``interaction at node N: not recognised``), and
        DCN's cross layers ``x0 * (x W + b) + x`` on such tensors."""
        g = self.g
        sides = {v.name: (1 if v.name in USER_INPUTS else 0 if v.name == USER_INDEX else 2)
                 for v in g.model.graph.input if v.name not in g.constants}    # 1 user, 2 item, 3 both
        for node in g.model.graph.node:
            side = 0
            for name in node.input:
                side |= sides.get(name, 0)
            for name in node.output:
                if name:
                    sides[name] = side
        for node in g.model.graph.node:
            if node.domain not in DOMAINS or not node.output or node.output[0] not in alive \
                    or self.kind.get(node.output[0]) not in (PAIR, OTHER):
                continue
            if node.op_type == "MatMul" and self.split_interactions_on \
                    and not any(n in g.constants for n in node.input) and 3 in (sides.get(n) for n in node.input):
                self.not_split.append(f"interaction at node {node.name or node.output[0]}: not recognised")
            elif node.op_type == "Add" and len(node.input) == 2 and sides.get(node.output[0]) == 3:
                for m, x in (node.input, reversed(node.input)):
                    if self._cross(m, x):
                        self.not_split.append(f"cross layer (x0 * (x W + b) + x) -> {node.output[0]}: not split")
                        break

    def _cross(self, m, x):
        """True when ``m`` is ``Mul(x0, y)`` with y = ``x W (+ b)`` (MatMul or Gemm with a constant W)."""
        g = self.g
        mul = g.producer.get(m)
        if mul is None or mul.op_type != "Mul" or mul.domain not in DOMAINS or len(mul.input) != 2:
            return False
        for y in mul.input:
            node = g.producer.get(y)
            if node is not None and node.op_type == "Add" and node.domain in DOMAINS:
                linear = [g.producer.get(n) for n in node.input if n not in g.constants]
                node = linear[0] if len(linear) == 1 else None
            if node is not None and node.op_type in ("MatMul", "Gemm") and node.domain in DOMAINS \
                    and node.input[0] == x and node.input[1] in g.constants:
                return True
        return False

    def _batch(self, node, kinds):
        return {i for i, name in enumerate(node.input) if name and self.kind.get(name) in kinds}

    def _set(self, node, kind):
        for name in node.output:
            if name:
                self.kind[name] = kind

    def _pair(self, name):
        """The per-pair tensor ``name``: a pair-of-user tensor is gathered once, where first needed."""
        if self.kind.get(name) == PAIR_OF_USER and name not in self.gathered:
            self.w.node("Gather", [self.uform[name], USER_INDEX], [name], axis=0)
            self.gathered.add(name)
        return name

    def _on_user_rows(self, node):
        inputs = [self.uform[n] if self.kind.get(n) == PAIR_OF_USER else n for n in node.input]
        outputs = [self.w.fresh(n + ".U") if n else "" for n in node.output]
        new = self.w.copy(node, inputs, outputs)
        self.w.origin[id(new)] = node
        for name, u_name in zip(node.output, outputs):
            if name:
                self.kind[name] = PAIR_OF_USER
                self.uform[name] = u_name

    def _per_pair(self, node):
        """The node as it is, on per-pair inputs. Its outputs are pair tensors when
        it is row-wise in its P-row inputs, else other."""
        inputs = [self._pair(n) if n else "" for n in node.input]
        self.w.copy(node, inputs, node.output)
        kinds = {self.kind.get(n, OTHER) for n in node.input if n}
        batch = self._batch(node, {PAIR_OF_USER, PAIR})
        row_wise = kinds <= {CONST, PAIR_OF_USER, PAIR} and rowwise(node, self.g, batch)
        self._set(node, PAIR if row_wise or is_user_gather(node, self.g) else OTHER)

    # -- (b) layer split --

    def _parts(self, name):
        """The last-axis segments of tensor ``name`` (columns from 0), or None."""
        if name in self.segments:
            return self.segments[name]
        shape = self.g.shape(name)
        if shape is None or len(shape) < 2 or shape[-1] is None:
            return None
        cols = np.arange(shape[-1])
        if self.kind.get(name) == PAIR_OF_USER:
            return [Segment(self.uform[name], USER_SIDE, cols)]
        if self.kind.get(name) == PAIR:
            return [Segment(name, PAIR_SIDE, cols)]
        return None

    def _decompose_concat(self, node):
        out = node.output[0]
        rank = self.g.rank(out)
        axis = attr(node, "axis")
        if rank is None or rank < 2 or axis is None or normalize_axis(axis, rank) != rank - 1:
            return
        segments, offset = [], 0
        for name in node.input:
            parts = self._parts(name) if self.g.rank(name) == rank else None
            if parts is None:
                return
            segments += [Segment(s.name, s.side, s.cols + offset) for s in parts]
            offset += self.g.shape(name)[-1]
        if any(s.side == USER_SIDE for s in segments):
            self.segments[out] = segments

    def _split_layer(self, node):
        g = self.g
        if node.domain not in DOMAINS or node.op_type not in ("MatMul", "Gemm"):
            return False
        x = node.input[0]
        segments = self.segments.get(x)
        w = g.value(node.input[1])
        if segments is None or w is None or w.ndim != 2 or w.dtype != np.float32:
            return False
        if not {s.side for s in segments} == {USER_SIDE, PAIR_SIDE}:
            return False
        bias, out = None, node.output[0]
        if node.op_type == "Gemm":
            if attr(node, "transA", 0) or g.rank(x) != 2:
                return False
            if attr(node, "transB", 0):
                w = w.T
            w = w * np.float32(attr(node, "alpha", 1.0))
            if len(node.input) > 2 and node.input[2]:
                bias = g.value(node.input[2])
                if bias is None or not (bias.ndim <= 1 or bias.shape[0] == 1):
                    return False
                bias = bias * np.float32(attr(node, "beta", 1.0))
        else:
            add = self._bias_add(node)
            if add is not None:
                bias_name = add.input[1] if add.input[0] == out else add.input[0]
                bias, out = g.value(bias_name), add.output[0]
                self.absorbed.add(tuple(add.output))
        user = [s for s in segments if s.side == USER_SIDE]
        pair = [s for s in segments if s.side == PAIR_SIDE]
        user_cols = np.concatenate([s.cols for s in user])
        pair_cols = np.concatenate([s.cols for s in pair])
        base = node.output[0]
        x_user = self.w.concat([s.name for s in user], -1, base + ".user_in")
        x_pair = self.w.concat([s.name for s in pair], -1, base + ".pair_in")
        y_user = self.w.op("MatMul", [x_user, self.w.const(base + ".W_user", w[user_cols])], base + ".user")
        if bias is not None:
            y_user = self.w.op("Add", [y_user, self.w.const(base + ".b", bias.astype(np.float32))], base + ".user_b")
        y_pair = self.w.op("MatMul", [x_pair, self.w.const(base + ".W_pair", w[pair_cols])], base + ".pair")
        y_user_pp = self.w.op("Gather", [y_user, USER_INDEX], base + ".user_pp", axis=0)
        self.w.node("Add", [y_user_pp, y_pair], [out])
        self.kind[out] = PAIR
        self.layers.append(f"{node.op_type} -> {out}: {len(user_cols)} input rows on U rows, "
                           f"{len(pair_cols)} per pair, {w.shape[1]} outputs")
        return True

    def _bias_add(self, node):
        """The Add of a constant that is the MatMul's only consumer, if any."""
        out = node.output[0]
        consumers = self.g.consumers.get(out, [])
        if out in self.g.outputs or len(consumers) != 1:
            return None
        add = consumers[0]
        if add.op_type != "Add" or add.domain not in DOMAINS or len(add.input) != 2:
            return None
        other = add.input[1] if add.input[0] == out else add.input[0]
        bias = self.g.value(other)
        out_rank = self.g.rank(out)
        if bias is None or out_rank is None or other == out or bias.dtype != np.float32:
            return None
        if not (bias.ndim < out_rank or (bias.ndim == out_rank and bias.shape[0] == 1)):
            return None
        return add
