"""docs/benchmarks.md, "A profile snapshot published under load": p99 while a snapshot switches.

One jizhid serves the demo version reading a profile store (``[profiles] store``, jizhi/profilestore.py)
through two pipelines, ``demo`` (etc/pipelines/demo.toml) and ``demo_cached`` (demo_cached.toml: item rows and
the item table, rebuilt when the items change). For each pipeline, one open-loop run (Poisson arrivals, the
demo trace, ``jizhi.tools.loadgen.OpenLoop``) of ``--seconds`` at ``--rate`` requests/s, during which two
snapshots are published with ``jizhictl profiles build --store`` in a subprocess, as an operator would: at
``--first`` s one that changes the users (items carried over), at ``--second`` s one that changes the items
(users carried over). Reported per pipeline: p99 of the steady windows (from 5 s to the first build, and the
last 10 s), p99 while each build runs (its CPU shares the 2 cores), p99 in the 10 s after each snapshot is
in place (the rename: the snapshot directory's ctime), and the time from the rename to the first reply naming
the new snapshot.

    python docs/run-snapshot-switch.py --out /tmp/jizhi-snap [--bundle MODELS/demo/1] [--rate 150] [--seconds 70]
                                       [--build-priority idle|normal]

Latency is from each request's intended send time (no coordinated omission); every request must be answered.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def team_npz(bundle, path, side, change=None):
    """The bundle's ``side`` profiles as an npz a build reads with the default mapping (raw values)."""
    from jizhi.bundle import Bundle, Profiles
    b = Bundle(bundle)
    p = Profiles(b, side)
    arrays = {"id": np.asarray(p.ids)}
    if side == "user":
        arrays["dense"] = np.array(p.dense)
    for f in (b.user_fields if side == "user" else b.item_fields):
        if f.kind == "onehot":
            arrays[f.name] = np.array(p.cols[f.name])
        else:
            arrays[f.name + ".values"], arrays[f.name + ".offsets"] = (np.asarray(a) for a in p.cols[f.name])
    if change is not None:
        change(arrays)
    np.savez(path, **arrays)
    return path


def setup(out, bundle):
    """OUT/models/demo/1 reading OUT/stores/demo, with snapshot 1 = the bundle's own profiles."""
    from jizhi.bundle import file_entries, write_text
    from jizhi.tomlw import toml_text
    from jizhi.tools.profilebuild import build_profiles
    version = os.path.join(out, "models", "demo", "1")
    shutil.copytree(bundle, version, ignore=shutil.ignore_patterns("profiles"))
    with open(os.path.join(version, "manifest.toml"), "rb") as f:
        m = tomllib.load(f)
    m["profiles"] = {"store": "../stores/demo"}
    m["files"] = [{"path": p, "size": n, "sha256": h} for p, n, h in file_entries(version)]
    write_text(os.path.join(version, "manifest.toml"), toml_text(m))
    store = os.path.join(out, "stores", "demo")
    build_profiles(version, users=team_npz(bundle, os.path.join(out, "users.npz"), "user"),
                   items=team_npz(bundle, os.path.join(out, "items.npz"), "item"), store=store)
    return version, store


def publish(version, store, side, path, events, name, idle=True):
    """``jizhictl profiles build --store`` in a subprocess; records its start and end (the rename)."""
    events[name + "_start"] = time.monotonic()
    subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), "profiles", "build", "--model", version,
                    f"--{side}", path, "--store", store, "--quiet"] + ([] if idle else ["--no-idle"]), check=True,
                   capture_output=True)
    # The rename itself (the command exits a moment later): the snapshot directory's ctime, in monotonic time.
    from jizhi.profilestore import snapshots
    ctime = os.stat(os.path.join(store, str(snapshots(store)[-1]))).st_ctime
    events[name + "_end"] = time.monotonic() - (time.time() - ctime)


def p99(lat, due, a, b):
    sel = (due >= a) & (due < b)
    return float(np.percentile(lat[sel], 99)) if sel.any() else float("nan"), int(sel.sum())


