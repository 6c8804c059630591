"""Load points and the ceiling: ``jizhictl bench`` (``bench_command``).

Runs in its own process (the operator's shell), never inside jizhid. Two
modes; the load is jizhi/tools/loadgen.py's generator, the ceiling
jizhi/tools/ceiling.py, the ``--find-max`` search, the table and the plot
jizhi/tools/sweep.py, the CPU figures jizhi/tools/procfs.py:

* **load** (default): replays a request trace (docs/formats.md, "Trace")
  against a running jizhid over one ZeroMQ DEALER socket, open loop (several
  comma-separated endpoints: the socket connects to each and ZeroMQ spreads
  the requests round-robin over the nodes connected; nothing is retried, a
  request sent to a node that dies is counted lost): the
  arrivals of a point are a Poisson process at the offered rate (a fixed
  number ``rate x duration`` of arrival times drawn uniformly over the
  window and sorted, i.e. a Poisson process conditioned on its count), all
  request frames are encoded before the point starts, and as many requests
  are in flight as the arrivals make. Latency is measured from each
  request's *intended* send time, so a generator or server that falls behind
  is charged for it (no coordinated omission). A point is ``--warmup``
  seconds of the same arrival process (not counted) followed by
  ``--duration`` seconds that are counted, then a drain: every measured
  request is answered, or counted *lost* when no reply came within its
  deadline + 1 s of being sent.
* **ceiling** (``--ceiling``): the same trace through the same bundle
  in-process, with nothing between the stages: the five stage processors of
  the demo pipeline run back to back in one process per core (spawned,
  pinned to its core, onnxruntime on one thread), with the profiles copied
  into RAM and the cube loaded whole into a ``RamTable``, closed loop. It is
  the machine's limit for the work (the same work minus LMDB, mmap, sockets
  and shared memory), the figure jizhi's throughput is compared to.

The benchmark rule (docs/benchmarks.md): each rate point runs at least 20 s
with zero errors, latency is measured from the intended send time, and the
trace is long enough that no request repeats within a point. The trace must
therefore hold at least ``rate x duration`` requests; the command refuses a
shorter one unless ``--allow-repeat``.

Definitions used in the output (per point, over the measured window):

* offered rate: requests sent per second (and candidate pairs per second);
* goodput: candidates that received a model score in OK replies, per second
  (``n x (1 - shed_ratio)`` per reply); ``in_slo_pairs_s`` counts only OK
  replies within ``--slo-ms``;
* latency p50 / p99 / p99.9 of OK replies, from the intended send time;
* errors by wire code, ``lost`` (no reply within deadline + 1 s), and the
  generator's send lag (how late it sent, a validity check);
* the mean of each ``timings_us`` key of the OK replies (stage service
  times, ``wait_<group>`` queue waits, ``total`` in the broker);
* with ``--cpu``: the CPU time of every process of the jizhid run (found in
  /proc by the run directory's plan file), per process kind, as ms per
  second and microseconds per answered request, and the generator's own;
  and the CPU account (jizhi/tools/account.py): each process kind's threads
  (main, ZeroMQ I/O, others) and its main thread by phase (the broker's
  admission, dispatch, done, reply, housekeeping; a worker's receive,
  assemble, each stage, write, done), us per answered request.

A point passes when p99 <= ``--slo-ms``, no error and nothing lost.
``--find-max`` doubles the rate from ``--start-rate`` until a point fails,
then bisects between the best pass and the first failure until they are
within ``--precision`` of each other; a point certain to fail (an error, or
more than 1 % of its requests over the SLO) stops early.

On a shared machine, ``--max-other-cores X`` waits before each point (at
most ``--settle-s``) until other processes use at most X cores (measured
from /proc/stat minus this generator and the jizhid run), and runs a point
that *failed* while other processes used more than X again (``--retries``
times); every point records ``other_cores``. The ceiling does the same and
keeps its fastest run.

``--plot FILE.png`` draws the load points (matplotlib, the ``plot`` extra:
``pip install 'jizhi[plot]'``): latency p50 / p99 / p99.9 with the SLO, and
goodput (OK replies/s) against the offered rate (``plot_sweep``).
"""
import collections
import json
import math
import os
import sys
import time

