"""The loader: one model version loaded (or loading) in one pipeline.

Hot reload is source -> loader -> manager, as TF Serving has it
(docs/architecture.md, "Model versions (hot reload)"): the registry
(``jizhi/supervisor/registry.py``) is the source (which versions are on disk
and valid, which one each policy wants); a ``Loader`` is one version in one
pipeline; the version manager (``jizhi/supervisor/versions.py``) is the
manager: it creates a loader for the version a policy wants, switches to it
only when its workers are warm, and unloads the previous one once its last
request is answered. It never unloads the serving version before another
serves.

A loader's constructor only records what it loads. ``load()`` compiles the
pipeline against the version's bundle, checks the memory budget, creates the
version's arenas and tells the broker (the supervisor's ``manage()`` then
starts its workers in the loader's *bank*: each pipeline has two banks of
workers, the serving version's and a new one's, the double buffer).
``unload()`` removes the arenas and tells the broker to forget the version,
after its workers exited (which returned their memory).

Loader states (``VersionState``, jizhi/states.py: the registry's and the
broker's words for the same phases) and the loader's legal transitions
(``TRANSITIONS``; an illegal one is logged as a bug):

==========  ==========================================================  ===================
state       meaning                                                     next
==========  ==========================================================  ===================
loading     its workers start beside the serving ones and warm up       serving, failed
serving     new requests are pinned to it                               draining, failed
draining    answers what it holds after a newer version took over      stopping, failed
stopping    answered its last request: ``manage()`` retires its         (unloaded)
            workers, ``unload()`` follows when they are gone
failed      broke while loading or serving; its workers are stopped     (unloaded)
==========  ==========================================================  ===================

Runs in the supervisor process only.
"""
import logging
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from jizhi import arena, lifeline, messages, shm
from jizhi.bundle import Bundle
from jizhi.cube.hot import CTL_WORDS, Control
from jizhi.cube.remote import remote_url
from jizhi.errors import JizhiError, PipelineError, ShmFull
from jizhi.pipeline import compile_pipeline
from jizhi.profilestore import profiles_dir
from jizhi.states import VersionState
from jizhi.supervisor.registry import child_report

log = logging.getLogger("jizhi.supervisor")


L = VersionState
TRANSITIONS = {
    L.LOADING: {L.SERVING, L.FAILED},
    L.SERVING: {L.DRAINING, L.FAILED},
    L.DRAINING: {L.STOPPING, L.FAILED},
    L.STOPPING: set(),
    L.FAILED: set(),
}
LIVE = (L.LOADING, L.SERVING, L.DRAINING)          # its workers are kept at the pool size
# What the plan file says of a version's state (the broker reads it when it restarts): the same word,
# but the broker has no stopping (a stopping version is still draining to it).
PLAN_FILE_STATE = {L.STOPPING: L.DRAINING}


class LoadRefused(Exception):
    """The version cannot be loaded in this pipeline: ``state`` (rejected or refused) and the reason."""

    def __init__(self, state, reason):
        super().__init__(reason)
        self.state = state


