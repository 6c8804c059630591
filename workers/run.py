"""The worker-process runtime: ``python -m jizhi.workers.run``.

Started by the supervisor as a fresh interpreter (never forked), one process
per wid of a group (a group is one stage or several fused stages). After
start it: reads the plan, opens its bundle/cube/sessions through each
stage's ``setup``, attaches the arenas, connects a DEALER to the broker's
backend and announces itself (READY with the versions it serves and its
prefetch window). Then it loops: receive an event (a micro-batch of
requests named by arena slot), skip requests whose ``deadline_s`` passed,
run its stages in order, write the columns other groups read into the
arenas, answer DONE with per-request results and per-stage service times
(the messages are jizhi/messages.py's). Heartbeats come from this same loop,
so a worker stuck in a stage goes quiet.

Exit codes (jizhi/errors.py) tell the supervisor why a worker could not start.
"""
if __name__ == "__main__":
    from jizhi import lifeline
    lifeline.hold()   # first, before the imports below: this process must never outlive jizhid
import argparse
import logging
import os
import signal
import sys
import time

import numpy as np
import zmq

from jizhi import lifeline, logs, messages, priority, rundir
from jizhi.profilestore import building as profiles_building
from jizhi.sharedtable import waiting as tables_waiting
from jizhi.stats import (C_EVENTS, C_FAILED, C_PID, C_REQUESTS, C_RSS, W_ASSEMBLE, W_DONE, W_RECEIVE, W_WRITE,
                         CpuPhases, Stats, rss_bytes)
from jizhi.workers.builtins import load_class
from jizhi.errors import (DEADLINE_EXCEEDED, EXIT_BOOT_FAILURE, EXIT_CUBE_OPEN_FAILURE,
                          EXIT_MODEL_LOAD_FAILURE, EXIT_STALE_RUN, INTERNAL)

log = logging.getLogger("jizhi.worker")

WARMUP_CANDIDATES = 64     # candidates of the warm-up batch (workers/run.py, Worker.warm_up)


def lower_priority(nice, idle=False):
    """A loading worker yields the CPU (and the disk) to serving ones: SCHED_IDLE and the idle I/O class
    (jizhi/priority.py), or ``nice`` more. Per thread: set before any thread starts."""
    if idle:
        priority.idle()
    elif nice:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))


def restore_priority(cores=None):
    """Serving now: every thread on its group's cores (or all) and back to the parent's nice value.

    Lowering nice needs CAP_SYS_NICE (the systemd unit grants it); without it the worker serves niced.
    A paced loading worker (``--paced``: SIGKILL as its death signal from its fork) is no longer paced
    once it serves: SIGTERM again, so it stops cleanly with its supervisor.
    """
    lifeline.arm(signal.SIGTERM)
    try:
        allowed = cores or sorted(os.sched_getaffinity(os.getppid()))
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), allowed)
    except OSError:
        pass
    target = int(os.environ.get("JIZHI_BASE_NICE", "0"))
    if os.getpriority(os.PRIO_PROCESS, 0) == target and os.sched_getscheduler(0) == os.SCHED_OTHER:
        return
    if priority.normal(0, target):
        log.info("serving: CPU priority back to nice %d", target)
    else:
        log.info("serving at nice %d: raising priority back to %d needs CAP_SYS_NICE (the systemd unit grants it)",
                 os.getpriority(os.PRIO_PROCESS, 0), target)


