"""noop: stages that do (almost) no work, for measuring the broker itself.

Used by the broker micro-benchmark (``python -m jizhi.tools.microbench``): a chain
of ``Passthrough`` stages ending in ``Noop`` costs what routing costs (the
event to the worker, the DONE back, the arena reads and writes of a tiny
column) and nothing else, so events routed per second and CPU per stage hop
can be read off directly.

* ``Noop`` (``processor = "jizhi.workers.noop:Noop"``) is a sink: it reads
  ``item_ids`` and writes ``order`` (positions 0..n-1 in request order) and
  ``out_scores`` (zeros), returning the first ``top_k`` candidates;
* ``Passthrough`` (``processor = "jizhi.workers.noop:Passthrough"``) is an
  intermediate hop. It writes one int32 per request under the name of its
  stage config key ``column`` (default ``hop``; every Passthrough of a
  pipeline needs its own name), and reads the column named by ``input``
  when one is given, so a hop can also carry a data dependency.

Both run in a stage worker process like any other processor.
"""
import numpy as np

from jizhi.workers.ranker import SINK_OUTPUTS
from jizhi.workers.stage import REQUEST, Output, Stage


class Noop(Stage):
    name = "noop"
    fixed_inputs = ("item_ids",)
    fixed_outputs = SINK_OUTPUTS

    def process(self, batch):
        counts = np.diff(batch.offsets)
        p = batch.n_candidates
        # Position within its request of every candidate: no per-request loop.
        order = (np.arange(p, dtype=np.int64) - np.repeat(batch.offsets[:-1], counts)).astype(np.int32)
        batch.count("returned", np.minimum(batch.top_k, counts))
        return {"order": order, "out_scores": np.zeros(p, dtype=np.float32)}


class Passthrough(Stage):
    name = "passthrough"

    @classmethod
    def inputs(cls, config):
        src = config.get("input")
        return (src,) if src else ()

    @classmethod
    def outputs(cls, config, bundle):
        return (Output(config.get("column", "hop"), REQUEST, "int32"),)

    def setup(self, config, bundle):
        self.column = config.get("column", "hop")

    def process(self, batch):
        return {self.column: np.ones(batch.n_requests, dtype=np.int32)}
