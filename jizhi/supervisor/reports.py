"""Reports: what the supervisor says about the server, to people and probes.

* ``readiness``: ready or why not, the one answer the ready log line,
  ``sd_notify READY``, ``jizhictl status`` and the metrics share;
* ``status`` and ``stats``: ``jizhictl status`` and ``jizhictl stats``;
* cube figures: hot-tier, disk-cache and query-cache hit ratios per pipeline,
  since start and over the last minute (stats rows of live workers, plus what
  exited workers counted: ``keep_cube_counts``); whether the query cache pays
  (``qcache_workers``: how many live workers bypass it, and their last
  judgement, workers/query_cache.py);
* the boot timeline: at ready, the load timeline of the versions served since
  the start, as a reloaded version gets one when it switches in.

The broker's info (asked about once a second by the supervisor loop) is
cached here (``broker_info``) for the metrics thread and the probes, which
must never use the loop's sockets.

Runs in the supervisor process: the loop and (reading) the metrics thread.
"""
import collections
import logging
import os
import time

from jizhi import messages, notify
from jizhi import stats as stats_mod
from jizhi.control import ControlError
from jizhi.supervisor.children import BROKER

log = logging.getLogger("jizhi.supervisor")

# Per pipeline, the cube counters kept when a worker's row is reused by its next process.
CUBE_COUNTERS = (stats_mod.C_LOOKUPS, stats_mod.C_HOT_HITS, stats_mod.C_DISK_HITS, stats_mod.C_REMOTE_KEYS,
                 stats_mod.C_REMOTE_DEGRADED, stats_mod.C_REMOTE_TRIPS, stats_mod.C_USER_ROWS,
                 stats_mod.C_USER_ROWS_DEGRADED, stats_mod.C_USER_ROWS_CACHED)
CUBE_SAMPLE_S = 5.0     # cube totals sampled this often, the last minute's kept


