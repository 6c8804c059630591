"""The broker micro-benchmark: ``python -m jizhi.tools.microbench``.

Measures what routing costs, with stages that do no work: events routed per
second and CPU per stage hop, with the workers' prefetch window at 1 against
the default (and above), and with micro-batching on and off.

Runs in the operator's shell. For every ``--prefetch`` value it starts one
jizhid (a fresh interpreter, its own session, tcp frontend on a free
loopback port, run directory and shared memory named for this run) serving
one pipeline per ``--batch`` value: a chain of ``--hops`` stages, each its
own worker process (unfused), ``K - 1`` ``Passthrough`` stages and a
``Noop`` sink (workers/noop.py), every stage with that batch size. The model
is a small demo bundle (500 users, 5000 items) made in a temporary
directory; requests carry ``--candidates`` candidates.

Each configuration is driven closed loop by one DEALER keeping ``--in-flight``
requests outstanding (a reply sends the next request) for ``--duration``
seconds after a one-second warm-up. Reported per configuration:

* requests/s answered, and stage hops/s = requests/s x hops (a hop is one
  broker -> worker -> broker round trip of one request);
* events/s: events the broker dispatched to workers (its own counters,
  ``info`` -> ``pipelines.<p>.groups.<g>.events``), and requests per event
  (the micro-batch fill);
* CPU from /proc of the broker, the pipeline's workers and the supervisor,
  in microseconds per request hop (and the broker's alone per event), the
  load generator's own CPU, and "other load": cores the machine spent on
  anything else meanwhile (a shared machine's noise, from /proc/stat).

Every jizhid is stopped with SIGTERM (it drains and removes its shared
memory) before the next starts; the temporary directory is removed at the
end unless ``--keep-dir``.
"""
import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from jizhi import protocol, shm
from jizhi.tools.loadgen import drain_replies, load_socket
from jizhi.tools.procfs import ServerCpu, environment, machine_busy_s, self_cpu_s, wait_for_quiet
from jizhi.tools.testbed import free_port, jizhid_argv
from jizhi.client import Client

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def pipeline_toml(name, hops, batch):
    """A chain of ``hops`` unfused stages: Passthrough x (hops - 1), then Noop."""
    lines = [f'name = "{name}"', 'model = "demo"', 'version = "latest"', ""]
    for i in range(1, hops):
        nxt = f"hop{i + 1}" if i + 1 < hops else "sink"
        lines += ["[[stage]]", f'name = "hop{i}"', 'processor = "jizhi.workers.noop:Passthrough"',
                  f'next = ["{nxt}"]', f'column = "hop_{i}"']
        if i > 1:
            lines.append(f'input = "hop_{i - 1}"')
        lines += [f"batch = {batch}", ""]
    lines += ["[[stage]]", 'name = "sink"', 'processor = "jizhi.workers.noop:Noop"', f"batch = {batch}", ""]
    return "\n".join(lines)


def config_toml(prefetch, in_flight, candidates):
    return (f"[workers]\nprefetch = {prefetch}\n\n[limits]\nmax_in_flight = {max(in_flight * 2, 64)}\n"
            f"max_candidates = {max(candidates, 16)}\n")


