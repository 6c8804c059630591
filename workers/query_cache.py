"""query_cache: scores computed recently for the same user, item and model version.

Placed first in a pipeline (after shedding, before the data reader): a hit
saves the profile read, the hashing, the cube lookups and the DNN, because
this stage drops the hit candidates (``_select``) for the rest of its worker's
stages; they rejoin at the ranker (``sees_all_candidates``), which merges
``qc_score`` for the hits and stores the newly computed scores under the
epochs read here (jizhi/qcache.py). Feedback from a user bumps that user's
epoch before it is acknowledged, so every request admitted afterwards misses
that user's old entries.

The savings need the stages it saves in the same worker (a fused group, as in
the default plan); in an unfused plan the dropped candidates are widened back
when the group writes its columns, and later groups compute them anyway.

Every cache pays for itself or steps aside. Each worker weighs what the
cache costs against what its hits save, both measured on its own batches in
CPU time of its thread (``time.thread_time``: what the worker's throughput is
made of, and not inflated when the worker is descheduled, as wall time is on
a busy machine; a stage that waits, on a remote cube say, saves wall time
this does not count), and judges again after every
``qcache.eval_candidates`` looked-up candidates (``Bypass``):

* **cost** per candidate: the lookup's and the store's kernels (``jizhi.qcache``)
  per candidate looked up; the rest of this stage's and the ranker's merge
  (whole-batch numpy: which users use the cache, which candidates to store,
  the cached scores merged) per candidate of the batches that looked
  something up; and the runtime's narrowing and widening of the batch's
  columns around the hits (``Batch.narrowed_s``, workers/stage.py) per
  candidate of the batches narrowed. Each part is divided by what it
  grows with, so a bypassed cache (only a sample of a batch's users looks
  up) estimates what full use would cost: dividing the whole-batch part by
  the sample's candidates alone overstated it (measured on the demo at 300
  requests/s: 1.05 us a candidate bypassed against 0.86 in full use);
* **saving** per hit: what the stages between this one and the ranker in
  this worker take per candidate they compute (from this stage's return to
  the ranker's start, less the narrowing; to the end of the group, in
  ``report``, when no ranker follows in this worker). It is their average,
  which overstates a hit's saving by their cost per batch (about 10 % on
  the demo);
* the **hit ratio** h of the candidates looked up.

It pays when ``h x saving > cost``. When it does not (or h is below the floor
``qcache.min_hit_ratio``), the worker *bypasses* the cache: only 1 in
``qcache.sample_users`` users (by a hash of the user) is looked up and
stored, which keeps the measurement going, and the rest skip both (a batch
without such a user costs a hash per request and no lookup or store). The
sampled users use only their share (1 / sample_users) of
the table's sets: with all of it, they would keep 16 times the history per
user that the cache holds in full use (it is bounded by its size, not its
window, at high rates), and the estimate would be 10x too high (measured:
20-27 % sampled against 2-3 % in full use), so the cache would switch on and
off. It comes back on only when it would pay 1.5 times over (``h x saving >
1.5 x cost``, and h at least 1.5 x the floor): near the break-even the sampled
estimate and the full use's figure straddle it. After each switch the part of
the table now in use starts cold (the two uses hash to different sets), so
the candidates looked up first only warm it and are not judged: as many as
the table holds (its share of them while bypassed), at most 4 x
``qcache.eval_candidates``. ``qcache.bypass = "off"`` keeps the cache on
whatever it costs (still measured). A worker starts bypassed (``qcache.start``,
default ``bypassed``): the sample must show the cache pays before every user
uses it, so a cache turned on for traffic that does not repeat costs only the
sample's share from the first request (measured on the demo with the item
part once per version: a hit saves 3.3 us a candidate and the cache costs
0.6-1.1 us, so it pays only past a hit ratio of about 20-30 %). ``qc_share`` tells the ranker which
requests to store and with which share (0: none).

The state is one per pipeline (and version set), shared by its workers
through a word of the cache segment's header (``QueryCache.mode_slot``,
jizhi/qcache.py): a worker in full use alone would find only what it
stored itself, its hit ratio half the sample's (measured: 12.5 % against
19.8 %), and would switch back. A worker's switch is published; the others
follow it at their next batch (``settle``), each then warming the part of
the table now in use before it judges; a worker that starts later takes the
pipeline's state instead of ``qcache.start``.

Each worker publishes its state and last judgement in its stats row
(``report``: jizhi/stats.py, ``C_QC_*``); ``jizhictl stats`` says how many
workers bypass the cache and why (jizhi/supervisor/reports.py).
"""
import logging
import time
import zlib

