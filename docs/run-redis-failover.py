"""A Redis master frozen under load: what a jizhid whose cube is on Redis Cluster answers, and how late.

The script starts a Redis Cluster on loopback (jizhi/tools/redis_local.py): 3 masters with 1 replica each,
``cluster-node-timeout`` ``--node-timeout-ms`` (15,000 ms, the production default: a master silent that long is
failed over to its replica), and pushes the demo bundle's cube into it (`jizhictl cube push --strategy key`). One
jizhid serves one pipeline, etc/pipelines/demo.toml (fused, pool 2, batch 8, ``batch_wait_ms`` 3) named
``failover``, whose cube stage reads the cluster: ``remote = "redis://.../{name}/{version}?timeout_ms=50"``,
``disk_cache_keys = 2000``, with ``[cube] hot_tier_mb = 1`` in jizhid's config, so most of a request's keys are
read from Redis (the hot tier holds ~6 % of the cube's keys).

Load: the demo trace (N = 500 candidates), open loop at a fixed ``--rate`` (requests/s, Poisson arrivals,
jizhi/tools/loadgen.py's ``OpenLoop`` used directly: jizhictl bench keeps no per-request record), latency from
each request's intended send time, deadline 1,000 ms (no reply 1 s after it: lost). ``--warm`` s of load first
(not counted), then the measured run on the same clock: ``--steady`` s steady, then SIGSTOP to one master (the
first by port, as a live node's CLUSTER SLOTS lists them), kept stopped until its replica is promoted (a live
node's ``masters_of`` polled every 100 ms, at most ``--promotion-timeout`` s), then SIGCONT (it rejoins as a
replica), then ``--after`` s more; the load stops there and every request sent is waited for.

Reported: requests sent, answered OK, errors and lost (every request must be answered: the script says when one
was not); p50/p99/max of the whole measured run and per ``--window`` s window of intended send time (the window
of each event marked); the time from SIGSTOP to the promotion seen; the cube's keys degraded to the default vector
(`jizhictl stats`: ``remote_degraded``) over the run and per phase (steady, stopped until promoted, promoted until
SIGCONT, after). Writes OUT/results.json (with every window) and prints markdown tables.

    python docs/run-redis-failover.py --out /tmp/jizhi-failover [--bundle MODELS/demo/1 --trace TRACE.npz]
                                      [--rate 100] [--node-timeout-ms 15000] [--steady 10] [--after 20] [--warm 20]
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from jizhi.ctl.inputs import Trace
from jizhi.tools.loadgen import ERROR, LOST, NOT_SENT, OK, PENDING, OpenLoop, load_socket, percentiles, poisson_times
from jizhi.tools.redis_local import LocalCluster, free_port_block
from jizhi.tools.testbed import demo_inputs, free_port, stop_session, wait_for_hot_tiers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
PIPELINE = "failover"
DEADLINE_MS = 1000


def jizhictl(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), *args], capture_output=True,
                          text=True, check=True).stdout


def pipeline_file(work, url):
    text = open(os.path.join(ROOT, "etc", "pipelines", "demo.toml")).read()
    text = re.sub(r'(?m)^name = "demo"', f'name = "{PIPELINE}"', text, count=1)
    remote = f"{url}/{{name}}/{{version}}?timeout_ms=50"
    text = text.replace('processor = "cube_accessor"\n',
                        f'processor = "cube_accessor"\nremote = "{remote}"\ndisk_cache_keys = 2000\n')
    if remote not in text:
        raise RuntimeError("etc/pipelines/demo.toml has no cube_accessor stage to point at Redis")
    path = os.path.join(work, f"{PIPELINE}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def summary(lat, status):
    ok = status == OK
    r = {"sent": int((status != NOT_SENT).sum()), "ok": int(ok.sum()), "errors": int((status == ERROR).sum()),
         "lost": int((status == LOST).sum()), "pending": int((status == PENDING).sum())}
    r.update(percentiles(lat[ok]))
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundle", default=None, help="a demo version directory (default: jizhictl demo init in OUT)")
    ap.add_argument("--trace", default=None, help="its trace (default: the one demo init writes)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s, open loop, the whole run")
    ap.add_argument("--node-timeout-ms", type=int, default=15000, help="the cluster's cluster-node-timeout")
    ap.add_argument("--warm", type=float, default=20.0, help="s of load before the measured run (not counted)")
    ap.add_argument("--steady", type=float, default=10.0, help="s of the measured run before SIGSTOP")
    ap.add_argument("--after", type=float, default=20.0, help="s of the measured run after SIGCONT")
    ap.add_argument("--promotion-timeout", type=float, default=90.0, help="longest wait for the promotion (s)")
    ap.add_argument("--window", type=float, default=5.0, help="s per window of the per-window table")
    ap.add_argument("--port", type=int, default=None, help="jizhid's frontend port (default: a free one)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    args.bundle, args.trace = demo_inputs(out, args.bundle, args.trace)
    trace = Trace(args.trace)
    shutil.rmtree(os.path.join(out, "redis"), ignore_errors=True)
    cluster = LocalCluster(os.path.join(out, "redis"), base_port=free_port_block(6), masters=3, replicas=1,
                           node_timeout_ms=args.node_timeout_ms)
    cluster.start()
    daemon = victim = None
    stopped = False
    events = {}
    phase_stats = {}
    work = os.path.join(out, "run-work")
    try:
        t_push = time.monotonic()
        jizhictl("cube", "push", args.bundle, "--redis", cluster.url, "--strategy", "key", "--quiet")
        push_s = time.monotonic() - t_push
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        pfile = pipeline_file(work, cluster.url)
        config = os.path.join(work, "jizhi.toml")
        with open(config, "w") as f:
            f.write('[metrics]\nlisten = ""\n\n[cube]\nhot_tier_mb = 1\n')
        run_dir = os.path.join(work, "run")
        endpoint = f"tcp://127.0.0.1:{args.port or free_port()}"
        log_path = os.path.join(work, "jizhid.log")
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "jizhid"), "--config", config,
                                       "--models", os.path.dirname(os.path.dirname(os.path.abspath(args.bundle))),
                                       "--instance", "failover", "--frontend", endpoint, "--pipelines", pfile,
                                       "--run-dir", run_dir], stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                      start_new_session=True)
        subprocess.run([sys.executable, "-m", "jizhi.client", "--wait-ready", endpoint], check=True, timeout=300)
        if not wait_for_hot_tiers(log_path, 1):
            print("warning: the hot tier was not reported built; measuring anyway", flush=True)

        def cube_stats():
            return json.loads(jizhictl("stats", "--json", "--run-dir", run_dir))["cube"][PIPELINE]

        # the victim: the first master; its slots' new owner is whichever replica wins the election
        masters0 = cluster.masters_of(cluster.ports[0])
        victim = masters0[0]
        witness = next(p for p in cluster.ports if p != victim)
        # one load for the whole run: --warm s before t0 (not counted), then until stop() (horizon: the longest
        # the run can take)
        horizon = args.steady + args.promotion_timeout + args.after + 5.0
        rng = np.random.default_rng(args.seed)
        warm_due = poisson_times(rng, args.rate, args.warm) - args.warm
        due = np.concatenate([warm_due, poisson_times(rng, args.rate, horizon)])
        rows = np.arange(due.shape[0]) % len(trace)
        sock = load_socket(endpoint)
        load = OpenLoop(sock, trace, pipeline=PIPELINE, due=due, rows=rows, deadline_ms=DEADLINE_MS,
                        encode_ahead=256)
        t0 = time.monotonic() + args.warm + 0.1
        thread = threading.Thread(target=load.run, args=(t0,), daemon=True)
        print(f"cluster {cluster.url} (node timeout {args.node_timeout_ms} ms), victim master {victim}; "
              f"load {args.rate:g}/s: {args.warm:g} s warm-up, then {args.steady:g} s steady", flush=True)
        thread.start()
        time.sleep(max(0.0, t0 + args.steady - 2.0 - time.monotonic()))
        phase_stats["before"] = cube_stats()
        time.sleep(max(0.0, t0 + args.steady - time.monotonic()))
        cluster.kill(victim, signal.SIGSTOP)
        stopped = True
        events["sigstop"] = time.monotonic() - t0
        print(f"t={events['sigstop']:.1f} s: SIGSTOP master {victim}", flush=True)
        end = time.monotonic() + args.promotion_timeout
        promoted = None
        while time.monotonic() < end:
            try:
                m = cluster.masters_of(witness)
                if victim not in m and len(m) == len(masters0):
                    promoted = sorted(set(m) - set(masters0))
                    break
            except Exception:          # a node busy with the election: ask again
                pass
            time.sleep(0.1)
        events["promoted"] = time.monotonic() - t0 if promoted else None
        if promoted:
            print(f"t={events['promoted']:.1f} s: {promoted} promoted, "
                  f"{events['promoted'] - events['sigstop']:.1f} s after SIGSTOP", flush=True)
        else:
            print(f"no promotion seen within {args.promotion_timeout:g} s", flush=True)
        phase_stats["promoted"] = cube_stats()
        cluster.kill(victim, signal.SIGCONT)
        stopped = False
        events["sigcont"] = time.monotonic() - t0
        print(f"t={events['sigcont']:.1f} s: SIGCONT {victim}; {args.after:g} s more", flush=True)
        phase_stats["sigcont"] = cube_stats()
        time.sleep(max(0.0, t0 + events["sigcont"] + args.after - time.monotonic()))
        load.stop(t0 + events["sigcont"] + args.after)
        thread.join(DEADLINE_MS / 1000 + 30)
        if thread.is_alive():
            load.halt()
            thread.join(5)
        events["end"] = events["sigcont"] + args.after
        phase_stats["after"] = cube_stats()
        try:
            cluster.wait_ok(30, ports=[p for p in cluster.ports])
            roles = {p: ("master" if p in cluster.masters_of(witness) else "replica") for p in cluster.ports}
        except (TimeoutError, OSError) as e:
            roles = {"error": str(e)}
        sock.close(0)
    finally:
        if stopped and victim is not None:
            cluster.kill(victim, signal.SIGCONT)
        if daemon is not None:
            stop_session(daemon)
        cluster.stop()

    rel = load.due - t0
    lat = load.latency_ms()
    st = load.status
    measured = rel >= 0
    whole = summary(lat[measured], st[measured])
    warm = summary(lat[~measured], st[~measured])
    windows = []
    t_end = events["end"]
    for a in np.arange(0.0, t_end, args.window):
        b = min(a + args.window, t_end)
        sel = (rel >= a) & (rel < b)
        w = summary(lat[sel], st[sel])
        w.update(start_s=round(float(a), 1), end_s=round(float(b), 1),
                 events=[k for k, t in events.items() if t is not None and a <= t < b])
        windows.append(w)

    def degraded(a, b):
        return phase_stats[b].get("remote_degraded", 0) - phase_stats[a].get("remote_degraded", 0)

    deg = {"stopped_until_promoted": degraded("before", "promoted"),
           "promoted_until_sigcont": degraded("promoted", "sigcont"), "after_sigcont": degraded("sigcont", "after"),
           "total": degraded("before", "after")}
    remote_keys = phase_stats["after"].get("remote_keys", 0) - phase_stats["before"].get("remote_keys", 0)
    results = {"rate": args.rate, "node_timeout_ms": args.node_timeout_ms, "warm_s": args.warm,
               "steady_s": args.steady, "after_s": args.after, "window_s": args.window, "victim": victim,
               "promoted": promoted, "events_s": {k: (None if v is None else round(v, 2)) for k, v in events.items()},
               "promotion_s": (round(events["promoted"] - events["sigstop"], 2) if events.get("promoted") else None),
               "push_s": round(push_s, 2), "roles_after": roles, "whole": whole, "warm": warm, "windows": windows,
               "degraded_keys": deg, "remote_keys_during_run": remote_keys,
               "cube_after": phase_stats["after"],
               "git": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_end": os.getloadavg()[0]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    unanswered = whole["sent"] - whole["ok"]
    print(f"\n{args.rate:g} requests/s of N = 500, open loop; 3 masters + 1 replica each, node timeout "
          f"{args.node_timeout_ms:,} ms; commit {results['git']}, {results['date']}\n")
    print(f"SIGSTOP at t = {events['sigstop']:.1f} s, promotion seen at "
          + (f"{events['promoted']:.1f} s ({results['promotion_s']:.1f} s after SIGSTOP)" if promoted
             else "- (none within the bound)")
          + f", SIGCONT at {events['sigcont']:.1f} s, end at {t_end:.1f} s\n")
    print("| requests sent | answered OK | errors | lost | p50 ms | p99 ms | max ms | keys degraded (of "
          "keys read from Redis) | stopped->promoted | promoted->SIGCONT | after SIGCONT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {whole['sent']:,} | {whole['ok']:,} | {whole['errors']} | {whole['lost']} | {whole['p50_ms']:.1f} | "
          f"{whole['p99_ms']:.1f} | {whole['max_ms']:.1f} | {deg['total']:,} ({remote_keys:,}) | "
          f"{deg['stopped_until_promoted']:,} | {deg['promoted_until_sigcont']:,} | {deg['after_sigcont']:,} |")
    print("\n| window s | sent | answered OK | errors+lost | p50 ms | p99 ms | max ms | event |")
    print("|---|---|---|---|---|---|---|---|")
    for w in windows:
        f = (lambda v: "-" if v is None else f"{v:.1f}")
        print(f"| {w['start_s']:g}-{w['end_s']:g} | {w['sent']} | {w['ok']} | {w['errors'] + w['lost']} | "
              f"{f(w['p50_ms'])} | {f(w['p99_ms'])} | {f(w['max_ms'])} | {', '.join(w['events'])} |")
    if unanswered:
        print(f"\nNOT every request was answered: {unanswered} of {whole['sent']:,} "
              f"({whole['errors']} errors, {whole['lost']} lost, {whole['pending']} pending)")
    else:
        print(f"\nevery request was answered ({whole['sent']:,})")


if __name__ == "__main__":
    main()