class Loader:
    """One version set of a pipeline's models, loaded in one bank.

    A pipeline serves one model, or several (heads on its features, workers/combiner.py): then
    ``records`` holds every model's version record and ``record`` is the one whose new version
    started this load (blamed when the load fails). ``version`` labels this load's workers, arenas
    and routing: the model's version for a single-model pipeline, else ``generation`` (the
    supervisor numbers a pipeline's version sets).
    """

    def __init__(self, pipeline, record, bank, state=VersionState.LOADING, records=None, generation=None, now=None):
        self.pipeline = pipeline
        self.record = record
        self.records = dict(records or {record.model: record})
        self.model = record.model
        self.versions = {m: r.version for m, r in self.records.items()}
        self.version = record.version if generation is None else generation
        self.bank = bank
        self.state = VersionState(state)
        self.plan = None
        self.bundle = None          # the Bundle of its model, and of every model of the set ({model: Bundle})
        self.bundles = {}
        self.segments = None
        self.warmup = None          # a few ids of the bundle, for a warm-up when no traffic was recorded
        self.expected_bytes = 0
        self.deaths = 0             # worker deaths while loading
        self.t_start = time.monotonic() if now is None else now     # (the supervisor's clock)
        self.hot = None             # {control, table}: the hot tier's segments (cube/hot.py), when it has one
        self.items = None           # the prefix of the item tables its workers share (jizhi/sharedtable.py)
        self.hot_proc = None        # the builder while it runs
        self.hot_done = False       # the first build finished (built or failed)
        self.hot_report = None
        self.hot_published = 0      # the generation readers are told to read (0: none yet)
        self.hot_building = 0
        self.hot_keys_path = None
        self.hot_retired = []       # replaced generations, unlinked once no reader holds them
        self.hot_counts = None      # KeyCounts of sampled lookups (LFU), when the tier holds part of the cube
        self.hot_next_rebuild = 0.0
        self.warm_msg = None        # the broker's WARM (messages.Warm), held until the hot tier is built
        self.remote = None          # the cube's backend URL when it is not local (cube/remote.py)
        self.disk_cache = None      # its disk cache's directory, and the cache manager child
        self.disk_capacity = 0
        self.disk_proc = None

    def to(self, state):
        """Move to ``state``; an illegal transition is logged as a bug (and applied), a word that is no
        loader's state (``warm``, ``standby``...) raises ValueError."""
        state = VersionState(state)
        if state not in TRANSITIONS:
            raise ValueError(f"{state.value!r} is not a state of a loader")
        if state not in TRANSITIONS[self.state]:
            log.error("illegal load state transition: pipeline %s %s %s -> %s (a bug; applied anyway)",
                      self.pipeline, self.describe(), self.state.value, state.value)
        self.state = state

    def load(self, sup, doc, plan=None, announce=True):
        """Compile, check the budget, create the arenas and (``announce``) tell the broker.

        ``plan``: already compiled (at start). Raises LoadRefused.
        """
        if plan is None:
            try:
                plan = compile_pipeline(doc, sup.models_dir, versions=self.versions, generation=self.version)
            except PipelineError as e:
                raise LoadRefused("rejected", f"pipeline {self.pipeline} cannot use it: {e}")
        budget = sup.settings["models.memory_budget_mb"] << 20
        if announce:
            n_workers = sum(sup.pools.desired[(self.pipeline, g)] for g in plan["groups"])
            per_worker = max(int((r.validation or {}).get("peak_rss_bytes") or 0) for r in self.records.values())
            self.expected_bytes = n_workers * per_worker + arenas_bytes(sup.settings, plan)
            if sup.settings["cube.hot_tier_mb"]:
                # The hot tier: at most its budget; about twice the cube's bytes at load factor 0.5.
                cube_bytes = int((self.records[plan["model"]].validation or {}).get("cube_bytes") or 0)
                self.expected_bytes += min(sup.settings["cube.hot_tier_mb"] << 20, 2 * cube_bytes)
            used = sup.memory_in_use()
            if budget and used + self.expected_bytes > budget:
                raise LoadRefused("refused", f"expected memory {self.expected_bytes >> 20} MiB ({n_workers} workers "
                                             f"x {per_worker >> 20} MiB measured by validation, plus arenas and "
                                             f"the hot tier) with "
                                             f"{used >> 20} MiB in use passes models.memory_budget_mb = {budget >> 20}")
            self.warmup = warmup_ids(self.records[plan["model"]].path)
        self.plan = plan
        self.bundle = Bundle(plan["version_dir"])   # its manifest as loaded: files, sizes, dim
        self.bundles = {m: Bundle(d) for m, d in plan.get("version_dirs", {plan["model"]: plan["version_dir"]}).items()}
        self.items = shm.segment_name(sup.instance, sup.run_id, f"{self.pipeline}.v{self.version}", "items")
        try:
            self.segments = create_arenas(sup, self.pipeline, plan)
            if sup.settings["cube.hot_tier_mb"] and any(
                    st["processor"] == "cube_accessor" for st in plan["stages"].values()):
                prefix = shm.segment_name(sup.instance, sup.run_id, f"{self.pipeline}.v{self.version}", "hot")
                shm.create(prefix + ".ctl", CTL_WORDS * 8)
                sup.segments[(self.pipeline, self.version)]["hot.ctl"] = prefix + ".ctl"
                self.hot = {"control": prefix + ".ctl", "table": prefix + ".g{generation}"}
        except ShmFull as e:
            if not announce:
                raise       # at start: jizhid refuses to start (and removes every segment it made)
            for seg in sup.segments.pop((self.pipeline, self.version), {}).values():
                shm.unlink(seg)
            raise LoadRefused("refused", str(e))
        cube_cfg = next((st["config"] for st in plan["stages"].values() if st["processor"] == "cube_accessor"), {})
        if cube_cfg.get("remote"):
            # A cube behind a backend: a disk cache (its manager is this version's child) in front of it.
            self.remote = remote_url(cube_cfg["remote"], self.bundle)
            self.check_remote_credentials()
            self.disk_capacity = int(cube_cfg.get("disk_cache_keys", 10_000))
            self.disk_cache = str(sup.run_dir / f"disk-{self.pipeline}-v{self.version}")
        if announce:
            sup.write_run()
            sup.tell_broker(messages.VersionAdd(self.pipeline, self.version, plan, self.segments, self.warmup,
                                                {g: sup.pools.desired[(self.pipeline, g)] for g in plan["groups"]}))
            log.info("pipeline %s: loading %s beside the serving one (bank %d, workers at %s, "
                     "expected %d MiB)", self.pipeline, self.describe(), self.bank,
                     "the idle priority" if sup.versions.load_idle(workers=True)
                     else f"nice +{sup.settings['models.load_nice']}", self.expected_bytes >> 20)

    def check_remote_credentials(self):
        """A Redis cube whose nodes refuse the URL's credentials: with ``on_auth_error=refuse`` (the default) the
        version is refused (at start: jizhid does not start), one line naming the node and Redis's message;
        with ``degrade`` it loads, says so, and its workers read the default vectors until the credentials
        are accepted (cube/redis.py). A cluster whose masters may evict the cube's keys (maxmemory-policy
        allkeys-*) reads lost keys as absent: refused unless the URL says ``evictable=accept`` (its readers
        then count evicted keys as degraded). One CLUSTER SLOTS answers both (an unreachable cluster is the
        readers' to degrade around)."""
        if not self.remote.startswith(("redis://", "rediss://")):
            return
        from jizhi.cube.connect import Access, AuthError, can_evict, eviction_policy, masters
        try:
            access = Access(self.remote)
        except ValueError as e:
            raise LoadRefused("rejected", f"pipeline {self.pipeline}: its cube stage's remote URL: {e}")
        try:
            found = masters(self.remote)
        except AuthError as refused:
            if access.opts.get("on_auth_error", "refuse") == "refuse":
                raise LoadRefused("refused", f"pipeline {self.pipeline}: the Redis cube at {access.redacted()} "
                                             f"refused our credentials: {refused} (on_auth_error=degrade would "
                                             "serve degraded)")
            log.error("pipeline %s: the Redis cube at %s refused our credentials: %s; on_auth_error=degrade: "
                      "serving the default vectors, counted as degraded, retrying until they are accepted",
                      self.pipeline, access.redacted(), refused)
            return
        evicting = [(a, p) for a in found for p in [eviction_policy(access, a)[0]] if can_evict(p)]
        if evicting:
            what = ", ".join(f"{h}:{p} ({pol})" for (h, p), pol in evicting)
            if access.opts.get("evictable", "refuse") != "accept":
                raise LoadRefused("refused", f"pipeline {self.pipeline}: the Redis cube at {access.redacted()} "
                                             f"may evict its keys: maxmemory-policy of {what} (set noeviction, "
                                             "or evictable=accept in the URL: evicted keys are then counted "
                                             "as degraded)")
            log.warning("pipeline %s: the Redis cube at %s may evict its keys (%s); evictable=accept: keys a "
                        "master evicted are counted as degraded", self.pipeline, access.redacted(), what)

    # -- its hot tier (cube/hot.py) ------------------------------------------------
    # Generations: ``hot_published`` is what readers are told to read; a build fills
    # ``hot_published + 1`` in a new segment; the replaced one is unlinked once no live
    # reader of this version reports it (``release_tables``).

    def start_hot_build(self, sup, keys_path=None):
        """Start the builder child of the next generation (niced): all cube keys, or ``keys_path`` (hottest first)."""
        gen = self.hot_published + 1
        seg = self.hot["table"].format(generation=gen)
        sup.segments[(self.pipeline, self.version)][f"hot.g{gen}"] = seg
        argv = lifeline.child_argv("jizhi.cube.hot", "build", "--segment", seg,
                                   "--cube", Path(self.plan["version_dir"]) / "cube",
                                   "--dim", self.bundle.dim, "--generation", gen,
                                   "--budget-bytes", sup.settings["cube.hot_tier_mb"] << 20)
        if keys_path is not None:
            argv += ["--keys", str(keys_path)]
        if self.remote is not None:
            argv += ["--remote", self.remote]
        self.hot_building, self.hot_keys_path = gen, keys_path
        self.hot_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=sup.child_env(),
                                         preexec_fn=lifeline.killed_with_parent)    # (it may be paced)
        sup.versions.as_loader(self.hot_proc.pid, f"the hot-tier build of {self.pipeline} {self.version}")
        self.hot_started = time.monotonic()

    def poll_hot_build(self, sup):
        """True when a build finished (either way); publishes the new generation on success."""
        rc = self.hot_proc.poll()
        if rc is None:
            return False
        report, how = child_report(self.hot_proc, rc)
        self.hot_proc = None
        self.hot_done = True
        gen = self.hot_building
        if self.hot_keys_path is not None:
            Path(self.hot_keys_path).unlink(missing_ok=True)
        took_ms = round((time.monotonic() - self.hot_started) * 1000, 1)
        if rc != 0:
            if report and report.get("error"):
                how += f": {report['error']}"    # e.g. /dev/shm is full, and the bytes it needed
            report = None
        if report is None:
            seg = sup.segments[(self.pipeline, self.version)].pop(f"hot.g{gen}", None)
            if seg:
                shm.unlink(seg)
            log.error("pipeline %s: version %d's hot tier generation %d was not built (%s); %s", self.pipeline,
                      self.version, gen, how, "it keeps the previous one" if self.hot_published else
                      "it reads the LMDB cube only")
            return True
        # whole: a build of every cube key (no LFU key list) that found them all
        whole = self.hot_keys_path is None and 0 < report["cube_keys"] == report["keys"]
        Control(self.hot["control"], writable=True).publish(gen, report["keys"], report["capacity"], whole=whole)
        if self.hot_published:
            self.hot_retired.append(self.hot_published)
            report["cube_keys"] = self.hot_report["cube_keys"]   # (an LFU build saw only its key list)
        self.hot_published = gen
        self.hot_report = dict(report, took_ms=took_ms, generation=gen)
        log.info("pipeline %s: version %d's hot tier generation %d: %d of %d cube keys%s, %d MiB, built in %.0f ms",
                 self.pipeline, self.version, gen, report["keys"], report["cube_keys"],
                 " (the most used)" if self.hot_keys_path else " (the whole cube: nothing below is read)" if whole
                 else "", report["bytes"] >> 20, took_ms)
        return True

    def hot_partial(self):
        """True when the hot tier holds only part of the cube (then LFU rebuilds pay)."""
        r = self.hot_report
        return r is not None and (r["cube_keys"] < 0 or r["keys"] < r["cube_keys"])

    def release_tables(self, sup, reader_generations):
        """Unlink replaced generations no live reader of this version still reads."""
        for gen in list(self.hot_retired):
            if gen not in reader_generations:
                self.hot_retired.remove(gen)
                seg = sup.segments[(self.pipeline, self.version)].pop(f"hot.g{gen}", None)
                if seg and shm.unlink(seg):
                    log.info("pipeline %s: version %d's hot tier generation %d removed (no reader left)",
                             self.pipeline, self.version, gen)

    def stop_hot_build(self):
        if self.hot_proc is not None:
            self.hot_proc.kill()
            self.hot_proc.wait()
            self.hot_proc.stdout.close()
            self.hot_proc = None
        if self.hot_keys_path is not None:
            Path(self.hot_keys_path).unlink(missing_ok=True)

    def start_disk_manager(self, sup, rows):
        """The disk cache's one writer (``python -m jizhi.cube.cache``), fed by ``rows``' key samples."""
        self.disk_proc = subprocess.Popen(
            lifeline.child_argv("jizhi.cube.cache", "--env", self.disk_cache, "--remote", self.remote,
                                "--dim", self.bundle.dim, "--capacity", self.disk_capacity,
                                "--stats-segment", sup.stats_spec["segment"], "--stats-rows", sup.stats_spec["rows"],
                                "--rows", ",".join(map(str, rows)))
            + (["--hot-control", self.hot["control"]] if self.hot else []), stdin=subprocess.DEVNULL, env=sup.child_env())
        log.info("pipeline %s: version %d's disk cache manager pid=%d (%s, %d keys)", self.pipeline, self.version,
                 self.disk_proc.pid, self.disk_cache, self.disk_capacity)

    def stop_disk_manager(self):
        if self.disk_proc is not None:
            self.disk_proc.terminate()
            try:
                self.disk_proc.wait(5)
            except Exception:
                self.disk_proc.kill()
                self.disk_proc.wait()
            self.disk_proc = None
        if self.disk_cache is not None:
            shutil.rmtree(self.disk_cache, ignore_errors=True)

    def unload(self, sup):
        """After its workers exited: the broker forgets the version, its arenas are unlinked."""
        self.stop_hot_build()
        self.stop_disk_manager()
        sup.tell_broker(messages.VersionDrop(self.pipeline, self.version))
        n = sum(shm.unlink(seg) for seg in sup.segments.pop((self.pipeline, self.version), {}).values())
        if self.items:
            n += shm.unlink_prefix(self.items + ".")     # the item tables its workers built
        log.info("pipeline %s: version %d unloaded (its workers exited, their memory is returned; %d arenas removed)",
                 self.pipeline, self.version, n)

    def changed_files(self):
        """(model, what changed) for the first bundle of this load whose files changed, else (None, None)."""
        for m, b in self.bundles.items():
            broken = b.changed_files()
            if broken:
                return m, broken
        return None, None

    def describe(self):
        """``demo version 3``, or ``demo 1, ctr 2 (generation 4)`` for a multi-model pipeline."""
        if len(self.records) == 1:
            return f"{self.model} version {self.version}"
        return ", ".join(f"{m} {v}" for m, v in self.versions.items()) + f" (generation {self.version})"

    def entry(self):
        """What the plan file says of this version (children and a restarted broker read it)."""
        e = {"plan": self.plan, "segments": self.segments, "bank": self.bank, "hot": self.hot,
             "disk_cache": self.disk_cache, "items": self.items,
             "state": PLAN_FILE_STATE.get(self.state, self.state).value}
        if self.warmup is not None:
            e["warmup"] = self.warmup
        return e


