"""model_inference: the dense part of the model through onnxruntime.

One ``InferenceSession.run`` per micro-batch: the graph takes U users (dense
features and pooled user embeddings) and P candidates with a candidate ->
user index. The session uses one intra-op thread (stage option
``intra_op_threads``) and one inter-op thread and does not spin, so worker
processes, not threads, share the cores; a stage's or fused group's
``cores = [...]`` pins its workers to a core set (a *session group*: pools of
different models do not fight over cores). A NaN or infinite score from the
graph becomes NaN (never ranked) and is counted in ``invalid_scores``
(``Batch.drop_invalid``, workers/stage.py).

Structured features (RecServe), stage option ``structured`` (default: from
the pipeline's ``structured = true|false``):

* ``"on"`` (pipeline default): the bundle's graph goes through ``jizhi.graph.structured.structure``
  when the worker loads it: the part that depends only on the user runs on U
  rows (once per request) and is gathered per pair only where it meets item
  tensors; a first layer over a concatenation of user and item tensors, and
  DLRM's pairwise dot interactions, are split into a user part computed once
  and per-pair parts. Same scores (tests/test_structured.py).
* ``"off"``: the naive per-pair form (``unstructure``): every user tensor is
  gathered per pair at the start and all of the network runs on P rows, as a
  generic serving system would run it. For comparison.
* ``"as_is"``: the bundle's graph untouched.

Item-side precomputation, stage option ``item_cache = true`` (with
structured features on; default off): the part of the graph that depends only
on the item (on the demo model, the item rows of the first top layer: 256 x
256 multiply-adds per pair) is computed once per item of the bundle version
when the worker opens it, into a table in the worker's memory
(``jizhi.graph.itemside``: items x floats x 4 bytes, 100 MiB for the demo's 100,000
items; refused over ``item_cache_mb``, default 512, with a log line, and the
worker then runs without it, as it does for a head model that has no item
profiles of its own), and each candidate reads its row. The table takes about
a second to build per worker and version, and is not counted in the memory
check of a new version (jizhi/supervisor/loader.py's estimate comes from validation).

Several models in one pipeline: a stage option ``model = "ctr"`` runs that
model's graph (a head bundle on the pipeline model's features, versioned on
its own) and ``output = "ctr"`` names the column its scores go to, which a
``combiner`` (weighted heads) or a ``cascade`` (a light model prunes for a
heavy one) reads (workers/combiner.py).

A pipeline with ``structured = false`` also makes the data reader, the
feature processor and the cube accessor work per pair (user columns of P
rows: each candidate carries its user's features); this stage then feeds
``user_index = 0..P-1``.
"""
import functools
import logging

import numpy as np
import onnx
import onnxruntime as ort

from jizhi.cube.pooling import default_vectors, pool_blocks
from jizhi.cube.store import open_cube
from jizhi.graph.itemside import ItemTable, split_items
from jizhi.sharedtable import how as table_how, unlink as unlink_table
from jizhi.graph.session import session_options
from jizhi.graph.structured import structure, unstructure
from jizhi.profilestore import STEP_ITEMS, source as profile_source
from jizhi.workers.stage import CANDIDATE, Output, Stage


STRUCTURED = ("on", "off", "as_is")