class Reports:
    def __init__(self, sup):
        self.sup = sup
        self.broker_info = None         # the broker's last info, and when it came (monotonic s)
        self.broker_info_at = 0.0
        self.ready_logged = False
        self.cube_base = {}             # pipeline -> CUBE_COUNTERS of workers that exited
        self.user_rows = {}             # pipeline -> (users read from Redis, degraded, cache hits): cube_totals
        self.cube_samples = collections.deque(maxlen=16)   # (time, cube_totals()) every 5 s: the last minute

    def on_info(self, msg):
        """The broker's INFO (``messages.Info``), its figures: cached; the first time it says ready, the boot
        timeline and the ready line."""
        sup = self.sup
        info = msg.info
        if info is None:
            return      # (a question, not an answer: nothing to cache)
        self.broker_info = info
        self.broker_info_at = time.monotonic()     # /readyz: figures older than a few s are stale
        if not self.ready_logged and self.readiness(info)[0]:
            self.ready_logged = True
            self.boot_timeline(info)
            log.info("ready: serving %s on %s", ", ".join(sup.run["pipelines"]), sup.run["frontend"])
            notify.notify("READY=1", f"STATUS=serving {', '.join(sup.run['pipelines'])} on {sup.run['frontend']}")

    # -- readiness ------------------------------------------------------------------

    def failing_children(self):
        """Names of children that died young and have not been up ``YOUNG_S`` since (failing to start)."""
        now = self.sup.clock()
        return [c.name for c in list(self.sup.children.values()) if c.failing(now)]  # (also read by the metrics thread)

    def readiness(self, info):
        """(ready, why not): what the log line, ``sd_notify READY``, ``jizhictl status`` and the metrics say.

        Ready needs this run's own broker (its run id and pid: a broker left by an ended run
        could answer on the same socket) to report every pipeline serving with its workers
        (each warmed up before it registered: workers/run.py), and no child failing to start.
        """
        sup = self.sup
        if info is None:
            return False, "the broker did not answer"
        broker = sup.children.get(BROKER)
        if info.get("run_id") != sup.run_id or broker is None or info.get("pid") != broker.pid:
            return False, f"the broker answering is not this run's (pid {info.get('pid')})"
        if not info.get("ready"):
            return False, "waiting for workers"
        failing = self.failing_children()
        if failing:
            return False, "failing to start: " + ", ".join(failing)
        return True, None

    def boot_timeline(self, info):
        """At ready, the versions served since the start get their load timeline, as a reloaded one does
        in ``activate``: validation (the start's check of the bundle: sizes, sha256), the slowest worker's
        process start, stage setup and warm-up batch (from the broker), and total: jizhid's start to ready."""
        sup = self.sup
        now_wall, total = time.time(), round((time.monotonic() - sup.t_start) * 1000, 1)
        for name in sup.versions.loaded:
            ld = sup.versions.find_serving(name)
            if ld is None:
                continue
            v = ((info.get("pipelines") or {}).get(name) or {}).get("versions", {}).get(str(ld.version)) or {}
            boot = v.get("boot") or {}
            for rec in ld.records.values():
                if "total" not in rec.timings_ms:
                    rec.timings_ms.update(start=boot.get("start_ms"), load=boot.get("load_ms"),
                                          warm_up=boot.get("warm_ms"), total=total)
                    rec.loaded_wall = now_wall

    # -- jizhictl status, stats -------------------------------------------------------

    def status(self):
        sup = self.sup
        now = sup.clock()
        procs = []
        for c in sup.children.values():
            procs.append({"name": c.name, "version": c.version, "pid": c.pid, "state": c.state(),
                          "last_death": c.last_death,
                          "uptime_s": round(now - c.started, 1) if c.proc else None,
                          "restarts": c.restarts, "rss_bytes": stats_mod.rss_bytes(c.pid) if c.pid else None})
        info = sup.ask_broker(messages.Info())
        info = None if info is None else info.info
        ready, why = self.readiness(info)
        health = "unknown (broker did not answer)" if info is None else ("ready" if ready else "starting")
        if info is not None and info.get("draining"):
            health = "draining"
        if any(p["state"] == "degraded" for p in procs):
            health = "degraded"
        problems = [f"{m} {r['version']}: {r['state']}: {r['error']}"
                    for m, e in sup.versions.registry.summary().items()
                    for r in e["versions"] if r["state"] in ("rejected", "refused", "failed")]
        return {"instance": sup.instance, "pid": os.getpid(), "uptime_s": round(time.monotonic() - sup.t_start, 1),
                "health": health, "not_ready": why, "frontend": sup.run["frontend"],
                "models": sup.versions.serving_versions(), "model_problems": problems,
                "pipelines": list(sup.run["pipelines"]), "processes": procs, "pools": sup.pools.sizes()}

    def stats(self):
        sup = self.sup
        info = sup.ask_broker(messages.Info())
        if info is None or info.info is None:
            raise ControlError("the broker did not answer (is it restarting?)")
        # One uptime, jizhid's (the supervisor's start), as `status` says it; the broker's own age apart.
        return dict(info.info, uptime_s=round(time.monotonic() - sup.t_start, 1),
                    models=sup.versions.registry.summary(), cube=self.cube_figures())

    # -- cube figures: hot-tier hit ratio per pipeline ----------------------------

    def keep_cube_counts(self, pipeline, row):
        """A worker's row is about to be reused by a new process (which zeroes it): keep its cube counts."""
        c = self.sup.stats_shm.counters[row]
        base = self.cube_base.get(pipeline, (0,) * len(CUBE_COUNTERS))
        self.cube_base[pipeline] = tuple(b + int(c[k]) for b, k in zip(base, CUBE_COUNTERS))
        c[list(CUBE_COUNTERS)] = 0

    def cube_totals(self):
        """{pipeline: (unique keys looked up, hot-tier hits, candidates, query-cache hits)} since start.

        Cube figures: live stats rows plus what exited workers did; query cache: the broker's counts.
        """
        sup = self.sup
        rows = sup.stats_spec["map"]
        n = stats_mod.BANKS * sup.settings["workers.max_pool"]
        c = sup.stats_shm.counters
        out = {}
        for pname, plan in sup.run["pipelines"].items():
            base = self.cube_base.get(pname, (0,) * len(CUBE_COUNTERS))
            sums = list(base)
            for g in plan["groups"]:
                r = rows[f"{pname}/{g}"]
                for j, k in enumerate(CUBE_COUNTERS):
                    sums[j] += int(c[r:r + n, k].sum())
            look, hits, disk, remote, degraded, trips, urows, udegraded, ucached = sums
            self.user_rows[pname] = (urows, udegraded, ucached)
            qc = ((self.broker_info or {}).get("pipelines", {}).get(pname) or {}).get("query_cache") or {}
            out[pname] = (look, hits, qc.get("candidates", 0), qc.get("hits", 0), disk, remote, degraded, trips)
        return out

    def sample_cube(self, now):
        if now - (self.cube_samples[-1][0] if self.cube_samples else 0.0) >= CUBE_SAMPLE_S:
            self.cube_samples.append((now, self.cube_totals()))

    def cube_figures(self):
        now = time.monotonic()
        totals = self.cube_totals()
        old = next(((t, v) for t, v in self.cube_samples if now - t <= 65.0), None)
        out = {}

        def ratio(a, b):
            return round(a / b, 4) if b else None
        for p, (look, hits, cand, qhits, disk, remote, degraded, trips) in totals.items():
            fig = {"lookups": look, "hot_hits": hits, "hot_ratio": ratio(hits, look),
                   "qcache_candidates": cand, "qcache_hits": qhits, "qcache_ratio": ratio(qhits, cand)}
            if disk or remote:
                fig.update(disk_hits=disk, disk_ratio=ratio(disk, look), remote_keys=remote,
                           remote_ratio=ratio(remote, look), remote_degraded=degraded, remote_round_trips=trips)
            urows, udegraded, ucached = self.user_rows.get(p, (0, 0, 0))
            if urows or udegraded:
                fig["user_rows"] = {"read": urows, "degraded": udegraded, "cache_hits": ucached}
            if old is not None and p in old[1]:
                dl, dh, dc, dq = (a - b for a, b in zip((look, hits, cand, qhits), old[1][p]))
                fig["last_minute"] = {"lookups": dl, "hot_hits": dh, "hot_ratio": ratio(dh, dl),
                                      "qcache_candidates": dc, "qcache_hits": dq, "qcache_ratio": ratio(dq, dc),
                                      "seconds": round(now - old[0], 1)}
            qw = self.qcache_workers(p)
            if qw is not None:
                fig["qcache_workers"] = qw
            out[p] = fig
        return out

    def qcache_workers(self, pipeline):
        """The query cache in ``pipeline``'s live workers (their stats rows' ``C_QC_*``), or None without one:
        ``workers`` that served with it, how many ``bypassed`` it, ``judged`` it and ``switches`` (summed);
        the mean of their last judgements: ``hit_ratio``, ``hit_saves_us`` (what a hit saves),
        ``saves_us`` and ``costs_us`` (per candidate looked up: the cache pays when saves > costs)."""
        sup = self.sup
        c = sup.stats_shm.counters
        rows = [sup.worker_row(ch.key) for ch in list(sup.children.values())
                if ch.is_worker and ch.pipeline == pipeline and ch.running()]
        rows = [r for r in rows if c[r, stats_mod.C_QC_STATE]]
        if not rows:
            return None
        judged = [r for r in rows if c[r, stats_mod.C_QC_JUDGED]]
        out = {"workers": len(rows), "judged": len(judged),
               "bypassed": sum(int(c[r, stats_mod.C_QC_STATE] == stats_mod.QC_BYPASSED) for r in rows),
               "switches": sum(int(c[r, stats_mod.C_QC_SWITCHES]) for r in rows),
               "mode": (sup.qcache or {}).get("bypass", "auto")}     # what the workers were started with
        if judged:
            ratio = [int(c[r, stats_mod.C_QC_HIT_PPM]) / 1e6 for r in judged]
            per_hit = [int(c[r, stats_mod.C_QC_SAVED_NS]) / 1000 for r in judged]
            cost = [int(c[r, stats_mod.C_QC_COST_NS]) / 1000 for r in judged]
            n = len(judged)
            out.update(hit_ratio=round(sum(ratio) / n, 4), hit_saves_us=round(sum(per_hit) / n, 3),
                       saves_us=round(sum(h * s for h, s in zip(ratio, per_hit)) / n, 3),
                       costs_us=round(sum(cost) / n, 3))
        return out
