"""The supervisor: jizhid's main process (the arbiter).

It compiles the pipelines, verifies the bundles, removes a crashed run's
leftovers, creates every shared-memory arena, writes the plan file the
children read, starts the broker and every worker as fresh interpreters, and
then loops over a few verbs (STYLE.md, 3):

* signal handlers only enqueue; the loop calls ``handle_<signal>``;
* ``reap()`` collects exited children and logs how they died, telling the
  broker at once so their events are requeued;
* ``manage()`` converges every pool to its desired size, with a restart
  backoff for children that die young.

SIGTERM drains (the broker stops admitting and answers what it holds, within
``workers.drain_timeout_s``), stops the children, unlinks every segment and
socket file it made and exits 0.

Size: over 700 lines: the arbiter loop plus the version manager, hot-tier
management, shedding glue and status figures, which share the children table;
issue 18 moves the version manager and the hot tier into their own modules.
"""
import collections
import logging
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import zmq

from jizhi import arena, control, lifeline, notify, overlay, protocol, rundir
from jizhi import stats as stats_mod
from jizhi.bundle import Bundle
from jizhi.errors import (EXIT_BIND_FAILURE, EXIT_BOOT_FAILURE, EXIT_CUBE_OPEN_FAILURE, EXIT_MODEL_LOAD_FAILURE,
                          EXIT_STALE_RUN, BundleError, ConfigError, PipelineError, ShmFull)
from jizhi.pipeline import compile_pipeline, pipeline_models, read_pipeline
from jizhi.loader import LIVE, Loader, LoadRefused, arenas_bytes
from jizhi.registry import Registry, State

log = logging.getLogger("jizhi.supervisor")

EXIT_MEANING = {EXIT_BOOT_FAILURE: "boot failure", EXIT_MODEL_LOAD_FAILURE: "model load failure",
                EXIT_CUBE_OPEN_FAILURE: "cube open failure",
                EXIT_STALE_RUN: "its segments were unlinked under it (another run of this instance?)",
                EXIT_BIND_FAILURE: "cannot bind its address: in use by another process (the broker's log says which)"}
YOUNG_S = 5.0        # a child that dies younger than this backs off before restart
SCALE, AUTOSCALER = "jizhictl scale", "the autoscaler"    # who set a pool's size at run time
MAX_BACKOFF_S = 10.0
RESTART_BUDGET = 5   # quick deaths in a row before a child is reported degraded


class Child:
    """A process the supervisor keeps alive: the broker, or one wid of a group."""

    def __init__(self, key, argv, version=None):
        self.key = key          # ("broker",) or (pipeline, group, wid, bank)
        self.name = "/".join(map(str, key[:3]))
        self.argv = argv
        self.version = version  # the model version a worker serves
        self.proc = None
        self.started = 0.0
        self.backoff_s = 0.0
        self.not_before = 0.0
        self.restarts = 0
        self.quick_deaths = 0   # deaths younger than YOUNG_S in a row; reset by a stable start
        self.last_death = None
        self.kill_at = None
        self.retiring = False
        self.retire_by = float("inf")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def is_worker(self):
        return len(self.key) == 4


def doc_stage(doc, name):
    return next((st for st in doc.get("stage", []) if st.get("name") == name), {})