import numpy as np

from jizhi.qcache import MODE_BYPASSED, MODE_ON, QueryCache as Cache
from jizhi.stats import (C_QC_COST_NS, C_QC_HIT_PPM, C_QC_JUDGED, C_QC_SAVED_NS, C_QC_STATE, C_QC_SWITCHES,
                         QC_BYPASSED, QC_ON)
from jizhi.profilestore import source as profile_source
from jizhi.workers.data_reader import RequestFields, uses_features
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage


def version_key(pipeline, versions):
    """The cache's uint32 version field: scores of another pipeline or version set ``{model: version}``
    never match (in a multi-model pipeline a new version of any head is a new key)."""
    return zlib.crc32((pipeline or "").encode() + b"/" + ",".join(f"{m}={v}" for m, v in sorted(versions.items())).encode())


def entry_key(key, profiles):
    """``key`` (``version_key``) for a version with its own profiles; for one reading a profile store
    (``profiles``: its ``ProfileSource``), mixed with the snapshot it serves now, so scores of another
    snapshot never match (the query_cache stage looks up, and the ranker stores, under it)."""
    if profiles is None or profiles.store is None:
        return key
    return zlib.crc32(f"{key}/{profiles.snapshot}".encode())


log = logging.getLogger("jizhi.worker")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN_INT, _MASK64 = 0x9E3779B97F4A7C15, (1 << 64) - 1
RETURN = 1.5     # a bypassed cache comes back on when it would pay this many times over (hysteresis)


class Account:
    """What the query cache cost and saved on one batch of one worker (the module docstring's terms).

    Made by the query_cache stage (``batch.qcache``: its lookup's time, candidates looked up and hit);
    the ranker of the same worker calls ``arrive`` at its start and adds its store's and merge's time to
    ``cost_s``; ``QueryCache.report`` (the end of the event) arrives in its place when no ranker follows.
    Then the stage's ``Bypass`` weighs it (``settle``). CPU seconds of the thread (``time.thread_time``).
    """

    __slots__ = ("batch", "candidates", "looked", "hits", "cost_s", "kernel_s", "left_s", "narrowed", "narrowed_s",
                 "down_s")

    def __init__(self, batch, looked, hits, cost_s, kernel_s=0.0):
        self.batch = batch            # until it arrives: its narrowing time is final only then
        self.candidates = batch.n_candidates
        self.looked, self.hits, self.cost_s = looked, hits, cost_s
        self.kernel_s = kernel_s      # of cost_s: the lookup's and the store's kernels (per candidate looked up)
        self.narrowed, self.narrowed_s = 0, 0.0
        self.down_s = None            # the stages after the cache, once arrived
        self.left_s = time.thread_time()

    def arrive(self, now_s):
        """The stages between the cache and here are done: their time, less the narrowing and widening."""
        if self.down_s is not None:
            return
        self.narrowed_s = self.batch.narrowed_s
        self.narrowed = self.candidates if self.narrowed_s else 0
        self.down_s = max(0.0, now_s - self.left_s - self.narrowed_s)
        self.batch = None