def open_session(path):
    return ort.InferenceSession(str(path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


def intra_op_threads(config):
    threads = config.get("intra_op_threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
        raise ValueError(f"intra_op_threads must be an integer from 1 to 64, got {threads!r}")
    return threads


def structured_mode(config):
    mode = config.get("structured", "on")
    if mode not in STRUCTURED:
        raise ValueError(f"structured must be one of {', '.join(STRUCTURED)}, got {mode!r}")
    return mode


def output_column(config):
    """The column the scores go to: ``score`` (what the ranker reads), or a head's own name
    (``output = "ctr"``) that a combiner or a cascade reads."""
    column = config.get("output", "score")
    if not isinstance(column, str) or not column.isidentifier():
        raise ValueError(f"output must be a column name (letters, digits, _), got {column!r}")
    return column


def item_cache(config):
    on = config.get("item_cache", False)
    if not isinstance(on, bool):
        raise ValueError(f"item_cache must be true or false, got {on!r}")
    return on


def item_cache_mb(config):
    mb = config.get("item_cache_mb", 512)
    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or not mb > 0:
        raise ValueError(f"item_cache_mb must be a positive number of MiB, got {mb!r}")
    return mb


def load_model(path, mode):
    """The dense graph as this worker runs it (module docstring), and the pass's report (or None)."""
    if mode == "as_is":
        return onnx.load(str(path)), None
    model = onnx.load(str(path))
    if mode == "off":
        return unstructure(model), None
    return structure(model)


def _pool_items(bundle, sigs, lens):
    """Pooled item embeddings f32[R, F_item, D] of these signatures, from the version's cube (ItemTable's pool).
    The process's one Cube of the version (open_cube): in a fused worker the cube stage reads the same one,
    so it is not closed here."""
    (emb,), _ = pool_blocks(open_cube(bundle.cube_path, bundle.dim), [(sigs, lens)], bundle.dim, [bundle.item_sums],
                            [default_vectors(bundle, "item")])
    return emb


class ModelInference(Stage):
    name = "model_inference"

    @classmethod
    def inputs(cls, config):
        # item_cache: each candidate's row of the item table is found by its id.
        return ("dense", "user_emb", "item_emb") + (("item_ids",) if config.get("item_cache") is True else ())

    @classmethod
    def outputs(cls, config, bundle):
        structured_mode(config)     # a bad value fails the pipeline's compile, naming the stage
        intra_op_threads(config)
        item_cache(config)
        item_cache_mb(config)
        return (Output(output_column(config), CANDIDATE, "float32"),)

    def setup(self, config, bundle):
        mode = structured_mode(config)
        model, self.structure_report = load_model(bundle.onnx_path, mode)
        r = self.structure_report
        if r is not None:
            logging.getLogger("jizhi.worker").info(
                "structured features on: %d nodes moved to user rows, %d layers and %d interactions split, "
                "MatMul FLOPs per pair at 500 candidates %.0f -> %.0f%s", len(r.moved_nodes), len(r.split_layers),
                len(r.split_interactions), r.flops_before.at(500), r.flops_after.at(500),
                f" ({r.note})" if r.note else "")
        else:
            logging.getLogger("jizhi.worker").info("structured features %s", mode)
        self.item_table = None
        self._table_args = None
        if item_cache(config) and mode == "on":
            model = self._item_table(model, bundle, config)
        elif item_cache(config):
            logging.getLogger("jizhi.worker").warning("item_cache needs structured features on (structured = "
                                                      "%r): item table not built", mode)
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            sess_options=session_options(intra_op_threads(config)),
                                            providers=["CPUExecutionProvider"])
        self.feeds = {i.name for i in self.session.get_inputs()}
        self.output = bundle.onnx_output
        self.per_pair = bool(config.get("per_pair"))
        self.column = output_column(config)

    def _item_table(self, model, bundle, config):
        """The serving graph with the item-only part read from a table built now (or ``model``
        unchanged when the graph has no item-only work or the table is refused)."""
        log = logging.getLogger("jizhi.worker")
        split = split_items(model)
        if split is None:
            log.info("item_cache: the graph has no item-only MatMul/Gemm work on float tensors; no item table")
            return model
        try:
            items = ort.InferenceSession(split.items.SerializeToString(), sess_options=session_options(),
                                         providers=["CPUExecutionProvider"])
            self.profiles = profile_source(bundle)
            self.profiles.register(self)
            self._table_args = (bundle, split, items, functools.partial(_pool_items, bundle))
            # one copy per version in shared memory, named by the supervisor (jizhi/sharedtable.py)
            self._table_kw = {"max_mb": item_cache_mb(config), "shared": config.get("_items"),
                              "stage": config.get("_stage", "dnn")}
            self.table_generation = self.profiles.items_generation
            self.item_table = ItemTable(*self._table_args, items=self.profiles.items, **self._table_kw)
            # A new snapshot's item table is built a chunk per batch boundary before it serves.
            self.profiles.add_deriver(self, lambda items: ItemTable(*self._table_args, items=items, build=False,
                                                                     **self._table_kw).building(STEP_ITEMS))
        except Exception as e:  # a head bundle (no profiles, no cube), a table too large, ...: serve without
            log.warning("item_cache: no item table for %s (%s: %s); running without it", bundle.onnx_path,
                        type(e).__name__, e)
            self.item_table = None
            return model
        t = self.item_table
        log.info("item_cache: %d items x %d floats (%s) in %.0f MiB, %s", t.tables[0].shape[0],
                 split.floats_per_item, ", ".join(t.names), t.mb, table_how(t))
        return split.serving

    def batch_boundary(self):
        """A new profile snapshot (jizhi/profilestore.py): the item table of its items, built again."""
        if self.item_table is None or self._table_args is None:
            return
        self.profiles.poll(self)
        if self.profiles.items_generation == self.table_generation:
            return
        self.table_generation = self.profiles.items_generation
        old = self.item_table
        ready = self.profiles.prepared.pop(self, None)
        self.item_table = ready if ready is not None else \
            ItemTable(*self._table_args, items=self.profiles.items, **self._table_kw)   # (a pause)
        if old.name != self.item_table.name:
            unlink_table(old.name)        # (workers still on it keep their maps until they switch)
        logging.getLogger("jizhi.worker").info("item_cache: item table of profile snapshot %d %s%s",
                                               self.profiles.snapshot, table_how(self.item_table),
                                               " in steps between batches" if ready is not None else "")

    def process(self, batch):
        item_emb = np.ascontiguousarray(batch["item_emb"], dtype=np.float32)
        feeds = {
            "dense": np.ascontiguousarray(batch["dense"], dtype=np.float32),
            "user_emb": np.ascontiguousarray(batch["user_emb"], dtype=np.float32),
            "item_emb": item_emb,
            # User rows per request, or per pair (pipeline structured = false: one row per candidate).
            "user_index": np.arange(batch.n_candidates, dtype=np.int64) if self.per_pair
            else batch.candidate_request(),
        }
        if self.item_table is not None:
            ids = batch["item_ids"]
            feeds.update(self.item_table.feeds(ids, item_emb, batch.profile_rows(self.item_table.items, ids)))
        score, = self.session.run([self.output], {k: v for k, v in feeds.items() if k in self.feeds})
        return {self.column: batch.drop_invalid(score.reshape(-1))}
