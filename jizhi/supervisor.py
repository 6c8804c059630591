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
"""
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import zmq

from jizhi import arena, control, notify, overlay, protocol
from jizhi import stats as stats_mod
from jizhi.bundle import Bundle
from jizhi.errors import (EXIT_BOOT_FAILURE, EXIT_CUBE_OPEN_FAILURE, EXIT_MODEL_LOAD_FAILURE, BundleError,
                          ConfigError, PipelineError)
from jizhi.pipeline import compile_pipeline, read_pipeline

log = logging.getLogger("jizhi.supervisor")

EXIT_MEANING = {EXIT_BOOT_FAILURE: "boot failure", EXIT_MODEL_LOAD_FAILURE: "model load failure",
                EXIT_CUBE_OPEN_FAILURE: "cube open failure"}
YOUNG_S = 5.0        # a child that dies younger than this backs off before restart
MAX_BACKOFF_S = 10.0
RESTART_BUDGET = 5   # quick deaths in a row before a child is reported degraded


class InstanceBusy(Exception):
    """Another live supervisor holds this instance name."""


class Child:
    """A process the supervisor keeps alive: the broker, or one wid of a group."""

    def __init__(self, key, argv):
        self.key = key          # ("broker",) or (pipeline, group, wid)
        self.argv = argv
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


class Supervisor:
    def __init__(self, settings, models_dir, pipelines, config_path=None, overrides=None):
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides or {}
        self.t_start = time.monotonic()
        self.desired = {}
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

    # -- start --------------------------------------------------------------

    def prepare(self):
        """Everything that can fail before a child starts: compile, verify, allocate."""
        plans = {}
        for p in self.pipeline_names:
            plan = compile_pipeline(read_pipeline(p), self.models_dir)
            plans[plan["name"]] = plan
        for plan in plans.values():
            for g, group in plan["groups"].items():
                if group["pool"] > self.settings["workers.max_pool"]:
                    raise PipelineError(f"pipeline {plan['name']}: group {g!r} pool {group['pool']} is over "
                                        f"workers.max_pool = {self.settings['workers.max_pool']}")
        for vdir in {plan["version_dir"] for plan in plans.values()}:
            Bundle(vdir).verify()
            log.info("bundle verified: %s", vdir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.take_instance_lock()
        stale = arena.remove_instance(self.instance)
        if stale:
            log.warning("removed %d shared-memory segments left by a previous run of instance %s",
                        len(stale), self.instance)
        slots, maxc = self.settings["limits.max_in_flight"], self.settings["limits.max_candidates"]
        need = sum(arena.arena_bytes(spec, slots, maxc) for plan in plans.values() for spec in plan["arenas"].values())
        st = os.statvfs(arena.SHM_DIR)
        if need > st.f_bavail * st.f_frsize:
            raise SystemExit(f"jizhid: the arenas need {need >> 20} MiB in /dev/shm, only "
                             f"{(st.f_bavail * st.f_frsize) >> 20} MiB free (lower limits.max_in_flight or limits.max_candidates)")
        for name, plan in plans.items():
            segs = {}
            for col, spec in plan["arenas"].items():
                seg = arena.segment_name(self.instance, self.run_id, name, col)
                arena.create(seg, arena.arena_bytes(spec, slots, maxc))
                segs[col] = seg
            self.segments[name] = segs
        ring = max([f.max_len for plan in plans.values() for f in Bundle(plan["version_dir"]).user_fields
                    if f.kind == "history"] or [1])
        cap = self.settings["overlay.capacity_users"]
        seg = f"{arena.PREFIX}{self.instance}.{self.run_id}.overlay"
        arena.create(seg, overlay.segment_bytes(cap, ring))
        self.segments["_overlay"] = {"overlay": seg}
        self.overlay = {"segment": seg, "capacity": cap, "ring": ring}
        log.info("created %d shared-memory arenas (%d MiB virtual)",
                 sum(len(s) for s in self.segments.values()), need >> 20)
        rows, nrows = stats_mod.row_map(plans, self.settings["workers.max_pool"])
        seg = f"{arena.PREFIX}{self.instance}.{self.run_id}.stats"
        arena.create(seg, stats_mod.segment_bytes(nrows))
        self.segments["_stats"] = {"stats": seg}
        self.stats_spec = {"segment": seg, "rows": nrows, "map": rows}
        self.stats_shm = stats_mod.Stats.attach(self.stats_spec)
        self.backend = f"ipc://{self.run_dir}/backend.ipc"
        self.run = {"instance": self.instance, "run_id": self.run_id, "settings": self.settings,
                    "frontend": self.settings["server.frontend"], "backend": self.backend,
                    "pipelines": plans, "segments": self.segments, "overlay": self.overlay, "stats": self.stats_spec,
                    "default_pipeline": next(iter(plans))}
        self.plan_path = self.run_dir / "plan.msgpack"
        tmp = self.plan_path.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb(self.run, use_bin_type=True))
        os.replace(tmp, self.plan_path)
        py = sys.executable
        self.children[("broker",)] = Child(("broker",), [py, "-m", "jizhi.broker", "--plan", str(self.plan_path)])
        for name, plan in plans.items():
            for g, group in plan["groups"].items():
                self.desired[(name, g)] = group["pool"]

    def take_instance_lock(self):
        """One live supervisor per instance name on a host, before anything of a previous run is removed.

        An abstract unix socket named after the instance: the kernel releases it
        when this process dies, however it dies, so a crash never leaves a stale lock.
        """
        import socket
        self._lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._lock.bind(f"\0jizhi.instance.{self.instance}")
        except OSError:
            self._lock.close()
            self._lock = None
            raise InstanceBusy(f"another jizhid is running instance {self.instance!r} on this host "
                               "(stop it, or choose another --instance)")

    def add_worker(self, pipeline, group, wid):
        key = (pipeline, group, wid)
        self.children[key] = Child(key, [sys.executable, "-m", "jizhi.workers.run", "--plan", str(self.plan_path),
                                         "--pipeline", pipeline, "--group", group, "--wid", str(wid)])

    def spawn(self, child):
        # One compute thread per process: pools of processes share the cores,
        # not thread pools inside each (onnxruntime sets its own to 1).
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        row = self.worker_row(child.key)
        if row is not None:
            self.stats_shm.heartbeat[row] = 0.0   # not beating until its loop starts
        child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, env=env)
        child.started = time.monotonic()
        child.kill_at = None
        log.info("started %s pid=%d", "/".join(map(str, child.key)), child.proc.pid)

    # -- the loop -----------------------------------------------------------

    def worker_row(self, key):
        if len(key) != 3:
            return None
        return self.stats_spec["map"][f"{key[0]}/{key[1]}"] + key[2]

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
                    log.warning("%s pid=%d ignored SIGTERM; SIGKILL", "/".join(map(str, key)), child.proc.pid)
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
                log.error("%s pid=%d %s: SIGTERM, SIGKILL in 2 s", "/".join(map(str, key)), child.proc.pid, why)
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
        if self.settings["metrics.listen"]:
            from jizhi import metrics
            self.metrics_server = metrics.serve(self, self.settings["metrics.listen"])
        while not self.stopping:
            while self.signals:
                sig = self.signals.pop(0)
                getattr(self, "handle_" + signal.Signals(sig).name.lower())()
            self.reap()
            self.murder()
            self.manage()
            now = time.monotonic()
            if watchdog_s and now - last_watchdog >= watchdog_s:
                # From the loop itself: a stuck supervisor stops pinging and systemd restarts it.
                notify.notify("WATCHDOG=1")
                last_watchdog = now
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
        if msg.get("t") == protocol.T_INFO:
            self.last_broker_info = msg["info"]
        if msg.get("t") == protocol.T_INFO and msg["info"]["ready"] and not self.ready_logged:
            self.ready_logged = True
            log.info("ready: serving %s on %s", ", ".join(self.run["pipelines"]), self.run["frontend"])
            notify.notify("READY=1", f"STATUS=serving {', '.join(self.run['pipelines'])} on {self.run['frontend']}")

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

    def status(self):
        now = time.monotonic()
        procs = []
        for c in self.children.values():
            state = "retiring" if c.retiring else ("running" if c.proc else "restarting")
            if c.quick_deaths >= RESTART_BUDGET:
                state = "degraded"
            procs.append({"name": "/".join(map(str, c.key)), "pid": c.pid, "state": state,
                          "last_death": c.last_death,
                          "uptime_s": round(now - c.started, 1) if c.proc else None,
                          "restarts": c.restarts, "rss_bytes": stats_mod.rss_bytes(c.pid) if c.pid else None})
        info = self.ask_broker(protocol.encode_simple(protocol.T_INFO), protocol.T_INFO)
        health = "unknown (broker did not answer)" if info is None else \
            ("ready" if info["info"]["ready"] else "starting")
        if info is not None and info["info"].get("draining"):
            health = "draining"
        if any(p["state"] == "degraded" for p in procs):
            health = "degraded"
        return {"instance": self.instance, "pid": os.getpid(), "uptime_s": round(now - self.t_start, 1),
                "health": health, "frontend": self.run["frontend"],
                "models": {p["model"]: p["version"] for p in self.run["pipelines"].values()},
                "pipelines": list(self.run["pipelines"]), "processes": procs,
                "pools": {f"{p}/{g}": n for (p, g), n in self.desired.items()}}

    def stats(self):
        info = self.ask_broker(protocol.encode_simple(protocol.T_INFO), protocol.T_INFO)
        if info is None:
            raise control.ControlError("the broker did not answer (is it restarting?)")
        return info["info"]

    def set_pool(self, pipeline, group, n):
        self.desired[(pipeline, group)] = n
        log.info("pool %s/%s: desired size %d", pipeline, group, n)

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

    def reload(self):
        """SIGHUP and `jizhictl reload`: validate everything, then apply what can change live.

        Applied live: pool sizes from the pipelines' files. Anything else that
        changed is reported under ``needs_restart``. An invalid config or
        pipeline is refused with its reason; the running configuration stays.
        """
        from jizhi import config as config_mod
        try:
            settings = config_mod.load(self.config_path, self.overrides)
            plans = {}
            for p in settings["server.pipelines"]:
                plan = compile_pipeline(read_pipeline(p), self.models_dir)
                plans[plan["name"]] = plan
        except (ConfigError, PipelineError, BundleError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            raise control.ControlError(f"the running configuration stays: {e}")
        applied, needs_restart = [], []
        for name, plan in plans.items():
            if name not in self.run["pipelines"]:
                needs_restart.append(f"pipeline {name} (new)")
                continue
            for g, group in plan["groups"].items():
                if (name, g) in self.desired and self.desired[(name, g)] != group["pool"]:
                    self.set_pool(name, g, group["pool"])
                    applied.append(f"{name}/{g} pool={group['pool']}")
        for k, v in settings.items():
            if v != self.settings.get(k) and k != "server.run_dir":
                needs_restart.append(k)
        log.info("reload: applied %s; needs a restart to change: %s", applied or "nothing",
                 needs_restart or "nothing")
        return {"applied": applied, "needs_restart": needs_restart}

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
            name = "/".join(map(str, child.key))
            if child.retiring and rc == 0:
                log.info("%s pid=%d retired", name, child.proc.pid)
            elif rc == 0 and len(child.key) == 3:
                log.info("%s pid=%d recycled itself (workers.max_events or workers.max_rss_mb); starting a fresh one",
                         name, child.proc.pid)
            else:
                log.warning("%s pid=%d died: %s", name, child.proc.pid, how)
            if len(child.key) == 3:
                self.tell_broker(protocol.encode_simple(protocol.T_WORKER_DEAD, pipeline=child.key[0],
                                                        group=child.key[1], wid=child.key[2], pid=child.proc.pid))
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

    def manage(self):
        """Converge every pool to its desired size; restart what died (after its backoff)."""
        if self.stopping:
            return
        for (pipeline, group), n in self.desired.items():
            for wid in range(n):
                child = self.children.get((pipeline, group, wid))
                if child is None:
                    self.add_worker(pipeline, group, wid)
                elif child.retiring and child.proc is None:
                    child.retiring = False
            for key, child in list(self.children.items()):
                if key[:2] == (pipeline, group) and len(key) == 3 and key[2] >= n and not child.retiring:
                    self.retire(child)
        now = time.monotonic()
        for key, child in list(self.children.items()):
            if child.proc is None:
                if child.retiring:
                    del self.children[key]
                elif now >= child.not_before:
                    self.spawn(child)
            elif child.quick_deaths and now - child.started >= YOUNG_S:
                if child.quick_deaths >= RESTART_BUDGET:
                    log.info("%s is up again for %.0f s: no longer degraded", "/".join(map(str, key)), YOUNG_S)
                child.quick_deaths = 0   # a stable start ends the degraded state
            elif child.retiring and now > child.retire_by and child.proc.poll() is None:
                log.warning("%s did not stop within the drain bound; sending SIGTERM", "/".join(map(str, key)))
                child.proc.send_signal(signal.SIGTERM)
                child.retire_by = float("inf")

    def retire(self, child):
        """Stop a worker without dropping a request: the broker sends it nothing new, then STOP."""
        child.retiring = True
        child.retire_by = time.monotonic() + self.settings["workers.drain_timeout_s"]
        if child.proc is None:
            return
        pipeline, group, wid = child.key
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
        log.info("removed %d shared-memory segments", n)