class Bypass:
    """This worker's decision to use the query cache for every user or for a sample (module docstring).

    ``observe`` adds one batch's figures; after every ``eval_candidates`` looked-up candidates (past the
    warm-up after a switch) it judges: ``hit_ratio``, ``saved_us`` and ``cost_us`` per candidate are the
    last judgement's figures (None before the first), ``judgements`` and ``switches`` count.
    ``always_on``: never bypass (``qcache.bypass = "off"``); it still judges. ``start_on``: start with every
    user (``qcache.start = "on"``); else bypassed, until the sample shows the cache pays.
    """

    def __init__(self, min_hit_ratio=0.0, sample_users=16, eval_candidates=200_000, capacity=0, always_on=False,
                 start_on=False):
        self.min_hit_ratio = float(min_hit_ratio)
        self.sample_users = np.uint64(max(1, int(sample_users)))
        self.eval_candidates = int(eval_candidates)
        self.always_on = bool(always_on)
        self.warmup = min(int(capacity), 4 * self.eval_candidates)   # candidates that warm the table in full use
        self.on = bool(always_on or start_on)
        self.warming = self._warmup()          # candidates to look up before the next judgement
        self._zero()
        self.hit_ratio = self.saved_us = self.cost_us = None
        self.judgements = self.switches = 0
        self.published = None       # the shared mode as this worker last saw it (QueryCache.settle)

    def _warmup(self):
        """Candidates that warm the part of the table now in use (bypassed: the sample's share of it)."""
        return self.warmup if self.on else self.warmup // int(self.sample_users)

    def _zero(self):
        self.looked = self.hits = self.narrowed = self.computed = self.batched = 0
        self.cost_s = self.kernel_s = self.narrowed_s = self.down_s = 0.0

    @property
    def share(self):
        """The part of the table the requests that use the cache use (1: all; sample_users: bypassed)."""
        return 1 if self.on else int(self.sample_users)

    def users_on(self, users):
        """bool [R]: the requests that use the cache."""
        if self.on:
            return np.ones(users.shape[0], dtype=bool)
        return ((users * _GOLDEN) >> np.uint64(40)) % self.sample_users == 0

    def none_sampled(self, users):
        """True when bypassed and no request of the batch is in the sample (``users_on`` all False). A batch
        holds a few requests: in Python ints that is a microsecond, where the numpy above costs tens of them
        on a cold cache (a bypassed cache's whole cost is made of such batches)."""
        if self.on:
            return False
        if users.shape[0] > 32:
            return not self.users_on(users).any()
        s = int(self.sample_users)
        return not any((((u * _GOLDEN_INT) & _MASK64) >> 40) % s == 0 for u in users.tolist())

    def settle(self, account):
        """Weigh a batch's ``Account`` (one that never arrived measured its cost, not its saving)."""
        down_s = account.down_s
        self.observe(account.looked, account.hits, account.cost_s, account.narrowed, account.narrowed_s,
                     0 if down_s is None else account.candidates - account.hits, down_s or 0.0,
                     kernel_s=account.kernel_s, batched=account.candidates if account.looked else 0)

    def observe(self, looked, hits, cost_s=0.0, narrowed=0, narrowed_s=0.0, computed=0, down_s=0.0, kernel_s=None,
                batched=None):
        """One batch: ``looked`` candidates looked up, ``hits`` found, ``cost_s`` seconds of lookup, store and
        merge, ``kernel_s`` of them in the kernels (None: all of them), ``batched`` candidates in the batch
        (None: ``looked``); ``narrowed`` candidates narrowed and widened around the hits in ``narrowed_s``;
        ``computed`` candidates the stages after the cache computed in ``down_s``."""
        if self.warming > 0:
            self.warming -= looked
            return
        self.looked += looked
        self.hits += hits
        self.cost_s += cost_s
        self.kernel_s += cost_s if kernel_s is None else kernel_s
        self.batched += looked if batched is None else batched
        self.narrowed += narrowed
        self.narrowed_s += narrowed_s
        self.computed += computed
        self.down_s += down_s
        if self.looked < self.eval_candidates:
            return
        self.judge()

    def judge(self):
        """Whether the cache pays, from the figures since the last judgement; switch if it changed."""
        ratio = self.hits / self.looked
        if self.computed:
            saved = self.down_s / self.computed
        elif self.saved_us is not None:
            saved = self.saved_us / 1e6        # every candidate hit: what the last computed ones took
        else:
            return          # nothing computed yet, so no saving measured: go on measuring
        narrowing = self.narrowed_s / self.narrowed if self.narrowed else 0.0
        around = max(0.0, self.cost_s - self.kernel_s) / self.batched if self.batched else 0.0
        cost = self.kernel_s / self.looked + around + narrowing
        self.hit_ratio, self.saved_us, self.cost_us = ratio, saved * 1e6, cost * 1e6
        self.judgements += 1
        over = 1.0 if self.on else RETURN
        by_cost = ratio * saved > over * cost
        by_ratio = ratio >= over * self.min_hit_ratio
        looked = self.looked
        self._zero()
        if (by_cost and by_ratio) == self.on or self.always_on:
            return
        self.switch(not self.on)
        why = (f"hit ratio {100 * ratio:.1f}% x {saved * 1e6:.2f} us a hit saves = {ratio * saved * 1e6:.2f} us "
               f"saved per candidate, against {'' if over == 1 else f'{over:g} x '}{cost * 1e6:.2f} us it costs "
               f"({narrowing * 1e6:.2f} us of it narrowing the batch around the hits), over the last {looked:,} "
               f"candidates looked up")
        if not by_ratio:
            why += f"; under {'' if over == 1 else f'{over:g} x '}qcache.min_hit_ratio {100 * self.min_hit_ratio:g}%"
        if self.on:
            log.info("query cache on again: %s", why)
        else:
            log.info("query cache bypassed: %s; 1 in %d users still uses it", why, self.sample_users)

    def switch(self, on):
        """Every user (``on``) or the sample from now on; the part of the table now in use warms first."""
        self.on = bool(on)
        self.switches += 1
        self.warming = self._warmup()
        self._zero()


