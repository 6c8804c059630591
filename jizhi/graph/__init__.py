"""The ONNX graph passes: what jizhi does to a bundle's dense graph before a
worker runs it, and the graph helpers the model importer shares with them.

Layer: above the base modules (errors, config, bundle, ...), beside
``jizhi.cube`` (neither imports the other), below ``jizhi.workers``: a
model inference worker, the validator and the tools import this package,
never the other way. Nothing here starts a process or shares state across
processes; every pass takes a ModelProto and returns a new one.

* ``proto``: reading and writing ONNX graphs (a node's attributes, a
  Constant's value, static dims, subgraphs, pruning, assembling a model; the
  ``Graph`` a pass reads and the ``Writer`` it writes with). The importer
  (``jizhi.tools.importer``) uses it too.
* ``rows``: tensor kinds by rows and the ops that are row-wise.
* ``ops``: a few ONNX ops in numpy (shape computations, data movement).
* ``canonical``: the pre-pass both passes run first (torch.onnx.export's
  forms made the ones they recognise, same scores).
* ``structured``: the structured-features pass (``structure``,
  ``unstructure``, ``check``), with ``structurer`` (its walk and layer
  split), ``interactions`` (its interaction split) and ``flops`` (the
  MatMul/Gemm FLOPs it reports).
* ``itemside``: the item-side split and the item table built from it.
* ``floor``: the analytic floor, the FLOPs per pair of only the work that
  depends on both a user and an item tensor.
* ``session``: the onnxruntime session options a worker runs a graph with.

The benchmark of the passes is ``python -m jizhi.tools.structbench``.
"""
