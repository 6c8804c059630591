"""The supervisor: jizhid's main process (the arbiter).

It compiles the pipelines, verifies the bundles, removes a crashed run's
leftovers, creates every shared-memory segment, writes the plan file the
children read, starts the broker and every worker as fresh interpreters, and
then loops over a few verbs:

* signal handlers only enqueue; the loop calls ``handle_<signal>``;
* ``reap()`` collects exited children and logs how they died, telling the
  broker at once so their events are requeued;
* ``murder()`` replaces workers whose work loop stopped beating;
* ``versions.converge_models()`` moves every pipeline towards the model
  versions its policy wants (versions.py);
* ``manage()`` converges every pool to its desired size, with a restart
  backoff for children that die young (children.py);
* ``serve_control()`` answers the broker's messages (one handler per type of
  jizhi/messages.py, ``broker_handlers``) and the control commands (commands/);
* ``load_control.ask()`` hands the broker's recent figures to shedding and
  the autoscalers (loadcontrol.py).

The arbiter is only the arbiter: pool sizes are ``pools``, model versions
``versions``, hot tiers ``hot_tiers``, load control ``load_control``, what it
reports ``reports``; each holds a reference back to it for the shared facts
(settings, the children table, the plan file, ``tell_broker``).

The loop can be stepped by a unit test without processes or sockets: the
clock (``clock``), what starts a child (``spawner``, children.py) and what
goes to the broker (``to_broker``) are given to the constructor
(tests/test_supervisor_steps.py).

SIGTERM drains (the broker stops admitting and answers what it holds, within
``workers.drain_timeout_s``), stops the children, unlinks every segment and
socket file it made and exits 0.
"""
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgpack
import zmq

from jizhi import control, lifeline, messages, notify, protocol, rundir
from jizhi import stats as stats_mod
from jizhi.shm import segment_name, unlink, unlink_prefix
from jizhi.states import VersionState
from jizhi.supervisor import boot, metrics
from jizhi.supervisor.children import (BROKER, MAX_BACKOFF_S, RESTART_BUDGET, YOUNG_S, Child, WorkerKey,
                                       describe_exit, popen)
from jizhi.supervisor.commands import handle as handle_command
from jizhi.supervisor.hot import HotTiers
from jizhi.supervisor.loadcontrol import LoadControl
from jizhi.supervisor.loader import LIVE
from jizhi.supervisor.pools import Pools
from jizhi.supervisor.reports import Reports
from jizhi.supervisor.versions import VersionManager

log = logging.getLogger("jizhi.supervisor")

KILL_AFTER_S = 2.0    # murder(): SIGKILL this long after a SIGTERM that was ignored
STOP_WAIT_S = 5.0     # the stop: SIGKILL children that did not exit this long after SIGTERM