import click
import numpy as np

from jizhi.client import Client
from jizhi.config import default_run_dir
from jizhi.ctl.inputs import Trace, resolve_bundle
from jizhi.tools.ceiling import CeilingScorer, parse_modes, print_ceiling, run_ceiling_settled
from jizhi.tools.loadgen import (ERROR, LOST, NOT_SENT, OK, PENDING, PROGRESS_INTERVAL_S, OpenLoop, Progress,
                                 check_trace_args, drain_replies, load_socket, percentiles, trace_file, trace_options,
                                 uniform_times)
from jizhi.tools.account import Account
from jizhi.tools.procfs import ServerCpu, environment, machine_busy_s, proc_cpu_s, self_cpu_s, wait_for_quiet
from jizhi.tools.sweep import find_max, plot_sweep, print_detail, print_points

# What jizhictl, the tests and the docs' benchmark scripts import from here (some live in the modules above).
__all__ = ["bench_command", "LoadGenerator", "check_trace_length", "cpu_report", "resolve_bundle", "Trace",
           "load_socket", "drain_replies", "CeilingScorer", "ServerCpu", "environment", "machine_busy_s",
           "proc_cpu_s", "self_cpu_s", "wait_for_quiet"]

RULE_MIN_DURATION_S = 20.0
ID_BITS = 32                 # a request id is (point number << ID_BITS) | index within the point
EARLY_STOP_CHECK_S = 0.25    # how often a --find-max point checks whether it has failed for sure


def check_trace_length(trace, rate, duration_s, allow_repeat):
    """The benchmark rule: a point needs rate x duration distinct requests.
    Raises UsageError when ``trace`` is shorter (unless ``allow_repeat``)."""
    need = int(round(rate * duration_s))
    if need > len(trace) and not allow_repeat:
        raise click.UsageError(
            f"the trace has {len(trace)} requests, a point at {rate:g} requests/s for {duration_s:g} s "
            f"needs {need} distinct ones (the rule: no request repeats within a point). Use a longer "
            f"trace (--bundle DIR --requests {need}) or pass --allow-repeat.")


# ----------------------------------------------------------------------------
# A load point


