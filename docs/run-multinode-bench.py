#!/usr/bin/env python
"""Several jizhid nodes behind one client (issue 8, item 3): throughput against one node and against
two, then a node killed under load.

    .venv/bin/python docs/run-multinode-bench.py [--duration 20] [--threads 8] [--kill-rate 50]

What it does (every figure from one run, on a quiet machine):

1. Two jizhid nodes on this machine (``etc/pipelines/demo.toml``: the demo fused into one worker
   kind, pool 2), each its own instance, port and run directory, over the demo bundle (--base,
   hard-linked under --work).
2. Throughput, closed loop: --threads client threads in this process, each its own
   ``jizhi.client.Client`` sending trace requests back to back (--warmup s not counted, then
   --duration s counted): against node 1 alone (``Client(node1)``), then against both
   (``Client([node1, node2])``: round-robin, retry on the other node). Per setup: answered
   requests/s and candidate pairs/s, p50/p99 latency, errors, requests sent to each node. Both
   nodes share the same cores (and this load generator), so a second node adds no CPU: what
   two nodes can show here is the cost of spreading, not a gain; a gain needs a second machine.
3. Kill: paced load at --kill-rate requests/s (all threads together) against both nodes, attempt
   timeout --attempt-timeout-s (also the request's deadline_ms), at most --attempts attempts and
   --budget-s seconds per request; at --kill-at s the second node's whole process group gets
   SIGKILL (a machine gone; its shared-memory segments are then removed, as its next start would),
   and the load goes on --kill-after s. Reported: logical requests sent, answered, lost (a request
   that ran out of attempts or budget, or answered an error), retried (took more than one
   attempt), the worst latency of a retried request, and the clients' per-node counters.

Prints markdown tables and writes --out (JSON).
"""
import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("mm", REPO / "docs" / "run-many-models-bench.py")
mm = importlib.util.module_from_spec(spec)     # its Daemon: start a jizhid, jizhictl against it, stop it
spec.loader.exec_module(mm)

from jizhi.tools.bench import Trace                                       # noqa: E402
from jizhi.client import Client                                     # noqa: E402
from jizhi.errors import RequestError                               # noqa: E402
from jizhi.tools.loadgen import ClientThreads                       # noqa: E402


class ClosedLoop(ClientThreads):
    """``threads`` threads, each its own ``Client(endpoints, **client_args)``, sending trace rows (a shared
    cursor) back to back, or each every ``threads / rate`` s when ``rate`` is given (a late thread sends at
    once; ``jizhi.tools.loadgen.ClientThreads``). Each logical request is one row of the records ``stop``
    returns: (t_send, t_done, ok, attempts, candidates)."""

    def __init__(self, endpoints, trace, threads, rate=None, deadline_ms=1000, **client_args):
        self.endpoints, self.client_args = endpoints, client_args
        self.trace, self.deadline_ms = trace, deadline_ms
        self.rows = itertools.count(int(time.time()) % len(trace))
        self.out = [[] for _ in range(threads)]      # each thread's own rows: no lock per request
        super().__init__(threads, rate=rate, join_s=120)

    def connect(self, i):
        return Client(self.endpoints, **self.client_args)

    def send(self, i, client, n):
        tr = self.trace
        r = next(self.rows) % len(tr)
        a, b = tr.offsets[r], tr.offsets[r + 1]
        t0 = time.monotonic()
        ok, attempts = 0.0, 0
        try:
            reply = client.score(int(tr.users[r]), tr.items[a:b], tr.recall[a:b], pipeline="demo", top_k=10,
                                 deadline_ms=self.deadline_ms)
            ok, attempts = 1.0, reply.attempts
        except (TimeoutError, RequestError):
            attempts = client.last_attempts
        self.out[i].append((t0, time.monotonic(), ok, attempts, b - a))

    def stop(self):
        super().stop()
        return np.array([row for rows in self.out for row in rows], dtype=np.float64).reshape(-1, 5)

    def node_stats(self):
        """The clients' counters summed by endpoint."""
        total = {}
        for c in self.clients:
            for e, s in c.stats()["endpoints"].items():
                t = total.setdefault(e, {k: 0 for k in s if k != "down"})
                for k in t:
                    t[k] += s[k]
        return total


