"""The stage contract: ``Stage`` (setup / process), ``Output`` and ``Batch``.

A stage processor is a small class. The pipeline compiler calls the class
method ``outputs(config, bundle)`` to learn what it writes (so it can size
shared memory and check the DAG), and ``inputs(config)`` to learn what it
reads; the worker process calls ``setup(config, bundle)`` once after start
and then ``process(batch)`` once per micro-batch, from the loop that also
heartbeats.

``process`` receives one ``Batch`` covering several requests: per-request
columns are arrays of R rows, per-candidate columns are concatenated over the
requests, with ``offsets`` int64[R+1] (CSR, as in EmbeddingBag). It returns a
dict of output name -> array, with exactly the declared dtypes and row shapes.
A stage may fail one request (``batch.fail``) without failing the others, and
count per-request facts (``batch.count``) that end up in the reply.

NaN in a float candidate column means "no value": a candidate dropped before
the stage that writes it (shed, pruned, a query-cache hit). A stage that runs
a model passes the model's scores through ``batch.drop_invalid``, so a NaN or
infinite score the model gave is NaN too (never ranked), counted per request
as ``invalid_scores`` (the reply, ``jizhictl stats``, Prometheus); a dropped
candidate is not counted. That NaN is ``INVALID_NAN``, whose bits tell it from
a dropped candidate's NaN where it matters: the broker leaves it out of a
``return: all`` reply, where a dropped candidate reads NaN.
"""
import time
from dataclasses import dataclass

import numpy as np

REQUEST = "request"
CANDIDATE = "candidate"
INVALID_SCORES = "invalid_scores"   # the count of a model's non-finite scores (``Batch.drop_invalid``)
# A quiet NaN with a payload of its own: copies, selections and shared memory keep its bits, so the
# broker can tell an invalid score from a dropped one (arithmetic need not keep them: a combiner's sum
# over an invalid head score may read as dropped in a return: all reply; it is counted all the same).
INVALID_NAN_BITS = np.uint32(0x7FC0_0A1E)
INVALID_NAN = np.array(INVALID_NAN_BITS).view(np.float32)


@dataclass(frozen=True)
class Output:
    """A declared stage output: per-request or per-candidate rows of ``shape``."""
    name: str
    scope: str        # REQUEST | CANDIDATE
    dtype: str        # numpy dtype name
    shape: tuple = ()  # row shape


# Columns every batch has, filled from the request itself (the broker writes
# item_ids and recall_scores into shared memory at admission).
REQUEST_INPUTS = {
    "item_ids": Output("item_ids", CANDIDATE, "uint64"),
    "recall_scores": Output("recall_scores", CANDIDATE, "float32"),
}


