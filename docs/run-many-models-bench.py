#!/usr/bin/env python
"""Many models in one pipeline (issue 6): three heads as one multi-objective pipeline against the
same three models as three pipelines, and critical-path-first dispatch against FIFO.

    .venv/bin/python docs/run-many-models-bench.py [--rates 20,40] [--rounds 3] [--duration 20]

What it does (every figure from one run, on a quiet machine: nothing else running):

1. Models (under --work, made once): the demo (hard links of --base) and three head bundles on its
   features, ``ctr`` (top MLP 64), ``cvr`` (256-128) and ``dwell`` (512-256-128), by
   ``jizhi.tools.demo.write_head``.
2. Two daemons run side by side (the idle one costs nothing measurable):
   * ONE: pipeline ``mo``: reader, features, cube fused (``front``, pool 2, batch 8, wait 3 ms), the
     three heads each its own worker kind (pool 1), ``combine`` + ``rank`` fused (pool 1); and
     ``mo_fused``: the same DAG fused into one worker kind (pool 2, batch 8, wait 3 ms);
   * THREE: pipelines ``h_ctr``, ``h_cvr``, ``h_dwell``: each the demo pipeline fused into one worker
     kind (pool 1) whose model_inference runs that head.
   The same user requests (the trace, N candidates each) at the same rate: ONE gets one request per
   user request; THREE gets three (one per pipeline, sent at once), and a user request's latency is
   that of its slowest answer. Open loop (Poisson arrivals, latency from the intended send time).
   Per point: CPU-seconds of the daemon's processes per 1,000 user requests, p50/p99, errors.
   Points alternate ONE/THREE, --rounds times per rate; medians are quoted.
3. Critical-path-first against FIFO: two daemons serving ``mo``, ``broker.dispatch = "fifo"`` and
   ``"critical_path"``. The capacity of FIFO is found first (the highest rate with p99 <= --slo-ms,
   by doubling then bisection), then both run alternately at --near x that rate, --rounds times.

Writes --out (JSON) and prints the tables docs/benchmarks.md quotes.
"""
import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jizhi import protocol                                          # noqa: E402
from jizhi.tools.bench import ServerCpu, Trace                            # noqa: E402
from jizhi.client import wait_ready                                 # noqa: E402
from jizhi.tools.demo import write_head                                   # noqa: E402
from jizhi.pipeline import Pipeline                                 # noqa: E402

HEADS = {"ctr": (64,), "cvr": (256, 128), "dwell": (512, 256, 128)}


def multi_objective(fused=False):
    """The three heads after one shared front and combined: each head its own worker kind, or
    (``fused``) everything in one."""
    p = Pipeline("mo_fused" if fused else "mo", model="demo").front(next=list(HEADS))
    for h in HEADS:
        p.stage(h, "model_inference", next=["combine"], model=h, output=h)
    p.stage("combine", "combiner", next=["rank"], heads={"ctr": 1.0, "cvr": 0.5, "dwell": 0.2})
    p.stage("rank", "ranker")
    if fused:
        return p.fuse("scorer", ["reader", "features", "cube", *HEADS, "combine", "rank"], pool=2, batch=8,
                      batch_wait_ms=3).toml()
    return (p.fuse("front", ["reader", "features", "cube"], pool=2, batch=8, batch_wait_ms=3)
            .fuse("merge", ["combine", "rank"])).toml()


def single(head):
    """The demo pipeline, fused, its model_inference serving one head."""
    return (Pipeline(f"h_{head}", model="demo").front(next=["dnn"])
            .stage("dnn", "model_inference", next=["rank"], model=head)
            .stage("rank", "ranker")
            .fuse("scorer", ["reader", "features", "cube", "dnn", "rank"], pool=1, batch=8, batch_wait_ms=3)).toml()