def throughput(endpoints, trace, threads, warmup_s, duration_s, timeout_s):
    load = ClosedLoop(endpoints, trace, threads, deadline_ms=int(timeout_s * 1000), timeout_s=timeout_s).start()
    t0 = time.monotonic() + warmup_s
    time.sleep(warmup_s + duration_s)
    t1 = time.monotonic()
    rec = load.stop()
    m = (rec[:, 0] >= t0) & (rec[:, 1] <= t1)
    ok = m & (rec[:, 2] == 1)
    lat = (rec[ok, 1] - rec[ok, 0]) * 1000
    return {"endpoints": endpoints, "threads": threads, "duration_s": duration_s, "answered": int(ok.sum()),
            "rps": round(ok.sum() / duration_s, 1), "pairs_s": round(rec[ok, 4].sum() / duration_s),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "errors": int((m & (rec[:, 2] == 0)).sum()), "nodes": load.node_stats()}


def kill_node(d):
    """SIGKILL a Daemon's process group; remove the shared-memory segments it left; their number."""
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.proc.wait(30)
    left = list(Path("/dev/shm").glob(f"jizhi.mm{d.name}.*"))
    for p in left:
        p.unlink(missing_ok=True)
    return len(left)


def kill_test(nodes, trace, threads, rate, attempt_timeout_s, attempts, budget_s, kill_at_s, kill_after_s, log):
    endpoints = [d.endpoint for d in nodes]
    load = ClosedLoop(endpoints, trace, threads, rate=rate, deadline_ms=int(attempt_timeout_s * 1000),
                      timeout_s=attempt_timeout_s, attempts=attempts, budget_s=budget_s).start()
    time.sleep(kill_at_s)
    t_kill = time.monotonic()
    segments = kill_node(nodes[1])
    log(f"  kill -9 of {nodes[1].endpoint} at {kill_at_s:g} s ({segments} segments removed)")
    time.sleep(kill_after_s)
    rec = load.stop()
    ok = rec[:, 2] == 1
    retried = ok & (rec[:, 3] > 1)
    lat = (rec[:, 1] - rec[:, 0]) * 1000
    after = rec[:, 0] >= t_kill
    return {"endpoints": endpoints, "rate": rate, "threads": threads, "attempt_timeout_s": attempt_timeout_s,
            "attempts": attempts, "budget_s": budget_s, "kill_at_s": kill_at_s, "kill_after_s": kill_after_s,
            "sent": int(rec.shape[0]), "answered": int(ok.sum()), "lost": int((~ok).sum()),
            "retried": int(retried.sum()),
            "worst_retried_ms": round(float(lat[retried].max()), 1) if retried.any() else None,
            "p99_ms": round(float(np.percentile(lat[ok], 99)), 1) if ok.any() else None,
            "p99_after_kill_ms": round(float(np.percentile(lat[ok & after], 99)), 1) if (ok & after).any() else None,
            "nodes": load.node_stats()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/jzb/multinode", help="Models and run directories go here.")
    ap.add_argument("--base", default="/tmp/jzb/demo/models/demo/1", help="The demo bundle version.")
    ap.add_argument("--trace", default="/tmp/jzb/trace30k.npz", help="The request trace.")
    ap.add_argument("--pipeline", default=str(REPO / "etc" / "pipelines" / "demo.toml"))
    ap.add_argument("--threads", type=int, default=8, help="Client threads of the throughput runs.")
    ap.add_argument("--duration", type=float, default=20.0, help="Measured seconds per throughput run.")
    ap.add_argument("--warmup", type=float, default=3.0, help="Warm-up seconds before each throughput run.")
    ap.add_argument("--kill-rate", type=float, default=50.0, help="Requests/s of the kill test (all threads).")
    ap.add_argument("--kill-threads", type=int, default=4)
    ap.add_argument("--attempt-timeout-s", type=float, default=0.5, help="Kill test: one attempt's wait.")
    ap.add_argument("--attempts", type=int, default=3, help="Kill test: attempts per request.")
    ap.add_argument("--budget-s", type=float, default=5.0, help="Kill test: time budget per request.")
    ap.add_argument("--kill-at", type=float, default=5.0, help="Seconds of load before the kill.")
    ap.add_argument("--kill-after", type=float, default=10.0, help="Seconds of load after the kill.")
    ap.add_argument("--out", default="/tmp/jzb/multinode/results.json")
    a = ap.parse_args()
    log = lambda s: print(s, flush=True)   # noqa: E731
    work = Path(a.work)
    if not (work / "models" / "demo" / "1").exists():
        shutil.copytree(a.base, work / "models" / "demo" / "1", copy_function=os.link)
    trace = Trace(a.trace)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cores": os.cpu_count(), "trace": a.trace, "candidates_mean": trace.mean_candidates(),
               "pipeline": a.pipeline, "argv": sys.argv[1:]}
    nodes = []
    try:
        for k, port in ((1, 5651), (2, 5652)):
            d = mm.Daemon(work, f"node{k}", port, [a.pipeline])
            d.name = f"node{k}"
            nodes.append(d)
        eps = [d.endpoint for d in nodes]
        results["throughput"] = []
        for label, endpoints in (("one node", eps[:1]), ("two nodes, one client", eps)):
            r = throughput(endpoints, trace, a.threads, a.warmup, a.duration, timeout_s=5.0)
            r["setup"] = label
            results["throughput"].append(r)
            log(f"{label}: {r['rps']} req/s, p50 {r['p50_ms']} p99 {r['p99_ms']} ms, errors {r['errors']}, "
                f"sent by node {[n['sent'] for n in r['nodes'].values()]}")
        results["kill"] = kill_test(nodes, trace, a.kill_threads, a.kill_rate, a.attempt_timeout_s, a.attempts,
                                    a.budget_s, a.kill_at, a.kill_after, log)
    finally:
        for d in nodes:
            d.stop()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    summarize(results, log)


