"""The hot-reload benchmark: ``jizhictl bench-reload`` (``bench_reload_command``).

Runs in the operator's shell against a running jizhid, never inside it, and
answers the issue's two questions about a model switch under load: how much
worse is p99 while a new version is validated, loaded, warmed, switched in
and the old one released, than in steady state in the same run (target: at
most 1.5x), and how much extra memory does the double-buffered load take.

One run, on the time axis of the load (seconds from its first arrival):

* ``0 .. 3 s``: load, not counted (the server's caches and the generator settle);
* ``3 s .. 3 + --steady``: the **steady window**;
* then ``--reloads`` times: publish the next version (one rename into
  ``<models>/<model>/<N>``: ``t_rename``), wait until it serves and the old
  version is ``standby`` (released: its workers exited, its arenas removed;
  ``t_released``), then ``--gap`` seconds more before the next publish. The
  **switch window** of a reload is ``[t_rename, t_released + 1 s]``;
* after the last release, ``--after`` seconds more of load, then a drain.

Load: open loop, jizhi/tools/loadgen.py's generator as ``jizhictl bench`` uses it: Poisson arrivals at
``--rate`` from one DEALER socket, the trace's requests in order, latency
from each request's *intended* send time, errors by wire code, and *lost*
for no reply within deadline + 1 s. The run's length is not known in advance
(it depends on how long the reloads take), so the requests are encoded a
little ahead of their send time instead of all before the start (~6 us each).
The versions are staged (copied into ``<models>/.incoming`` with new dense
weights, ``jizhi.tools.demo.stage_version``, ~66 MB each for the demo) *before* the
load starts: copying and hashing in the generator's process while it sends
would charge the generator's own stalls to the server. Publishing is the
rename alone, as a training pipeline does it.

Memory: a sampler thread reads, every ``--sample-interval-s`` (100 ms), the
process tree under the supervisor (``/proc/<pid>/task/*/children``): RSS and
its anonymous, file and shared-memory parts from ``/proc/<pid>/status``
(cheap counters), the CPU time from ``/proc/<pid>/stat``, and the allocated
bytes of the instance's segments ``/dev/shm/jizhi.<instance>.*``. Every
``--pss-interval-s`` it also reads ``/proc/<pid>/smaps_rollup`` for PSS,
which counts a page shared by several processes (the memory-mapped cube and
profiles, the arenas, the interpreter's libraries) once in total, where RSS
counts it once per process. Reading smaps_rollup walks the page tables: it
costs 5-8 ms of CPU per jizhi process on the 2-core benchmark machine, so
PSS every 100 ms would take 0.3-0.5 cores from the server being measured;
the default reads it every 0.5 s (the double buffer lasts seconds). The
sampler's own CPU is reported. Processes are labelled by role: supervisor,
broker, ``workers vN``, ``validate vN``, ``hot tier build``.

Report: steady and switch-window p50/p99 (all reloads pooled, and per
reload, split by the server's own timeline into validating = rename to
valid, starting = the new workers' start and setup (and the hot tier's
build) to ready, warm-up = to serving, draining = serving to released, and
the second after the release), the ratio of switch p99 to steady p99 (and
to the p99 of every request outside the switch windows, a reference with
more samples), errors and lost requests, where the time of each window's
slowest 1 % went (queue wait, service, the rest of the broker, outside
the broker), the workers' nice values, the server's timeline per reload
(``jizhictl models`` timings_ms) with the measured rename to the first
answer by the new version (the reply's ``model_versions``), the CPU of each
role in each switch window and in its validating and starting phases (and
this process's, and the other load's), and memory: the baseline (median
over the steady window), the peak in each switch window and peak extra =
peak - baseline, and the median after the release.

A shared machine: ``--max-other-cores`` waits (at most ``--settle-s``)
for other processes to use fewer cores before the load starts and before
each later publish, and every window reports the other load it ran with;
the run also waits until jizhid runs no loading work of its own (the boot
version's hot tier is built after jizhid reports ready). ``--json FILE``
(``-``: stdout) writes all of it, with a per-0.5-s latency timeline.

The memory sampler is jizhi/tools/procfs.py's ``MemorySampler``; the
analysis of the windows and the report are in jizhi/tools/reloadreport.py.
"""
import collections
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