class LoadGenerator:
    """Open-loop Poisson load on one pipeline of a jizhid, one point at a time.

    Owns one DEALER socket for its whole life; each point is a loadgen
    ``OpenLoop`` on it whose ids start at ``point number << ID_BITS``, so a
    late reply from an earlier point is recognised and ignored.
    """

    def __init__(self, endpoint, trace, *, deadline_ms, top_k, slo_ms, cpu=None, account=None, progress=True,
                 allow_repeat=False, max_other_cores=None, settle_s=60.0, retries=2, log=None):
        self.endpoint = endpoint
        self.trace = trace
        self.deadline_ms = deadline_ms
        self.top_k = top_k
        self.slo_ms = slo_ms
        self.cpu = cpu
        self.account = account      # jizhi/tools/account.py: the CPU by thread and phase (with cpu)
        self.progress = Progress(progress)
        self.allow_repeat = allow_repeat
        self.max_other_cores = max_other_cores
        self.settle_s = settle_s
        self.retries = retries
        self.log = log or (lambda text: None)
        self.cursor = 0
        self.point_no = 0
        self.sock = load_socket(endpoint)

    def close(self):
        self.sock.close(0)

    def check_rate(self, rate, duration_s):
        check_trace_length(self.trace, rate, duration_s, self.allow_repeat)

    def run_point_settled(self, pipeline, rate, duration_s, warmup_s, early_stop=False):
        """``run_point`` on a machine that is quiet enough: with
        ``max_other_cores`` set, wait for the other processes' load to drop
        below it first, and run a *failed* point again (``retries`` times)
        when other processes took more than that while it ran. A pass needs
        no second look: noise only makes a point slower."""
        earlier = []
        for attempt in range(self.retries + 1):
            quiet = None
            if self.max_other_cores is not None:
                quiet = wait_for_quiet(self.max_other_cores, self.settle_s, self.cpu, self.log)
            r = self.run_point(pipeline, rate, duration_s, warmup_s, early_stop=early_stop)
            other = r["cpu"]["foreign_cores"] if "cpu" in r else r["machine_busy_cores"]
            r["other_cores"] = other
            r["waited_for_quiet"] = quiet
            r["disturbed"] = self.max_other_cores is not None and other > self.max_other_cores
            r["earlier_attempts"] = earlier
            if r["pass"] or not r["disturbed"] or attempt == self.retries:
                return r
            self.log(f"  {rate:g} req/s failed while other processes used {other:.2f} cores: running it again")
            earlier.append({k: r[k] for k in ("offered_rps", "ok", "p99_ms", "errors", "lost", "aborted", "other_cores")})
        return r

    def run_point(self, pipeline, rate, duration_s, warmup_s, early_stop=False, label=""):
        """Run one point; return its result dict (see the module docstring)."""
        self.check_rate(rate, duration_s)
        self.point_no += 1
        q = len(self.trace)
        rng = np.random.default_rng([self.point_no, int(rate * 1000)])
        m = int(round(rate * duration_s))
        w = int(round(rate * warmup_s))
        times = np.concatenate([uniform_times(rng, w, -warmup_s, 0.0), uniform_times(rng, m, 0.0, duration_s)])
        total = w + m
        # Warm-up rows precede the measured rows in the trace; the measured
        # rows are distinct when m <= Q.
        rows = (self.cursor - w + np.arange(total)) % q
        start = self.cursor
        ncand = self.trace.counts[rows]
        scored = np.zeros(total, dtype=np.float64)
        codes = collections.Counter()
        tsum, tcnt = collections.defaultdict(float), collections.defaultdict(int)

        def keep(i, h, frames):
            if h.get("status") == "ok":
                scored[i] = round(ncand[i] * (1.0 - float(h.get("shed_ratio") or 0.0)))
                if i >= w:
                    for key, us in (h.get("timings_us") or {}).items():
                        tsum[key] += us
                        tcnt[key] += 1
            elif i >= w:
                codes[h.get("code", "?")] += 1

        load = OpenLoop(self.sock, self.trace, pipeline=pipeline, due=times, rows=rows, deadline_ms=self.deadline_ms,
                        top_k=self.top_k, id_base=self.point_no << ID_BITS, on_reply=keep)
        t0 = time.monotonic() + warmup_s + 0.05
        window = {}

        def cpu_now():
            """(ServerCpu's snapshot, the account's): one walk of /proc (the generator's loop waits for it)."""
            if self.account is not None:
                snap = self.account.snapshot()
                return Account.per_process(snap), snap
            return (self.cpu.snapshot() if self.cpu else {}), None

        def open_window(now):   # the measured window's CPU figures start at t0, on time
            server, account = cpu_now()
            window.update(server=server, generator=self_cpu_s(), machine=machine_busy_s(),
                          loadavg=os.getloadavg()[0], t=time.monotonic(), account=account)

        load.call_at(t0, open_window)
        aborted = False
        # np.percentile's p99 of m samples lies at or above the sample at
        # floor(0.99 (m - 1)): with this many over the SLO it is over the SLO.
        fail_at = max(1, m - math.floor(0.99 * (m - 1)))

        def check(now):
            # The point fails for sure once an error came back, or once so many requests are
            # over the SLO (answered, or still waiting past it) that the p99 of all m must be over it too.
            nonlocal aborted
            k = load.sent
            if aborted or k >= total:
                return
            st, due = load.status[w:k], load.due[w:k]
            over = int(((st == OK) & ((load.done_at[w:k] - due) * 1000.0 > self.slo_ms)).sum())
            waiting = int(((st == PENDING) & (now - due > self.slo_ms / 1000.0)).sum())
            if (st == ERROR).any() or over + waiting >= fail_at:
                aborted = True
                load.stop(at=now)

        if early_stop:
            load.every(EARLY_STOP_CHECK_S, check, start=t0)
        name = label or f"{pipeline} @ {rate:g}/s"

        def show(now):
            k, st = load.sent, load.status[w:]
            done_lat = load.latency_ms()[w:][st == OK]
            p99 = f"{np.percentile(done_lat, 99):.1f}" if done_lat.shape[0] else "-"
            el = now - t0
            self.progress.show(f"{name}: {'warmup' if el < 0 else f'{el:5.1f}/{duration_s:g}s'} "
                               f"sent {k - w if k > w else f'{k} (warm-up)'} answered {int((st == OK).sum())} "
                               f"errors {int((st == ERROR).sum())} p99 {p99} ms" + (" ABORTED" if aborted else ""),
                               force=True)

        if self.progress.enabled:
            load.every(PROGRESS_INTERVAL_S, show)
        load.run(t0)
        # The next point continues after the last request sent, not after the last one planned: a point that
        # stopped early would otherwise leave a gap in the trace (a cache sees its repeats of the gap miss).
        self.cursor = (start + max(0, load.sent - w)) % q
        if not window:  # an aborted point may end inside the warm-up: the window opens now
            window.update(server={}, generator=self_cpu_s(), machine=machine_busy_s(),
                          loadavg=os.getloadavg()[0], t=time.monotonic())
        cpu_after, account_after = cpu_now()
        if not window.get("account"):
            account_after = None
        gen_after = self_cpu_s()
        mach_after = machine_busy_s()
        cpu_wall_s = time.monotonic() - window["t"]
        self.progress.show("", force=True)
        self.progress.done()

        meas = slice(w, total)
        st = load.status[meas]
        ok = st == OK
        lat = load.latency_ms()[meas][ok]
        n_ok = int(ok.sum())
        n_sent = int((st != NOT_SENT).sum())
        lost = int((st == LOST).sum())
        sent_lag = (load.sent_at[meas] - load.due[meas])[st != NOT_SENT] * 1000.0
        mach_before = window["machine"]
        res = {
            "pipeline": pipeline, "offered_rps": round(m / duration_s, 3),
            "offered_pairs_s": round(float(ncand[meas].sum()) / duration_s, 1),
            "duration_s": duration_s, "warmup_s": warmup_s, "requests": m, "sent": n_sent,
            "ok": n_ok, "ok_rps": round(n_ok / duration_s, 3),
            "goodput_pairs_s": round(float(scored[meas][ok].sum()) / duration_s, 1),
            "in_slo_pairs_s": round(float(scored[meas][ok][lat <= self.slo_ms].sum()) / duration_s, 1),
            **percentiles(lat),
            "errors": dict(codes), "lost": lost, "aborted": aborted,
            "send_lag_p99_ms": round(float(np.percentile(sent_lag, 99)), 3) if sent_lag.shape[0] else None,
            "timings_us": {key: round(tsum[key] / tcnt[key], 1) for key in sorted(tsum)},
            "distinct_requests": m <= q,
            "machine_busy_cores": round((mach_after[0] - mach_before[0]) / max(mach_after[1] - mach_before[1], 1e-9)
                                        * (os.cpu_count() or 1), 2),
            "loadavg_1m": [round(window["loadavg"], 2), round(os.getloadavg()[0], 2)],
            "meets_rule": bool(duration_s >= RULE_MIN_DURATION_S and m <= q and not codes and not lost),
        }
        res["pass"] = bool(not aborted and not codes and lost == 0 and n_ok == m
                           and res["p99_ms"] is not None and res["p99_ms"] <= self.slo_ms)
        if self.cpu is not None:
            res["cpu"] = cpu_report(ServerCpu.delta(window["server"], cpu_after), gen_after - window["generator"],
                                    cpu_wall_s, n_ok, pipeline)
            # CPU the machine spent on anything but this server and this generator.
            res["cpu"]["foreign_cores"] = round(max(0.0, res["machine_busy_cores"] - res["cpu"]["cores_busy"]), 2)
            if account_after is not None:
                res["cpu"]["account"] = self.account.report(window["account"], account_after, n_ok)
        return res


