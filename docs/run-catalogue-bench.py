"""The demo at catalogue scale: 10 M users and 1 M items against the default demo (10,000 users, 100,000 items).

One run, one machine, two catalogues (``--catalogues``): ``big`` (``--users`` x ``--items``, default
10,000,000 x 1,000,000, ``--vocab-scale``) and ``default`` (the demo's 10,000 x 100,000). For each:

1. ``jizhictl demo init`` in a subprocess: its wall time and peak RSS (``wait4``), and the bundle's bytes:
   user profiles, item profiles, cube (``data.mdb``), ``dense.onnx``;
2. ``jizhictl demo trace`` (``--requests`` requests of 500 candidates; replayed with ``--allow-repeat``);
3. per pipeline variant (``--variants``): ``demo``, etc/pipelines/demo.toml as shipped (pool 2, batch 8), and
   ``items``, the same with the item part computed once per version (the cube's ``item_rows``, the dnn's
   ``item_cache``, their budgets raised to ``--item-mb`` so that a 1 M-item table is built, not refused; the
   per-process RSS and PSS show whether each worker holds its own copy or maps a shared one), each served by
   a jizhid of its own (own instance, port and run directory; config: metrics off, ``cube.hot_tier_mb =
   --hot-tier-mb`` (default 64: the default demo's cube fits, the big one's does not), ``cube.hot_rebuild_s =
   --hot-rebuild-s`` (default 10 s, six times the server's default, so that the LFU tier settles within the
   run; its cost, the supervisor's key counting and the niced builds, is paid only when the cube does not fit:
   the supervisor's CPU at the max is in the table)), measuring:

   * start: from spawning jizhid to ``jizhictl status`` health ``ready`` (the control socket's ``status``,
     polled every 0.1 s), to every pool full (``info``), to the hot tier's first generation (its log);
   * memory of every process of the jizhid (the supervisor, the broker, each worker, by ``status``'s names):
     RSS (``VmRSS``; anon, file, shmem) and PSS (``smaps_rollup``: ``Pss``, ``Pss_Shmem``) once the pools are
     full and the hot tier built (idle), and again after the load; the instance's /dev/shm bytes
     (``jizhi.tools.procfs.MemorySampler``);
   * max pairs/s at p99 <= ``--slo-ms``: ``jizhictl bench --find-max`` (``python -m jizhi.tools.bench``);
   * the hot tier: its last generation (keys of the cube's, MiB: the jizhid log) and its hit ratio
     (``jizhictl stats``: hot_hits / lookups) over the find-max, and over a steady point after it (``--steady-s``
     at ``--steady-fraction`` of the max rate; by then it holds the most used keys, ``cube.hot_rebuild_s``).

4. with ``--profile-build``, docs/run-profile-build-bench.py on the big bundle with ``--users``/``--items``
   (Parquet only; it takes long at 10 M users).

Prints markdown tables and writes OUT/results.json (every figure, the commands, the load average at each step);
OUT/<catalogue>/ keeps the bundle (``bundle/``), the trace, and per variant the jizhid log and the bench JSON
files (``--clean`` removes the bundles and the profile build's files at the end).

    python docs/run-catalogue-bench.py --out /tmp/catalogue-bench [--users 10000000 --items 1000000]
        [--catalogues big,default] [--variants demo,items] [--hot-tier-mb 64] [--duration 20] [--max-points 6]
        [--max-other-cores 0.5] [--profile-build] [--clean]

Every jizhid runs in its own session and is stopped (SIGTERM, then SIGKILL of its process group) whatever
happens; the instance's /dev/shm entries are checked and removed if any are left (and said so).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
DEFAULT_USERS, DEFAULT_ITEMS = 10_000, 100_000
CANDIDATES = 500
READY_TIMEOUT_S = 900.0
HOT_LINE = re.compile(r"hot tier generation (\d+): (\d+) of (\d+) cube keys.*?, (\d+) MiB, built in (\d+) ms")


def say(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def loadavg():
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def jizhictl_argv():
    beside = os.path.join(os.path.dirname(sys.executable), "jizhictl")
    return [beside] if os.path.exists(beside) else [sys.executable, os.path.join(ROOT, "bin", "jizhictl")]


def timed(argv, log_path):
    """Run ``argv`` (its output to ``log_path``): (wall seconds, peak RSS bytes of the child); raises on failure."""
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:     # interrupted: the child must not outlive us
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}; see {log_path}")
    return round(wall, 1), usage.ru_maxrss * 1024


def tree_bytes(path):
    total = 0
    for root, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return total


def bundle_sizes(vdir):
    return {"user_profiles": tree_bytes(os.path.join(vdir, "profiles", "users")),
            "item_profiles": tree_bytes(os.path.join(vdir, "profiles", "items")),
            "cube": tree_bytes(os.path.join(vdir, "cube")),
            "dense_onnx": os.path.getsize(os.path.join(vdir, "dense.onnx")),
            "total": tree_bytes(vdir)}


def pipeline_file(out, variant, item_mb):
    """The pipeline a variant serves: ``demo`` by name (etc/pipelines/demo.toml); ``items`` a copy of it with
    the cube's item_rows and the dnn's item_cache on, their budgets ``item_mb``."""
    if variant == "demo":
        return "demo", "demo"
    from jizhi.tomlw import toml_text
    with open(os.path.join(ROOT, "etc", "pipelines", "demo.toml"), "rb") as f:
        doc = tomllib.load(f)
    doc["name"] = "demo_items"
    for st in doc["stage"]:
        if st["processor"] == "cube_accessor":
            st.update(item_rows=True, item_rows_mb=item_mb)
        elif st["processor"] == "model_inference":
            st.update(item_cache=True, item_cache_mb=item_mb)
    path = os.path.join(out, "demo_items.toml")
    with open(path, "w") as f:
        f.write(toml_text(doc))
    return path, "demo_items"


def control(run_dir, cmd, timeout_s=5.0):
    from jizhi import control as ctl
    return ctl.call(run_dir, cmd, None, timeout_s)


def wait_status_ready(proc, run_dir, t_spawn, log_path):
    """Seconds from spawn to ``jizhictl status`` health "ready" (polled every 0.1 s)."""
    from jizhi import control as ctl
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jizhid exited with {proc.returncode} before ready; see {log_path}")
        if time.monotonic() - t_spawn > READY_TIMEOUT_S:
            raise RuntimeError(f"jizhid not ready within {READY_TIMEOUT_S:g} s; see {log_path}")
        try:
            if ctl.call(run_dir, "status", None, 2.0).get("health") == "ready":
                return round(time.monotonic() - t_spawn, 2)
        except (ConnectionError, ctl.ControlError, OSError):
            pass
        time.sleep(0.1)


def wait_pools_full(proc, endpoint, run_dir, t_spawn, log_path):
    """Seconds from spawn until every group has its pool's workers registered (the broker's ``info``)."""
    import msgpack
    from jizhi.client import Client
    with open(os.path.join(run_dir, "plan.msgpack"), "rb") as f:
        plan = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    want = {(p, g): grp["pool"] for p, pl in plan["pipelines"].items() for g, grp in pl["groups"].items()}
    with Client(endpoint, timeout_s=2.0) as c:
        while True:
            try:
                info = c.info()
                if {(p, g): v["workers"] for p, pv in info["pipelines"].items()
                        for g, v in pv["groups"].items()} == want:
                    return round(time.monotonic() - t_spawn, 2)
            except TimeoutError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"jizhid exited with {proc.returncode}; see {log_path}")
            if time.monotonic() - t_spawn > READY_TIMEOUT_S:
                raise RuntimeError(f"pools not full within {READY_TIMEOUT_S:g} s; see {log_path}")
            time.sleep(0.1)


def wait_hot_tier(proc, log_path, t_spawn, timeout_s=600.0):
    """Seconds from spawn until the log reports the hot tier's first generation (None: not within timeout_s)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and proc.poll() is None:
        with open(log_path, errors="replace") as f:
            if "hot tier generation 1:" in f.read():
                return round(time.monotonic() - t_spawn, 2)
        time.sleep(0.2)
    return None