from jizhi import control
from jizhi.client import Client
from jizhi.ctl.inputs import Trace
from jizhi.states import VersionState
from jizhi.tools.loadgen import (ERROR, LOST, NOT_SENT, OK, PROGRESS_INTERVAL_S, OpenLoop, Progress, check_trace_args,
                                 load_socket, poisson_times, trace_file, trace_options)
from jizhi.tools.procfs import MemorySampler, ServerCpu, environment, wait_for_quiet
from jizhi.tools.reloadreport import RELEASE_TAIL_S, WARMUP_S, analyse, print_report

POLL_S = 0.1                 # control-socket polling while a reload runs
ENCODE_AHEAD = 256           # requests encoded ahead of their send time
NOT_SERVABLE = ("rejected", "refused", "failed", "removed")


class ReloadFailed(Exception):
    """A reload did not complete (rejected, failed, timed out, daemon gone); the message says which."""


# ----------------------------------------------------------------------------
# The load: open-loop Poisson until the driver stops it


class ReloadLoad(OpenLoop):
    """Open-loop Poisson load on one pipeline until the driver stops it, then a drain.

    The arrival times are drawn for ``horizon_s`` up front (exponential gaps
    at ``rate``); requests are the trace's rows in order, encoded a little
    ahead of their send time (the run's length is not known in advance).
    Besides loadgen's arrays, per request: the version that answered and,
    from the reply's timings_us (ms), admission to answer in the broker
    (``broker_ms``), the queue waits (``wait_ms``) and the stages' service
    (``service_ms``); ``codes`` counts the errors. The reload driver sets
    ``phase``, shown on the progress line.
    """

    def __init__(self, sock, trace, *, pipeline, model, rate, seed, horizon_s, deadline_ms, top_k):
        rng = np.random.default_rng([seed, int(rate * 1000)])
        due = poisson_times(rng, rate, horizon_s)
        n = due.shape[0]
        super().__init__(sock, trace, pipeline=pipeline, due=due, rows=np.arange(n) % len(trace),
                         deadline_ms=deadline_ms, top_k=top_k,
                         id_base=int(rng.integers(1, 2 ** 20)) << 32,   # a stale reply of another run is ignored
                         encode_ahead=ENCODE_AHEAD, on_reply=self.keep)
        self.model = model
        self.version = np.full(n, -1, dtype=np.int64)
        self.broker_ms = np.full(n, np.nan)
        self.wait_ms = np.full(n, np.nan)
        self.service_ms = np.full(n, np.nan)
        self.codes = collections.Counter()
        self.phase = "warm-up"

    def keep(self, i, h, frames):
        if h.get("status") != "ok":
            self.codes[h.get("code", "?")] += 1
            return
        v = (h.get("model_versions") or {}).get(self.model)
        if v is not None:
            self.version[i] = int(v)
        tm = h.get("timings_us") or {}
        if "total" in tm:
            self.broker_ms[i] = tm["total"] / 1000.0
            self.wait_ms[i] = sum(x for key, x in tm.items() if key.startswith("wait_")) / 1000.0
            self.service_ms[i] = sum(x for key, x in tm.items()
                                     if key != "total" and not key.startswith("wait_")) / 1000.0

    def progress_line(self, now):
        st = self.status[:self.sent]
        return (f"t {now - self.t0:6.1f} s  {self.phase:<34} sent {self.sent:>6}  ok {int((st == OK).sum()):>6}  "
                f"errors {int((st == ERROR).sum())}  lost {int((st == LOST).sum())}")