def arenas_bytes(settings, plan):
    slots, maxc = settings["limits.max_in_flight"], settings["limits.max_candidates"]
    return sum(arena.arena_bytes(spec, slots, maxc) for spec in plan["arenas"].values())


def create_arenas(sup, pipeline, plan):
    slots, maxc = sup.settings["limits.max_in_flight"], sup.settings["limits.max_candidates"]
    segs = sup.segments[(pipeline, plan["version"])] = {}    # (known before a creation fails: removed then)
    for col, spec in plan["arenas"].items():
        seg = shm.segment_name(sup.instance, sup.run_id, f"{pipeline}.v{plan['version']}", col)
        shm.create(seg, arena.arena_bytes(spec, slots, maxc))
        segs[col] = seg
    return segs


def warmup_ids(path):
    """A few user and item ids of a bundle, for a warm-up when no traffic was recorded yet.

    Read, not memory-mapped: a truncated file is an exception here, never a SIGBUS in the supervisor.
    """
    try:
        root = profiles_dir(Bundle(path))       # its own profiles, or its profile store's snapshot
        if root is None:
            return None
        users = np.load(root / "users" / "ids.npy")
        items = np.load(root / "items" / "ids.npy")
    except (OSError, ValueError, JizhiError):
        return None
    u = users[np.linspace(0, users.shape[0] - 1, min(8, users.shape[0])).astype(np.int64)]
    i = items[np.linspace(0, items.shape[0] - 1, min(8 * 100, items.shape[0])).astype(np.int64)]
    return {"users": np.ascontiguousarray(u, dtype=np.uint64).tobytes(),
            "items": np.ascontiguousarray(i, dtype=np.uint64).tobytes()}