def hot_generations(log_path):
    with open(log_path, errors="replace") as f:
        return [{"generation": int(m[0]), "keys": int(m[1]), "cube_keys": int(m[2]), "mib": int(m[3]),
                 "build_ms": int(m[4])} for m in HOT_LINE.findall(f.read())]


def memory(root, instance, names):
    """{process name: figures} of every process of the jizhid ``root`` (names from ``status``), and /dev/shm."""
    from jizhi.tools.procfs import MemorySampler
    sampler = MemorySampler(root, instance)
    sampler.tick(True)
    sample, pss = sampler.samples[-1], sampler.pss[-1]["procs"]
    procs = {}
    for pid, (role, rss, anon, file, shmem, _, _) in sorted(sample["procs"].items()):
        name = names.get(pid, role)
        _, p, p_shmem = pss.get(pid, (role, None, None))
        procs[f"{name} [{pid}]"] = {"name": name, "pid": pid, "rss": rss, "rss_anon": anon, "rss_file": file,
                                    "rss_shmem": shmem, "pss": p, "pss_shmem": p_shmem}
    return {"procs": procs, "shm_bytes": sample["shm"],
            "rss_total": sum(p["rss"] for p in procs.values()),
            "pss_total": sum(p["pss"] or 0 for p in procs.values())}


