"""Keys a pushed cube must hold, told from keys it never had: the Redis cube's guards against lost keys.

A mixin of ``RedisCube`` (cube/redis.py), whose batch reads call it:

* **Sentinels** (cube/layout.py, ``sentinels``): each batch reads, with its keys, one sentinel owned by each
  master it touches; a master answering without it lost the cube (flushed, restarted without persistence),
  and the keys it read as absent are counted degraded in that batch, logged once per episode.
* **Evictions**: a master whose ``maxmemory-policy`` may evict keys without a TTL (``allkeys-*``; read at the
  layout's load and at each layout check) is watched: a batch that reads absent keys there reads its
  evicted-key count (``INFO stats``), and once it grew those keys are counted degraded. (jizhid refuses such
  a cluster at start unless the URL says ``evictable=accept``: jizhi/supervisor/loader.py.)
"""
import logging
import time

import numpy as np

from jizhi.cube.connect import can_evict, eviction_policy

log = logging.getLogger("jizhi.cube.redis")


class LossGuard:
    """Needs of its host: ``layout``, ``cluster``, ``access``, ``ns``, ``timeout_s``, ``degraded``,
    ``_count``, ``_next_check``, ``_said_lost`` (a set) and ``_evictable`` (a dict)."""

    def _read_policies(self):
        """Each master's maxmemory-policy and evicted-key count (at the layout's load and each check): the
        masters that may evict the cube's keys are watched (``_check_evictions``)."""
        for addr in list(self.cluster.nodes):
            # (within a batch every check_s: a third of a budget at most per call)
            policy, evicted = eviction_policy(self.access, addr, timeout_s=max(0.001, self.timeout_s / 3))
            known = self._evictable.get(addr)
            if not can_evict(policy):
                self._evictable.pop(addr, None)
                continue
            if known is None:
                self._evictable[addr] = {"baseline": evicted or 0, "evicting": False}
                log.warning("cube %s: master %s:%d may evict the cube's keys (maxmemory-policy %s): keys it "
                            "evicts are counted as degraded once it reports evictions", self.ns, addr[0], addr[1],
                            policy)

    def _check_evictions(self, slots, status, found, k, deadline):
        """Keys read as absent from a master that may evict: its evicted-key count is read (one more round
        trip, within the budget, in each batch that reads absent keys there, until it grew: the price of
        ``evictable=accept``); once it grew, that master's absent keys are counted degraded (they may have
        been evicted: absent cannot be told from lost there)."""
        absent = (status[:k] == 1) & ~found[:k]
        if not absent.any():
            return
        owner = self.cluster.owner[slots[:k]]
        now = time.monotonic()
        for m in np.unique(owner[absent]).tolist():
            if m < 0:
                continue
            addr = self.cluster.nodes[m]
            w = self._evictable.get(addr)
            if w is None:
                continue
            if not w["evicting"] and now < deadline:
                _, evicted = eviction_policy(self.access, addr, timeout_s=max(0.001, deadline - now))
                if evicted is not None and evicted > w["baseline"]:
                    w["evicting"] = True
                    log.error("cube %s: master %s:%d evicted %d keys since we started reading it: the keys it "
                              "reads as absent are counted degraded", self.ns, addr[0], addr[1],
                              evicted - w["baseline"])
            if w["evicting"]:
                n = int((absent & (owner == m)).sum())
                self.degraded += n
                self._count("evicted", n)

    def _sentinels(self, slots):
        """Indices of the layout's sentinels to read with a batch of keys in ``slots``: one owned by each
        master the batch touches (none for a layout pushed without them)."""
        lay = self.layout
        if not lay.sentinel_slots.shape[0] or not self.cluster.nodes:
            return np.zeros(0, dtype=np.int64)
        owners, first = np.unique(self.cluster.owner[lay.sentinel_slots], return_index=True)
        touched = np.unique(self.cluster.owner[slots])
        return first[(owners >= 0) & np.isin(owners, touched)].astype(np.int64)

    def _check_sentinels(self, slots, status, found, k):
        """A master that answered the batch without its sentinel lost the cube (flushed, restarted empty,
        its keys evicted): the keys it read as absent are counted degraded (they read the default vector,
        as absent keys do, but they are a fault), logged once per episode, and the layout is checked at the
        next batch."""
        owner = self.cluster.owner[slots]
        lost = set()
        for j in range(k, slots.shape[0]):
            if status[j] == 1 and not found[j]:
                lost.add(int(owner[j]))
        if not lost:
            if self._said_lost:
                log.info("cube %s: every master read holds the cube again", self.ns)
                self._said_lost = set()
            return
        gone = np.isin(owner[:k], list(lost)) & (status[:k] == 1) & ~found[:k]
        n = int(gone.sum())
        self.degraded += n
        self._count("cube lost", n)
        self._next_check = 0.0
        for m in lost - self._said_lost:
            host, port = self.cluster.nodes[m]
            log.error("cube %s: master %s:%d answers without the cube's sentinel (flushed, restarted without "
                      "persistence, or its keys evicted): the keys it reads as absent are counted degraded",
                      self.ns, host, port)
        self._said_lost = set(lost)
