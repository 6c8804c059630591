"""cube_accessor: signatures -> pooled embeddings from the hot tier and the LMDB cube.

One batch read per micro-batch: the user bags of every request and the item
bags of every candidate are pooled together (cube/pooling.py). Reads from
LMDB (or a remote cube) are deduplicated, so a signature shared by many
candidates (a category, a popular item in histories) is read once; the
shared-memory hot tier is probed for every signature where it lies, which
costs less than the sort deduplication needs. Signatures missing from the cube
read their field's default vector and are counted as ``missing_signatures``;
an empty bag pools to it. The default vectors (manifest ``default_vector``:
zeros, mean or row:N) are computed once, when the stage sets up the bundle
(``cube.pooling.default_vectors``).

Stage option ``item_rows = true`` (default off; ``item_rows_mb``, default 512,
bounds it): within a bundle version an item's signatures (precomputed in the
item profiles) and the cube are fixed, so its pooled embeddings are too. The
stage pools every item of the profiles once when it sets up the version and a
candidate reads its row (one gather) instead of looking up and pooling its
bags: the item part computed once per version, not once per pair. An id the
profiles do not know reads its fields' default vectors, as its empty bags
would. Not with a remote cube (a shard down while the table is built would
fix default vectors into it for the version's life): refused with a log line,
the stage then pools per batch. A stage before this one must not change the
item signatures the reader gives (none of the built-ins does).
"""
import logging
import time

import numpy as np

from jizhi.cube.hot import TieredStore, private_table
from jizhi.cube.pooling import default_vectors, pool_blocks
from jizhi.cube.store import open_cube
from jizhi.profilestore import STEP_ITEMS, profiles as store_profiles, source as profile_source
from jizhi.sharedtable import build_now, building as shared_building, how as table_how, table_name
from jizhi.sharedtable import unlink as unlink_table
from jizhi.stats import (C_DISK_HITS, C_HOT_GEN, C_HOT_HITS, C_LOOKUPS, C_REMOTE_DEGRADED, C_REMOTE_KEYS,
                         C_REMOTE_TRIPS)
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage


log = logging.getLogger("jizhi.worker")


def item_rows_option(config):
    on = config.get("item_rows", False)
    if not isinstance(on, bool):
        raise ValueError(f"item_rows must be true or false, got {on!r}")
    mb = config.get("item_rows_mb", 512)
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb <= 0:
        raise ValueError(f"item_rows_mb must be a positive number of MiB, got {mb!r}")
    return on, mb


_MISSING = object()


def _none():
    """The steps of no table: done at once."""
    return None
    yield       # (a generator)


class ItemRows:
    """Every item's pooled embeddings f32[items, F_item, D] and missing-signature counts, pooled once from
    ``store`` (the module docstring, ``item_rows``); ValueError when larger than ``max_mb``. ``shared``: the
    version's prefix of shared item tables (jizhi/sharedtable.py): one copy per version, built by the first
    worker that needs it and mapped by the others; without one, this worker's own."""

    def __init__(self, bundle, store, sums, defaults, max_mb, chunk=8192, items=None, build=True, shared=None,
                 stage="cube"):
        self.items = store_profiles(bundle, "item") if items is None else items
        n, f, dim = int(self.items.ids.shape[0]), len(bundle.item_fields), bundle.dim
        self.mb = n * f * dim * 4 / 2**20
        if self.mb > max_mb:
            raise ValueError(f"the item rows would take {self.mb:.0f} MiB ({n} items x {f} fields x {dim} floats), "
                             f"over item_rows_mb = {max_mb}")
        self.default = np.ascontiguousarray(defaults, dtype=np.float32)
        self.specs = [((n, f, dim), np.float32), ((n,), np.int64)]
        self.name = table_name(shared, stage, self.items.root / "items")
        self.how = None
        self._store, self._sums, self._dim = store, sums, dim
        self.build_s = 0.0
        if build:
            (self.table, self.missing), self.how = build_now(self.name, self.specs, lambda a: self._fill(a, chunk))

    def building(self, chunk=8192):
        """The steps of the table (a generator: one step per batch boundary while a new profile snapshot is
        prepared, jizhi/profilestore.py; waiting a step at a time while another worker builds the shared
        copy); returns this ItemRows when done."""
        (self.table, self.missing), self.how = yield from shared_building(self.name, self.specs,
                                                                          lambda a: self._fill(a, chunk), wait=False)
        return self

    def _fill(self, arrays, chunk):
        """Pool every item into ``arrays`` (table, missing), ``chunk`` items a step."""
        table, missing = arrays
        n = table.shape[0]
        for a in range(0, n, chunk):
            t0 = time.monotonic()
            rows = np.arange(a, min(n, a + chunk), dtype=np.int64)
            sigs, lens = self.items.item_signatures(rows, np.ones(rows.shape[0], dtype=np.bool_))
            (emb,), (miss,) = pool_blocks(self._store, [(sigs, lens)], self._dim, [self._sums], [self.default])
            table[a:a + rows.shape[0]] = emb
            missing[a:a + rows.shape[0]] = miss
            self.build_s += time.monotonic() - t0
            yield

    def read(self, rows, known):
        """(item_emb f32[P, F_item, D], missing int64[P]) of the candidates of these item profile rows
        (``Profiles.rows``)."""
        emb = np.take(self.table, rows, axis=0)
        missing = np.take(self.missing, rows)
        if not known.all():
            emb[~known] = self.default
            missing[~known] = 0
        return emb, missing