# ----------------------------------------------------------------------------
# The reloads, in a thread beside the load


class ReloadDriver(threading.Thread):
    """Publishes the staged versions one after another and times each switch through the control socket.

    A reload is complete when the new version serves and the old one is
    ``standby`` (released). On any failure or timeout the load is stopped
    (``loop.stop()``) and ``error`` says why; ``cancel`` stops the
    driver (the load loop failed or was interrupted).
    """

    def __init__(self, loop, run_dir, models_dir, model, serving, staged, first_publish_at, *, gap_s, after_s,
                 reload_timeout_s, sampler=None, max_other_cores=None, settle_s=0.0):
        super().__init__(name="reload-driver", daemon=True)
        self.loop = loop
        self.run_dir = run_dir
        self.models_dir = models_dir
        self.model = model
        self.serving = serving
        self.staged = list(staged)          # [(version, staged path)]
        self.first_publish_at = first_publish_at
        self.gap_s = gap_s
        self.after_s = after_s
        self.reload_timeout_s = reload_timeout_s
        self.sampler = sampler
        self.max_other_cores = max_other_cores
        self.settle_s = settle_s
        self.reloads = []
        self.error = None
        self.cancel = threading.Event()

    def run(self):
        try:
            self.drive()
        except Exception as e:   # any failure ends the load: never leave it running on its own
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, ReloadFailed) else str(e)
            self.loop.stop()
            self.loop.phase = "stopped: " + self.error[:60]

    def wait_for_quiet(self, n):
        """With ``max_other_cores``: wait (at most ``settle_s``) until the other load of the last second is
        below it. Returns the seconds waited, or None when cancelled."""
        if self.max_other_cores is None or self.sampler is None:
            return 0.0
        t = time.monotonic()
        while time.monotonic() - t < self.settle_s:
            now = time.monotonic()
            other = self.sampler.other_cores(now - 1.0, now)
            if other is not None and other <= self.max_other_cores:
                break
            self.loop.phase = f"reload {n}: waiting, other load {other} cores"
            if self.cancel.wait(0.5):
                return None
        return round(time.monotonic() - t, 1)

    def versions(self):
        try:
            summary = control.call(self.run_dir, "models", timeout_s=5.0)
        except (ConnectionError, control.ControlError) as e:
            raise ReloadFailed(f"jizhid stopped answering on its control socket: {e}") from e
        return {v["version"]: v for v in summary[self.model]["versions"]}

    def drive(self):
        from jizhi.tools.demo import publish     # (onnx: imported by the command that runs, not by jizhictl's start)
        t_next = self.first_publish_at
        old = self.serving
        for n, (version, staged) in enumerate(self.staged, 1):
            if self.cancel.wait(max(0.0, t_next - time.monotonic())):
                return
            # The steady window (before the first publish) must stay as long as asked: only later
            # reloads wait for a quiet machine.
            waited = self.wait_for_quiet(n) if n > 1 else 0.0
            if waited is None:
                return
            self.loop.phase = f"reload {n}: v{old} -> v{version} published"
            publish(staged, self.models_dir)
            t_rename = time.monotonic()
            rec = {"reload": n, "from": old, "to": version, "t_rename": t_rename, "t_rename_wall": time.time(),
                   "quiet_wait_s": waited,
                   "t_serving_seen": None, "t_released": None, "states_seen": []}
            self.reloads.append(rec)
            end = t_rename + self.reload_timeout_s
            while True:
                if self.cancel.wait(POLL_S):
                    return
                now = time.monotonic()
                vs = self.versions()
                new, prev = vs.get(version), vs.get(old)
                state = new["state"] if new else "not seen"
                if not rec["states_seen"] or rec["states_seen"][-1][1] != state:
                    rec["states_seen"].append((round(now - t_rename, 3), state))
                    self.loop.phase = f"reload {n}: v{old} -> v{version} {state}"
                if state in NOT_SERVABLE:
                    raise ReloadFailed(f"reload {n}: version {version} {state}: {new.get('error')}")
                if state == "serving" and rec["t_serving_seen"] is None:
                    rec["t_serving_seen"] = now
                if state == "serving" and prev is not None and prev["state"] == "standby":
                    rec["t_released"] = now
                    rec["server"] = new
                    break
                if now > end:
                    raise ReloadFailed(f"reload {n}: version {version} not serving with version {old} released "
                                       f"within {self.reload_timeout_s:g} s (new: {state}, old: "
                                       f"{prev['state'] if prev else 'gone'})")
            self.loop.phase = f"reload {n}: v{version} serving, v{old} released"
            old = version
            t_next = rec["t_released"] + RELEASE_TAIL_S + self.gap_s
        self.loop.phase = f"after: v{old} serving"
        self.loop.stop(at=self.reloads[-1]["t_released"] + self.after_s)


