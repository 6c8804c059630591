"""MatMul/Gemm FLOPs of a bundle-form dense graph, per pair and per user.

What the structured-features pass reports before and after (``StructureReport``),
what the item-side split saves and what ``python -m jizhi.tools.structbench``
prints. An estimate from onnx shape inference (no onnxruntime): 2 FLOPs per
multiply-add of every MatMul and Gemm in the default domain, at three (U, P)
sizes; other ops are not counted. Runs wherever it is called.
"""
import dataclasses

import numpy as np
import onnx
from onnx import shape_inference

from jizhi.graph.proto import DOMAINS, USER_INPUTS, attr, value_shapes


@dataclasses.dataclass(frozen=True)
class Flops:
    """MatMul/Gemm FLOPs (2 per multiply-add) of a model, from inferred shapes.

    ``per_pair``: on P rows, per pair; ``per_user``: on U rows, per user;
    ``unknown``: MatMul/Gemm nodes whose shapes could not be inferred (not counted).
    """
    per_pair: float
    per_user: float
    unknown: int = 0

    def at(self, candidates):
        """FLOPs per pair when every user has ``candidates`` candidates."""
        return self.per_pair + self.per_user / candidates


def _with_rows(model, users, pairs):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value_info in fixed.graph.input:
        dims = value_info.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = users if value_info.name in USER_INPUTS else pairs
    return fixed


def _matmul_flops(model):
    """(total MatMul/Gemm FLOPs, nodes of unknown shape) of a model with static input shapes."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # counted as unknown: the FLOPs are an estimate for the report
        inferred = model
    shapes = value_shapes(inferred)
    total, unknown = 0, 0
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in DOMAINS:
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is None or out is None or None in a or None in out or not a:
            unknown += 1
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            k = a[0]
        else:
            k = a[-1]
        total += 2 * int(np.prod(out)) * k
    return total, unknown


def flops(model):
    """MatMul/Gemm FLOPs per pair and per user of a bundle-form model (``Flops``).

    Shapes are inferred at (U, P) = (2, 3), (2, 5) and (4, 3); the FLOPs are
    assumed affine in U and P (true of models whose nodes run on U or P rows).
    """
    base, unknown = _matmul_flops(_with_rows(model, 2, 3))
    more_pairs, _ = _matmul_flops(_with_rows(model, 2, 5))
    more_users, _ = _matmul_flops(_with_rows(model, 4, 3))
    return Flops((more_pairs - base) / 2, (more_users - base) / 2, unknown)
