"""Many models in one pipeline: the ``combiner`` and the ``cascade`` stages.

Several ``model_inference`` stages can serve different models in one
pipeline (``model = "ctr"``, ``output = "ctr"``: a head bundle on the
pipeline model's features, each versioned and reloaded on its own). They
share the reader, feature and cube stages in front of them.

* ``combiner`` (multi-objective heads): the heads score the same candidates
  in parallel (separate groups run them at once); the combiner joins them and
  writes ``score`` from the configured weights::

      [[stage]]
      name = "combine"
      processor = "combiner"
      heads = { ctr = 1.0, cvr = 0.5, dwell = 0.2 }
      mode = "sum"        # sum: w1*ctr + w2*cvr + ...; product: ctr^w1 * cvr^w2 * ...

* ``cascade`` (multi-phase): keeps each request's ``keep`` best candidates
  by a light model's column (or ``keep_ratio`` of them) and drops the rest for
  the stages after it in the same worker, so the heavy model scores only the
  survivors; the dropped candidates rejoin at the ranker unscored (NaN, never
  in the top-K)::

      [[stage]]
      name = "prune"
      processor = "cascade"
      by = "light"
      keep = 100

  The stages after a cascade must be fused into its group (the compiler
  checks): a narrowed batch exists only inside one worker.
"""
import numpy as np

from jizhi.workers.stage import CANDIDATE, Output, Stage

MODES = ("sum", "product")


def _heads(config):
    heads = config.get("heads")
    if not isinstance(heads, dict) or not heads:
        raise ValueError("combiner needs heads = { column = weight, ... }")
    for name, w in heads.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w):
            raise ValueError(f"combiner: the weight of head {name!r} must be a number, got {w!r}")
    mode = config.get("mode", "sum")
    if mode not in MODES:
        raise ValueError(f"combiner: mode must be one of {', '.join(MODES)}, got {mode!r}")
    return heads, mode


class Combiner(Stage):
    name = "combiner"

    @classmethod
    def inputs(cls, config):
        return tuple(_heads(config)[0])

    @classmethod
    def outputs(cls, config, bundle):
        _heads(config)
        return (Output(config.get("output", "score"), CANDIDATE, "float32"),)

    def setup(self, config, bundle):
        heads, self.mode = _heads(config)
        self.heads = [(name, np.float32(w)) for name, w in heads.items()]
        self.column = config.get("output", "score")

    def process(self, batch):
        if self.mode == "sum":
            out = np.zeros(batch.n_candidates, dtype=np.float32)
            for name, w in self.heads:
                out += w * batch[name]
        else:
            # A product of powers, through logs (heads are probabilities; 0 gives -inf -> 0).
            with np.errstate(divide="ignore"):
                log = np.zeros(batch.n_candidates, dtype=np.float32)
                for name, w in self.heads:
                    log += w * np.log(np.maximum(batch[name], 0.0))
            out = np.exp(log)
        return {self.column: out}


def _keep(config):
    keep, ratio = config.get("keep"), config.get("keep_ratio")
    if (keep is None) == (ratio is None):
        raise ValueError("cascade needs exactly one of keep = N (candidates per request) or keep_ratio = 0..1")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"cascade: keep must be an integer >= 1, got {keep!r}")
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1):
        raise ValueError(f"cascade: keep_ratio must be in (0, 1], got {ratio!r}")
    by = config.get("by")
    if not isinstance(by, str) or not by:
        raise ValueError("cascade needs by = the column of the light model's scores")
    return by, keep, ratio


class Cascade(Stage):
    name = "cascade"
    narrows = True      # the stages after it must run in its worker (the compiler checks)

    @classmethod
    def inputs(cls, config):
        return (_keep(config)[0],)

    @classmethod
    def outputs(cls, config, bundle):
        _keep(config)
        return ()

    def setup(self, config, bundle):
        self.by, self.keep, self.ratio = _keep(config)

    def process(self, batch):
        return {"_select": select_top(batch.offsets, batch[self.by], self.keep, self.ratio)}


def select_top(offsets, score, keep=None, ratio=None):
    """Ascending indices of each request's ``keep`` (or ``ceil(ratio * n)``) best candidates by
    ``score`` (NaN last), vectorised over the whole batch: one lexsort, no loop over requests."""
    n = np.diff(offsets)
    req = np.repeat(np.arange(n.shape[0], dtype=np.int64), n)
    key = np.where(np.isnan(score), -np.inf, score)
    order = np.lexsort((-key, req))              # by request, best first within each request
    rank = np.empty(order.shape[0], dtype=np.int64)
    rank[order] = np.arange(order.shape[0], dtype=np.int64) - offsets[:-1][req[order]]
    if keep is not None:     # one count for every request, or one per request
        limit = np.broadcast_to(np.asarray(keep, dtype=np.int64), n.shape)
    else:
        limit = np.ceil(n * float(ratio)).astype(np.int64)
    return np.flatnonzero(rank < limit[req])
