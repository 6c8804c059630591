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

from jizhi import arena, overlay, protocol
from jizhi.bundle import Bundle
from jizhi.errors import EXIT_BOOT_FAILURE, EXIT_CUBE_OPEN_FAILURE, EXIT_MODEL_LOAD_FAILURE
from jizhi.pipeline import compile_pipeline, read_pipeline

log = logging.getLogger("jizhi.supervisor")

EXIT_MEANING = {EXIT_BOOT_FAILURE: "boot failure", EXIT_MODEL_LOAD_FAILURE: "model load failure",
                EXIT_CUBE_OPEN_FAILURE: "cube open failure"}
YOUNG_S = 5.0        # a child that dies younger than this backs off before restart
MAX_BACKOFF_S = 10.0


class Child:
    """A process the supervisor keeps alive: the broker, or one wid of a group."""

    def __init__(self, key, argv):
        self.key = key          # ("broker",) or (pipeline, group, wid)
        self.argv = argv
        self.proc = None
        self.started = 0.0
        self.backoff_s = 0.0
        self.not_before = 0.0

    @property
    def pid(self):
        return self.proc.pid if self.proc else None


class Supervisor:
    def __init__(self, settings, models_dir, pipelines):
        self.settings = settings
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
        for vdir in {plan["version_dir"] for plan in plans.values()}:
            Bundle(vdir).verify()
            log.info("bundle verified: %s", vdir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        self.backend = f"ipc://{self.run_dir}/backend.ipc"
        self.run = {"instance": self.instance, "run_id": self.run_id, "settings": self.settings,
                    "frontend": self.settings["server.frontend"], "backend": self.backend,
                    "pipelines": plans, "segments": self.segments, "overlay": self.overlay,
                    "default_pipeline": next(iter(plans))}
        self.plan_path = self.run_dir / "plan.msgpack"
        tmp = self.plan_path.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb(self.run, use_bin_type=True))
        os.replace(tmp, self.plan_path)
        py = sys.executable
        self.children[("broker",)] = Child(("broker",), [py, "-m", "jizhi.broker", "--plan", str(self.plan_path)])
        for name, plan in plans.items():
            for g, group in plan["groups"].items():
                for wid in range(group["pool"]):
                    self.add_worker(name, g, wid)

    def add_worker(self, pipeline, group, wid):
        key = (pipeline, group, wid)
        self.children[key] = Child(key, [sys.executable, "-m", "jizhi.workers.run", "--plan", str(self.plan_path),
                                         "--pipeline", pipeline, "--group", group, "--wid", str(wid)])

    def spawn(self, child):
        # One compute thread per process: pools of processes share the cores,
        # not thread pools inside each (onnxruntime sets its own to 1).
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, env=env)
        child.started = time.monotonic()
        log.info("started %s pid=%d", "/".join(map(str, child.key)), child.proc.pid)

    # -- the loop -----------------------------------------------------------

    def install_signals(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda s, f: self.signals.append(s))

    def open_control(self):
        ctx = zmq.Context.instance()
        self.ctl = ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.IDENTITY, b"supervisor")
        self.ctl.connect(self.backend)

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
        last_info = 0.0
        while not self.stopping:
            while self.signals:
                sig = self.signals.pop(0)
                getattr(self, "handle_" + signal.Signals(sig).name.lower())()
            self.reap()
            self.manage()
            if not self.ready_logged and time.monotonic() - last_info > 0.2:
                last_info = time.monotonic()
                self.tell_broker(protocol.encode_simple(protocol.T_INFO))
            if self.ctl.poll(100):
                msg = protocol.unpackb(self.ctl.recv())
                if msg.get("t") == protocol.T_INFO and msg["info"]["ready"] and not self.ready_logged:
                    self.ready_logged = True
                    log.info("ready: serving %s on %s", ", ".join(self.run["pipelines"]), self.run["frontend"])
        return self.shutdown()

    def handle_sigchld(self):
        pass  # reap() runs every turn of the loop

    def handle_sighup(self):
        log.info("SIGHUP: configuration reload is not implemented yet; keeping the running configuration")

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
            log.warning("%s pid=%d died: %s", name, child.proc.pid, how)
            if len(child.key) == 3:
                self.tell_broker(protocol.encode_simple(protocol.T_WORKER_DEAD, pipeline=child.key[0],
                                                        group=child.key[1], wid=child.key[2], pid=child.proc.pid))
            now = time.monotonic()
            if now - child.started < YOUNG_S:
                child.backoff_s = min(MAX_BACKOFF_S, max(self.settings["workers.restart_backoff_s"], child.backoff_s * 2))
            else:
                child.backoff_s = 0.0
            child.not_before = now + child.backoff_s
            child.proc = None

    def manage(self):
        now = time.monotonic()
        for child in self.children.values():
            if child.proc is None and now >= child.not_before and not self.stopping:
                self.spawn(child)

    # -- stop ---------------------------------------------------------------

    def shutdown(self):
        log.info("stopping: draining in-flight requests (up to %.1f s)", self.settings["workers.drain_timeout_s"])
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
        self.cleanup()
        log.info("stopped")
        return 0

    def cleanup(self):
        """Unlink our segments and socket files. Idempotent (shutdown and jizhid's finally both call it)."""
        if getattr(self, "_cleaned", False):
            return
        self._cleaned = True
        n = 0
        for segs in self.segments.values():
            for seg in segs.values():
                n += arena.unlink(seg)
        for f in ("backend.ipc", "plan.msgpack"):
            try:
                (self.run_dir / f).unlink()
            except FileNotFoundError:
                pass
        log.info("removed %d shared-memory segments", n)