class QueryCache(Stage):
    name = "query_cache"
    fixed_inputs = ("item_ids",)

    @classmethod
    def outputs(cls, config, bundle):
        return (Output("qc_hit", CANDIDATE, "bool"), Output("qc_score", CANDIDATE, "float32"),
                Output("qc_epoch", REQUEST, "uint32"), Output("qc_share", REQUEST, "int32"))

    def setup(self, config, bundle):
        spec = config.get("_qcache") or {}
        self.cache = Cache.attach(spec)
        self.key = version_key(config.get("_pipeline"), config.get("_versions") or {bundle.name: bundle.version})
        self.bypass = Bypass(spec.get("min_hit_ratio", 0.0), spec.get("sample_users", 16),
                             spec.get("eval_candidates", 200_000),
                             self.cache.writers * self.cache.slots_per_writer if self.cache else 0,
                             always_on=spec.get("bypass", "auto") == "off",
                             start_on=spec.get("start", "bypassed") == "on")
        self.pending = None       # the last batch's Account, until weighed
        self._blank = {}          # read-only zero outputs of a batch nobody looks up, by dtype (grown as needed)
        # A version reading a profile store: its entries are keyed by the snapshot too (a switch must not
        # answer from scores the old snapshot's profiles computed). The worker's data reader switches it.
        self.profiles = profile_source(bundle) if getattr(bundle, "profile_store", None) is not None else None
        # The mode word is the pipeline's, whatever its versions (a reload does not claim another word).
        self.mode_key = zlib.crc32((config.get("_pipeline") or "").encode())
        self.fields = RequestFields(bundle) if hasattr(bundle, "user_fields") else None
        self.mode_slot = None
        if self.cache is not None and not self.bypass.always_on:
            self._claim()

    def entry_key(self):
        """The uint32 version field of this batch's entries (``version_key``, and the profile snapshot)."""
        return entry_key(self.key, self.profiles)

    def _claim(self):
        """This pipeline's word of the shared mode; a worker started (or restarted) beside others takes
        their state, not ``qcache.start``."""
        want = MODE_ON if self.bypass.on else MODE_BYPASSED
        self.mode_slot = self.cache.mode_slot(self.mode_key, want)
        if self.mode_slot is None:
            log.warning("query cache: no header word left for this pipeline's shared state; its workers "
                        "judge alone")
            return
        mode = self.cache.mode_of(self.mode_slot, self.mode_key)
        if mode and mode != want:
            self.bypass.on = mode == MODE_ON
            self.bypass.warming = self.bypass._warmup()
        self.bypass.published = mode or want

    def settle(self):
        if self.pending is not None:
            self.bypass.settle(self.pending)
            self.pending = None
        if self.mode_slot is None:
            return
        # One state for a pipeline's workers (a worker alone in full use would find only its own stores:
        # measured, 12.5 % hits where the sample, which every worker keeps storing, saw 19.8 %): a switch this
        # worker's judgement made is published; one another worker made is followed.
        mode = self.cache.mode_of(self.mode_slot, self.mode_key)
        want = MODE_ON if self.bypass.on else MODE_BYPASSED
        if not mode:                            # the word was taken from under us: claim one again
            self._claim()
            return
        if mode != want:
            if self.bypass.published != want:
                self.cache.set_mode(self.mode_slot, self.mode_key, want)     # this worker's own judgement
            else:
                self.bypass.switch(mode == MODE_ON)
                log.info("query cache %s, as another worker judged", "on" if self.bypass.on else "bypassed")
        self.bypass.published = MODE_ON if self.bypass.on else MODE_BYPASSED

    def report(self, counters):
        """The end of the event (workers/run.py): weigh its account (the stages after the cache end here
        when no ranker followed it in this worker); publish the state and the last judgement."""
        if self.cache is None:
            return
        if self.pending is not None:
            self.pending.arrive(time.thread_time())     # (no-op when the ranker arrived)
        self.settle()
        b = self.bypass
        counters[C_QC_STATE] = QC_ON if b.on else QC_BYPASSED
        if b.judgements:
            counters[C_QC_HIT_PPM] = round(b.hit_ratio * 1e6)
            counters[C_QC_SAVED_NS] = round(b.saved_us * 1000)
            counters[C_QC_COST_NS] = round(b.cost_us * 1000)
        counters[C_QC_JUDGED] = b.judgements
        counters[C_QC_SWITCHES] = b.switches

    def _zeros(self, dtype, n):
        """A read-only view of n zeros (no allocation per batch; a stage that wrote into it would raise)."""
        z = self._blank.get(dtype)
        if z is None or z.shape[0] < n:
            z = np.zeros(max(n, 8192), dtype=dtype)
            z.flags.writeable = False
            self._blank[dtype] = z
        return z[:n]

    def process(self, batch):
        self.settle()     # (report did, unless this worker has no stats row: then nothing was saved that we saw)
        users, offsets, items = batch.users, batch.offsets, batch["item_ids"]
        n, r = items.shape[0], batch.n_requests
        if self.cache is None:
            return {"qc_hit": np.zeros(n, bool), "qc_score": np.zeros(n, np.float32),
                    "qc_epoch": np.zeros(r, np.uint32), "qc_share": np.zeros(r, np.int32), "_select": None}
        if self.bypass.none_sampled(users):
            # Bypassed, and nobody here is sampled: nothing to look up or store (workers/ranker.py skips too).
            if not batch.warmup:
                batch.qcache = self.pending = Account(batch, 0, 0, 0.0)
            return {"qc_hit": self._zeros(np.bool_, n), "qc_score": self._zeros(np.float32, n),
                    "qc_epoch": self._zeros(np.uint32, r), "qc_share": self._zeros(np.int32, r), "_select": None}
        t0 = time.thread_time()
        on = self.bypass.users_on(users)
        if batch.feats is not None:
            # A request that carries its own features is scored from them: never from (or into) the cache.
            on &= np.array([not uses_features(f, self.fields) for f in batch.feats], dtype=bool)
        share = self.bypass.share
        if on.all():
            k0 = time.thread_time()
            epochs = self.cache.epochs_of(users)     # before anything is computed: feedback from now on wins
            scores, hit = self.cache.lookup(users, offsets, items, self.entry_key(), share=share)
            kernel_s = time.thread_time() - k0
            looked = n
        else:
            scores, hit = np.zeros(n, np.float32), np.zeros(n, bool)
            rows = np.flatnonzero(on)
            if rows.shape[0]:
                # The sampled requests' candidates, without a loop over requests.
                epochs = self.cache.epochs_of(users)
                counts = np.diff(offsets)
                idx = np.flatnonzero(np.repeat(on, counts))
                sub = np.zeros(rows.shape[0] + 1, np.int64)
                np.cumsum(counts[rows], out=sub[1:])
                sampled = items[idx]
                k0 = time.thread_time()
                found, found_hit = self.cache.lookup(users[rows], sub, sampled, self.entry_key(), share=share)
                kernel_s = time.thread_time() - k0
                scores[idx], hit[idx] = found, found_hit
                looked = idx.shape[0]
            else:
                epochs = np.zeros(r, np.uint32)      # nobody stores: no epoch is needed
                looked, kernel_s = 0, 0.0
        hits = int(np.count_nonzero(hit)) if looked else 0
        select = np.flatnonzero(~hit) if hits else None    # no hit: nothing to narrow
        if hits:
            batch.count("cached", batch.per_request_sum(hit))
        if not batch.warmup:
            # A batch whose users all bypass the cache looked nothing up: its few microseconds are the bypass's.
            batch.qcache = self.pending = Account(batch, looked, hits, time.thread_time() - t0 if looked else 0.0,
                                                  kernel_s)
        return {"qc_hit": hit, "qc_score": scores, "qc_epoch": epochs,
                "qc_share": np.where(on, share, 0).astype(np.int32), "_select": select}