def cpu_report(by_kind, generator_s, wall_s, answered, pipeline):
    """CPU per process kind: ms per second of wall time and us per answered request."""
    per = max(answered, 1)
    kinds = {}
    server = 0.0
    for kind in sorted(by_kind):
        s = by_kind[kind]
        server += s
        kinds[kind] = {"ms_per_s": round(s * 1000.0 / wall_s, 1), "us_per_request": round(s * 1e6 / per, 1)}
    own = sum(s for kind, s in by_kind.items()
              if kind in ("broker", "supervisor") or kind.startswith(pipeline + "/"))
    return {"wall_s": round(wall_s, 3), "kinds": kinds,
            "server_us_per_request": round(server * 1e6 / per, 1),
            "pipeline_us_per_request": round(own * 1e6 / per, 1),
            "generator_ms_per_s": round(generator_s * 1000.0 / wall_s, 1),
            "generator_us_per_request": round(generator_s * 1e6 / per, 1),
            "total_us_per_request": round((server + generator_s) * 1e6 / per, 1),
            "cores_busy": round((server + generator_s) / wall_s, 2)}


# ----------------------------------------------------------------------------
# The command


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default="tcp://127.0.0.1:5555", show_default=True,
              help="jizhid's client endpoint; several comma-separated: requests spread round-robin over the "
                   "nodes connected, no retry (a request sent to a node that dies counts as lost).")