def run_pipeline(args, endpoint, trace, version, store, pipeline, snapshot0):
    from jizhi.tools.loadgen import OpenLoop, load_socket, poisson_times
    rng = np.random.default_rng(7)
    due = poisson_times(rng, args.rate, args.seconds)
    rows = np.arange(due.shape[0]) % len(trace)
    snaps = np.zeros(due.shape[0], dtype=np.int64)

    def on_reply(k, header, frames):
        snaps[k] = header.get("profile_snapshot", 0)
    sock = load_socket(endpoint)
    load = OpenLoop(sock, trace, pipeline=pipeline, due=due, rows=rows, deadline_ms=2000, on_reply=on_reply)
    events = {}
    users2 = team_npz(args.bundle, os.path.join(args.out, f"users-{pipeline}.npz"), "user",
                      lambda a: a.__setitem__("dense", a["dense"] + np.float32(0.01)))

    def items_change(a):
        col = next(k for k in a if k.startswith("i_cat"))
        a[col] = np.where(a[col] > 1, a[col] - 1, a[col])
    items2 = team_npz(args.bundle, os.path.join(args.out, f"items-{pipeline}.npz"), "item", items_change)
    t0 = time.monotonic() + 0.5
    threads = [threading.Timer(t0 + args.first - time.monotonic(), publish,
                               (version, store, "users", users2, events, "first", args.build_priority == "idle")),
               threading.Timer(t0 + args.second - time.monotonic(), publish,
                               (version, store, "items", items2, events, "second", args.build_priority == "idle"))]
    for t in threads:
        t.start()
    load.run(t0)
    for t in threads:
        t.join()
    sock.close(0)
    ok = load.status == 1
    lat = load.latency_ms()
    d = load.due - t0
    row = {"pipeline": pipeline, "rate": args.rate, "requests": int(due.shape[0]), "ok": int(ok.sum()),
           "not_ok": int((~ok).sum())}
    steady = np.concatenate([lat[(d >= 5) & (d < events["first_start"] - t0)],
                             lat[d >= args.seconds - 10]])
    row["steady_p99_ms"] = float(np.percentile(steady, 99))
    for name, snap in (("first", snapshot0 + 1), ("second", snapshot0 + 2)):
        s, e = events[name + "_start"] - t0, events[name + "_end"] - t0
        row[f"{name}_build_s"] = round(e - s, 2)
        row[f"{name}_during_build_p99_ms"] = p99(lat, d, s, e)[0]
        row[f"{name}_after_rename_p99_ms"] = p99(lat, d, e, e + 10)[0]
        served = np.flatnonzero(snaps == snap)
        row[f"{name}_rename_to_first_reply_s"] = round(float(load.done_at[served].min() - events[name + "_end"]), 2) \
            if served.shape[0] else None
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundle", help="the demo version directory (default: made in OUT/demo)")
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--seconds", type=float, default=70.0)
    ap.add_argument("--first", type=float, default=20.0)
    ap.add_argument("--second", type=float, default=45.0)
    ap.add_argument("--port", type=int, default=5599)
    ap.add_argument("--build-priority", choices=("idle", "normal"), default="idle",
                    help="the builds' CPU priority (jizhictl profiles build --idle, the default, or --no-idle)")
    args = ap.parse_args()
    args.out = os.path.realpath(args.out)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    if not args.bundle:
        from jizhi.tools.demo import init_demo
        args.bundle = str(init_demo(os.path.join(args.out, "demo"), progress=False))
    from jizhi.ctl.inputs import Trace
    from jizhi.tools.demo import generate_trace
    from jizhi.tools.testbed import stop_session, wait_for_hot_tiers
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} {os.cpu_count()} cores", flush=True)
    version, store = setup(args.out, args.bundle)
    trace_path = os.path.join(args.out, "trace.npz")
    generate_trace(args.bundle, trace_path, requests=int(args.rate * args.seconds) + 100, candidates=500,
                   progress=False)
    trace = Trace(trace_path)
    endpoint = f"tcp://127.0.0.1:{args.port}"
    config = os.path.join(args.out, "jizhi.toml")
    with open(config, "w") as f:
        f.write('[metrics]\nlisten = ""\n')
    log = open(os.path.join(args.out, "jizhid.log"), "w")
    daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "jizhid"), "--config", config,
                               "--models", os.path.join(args.out, "models"), "--instance", "snapbench",
                               "--frontend", endpoint, "--pipelines",
                               ",".join(os.path.join(ROOT, "etc", "pipelines", p) for p in ("demo.toml",
                                                                                            "demo_cached.toml")),
                               "--run-dir", os.path.join(args.out, "run")], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    rows = []
    try:
        subprocess.run([sys.executable, "-m", "jizhi.client", "--wait-ready", endpoint], check=True, timeout=300)
        if not wait_for_hot_tiers(os.path.join(args.out, "jizhid.log"), 2):
            print("warning: not every hot tier was reported built; measuring anyway", flush=True)
        time.sleep(5)
        snapshot = 1
        for pipeline in ("demo", "demo_cached"):
            row = run_pipeline(args, endpoint, trace, version, store, pipeline, snapshot)
            snapshot += 2
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop_session(daemon)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| pipeline | rate | answered | steady p99 | snapshot | build s | p99 during the build | p99 10 s after "
          "the rename | rename to first reply |\n|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        for name, what in (("first", "users changed"), ("second", "items changed")):
            print(f"| {r['pipeline']} | {r['rate']:g}/s | {r['ok']:,} of {r['requests']:,} | {r['steady_p99_ms']:.1f} ms "
                  f"| {what} | {r[name + '_build_s']} | {r[name + '_during_build_p99_ms']:.1f} ms "
                  f"({r[name + '_during_build_p99_ms'] / r['steady_p99_ms']:.2f}x) | "
                  f"{r[name + '_after_rename_p99_ms']:.1f} ms ({r[name + '_after_rename_p99_ms'] / r['steady_p99_ms']:.2f}x) "
                  f"| {r[name + '_rename_to_first_reply_s']} s |")


if __name__ == "__main__":
    main()