class Supervisor:
    def __init__(self, settings, models_dir, pipelines, config_path=None, overrides=None):
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides or {}
        self.t_start = time.monotonic()
        self.desired = {}
        self.config_pools = {}          # (pipeline, group) -> the pool the config says (at start, or the last reload)
        self.pool_source = {}           # (pipeline, group) -> who set a size other than the config's, at run time
        self.models_of = {}             # pipeline -> its models (the pipeline's own first, then heads)
        self.generations = {}           # pipeline -> the last version-set label of a multi-model pipeline
        self.last_broker_info = None
        self.models_dir = str(models_dir)
        self.pipeline_names = pipelines
        self.instance = settings["server.instance"]
        self.run_dir = Path(settings["server.run_dir"])
        self.run_id = uuid.uuid4().hex[:8]
        self.children = {}
        self.signals = []
        self.stopping = False
        self.ready_logged = False
        self.segments = {}
        self.next_files_check = 0.0
        self.cube_base = {}             # pipeline -> (lookups, hot hits) of workers that exited
        self.cube_samples = collections.deque(maxlen=16)   # (time, cube_totals()) every 5 s: the last minute

    # -- start --------------------------------------------------------------

    def read_pipelines(self):
        """The pipeline files, read, and the version policy of every model they name: (docs, policies)."""
        docs, policies = [], {}
        for p in self.pipeline_names:
            doc = read_pipeline(p)
            name = doc.get("name")
            for model, pinned in pipeline_models(doc).items():
                if policies.get(model, pinned) != pinned:
                    raise PipelineError(f"pipeline {name!r}: model {model} is pinned to different versions by "
                                        "two pipelines")
                policies[model] = pinned
            docs.append(doc)
        return docs, policies

    def resolve(self):
        """What a start resolves before it touches anything, shared with ``jizhid --check-config``: the
        pipelines read, the model directory scanned, each model's boot version chosen and verified (sizes,
        sha256), every pipeline compiled against them. Returns {pipeline: plan}; raises PipelineError or
        BundleError naming the problem. Writes nothing."""
        docs, policies = self.read_pipelines()
        if not Path(self.models_dir).is_dir():
            raise BundleError(f"the model directory {self.models_dir} does not exist")
        self.registry = Registry(self.models_dir, self.settings, policies)
        self.registry.scan(initial=True)
        boot = {m: self.boot_version(m) for m in policies}
        plans, self.docs = {}, {}
        for doc in docs:
            models = list(pipeline_models(doc))
            self.models_of[doc["name"]] = models
            plan = compile_pipeline(doc, self.models_dir, versions={m: boot[m] for m in models},
                                    generation=self.next_generation(doc["name"]))
            plans[plan["name"]] = plan
            self.docs[plan["name"]] = doc
            for g, group in plan["groups"].items():
                if group["pool"] > self.settings["workers.max_pool"]:
                    raise PipelineError(f"pipeline {plan['name']}: group {g!r} pool {group['pool']} is over "
                                        f"workers.max_pool = {self.settings['workers.max_pool']}")
        return plans

    def check_shm(self, plans):
        """Raises ShmFull when /dev/shm cannot hold the arenas of ``plans`` twice (a reload loads beside)."""
        need = sum(arenas_bytes(self.settings, plan) for plan in plans.values())
        if 2 * need > arena.free_bytes():
            raise ShmFull(arena.full_message("the arenas, twice over (a model reload loads beside the serving "
                                             "version)", 2 * need))
        return need

    def prepare(self):
        """Everything that can fail before a child starts: compile, verify, allocate."""
        plans = self.resolve()
        rundir.prepare(self.run_dir)    # created 0700, or refused when another user could replace it
        self.take_instance_lock()
        # Holding the lock, every process still marked with our instance belongs to an ended run
        # (a supervisor SIGKILLed, say): end them before their ports, sockets and segments are ours.
        for pid, cmd in lifeline.end_leftovers(self.instance):
            log.warning("ended pid %d, left by a previous run of instance %s: %s", pid, self.instance, cmd)
        stale = arena.remove_instance(self.instance)
        if stale:
            log.warning("removed %d shared-memory segments left by a previous run of instance %s",
                        len(stale), self.instance)
        need = self.check_shm(plans)
        self.loaded = {name: {} for name in plans}     # pipeline -> {bank: Loader}
        for name, plan in plans.items():
            records = {m: self.registry.records[m][v] for m, v in plan["versions"].items()}
            ld = self.loaded[name][0] = Loader(name, records[plan["model"]], 0, "active", records=records,
                                               generation=plan["version"])
            ld.load(self, self.docs[name], plan=plan, announce=False)
        ring = max([f.max_len for plan in plans.values() for f in Bundle(plan["version_dir"]).user_fields
                    if f.kind == "history"] or [1])
        cap = self.settings["overlay.capacity_users"]
        seg = f"{arena.PREFIX}{self.instance}.{self.run_id}.overlay"
        arena.create(seg, overlay.segment_bytes(cap, ring))
        self.segments["_overlay"] = {"overlay": seg}
        self.overlay = {"segment": seg, "capacity": cap, "ring": ring}
        log.info("created %d shared-memory arenas (%d MiB virtual)",
                 sum(len(s) for s in self.segments.values()), need >> 20)
        self.qcache = self.create_qcache(plans)
        self.shed = self.create_shedding(plans)
        self.autoscalers = {}
        self.autoscale_note_at = {}
        if self.settings["autoscale.enabled"]:
            from jizhi.autoscale import Autoscaler
            for name, plan in plans.items():
                kinds = [g for g, grp in plan["groups"].items() if grp["pool"] > 0]
                budget = self.settings["autoscale.budget"] or sum(plan["groups"][g]["pool"] for g in kinds)
                self.autoscalers[name] = Autoscaler(kinds, budget, high=self.settings["autoscale.high"],
                                                    sustain=self.settings["autoscale.sustain"],
                                                    cooldown_s=self.settings["autoscale.cooldown_s"],
                                                    wait_ms=self.settings["autoscale.wait_ms"],
                                                    holds={g: float(plan["groups"][g].get("batch_wait_ms", 0.0))
                                                           for g in kinds})
                log.info("autoscaling pipeline %s: %d workers over %s", name, budget, ", ".join(kinds))
        self.next_load = 0.0
        rows, nrows = stats_mod.row_map(plans, self.settings["workers.max_pool"])
        seg = f"{arena.PREFIX}{self.instance}.{self.run_id}.stats"
        arena.create(seg, stats_mod.segment_bytes(nrows))
        self.segments["_stats"] = {"stats": seg}
        self.stats_spec = {"segment": seg, "rows": nrows, "map": rows}
        self.stats_shm = stats_mod.Stats.attach(self.stats_spec)
        self.backend = f"ipc://{self.run_dir}/backend.ipc"
        self.run = {"instance": self.instance, "run_id": self.run_id, "settings": self.settings,
                    "frontend": self.settings["server.frontend"], "backend": self.backend,
                    "pipelines": plans, "overlay": self.overlay, "stats": self.stats_spec, "qcache": self.qcache,
                    "shed": {p: {"control": s["segment"], "policy": s["policy_path"]} for p, s in self.shed.items()},
                    "default_pipeline": next(iter(plans)),
                    "started_monotonic": self.t_start}     # jizhid's uptime, the one every reply states
        self.plan_path = self.run_dir / "plan.msgpack"
        self.write_run()
        for name, plan in plans.items():
            for m, v in plan["versions"].items():
                rec = self.registry.records[m][v]
                rec.to(State.SERVING)
                rec.loaded_wall = time.time()
        self.children[("broker",)] = Child(("broker",), lifeline.child_argv("jizhi.broker", "--plan", self.plan_path))
        for name, plan in plans.items():
            for g, group in plan["groups"].items():
                self.desired[(name, g)] = self.config_pools[(name, g)] = group["pool"]

    def create_qcache(self, plans):
        """The query cache segment, when a pipeline has a query_cache stage: one region per ranker wid."""
        from jizhi import qcache
        uses = [p for p in plans.values() if any(st["processor"] == "query_cache" for st in p["stages"].values())]
        if not uses:
            return None
        writers = max(g["pool"] for p in uses for g in p["groups"].values()
                      if any(p["stages"][s]["processor"] == "ranker" for s in g["stages"]))
        ways = qcache.DEFAULT_WAYS
        per = max(ways, self.settings["qcache.entries"] // max(1, writers))
        slots = ways
        while slots * 2 <= per:
            slots *= 2
        seg = f"{arena.PREFIX}{self.instance}.{self.run_id}.qcache"
        spec = qcache.init(seg, writers, slots, ways=ways, window_ms=int(self.settings["qcache.window_s"] * 1000))
        spec.update(min_hit_ratio=self.settings["qcache.min_hit_ratio"],
                    sample_users=self.settings["qcache.sample_users"],
                    eval_candidates=self.settings["qcache.eval_candidates"])
        self.segments["_qcache"] = {"qcache": seg}
        log.info("query cache: %d regions x %d entries (%d MiB), window %.0f s", writers, slots,
                 qcache.segment_bytes(writers, slots, spec["epoch_buckets"]) >> 20, self.settings["qcache.window_s"])
        return spec

    def create_shedding(self, plans):
        """A shedding control segment per pipeline with a shedder stage (jizhi/shedding.py), and its
        load controller; the policy file named by shed.policy_file is checked and copied into the run
        directory (workers read it there)."""
        from jizhi import shedding
        out = {}
        for name, plan in plans.items():
            if not any(st["processor"] == "shedder" for st in plan["stages"].values()):
                continue
            seg = f"{arena.PREFIX}{self.instance}.{self.run_id}.{name}.shed"
            st = {"segment": seg, "control": shedding.Control(seg, writable=True, create=True),
                  "policy_path": str(self.run_dir / f"shed-{name}.json"), "policy": "rule", "policy_gen": 0,
                  "mode": self.settings["shed.mode"], "quota": 1.0, "p99_ms": None, "in_flight": 0,
                  "controller": shedding.Controller(self.settings["shed.slo_ms"], high=self.settings["shed.high"],
                                                    low=self.settings["shed.low"])}
            self.segments[f"_shed.{name}"] = {"shed": seg}
            out[name] = st
            if self.settings["shed.policy_file"]:
                self.set_shed_policy(st, self.settings["shed.policy_file"])
            self.publish_shed(name, st)
        self.next_shed = 0.0
        return out

    def set_shed_policy(self, st, source):
        """``rule``, or a policy file (checked, then copied where the workers read it)."""
        from jizhi import shedding
        if source == "rule":
            st["policy"] = "rule"
        else:
            try:
                policy = shedding.load_policy(source)
            except (OSError, ValueError, KeyError) as e:
                raise control.ControlError(f"shedding policy {source}: {e}")
            shedding.save_policy(policy.doc if hasattr(policy, "doc") else {"policy": "rule"}, st["policy_path"])
            st["policy"] = f"{policy.name} ({source})"
        st["policy_gen"] += 1

    def publish_shed(self, name, st):
        st["control"].publish(st["mode"], st["quota"], st["policy_gen"] if st["policy"] != "rule" else 0,
                              st["in_flight"], st["p99_ms"] or 0.0)
        msg = {"t": protocol.T_SHED, "pipeline": name, "mode": st["mode"], "quota": round(st["quota"], 4),
               "policy": st["policy"]}
        if getattr(self, "ctl", None) is not None:      # (at start, the first T_LOAD reply tells the broker)
            self.tell_broker([protocol.packb(msg)])

    def on_load(self, load):
        """The broker's recent figures: the load controller of every pipeline in mode auto, the autoscalers."""
        now = time.monotonic()
        for name, scaler in self.autoscalers.items():
            fig = (load.get(name) or {}).get("groups")
            if not fig or self.stopping:
                continue
            pools = {g: self.desired[(name, g)] for g in scaler.groups}
            changes, why = scaler.update(now, fig, pools)
            if not changes and scaler.blocked and now >= self.autoscale_note_at.get(name, 0.0):
                log.info("autoscale %s: %s", name, scaler.blocked)      # at most every 30 s
                self.autoscale_note_at[name] = now + 30.0
            if changes:
                log.info("autoscale %s: %s: %s", name, why,
                         ", ".join(f"{g} {pools[g]} -> {n}" for g, n in changes.items()))
                for g, n in sorted(changes.items(), key=lambda x: x[1] - pools[x[0]]):   # retire first
                    self.set_pool(name, g, n, source=AUTOSCALER)
        if now < getattr(self, "next_shed", 0.0):
            return
        self.next_shed = now + self.settings["shed.period_s"] - 0.01
        for name, st in self.shed.items():
            fig = load.get(name) or {}
            st["p99_ms"], st["in_flight"] = fig.get("p99_ms"), fig.get("in_flight", 0)
            if st["mode"] == "auto":
                before = st["quota"]
                st["quota"] = st["controller"].update(st["p99_ms"], st["in_flight"],
                                                      self.settings["limits.max_in_flight"])
                if abs(st["quota"] - before) > 1e-9:
                    log.info("pipeline %s: shedding quota %.3f -> %.3f (recent p99 %s ms, %d in flight)", name,
                             before, st["quota"], "-" if st["p99_ms"] is None else f"{st['p99_ms']:.1f}",
                             st["in_flight"])
            self.publish_shed(name, st)

    def shed_command(self, args):
        """``jizhictl shed``: status | auto | off | set (quota, policy), for one pipeline or all."""
        names = [args["pipeline"]] if args.get("pipeline") else list(self.shed)
        for n in names:
            if n not in self.shed:
                raise control.ControlError(f"pipeline {n!r} has no shedder stage (with one: {', '.join(self.shed) or 'none'})")
        op = args["op"]
        for n in names if op != "status" else ():
            st = self.shed[n]
            if op == "auto":
                st["mode"] = "auto"
                st["controller"].quota = st["quota"]
            elif op == "off":
                st["mode"], st["quota"] = "off", 1.0
            else:
                if args.get("policy"):
                    self.set_shed_policy(st, args["policy"])
                if args.get("quota") is not None:
                    st["mode"], st["quota"] = "manual", float(args["quota"])
            log.info("pipeline %s: shedding %s, quota %.3f, policy %s (jizhictl shed %s)", n, st["mode"], st["quota"],
                     st["policy"], op)
            self.publish_shed(n, st)
        return {n: {"mode": self.shed[n]["mode"], "quota": self.shed[n]["quota"], "policy": self.shed[n]["policy"],
                    "p99_ms": self.shed[n]["p99_ms"], "in_flight": self.shed[n]["in_flight"],
                    "slo_ms": self.settings["shed.slo_ms"]} for n in names}

    def boot_version(self, model):
        """The version a model starts with: its policy's target, checked (sizes, sha256) here.

        Under ``latest`` a version that fails the check is rejected and the next
        older one is tried; a pinned version that fails stops the start.
        """
        while True:
            v = self.registry.target(model)
            if v is None:
                bad = "; ".join(f"{r.version}: {r.error}" for r in self.registry.records[model].values() if r.error)
                raise BundleError(f"model {model!r} has no version to serve in {self.models_dir}"
                                  + (f" (rejected: {bad})" if bad else "")
                                  + (f" (policy: {' '.join(map(str, self.registry.policy(model)[:2]))})"))
            rec = self.registry.records[model][v]
            t0 = time.monotonic()
            try:
                b = Bundle(rec.path)
                if (b.name, b.version) != (model, v):
                    raise BundleError(f"{rec.path}: the manifest says {b.name} version {b.version}")
                b.verify()
            except BundleError as e:
                self.registry.reject(rec, str(e))
                continue
            rec.timings_ms["validation"] = round((time.monotonic() - t0) * 1000, 1)   # (the start's check)
            rec.to(State.VALID)
            log.info("bundle verified: %s", rec.path)
            return v

    def write_run(self):
        """The plan file every child reads: settings, sockets and every loaded version (atomically replaced)."""
        self.run["versions"] = {p: {str(ld.version): ld.entry() for ld in banks.values()}
                                for p, banks in self.loaded.items()}
        rundir.write_file(self.plan_path, msgpack.packb(self.run, use_bin_type=True))

    def take_instance_lock(self):
        """One live supervisor per instance name on a host, before anything of a previous run is removed.

        ``flock`` in the checked run directory plus this user's abstract socket of the instance
        (jizhi/rundir.py): the kernel releases both when this process dies, however it dies, so a
        crash never leaves a stale lock, and no other user can hold either. Raises InstanceBusy.
        """
        self._lock = rundir.InstanceLock(self.run_dir, self.instance)

    def add_worker(self, loaded, group, wid):
        key = (loaded.pipeline, group, wid, loaded.bank)
        argv = lifeline.child_argv("jizhi.workers.run", "--plan", self.plan_path, "--pipeline", loaded.pipeline,
                                   "--group", group, "--wid", wid, "--version", loaded.version)
        if loaded.state == "loading":
            # A new version loads beside serving workers: at lower CPU priority until it serves.
            argv += ["--nice", str(self.settings["models.load_nice"])]
            if self.load_cores():
                argv += ["--load-cores", ",".join(map(str, self.load_cores()))]
        self.children[key] = Child(key, argv, loaded.version)

    def child_env(self):
        # One compute thread per process: pools of processes share the cores,
        # not thread pools inside each (onnxruntime sets its own to 1). Marked with our pid and
        # instance (jizhi/lifeline.py): the child checks its parent, a later run finds leftovers.
        return lifeline.child_environ(dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                                           MKL_NUM_THREADS="1",
                                           JIZHI_BASE_NICE=str(os.getpriority(os.PRIO_PROCESS, 0))), self.instance)

    def spawn(self, child):
        env = self.child_env()
        row = self.worker_row(child.key)
        if row is not None:
            self.stats_shm.heartbeat[row] = 0.0   # not beating until its loop starts
            # The new process zeroes its row: keep what the previous one counted.
            kept = (stats_mod.C_LOOKUPS, stats_mod.C_HOT_HITS, stats_mod.C_DISK_HITS, stats_mod.C_REMOTE_KEYS,
                    stats_mod.C_REMOTE_DEGRADED, stats_mod.C_REMOTE_TRIPS)
            c = self.stats_shm.counters[row]
            base = self.cube_base.get(child.key[0], (0,) * len(kept))
            self.cube_base[child.key[0]] = tuple(b + int(c[k]) for b, k in zip(base, kept))
            c[list(kept)] = 0
        child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, env=env)
        child.started = time.monotonic()
        child.kill_at = None
        log.info("started %s pid=%d%s", child.name, child.proc.pid,
                 f" version={child.version}" if child.version is not None else "")

    # -- the loop -----------------------------------------------------------

    def worker_row(self, key):
        if len(key) != 4:
            return None
        return self.stats_spec["map"][f"{key[0]}/{key[1]}"] + key[3] * self.settings["workers.max_pool"] + key[2]

    def murder(self):
        """Replace workers whose work loop stopped beating (stuck in a stage) or never started."""
        now = time.monotonic()
        hung_s = self.settings["workers.hung_timeout_s"]
        boot_s = self.settings["workers.boot_timeout_s"]
        for key, child in self.children.items():
            if child.proc is None or child.proc.poll() is not None:
                continue
            if child.kill_at is not None:
                if now >= child.kill_at:
                    log.warning("%s pid=%d ignored SIGTERM; SIGKILL", child.name, child.proc.pid)
                    child.proc.kill()
                    child.kill_at = float("inf")
                continue
            row = self.worker_row(key)
            if row is None:
                continue
            hb = float(self.stats_shm.heartbeat[row])
            why = None
            if hb == 0.0 and now - child.started > boot_s:
                why = f"did not start its loop within {boot_s:g} s"
            elif hb > 0.0 and now - hb > hung_s:
                why = f"no heartbeat for {now - hb:.1f} s (stuck in a stage?)"
            if why:
                log.error("%s pid=%d %s: SIGTERM, SIGKILL in 2 s", child.name, child.proc.pid, why)
                child.proc.send_signal(signal.SIGTERM)
                child.kill_at = now + 2.0

    def install_signals(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda s, f: self.signals.append(s))

    def open_control(self):
        ctx = zmq.Context.instance()
        self.ctl = ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.IDENTITY, b"supervisor")
        self.ctl.connect(self.backend)
        self.control = ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        old = os.umask(0o077)   # the socket file is created 0600: only our user may operate us
        try:
            self.control.bind(control.endpoint(self.run_dir))
        finally:
            os.umask(old)
        # The umask already kept group and others out; the socket needs no execute bit (0600, as documented).
        os.chmod(self.run_dir / control.SOCKET_NAME, 0o600)

    def tell_broker(self, frames):
        try:
            self.ctl.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def serve(self):
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self.install_signals()
        self.open_control()
        self.manage()
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        last_info = last_watchdog = 0.0
        watchdog_s = notify.watchdog_interval_s()
        notify.notify("STATUS=starting workers")
        self.metrics_server = None
        self.loop_beat = time.monotonic()   # /livez: stamped every turn of the loop (and of the stop's drain)
        if self.settings["metrics.listen"]:
            from jizhi import metrics
            self.metrics_server = metrics.serve(self, self.settings["metrics.listen"])
        while not self.stopping:
            self.loop_beat = time.monotonic()
            while self.signals:
                sig = self.signals.pop(0)
                getattr(self, "handle_" + signal.Signals(sig).name.lower())()
            self.reap()
            self.murder()
            self.converge_models()
            self.manage()
            self.sample_cube(time.monotonic())
            now = time.monotonic()
            if watchdog_s and now - last_watchdog >= watchdog_s:
                # From the loop itself: a stuck supervisor stops pinging and systemd restarts it.
                notify.notify("WATCHDOG=1")
                last_watchdog = now
            if (self.shed or self.autoscalers) and now >= self.next_load:
                self.next_load = now + min(self.settings["shed.period_s"] if self.shed else 1e9,
                                           self.settings["autoscale.period_s"] if self.autoscalers else 1e9)
                self.tell_broker(protocol.encode_simple(protocol.T_LOAD))
            if now - last_info > (1.0 if self.ready_logged else 0.2):
                # The broker's figures, cached for the metrics endpoint and readiness.
                last_info = now
                self.tell_broker(protocol.encode_simple(protocol.T_INFO))
            for sock, _ in poller.poll(100):
                if sock is self.ctl:
                    self.on_broker_message(protocol.unpackb(self.ctl.recv()))
                else:
                    self.on_control()
        return self.shutdown()

    def on_broker_message(self, msg):
        t = msg.get("t")
        if t == protocol.T_WARM:
            self.on_warm(msg)
        elif t == protocol.T_VERSION_IDLE:
            self.on_version_idle(msg)
        elif t == protocol.T_INVALID:
            self.on_invalid(msg)
        elif t == protocol.T_LOAD:
            self.on_load(msg["load"])
        if msg.get("t") == protocol.T_INFO:
            self.last_broker_info = msg["info"]
            self.last_broker_info_at = time.monotonic()     # /readyz: figures older than a few s are stale
        if msg.get("t") == protocol.T_INFO and not self.ready_logged and self.readiness(msg["info"])[0]:
            self.ready_logged = True
            self.boot_timeline(msg["info"])
            log.info("ready: serving %s on %s", ", ".join(self.run["pipelines"]), self.run["frontend"])
            notify.notify("READY=1", f"STATUS=serving {', '.join(self.run['pipelines'])} on {self.run['frontend']}")

    def boot_timeline(self, info):
        """At ready, the versions served since the start get their load timeline, as a reloaded one does
        in ``activate``: validation (the start's check of the bundle: sizes, sha256), the slowest worker's
        process start, stage setup and warm-up batch (from the broker), and total: jizhid's start to ready."""
        now_wall, total = time.time(), round((time.monotonic() - self.t_start) * 1000, 1)
        for name, banks in self.loaded.items():
            for ld in banks.values():
                if ld.state != "active":
                    continue
                v = ((info.get("pipelines") or {}).get(name) or {}).get("versions", {}).get(str(ld.version)) or {}
                boot = v.get("boot") or {}
                for rec in ld.records.values():
                    if "total" not in rec.timings_ms:
                        rec.timings_ms.update(start=boot.get("start_ms"), load=boot.get("load_ms"),
                                              warm_up=boot.get("warm_ms"), total=total)
                        rec.loaded_wall = now_wall

    def on_control(self):
        try:
            request = protocol.unpackb(self.control.recv())
        except Exception:
            reply = {"v": control.VERSION, "ok": False, "error": "not a msgpack message"}
        else:
            try:
                reply = control.handle(self, request)
            except Exception as e:  # a bug in a command must not take the supervisor down
                log.exception("control command failed")
                reply = {"v": control.VERSION, "ok": False, "error": f"{type(e).__name__}: {e}"}
        self.control.send(protocol.packb(reply))

    def ask_broker(self, frames, want, timeout_s=2.0):
        """Send to the broker and wait for a reply of type ``want`` (other messages are handled)."""
        self.tell_broker(frames)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.ctl.poll(max(1, int((end - time.monotonic()) * 1000))):
                msg = protocol.unpackb(self.ctl.recv())
                self.on_broker_message(msg)
                if msg.get("t") == want:
                    return msg
        return None

    # -- what control commands call ------------------------------------------

    def failing_children(self):
        """Names of children that died young and have not been up ``YOUNG_S`` since (failing to start)."""
        now = time.monotonic()
        return [c.name for c in list(self.children.values())    # (also read by the metrics thread)
                if not c.retiring and c.quick_deaths > 0 and (c.proc is None or now - c.started < YOUNG_S)]

    def readiness(self, info):
        """(ready, why not): what the log line, ``sd_notify READY``, ``jizhictl status`` and the metrics say.

        Ready needs this run's own broker (its run id and pid: a broker left by an ended run
        could answer on the same socket) to report every pipeline serving with its workers
        (each warmed up before it registered: workers/run.py), and no child failing to start.
        """
        if info is None:
            return False, "the broker did not answer"
        broker = self.children.get(("broker",))
        if info.get("run_id") != self.run_id or broker is None or info.get("pid") != broker.pid:
            return False, f"the broker answering is not this run's (pid {info.get('pid')})"
        if not info.get("ready"):
            return False, "waiting for workers"
        failing = self.failing_children()
        if failing:
            return False, "failing to start: " + ", ".join(failing)
        return True, None

    def status(self):
        now = time.monotonic()
        procs = []
        for c in self.children.values():
            state = "retiring" if c.retiring else ("running" if c.proc else "restarting")
            if c.quick_deaths >= RESTART_BUDGET:
                state = "degraded"
            procs.append({"name": c.name, "version": c.version, "pid": c.pid, "state": state,
                          "last_death": c.last_death,
                          "uptime_s": round(now - c.started, 1) if c.proc else None,
                          "restarts": c.restarts, "rss_bytes": stats_mod.rss_bytes(c.pid) if c.pid else None})
        info = self.ask_broker(protocol.encode_simple(protocol.T_INFO), protocol.T_INFO)
        ready, why = self.readiness(info and info["info"])
        health = "unknown (broker did not answer)" if info is None else ("ready" if ready else "starting")
        if info is not None and info["info"].get("draining"):
            health = "draining"
        if any(p["state"] == "degraded" for p in procs):
            health = "degraded"
        serving = {}
        for banks in self.loaded.values():
            for ld in banks.values():
                if ld.state == "active":
                    serving.update(ld.versions)
        problems = [f"{m} {r['version']}: {r['state']}: {r['error']}" for m, e in self.registry.summary().items()
                    for r in e["versions"] if r["state"] in ("rejected", "refused", "failed")]
        return {"instance": self.instance, "pid": os.getpid(), "uptime_s": round(now - self.t_start, 1),
                "health": health, "not_ready": why, "frontend": self.run["frontend"],
                "models": serving, "model_problems": problems,
                "pipelines": list(self.run["pipelines"]), "processes": procs,
                "pools": {f"{p}/{g}": n for (p, g), n in self.desired.items()}}

    def stats(self):
        info = self.ask_broker(protocol.encode_simple(protocol.T_INFO), protocol.T_INFO)
        if info is None:
            raise control.ControlError("the broker did not answer (is it restarting?)")
        # One uptime, jizhid's (the supervisor's start), as `status` says it; the broker's own age apart.
        return dict(info["info"], uptime_s=round(time.monotonic() - self.t_start, 1),
                    models=self.registry.summary(), cube=self.cube_figures())

    # -- cube figures: hot-tier hit ratio per pipeline ----------------------------

    def cube_totals(self):
        """{pipeline: (unique keys looked up, hot-tier hits, candidates, query-cache hits)} since start.

        Cube figures: live stats rows plus what exited workers did; query cache: the broker's counts.
        """
        rows = self.stats_spec["map"]
        n = stats_mod.BANKS * self.settings["workers.max_pool"]
        c = self.stats_shm.counters
        out = {}
        for pname, plan in self.run["pipelines"].items():
            base = self.cube_base.get(pname, (0,) * 6)
            look, hits, disk, remote, degraded, trips = base
            for g in plan["groups"]:
                r = rows[f"{pname}/{g}"]
                look += int(c[r:r + n, stats_mod.C_LOOKUPS].sum())
                hits += int(c[r:r + n, stats_mod.C_HOT_HITS].sum())
                disk += int(c[r:r + n, stats_mod.C_DISK_HITS].sum())
                remote += int(c[r:r + n, stats_mod.C_REMOTE_KEYS].sum())
                degraded += int(c[r:r + n, stats_mod.C_REMOTE_DEGRADED].sum())
                trips += int(c[r:r + n, stats_mod.C_REMOTE_TRIPS].sum())
            qc = ((self.last_broker_info or {}).get("pipelines", {}).get(pname) or {}).get("query_cache") or {}
            out[pname] = (look, hits, qc.get("candidates", 0), qc.get("hits", 0), disk, remote, degraded, trips)
        return out

    def sample_cube(self, now):
        if now - (self.cube_samples[-1][0] if self.cube_samples else 0.0) >= 5.0:
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
            if old is not None and p in old[1]:
                dl, dh, dc, dq = (a - b for a, b in zip((look, hits, cand, qhits), old[1][p]))
                fig["last_minute"] = {"lookups": dl, "hot_hits": dh, "hot_ratio": ratio(dh, dl),
                                      "qcache_candidates": dc, "qcache_hits": dq, "qcache_ratio": ratio(dq, dc),
                                      "seconds": round(now - old[0], 1)}
            out[p] = fig
        return out

    def models(self):
        return self.registry.summary()

    def pin(self, model, version):
        try:
            persisted = self.registry.pin(model, version)
        except KeyError as e:
            raise control.ControlError(e.args[0])
        return {"model": model, "policy": " ".join(str(x) for x in self.registry.policy(model)[:2] if x is not None),
                "target": self.registry.target(model), "persisted": persisted}

    def record(self, op):
        reply = self.ask_broker([protocol.packb({"t": protocol.T_RECORD, "op": op})], protocol.T_RECORD, 5.0)
        if reply is None:
            raise control.ControlError("the broker did not answer (is it restarting?)")
        return reply

    def set_pool(self, pipeline, group, n, source=None):
        """``source``: who sets a size at run time (SCALE, AUTOSCALER): remembered, and kept across a
        reload unless the config's value for the pool changes; None: the config's value (a reload)."""
        key = (pipeline, group)
        self.desired[key] = n
        if source is None or n == self.config_pools.get(key):
            self.pool_source.pop(key, None)     # back at the config's size: nothing to keep
        else:
            self.pool_source[key] = source
        log.info("pool %s/%s: desired size %d%s", pipeline, group, n, f" (set by {source})" if source else "")

    def set_draining(self, on):
        self.tell_broker(protocol.encode_simple(protocol.T_DRAIN if on else protocol.T_RESUME, reply=False))
        log.info("draining: %s", "on (admitting nothing new)" if on else "off (admitting again)")

    def handle_sigchld(self):
        pass  # reap() runs every turn of the loop

    def handle_sighup(self):
        try:
            self.reload()
        except control.ControlError:
            pass  # reload() logged why; the running configuration stays and so must the daemon

    def reload(self, model=None):
        """SIGHUP and `jizhictl reload`: validate everything, then apply what can change live.

        Applied live: pool sizes from the pipelines' files. Anything else that
        changed is reported under ``needs_restart``. An invalid config or
        pipeline is refused with its reason; the running configuration stays.
        """
        from jizhi import config as config_mod
        new = self.registry.rescan(model)
        try:
            settings = config_mod.load(self.config_path, self.overrides)
            plans, docs = {}, {}
            for p in settings["server.pipelines"]:
                doc = read_pipeline(p)
                docs[doc.get("name")] = doc
                active = self.find_serving(doc.get("name"))
                plan = compile_pipeline(doc, self.models_dir, versions=active.versions if active else None,
                                        generation=active.version if active else None)
                plans[plan["name"]] = plan
        except (ConfigError, PipelineError, BundleError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            raise control.ControlError(f"the running configuration stays: {e}")
        applied, kept, needs_restart = [], [], []
        for name, plan in plans.items():
            if name not in self.run["pipelines"]:
                needs_restart.append(f"pipeline {name} (new)")
                continue
            for g, group in plan["groups"].items():
                if (name, g) in self.desired:
                    what, note = self.reload_pool(name, g, group["pool"])
                    (applied if what == "applied" else kept if what == "kept" else []).append(note)
            routes = {g: group["router"] for g, group in plan["groups"].items()
                      if group.get("router") and self.run["pipelines"][name]["groups"].get(g, {}).get("router")
                      not in (None, group["router"])}
            if routes:
                self.set_routes(name, routes, docs[name])
                applied += [f"{name}/{g} A/B fractions " + ", ".join(f"{x['name']}={x['fraction']:g}" for x in r["groups"])
                            for g, r in routes.items()]
        for name, scaler in self.autoscalers.items():
            if not self.settings["autoscale.budget"]:   # (0: the budget is the sum of the config's pools)
                scaler.budget = sum(self.config_pools[(name, g)] for g in scaler.groups)
        for k, v in settings.items():
            if v != self.settings.get(k) and k != "server.run_dir":
                needs_restart.append(k)
        log.info("reload: applied %s; needs a restart to change: %s; new model versions: %s%s", applied or "nothing",
                 needs_restart or "nothing", [f"{r.model} {r.version}" for r in new] or "none",
                 f"; kept {kept}" if kept else "")
        return {"applied": applied, "kept": kept, "needs_restart": needs_restart,
                "new_versions": [f"{r.model} {r.version}" for r in new],
                "pools": {f"{p}/{g}": {"size": n, "config": self.config_pools.get((p, g)),
                                       "set_by": self.pool_source.get((p, g), "config")}
                          for (p, g), n in self.desired.items()}}

    def reload_pool(self, pipeline, group, config_n):
        """A reload meets a pool whose config value is now ``config_n``: returns (what, note), what being
        "applied", "kept" or None (nothing to say). A size set at run time (jizhictl scale, the
        autoscaler) is kept while the config's value for the pool stays what it was; when that value
        changed, the config wins and the runtime size is dropped."""
        key = (pipeline, group)
        before, size, source = self.config_pools.get(key), self.desired[key], self.pool_source.get(key)
        self.config_pools[key] = config_n
        name = f"{pipeline}/{group}"
        if config_n == before:
            if source is not None and size != config_n:
                return "kept", f"{name} pool={size} (kept from {source}; the config says {config_n})"
            if size != config_n:    # (no runtime size recorded: the config's value applies)
                self.set_pool(pipeline, group, config_n)
                return "applied", f"{name} pool={config_n}"
            return None, None
        runtime = "runtime scale" if source == SCALE else "autoscaled size"
        if size == config_n:
            if source is None:
                return None, None
            self.pool_source.pop(key, None)
            return "applied", f"{name} pool={config_n} (config changed {before} -> {config_n}; the {runtime} already was {size})"
        self.set_pool(pipeline, group, config_n)
        return "applied", (f"{name} pool={config_n} (config changed {before} -> {config_n}; {runtime} {size} dropped)"
                           if source else f"{name} pool={config_n}")

    def set_routes(self, pipeline, routes, doc):
        """New A/B fractions (``{router stage: config}``): the broker routes by them from now on; the
        plans (a restarted broker, the next model version) say them too."""
        for sname, config in routes.items():
            for st in self.docs[pipeline]["stage"]:
                if st.get("name") == sname:
                    st.update({k: v for k, v in doc_stage(doc, sname).items() if k in ("groups", "salt")})
            plans = [self.run["pipelines"][pipeline]] + [ld.plan for ld in self.loaded[pipeline].values()]
            for plan in plans:
                plan["groups"][sname]["router"] = config
                plan["stages"][sname]["config"] = config
        self.write_run()
        self.tell_broker([protocol.packb({"t": protocol.T_ROUTES, "pipeline": pipeline, "routes": routes})])

    def find_serving(self, pipeline):
        """The pipeline's serving Loader, or None."""
        for ld in self.loaded.get(pipeline, {}).values():
            if ld.state == "active":
                return ld
        return None

    def next_generation(self, pipeline):
        """The label of a multi-model pipeline's next version set (None: a single model, labelled by its
        version)."""
        if len(self.models_of[pipeline]) == 1:
            return None
        self.generations[pipeline] = self.generations.get(pipeline, 0) + 1
        return self.generations[pipeline]

    def handle_sigterm(self):
        self.stopping = True

    handle_sigint = handle_sigterm

    def reap(self):
        for child in self.children.values():
            if child.proc is None:
                continue
            rc = child.proc.poll()
            if rc is None:
                continue
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            if rc in EXIT_MEANING:
                how += f" ({EXIT_MEANING[rc]})"
            elif rc == -signal.SIGBUS:
                how += f" ({arena.sigbus_cause()})"
            name = child.name
            if child.retiring and rc == 0:
                log.info("%s pid=%d retired", name, child.proc.pid)
            elif rc == 0 and child.is_worker:
                log.info("%s pid=%d recycled itself (workers.max_events or workers.max_rss_mb); starting a fresh one",
                         name, child.proc.pid)
            else:
                log.warning("%s pid=%d died: %s", name, child.proc.pid, how)
            if child.is_worker:
                self.tell_broker(protocol.encode_simple(protocol.T_WORKER_DEAD, pipeline=child.key[0],
                                                        group=child.key[1], wid=child.key[2], pid=child.proc.pid))
                if rc != 0 and not child.retiring:
                    self.worker_died(child, rc, how)
            now = time.monotonic()
            if rc == 0:
                child.backoff_s = 0.0
            elif now - child.started < YOUNG_S:
                child.backoff_s = min(MAX_BACKOFF_S, max(self.settings["workers.restart_backoff_s"], child.backoff_s * 2))
                child.quick_deaths += 1
                child.last_death = how
                if child.quick_deaths == RESTART_BUDGET:
                    # The restart budget is spent: keep trying at the slowest pace, and say so
                    # (jizhictl status shows "degraded") instead of looping quietly.
                    log.error("%s is degraded: %d quick deaths in a row (last: %s); retrying every %.0f s",
                              name, child.quick_deaths, how, MAX_BACKOFF_S)
                    notify.notify(f"STATUS=degraded: {name} keeps dying ({how})")
            else:
                child.backoff_s = 0.0
                child.quick_deaths = 0
            child.not_before = now + child.backoff_s
            child.proc = None
            if not child.retiring:
                child.restarts += 1

    def worker_died(self, child, rc, how):
        """A worker died: is it its model version that broke?

        A worker of a version still loading that dies ``models.load_attempts``
        times fails that version (the serving one is untouched). A serving
        worker killed by SIGBUS, or whose bundle's files no longer match the
        manifest's sizes, means the files were truncated or replaced under the
        mapping: that version fails and the previous good one is loaded, with
        no restart loop.
        """
        ld = self.loaded[child.key[0]].get(child.key[3])
        if ld is None or ld.version != child.version:
            return
        if ld.state == "loading":
            ld.deaths += 1
            if ld.deaths >= self.settings["models.load_attempts"]:
                self.fail_version(ld, f"its workers died while loading ({ld.deaths}x, last: {how})")
        elif ld.state in ("active", "draining"):
            model, broken = ld.changed_files()
            if rc == -signal.SIGBUS or broken:
                self.fail_version(ld, f"a worker was {how}" + (f"; {broken}" if broken else
                                                              " (a mapped file was truncated?)"), model)

    def manage(self):
        """Converge every version's pools to their desired size; restart what died (after its backoff)."""
        if self.stopping:
            return
        for pipeline, banks in self.loaded.items():
            for bank, ld in banks.items():
                keep = ld.state in LIVE
                for group in ld.plan["groups"]:
                    n = self.desired[(pipeline, group)] if keep else 0
                    for wid in range(n):
                        child = self.children.get((pipeline, group, wid, bank))
                        if child is None:
                            self.add_worker(ld, group, wid)
                        elif child.retiring and child.proc is None:
                            child.retiring = False
                    for key, child in list(self.children.items()):
                        if len(key) == 4 and key[:2] == (pipeline, group) and key[3] == bank and key[2] >= n \
                                and not child.retiring:
                            self.retire(child)
            for bank, ld in list(banks.items()):
                if ld.state in ("stopping", "failed") and not any(
                        len(k) == 4 and k[0] == pipeline and k[3] == bank for k in self.children):
                    self.unload(ld)
        now = time.monotonic()
        starting = self.loading_banks_starting()
        for key, child in list(self.children.items()):
            if child.proc is None:
                if child.retiring:
                    del self.children[key]
                elif now >= child.not_before:
                    if child.is_worker and (key[0], key[3]) in starting:
                        continue    # a loading version's workers start one after another (less CPU at once)
                    self.spawn(child)
                    if child.is_worker and (key[0], key[3]) in self.loading_banks():
                        starting.add((key[0], key[3]))
            elif child.quick_deaths and now - child.started >= YOUNG_S:
                if child.quick_deaths >= RESTART_BUDGET:
                    log.info("%s is up again for %.0f s: no longer degraded", child.name, YOUNG_S)
                child.quick_deaths = 0   # a stable start ends the degraded state
            elif child.retiring and now > child.retire_by and child.proc.poll() is None:
                log.warning("%s did not stop within the drain bound; sending SIGTERM", child.name)
                child.proc.send_signal(signal.SIGTERM)
                child.retire_by = float("inf")

    # -- model versions (hot reload) -----------------------------------------

    def converge_models(self):
        """Notice new versions, validate them, load the one each policy wants, beside the serving one."""
        reg = self.registry
        reg.scan()
        reg.poll_validations()
        now = time.monotonic()
        self.manage_hot_tiers(now)
        if now >= self.next_files_check:
            # A file of a loaded version truncated, replaced or deleted: fail it before its workers hit SIGBUS.
            self.next_files_check = now + 1.0
            for banks in self.loaded.values():
                for ld in list(banks.values()):
                    if ld.state in LIVE:
                        model, broken = ld.changed_files()
                        if broken:
                            self.fail_version(ld, f"its files changed under it: {broken}", model)
        for pipeline, banks in self.loaded.items():
            loading = [ld for ld in banks.values() if ld.state == "loading"]
            limit = self.settings["workers.boot_timeout_s"] + 60
            for ld in loading:
                if now - ld.t_start > limit:
                    self.fail_version(ld, f"not ready and warm within {limit:g} s")
            if loading:
                continue
            active = next((ld for ld in banks.values() if ld.state == "active"), None)
            # The version each model's policy wants; a model with none keeps what serves (a multi-model
            # pipeline: one head's failed version does not stop the others), or falls back.
            want = {}
            for model in self.models_of[pipeline]:
                target = reg.target(model)
                if target is None and active is not None:
                    target = active.versions.get(model)
                if target is None:
                    failed = [ld.versions[model] for ld in banks.values() if model in ld.versions]
                    target = reg.fallback(model, min(failed)) if failed else None
                want[model] = target
            if None in want.values() or (active is not None and want == active.versions) or len(banks) >= 2:
                continue    # nothing to do, or the previous version is still being released
            records = {m: reg.records[m][v] for m, v in want.items()}
            waiting = False
            for rec in records.values():
                if active is not None and rec is active.records.get(rec.model):
                    continue    # serving here already
                if rec.state == "validating":
                    waiting = True
                elif rec.validation is None or not rec.validation.get("ok"):
                    rec.timings_ms = {k: v for k, v in rec.timings_ms.items() if k == "detection"}
                    rec.t_wanted_wall = time.time()
                    reg.validate(rec, self.as_loader)
                    waiting = True
            if waiting:
                continue
            # The load is blamed on (and timed for) the first model whose version changes.
            lead = next((r for m, r in records.items() if active is None or active.versions.get(m) != r.version),
                        records[self.models_of[pipeline][0]])
            self.load_version(pipeline, lead, records)

    def load_cores(self):
        """Cores the loading work (validation, hot-tier builds, a new version's workers) is confined to."""
        cores = self.settings["models.load_cores"]
        if cores == "auto":
            cpus = sorted(os.sched_getaffinity(0))
            return [cpus[-1]] if len(cpus) > 1 else []
        return [int(c) for c in cores.split(",") if c.strip()]

    def as_loader(self, pid):
        """A loading child: lower CPU priority and (models.load_cores) one core, so serving keeps the rest."""
        try:
            os.setpriority(os.PRIO_PROCESS, pid,
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.settings["models.load_nice"]))
            if self.load_cores():
                os.sched_setaffinity(pid, self.load_cores())
        except OSError:
            pass

    def manage_hot_tiers(self, now):
        """Build each live version's hot tier (first: while its workers start); when it holds only part of
        the cube, count the keys workers sample and rebuild it from the most used every cube.hot_rebuild_s;
        unlink replaced generations once no live reader holds them."""
        for banks in self.loaded.values():
            for ld in list(banks.values()):
                if ld.state not in LIVE:
                    continue
                if ld.remote is not None and (ld.disk_proc is None or ld.disk_proc.poll() is not None):
                    if ld.disk_proc is not None:
                        log.warning("pipeline %s: version %d's disk cache manager exited (code %s); restarting it",
                                    ld.pipeline, ld.version, ld.disk_proc.returncode)
                    pool = self.settings["workers.max_pool"]
                    rows = [self.stats_spec["map"][f"{ld.pipeline}/{g}"] + ld.bank * pool + w
                            for g in ld.plan["groups"] for w in range(pool)]
                    ld.start_disk_manager(self, rows)
                if ld.hot is None:
                    continue
                if ld.hot_proc is not None:
                    first = not ld.hot_done
                    if ld.poll_hot_build(self) and first and ld.warm_msg is not None:
                        self.on_warm(ld.warm_msg)
                elif not ld.hot_done:
                    ld.start_hot_build(self)
                elif ld.hot_partial():
                    self.count_hot_keys(ld)
                    if now >= ld.hot_next_rebuild:
                        ld.hot_next_rebuild = now + self.settings["cube.hot_rebuild_s"]
                        if ld.hot_counts is not None and ld.hot_counts.seen:
                            path = self.run_dir / f"hot-{ld.pipeline}-v{ld.version}-g{ld.hot_published + 1}.npy"
                            with rundir.open_new(path) as f:
                                np.save(f, ld.hot_counts.top(self.hot_keys(ld)))
                            ld.hot_counts.decay()
                            ld.start_hot_build(self, keys_path=path)
                if ld.hot_retired:
                    ld.release_tables(self, self.hot_readers(ld))

    def hot_keys(self, ld):
        """Keys the version's hot tier can hold (its budget)."""
        from jizhi.cube.hot import keys_for_budget
        return max(1, keys_for_budget(self.settings["cube.hot_tier_mb"] << 20, ld.bundle.dim))

    def hot_rows(self, ld):
        """Stats rows of the live workers of ``ld``'s bank that run a cube_accessor."""
        pool = self.settings["workers.max_pool"]
        rows = []
        for g, group in ld.plan["groups"].items():
            if not any(ld.plan["stages"][s]["processor"] == "cube_accessor" for s in group["stages"]):
                continue
            base = self.stats_spec["map"][f"{ld.pipeline}/{g}"] + ld.bank * pool
            for wid in range(pool):
                child = self.children.get((ld.pipeline, g, wid, ld.bank))
                if child is not None and child.proc is not None and child.proc.poll() is None:
                    rows.append(base + wid)
        return rows

    def hot_readers(self, ld):
        return {int(self.stats_shm.counters[r, stats_mod.C_HOT_GEN]) for r in self.hot_rows(ld)}

    def count_hot_keys(self, ld):
        """Fold the keys sampled since the last call (each worker's ring) into the version's LFU counts."""
        from jizhi.cube.hot import KeyCounts
        if ld.hot_counts is None:
            ld.hot_counts = KeyCounts(limit=4 * self.hot_keys(ld))
            ld.hot_ring_seen = {}
        for r in self.hot_rows(ld):
            keys, ld.hot_ring_seen[r] = self.stats_shm.sampled_keys(r, ld.hot_ring_seen.get(r, 0))
            ld.hot_counts.add(keys)

    def load_version(self, pipeline, rec, records=None):
        """Start loading a validated version (a multi-model pipeline: the version set ``records``, ``rec``
        the model that changed) in the pipeline's free bank (its workers warm up; the broker says WARM)."""
        banks = self.loaded[pipeline]
        ld = Loader(pipeline, rec, 1 if 0 in banks else 0, records=records,
                    generation=self.next_generation(pipeline))
        try:
            ld.load(self, self.docs[pipeline])
        except LoadRefused as e:
            self.registry.reject(rec, str(e), state=State(e.state))
            return
        banks[ld.bank] = ld
        self.write_run()
        for r in ld.records.values():
            if r.state == State.VALID:     # (another pipeline of the same model may have it loaded already)
                r.to(State.LOADING)
        rec.t_load = time.monotonic()

    def memory_in_use(self):
        pids = [os.getpid()] + [c.pid for c in self.children.values() if c.pid]
        return sum(stats_mod.rss_bytes(p) or 0 for p in pids)

    def find_loaded(self, pipeline, version, states):
        for ld in self.loaded.get(pipeline, {}).values():
            if ld.version == version and ld.state in states:
                return ld
        return None

    def on_warm(self, msg):
        ld = self.find_loaded(msg.get("pipeline"), msg.get("version"), ("loading",))
        if ld is None:
            return
        rec = ld.record
        if not msg.get("ok"):
            self.fail_version(ld, f"warm-up: {msg.get('error')}")
            return
        if ld.hot is not None and not ld.hot_done:
            ld.warm_msg = msg       # switched in once its hot tier is built too
            return
        boot = msg.get("boot") or {}
        now = time.monotonic()
        t_ready = now - msg.get("took_ms", 0) / 1000.0
        rec.timings_ms.update({"start": boot.get("start_ms"), "load": boot.get("load_ms"),
                               "ready": round((t_ready - rec.t_load) * 1000, 1), "warm_up": msg.get("took_ms")})
        self.activate(ld, rec)

    def activate(self, ld, rec):
        banks = self.loaded[ld.pipeline]
        old = next((o for o in banks.values() if o.state == "active"), None)
        t0 = time.monotonic()
        if old is not None:
            old.state = "draining"
            for orec in old.records.values():
                if orec.state == "serving" and not any(
                        orec in o.records.values() and o.state == "active"
                        for banks in self.loaded.values() for o in banks.values() if o is not old) \
                        and orec not in ld.records.values():
                    orec.to(State.DRAINING)
        ld.state = "active"
        self.run["pipelines"][ld.pipeline] = ld.plan
        self.write_run()
        self.tell_broker(protocol.encode_simple(protocol.T_ACTIVATE, pipeline=ld.pipeline, version=ld.version))
        for r in ld.records.values():
            if r.state != State.SERVING:
                r.to(State.SERVING)
                r.loaded_wall = time.time()
        rec.timings_ms["switch"] = round((time.monotonic() - t0) * 1000, 2)
        # A version new in this run: from its rename; one served again (pin, fallback): from the decision.
        start = rec.renamed_wall if "detection" in rec.timings_ms else getattr(rec, "t_wanted_wall", rec.renamed_wall)
        rec.timings_ms["total"] = round((rec.loaded_wall - start) * 1000, 1)
        log.info("pipeline %s: now serving %s%s (rename to switch %.1f s: %s)", ld.pipeline, ld.describe(),
                 f"; {old.describe()} drains" if old else "", rec.timings_ms["total"] / 1000,
                 ", ".join(f"{k} {v:.0f} ms" for k, v in rec.timings_ms.items() if v is not None and k != "total"))
        notify.notify(f"STATUS=serving {ld.describe()}")

    def on_version_idle(self, msg):
        ld = self.find_loaded(msg.get("pipeline"), msg.get("version"), ("draining",))
        if ld is not None:
            ld.state = "stopping"      # manage() retires its workers; unload() follows when they are gone

    def on_invalid(self, msg):
        """The broker judged a serving version's first ``models.invalid_watch_s``: its share of NaN or
        infinite scores passed ``models.max_invalid_share``. The version is failed and the previous good
        one is loaded, validated and warmed up by ``converge_models`` (the target skips failed versions);
        unlike a version whose files broke, it answers meanwhile (its replies drop those candidates and
        count them), and drains once the previous one serves: no request is refused for it."""
        ld = self.find_loaded(msg.get("pipeline"), msg.get("version"), ("active",))
        if ld is None or ld.record is None:
            return
        candidates = max(1, msg.get("candidates", 0))
        reason = (f"{msg.get('invalid')} of {msg.get('candidates')} scores not finite (NaN or infinite), "
                  f"{msg.get('invalid', 0) / candidates:.2%} > models.max_invalid_share "
                  f"{self.settings['models.max_invalid_share']:g}, in its first {msg.get('serving_s')} s of serving")
        self.registry.reject(ld.record, reason, state=State.FAILED)
        ld.record.validation = None
        fallback = self.registry.target(ld.record.model)
        log.error("pipeline %s: serving version %d failed; it answers (those candidates dropped) %s", ld.pipeline,
                  ld.version, f"until version {fallback} is warm" if fallback is not None else
                  "on: the policy names no other good version (jizhictl pin one)")
        notify.notify(f"STATUS=degraded: {ld.describe()} failed ({reason}); falling back")

    def fail_version(self, ld, reason, model=None):
        """``model``: the model whose files broke (default: the one whose new version this load brought)."""
        was = ld.state
        ld.state = "failed"
        rec = ld.records.get(model, ld.record)
        if rec is not None:
            self.registry.reject(rec, reason, state=State.FAILED)
            rec.validation = None
        self.write_run()
        self.tell_broker(protocol.encode_simple(protocol.T_VERSION_FAIL, pipeline=ld.pipeline, version=ld.version,
                                                reason=reason))
        if was == "active":
            log.error("pipeline %s: serving version %d failed; falling back to the previous good version",
                      ld.pipeline, ld.version)
            notify.notify(f"STATUS=degraded: {ld.describe()} failed ({reason}); falling back")
        for child in self.children.values():
            if child.is_worker and child.key[0] == ld.pipeline and child.key[3] == ld.bank:
                child.retiring = True
                child.retire_by = time.monotonic() + 2.0

    def unload(self, ld):
        """A version's workers are gone: remove its arenas and tell the broker to forget it."""
        del self.loaded[ld.pipeline][ld.bank]
        self.write_run()
        ld.unload(self)
        for rec in ld.records.values() if ld.state == "stopping" else ():
            still = any(rec in o.records.values() for banks in self.loaded.values() for o in banks.values())
            if not still and rec.state != State.FAILED:    # (failed while serving: on_invalid)
                rec.to(State.STANDBY)
                rec.validation = None     # validated again before it serves again

    def loading_banks(self):
        return {(p, ld.bank) for p, banks in self.loaded.items() for ld in banks.values() if ld.state == "loading"}

    def loading_banks_starting(self):
        """Banks of loading versions with a worker started but not yet in its work loop (no heartbeat yet)."""
        out = set()
        for (p, bank) in self.loading_banks():
            for key, child in self.children.items():
                if child.is_worker and (key[0], key[3]) == (p, bank) and child.proc is not None \
                        and child.proc.poll() is None and self.stats_shm.heartbeat[self.worker_row(key)] == 0.0:
                    out.add((p, bank))
        return out

    def retire(self, child):
        """Stop a worker without dropping a request: the broker sends it nothing new, then STOP."""
        child.retiring = True
        child.retire_by = time.monotonic() + self.settings["workers.drain_timeout_s"]
        if child.proc is None:
            return
        pipeline, group, wid, _ = child.key
        self.tell_broker(protocol.encode_simple(protocol.T_RETIRE, pipeline=pipeline, group=group, wid=wid,
                                                pid=child.proc.pid))
        log.info("retiring %s/%s/%d pid=%d", pipeline, group, wid, child.proc.pid)

    # -- stop ---------------------------------------------------------------

    def shutdown(self):
        log.info("stopping: draining in-flight requests (up to %.1f s)", self.settings["workers.drain_timeout_s"])
        notify.notify("STOPPING=1", "STATUS=draining")
        broker = self.children.get(("broker",))
        if broker and broker.proc and broker.proc.poll() is None:
            self.tell_broker(protocol.encode_simple(protocol.T_DRAIN))
            end = time.monotonic() + self.settings["workers.drain_timeout_s"]
            while time.monotonic() < end:
                self.loop_beat = time.monotonic()
                if self.ctl.poll(50):
                    msg = protocol.unpackb(self.ctl.recv())
                    if msg.get("t") == protocol.T_DRAINED:
                        log.info("drained: every admitted request was answered")
                        break
                if broker.proc.poll() is not None:
                    break
            else:
                log.warning("drain bound reached with requests still in flight")
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5.0
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM; killing it", p.pid)
                p.kill()
                p.wait()
        self.registry.stop()
        for banks in self.loaded.values():
            for ld in banks.values():
                ld.stop_hot_build()
                ld.stop_disk_manager()
        self.ctl.close(0)
        self.control.close(0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.cleanup()
        log.info("stopped")
        return 0

    def cleanup(self):
        """Unlink our segments and socket files. Idempotent (shutdown and jizhid's finally both call it)."""
        if getattr(self, "_cleaned", False) or getattr(self, "_lock", None) is None:
            return   # never started, or another instance's: nothing here is ours
        self._cleaned = True
        n = 0
        for segs in self.segments.values():
            for seg in segs.values():
                n += arena.unlink(seg)
        for f in ("backend.ipc", "plan.msgpack", control.SOCKET_NAME):
            try:
                (self.run_dir / f).unlink()
            except FileNotFoundError:
                pass
        for f in self.run_dir.glob("hot-*.npy"):    # LFU key lists of hot-tier builds
            f.unlink(missing_ok=True)
        import shutil
        for d in self.run_dir.glob("disk-*"):       # disk caches of remote cubes
            shutil.rmtree(d, ignore_errors=True)
        log.info("removed %d shared-memory segments", n)

