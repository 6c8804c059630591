"""The tuner's testbed: one jizhid per measurement, one open-loop point on it (``jizhictl tune``).

Runs in the tuner's process, never inside jizhid, and owns every jizhid it
starts. A measurement (``Testbed.measure``) starts its own jizhid (a fresh
instance name, a free loopback port, a private run directory, the config
with ``metrics.listen = ""``), waits until it is ready, every pool is full
and the hot tier's first generation is built, then runs one open-loop point
of ``jizhi.tools.bench.LoadGenerator``: ``warmup_s`` seconds not counted,
``duration_s`` seconds measured at ``rate`` requests/s, with the CPU of every
process of the run read from /proc (``ServerCpu``). Every measurement
replays the same requests at the same arrival times (a fresh generator per
daemon), so the figures compare like with like. It then stops the daemon
(SIGTERM, a bounded wait, then SIGKILL to its process group) and checks that
nothing of the instance is left in /dev/shm (removing it if so, and saying
so). The record it returns carries the tuner's figure, server CPU-seconds
per 1,000 goodput pairs (``cpu_s_per_1000_pairs``).
"""
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jizhi.tomlw import toml_text
from jizhi.tools.tunespace import ARENA

READY_TIMEOUT_S = 180.0     # a first start on a machine compiles the Numba kernels
HOT_TIER_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0       # drain bound (workers.drain_timeout_s, 10 s) + child stop bound + slack


def measurement_config(doc):
    """The config a measured jizhid gets: ``doc`` with the Prometheus endpoint off
    (one port per host; the tuner's daemons must not clash with a serving one)."""
    out = copy.deepcopy(doc or {})
    out.setdefault("metrics", {})["listen"] = ""
    return out


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jizhid_argv():
    """How to start jizhid: the script beside this interpreter, else the one on PATH, else this
    interpreter running jizhid's main (a checkout without the scripts installed)."""
    beside = Path(sys.executable).parent / "jizhid"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("jizhid")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from jizhi.daemon import main; sys.exit(main())"]


def cpu_s_per_1000_pairs(point):
    """Server CPU-seconds per 1,000 goodput pairs of a ``run_point`` result with
    ``cpu`` (every process of the run: supervisor, broker, workers), or None
    when nothing was scored. Also returns the CPU seconds and the pairs."""
    c = point.get("cpu")
    pairs = point["goodput_pairs_s"] * point["duration_s"]
    if not c:
        return None, None, pairs
    server_s = c["server_us_per_request"] * max(point["ok"], 1) / 1e6
    return (server_s / pairs * 1000.0 if pairs > 0 else None), server_s, pairs


