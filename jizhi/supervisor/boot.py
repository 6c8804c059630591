"""The start: what the supervisor creates before its first child, besides the model versions' arenas.

``Supervisor.prepare`` (arbiter.py) tells the story of a start; the pieces
are here: ending what a crashed run of the instance left, checking /dev/shm
has room, and creating the run-wide shared-memory segments every child maps:

* the overlay (``jizhi.<instance>.<run>.overlay``): recent user actions (jizhi/overlay.py);
* the query cache (``....qcache``), when a pipeline has a ``query_cache`` stage: one region per
  ranker wid (jizhi/qcache.py);
* the stats segment (``....stats``): a row per possible worker and per pipeline (jizhi/stats.py).

Each segment made is recorded in ``sup.segments`` at once, so a start that
fails later still unlinks it (``Supervisor.cleanup``).

Runs in the supervisor process only.
"""
import logging

from jizhi import lifeline, overlay, qcache, shm
from jizhi import stats as stats_mod
from jizhi.bundle import Bundle
from jizhi.errors import ShmFull
from jizhi.supervisor.loader import arenas_bytes

log = logging.getLogger("jizhi.supervisor")


def end_leftovers(instance):
    """Holding the instance lock, every process still marked with our instance belongs to an ended run
    (a supervisor SIGKILLed, say): end them, and remove their segments, before their ports, sockets and
    segments are ours."""
    for pid, cmd in lifeline.end_leftovers(instance):
        log.warning("ended pid %d, left by a previous run of instance %s: %s", pid, instance, cmd)
    stale = shm.remove_instance(instance)
    if stale:
        log.warning("removed %d shared-memory segments left by a previous run of instance %s", len(stale), instance)


def check_shm(settings, plans):
    """Raises ShmFull when /dev/shm cannot hold the arenas of ``plans`` twice (a reload loads beside);
    returns the bytes they need once."""
    need = sum(arenas_bytes(settings, plan) for plan in plans.values())
    if 2 * need > shm.free_bytes():
        raise ShmFull(shm.full_message("the arenas, twice over (a model reload loads beside the serving "
                                         "version)", 2 * need))
    return need


def segment(sup, what):
    return f"{shm.PREFIX}{sup.instance}.{sup.run_id}.{what}"


def create_overlay(sup, plans):
    """The overlay segment, sized for the longest history field of the pipelines' bundles."""
    ring = max([f.max_len for plan in plans.values() for f in Bundle(plan["version_dir"]).user_fields
                if f.kind == "history"] or [1])
    cap = sup.settings["overlay.capacity_users"]
    seg = segment(sup, "overlay")
    shm.create(seg, overlay.segment_bytes(cap, ring))
    sup.segments["_overlay"] = {"overlay": seg}
    return {"segment": seg, "capacity": cap, "ring": ring}


def create_qcache(sup, plans):
    """The query cache segment, when a pipeline has a query_cache stage: one region per ranker wid."""
    uses = [p for p in plans.values() if any(st["processor"] == "query_cache" for st in p["stages"].values())]
    if not uses:
        return None
    settings = sup.settings
    writers = max(g["pool"] for p in uses for g in p["groups"].values()
                  if any(p["stages"][s]["processor"] == "ranker" for s in g["stages"]))
    ways = qcache.DEFAULT_WAYS
    per = max(ways, settings["qcache.entries"] // max(1, writers))
    slots = ways
    while slots * 2 <= per:
        slots *= 2
    seg = segment(sup, "qcache")
    spec = qcache.init(seg, writers, slots, ways=ways, window_ms=int(settings["qcache.window_s"] * 1000))
    spec.update(bypass=settings["qcache.bypass"], start=settings["qcache.start"],
                min_hit_ratio=settings["qcache.min_hit_ratio"],
                sample_users=settings["qcache.sample_users"], eval_candidates=settings["qcache.eval_candidates"])
    sup.segments["_qcache"] = {"qcache": seg}
    log.info("query cache: %d regions x %d entries (%d MiB), window %.0f s", writers, slots,
             qcache.segment_bytes(writers, slots, spec["epoch_buckets"]) >> 20, settings["qcache.window_s"])
    return spec


def create_stats(sup, plans):
    """The stats segment: its spec (segment, row count, {"pipeline/group": first row})."""
    rows, nrows = stats_mod.row_map(plans, sup.settings["workers.max_pool"])
    seg = segment(sup, "stats")
    shm.create(seg, stats_mod.segment_bytes(nrows))
    sup.segments["_stats"] = {"stats": seg}
    return {"segment": seg, "rows": nrows, "map": rows}
