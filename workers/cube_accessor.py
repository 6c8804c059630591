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
"""
import numpy as np

from jizhi.cube.hot import TieredStore
from jizhi.cube.pooling import default_vectors, pool_blocks
from jizhi.cube.store import open_cube
from jizhi.stats import (C_DISK_HITS, C_HOT_GEN, C_HOT_HITS, C_LOOKUPS, C_REMOTE_DEGRADED, C_REMOTE_KEYS,
                         C_REMOTE_TRIPS)
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage


class CubeAccessor(Stage):
    name = "cube_accessor"
    fixed_inputs = ("user_sigs", "user_lens", "item_sigs", "item_lens")

    @classmethod
    def outputs(cls, config, bundle):
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

    def attach_sampler(self, ring, pos):
        self.store.attach_sampler(ring, pos)

    def batch_boundary(self):
        self.store.refresh()

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