@click.option("--pipeline", default="default", show_default=True,
              help="Pipeline to load; a comma-separated list runs each in turn.")
@trace_options("Bundle version directory: generates the trace (with --requests) and is what --ceiling scores.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Offered load, requests/s (one point).")
@click.option("--rates", help="A sweep: comma-separated requests/s.")
@click.option("--find-max", is_flag=True, help="Search the highest rate with p99 <= --slo-ms and no errors.")
@click.option("--start-rate", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="--find-max: first rate tried (doubled until a point fails).")
@click.option("--precision", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="--find-max: stop bisecting when the gap is below this fraction of the best pass.")
@click.option("--max-points", type=click.IntRange(1), default=10, show_default=True,
              help="--find-max: most points per pipeline.")
@click.option("--slo-ms", type=float, default=50.0, show_default=True, help="Latency objective (p99) of a passing point.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Seconds measured per point (the rule: at least 20).")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds of load before each point, not counted.")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Deadline sent with every request; no reply within deadline + 1 s counts as lost.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--allow-repeat", is_flag=True, help="Allow a trace shorter than rate x duration (requests repeat).")
@click.option("--cpu", is_flag=True, help="Measure the CPU of jizhid's processes (found through --run-dir): per "
              "process kind, and the account per answered request by thread and phase (broker: admission, "
              "dispatch, done, reply; workers: receive, assemble, each stage, write, done).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="--cpu: jizhid's run directory (default: server.run_dir's default for instance 'default').")
@click.option("--ceiling", is_flag=True, help="Run the in-process ceiling instead of loading a server (needs --bundle).")
@click.option("--batch", "ceiling_batch", type=click.IntRange(1), default=1, show_default=True,
              help="--ceiling: requests scored per call.")
@click.option("--ceiling-mode", "ceiling_mode", metavar="MODES",
              help="--ceiling: the pipelines to measure the model in, comma-separated, each in turn: per_pair "
                   "(structured = false: every stage per pair, as a generic server), structured (the user part "
                   "once per request), items (structured + the item part once per version: the cube's item_rows, the dnn's "
                   "item_cache). Default: structured.")
@click.option("--max-other-cores", type=click.FloatRange(min=0), default=None,
              help="A shared machine: before each point wait until other processes use at most this many cores, "
                   "and run a failed point again when they used more while it ran.")