class Daemon:
    """One jizhid started by this benchmark (its own session, so it is
    stopped by its pid and nothing else is touched)."""

    def __init__(self, models, pipelines, config, run_dir, instance, log_path):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.run_dir = str(run_dir)
        self.instance = instance
        self.argv = jizhid_argv() + ["--models", str(models), "--instance", instance, "--frontend", self.endpoint,
                            "--pipelines", ",".join(str(p) for p in pipelines), "--run-dir", self.run_dir,
                            "--config", str(config)]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s=READY_TIMEOUT_S):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jizhid exited with code {self.proc.returncode} before it was ready "
                                   f"(log: {self.log.name})")
            try:
                with Client(self.endpoint, timeout_s=1.0) as c:
                    if c.info().get("ready"):
                        return
            except TimeoutError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"jizhid not ready within {timeout_s:g} s (log: {self.log.name})")

    def info(self):
        with Client(self.endpoint, timeout_s=5.0) as c:
            return c.info()

    def stop(self):
        """SIGTERM, wait for the drain; SIGKILL its process group only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shm.remove_instance(self.instance)  # only after a crash is there anything left
        self.log.close()
        return self.proc.returncode


def drive(endpoint, frames, in_flight, warmup_s, duration_s, on_measure_start, on_measure_end):
    """Closed loop: keep ``in_flight`` requests outstanding; returns the figures
    of the measured window. (Not loadgen's ``OpenLoop``, which sends on a clock:
    here a reply sends the next request, from frames encoded once and cycled, so
    the generator's CPU per request stays what it was; the socket and the reply
    reader are loadgen's.) ``frames`` is a list of pre-encoded requests whose
    ids are their positions; it is cycled, so it must be longer than
    ``in_flight`` (an id is never reused while outstanding)."""
    sock = load_socket(endpoint)
    nf = len(frames)
    sent_at = {}
    seq = 0

    def send():
        nonlocal seq
        j = seq % nf
        sock.send_multipart(frames[j])
        sent_at[j] = time.monotonic()
        seq += 1

    for _ in range(in_flight):
        send()
    t_start = time.monotonic()
    t_meas = t_start + warmup_s
    t_end = t_meas + duration_s
    measuring = False
    ok = 0
    codes = collections.Counter()
    lat = []
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        now = time.monotonic()
        if not measuring and now >= t_meas:
            measuring = True
            on_measure_start()
            t_meas = time.monotonic()
        if measuring and now >= t_end:
            break
        if not poller.poll(1000):
            continue
        for rid, h in drain_replies(sock):
            t0 = sent_at.pop(rid, None)
            if measuring and t0 is not None:
                if h.get("status") == "ok":
                    ok += 1
                    lat.append((time.monotonic() - t0) * 1000.0)
                else:
                    codes[h.get("code")] += 1
            send()
    wall = time.monotonic() - t_meas
    on_measure_end()
    # Collect what is still outstanding so the next configuration starts clean.
    end = time.monotonic() + 5.0
    while sent_at and time.monotonic() < end:
        if poller.poll(100):
            for rid, _ in drain_replies(sock):
                sent_at.pop(rid, None)
    sock.close(0)
    lat = np.array(lat) if lat else np.zeros(1)
    return {"wall_s": wall, "ok": ok, "errors": dict(codes),
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3)}


def measure(daemon, pipeline, hops, frames, args):
    cpu = ServerCpu(daemon.run_dir)
    marks = {}

    def start():
        marks["info0"] = daemon.info()
        marks["cpu0"] = cpu.snapshot()
        marks["gen0"] = self_cpu_s()
        marks["mach0"] = machine_busy_s()

    def end():
        marks["cpu1"] = cpu.snapshot()
        marks["gen1"] = self_cpu_s()
        marks["mach1"] = machine_busy_s()
        marks["info1"] = daemon.info()

    r = drive(daemon.endpoint, frames, args.in_flight, 1.0, args.duration, start, end)
    g0 = marks["info0"]["pipelines"][pipeline]["groups"]
    g1 = marks["info1"]["pipelines"][pipeline]["groups"]
    events = sum(g1[g]["events"] - g0[g]["events"] for g in g1)
    dispatched = sum(g1[g]["requests"] - g0[g]["requests"] for g in g1)
    by_kind = ServerCpu.delta(marks["cpu0"], marks["cpu1"])
    broker = by_kind.get("broker", 0.0)
    workers = sum(v for k, v in by_kind.items() if k.startswith(pipeline + "/"))
    other = sum(v for k, v in by_kind.items() if k != "broker" and not k.startswith(pipeline + "/"))
    wall = r["wall_s"]
    gen = marks["gen1"] - marks["gen0"]
    (b0, t0), (b1, t1) = marks["mach0"], marks["mach1"]
    machine = (b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1)
    req_hops = r["ok"] * hops
    per_hop = lambda s: round(s * 1e6 / max(req_hops, 1), 1)  # noqa: E731
    return {"rps": round(r["ok"] / wall, 1), "hops": hops, "hops_s": round(req_hops / wall, 1),
            "events_s": round(events / wall, 1), "requests_per_event": round(dispatched / max(events, 1), 2),
            "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"],
            "broker_us_per_hop": per_hop(broker), "workers_us_per_hop": per_hop(workers),
            "server_us_per_hop": per_hop(broker + workers + other),
            "broker_us_per_event": round(broker * 1e6 / max(events, 1), 1),
            "broker_cores": round(broker / wall, 2), "server_cores": round((broker + workers + other) / wall, 2),
            "generator_us_per_request": round(gen * 1e6 / max(r["ok"], 1), 1),
            "foreign_cores": round(max(0.0, machine - (broker + workers + other + gen) / wall), 2),
            "cpu_by_kind_ms_per_s": {k: round(v * 1000 / wall, 1) for k, v in sorted(by_kind.items())},
            "wall_s": round(wall, 2)}


def request_frames(version_dir, pipeline, candidates, count=4096):
    """``count`` pre-encoded requests (DEALER framing) with ids 0..count-1."""
    ids_u = np.load(Path(version_dir) / "profiles" / "users" / "ids.npy")
    ids_i = np.load(Path(version_dir) / "profiles" / "items" / "ids.npy")
    rng = np.random.default_rng(5)
    out = []
    for j in range(count):
        items = rng.choice(ids_i, size=candidates, replace=False)
        out.append([b""] + protocol.encode_request("score", id=j, pipeline=pipeline, user=int(ids_u[j % len(ids_u)]),
                                                   item_ids=items, top_k=min(10, candidates)))
    return out


def run(args):
    work = Path(tempfile.mkdtemp(prefix="jizhi-microbench-"))
    results = []
    try:
        from jizhi.tools.demo import init_demo
        print(f"microbench: demo bundle in {work}", file=sys.stderr)
        version_dir = init_demo(work / "demo", users=500, items=5000, progress=False)
        models = work / "demo" / "models"
        pipes = {}
        for b in args.batch:
            p = work / f"mb_b{b}.toml"
            p.write_text(pipeline_toml(f"mb_b{b}", args.hops, b))
            pipes[b] = p
        for pf in args.prefetch:
            cfg = work / f"prefetch{pf}.toml"
            cfg.write_text(config_toml(pf, args.in_flight, args.candidates))
            instance = f"mb{os.getpid()}p{pf}"
            d = Daemon(models, [pipes[b] for b in args.batch], cfg, work / f"run-p{pf}", instance,
                       work / f"jizhid-p{pf}.log")
            try:
                d.wait_ready()
                for b in args.batch:
                    name = f"mb_b{b}"
                    frames = request_frames(version_dir, name, args.candidates)
                    if args.max_other_cores is not None:
                        wait_for_quiet(args.max_other_cores, args.settle_s, ServerCpu(d.run_dir),
                                       lambda t: print("microbench:" + t, file=sys.stderr))
                    print(f"microbench: prefetch {pf}, batch {b}, {args.hops} hops, {args.in_flight} in flight, "
                          f"{args.duration:g} s ...", file=sys.stderr)
                    r = measure(d, name, args.hops, frames, args)
                    r.update(prefetch=pf, batch=b)
                    results.append(r)
                    print_row(r, header=len(results) == 1)
            finally:
                rc = d.stop()
                if rc != 0:
                    print(f"microbench: jizhid (prefetch {pf}) exited with code {rc}; log {d.log.name}",
                          file=sys.stderr)
        leftovers = [p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}mb{os.getpid()}p*")]
        if leftovers:
            print(f"microbench: shared memory left behind: {leftovers}", file=sys.stderr)
    finally:
        if args.keep_dir:
            print(f"microbench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def print_row(r, header=False):
    if header:
        print(f"{'prefetch':>8}{'batch':>6}{'hops':>5}{'req/s':>9}{'hops/s':>9}{'events/s':>10}{'req/event':>10}"
              f"{'p50 ms':>8}{'p99 ms':>8}{'broker us/hop':>15}{'workers us/hop':>16}{'server us/hop':>15}"
              f"{'broker us/event':>17}{'broker cores':>13}{'other load':>11}")
    print(f"{r['prefetch']:>8}{r['batch']:>6}{r['hops']:>5}{r['rps']:>9,.0f}{r['hops_s']:>9,.0f}{r['events_s']:>10,.0f}"
          f"{r['requests_per_event']:>10.2f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['broker_us_per_hop']:>15,.1f}"
          f"{r['workers_us_per_hop']:>16,.1f}{r['server_us_per_hop']:>15,.1f}{r['broker_us_per_event']:>17,.1f}"
          f"{r['broker_cores']:>13.2f}{r['foreign_cores']:>11.2f}" + (f"  errors {r['errors']}" if r["errors"] else ""), flush=True)


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m jizhi.tools.microbench",
        description="Broker micro-benchmark: events routed per second and CPU per stage hop through a chain of "
                    "no-op stages, for each prefetch window and micro-batch size. Starts and stops its own jizhid "
                    "per prefetch value (a demo bundle in a temporary directory).")
    ap.add_argument("--hops", type=int, default=4, help="stages in the chain (worker processes), the last a Noop sink "
                                                       "(default 4)")
    ap.add_argument("--prefetch", type=_ints, default=[1, 2, 4],
                    help="comma-separated workers.prefetch values, one jizhid each (default 1,2,4; 2 is jizhi's default)")
    ap.add_argument("--batch", type=_ints, default=[1, 8], help="comma-separated stage batch sizes (default 1,8)")
    ap.add_argument("--in-flight", type=int, default=64, help="requests kept outstanding (default 64)")
    ap.add_argument("--candidates", type=int, default=10, help="candidates per request (default 10)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per configuration (default 10)")
    ap.add_argument("--max-other-cores", type=float, default=None,
                    help="a shared machine: before each configuration wait until other processes use at most this "
                         "many cores")
    ap.add_argument("--settle-s", type=float, default=60.0, help="longest such wait (default 60)")
    ap.add_argument("--json", help="write the results (and the environment) to this file")
    ap.add_argument("--keep-dir", action="store_true", help="keep the temporary directory (bundle, pipelines, logs)")
    args = ap.parse_args(argv)
    if args.hops < 1 or args.in_flight < 1 or args.candidates < 1 or args.duration <= 0:
        ap.error("--hops, --in-flight, --candidates and --duration must be positive")
    env = environment()
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "command": sys.argv, "args": vars(args), "results": results}, f, indent=1)
        print(f"microbench: results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