# ----------------------------------------------------------------------------
# The command


def _next_version(models_dir, model):
    base = Path(models_dir) / model
    have = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(have, default=0) + 1


@click.command("bench-reload", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default="tcp://127.0.0.1:5555", show_default=True, help="jizhid's client endpoint.")
@click.option("--run-dir", type=click.Path(file_okay=False), required=True,
              help="jizhid's run directory (control socket: version states, the supervisor's pid).")
@click.option("--models", "models_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="The model directory jizhid watches; new versions are published into it.")
@click.option("--pipeline", default="default", show_default=True, help="Pipeline to load.")
@trace_options("Bundle version directory to generate a trace from (with --requests).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Offered load, requests/s: about 50 % of the rate `jizhictl bench --find-max` sustains.")
@click.option("--steady", "steady_s", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="Seconds of steady load measured before the first publish (after 3 s not counted).")
@click.option("--after", "after_s", type=click.FloatRange(min=2), default=10.0, show_default=True,
              help="Seconds of load after the last old version is released.")
@click.option("--reloads", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Versions published in a row, each after the previous switch completed and its old version "
                   "was released, plus --gap.")
@click.option("--gap", "gap_s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Settle seconds between a switch window's end and the next publish.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Arrivals and the new versions' dense weights (version N gets seed + N).")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Deadline sent with every request; no reply within deadline + 1 s counts as lost.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--reload-timeout", "reload_timeout_s", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Longest wait, per reload, for the new version to serve and the old to be released.")
@click.option("--sample-interval-s", type=click.FloatRange(min=0.01), default=0.1, show_default=True,
              help="Memory sampler period (RSS, CPU, /dev/shm).")
