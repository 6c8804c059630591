"""The interaction split of the structured-features pass: DLRM-style pairwise
dot products ``Z = T @ T^T`` of user and item vectors, split into user-user
entries computed once per user and user-item and item-item entries per pair.

The forms recognised and what they become: ``jizhi/graph/structured.py``,
module docstring, "Recognised forms", interaction split. Runs inside
``structure`` (whichever process calls it); deterministic.

``InteractionSplit`` is mixed into the pass's ``Structurer``
(``jizhi.graph.structurer``), whose walk calls ``split_interaction(node)``
for each node it meets. It reads and writes the Structurer's state: ``g``
(the input ``Graph``), ``w`` (the ``Writer``), ``kind`` (tensor -> kind),
``uform`` (pair-of-user tensor -> its U-row tensor), ``segments`` (tensor ->
its ``Segment`` columns, which a layer split reads), ``interactions`` (the
report's lines) and ``_pair(name)`` (a tensor per pair, gathered once).
"""
import numpy as np

from jizhi.graph.proto import DOMAINS, USER_INDEX, attr, normalize_axis
from jizhi.graph.rows import PAIR, PAIR_OF_USER, PAIR_SIDE, USER_SIDE, Segment, axes_input


class InteractionSplit:
    """Recognising an interaction (``_match_interaction``) and writing it split (``split_interaction``)."""

    def split_interaction(self, node):
        match = self._match_interaction(node)
        if match is None:
            return False
        fields, n_fields, dim, index = match
        user = [part for side, part, _, _ in fields if side == USER_SIDE]
        item = [part for side, part, _, _ in fields if side == PAIR_SIDE]
        side_of, local = [], []
        counts = {USER_SIDE: 0, PAIR_SIDE: 0}
        for side, _, k, _ in fields:
            for _ in range(k):
                side_of.append(side)
                local.append(counts[side])
                counts[side] += 1
        n_user, n_item = counts[USER_SIDE], counts[PAIR_SIDE]
        # Selected entries per block: (column of the selection, flat index in the block).
        # Z is symmetric, so an item-user entry is read from the user-item block.
        selected = {"uu": [], "ui": [], "ii": []}
        for m, s in enumerate(index):
            i, j = divmod(s, n_fields)
            if side_of[i] == side_of[j] == USER_SIDE:
                selected["uu"].append((m, local[i] * n_user + local[j]))
            elif side_of[i] == side_of[j] == PAIR_SIDE:
                selected["ii"].append((m, local[i] * n_item + local[j]))
            else:
                a, b = (local[i], local[j]) if side_of[i] == USER_SIDE else (local[j], local[i])
                selected["ui"].append((m, a * n_item + b))

        out = node.output[0]
        w = self.w
        reshape = fields[0][3]
        tu = self._stack(user, n_user, dim, reshape, out + ".Tu", user_rows=True)
        ti = self._stack(item, n_item, dim, reshape, out + ".Ti", user_rows=False)
        # onnxruntime folds these Transposes into the MatMuls (transB); no per-pair copy.
        segments = []
        if selected["uu"]:
            z = w.op("MatMul", [tu, w.op("Transpose", [tu], out + ".Tu_t", perm=[0, 2, 1])], out + ".Zuu")
            segments.append(self._select(z, n_user * n_user, selected["uu"], USER_SIDE, out + ".uu"))
        if selected["ui"] or selected["ii"]:
            ti_t = w.op("Transpose", [ti], out + ".Ti_t", perm=[0, 2, 1])
        if selected["ui"]:
            tu_pp = w.op("Gather", [tu, USER_INDEX], out + ".Tu_pp", axis=0)
            z = w.op("MatMul", [tu_pp, ti_t], out + ".Zui")
            segments.append(self._select(z, n_user * n_item, selected["ui"], PAIR_SIDE, out + ".ui"))
        if selected["ii"]:
            z = w.op("MatMul", [ti, ti_t], out + ".Zii")
            segments.append(self._select(z, n_item * n_item, selected["ii"], PAIR_SIDE, out + ".ii"))

        # The entries in their original order, for consumers other than a layer split.
        blocks = [w.op("Gather", [s.name, USER_INDEX], s.name + "_pp", axis=0) if s.side == USER_SIDE else s.name
                  for s in segments]
        order = np.concatenate([s.cols for s in segments])
        if np.array_equal(order, np.arange(order.shape[0])):
            if len(blocks) > 1:
                w.node("Concat", blocks, [out], axis=1)
            else:
                w.node("Identity", blocks, [out])
        else:
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.shape[0])
            w.node("Gather", [w.concat(blocks, 1, out + ".blocks"), w.const(out + ".order", inverse)], [out], axis=1)
        self.kind[out] = PAIR
        self.segments[out] = segments
        self.interactions.append(
            f"{out}: {n_fields} vectors of {dim} ({n_user} user, {n_item} item), {len(index)} entries: "
            f"{len(selected['uu'])} user-user on U rows, {len(selected['ui'])} user-item and "
            f"{len(selected['ii'])} item-item per pair")
        return True

    def _select(self, z, size, entries, side, base):
        """The segment of the selected ``entries`` of the product ``z`` ([rows, a, b],
        ``size`` = a * b): z flattened as it is when it holds exactly the selected
        entries (its columns then map to their selection columns), else a column
        Gather of them."""
        flat = self.w.op("Flatten", [z], base + ".flat", axis=1)
        cols = np.array([m for m, _ in entries], dtype=np.int64)
        positions = np.array([f for _, f in entries], dtype=np.int64)
        if np.array_equal(np.sort(positions), np.arange(size)):
            mapped = np.empty(size, dtype=np.int64)
            mapped[positions] = cols
            return Segment(flat, side, mapped)
        picked = self.w.op("Gather", [flat, self.w.const(base + ".index", positions)], base, axis=1)
        return Segment(picked, side, cols)

    def _stack(self, parts, n, dim, reshape, base, user_rows):
        """[rows, n, dim] from the parts of one side (U forms when ``user_rows``).

        Adjacent parts that are unit-step Slices on axis 1 of one tensor, with
        contiguous ranges, are read as one Slice (or as the whole tensor), so
        fields cut out of user_emb or item_emb are not copied twice.
        """
        names = []
        for run in self._slice_runs(parts, reshape):
            if isinstance(run, str):
                names.append(self.uform[run] if user_rows else self._pair(run))
                continue
            source, begin, end, size = run
            source = self.uform[source] if user_rows else self._pair(source)
            if begin == 0 and end == size:
                names.append(source)
            else:
                names.append(self.w.op("Slice", [source, self.w.const(base + ".begin", np.array([begin], np.int64)),
                                                 self.w.const(base + ".end", np.array([end], np.int64)),
                                                 self.w.const(base + ".axis", np.array([1], np.int64))],
                                       base + ".slice"))
        if not reshape:
            return self.w.concat(names, 1, base)
        stacked = self.w.concat(names, 1, base + ".cat")
        return self.w.op("Reshape", [stacked, self.w.const(base + ".shape", np.array([0, n, dim], np.int64))], base)

    def _slice_runs(self, parts, reshape):
        """``parts`` with runs of contiguous Slices of one tensor merged into
        ``(source, begin, end, source size on axis 1)``; other parts as their names."""
        runs = []
        for part in parts:
            piece = None if reshape else self._unit_slice(part)
            if piece is None:
                runs.append(part)
            elif runs and not isinstance(runs[-1], str) and runs[-1][0] == piece[0] and runs[-1][2] == piece[1]:
                runs[-1] = (piece[0], runs[-1][1], piece[2], piece[3])
            else:
                runs.append(piece)
        return runs

    def _unit_slice(self, part):
        """(source, begin, end, size) when ``part`` is rows of ``source`` [rows, size, D]
        on axis 1: ``Slice(source, [begin], [end], [1])`` (step 1, 0 <= begin < end
        <= size) or ``Unsqueeze(Gather(source, k, axis=1), [1])`` (k a constant
        scalar: begin = k, end = k + 1), ``source`` of the part's kind."""
        g = self.g
        node = g.producer.get(part)
        if node is None or node.domain not in DOMAINS:
            return None
        if node.op_type == "Unsqueeze":
            axes = axes_input(node, g)
            gather = g.producer.get(node.input[0])
            if axes not in ([1], [-2]) or gather is None or gather.op_type != "Gather" or len(gather.input) != 2:
                return None
            source, k = gather.input[0], g.value(gather.input[1])
            if k is None or k.shape != () or k.dtype.kind not in "iu" or g.rank(source) != 3:
                return None
            if normalize_axis(attr(gather, "axis", 0), 3) != 1:
                return None
            begin = end = int(k)
            end += 1
        elif node.op_type == "Slice" and g.opset >= 10:
            inputs = list(node.input) + [""] * (5 - len(node.input))
            source = inputs[0]
            begin, end = g.ints(inputs[1]), g.ints(inputs[2])
            axes = g.ints(inputs[3]) if inputs[3] else None
            steps = g.ints(inputs[4]) if inputs[4] else [1]
            if begin is None or end is None or axes not in ([1], [-2]) or steps != [1]:
                return None
            if len(begin) != 1 or len(end) != 1:
                return None
            begin, end = begin[0], end[0]
        else:
            return None
        shape = g.shape(source)
        if self.kind.get(source) != self.kind.get(part) or shape is None or len(shape) != 3 or shape[1] is None:
            return None
        if not 0 <= begin < end <= shape[1]:
            return None
        return source, begin, end, shape[1]

    def _match_interaction(self, node):
        """(fields, F, D, selected flat indices) of a recognised interaction
        (module docstring) whose selected entries ``node`` outputs, or None.
        ``fields``: (side, part, k, reshape) per part of T, in order."""
        g = self.g
        if node.domain not in DOMAINS:
            return None
        if node.op_type == "Gather":
            index = self._selection(node)
            product = None if index is None else self._match_product(g.producer.get(node.input[0]))
            if product is None:
                return None
            fields, n_fields, dim = product
            index = [s + n_fields * n_fields if s < 0 else s for s in index]
            if any(not 0 <= s < n_fields * n_fields for s in index):
                return None
            return fields, n_fields, dim, index
        product = self._match_product(node)
        # A flattened product read through selections is split at the selections.
        consumers = g.consumers.get(node.output[0], [])
        if product is None or any(self._selection(c) is not None for c in consumers) \
                or not (consumers or node.output[0] in g.outputs):
            return None
        fields, n_fields, dim = product
        return fields, n_fields, dim, list(range(n_fields * n_fields))

    def _selection(self, node):
        """The constant flat indices (list of ints) when ``node`` is ``Gather(x [rows, n],
        idx [k], axis=1)``, else None."""
        g = self.g
        if node.op_type != "Gather" or node.domain not in DOMAINS or len(node.input) != 2:
            return None
        index = g.value(node.input[1])
        if index is None or index.ndim != 1 or index.dtype.kind not in "iu" or g.rank(node.input[0]) != 2:
            return None
        if normalize_axis(attr(node, "axis", 0), 2) != 1:
            return None
        return [int(s) for s in index]

    def _match_product(self, flatten):
        """(fields, F, D) when ``flatten`` is ``Flatten(Z, axis=1)`` or ``Reshape(Z,
        [0|-1, F*F] or [0, -1])`` of ``Z = MatMul(T, Transpose(T, [0,2,1]))``
        with T in a recognised form, else None."""
        g = self.g
        if flatten is None or flatten.domain not in DOMAINS or flatten.op_type not in ("Flatten", "Reshape"):
            return None
        z = flatten.input[0]
        z_shape = g.shape(z)
        if z_shape is None or len(z_shape) != 3 or z_shape[1] is None or z_shape[1] != z_shape[2]:
            return None
        n_fields = z_shape[1]
        if flatten.op_type == "Flatten":
            if normalize_axis(attr(flatten, "axis", 1), 3) != 1:
                return None
        elif attr(flatten, "allowzero", 0) or g.ints(flatten.input[1]) not in (
                [0, n_fields * n_fields], [-1, n_fields * n_fields], [0, -1]):
            return None
        matmul = g.producer.get(z)
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in DOMAINS:
            return None
        t, t_t = matmul.input
        transpose = g.producer.get(t_t)
        if (transpose is None or transpose.op_type != "Transpose" or transpose.input[0] != t
                or list(attr(transpose, "perm", [])) != [0, 2, 1]):
            return None
        t_shape = g.shape(t)
        if t_shape is None or len(t_shape) != 3 or t_shape[1] != n_fields or t_shape[2] is None:
            return None
        dim = t_shape[2]
        producer = g.producer.get(t)
        reshape = False
        if producer is not None and producer.op_type == "Reshape" and producer.domain in DOMAINS:
            shape = g.ints(producer.input[1])
            if attr(producer, "allowzero", 0) or shape is None or len(shape) != 3 or shape[0] not in (0, -1) \
                    or shape[1:] != [n_fields, dim]:
                return None
            producer = g.producer.get(producer.input[0])
            reshape = True
        if producer is None or producer.op_type != "Concat" or producer.domain not in DOMAINS:
            return None
        rank = 2 if reshape else 3
        if normalize_axis(attr(producer, "axis", 0), rank) != 1:
            return None
        fields = []
        for part in producer.input:
            shape = g.shape(part)
            if shape is None or len(shape) != rank or shape[1] is None:
                return None
            if reshape:
                if shape[1] % dim:
                    return None
                k = shape[1] // dim
            else:
                if shape[2] != dim:
                    return None
                k = shape[1]
            kind = self.kind.get(part)
            if kind not in (PAIR_OF_USER, PAIR):
                return None
            fields.append((USER_SIDE if kind == PAIR_OF_USER else PAIR_SIDE, part, k, reshape))
        if sum(k for _, _, k, _ in fields) != n_fields or {f[0] for f in fields} != {USER_SIDE, PAIR_SIDE}:
            return None
        return fields, n_fields, dim