@click.option("--settle-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="--max-other-cores: longest wait for a quiet machine before a point.")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="--max-other-cores: how often a disturbed, failed point is run again.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw latency p50/p99/p99.9 and goodput against offered load (PNG; needs "
                   "pip install 'jizhi[plot]').")
@click.option("--quiet", is_flag=True, help="No progress line on stderr.")
def bench_command(endpoint, pipeline, trace_path, bundle, requests, candidates, rate, rates, find_max,
                  start_rate, precision, max_points, slo_ms, duration_s, warmup_s, deadline_ms, top_k,
                  allow_repeat, cpu, run_dir, ceiling, ceiling_batch, ceiling_mode, max_other_cores, settle_s,
                  retries, json_path, plot_path, quiet):
    """Measure throughput and latency: open-loop Poisson load on a running
    jizhid (--rate, --rates or --find-max), or the in-process ceiling
    (--ceiling).

    Every point: --warmup s of load, then --duration s measured, latency from
    each request's intended send time. A point passes with p99 <= --slo-ms,
    no error and nothing lost. Goodput counts the candidates that received a
    model score in OK replies. Examples:

    \b
      jizhictl bench --trace trace.npz --rate 200
      jizhictl bench --trace trace.npz --find-max --pipeline demo,legacy --cpu --run-dir /run/jizhi
      jizhictl bench --trace trace.npz --rates 100,200,300 --plot sweep.png
      jizhictl bench --ceiling --bundle models/demo/1 --trace trace.npz
      jizhictl bench --ceiling --ceiling-mode per_pair,structured,items --bundle models/demo/1 --trace trace.npz
    """
    modes = sum([rate is not None, rates is not None, find_max])
    if ceiling and modes:
        raise click.UsageError("--ceiling runs closed loop: it takes no --rate, --rates or --find-max")
    if not ceiling and modes != 1:
        raise click.UsageError("give exactly one of --rate, --rates, --find-max (or --ceiling)")
    if ceiling and not bundle:
        raise click.UsageError("--ceiling needs --bundle (the version directory it scores)")
    if ceiling_mode is not None and not ceiling:
        raise click.UsageError("--ceiling-mode goes with --ceiling")
    try:
        ceiling_modes = parse_modes(ceiling_mode or "structured")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--ceiling-mode")
    check_trace_args(trace_path, bundle, requests)
    if plot_path and ceiling:
        raise click.UsageError("--plot draws load points (--rate, --rates or --find-max), not --ceiling")
    if plot_path:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:   # said now, not after the points ran
            raise click.ClickException("--plot needs matplotlib: pip install 'jizhi[plot]'")
    if duration_s < RULE_MIN_DURATION_S:
        click.echo(f"note: points of {duration_s:g} s are shorter than the rule's {RULE_MIN_DURATION_S:g} s", err=True)
    version_dir = resolve_bundle(bundle) if bundle else None
    with trace_file(trace_path, bundle, requests, candidates, progress=not quiet) as trace_path:
        result = {"environment": environment(), "command": sys.argv, "trace": str(trace_path)}
        if ceiling:
            click.echo(f"ceiling: {version_dir}, {len(os.sched_getaffinity(0))} cores, {duration_s:g} s "
                       f"after {warmup_s:g} s warm-up, mode {', '.join(ceiling_modes)}", err=True)
            ceilings = []
            for mode in ceiling_modes:
                c = run_ceiling_settled(version_dir, trace_path, max_other_cores=max_other_cores, settle_s=settle_s,
                                        retries=retries, log=lambda t: click.echo(t, err=True),
                                        duration_s=duration_s, warmup_s=warmup_s, top_k=top_k,
                                        batch_size=ceiling_batch, mode=mode)
                ceilings.append(c)
                print_ceiling(c, click.echo)
            # One mode: the shape scripts read since before modes; several: a list, in the order asked.
            if len(ceilings) == 1:
                result["ceiling"] = ceilings[0]
            else:
                result["ceilings"] = ceilings
        else:
            result["runs"] = _load(endpoint, pipeline, trace_path, rate, rates, find_max, start_rate, precision,
                                   max_points, slo_ms, duration_s, warmup_s, deadline_ms, top_k, allow_repeat,
                                   cpu, run_dir, quiet, max_other_cores, settle_s, retries)
            if plot_path:
                pts = [r for run in result["runs"] for r in run["points"]]
                ncand = sum(r["offered_pairs_s"] for r in pts) / max(sum(r["offered_rps"] for r in pts), 1e-9)
                plot_sweep(result["runs"], plot_path, slo_ms,
                           f"jizhictl bench: {', '.join(run['pipeline'] for run in result['runs'])}, "
                           f"{ncand:.0f} candidates/request, {duration_s:g} s per point, "
                           f"{result['environment']['cpus']} CPUs")
                click.echo(f"plot written to {plot_path}", err=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
            click.echo(f"results written to {json_path}", err=True)


def _load(endpoint, pipeline, trace_path, rate, rates, find_max_flag, start_rate, precision, max_points, slo_ms,
          duration_s, warmup_s, deadline_ms, top_k, allow_repeat, cpu, run_dir, quiet, max_other_cores, settle_s,
          retries):
    trace = Trace(trace_path)
    todo = []
    if not find_max_flag:
        todo = [rate] if rate is not None else [float(x) for x in rates.split(",") if x.strip()]
        if not todo or min(todo) <= 0:
            raise click.BadParameter("rates must be positive numbers", param_hint="--rates")
        for r in todo:
            check_trace_length(trace, r, duration_s, allow_repeat)
    infos = {}
    for one in (e.strip() for e in endpoint.split(",") if e.strip()):
        try:
            with Client(one, timeout_s=5.0) as c:
                infos[one] = c.info()
        except TimeoutError:
            click.echo(f"jizhictl bench: no answer from {one} within 5 s: is jizhid running, and is this its "
                       f"frontend (server.frontend)?", err=True)
            sys.exit(1)
    names = []
    for name in (p.strip() for p in pipeline.split(",") if p.strip()):
        for one, info in infos.items():
            # "default" is resolved here so the CPU of its groups is attributed to it.
            real = info["default_pipeline"] if name == "default" else name
            if real not in info["pipelines"]:
                raise click.UsageError(f"pipeline {name!r} is not served by {one} "
                                       f"(served: {', '.join(info['pipelines'])})")
        names.append(real)
    if not all(info.get("ready") for info in infos.values()):
        click.echo("warning: jizhid says it is not ready yet (some pool has no worker)", err=True)
    server_cpu = account = None
    if cpu:
        run_dir = run_dir or default_run_dir("default")
        server_cpu = ServerCpu(run_dir)
        found = server_cpu.processes()
        if not found:
            raise click.UsageError(f"--cpu: no process of a jizhid run found for run dir {run_dir} "
                                   f"(looked for --plan {server_cpu.plan} in /proc/*/cmdline)")
        account = Account(run_dir)
        click.echo(f"cpu: {len(found)} processes of the run in {run_dir}", err=True)
    gen = LoadGenerator(endpoint, trace, deadline_ms=deadline_ms, top_k=top_k, slo_ms=slo_ms, cpu=server_cpu, account=account,
                        progress=not quiet, allow_repeat=allow_repeat, max_other_cores=max_other_cores,
                        settle_s=settle_s, retries=retries, log=lambda t: click.echo(t, err=True))
    runs = []
    try:
        for name in names:
            click.echo(f"== {name}: trace {len(trace)} requests x {trace.mean_candidates():.0f} candidates, "
                       f"{duration_s:g} s per point, SLO p99 <= {slo_ms:g} ms", err=True)
            if find_max_flag:
                cap = len(trace) / duration_s if not allow_repeat else float("inf")
                points, best, note = find_max(
                    lambda r: gen.run_point_settled(name, r, duration_s, warmup_s, early_stop=True),
                    start_rate, cap, precision, max_points, log=lambda s: click.echo(s, err=True))
                run = {"pipeline": name, "points": points, "max": best, "note": note}
            else:
                points = [gen.run_point_settled(name, r, duration_s, warmup_s) for r in todo]
                run = {"pipeline": name, "points": points}
            runs.append(run)
            click.echo("")
            print_points(points, click.echo)
            detail = run.get("max") if find_max_flag else None
            for p in ([detail] if detail else points):
                print_detail(p, click.echo)
            if find_max_flag:
                if run["max"]:
                    click.echo(f"  max: {run['max']['offered_rps']:g} requests/s = "
                               f"{run['max']['goodput_pairs_s']:,.0f} pairs/s at p99 {run['max']['p99_ms']} ms"
                               + (f" ({note})" if note else ""))
                else:
                    click.echo(f"  max: no passing point ({note or 'every point failed'})")
    finally:
        gen.close()
    return runs


if __name__ == "__main__":
    bench_command(prog_name="python -m jizhi.tools.bench")