def summarize(results, log):
    log(f"\nClosed loop, {results['throughput'][0]['threads']} client threads, "
        f"{results['throughput'][0]['duration_s']:g} s measured, {results['candidates_mean']:.0f} candidates/request, "
        f"{results['cores']} cores shared by the nodes and the client:\n")
    log("| setup | requests/s | pairs/s | p50 ms | p99 ms | errors | sent per node |")
    log("|---|---:|---:|---:|---:|---:|---|")
    for r in results["throughput"]:
        log(f"| {r['setup']} | {r['rps']:.1f} | {r['pairs_s']:,} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
            + " / ".join(str(n["sent"]) for n in r["nodes"].values()) + " |")
    if "kill" in results:
        k = results["kill"]
        log(f"\nKill -9 of one of two nodes at {k['kill_at_s']:g} s under {k['rate']:g} req/s, "
            f"{k['kill_after_s']:g} s more; attempt timeout {k['attempt_timeout_s']:g} s, "
            f"at most {k['attempts']} attempts / {k['budget_s']:g} s:\n")
        log("| sent | answered | lost | retried | worst retried ms | p99 ms | p99 after kill ms |")
        log("|---:|---:|---:|---:|---:|---:|---:|")
        log(f"| {k['sent']} | {k['answered']} | {k['lost']} | {k['retried']} | {k['worst_retried_ms']} | "
            f"{k['p99_ms']} | {k['p99_after_kill_ms']} |")
        log("\n| node | sent | answered | timeouts | retries | errors retried |")
        log("|---|---:|---:|---:|---:|---:|")
        for e, n in k["nodes"].items():
            log(f"| {e} | {n['sent']} | {n['answered']} | {n['timeouts']} | {n['retries']} | {n['errors_retried']} |")


if __name__ == "__main__":
    main()