@click.option("--pss-interval-s", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Read PSS (smaps_rollup, 5-8 ms of CPU per process) this often; 0: never.")
@click.option("--max-other-cores", type=click.FloatRange(min=0), default=None,
              help="A shared machine: before the load starts, wait until other processes use at most this many "
                   "cores (at most --settle-s). Every window reports the other load it ran with.")
@click.option("--settle-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="--max-other-cores: longest wait for a quiet machine.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the results as JSON to this file ('-': stdout, the table then goes to stderr).")
@click.option("--quiet", is_flag=True, help="No progress line on stderr.")
def bench_reload_command(endpoint, run_dir, models_dir, pipeline, trace_path, bundle, requests, candidates, rate,
                         steady_s, after_s, reloads, gap_s, seed, deadline_ms, top_k, reload_timeout_s,
                         sample_interval_s, pss_interval_s, max_other_cores, settle_s, json_path, quiet):
    """Measure hot reload under load: p99 while new versions are switched in against steady p99, and the extra memory.

    Open-loop Poisson load at --rate (use about half the rate `jizhictl bench
    --find-max` sustains) for 3 s + --steady s, then --reloads new versions
    of the served demo model, each staged beforehand (a copy with new dense
    weights in MODELS/.incoming) and published by one rename once the
    previous old version was released. The switch window of a reload runs
    from the rename to 1 s after the old version is released (standby).
    Memory (RSS, PSS, /dev/shm) of jizhid and every child is sampled
    throughout. Example:

    \b
      jizhictl bench-reload --endpoint tcp://127.0.0.1:5601 --run-dir /tmp/rb/run \\
          --models /tmp/rb/models --trace trace.npz --rate 160 --json reload.json
    """
    from jizhi.tools.demo import stage_version     # (onnx: imported by the command that runs)

    check_trace_args(trace_path, bundle, requests)
    out = (lambda s: click.echo(s, err=True)) if json_path == "-" else click.echo
    note = (lambda s: click.echo(s, err=True))

    # -- the daemon, its model and its processes
    try:
        status = control.call(run_dir, "status", timeout_s=5.0)
        summary = control.call(run_dir, "models", timeout_s=5.0)
    except ConnectionError as e:
        note(f"jizhictl bench-reload: jizhid is not answering on its control socket in {run_dir} ({e}); "
             "is it running, and is this its --run-dir?")
        sys.exit(1)
    try:
        with Client(endpoint, timeout_s=5.0) as c:
            info = c.info()
    except TimeoutError:
        note(f"jizhictl bench-reload: no answer from {endpoint} within 5 s: is this jizhid's frontend?")
        sys.exit(1)
    pipe = info["default_pipeline"] if pipeline == "default" else pipeline
    if pipe not in info["pipelines"]:
        raise click.UsageError(f"pipeline {pipeline!r} is not served (served: {', '.join(info['pipelines'])})")
    if not info.get("ready"):
        raise click.ClickException("jizhid is not ready (some pool has no worker)")
    if len(summary) != 1:
        raise click.ClickException(f"jizhid serves models {', '.join(summary)}: bench-reload drives one model")
    model, m = next(iter(summary.items()))
    if not m["policy"].startswith("latest"):
        raise click.ClickException(f"model {model} is {m['policy']} ({m['policy_from']}): a new version would not "
                                   "be switched in (jizhictl unpin)")
    serving = [v for v in m["versions"] if v["state"] == "serving"]
    busy = [v for v in m["versions"] if v["state"] in (VersionState.AVAILABLE.value, VersionState.VALIDATING.value,
                                                        VersionState.VALID.value, VersionState.LOADING.value,
                                                        VersionState.WARM.value, VersionState.DRAINING.value,
                                                        VersionState.STOPPING.value)]
    if len(serving) != 1 or busy:
        states = ", ".join(f"v{v['version']} {v['state']}" for v in m["versions"])
        raise click.ClickException(f"model {model} is mid-reload ({states}); wait until one version serves")
    serving = serving[0]
    source = Path(serving["path"])
    if source.resolve().parent.parent != Path(models_dir).resolve():
        raise click.UsageError(f"jizhid serves {source}, which is not in --models {models_dir}")
    instance, sup_pid = status["instance"], status["pid"]

    staged = []
    with trace_file(trace_path, bundle, requests, candidates, progress=not quiet) as trace_path:
        try:
            trace = Trace(trace_path)
            env = environment()
            # -- stage every version before the load (copy + sha256 of ~66 MB each)
            first_version = _next_version(models_dir, model)
            for k in range(reloads):
                v = first_version + k
                t = time.monotonic()
                staged.append((v, stage_version(models_dir, source, v, seed=seed + v)))
                note(f"staged {model} version {v} from version {serving['version']} (dense weights seed {seed + v}) "
                     f"in {time.monotonic() - t:.1f} s")
            horizon_s = (WARMUP_S + steady_s + after_s + 10.0
                         + reloads * (reload_timeout_s + RELEASE_TAIL_S + gap_s
                                      + (settle_s if max_other_cores is not None else 0)))
            sock = load_socket(endpoint)
            loop = ReloadLoad(sock, trace, pipeline=pipe, model=model, rate=rate, seed=seed, horizon_s=horizon_s,
                              deadline_ms=deadline_ms, top_k=top_k)
            expected = rate * (WARMUP_S + steady_s + reloads * (10.0 + RELEASE_TAIL_S + gap_s) + after_s)
            if expected > len(trace):
                note(f"note: the trace has {len(trace)} requests; about {expected:.0f} will be sent, "
                     "so requests repeat")
            # The steady window must not hold the boot's own loading work (the hot tier of the serving
            # version is built by a child after jizhid reports ready): wait until only the supervisor, the
            # broker and the serving version's workers run.
            idle_by = time.monotonic() + 120.0
            probe = MemorySampler(sup_pid, instance)
            while True:
                extra = probe.roles_now() - {"supervisor", "broker", f"workers v{serving['version']}"}
                if not extra:
                    break
                if time.monotonic() > idle_by:
                    raise click.ClickException(f"jizhid still runs {', '.join(sorted(extra))} after 120 s; "
                                               "start when it has finished loading")
                note(f"waiting for jizhid to finish its own loading work ({', '.join(sorted(extra))})")
                time.sleep(2.0)
            quiet_wait = None
            if max_other_cores is not None:
                quiet_wait = wait_for_quiet(max_other_cores, settle_s, ServerCpu(run_dir), note)
            sampler = MemorySampler(sup_pid, instance, sample_interval_s, pss_interval_s)
            t0 = time.monotonic() + 0.2
            driver = ReloadDriver(loop, run_dir, models_dir, model, serving["version"], staged,
                                  t0 + WARMUP_S + steady_s, gap_s=gap_s, after_s=after_s,
                                  reload_timeout_s=reload_timeout_s, sampler=sampler,
                                  max_other_cores=max_other_cores, settle_s=settle_s)
            note(f"load: {rate:g} req/s on {pipe}; steady {steady_s:g} s after {WARMUP_S:g} s, then {reloads} reloads "
                 f"(v{first_version}..v{first_version + reloads - 1}), {after_s:g} s after the last")
            progress = Progress(not quiet)
            if progress.enabled:
                loop.every(PROGRESS_INTERVAL_S, lambda now: progress.show(loop.progress_line(now), force=True))
            sampler.start()
            driver.start()
            try:
                loop.run(t0)
            finally:
                driver.cancel.set()
                loop.stop()
                driver.join(timeout=10.0)
                sampler.stop()
                sampler.join(timeout=10.0)
                sock.close(0)
                progress.show("", force=True)
                progress.done()
            conditions = {"environment": env, "command": sys.argv, "endpoint": endpoint, "pipeline": pipe,
                          "model": model,
                          "versions": [serving["version"]] + [v for v, _ in staged[:len(driver.reloads)]],
                          "rate": rate, "steady_s": steady_s, "warmup_s": WARMUP_S, "after_s": after_s,
                          "gap_s": gap_s, "reloads_asked": reloads, "seed": seed, "deadline_ms": deadline_ms,
                          "top_k": top_k, "trace": str(trace_path), "trace_requests": len(trace),
                          "candidates_mean": trace.mean_candidates(),
                          "distinct_requests": bool(int((loop.status != NOT_SENT).sum()) <= len(trace)),
                          "instance": instance, "supervisor_pid": sup_pid,
                          "sample_interval_s": sample_interval_s, "pss_interval_s": pss_interval_s,
                          "waited_for_quiet": quiet_wait}
            result = analyse(loop, sampler, driver, conditions)
        finally:
            for v, path in staged:
                if os.path.isdir(path):     # staged but never published (an early stop)
                    shutil.rmtree(path, ignore_errors=True)
    print_report(result, out)
    if json_path:
        text = json.dumps(result, indent=1)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")
            note(f"results written to {json_path}")
    if result["error"]:
        raise click.ClickException(f"the run did not complete: {result['error']}")


if __name__ == "__main__":
    bench_reload_command(prog_name="python -m jizhi.tools.reloadbench")