class CubeAccessor(Stage):
    name = "cube_accessor"
    fixed_inputs = ("user_sigs", "user_lens", "item_sigs", "item_lens")

    @classmethod
    def inputs(cls, config):
        return cls.fixed_inputs + (("item_ids",) if config.get("item_rows") is True else ())

    @classmethod
    def outputs(cls, config, bundle):
        item_rows_option(config)    # a bad value fails the pipeline's compile, naming the stage
        return (Output("user_emb", CANDIDATE if config.get("per_pair") else REQUEST, "float32",
                       (len(bundle.user_fields), bundle.dim)),
                Output("item_emb", CANDIDATE, "float32", (len(bundle.item_fields), bundle.dim)))

    def setup(self, config, bundle):
        self.dim = bundle.dim
        self.sums = [bundle.user_sums, bundle.item_sums]
        self.defaults = [default_vectors(bundle, "user"), default_vectors(bundle, "item")]
        self.per_pair = bool(config.get("per_pair"))
        self.levels = None
        if config.get("remote"):
            # A cube behind a backend (stage option remote = URL, "{cube}" = the bundle's cube/):
            # the local disk cache (written by jizhid's cache manager) in front of it.
            from jizhi.cube.cache import LazyDiskCache, Levels
            from jizhi.cube.remote import open_backend, remote_url
            self.backend = open_backend(remote_url(config["remote"], bundle), bundle.dim)
            self.levels = Levels([("disk", LazyDiskCache(config["_disk_cache"], bundle.dim)),
                                  ("remote", self.backend)], bundle.dim)
            lower = self.levels
        else:
            lower = open_cube(bundle.cube_path, bundle.dim)
        # The version's shared-memory hot tier in front of it all (when the supervisor built one).
        self.store = TieredStore(lower, config.get("_hot"))
        self.store.refresh()
        self.item_rows = None
        self._rows_args = None
        on, max_mb = item_rows_option(config)
        if on and self.levels is not None:
            log.warning("item_rows: not with a remote cube (a shard down while the rows are built would fix "
                        "default vectors into them); pooling item bags per batch")
        elif on:
            self._rows_args = (bundle, lower, bundle.item_sums, self.defaults[1], max_mb)
            # one copy per version in shared memory, named by the supervisor (jizhi/sharedtable.py)
            self._share = {"shared": config.get("_items"), "stage": config.get("_stage", "cube")}
            self.profiles = profile_source(bundle)
            self.profiles.register(self)
            self._build_item_rows()
            # A new snapshot's item rows are built a chunk per batch boundary before it serves.
            self.profiles.add_deriver(self, self._derive_rows)

    def _derive_rows(self, items):
        """The steps of a new snapshot's item rows (returning None, and pooling per batch, when they would
        be over item_rows_mb)."""
        try:
            rows = ItemRows(*self._rows_args, items=items, build=False, **self._share)
        except ValueError as e:
            log.warning("item_rows: %s; pooling item bags per batch", e)
            return _none()
        return rows.building(STEP_ITEMS)

    def _build_item_rows(self):
        """The item rows of the profiles' current snapshot (again after a switch: jizhi/profilestore.py)."""
        self.rows_generation = self.profiles.items_generation
        try:
            # From the cube itself, not through the hot tier: its lookup counters (the hit ratio the
            # supervisor reads) count requests' lookups only.
            self.item_rows = ItemRows(*self._rows_args, items=self.profiles.items, **self._share)
        except ValueError as e:
            self.item_rows = None
            log.warning("item_rows: %s; pooling item bags per batch", e)
        else:
            r = self.item_rows
            log.info("item_rows: %d items' pooled embeddings in %.0f MiB, %s (profile snapshot %d)",
                     r.table.shape[0], r.mb, table_how(r), self.profiles.snapshot)

    def attach_sampler(self, ring, pos):
        self.store.attach_sampler(ring, pos)

    def batch_boundary(self):
        self.store.refresh()
        if self._rows_args is not None:
            self.profiles.poll(self)
            if self.profiles.items_generation != self.rows_generation:
                old = self.item_rows
                ready = self.profiles.prepared.pop(self, _MISSING)
                if ready is _MISSING:
                    self._build_item_rows()       # (not prepared: built now, a pause)
                else:
                    self.item_rows, self.rows_generation = ready, self.profiles.items_generation
                    if ready is not None:
                        log.info("item_rows: %d items' pooled embeddings of profile snapshot %d, %s in steps "
                                 "between batches", ready.table.shape[0], self.profiles.snapshot, table_how(ready))
                if old is not None and (self.item_rows is None or old.name != self.item_rows.name):
                    unlink_table(old.name)        # (workers still on it keep their maps until they switch)

    def report(self, counters):
        counters[C_LOOKUPS] = self.store.lookups
        counters[C_HOT_HITS] = self.store.hot_hits
        counters[C_HOT_GEN] = self.store.generation
        if self.levels is not None:
            counters[C_DISK_HITS] = self.levels.hits["disk"]
            counters[C_REMOTE_KEYS] = self.levels.hits["remote"] + self.levels.missing
            counters[C_REMOTE_DEGRADED] = getattr(self.backend, "degraded", 0)
            counters[C_REMOTE_TRIPS] = getattr(self.backend, "round_trips", self.backend.calls)

    def process(self, batch):
        if batch.warmup and self.store.spec is not None and self.store.table is None:
            # The hot tier is built after READY: its kernels would compile (or load from Numba's cache)
            # on the first batches served, a stall that looks like overload. The warm-up batch runs
            # through a private one-key table instead, so they are ready before READY.
            self.store.table = private_table(np.zeros(1, dtype=np.uint64), np.zeros((1, self.dim), np.float32))
            try:
                return self._process(batch)
            finally:
                self.store.table = None
        return self._process(batch)

    def _process(self, batch):
        if self.item_rows is not None:
            (user_emb,), (umiss,) = pool_blocks(self.store, [(batch["user_sigs"], batch["user_lens"])], self.dim,
                                                self.sums[:1], self.defaults[:1])
            item_emb, imiss = self.item_rows.read(*batch.profile_rows(self.item_rows.items, batch["item_ids"]))
        else:
            (user_emb, item_emb), (umiss, imiss) = pool_blocks(
                self.store, [(batch["user_sigs"], batch["user_lens"]),
                            (batch["item_sigs"], batch["item_lens"])], self.dim, self.sums, self.defaults)
        if self.per_pair:
            # The user's row is repeated per pair: count it once (0 for a request left without candidates).
            first = np.minimum(batch.offsets[:-1], max(umiss.shape[0] - 1, 0))
            umiss = np.where(np.diff(batch.offsets) > 0, umiss[first] if umiss.shape[0] else 0, 0)
        missing = umiss + batch.per_request_sum(imiss)
        batch.count("missing_signatures", missing)
        return {"user_emb": user_emb, "item_emb": item_emb}