class Daemon:
    def __init__(self, work, name, port, pipelines, config=""):
        self.run_dir = work / f"run-{name}"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        cfg = self.run_dir / "jizhi.toml"
        cfg.write_text('[metrics]\nlisten = ""\n' + config)
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.log = open(self.run_dir / "jizhid.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "jizhid"), "--models", str(work / "models"), "--instance", f"mm{name}",
             "--frontend", self.endpoint, "--pipelines", ",".join(str(p) for p in pipelines),
             "--run-dir", str(self.run_dir), "--config", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.instance = f"mm{name}"
        if not wait_ready(self.endpoint, timeout_s=180):
            self.stop()        # (nothing left behind: not a jizhid that never served, nor its segments)
            raise SystemExit(f"jizhid did not become ready; see {self.run_dir / 'jizhid.log'}")
        time.sleep(3.0)      # every pool full, hot tier built
        self.cpu = ServerCpu(self.run_dir)

    def ctl(self, *args):
        """Run ``jizhictl ARGS --run-dir`` against this daemon; its output (exits on an error)."""
        out = subprocess.run([str(Path(sys.executable).parent / "jizhictl"), *args, "--run-dir", str(self.run_dir)],
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise SystemExit(f"jizhictl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def stop(self):
        """SIGTERM, then nothing of this jizhid left: its process group (a session of its own) checked empty
        and its instance's /dev/shm segments checked gone (either said, then removed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        for _ in range(50):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            print(f"WARNING: processes of jizhid's group {self.proc.pid} still ran 5 s after it exited; killed",
                  flush=True)
            os.killpg(self.proc.pid, signal.SIGKILL)
        left = list(Path("/dev/shm").glob(f"jizhi.{self.instance}.*"))
        if left:
            print(f"WARNING: jizhid left {len(left)} segment(s) in /dev/shm "
                  f"({', '.join(p.name for p in left[:5])}); removed", flush=True)
            for p in left:
                p.unlink(missing_ok=True)


def run_point(daemon, pipelines, trace, rate, duration_s, warmup_s, seed, deadline_ms=1000):
    """Open-loop Poisson arrivals of user requests at ``rate``/s; each sends one request to every
    pipeline in ``pipelines`` at once. Returns latency percentiles (the slowest answer of a user
    request, from its intended send time), errors, and the daemon's CPU per 1,000 user requests."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    rng = np.random.default_rng(seed)
    m, w = int(round(rate * duration_s)), int(round(rate * warmup_s))
    times = np.concatenate([np.sort(rng.uniform(-warmup_s, 0, w)), np.sort(rng.uniform(0, duration_s, m))])
    total = w + m
    rows = (seed * 7919 + np.arange(total)) % len(trace)
    frames = []
    for i, r in enumerate(rows):
        a, b = trace.offsets[r], trace.offsets[r + 1]
        for j, p in enumerate(pipelines):
            frames.append((i, [b""] + protocol.encode_request(
                "score", id=i * len(pipelines) + j, pipeline=p, user=int(trace.users[r]), item_ids=trace.items[a:b],
                recall_scores=trace.recall[a:b], top_k=10, deadline_ms=deadline_ms)))
    waiting = np.full(total, len(pipelines))
    done_at = np.full(total, np.nan)
    errors = {}
    t0 = time.monotonic() + warmup_s + 0.05
    due = t0 + times
    k, cpu_before, t_cpu = 0, None, None
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    end_by = t0 + duration_s + deadline_ms / 1000 + 2
    while True:
        now = time.monotonic()
        while k < len(frames) and due[frames[k][0]] <= now:
            sock.send_multipart(frames[k][1])
            k += 1
        if cpu_before is None and now >= t0:
            cpu_before, t_cpu = daemon.cpu.snapshot(), now
        if k == len(frames) and (waiting[w:] == 0).all() or now > end_by:
            break
        timeout = max(0, math.ceil((due[frames[k][0]] - now) * 1000)) if k < len(frames) else 20
        if cpu_before is None:
            timeout = min(timeout, max(0, math.ceil((t0 - now) * 1000)))
        if poller.poll(timeout):
            while True:
                try:
                    fr = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                h = protocol.unpackb(fr[1])
                i = h["id"] // len(pipelines)
                waiting[i] -= 1
                if h.get("status") != "ok" and i >= w:
                    errors[h.get("code")] = errors.get(h.get("code"), 0) + 1
                if waiting[i] == 0:
                    done_at[i] = time.monotonic()
    cpu_after, t_end = daemon.cpu.snapshot(), time.monotonic()
    sock.close(0)
    by_kind = ServerCpu.delta(cpu_before, cpu_after)
    lat = (done_at[w:] - due[w:]) * 1000
    answered = int(np.isfinite(lat).sum())
    cpu_s = sum(by_kind.values())
    # CPU over the measured window, which also holds the drain of the last requests: per user request
    # answered in it.
    return {"rate": rate, "requests": m, "answered": answered, "errors": errors, "lost": m - answered,
            "p50_ms": round(float(np.nanpercentile(lat, 50)), 2), "p99_ms": round(float(np.nanpercentile(lat, 99)), 2),
            "cpu_s_per_1000": round(cpu_s / max(answered, 1) * 1000, 2),
            "cores_busy": round(cpu_s / (t_end - t_cpu), 3),
            "cpu_by_kind_ms_per_request": {k_: round(v / max(answered, 1) * 1000, 3) for k_, v in sorted(by_kind.items())}}


def find_capacity(daemon, pipelines, trace, slo_ms, start, duration_s, warmup_s, log):
    lo, hi, rate, seed = None, None, start, 1000
    while hi is None and rate < 5000:
        seed += 1
        r = run_point(daemon, pipelines, trace, rate, duration_s, warmup_s, seed)
        log(f"  capacity search {rate:g}/s: p99 {r['p99_ms']} ms errors {r['errors']} lost {r['lost']}")
        if r["p99_ms"] <= slo_ms and not r["errors"] and not r["lost"]:
            lo, rate = rate, rate * 2
        else:
            hi = rate
    while lo is not None and hi is not None and hi - lo > 0.1 * lo:
        seed += 1
        rate = (lo + hi) / 2
        r = run_point(daemon, pipelines, trace, rate, duration_s, warmup_s, seed)
        log(f"  capacity search {rate:g}/s: p99 {r['p99_ms']} ms errors {r['errors']} lost {r['lost']}")
        if r["p99_ms"] <= slo_ms and not r["errors"] and not r["lost"]:
            lo = rate
        else:
            hi = rate
    return lo or start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/jzb/many", help="Models, pipelines and run directories go here.")
    ap.add_argument("--base", default="/tmp/jzb/demo/models/demo/1", help="The demo version the heads build on.")
    ap.add_argument("--trace", default="/tmp/jzb/trace30k.npz", help="The request trace (N candidates each).")
    ap.add_argument("--rates", default="20,40", help="User requests/s of the one-against-three comparison.")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds per comparison.")
    ap.add_argument("--duration", type=float, default=20.0, help="Measured seconds per point.")
    ap.add_argument("--warmup", type=float, default=3.0, help="Warm-up seconds before each point.")
    ap.add_argument("--slo-ms", type=float, default=50.0, help="The p99 bound of the capacity search.")
    ap.add_argument("--near", type=float, default=0.9, help="CPF against FIFO at this fraction of FIFO's capacity.")
    ap.add_argument("--only", default="three,cpf", help="Which parts: three, cpf.")
    ap.add_argument("--out", default="/tmp/jzb/many/results.json")
    a = ap.parse_args()
    work = Path(a.work)
    log = lambda s: print(s, flush=True)   # noqa: E731
    models = work / "models"
    if not (models / "demo" / "1").exists():
        shutil.copytree(a.base, models / "demo" / "1", copy_function=os.link)
    for h, hidden in HEADS.items():
        if not (models / h / "1").exists():
            log(f"writing head {h} {hidden}")
            write_head(models, h, hidden=hidden, seed=31 + len(h))
    paths = {"mo": work / "mo.toml"}
    paths["mo"].write_text(multi_objective())
    paths["mo_fused"] = work / "mo_fused.toml"
    paths["mo_fused"].write_text(multi_objective(fused=True))
    for h in HEADS:
        paths[f"h_{h}"] = work / f"h_{h}.toml"
        paths[f"h_{h}"].write_text(single(h))
    trace = Trace(a.trace)
    only = set(a.only.split(","))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cores": os.cpu_count(), "trace": a.trace, "candidates_mean": float(np.mean(np.diff(trace.offsets))),
               "duration_s": a.duration, "rounds": a.rounds, "argv": sys.argv[1:]}
    daemons = []
    try:
        if "three" in only:
            one = Daemon(work, "one", 5611, [paths["mo"]])
            fused = Daemon(work, "fused", 5615, [paths["mo_fused"]])
            three = Daemon(work, "three", 5612, [paths[f"h_{h}"] for h in HEADS])
            daemons += [one, fused, three]
            rows = []
            for rate in [float(x) for x in a.rates.split(",")]:
                for rnd in range(a.rounds):
                    for label, d, pipes in (("one pipeline", one, ["mo"]),
                                            ("one, fused", fused, ["mo_fused"]),
                                            ("three pipelines", three, [f"h_{h}" for h in HEADS])):
                        r = run_point(d, pipes, trace, rate, a.duration, a.warmup, seed=rnd * 100 + int(rate))
                        r.update(setup=label, round=rnd)
                        rows.append(r)
                        log(f"{label:<16} {rate:5g}/s round {rnd}: CPU {r['cpu_s_per_1000']:7.2f} s/1000 req, "
                            f"p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms, errors {r['errors']} lost {r['lost']}")
            results["one_vs_three"] = rows
            for d in (one, fused, three):
                d.stop()
                daemons.remove(d)
        if "cpf" in only:
            fifo = Daemon(work, "fifo", 5613, [paths["mo"]], '[broker]\ndispatch = "fifo"\n')
            cpf = Daemon(work, "cpf", 5614, [paths["mo"]], '[broker]\ndispatch = "critical_path"\n')
            daemons += [fifo, cpf]
            log("capacity of the multi-objective pipeline under FIFO:")
            cap = find_capacity(fifo, ["mo"], trace, a.slo_ms, 20.0, a.duration / 2, a.warmup, log)
            rate = round(a.near * cap, 1)
            results["cpf"] = {"fifo_capacity_rps": cap, "rate": rate, "points": []}
            for rnd in range(a.rounds):
                for label, d in (("fifo", fifo), ("critical_path", cpf)):
                    r = run_point(d, ["mo"], trace, rate, a.duration, a.warmup, seed=5000 + rnd)
                    r.update(setup=label, round=rnd)
                    results["cpf"]["points"].append(r)
                    log(f"{label:<14} {rate:5g}/s round {rnd}: p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms, "
                        f"CPU {r['cpu_s_per_1000']:6.2f} s/1000, errors {r['errors']} lost {r['lost']}")
    finally:
        for d in daemons:
            d.stop()
        Path(a.out).write_text(json.dumps(results, indent=1))
    summarize(results, log)


def summarize(results, log):
    med = lambda xs: float(np.median(xs))   # noqa: E731
    if "one_vs_three" in results:
        log("\nOne multi-objective pipeline against three pipelines (medians over rounds):")
        log(f"{'rate':>6} {'setup':<16} {'CPU s/1000 req':>14} {'p50 ms':>7} {'p99 ms':>7}  errors")
        for rate in sorted({r["rate"] for r in results["one_vs_three"]}):
            for setup in ("one pipeline", "one, fused", "three pipelines"):
                rs = [r for r in results["one_vs_three"] if r["rate"] == rate and r["setup"] == setup]
                log(f"{rate:6g} {setup:<16} {med([r['cpu_s_per_1000'] for r in rs]):14.2f} "
                    f"{med([r['p50_ms'] for r in rs]):7.1f} {med([r['p99_ms'] for r in rs]):7.1f}  "
                    f"{sum(sum(r['errors'].values()) + r['lost'] for r in rs)}")
    if "cpf" in results:
        c = results["cpf"]
        log(f"\nCritical-path-first against FIFO at {c['rate']:g} req/s ({c['fifo_capacity_rps']:g} = FIFO's capacity):")
        for setup in ("fifo", "critical_path"):
            rs = [r for r in c["points"] if r["setup"] == setup]
            log(f"{setup:<14} p50 {med([r['p50_ms'] for r in rs]):6.1f} p99 {med([r['p99_ms'] for r in rs]):6.1f} ms "
                f"(rounds: {', '.join(str(r['p99_ms']) for r in rs)}), errors {sum(sum(r['errors'].values()) + r['lost'] for r in rs)}")


if __name__ == "__main__":
    main()
