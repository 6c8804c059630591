"""The demo bundle and its request trace: synthetic, deterministic from a seed.

Runs offline, in the process that calls it (``jizhictl``'s demo commands,
``jizhid --demo``, tests, benchmarks); never in a serving process. One
module per concept, each importing only those above it in this list:

* ``sampling``: the random streams (one per purpose, so changing one size
  does not reshuffle unrelated parts), the Zipf laws and item popularity;
* ``dense``: the dense graph (layers, weights, ONNX model) and the
  calibration of its final layer;
* ``bundle``: ``init_demo`` writes ``<out_dir>/models/demo/1/`` in the
  bundle format of docs/formats.md: fields, profiles, cube, manifest;
* ``trace``: ``generate_trace`` writes a ``trace.npz`` of requests against
  such a bundle;
* ``versions``: ``stage_version`` and ``publish`` make further versions of a
  demo bundle (other dense weights, or the deliberately bad ``FAULTS`` for
  tests) and drop them into the watch directory the way a model pipeline
  should: copy into ``<models>/.incoming/``, then one rename;
* ``heads``: ``write_head`` writes a head bundle, a dense graph of its own
  served on the demo's features (docs/formats.md);
* ``__main__``: ``python -m jizhi.tools.demo head``.

The same arguments give byte-identical bundle files. The names below are the
package's interface; ``_fields``, ``_dense_model`` and ``_dense_weights``
also serve tests and ``jizhi.tools.structbench``, which build the demo's
graph without a bundle.
"""
from jizhi.tools.demo.bundle import HASH_SEED, NAME, VERSION, init_demo
from jizhi.tools.demo.dense import DENSE_FEATURES, DIM, ONNX_IR_VERSION, ONNX_OPSET, bundle_model
from jizhi.tools.demo.heads import HEAD_HIDDEN, write_head
from jizhi.tools.demo.trace import generate_trace
from jizhi.tools.demo.versions import FAULTS, publish, stage_version
# (tests and jizhi.tools.structbench build the demo's graph without a bundle)
from jizhi.tools.demo.bundle import _fields  # noqa: F401
from jizhi.tools.demo.dense import _dense_model, _dense_weights  # noqa: F401

__all__ = ["DENSE_FEATURES", "DIM", "FAULTS", "HASH_SEED", "HEAD_HIDDEN", "NAME", "ONNX_IR_VERSION", "ONNX_OPSET",
           "VERSION", "bundle_model", "generate_trace", "init_demo", "publish", "stage_version", "write_head"]