class Batch:
    """A micro-batch of R requests.

    Attributes: ``users`` uint64[R], ``top_k`` int64[R], ``ret_all`` bool[R],
    ``deadline_s`` float64[R] (each request's deadline: an instant of
    ``time.monotonic()``, seconds; jizhi/messages.py), ``offsets``
    int64[R+1], ``columns`` (name -> array), ``failed`` (request index ->
    (code, message)), ``counts`` (name -> int64[R]), ``warmup`` (True for
    the warm-up batch a worker runs before it serves), ``narrowed_s``
    (seconds the runtime spent narrowing and widening the columns around
    dropped candidates: ``Selection``), ``qcache`` (the query cache's account
    of this batch, which the ranker completes: workers/query_cache.py,
    ``Account``; None without a query_cache stage in this worker), ``feats``
    (each request's own features, a map or None; None when no request has
    any: workers/data_reader.py), ``keep`` (float64[R], the fraction of its
    candidates each request keeps, decided at admission: workers/shedder.py;
    None: keep all).
    """

    def __init__(self, users, top_k, ret_all, deadline_s, offsets, columns):
        self.users = users
        self.top_k = top_k
        self.ret_all = ret_all
        self.deadline_s = deadline_s
        self.offsets = offsets
        self.columns = columns
        self.failed = {}
        self.counts = {}
        # A worker's warm-up batch before READY (workers/run.py): compute, but leave no trace in
        # shared state (a stage that caches or counts across requests skips that).
        self.warmup = False
        # What dropping candidates costs: the query cache weighs it against what its hits save.
        self.narrowed_s = 0.0
        self.qcache = None
        # The requests' own features (protocol: context and features), one map or None per request; None
        # when no request of the batch carries any (workers/data_reader.py applies them).
        self.feats = None
        self.keep = None
        self._rows = {}         # profile_rows: (snapshot directory, side) -> (ids array, (rows, known))

    def profile_rows(self, profiles, ids):
        """``profiles.rows(ids)`` (jizhi/bundle.py), once per batch and ids array: the data reader, the cube
        stage's item rows and the dnn's item table each need the candidates' rows."""
        key = (str(profiles.root), profiles.side)
        hit = self._rows.get(key)
        if hit is not None and hit[0] is ids:
            return hit[1]
        found = profiles.rows(ids)
        self._rows[key] = (ids, found)
        return found

    @property
    def n_requests(self):
        return self.users.shape[0]

    @property
    def n_candidates(self):
        return int(self.offsets[-1])

    def candidate_request(self):
        """int64[P]: the request index of every candidate."""
        return np.repeat(np.arange(self.n_requests, dtype=np.int64), np.diff(self.offsets))

    def per_request_sum(self, values):
        """int64[R]: the sum of per-candidate ``values`` over each request's candidates. A request
        may have none (the query cache dropped them all): its sum is 0 (``np.add.reduceat`` would
        repeat the next request's first value, or fail at the end)."""
        c = np.zeros(self.n_candidates + 1, dtype=np.int64)
        np.cumsum(values, out=c[1:])
        return c[self.offsets[1:]] - c[self.offsets[:-1]]

    def __getitem__(self, name):
        return self.columns[name]

    def fail(self, i, code, message):
        """Fail request i (its other columns are ignored from here on)."""
        self.failed.setdefault(int(i), (code, message))

    def count(self, name, per_request):
        """Add per-request counts (int64[R]) under ``name``; they reach the reply."""
        prev = self.counts.get(name)
        per_request = np.asarray(per_request, dtype=np.int64)
        self.counts[name] = per_request if prev is None else prev + per_request

    def drop_invalid(self, score):
        """A model's ``score`` (float32[P] over this batch's candidates) with ``INVALID_NAN`` in place of
        every NaN or infinite value, counted per request under ``INVALID_SCORES``. The ranker never
        ranks NaN, so such a candidate is dropped from the top-K, and a client never receives the
        value. One ``isfinite`` pass when every score is finite (the usual case)."""
        bad = ~np.isfinite(score)
        if not bad.any():
            return score
        self.count(INVALID_SCORES, self.per_request_sum(bad))
        return np.where(bad, INVALID_NAN, score).astype(np.float32, copy=False)


class Stage:
    """Base class of stage processors. Subclasses override the four methods; a stage whose columns
    do not depend on its config or bundle declares them as ``fixed_inputs``/``fixed_outputs`` instead
    of overriding ``inputs``/``outputs``."""

    #: the built-in name (``processor = "data_reader"``); user classes are named by import path
    name = None
    #: what ``inputs`` and ``outputs`` return unless a subclass overrides them
    fixed_inputs = ()
    fixed_outputs = ()

    @classmethod
    def inputs(cls, config):
        """Names of the columns ``process`` reads (request inputs or earlier outputs)."""
        return cls.fixed_inputs

    @classmethod
    def outputs(cls, config, bundle):
        """The ``Output``s ``process`` returns; ``bundle`` is the model's Bundle or None."""
        return cls.fixed_outputs

    def setup(self, config, bundle):
        """Open what the stage needs (profiles, cube, sessions). Runs in the worker after start."""

    def process(self, batch):
        """Compute the declared outputs for ``batch``; return {name: array}."""
        raise NotImplementedError

    def batch_boundary(self):
        """Optional: called before each micro-batch (pick up a new hot-tier generation, ...)."""

    def report(self, counters):
        """Optional: write this stage's counters into the worker's stats row (jizhi/stats.py, C_*)."""