class Worker:
    """One worker process of one group of one pipeline."""

    def __init__(self, run, pipeline, group, wid, version):
        from jizhi.arena import Arenas
        from jizhi.bundle import Bundle
        self.run = run
        entry = run["versions"][pipeline].get(str(version))
        if entry is None:
            raise RuntimeError(f"the plan has no version {version} of pipeline {pipeline}")
        self.plan = entry["plan"]
        self.entry = entry
        self.pipeline = pipeline
        self.group = self.plan["groups"][group]
        self.wid = wid
        self.settings = run["settings"]
        # The pipeline model's bundle, and a head's for a stage naming another model (``model = "ctr"``).
        dirs = self.plan.get("version_dirs") or {self.plan["model"]: self.plan["version_dir"]}
        bundles = {m: Bundle(d) for m, d in dirs.items()}
        self.versions = self.plan.get("versions") or {self.plan["model"]: self.plan["version"]}
        self.stages = []
        for sname in self.group["stages"]:
            st = self.plan["stages"][sname]
            cls = load_class(st["class"])
            proc = cls()
            # Keys the runtime adds for built-ins start with "_" (the overlay's segment).
            config = dict(st["config"], _overlay=run.get("overlay"), _hot=entry.get("hot"),
                          _qcache=run.get("qcache"), _wid=wid, _pipeline=pipeline,
                          _shed=(run.get("shed") or {}).get(pipeline),
                          _disk_cache=entry.get("disk_cache"), _versions=self.versions, _items=entry.get("items"),
                          _stage=sname)
            try:
                proc.setup(config, bundles[st["config"].get("model", self.plan["model"])])
            except Exception as e:
                code = EXIT_CUBE_OPEN_FAILURE if "lmdb" in type(e).__module__ else EXIT_MODEL_LOAD_FAILURE
                log.error("stage %s setup failed: %s", sname, e)
                raise SystemExit(code)
            self.stages.append((sname, proc, st))
        self.arenas = Arenas(self.plan, entry["segments"],
                             self.settings["limits.max_in_flight"], self.settings["limits.max_candidates"])
        self.stats = Stats.attach(run.get("stats"))
        # Two banks of rows per group: the serving version's workers and a loading one's.
        self.row = (run["stats"]["map"][f"{pipeline}/{group}"] + entry["bank"] * self.settings["workers.max_pool"]
                    + wid) if self.stats else None
        if self.stats is not None:
            self.stats.keys_pos[self.row] = 0
            for _, proc, _ in self.stages:
                if hasattr(proc, "attach_sampler"):
                    proc.attach_sampler(self.stats.keys[self.row], self.stats.keys_pos[self.row:self.row + 1])
        self.max_events = self.settings.get("workers.max_events", 0)
        self.max_rss = self.settings.get("workers.max_rss_mb", 0) * 2 ** 20
        self.events = 0
        self.boot = {}
        # Optional stage hooks (user stages need not subclass Stage).
        self.boundary_hooks = [p.batch_boundary for _, p, _ in self.stages if hasattr(p, "batch_boundary")]
        self.report_hooks = [p.report for _, p, _ in self.stages if hasattr(p, "report")]
        self.reads = self.group["reads"]
        # Per-candidate or per-request, of every column (to narrow and widen batches: workers/stage.py, Selection).
        self.scope_of = {n: spec["scope"] for n, spec in self.plan["arenas"].items()}
        for st in self.plan["stages"].values():
            self.scope_of.update({n: spec["scope"] for n, spec in st["outputs"].items()})
        self.writes = self.group["writes"]
        # Per stage: the columns read by it or a later stage of this group, or written to shared memory
        # (what a narrowed batch must widen before that stage: Selection.widen).
        later, self.needed_from = set(self.writes), []
        for _, _, st in reversed(self.stages):
            later |= set(st["inputs"])
            self.needed_from.insert(0, frozenset(later))
        self.needed_at_end = frozenset(self.writes)
        self.cpu = CpuPhases()    # the CPU account by phase; into this worker's stats row once it serves
        self.running = True
        self.stale = False     # exiting as a process of an ended run (jizhi/lifeline.py)

    def process_event(self, ev):
        """Run the group's stages on the requests of one Event (jizhi/messages.py) whose deadline has not
        passed; return its Done (the others failed DEADLINE_EXCEEDED)."""
        self.cpu.enter(W_ASSEMBLE)
        try:
            return self._process_event(ev)
        finally:
            self.cpu.leave()

    def _process_event(self, ev):
        from jizhi.workers.stage import Batch
        done = messages.Done(ev.eid, ev.slot)
        deadline_s = np.array(ev.deadline_s, dtype=np.float64)
        live = deadline_s > time.monotonic()
        if live.all():
            idx = None
            slots, counts = ev.slot, ev.n
        else:
            idx = np.flatnonzero(live)
            for s in np.asarray(ev.slot)[~live].tolist():
                done.errors[s] = [DEADLINE_EXCEEDED, "deadline passed before the stage ran"]
            if idx.shape[0] == 0:
                return done
            slots, counts = np.asarray(ev.slot)[idx].tolist(), np.asarray(ev.n)[idx].tolist()
            deadline_s = deadline_s[idx]

        def column(values, dtype):
            a = np.array(values, dtype=dtype)
            return a if idx is None else a[idx]
        try:
            offsets = np.zeros(len(slots) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            cols = {c: self.arenas.read(c, slots, counts) for c in self.reads}
            batch = Batch(column(ev.user, np.uint64), column(ev.top_k, np.int64), column(ev.ret_all, bool),
                          deadline_s, offsets, cols)
            if ev.feats is not None:
                batch.feats = list(ev.feats) if idx is None else [ev.feats[i] for i in idx.tolist()]
            if ev.keep is not None:
                batch.keep = column(ev.keep, np.float64)
        except Exception as e:
            log.exception("malformed event of %d requests", len(slots))
            done.errors.update((s, [INTERNAL, f"malformed event: {type(e).__name__}: {e}"]) for s in slots)
            return done
        try:
            for hook in self.boundary_hooks:
                hook()   # the place to pick up a new hot-tier generation
            self.run_stages(batch, done.svc_us, observe=self.stats is not None)
            self.cpu.enter(W_WRITE)
            try:
                for c in self.writes:
                    self.arenas.write(c, slots, offsets, cols[c])
                if self.stats is not None:
                    for hook in self.report_hooks:
                        hook(self.stats.counters[self.row])
            finally:
                self.cpu.leave()
        except Exception as e:
            log.exception("stage failed on an event of %d requests", len(slots))
            msg = f"stage failed: {type(e).__name__}: {e}"
            done.errors.update((s, [INTERNAL, msg]) for s in slots)
            return done
        for i, (code, msg) in batch.failed.items():
            done.errors[slots[i]] = [code, msg]
        for name, per_request in batch.counts.items():
            if idx is None:
                done.counts[name] = per_request.tolist()
            else:
                full = np.zeros(len(ev.slot), dtype=np.int64)
                full[idx] = per_request
                done.counts[name] = full.tolist()
        return done

    def run_stages(self, batch, svc, observe):
        """The group's stages, in order, on ``batch`` (its columns gain each stage's outputs)."""
        from jizhi.workers.stage import Selection
        cols = batch.columns
        narrow = Selection(batch, self.scope_of)
        for si, (sname, proc, st) in enumerate(self.stages):
            if getattr(proc, "sees_all_candidates", False):
                narrow.widen(self.needed_from[si])
            t0 = time.perf_counter()
            self.cpu.enter(si)
            try:
                if narrow.empty:
                    out = self.empty_outputs(st, batch)   # every candidate was dropped before this stage
                else:
                    out = proc.process(batch)
            finally:
                self.cpu.leave()
            svc[sname] = us = int((time.perf_counter() - t0) * 1e6)
            if observe:
                self.stats.observe(self.row, si, us)
            for name, spec in st["outputs"].items():
                arr = out.get(name)
                if arr is None:
                    raise RuntimeError(f"stage {sname} did not return its output {name!r}")
                cols[name] = arr
            if out.get("_select") is not None:
                narrow.select(out["_select"])
        narrow.widen(self.needed_at_end)

    def idle_boundary(self):
        """The batch boundaries' hooks with no batch: new hot-tier generations and profile snapshots are
        taken up by an idle worker too. A hook that fails is logged; nothing else is at stake here."""
        try:
            for hook in self.boundary_hooks:
                hook()
        except Exception:
            log.exception("a stage's batch-boundary hook failed while idle")

    def warm_up(self):
        """One batch through every stage before this worker reports READY (so before jizhid says ready).

        The first batch of a fresh worker compiles its Numba kernels (seconds with an empty
        cache) and lets onnxruntime allocate; a request must never pay that. The batch is one
        request of the bundle's own user and item ids (``warmup`` in the plan); a column an
        earlier group would have written is zeros (booleans true). Nothing is written to
        shared memory, the stats row or the query cache (``batch.warmup``). Returns the
        milliseconds it took. A stage that raises on this made-up batch (a user stage may
        refuse zeros) is logged, not fatal: real requests decide whether it works.
        """
        from jizhi.workers.stage import Batch
        ids = self.entry.get("warmup") or {}
        users = np.frombuffer(ids.get("users", b""), dtype=np.uint64)[:1]
        items = np.frombuffer(ids.get("items", b""), dtype=np.uint64)[:WARMUP_CANDIDATES]
        if users.shape[0] == 0:
            users = np.ones(1, dtype=np.uint64)
        if items.shape[0] == 0:
            items = np.arange(1, WARMUP_CANDIDATES + 1, dtype=np.uint64)
        n = items.shape[0]
        cols = {}
        for c in self.reads:
            spec = self.plan["arenas"][c]
            lead = (n,) if spec["scope"] == "candidate" else (1,)
            arr = np.zeros(lead + tuple(spec["shape"]), dtype=spec["dtype"])
            if c == "item_ids":
                arr[:] = items
            elif arr.dtype == np.bool_:
                arr[:] = True
            cols[c] = arr
        t0 = time.monotonic()
        batch = Batch(users, np.array([10], dtype=np.int64), np.zeros(1, dtype=bool),
                      np.array([t0 + 600.0]), np.array([0, n], dtype=np.int64), cols)   # deadline_s: far
        batch.warmup = True
        try:
            self.run_stages(batch, {}, observe=False)
        except Exception as e:
            log.warning("the warm-up batch failed (%s: %s); serving anyway, the first request may be slow",
                        type(e).__name__, e)
        return round((time.monotonic() - t0) * 1000, 1)

    @staticmethod
    def empty_outputs(st, batch):
        out = {}
        for name, spec in st["outputs"].items():
            lead = (0,) if spec["scope"] == "candidate" else (batch.n_requests,)
            out[name] = np.zeros(lead + tuple(spec["shape"]), dtype=spec["dtype"])
        return out

    def should_recycle(self):
        if self.max_events and self.events >= self.max_events:
            return True
        if self.max_rss and self.events % 64 == 0:
            rss = rss_bytes()
            if self.stats is not None:
                self.stats.counters[self.row, C_RSS] = rss
            return rss > self.max_rss
        return False

    def serve(self, backend):
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        ident = f"{self.pipeline}/{self.group['name']}/{self.wid}/{os.getpid()}"
        sock.setsockopt(zmq.IDENTITY, ident.encode())
        sock.connect(backend)
        window = self.settings["workers.prefetch"]
        ready = messages.Ready(self.pipeline, self.group["name"], self.wid, self.versions, window, self.boot,
                               run=self.run["run_id"], pid=os.getpid()).encode()
        sock.send_multipart(ready)
        hb_s = self.settings["workers.heartbeat_interval_s"]
        last_send = time.monotonic()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        log.info("worker ready: pipeline=%s group=%s wid=%d pid=%d", self.pipeline, self.group["name"], self.wid, os.getpid())
        st, row = self.stats, self.row
        if st is not None:
            st.counters[row] = 0
            st.counters[row, C_PID] = os.getpid()
            st.errors[row] = 0
            st.hist[row] = 0
            st.sum_us[row] = 0
            st.cpu_ns[row] = 0
            self.cpu = CpuPhases(st.cpu_ns[row])
        cpu = self.cpu
        leaving = False
        next_check = 0.0
        while self.running:
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                if not lifeline.supervisor_alive() or not self.arenas.intact():
                    log.error("%s: this worker belongs to an ended run; exiting",
                              "its supervisor is gone" if not lifeline.supervisor_alive()
                              else "a shared-memory segment it maps was unlinked")
                    self.stale = True
                    break
            if st is not None:
                st.heartbeat[row] = time.monotonic()   # from the work loop: a stuck stage stops it
            # Idle, the batch boundaries still run (a profile snapshot published while no request comes is
            # taken up; its item tables are built between requests, not only between batches).
            # (while it builds: a step every 2 ms, so that an idle worker's build leaves the cores to the
            # workers that serve; while it only waits for another worker's shared table: every 20 ms)
            building = profiles_building()
            if not poller.poll((20 if tables_waiting() else 2) if building else int(hb_s * 1000)):
                self.idle_boundary()
            else:
                cpu.enter(W_RECEIVE)
                try:
                    msg = messages.decode(sock.recv_multipart(copy=True))
                except ValueError:
                    log.warning("dropping a malformed message from the broker")
                    continue
                finally:
                    cpu.leave()
                if isinstance(msg, messages.Event):
                    if msg.versions != self.versions:
                        # Routing is keyed by version set, so this is a broker bug; never score
                        # a request with a model it was not pinned to.
                        why = f"event pinned to {msg.versions} reached a worker serving {self.versions}"
                        done = messages.Done(msg.eid, msg.slot, {s: [INTERNAL, why] for s in msg.slot})
                    else:
                        done = self.process_event(msg)
                    cpu.enter(W_DONE)
                    try:
                        sock.send_multipart(done.encode())
                        last_send = time.monotonic()
                        self.events += 1
                        if st is not None:
                            st.counters[row, C_EVENTS] += 1
                            st.counters[row, C_REQUESTS] += len(msg.slot)
                            st.counters[row, C_FAILED] += len(done.errors)
                    finally:
                        cpu.leave()
                    if not leaving and self.should_recycle():
                        leaving = True
                        log.info("recycling after %d events (rss %d MiB): asking the broker to retire me",
                                 self.events, rss_bytes() >> 20)
                        sock.send_multipart(messages.Leaving(self.wid).encode())
                elif isinstance(msg, messages.Stop):
                    break
                elif isinstance(msg, messages.Priority):
                    restore_priority(self.group.get("cores") or None)
                elif isinstance(msg, messages.Resync):
                    log.info("the broker restarted; registering again")
                    sock.send_multipart(ready)
                    last_send = time.monotonic()
            if time.monotonic() - last_send >= hb_s:
                sock.send_multipart(messages.Heartbeat(self.wid).encode())
                last_send = time.monotonic()
        sock.close(0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jizhi.workers.run",
                                 description="A jizhi stage worker (started by jizhid, not by hand).")
    ap.add_argument("--plan", required=True, help="the run's plan file (msgpack) in the run directory")
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--group", required=True, help="the group (stage or fused stages) this worker runs")
    ap.add_argument("--wid", type=int, required=True, help="stable worker id within the group")
    ap.add_argument("--version", type=int, required=True, help="the model version this worker serves")
    ap.add_argument("--nice", type=int, default=0,
                    help="load at this much lower CPU priority (a new version beside serving ones)")
    ap.add_argument("--idle", action="store_true",
                    help="load at the idle CPU and I/O priority (SCHED_IDLE), back to normal once serving")
    ap.add_argument("--paced", action="store_true",
                    help="the supervisor may hold this loading worker stopped part of the time (models.load_pace) "
                         "until it serves (it sets SIGKILL as its death signal at the fork)")
    ap.add_argument("--load-cores", default="",
                    help="while loading, run on these cores only (comma-separated), until the version serves")
    args = ap.parse_args(argv)
    lower_priority(args.nice, args.idle)
    if args.load_cores:
        os.sched_setaffinity(0, [int(c) for c in args.load_cores.split(",")])
    logs.setup(f"jizhi.worker[{args.pipeline}/{args.group}/{args.wid}]")

    try:
        run = rundir.read_plan(args.plan)
        cores = run["pipelines"][args.pipeline]["groups"][args.group].get("cores") or []
        if cores:
            os.sched_setaffinity(0, cores)
        t0 = time.monotonic()
        worker = Worker(run, args.pipeline, args.group, args.wid, args.version)
        load_ms = round((time.monotonic() - t0) * 1000, 1)
        warm_ms = worker.warm_up()
        log.info("warmed up: one batch through %s in %.0f ms", ", ".join(s for s, _, _ in worker.stages), warm_ms)
        worker.boot = {"start_ms": round((t0 - lifeline.process_start()) * 1000, 1), "load_ms": load_ms, "warm_ms": warm_ms}
    except SystemExit:
        raise
    except Exception as e:
        log.error("worker failed to boot: %s: %s", type(e).__name__, e)
        return EXIT_BOOT_FAILURE

    def on_term(signum, frame):
        worker.running = False
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    worker.serve(run["backend"])
    log.info("worker stopped")
    logging.shutdown()
    # Skip interpreter teardown of numba/onnxruntime (seconds on a loaded
    # machine): sockets are closed, nothing is left to flush.
    os._exit(EXIT_STALE_RUN if worker.stale else 0)


if __name__ == "__main__":
    sys.exit(main())