class Testbed:
    """Starts one jizhid per measurement, loads it and stops it.

    Runs in the tuner's process; each jizhid runs in its own session (process
    group) so that stopping it can never touch anything else. Measurements
    run one at a time (they share the machine's cores by design: the CPU of
    one run must not be inflated by another).
    """

    def __init__(self, *, models, trace, pipeline_name, rate, slo_ms, duration_s, warmup_s, work_dir,
                 deadline_ms=1000.0, top_k=10, allow_repeat=False, ready_timeout_s=READY_TIMEOUT_S,
                 max_other_cores=None, settle_s=60.0, retries=2, progress=False, log=None):
        self.models = str(Path(models).resolve())
        self.trace = trace
        self.pipeline_name = pipeline_name
        self.rate = rate
        self.slo_ms = slo_ms
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.work_dir = Path(work_dir)
        self.deadline_ms = deadline_ms
        self.top_k = top_k
        self.allow_repeat = allow_repeat
        self.ready_timeout_s = ready_timeout_s
        self.max_other_cores = max_other_cores
        self.settle_s = settle_s
        self.retries = retries
        self.progress = progress
        self.log = log or (lambda text: None)
        self.count = 0

    def measure_settled(self, tag, *args, **kw):
        """``measure`` on a machine quiet enough: with ``max_other_cores`` set, wait
        (at most ``settle_s``) until other processes use at most that many cores,
        and measure again (``retries`` times) when they used more while it ran.
        Noise inflates both CPU per pair and p99, so a disturbed record is not kept
        when a clean one can be had; the earlier attempts stay in the record."""
        from jizhi.tools.procfs import wait_for_quiet
        earlier = []
        for attempt in range(self.retries + 1):
            if self.max_other_cores is not None:
                wait_for_quiet(self.max_other_cores, self.settle_s, None, self.log)
            rec = self.measure(tag if not attempt else f"{tag}-again{attempt}", *args, **kw)
            other = rec.get("other_cores")
            rec["disturbed"] = bool(self.max_other_cores is not None and other is not None
                                    and other > self.max_other_cores)
            rec["earlier_attempts"] = earlier
            if not rec["disturbed"] or attempt == self.retries:
                return rec
            self.log(f"  {tag}: other processes used {other:.2f} cores while it ran: measuring it again")
            earlier.append({k: rec.get(k) for k in ("tag", "cpu_s_per_1000_pairs", "p99_ms", "other_cores")})
        return rec

    def measure(self, tag, pipeline_path, config_doc, arena, hot_tier_mb, early_stop=False):
        """One measurement; returns its record (never raises for a daemon that fails).

        ``pipeline_path``: the pipeline TOML jizhid serves; ``config_doc``: its
        config (written with ``metrics.listen = ""``); ``arena``: MALLOC_ARENA_MAX
        (0: unset; None: inherited from this process, the shipped default);
        ``hot_tier_mb``: to know whether to wait for the first hot tier.
        """
        from jizhi.tools.bench import LoadGenerator
        from jizhi.tools.procfs import ServerCpu
        self.count += 1
        instance = f"tune{os.getpid()}n{self.count}"
        files = self.work_dir / "evals" / tag
        files.mkdir(parents=True, exist_ok=True)
        cfg = files / "jizhi.toml"
        cfg.write_text(toml_text(measurement_config(config_doc)))
        if Path(pipeline_path).resolve().parent != files.resolve():   # (an evaluation's overlay is there already)
            shutil.copyfile(pipeline_path, files / "pipeline.toml")
        run_dir = Path(tempfile.mkdtemp(prefix=f"jizhi-{instance}-"))   # short: ipc paths live here
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ)
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):   # never talk to the caller's systemd
            env.pop(var, None)
        if arena is not None:
            if arena:
                env[ARENA] = str(arena)
            else:
                env.pop(ARENA, None)
        argv = jizhid_argv() + ["--models", self.models, "--instance", instance, "--frontend", endpoint,
                                "--pipelines", str(Path(pipeline_path).resolve()), "--run-dir", str(run_dir),
                                "--config", str(cfg.resolve())]
        rec = {"tag": tag, "instance": instance, "endpoint": endpoint, "arena": env.get(ARENA, ""),
               "log": str(files / "jizhid.log"), "started": False, "error": None}
        t_spawn = time.monotonic()
        log_f = open(files / "jizhid.log", "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT, env=env,
                                cwd=run_dir, start_new_session=True)
        try:
            why = self._wait_serving(proc, endpoint, run_dir, files / "jizhid.log", hot_tier_mb)
            if why:
                rec["error"] = why
                return rec
            rec["started"] = True
            rec["startup_s"] = round(time.monotonic() - t_spawn, 1)
            gen = LoadGenerator(endpoint, self.trace, deadline_ms=self.deadline_ms, top_k=self.top_k,
                                slo_ms=self.slo_ms, cpu=ServerCpu(run_dir), progress=self.progress,
                                allow_repeat=self.allow_repeat)
            try:
                point = gen.run_point(self.pipeline_name, self.rate, self.duration_s, self.warmup_s,
                                      early_stop=early_stop, label=f"{tag} @ {self.rate:g}/s")
            finally:
                gen.close()
            rec.update(self._figures(point))
        finally:
            rec.update(self._stop(proc, instance, run_dir))
            log_f.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        return rec

    def _wait_serving(self, proc, endpoint, run_dir, log_path, hot_tier_mb):
        """Wait until jizhid is ready, every pool is full and (hot tier on) its first
        generation is built. Returns None, or why it is not serving."""
        import msgpack
        from jizhi.client import Client, wait_ready
        end = time.monotonic() + self.ready_timeout_s
        while not wait_ready(endpoint, timeout_s=1.0):
            if proc.poll() is not None:
                return f"jizhid exited with {proc.returncode} before it was ready:\n{_tail(log_path)}"
            if time.monotonic() > end:
                return f"jizhid not ready within {self.ready_timeout_s:g} s:\n{_tail(log_path)}"
        plan = msgpack.unpackb((run_dir / "plan.msgpack").read_bytes(), raw=False, strict_map_key=False)
        want = {(p, g): grp["pool"] for p, pl in plan["pipelines"].items() for g, grp in pl["groups"].items()}
        with Client(endpoint, timeout_s=2.0) as c:
            while True:
                try:
                    info = c.info()
                    have = {(p, g): v["workers"] for p, pv in info["pipelines"].items()
                            for g, v in pv["groups"].items()}
                    if have == want:
                        break
                except TimeoutError:
                    pass
                if proc.poll() is not None:
                    return f"jizhid exited with {proc.returncode} while its pools filled:\n{_tail(log_path)}"
                if time.monotonic() > end:
                    return f"pools not full within {self.ready_timeout_s:g} s (want {want}):\n{_tail(log_path)}"
                time.sleep(0.1)
        uses_cube = any(st["processor"] in ("cube_accessor", "legacy_scorer")
                        for pl in plan["pipelines"].values() for st in pl["stages"].values())
        if hot_tier_mb and uses_cube:
            # Built by a child after start; a measurement must not include the build or LMDB-only time.
            hot_end = time.monotonic() + HOT_TIER_TIMEOUT_S
            while "hot tier generation 1" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None:
                    return f"jizhid exited with {proc.returncode}:\n{_tail(log_path)}"
                if time.monotonic() > hot_end:
                    self.log(f"  note: no hot tier built within {HOT_TIER_TIMEOUT_S:g} s; measuring anyway")
                    break
                time.sleep(0.1)
        return None

    def _figures(self, point):
        cpu_1000, server_s, pairs = cpu_s_per_1000_pairs(point)
        feasible = bool(point["pass"])
        kinds = (point.get("cpu") or {}).get("kinds", {})
        return {"cpu_s_per_1000_pairs": None if cpu_1000 is None else round(cpu_1000, 6),
                "server_cpu_s": None if server_s is None else round(server_s, 3), "pairs": int(round(pairs)),
                "p50_ms": point["p50_ms"], "p99_ms": point["p99_ms"], "p99_9_ms": point["p99_9_ms"],
                "requests": point["requests"], "ok": point["ok"], "errors": point["errors"], "lost": point["lost"],
                "aborted": point["aborted"], "goodput_pairs_s": point["goodput_pairs_s"],
                "feasible": feasible,
                "cpu_by_kind_ms_per_s": {k: v["ms_per_s"] for k, v in kinds.items()},
                "cores_busy": (point.get("cpu") or {}).get("cores_busy"),
                "other_cores": (point.get("cpu") or {}).get("foreign_cores", point.get("machine_busy_cores")),
                "send_lag_p99_ms": point["send_lag_p99_ms"]}

    def _stop(self, proc, instance, run_dir):
        """SIGTERM, a bounded wait, then SIGKILL to the run's process group; then
        the instance's /dev/shm entries (removed if any, and reported)."""
        from jizhi import shm
        from jizhi.tools.procfs import ServerCpu
        out = {"killed": False}
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                out["killed"] = True
        if out["killed"] or ServerCpu(run_dir).processes():
            out["killed"] = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # our own session: jizhid and its children only
            except ProcessLookupError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        out["exit_code"] = proc.returncode
        left = sorted(p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{instance}.*"))
        if left:
            shm.remove_instance(instance)
            self.log(f"  warning: jizhid {instance} left {len(left)} shared-memory segments; removed them")
        out["shm_left"] = left
        return out


def wait_for_hot_tiers(log_path, want, timeout_s=300):
    """jizhid says ready before the hot tiers are built: wait until its log reports ``want`` first
    generations (one per pipeline with a cube stage); False when ``timeout_s`` passed first (the docs'
    benchmark scripts then measure anyway, saying so)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with open(log_path, errors="replace") as f:
            if sum("hot tier generation 1:" in line for line in f) >= want:
                return True
        time.sleep(1)
    return False


def demo_inputs(out, bundle=None, trace=None, requests=20_000):
    """The docs' benchmark scripts' inputs: ``(bundle, trace)`` as given, or the default demo's, made once in
    ``out`` (``jizhictl demo init OUT --trace-requests N``: ``OUT/models/demo/1``, ``OUT/trace.npz``)."""
    if bundle is not None:
        return bundle, trace
    if not os.path.exists(os.path.join(out, "models", "demo", "1", "manifest.toml")):
        subprocess.run([sys.executable, "-c", "import sys; from jizhi.tools.commands import main; "
                        "sys.exit(main(sys.argv[1:]))", "demo", "init", out, "--trace-requests", str(requests)],
                       check=True)
    return os.path.join(out, "models", "demo", "1"), os.path.join(out, "trace.npz")


def stop_session(proc, timeout_s=STOP_TIMEOUT_S):
    """SIGTERM to a jizhid started in its own session, a bounded wait, then SIGKILL to that session's
    process group (the docs' benchmark scripts)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _tail(path, lines=30):
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + x for x in text)