class Supervisor:
    def __init__(self, settings, models_dir, pipelines, config_path=None, overrides=None,
                 clock=time.monotonic, spawner=popen, to_broker=None):
        """``clock``: monotonic seconds; ``spawner(argv, env)``: starts a child's process; ``to_broker(frames)``:
        sends a message's frames to the broker (None: the broker socket, once ``serve`` opened it)."""
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides or {}
        self.models_dir = str(models_dir)
        self.pipeline_names = pipelines
        self.instance = settings["server.instance"]
        self.run_dir = Path(settings["server.run_dir"])
        self.run_id = uuid.uuid4().hex[:8]
        self.clock = clock
        self.spawner = spawner
        self.to_broker = to_broker
        self.t_start = time.monotonic()   # jizhid's start, in every process's clock (the plan file says it)
        self.children = {}                # BROKER or WorkerKey -> Child
        self.signals = []
        self.stopping = False
        self.segments = {}                # owner -> {what: segment name}: every segment this run made
        self.ctl = self.control = None    # the broker's DEALER, the control REP
        self.metrics_server = None
        self.loop_beat = None             # /livez: stamped every turn of the loop (and of the stop's drain)
        self._lock = None
        self._cleaned = False
        # Set by prepare(): the plan file's content and path, the run-wide segments' specs.
        self.run = self.plan_path = self.backend = None
        self.overlay = self.qcache = self.stats_spec = self.stats_shm = None
        self.pools = Pools()
        self.versions = VersionManager(self)
        self.hot_tiers = HotTiers(self)
        self.load_control = LoadControl(self)
        self.reports = Reports(self)
        # What the broker's messages do: one handler per type, each given the decoded message. A type
        # missing here (one the supervisor sends, or DRAINED, which only the stop waits for) is ignored.
        self.broker_handlers = {
            messages.Warm: self.versions.on_warm,
            messages.VersionIdle: self.versions.on_version_idle,
            messages.Invalid: self.versions.on_invalid,
            messages.Load: self.load_control.on_load,
            messages.Info: self.reports.on_info,
        }

    # -- start --------------------------------------------------------------

    def read_pipelines(self):
        """The pipeline files, read, and every model's version policy: (docs, policies). (jizhi/preflight.py)"""
        return self.versions.read_pipelines()

    def resolve(self):
        """What a start resolves before it touches anything, shared with ``jizhid --check-config``: the
        pipelines read, the model directory scanned, each model's boot version chosen and verified (sizes,
        sha256), every pipeline compiled against them. Returns {pipeline: plan}; raises PipelineError or
        BundleError naming the problem. Writes nothing."""
        return self.versions.resolve()

    def check_shm(self, plans):
        """Raises ShmFull when /dev/shm cannot hold the arenas of ``plans`` twice (a reload loads beside)."""
        return boot.check_shm(self.settings, plans)

    def prepare(self):
        """Everything that can fail before a child starts: compile, verify, allocate."""
        plans = self.resolve()
        rundir.prepare(self.run_dir)    # created 0700, or refused when another user could replace it
        self.take_instance_lock()
        boot.end_leftovers(self.instance)
        need = self.check_shm(plans)
        self.versions.load_boot(plans)
        self.overlay = boot.create_overlay(self, plans)
        log.info("created %d shared-memory arenas (%d MiB virtual)",
                 sum(len(s) for s in self.segments.values()), need >> 20)
        self.qcache = boot.create_qcache(self, plans)
        self.load_control.start(plans)
        self.stats_spec = boot.create_stats(self, plans)
        self.stats_shm = stats_mod.Stats.attach(self.stats_spec)
        self.backend = f"ipc://{self.run_dir}/backend.ipc"
        self.run = {"instance": self.instance, "run_id": self.run_id, "settings": self.settings,
                    "frontend": self.settings["server.frontend"], "backend": self.backend,
                    "pipelines": plans, "overlay": self.overlay, "stats": self.stats_spec, "qcache": self.qcache,
                    "shed": self.load_control.plan_entry(), "default_pipeline": next(iter(plans)),
                    "started_monotonic": self.t_start}     # jizhid's uptime, the one every reply states
        self.plan_path = self.run_dir / "plan.msgpack"
        self.write_run()
        self.versions.mark_serving(plans)
        self.children[BROKER] = Child.broker(lifeline.child_argv("jizhi.broker", "--plan", self.plan_path))
        for name, plan in plans.items():
            for g, group in plan["groups"].items():
                self.pools.start(name, g, group["pool"])

    def take_instance_lock(self):
        """One live supervisor per instance name on a host, before anything of a previous run is removed.

        ``flock`` in the checked run directory plus this user's abstract socket of the instance
        (jizhi/rundir.py): the kernel releases both when this process dies, however it dies, so a
        crash never leaves a stale lock, and no other user can hold either. Raises InstanceBusy.
        """
        self._lock = rundir.InstanceLock(self.run_dir, self.instance)

    def write_run(self):
        """The plan file every child reads: settings, sockets and every loaded version (atomically replaced)."""
        self.run["versions"] = self.versions.entries()
        rundir.write_file(self.plan_path, msgpack.packb(self.run, use_bin_type=True))

    # -- the loop -----------------------------------------------------------

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
        self.loop_beat = time.monotonic()
        if self.settings["metrics.listen"]:
            self.metrics_server = metrics.serve(self, self.settings["metrics.listen"])
        while not self.stopping:
            self.loop_beat = time.monotonic()
            self.handle_signals()
            self.reap()
            self.murder()
            self.versions.converge_models()
            self.manage()
            now = self.clock()
            self.reports.sample_cube(now)
            if watchdog_s and now - last_watchdog >= watchdog_s:
                # From the loop itself: a stuck supervisor stops pinging and systemd restarts it.
                notify.notify("WATCHDOG=1")
                last_watchdog = now
            self.load_control.ask(now)
            if now - last_info > (1.0 if self.reports.ready_logged else 0.2):
                # The broker's figures, cached for the metrics endpoint and readiness.
                last_info = now
                self.tell_broker(messages.Info())
            self.serve_control(poller, timeout_ms=100)
        return self.shutdown()

    def install_signals(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda s, f: self.signals.append(s))

    def handle_signals(self):
        while self.signals:
            sig = self.signals.pop(0)
            getattr(self, "handle_" + signal.Signals(sig).name.lower())()

    def handle_sigchld(self):
        pass  # reap() runs every turn of the loop

    def handle_sighup(self):
        try:
            self.versions.reload()
        except control.ControlError:
            pass  # reload() logged why; the running configuration stays and so must the daemon

    def handle_sigterm(self):
        self.stopping = True

    handle_sigint = handle_sigterm

    def reap(self):
        """Collect exited children: log how each ended, tell the broker of a dead worker at once (its events
        are requeued), and set the backoff before ``manage()`` starts it again."""
        for child in self.children.values():
            if child.proc is None:
                continue
            rc = child.proc.poll()
            if rc is None:
                continue
            how = describe_exit(rc)
            pid = child.proc.pid
            if child.retiring and rc == 0:
                log.info("%s pid=%d retired", child.name, pid)
            elif rc == 0 and child.is_worker:
                log.info("%s pid=%d recycled itself (workers.max_events or workers.max_rss_mb); starting a fresh one",
                         child.name, pid)
            else:
                log.warning("%s pid=%d died: %s", child.name, pid, how)
            if child.is_worker:
                self.tell_broker(messages.WorkerDead(child.pipeline, child.group, child.wid, pid))
                if rc != 0 and not child.retiring:
                    self.versions.worker_died(child, rc, how)
            if child.exited(rc, how, self.clock(), self.settings["workers.restart_backoff_s"]):
                # The restart budget is spent: keep trying at the slowest pace, and say so
                # (jizhictl status shows "degraded") instead of looping quietly.
                log.error("%s is degraded: %d quick deaths in a row (last: %s); retrying every %.0f s",
                          child.name, child.quick_deaths, how, MAX_BACKOFF_S)
                notify.notify(f"STATUS=degraded: {child.name} keeps dying ({how})")

    def murder(self):
        """Replace workers whose work loop stopped beating (stuck in a stage) or never started."""
        now = self.clock()
        hung_s = self.settings["workers.hung_timeout_s"]
        boot_s = self.settings["workers.boot_timeout_s"]
        for child in self.children.values():
            if not child.running():
                continue
            if child.kill_at is not None:
                if now >= child.kill_at:
                    log.warning("%s pid=%d ignored SIGTERM; SIGKILL", child.name, child.proc.pid)
                    child.proc.kill()
                    child.kill_at = float("inf")
                continue
            if not child.is_worker:
                continue
            hb = float(self.stats_shm.heartbeat[self.worker_row(child.key)])
            why = None
            if hb == 0.0 and now - child.started > boot_s:
                why = f"did not start its loop within {boot_s:g} s"
            elif hb > 0.0 and now - hb > hung_s:
                why = f"no heartbeat for {now - hb:.1f} s (stuck in a stage?)"
            if why:
                log.error("%s pid=%d %s: SIGTERM, SIGKILL in 2 s", child.name, child.proc.pid, why)
                child.proc.send_signal(signal.SIGTERM)
                child.kill_at = now + KILL_AFTER_S

    def manage(self):
        """Converge every version's pools to their desired size; restart what died (after its backoff)."""
        if self.stopping:
            return
        for pipeline, banks in self.versions.loaded.items():
            for bank, ld in banks.items():
                keep = ld.state in LIVE
                for group in ld.plan["groups"]:
                    n = self.pools.desired[(pipeline, group)] if keep else 0
                    for wid in range(n):
                        child = self.children.get(WorkerKey(pipeline, group, wid, bank))
                        if child is None:
                            self.add_worker(ld, group, wid)
                        elif child.retiring and child.proc is None:
                            child.retiring = False
                    for child in list(self.children.values()):
                        if child.is_worker and (child.pipeline, child.group, child.bank) == (pipeline, group, bank) \
                                and child.wid >= n and not child.retiring:
                            self.retire(child)
            for bank, ld in list(banks.items()):
                if ld.state in (VersionState.STOPPING, VersionState.FAILED) and not any(
                        c.is_worker and (c.pipeline, c.bank) == (pipeline, bank) for c in self.children.values()):
                    self.versions.unload(ld)
        now = self.clock()
        starting = self.loading_banks_starting()
        for key, child in list(self.children.items()):
            if child.proc is None:
                if child.retiring:
                    del self.children[key]
                elif now >= child.not_before:
                    if child.is_worker and (child.pipeline, child.bank) in starting:
                        continue    # a loading version's workers start one after another (less CPU at once)
                    self.spawn(child)
                    if child.is_worker and (child.pipeline, child.bank) in self.versions.loading_banks():
                        starting.add((child.pipeline, child.bank))
            elif child.quick_deaths and now - child.started >= YOUNG_S:
                if child.quick_deaths >= RESTART_BUDGET:
                    log.info("%s is up again for %.0f s: no longer degraded", child.name, YOUNG_S)
                child.quick_deaths = 0   # a stable start ends the degraded state
            elif child.retiring and now > child.retire_by and child.proc.poll() is None:
                log.warning("%s did not stop within the drain bound; sending SIGTERM", child.name)
                child.proc.send_signal(signal.SIGTERM)
                child.retire_by = float("inf")

    def serve_control(self, poller, timeout_ms):
        """Wait up to ``timeout_ms`` for the broker's messages and control commands, and answer them."""
        for sock, _ in poller.poll(timeout_ms):
            if sock is self.ctl:
                msg = self.read_broker()
                if msg is not None:
                    self.on_broker_message(msg)
            else:
                self.on_control()

    # -- children -------------------------------------------------------------

    def add_worker(self, loaded, group, wid):
        """A worker of ``loaded``'s bank, to be started by ``manage()``."""
        key = WorkerKey(loaded.pipeline, group, wid, loaded.bank)
        argv = lifeline.child_argv("jizhi.workers.run", "--plan", self.plan_path, "--pipeline", loaded.pipeline,
                                   "--group", group, "--wid", wid, "--version", loaded.version)
        if loaded.state == VersionState.LOADING:
            # A new version loads beside serving workers: at lower CPU priority until it serves.
            if self.versions.load_idle(workers=True):
                argv += ["--idle"]
            else:
                argv += ["--nice", str(self.settings["models.load_nice"])]
            cores = self.versions.load_cores()
            if cores:
                argv += ["--load-cores", ",".join(map(str, cores))]
            if self.versions.pacing():
                argv += ["--paced"]     # (its death signal SIGKILL while it may be held stopped)
        self.children[key] = Child.worker(key, argv, loaded.version)

    def child_env(self):
        # One compute thread per process: pools of processes share the cores,
        # not thread pools inside each (onnxruntime sets its own to 1). Marked with our pid and
        # instance (jizhi/lifeline.py): the child checks its parent, a later run finds leftovers.
        return lifeline.child_environ(dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                                           MKL_NUM_THREADS="1",
                                           JIZHI_BASE_NICE=str(os.getpriority(os.PRIO_PROCESS, 0))), self.instance)

    def spawn(self, child):
        if child.is_worker:
            row = self.worker_row(child.key)
            self.stats_shm.heartbeat[row] = 0.0   # not beating until its loop starts
            self.reports.keep_cube_counts(child.pipeline, row)   # the new process zeroes its row
        child.proc = self.spawner(child.argv, self.child_env())
        child.started = self.clock()
        child.kill_at = None
        if "--paced" in child.argv and self.versions.loading(child.key):
            self.versions.pace(child.proc.pid, child.name)   # (not a restart once its version serves)
        log.info("started %s pid=%d%s", child.name, child.proc.pid,
                 f" version={child.version}" if child.version is not None else "")

    def worker_row(self, key):
        """A worker's row in the stats segment: its group's first row, then bank x max_pool + wid."""
        return self.stats_spec["map"][f"{key.pipeline}/{key.group}"] + key.bank * self.settings["workers.max_pool"] \
            + key.wid

    def retire(self, child):
        """Stop a worker without dropping a request: the broker sends it nothing new, then STOP."""
        child.retiring = True
        child.retire_by = self.clock() + self.settings["workers.drain_timeout_s"]
        if child.proc is None:
            return
        self.tell_broker(messages.Retire(child.pipeline, child.group, child.wid, child.proc.pid))
        log.info("retiring %s/%s/%d pid=%d", child.pipeline, child.group, child.wid, child.proc.pid)

    def stop_bank(self, pipeline, bank, within_s):
        """A failed version's workers: retiring, SIGTERM after ``within_s`` (its broker side is forgotten)."""
        for child in self.children.values():
            if child.is_worker and (child.pipeline, child.bank) == (pipeline, bank):
                child.retiring = True
                child.retire_by = self.clock() + within_s

    def loading_banks_starting(self):
        """Banks of loading versions with a worker started but not yet in its work loop (no heartbeat yet)."""
        out = set()
        for (p, bank) in self.versions.loading_banks():
            for child in self.children.values():
                if child.is_worker and (child.pipeline, child.bank) == (p, bank) and child.running() \
                        and self.stats_shm.heartbeat[self.worker_row(child.key)] == 0.0:
                    out.add((p, bank))
        return out

    def memory_in_use(self):
        """Resident bytes of the supervisor and its children (a load's memory budget check)."""
        pids = [os.getpid()] + [c.pid for c in self.children.values() if c.pid]
        return sum(stats_mod.rss_bytes(p) or 0 for p in pids)

    # -- the broker and the control socket -------------------------------------

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

    def tell_broker(self, msg):
        """Send ``msg`` (a jizhi/messages.py message) to the broker without waiting. Before the sockets open
        (at start) no broker runs: nothing is sent (what it must know is in the plan file, or in its first
        replies)."""
        frames = msg.encode()
        if self.to_broker is not None:
            self.to_broker(frames)
        elif self.ctl is not None:
            try:
                self.ctl.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def ask_broker(self, question, timeout_s=2.0):
        """Send ``question`` (INFO, LOAD, RECORD) to the broker and wait for its answer, a message of the same
        type; other messages that arrive meanwhile are handled. Returns None when none came in time."""
        self.tell_broker(question)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.ctl.poll(max(1, int((end - time.monotonic()) * 1000))):
                msg = self.read_broker()
                if msg is None:
                    continue
                self.on_broker_message(msg)
                if type(msg) is type(question):
                    return msg
        return None

    def read_broker(self):
        """The broker's next message, decoded (jizhi/messages.py); None for a malformed one (logged, dropped)."""
        try:
            return messages.decode([self.ctl.recv()])
        except ValueError as e:
            log.warning("dropping a malformed message from the broker: %s", e)
            return None

    def on_broker_message(self, msg):
        """A decoded message from the broker, to its handler (``broker_handlers``)."""
        handler = self.broker_handlers.get(type(msg))
        if handler is not None:
            handler(msg)

    def on_control(self):
        try:
            request = protocol.unpackb(self.control.recv())
        except Exception:
            reply = {"v": control.VERSION, "ok": False, "error": "not a msgpack message"}
        else:
            try:
                reply = handle_command(self, request)
            except Exception as e:  # a bug in a command must not take the supervisor down
                log.exception("control command failed")
                reply = {"v": control.VERSION, "ok": False, "error": f"{type(e).__name__}: {e}"}
        self.control.send(protocol.packb(reply))

    # -- what control commands call ------------------------------------------

    def set_draining(self, on):
        self.tell_broker(messages.Drain(reply=False) if on else messages.Resume())
        log.info("draining: %s", "on (admitting nothing new)" if on else "off (admitting again)")

    def record(self, op):
        """``jizhictl record``: the broker's {records, dropped, recording} after ``op`` (start, fetch, stop)."""
        reply = self.ask_broker(messages.Record(op=op), 5.0)
        if reply is None:
            raise control.ControlError("the broker did not answer (is it restarting?)")
        return {"records": reply.records, "dropped": reply.dropped, "recording": reply.recording}

    # -- stop ---------------------------------------------------------------

    def shutdown(self):
        log.info("stopping: draining in-flight requests (up to %.1f s)", self.settings["workers.drain_timeout_s"])
        notify.notify("STOPPING=1", "STATUS=draining")
        broker = self.children.get(BROKER)
        if broker and broker.running():
            self.tell_broker(messages.Drain())
            end = time.monotonic() + self.settings["workers.drain_timeout_s"]
            while time.monotonic() < end:
                self.loop_beat = time.monotonic()
                if self.ctl.poll(50):
                    if isinstance(self.read_broker(), messages.Drained):
                        log.info("drained: every admitted request was answered")
                        break
                if broker.proc.poll() is not None:
                    break
            else:
                log.warning("drain bound reached with requests still in flight")
        self.versions.pacer.close()     # nothing held stopped: every child handles its SIGTERM
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_WAIT_S
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM; killing it", p.pid)
                p.kill()
                p.wait()
        self.versions.registry.stop()
        for banks in self.versions.loaded.values():
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
        if self._cleaned or self._lock is None:
            return   # never started, or another instance's: nothing here is ours
        self._cleaned = True
        n = 0
        for segs in self.segments.values():
            for seg in segs.values():
                n += unlink(seg)
        n += unlink_prefix(segment_name(self.instance, self.run_id) + ".")    # workers' item tables (sharedtable)
        for f in ("backend.ipc", "plan.msgpack", control.SOCKET_NAME):
            try:
                (self.run_dir / f).unlink()
            except FileNotFoundError:
                pass
        for f in self.run_dir.glob("hot-*.npy"):    # LFU key lists of hot-tier builds
            f.unlink(missing_ok=True)
        for d in self.run_dir.glob("disk-*"):       # disk caches of remote cubes
            shutil.rmtree(d, ignore_errors=True)
        log.info("removed %d shared-memory segments", n)
