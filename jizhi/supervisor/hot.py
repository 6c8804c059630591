"""Hot tiers: each live version's in-memory copy of its hottest cube rows (cube/hot.py), kept fresh.

A version whose pipeline has a ``cube_accessor`` stage and ``cube.hot_tier_mb``
set gets a hot tier: a builder child (niced, on the loading cores) fills its
first generation while the version's workers start (the switch waits for it,
``VersionManager.on_warm``). When the tier holds only part of the cube, the
keys the workers sample (their stats rows' rings) are counted (LFU) and every
``cube.hot_rebuild_s`` a new generation is built from the most used; a
replaced generation is unlinked once no live reader of the version reads it.
A version whose cube is remote gets its disk cache's manager child, restarted
if it exits. The builds themselves are the ``Loader``'s (``loader.py``).

Runs in the supervisor process; ``converge_models`` calls ``manage`` every turn.
"""
import logging

import numpy as np

from jizhi import rundir
from jizhi import stats as stats_mod
from jizhi.cube.hot import KeyCounts, keys_for_budget
from jizhi.supervisor.children import WorkerKey
from jizhi.supervisor.loader import LIVE

log = logging.getLogger("jizhi.supervisor")


class HotTiers:
    def __init__(self, sup):
        self.sup = sup

    def manage(self, now):
        """Build each live version's hot tier (first: while its workers start); when it holds only part of
        the cube, count the keys workers sample and rebuild it from the most used every cube.hot_rebuild_s;
        unlink replaced generations once no live reader holds them."""
        sup = self.sup
        for banks in sup.versions.loaded.values():
            for ld in list(banks.values()):
                if ld.state not in LIVE:
                    continue
                if ld.remote is not None and (ld.disk_proc is None or ld.disk_proc.poll() is not None):
                    if ld.disk_proc is not None:
                        log.warning("pipeline %s: version %d's disk cache manager exited (code %s); restarting it",
                                    ld.pipeline, ld.version, ld.disk_proc.returncode)
                    pool = sup.settings["workers.max_pool"]
                    rows = [sup.stats_spec["map"][f"{ld.pipeline}/{g}"] + ld.bank * pool + w
                            for g in ld.plan["groups"] for w in range(pool)]
                    ld.start_disk_manager(sup, rows)
                if ld.hot is None:
                    continue
                if ld.hot_proc is not None:
                    first = not ld.hot_done
                    if ld.poll_hot_build(sup) and first and ld.warm_msg is not None:
                        sup.versions.on_warm(ld.warm_msg)
                elif not ld.hot_done:
                    ld.start_hot_build(sup)
                elif ld.hot_partial():
                    self.count_keys(ld)
                    if now >= ld.hot_next_rebuild:
                        ld.hot_next_rebuild = now + sup.settings["cube.hot_rebuild_s"]
                        if ld.hot_counts is not None and ld.hot_counts.seen:
                            path = sup.run_dir / f"hot-{ld.pipeline}-v{ld.version}-g{ld.hot_published + 1}.npy"
                            with rundir.open_new(path) as f:
                                np.save(f, ld.hot_counts.top(self.keys(ld)))
                            ld.hot_counts.decay()
                            ld.start_hot_build(sup, keys_path=path)
                if ld.hot_retired:
                    ld.release_tables(sup, self.readers(ld))

    def keys(self, ld):
        """Keys the version's hot tier can hold (its budget)."""
        return max(1, keys_for_budget(self.sup.settings["cube.hot_tier_mb"] << 20, ld.bundle.dim))

    def rows(self, ld):
        """Stats rows of the live workers of ``ld``'s bank that run a cube_accessor."""
        sup = self.sup
        pool = sup.settings["workers.max_pool"]
        rows = []
        for g, group in ld.plan["groups"].items():
            if not any(ld.plan["stages"][s]["processor"] == "cube_accessor" for s in group["stages"]):
                continue
            base = sup.stats_spec["map"][f"{ld.pipeline}/{g}"] + ld.bank * pool
            for wid in range(pool):
                child = sup.children.get(WorkerKey(ld.pipeline, g, wid, ld.bank))
                if child is not None and child.running():
                    rows.append(base + wid)
        return rows

    def readers(self, ld):
        """The hot-tier generations the version's live workers read now."""
        return {int(self.sup.stats_shm.counters[r, stats_mod.C_HOT_GEN]) for r in self.rows(ld)}

    def count_keys(self, ld):
        """Fold the keys sampled since the last call (each worker's ring) into the version's LFU counts."""
        if ld.hot_counts is None:
            ld.hot_counts = KeyCounts(limit=4 * self.keys(ld))
            ld.hot_ring_seen = {}
        for r in self.rows(ld):
            keys, ld.hot_ring_seen[r] = self.sup.stats_shm.sampled_keys(r, ld.hot_ring_seen.get(r, 0))
            ld.hot_counts.add(keys)