class Selection:
    """Candidates a stage dropped for the rest of its group (the query cache's hits, a cascade).

    A stage drops candidates by returning ``_select``: int64 indices (ascending)
    of the current batch's candidates that go on. The worker runtime then
    narrows every per-candidate column and the offsets, so later stages of the
    same worker never compute the dropped ones. A stage with
    ``sees_all_candidates = True`` (the ranker: dropped and cached candidates
    rejoin there) and the group's writes to shared memory see every candidate
    again: columns computed on the narrowed batch are widened with NaN (floats),
    0 or False where a candidate was dropped. The CPU time of both
    (``time.thread_time``) is added to the batch's ``narrowed_s``: a cost of
    the stage that dropped them.
    """

    def __init__(self, batch, scope_of):
        self.batch = batch
        self.scope_of = scope_of
        self.full_offsets = batch.offsets
        self.n = batch.n_candidates
        self.sel = None            # indices into the full candidates, or None: all of them
        self.dropped = None        # the complement of ``sel`` (computed when first widening)
        self.full = {}             # full-size versions of the columns that existed when narrowing

    def _candidate(self, name):
        return self.scope_of.get(name) == CANDIDATE

    def _widen(self, name, arr):
        if self.sel is None:
            return arr
        arr = np.asarray(arr)
        base = self.full.get(name)
        if base is None:
            # Only the dropped rows are filled: the others are overwritten just below (a column of
            # embeddings is a kilobyte per candidate; filling it all first wrote it twice).
            base = np.empty((self.n,) + arr.shape[1:], dtype=arr.dtype)
            if self.dropped is None:
                kept = np.zeros(self.n, dtype=bool)
                kept[self.sel] = True
                self.dropped = np.flatnonzero(~kept)
            base[self.dropped] = np.nan if arr.dtype.kind == "f" else 0
        else:
            base = base.copy()
        base[self.sel] = arr
        return base

    @property
    def empty(self):
        return self.sel is not None and self.sel.shape[0] == 0

    def select(self, idx):
        t0 = time.thread_time()
        cols = self.batch.columns
        for name in list(cols):
            if self._candidate(name):
                self.full[name] = self._widen(name, cols[name])
        idx = np.asarray(idx, dtype=np.int64)
        self.sel = idx if self.sel is None else self.sel[idx]
        self.dropped = None
        for name, full in self.full.items():
            cols[name] = full[self.sel]
        r = self.batch.n_requests
        req = np.repeat(np.arange(r, dtype=np.int64), np.diff(self.full_offsets))
        offsets = np.zeros(r + 1, dtype=np.int64)
        np.cumsum(np.bincount(req[self.sel], minlength=r), out=offsets[1:])
        self.batch.offsets = offsets
        self.batch.narrowed_s += time.thread_time() - t0

    def widen(self, keep=None):
        """Every candidate again. ``keep``: the columns still read or written from here on (the worker
        runtime's); a per-candidate column outside it is left out of the batch instead of widened (on
        the demo's fused plan the embeddings and signatures, a kilobyte and more per candidate)."""
        if self.sel is None:
            return
        t0 = time.thread_time()
        cols = self.batch.columns
        for name in list(cols):
            if self._candidate(name):
                if keep is None or name in keep:
                    cols[name] = self._widen(name, cols[name])
                else:
                    del cols[name]
        self.sel = None
        self.dropped = None
        self.full = {}
        self.batch.offsets = self.full_offsets
        self.batch.narrowed_s += time.thread_time() - t0