def cube_counters(run_dir, pipeline):
    c = control(run_dir, "stats")["cube"][pipeline]
    return c["lookups"], c["hot_hits"]


def ratio(before, after):
    lookups = after[0] - before[0]
    return round((after[1] - before[1]) / lookups, 4) if lookups > 0 else None


def bench(args, endpoint, run_dir, trace, pipeline, json_path, extra):
    cmd = [sys.executable, "-m", "jizhi.tools.bench", "--endpoint", endpoint, "--trace", trace, "--pipeline", pipeline,
           "--slo-ms", str(args.slo_ms), "--duration", str(args.duration), "--allow-repeat", "--cpu", "--run-dir",
           run_dir, "--json", json_path, "--quiet"] + extra
    if args.max_other_cores is not None:
        cmd += ["--max-other-cores", str(args.max_other_cores)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(json_path) as f:
        return json.load(f)["runs"][0]


def serve(args, name, vdir, trace, variant, work):
    """One jizhid serving ``variant`` on the bundle ``vdir``: its figures (module docstring)."""
    from jizhi import shm
    from jizhi.tools.testbed import free_port, jizhid_argv, stop_session
    os.makedirs(work, exist_ok=True)
    path, pipeline = pipeline_file(work, variant, args.item_mb)
    config = os.path.join(work, "jizhi.toml")
    with open(config, "w") as f:
        f.write(f'[metrics]\nlisten = ""\n\n[cube]\nhot_tier_mb = {args.hot_tier_mb}\n'
                f'hot_rebuild_s = {float(args.hot_rebuild_s)}\n')
    instance = f"catb{os.getpid()}{name[0]}{variant[0]}"
    run_dir = tempfile.mkdtemp(prefix="jz-cat-")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_path = os.path.join(work, "jizhid.log")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    argv = jizhid_argv() + ["--config", config, "--models", os.path.dirname(os.path.dirname(vdir)),
                            "--instance", instance, "--frontend", endpoint, "--pipelines", path, "--run-dir", run_dir]
    row = {"catalogue": name, "variant": variant, "pipeline": pipeline, "instance": instance, "argv": argv,
           "loadavg_before": loadavg(), "error": None}
    say(f"{name}/{variant}: starting jizhid ({pipeline}, cube.hot_tier_mb = {args.hot_tier_mb})")
    log = open(log_path, "w")
    t_spawn = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env,
                            start_new_session=True)
    try:
        row["ready_s"] = wait_status_ready(proc, run_dir, t_spawn, log_path)
        row["pools_full_s"] = wait_pools_full(proc, endpoint, run_dir, t_spawn, log_path)
        row["hot_tier_s"] = wait_hot_tier(proc, log_path, t_spawn)
        say(f"{name}/{variant}: ready {row['ready_s']} s, pools full {row['pools_full_s']} s, "
            f"hot tier {row['hot_tier_s']} s")
        status = control(run_dir, "status")
        names = {status["pid"]: "supervisor", **{p["pid"]: p["name"] for p in status["processes"]}}
        row["memory_idle"] = memory(status["pid"], instance, names)
        c0 = cube_counters(run_dir, pipeline)
        say(f"{name}/{variant}: find-max (p99 <= {args.slo_ms:g} ms, {args.duration:g} s points)")
        run = bench(args, endpoint, run_dir, trace, pipeline, os.path.join(work, "find-max.json"),
                    ["--find-max", "--start-rate", str(args.start_rate), "--precision", str(args.precision),
                     "--max-points", str(args.max_points)])
        c1 = cube_counters(run_dir, pipeline)
        best = run.get("max") or {}
        row.update(max_pairs_s=best.get("goodput_pairs_s"), max_rps=best.get("offered_rps"),
                   p99_at_max_ms=best.get("p99_ms"), find_max_note=run.get("note"),
                   cpu_us_per_request_at_max=(best.get("cpu") or {}).get("server_us_per_request"),
                   supervisor_ms_per_s_at_max=((best.get("cpu") or {}).get("kinds", {}).get("supervisor") or {})
                   .get("ms_per_s"),
                   points=[{k: p.get(k) for k in ("offered_rps", "goodput_pairs_s", "p99_ms", "pass", "other_cores",
                                                  "loadavg_1m")} for p in run.get("points", [])],
                   hot_ratio_find_max=ratio(c0, c1))
        rate = max(1.0, round(args.steady_fraction * (row["max_rps"] or args.start_rate), 1))
        say(f"{name}/{variant}: max {row['max_pairs_s']} pairs/s (p99 {row['p99_at_max_ms']} ms); "
            f"steady point at {rate:g} requests/s")
        c2 = cube_counters(run_dir, pipeline)
        point = bench(args, endpoint, run_dir, trace, pipeline, os.path.join(work, "steady.json"),
                      ["--rate", str(rate), "--duration", str(args.steady_s)])["points"][0]
        c3 = cube_counters(run_dir, pipeline)
        row.update(steady_rps=rate, steady_p99_ms=point.get("p99_ms"), hot_ratio_steady=ratio(c2, c3),
                   hot_generations=hot_generations(log_path))
        status = control(run_dir, "status")
        names = {status["pid"]: "supervisor", **{p["pid"]: p["name"] for p in status["processes"]}}
        row["memory_loaded"] = memory(status["pid"], instance, names)
        row["restarts"] = sum(p.get("restarts", 0) for p in status["processes"])
    except Exception as e:      # one variant failing must not lose the others' figures
        row["error"] = f"{type(e).__name__}: {e}"
        say(f"{name}/{variant}: FAILED: {row['error']}")
    finally:
        if proc.poll() is None:
            stop_session(proc)
        log.close()
        left = sorted(p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{instance}.*"))
        if left:
            shm.remove_instance(instance)
            say(f"warning: jizhid {instance} left {len(left)} shared-memory segments; removed them")
        row["shm_left"] = left
        row["exit_code"] = proc.returncode
        shutil.rmtree(run_dir, ignore_errors=True)
        row["loadavg_after"] = loadavg()
    return row


def catalogue(args, name, users, items, vocab_scale):
    base = os.path.join(args.out, name)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    say(f"{name}: jizhictl demo init --users {users:,} --items {items:,} --vocab-scale {vocab_scale}")
    out = {"users": users, "items": items, "vocab_scale": vocab_scale, "loadavg_before": loadavg()}
    out["init_s"], out["init_peak_rss"] = timed(
        jizhictl_argv() + ["demo", "init", os.path.join(base, "bundle"), "--users", str(users), "--items", str(items),
                           "--vocab-scale", str(vocab_scale)], os.path.join(base, "init.log"))
    vdir = os.path.join(base, "bundle", "models", "demo", "1")
    out["sizes"] = bundle_sizes(vdir)
    from jizhi.cube.build import describe
    out["cube_keys"] = describe(os.path.join(vdir, "cube"))["keys"]
    trace = os.path.join(base, "trace.npz")
    out["trace_s"], out["trace_peak_rss"] = timed(
        jizhictl_argv() + ["demo", "trace", vdir, trace, "--requests", str(args.requests)],
        os.path.join(base, "trace.log"))
    say(f"{name}: init {out['init_s']} s (peak RSS {out['init_peak_rss'] / 2**20:,.0f} MiB), "
        f"{out['sizes']['total'] / 2**20:,.0f} MiB, trace {out['trace_s']} s")
    out["variants"] = {v: serve(args, name, vdir, trace, v, os.path.join(base, v)) for v in args.variants}
    if args.profile_build and name == "big":
        say(f"{name}: docs/run-profile-build-bench.py --users {users:,} --items {items:,} (parquet)")
        log = os.path.join(base, "profile-build.log")
        try:
            out["profile_build_s"], _ = timed([sys.executable, os.path.join(HERE, "run-profile-build-bench.py"),
                                              "--bundle", vdir, "--out", os.path.join(base, "profile-build"),
                                              "--users", str(users), "--items", str(items), "--formats", "parquet"],
                                             log)
            with open(log) as f:
                out["profile_build_output"] = f.read()[-4000:]
        except RuntimeError as e:
            out["profile_build_error"] = str(e)
    if args.clean:
        for d in ("bundle", "profile-build"):
            shutil.rmtree(os.path.join(base, d), ignore_errors=True)
    return out


def mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def tables(results):
    lines = ["| catalogue | demo init | peak RSS of init | user profiles | item profiles | cube (keys) | trace |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in results.items():
        s = c["sizes"]
        lines.append(f"| {name}: {c['users']:,} users, {c['items']:,} items | {c['init_s']} s | "
                     f"{mib(c['init_peak_rss'])} MiB | {mib(s['user_profiles'])} MiB | {mib(s['item_profiles'])} MiB | "
                     f"{mib(s['cube'])} MiB ({c['cube_keys']:,}) | {c['trace_s']} s |")
    lines += ["", "| catalogue | pipeline | start: ready / pools full / hot tier | hot tier (last generation) | "
                  "hot hit ratio: find-max, steady | max pairs/s (p99) | server CPU us/request at the max "
                  "(supervisor ms/s) | RSS / PSS all processes, loaded | /dev/shm | load avg before, after |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for name, c in results.items():
        for v, r in c["variants"].items():
            if r.get("error"):
                lines.append(f"| {name} | {r['pipeline']} | FAILED: {r['error']} | | | | | | | |")
                continue
            g = (r.get("hot_generations") or [None])[-1]
            hot = "-" if g is None else f"g{g['generation']}: {g['keys']:,} of {g['cube_keys']:,} keys, {g['mib']} MiB"
            m = r["memory_loaded"]
            lines.append(
                f"| {name} | {r['pipeline']} | {r['ready_s']} / {r['pools_full_s']} / {r['hot_tier_s']} s | {hot} | "
                f"{r['hot_ratio_find_max']}, {r['hot_ratio_steady']} | "
                f"{(r['max_pairs_s'] or 0):,.0f} ({r['p99_at_max_ms']} ms) | "
                f"{(r.get('cpu_us_per_request_at_max') or 0):,.0f} ({r.get('supervisor_ms_per_s_at_max')}) | "
                f"{mib(m['rss_total'])} / {mib(m['pss_total'])} MiB | "
                f"{mib(m['shm_bytes'])} MiB | {r['loadavg_before'][0]}, {r['loadavg_after'][0]} |")
    lines += ["", "| catalogue | pipeline | process | RSS idle | RSS loaded (anon, file, shmem) | PSS idle | "
                  "PSS loaded (shmem) |", "|---|---|---|---:|---:|---:|---:|"]
    for name, c in results.items():
        for v, r in c["variants"].items():
            if r.get("error"):
                continue
            idle = {p["name"]: p for p in r["memory_idle"]["procs"].values()}
            for p in r["memory_loaded"]["procs"].values():
                i = idle.get(p["name"], {})
                lines.append(f"| {name} | {r['pipeline']} | {p['name']} | {mib(i.get('rss'))} | {mib(p['rss'])} "
                             f"({mib(p['rss_anon'])}, {mib(p['rss_file'])}, {mib(p['rss_shmem'])}) | "
                             f"{mib(i.get('pss'))} | {mib(p['pss'])} ({mib(p['pss_shmem'])}) |")
    for name, c in results.items():
        if c.get("profile_build_output") or c.get("profile_build_error"):
            lines += ["", f"{name}: docs/run-profile-build-bench.py ({c.get('profile_build_s')} s in all)",
                      *[x for x in (c.get("profile_build_output") or "").splitlines() if x.startswith(("|", "#"))],
                      *([c["profile_build_error"]] if c.get("profile_build_error") else [])]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--users", type=int, default=10_000_000, help="the big catalogue's users")
    ap.add_argument("--items", type=int, default=1_000_000, help="the big catalogue's items")
    ap.add_argument("--vocab-scale", type=int, default=1, help="the big catalogue's jizhictl demo init --vocab-scale")
    ap.add_argument("--catalogues", default="big,default", help="big, default or both")
    ap.add_argument("--variants", default="demo,items", help="pipeline variants: demo, items or both")
    ap.add_argument("--hot-tier-mb", type=int, default=64, help="cube.hot_tier_mb of every jizhid")
    ap.add_argument("--hot-rebuild-s", type=float, default=10.0, help="cube.hot_rebuild_s of every jizhid")
    ap.add_argument("--item-mb", type=int, default=4096, help="item_rows_mb and item_cache_mb of the items variant")
    ap.add_argument("--requests", type=int, default=4000, help="trace requests (replayed with --allow-repeat)")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per find-max point")
    ap.add_argument("--start-rate", type=float, default=40.0)
    ap.add_argument("--precision", type=float, default=0.1)
    ap.add_argument("--max-points", type=int, default=6)
    ap.add_argument("--steady-s", type=float, default=20.0, help="seconds of the steady point after the find-max")
    ap.add_argument("--steady-fraction", type=float, default=0.5, help="its rate, a fraction of the max")
    ap.add_argument("--max-other-cores", type=float, default=None,
                    help="a shared machine: passed to jizhictl bench (wait for quiet, re-run disturbed points)")
    ap.add_argument("--profile-build", action="store_true",
                    help="also docs/run-profile-build-bench.py on the big catalogue (long at 10 M users)")
    ap.add_argument("--clean", action="store_true", help="remove the bundles at the end (they are GiB)")
    args = ap.parse_args()
    args.out = os.path.realpath(args.out)
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - {"demo", "items"}:
        ap.error("--variants: demo and/or items")
    os.makedirs(args.out, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # stop like Ctrl-C: the finally blocks stop jizhid
    from jizhi.tools.procfs import environment
    started = time.time()
    env = environment()
    say(f"{env['date']} {env['cpus']} cores, {env['mem_gib']} GiB, load {loadavg()}")
    sizes = {"big": (args.users, args.items, args.vocab_scale), "default": (DEFAULT_USERS, DEFAULT_ITEMS, 1)}
    results = {}
    for name in (c for c in args.catalogues.split(",") if c):
        results[name] = catalogue(args, name, *sizes[name])
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    doc = {"git": git.strip(), "environment": env, "args": vars(args), "loadavg_end": loadavg(),
           "minutes": round((time.time() - started) / 60, 1), "results": results}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print()
    print(tables(results))
    print(f"\n({doc['minutes']} min; load average at the end {doc['loadavg_end']}; "
          f"{os.path.join(args.out, 'results.json')})")
    return 1 if any(r.get("error") for c in results.values() for r in c["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
