"""Fixtures that start the real thing: tests drive a real jizhid with the real jizhictl and client,
wait for a condition by polling it (``wait_until``), never for a fixed time, and leave nothing behind.

* ``demo_bundle`` / ``demo_models`` / ``demo_trace`` / ``reference``: the full-size
  demo bundle, a small trace against it and the independent reference scorer,
  made once per session.
* ``launch`` (per test) and ``launch_module`` (per module): factories that start
  ``jizhid`` as a subprocess in its own process group, with a unique instance
  name (so its shared-memory segments are ``jizhi.<instance>.*``), a free
  loopback port, its own run directory and log file, optional config TOML
  text and pipelines. ``start`` returns once the daemon answers
  ``info()["ready"]``. Teardown sends SIGTERM to the supervisor, waits
  (bounded), kills the process group, and asserts that the supervisor exited
  0 and that no ``/dev/shm/jizhi.<instance>.*`` entry is left.
* ``wait_until(predicate, timeout_s)``: polling, never a fixed sleep.
* ``Clock``: a clock a unit test moves by hand, for the loops it steps without
  processes.

Test modules import the plain helpers with ``from conftest import ...``.
"""
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from jizhi.client import Client
from jizhi.tools.demo import generate_trace, init_demo
from jizhi.tools.reference import ReferenceScorer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Test stages are named by import path (tests.stages:Class); the compiler
    # imports them in this process too.
    sys.path.append(str(REPO))

JIZHID = Path(sys.executable).parent / "jizhid"
SHM = Path("/dev/shm")
READY_TIMEOUT_S = 90.0   # the first start on a machine compiles the Numba kernels
STOP_TIMEOUT_S = 30.0    # drain bound (10 s) + child stop bound (5 s) + slack
TRACE_REQUESTS = 24
TRACE_CANDIDATES = 300
# The session's demo bundle: smaller than jizhictl demo's (10,000 users, 100,000 items) so that what a
# start or a reload does per item (validation's smoke scores every item, the hot tier holds the whole
# cube, item tables) costs a fifth; the benchmarks use the full size (docs/benchmarks.md).
DEMO_USERS = int(os.environ.get("JIZHI_TEST_DEMO_USERS", 2_000))
DEMO_ITEMS = int(os.environ.get("JIZHI_TEST_DEMO_ITEMS", 20_000))

DEMO_STAGES = (("reader", "data_reader"), ("features", "feature_processor"),
               ("cube", "cube_accessor"), ("dnn", "model_inference"), ("rank", "ranker"))

_instances = itertools.count(1)
_live = []  # servers not yet torn down, for log tails on failure


# ---------------------------------------------------------------------------
# Plain helpers


def proc_state(pid):
    """The one-letter state of process ``pid`` from /proc (R, S, T stopped, Z, ...); FileNotFoundError when gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_until(predicate, timeout_s, interval_s=0.05, what=None):
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError naming ``what`` (or the predicate) after ``timeout_s``.
    Exceptions from the predicate propagate (a predicate may fail fast).
    """
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(interval_s)


class Clock:
    """A clock the test moves by hand (``advance``), read as ``clock()``: the time of a loop that a unit
    test steps without processes (the broker's, the supervisor's)."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, s):
        self.now += s


_PORTS_GIVEN = set()


def free_port():
    """A loopback port free now and not handed out before by this process (the kernel may give the same
    ephemeral port twice once the probe's socket is closed: a metrics port and a frontend port met so)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def demo_pipeline_text(name, on_unknown="default", fused=True, pool=1, batch=4, processors=None, options=None):
    """The demo DAG as pipeline TOML text (fused into one group, or one group per stage).

    ``processors``: {stage: processor} replacing the built-in one; ``options``: {stage: [TOML lines]}.
    """
    processors, options = processors or {}, options or {}
    lines = [f'name = "{name}"', 'model = "demo"', 'version = "latest"', f'on_unknown = "{on_unknown}"', ""]
    for i, (stage, processor) in enumerate(DEMO_STAGES):
        lines += ["[[stage]]", f'name = "{stage}"', f'processor = "{processors.get(stage, processor)}"']
        lines += options.get(stage, [])
        if i + 1 < len(DEMO_STAGES):
            lines.append(f'next = ["{DEMO_STAGES[i + 1][0]}"]')
        if not fused:
            lines += [f"pool = {pool}", f"batch = {batch}"]
        lines.append("")
    if fused:
        names = ", ".join(f'"{s}"' for s, _ in DEMO_STAGES)
        lines += ["[[fuse]]", 'name = "scorer"', f"stages = [{names}]", f"pool = {pool}", f"batch = {batch}", ""]
    return "\n".join(lines)


def write_text(path, text):
    path = Path(path)
    path.write_text(text)
    return path


def positions(items, ids):
    """Index of each of ``ids`` in ``items`` (distinct ids); asserts every id is one of them."""
    items = np.asarray(items, dtype=np.uint64)
    ids = np.asarray(ids, dtype=np.uint64)
    order = np.argsort(items, kind="stable")
    where = np.minimum(np.searchsorted(items[order], ids), items.shape[0] - 1)
    pos = order[where]
    assert np.array_equal(items[pos], ids), "the reply names ids that are not among the candidates"
    return pos


def assert_topk(reply, items, expected_scores, top_k, atol=1e-5):
    """The reply is the top-``top_k`` of ``expected_scores`` (NaN = not rankable), best first.

    Scores equal the expected ones to ``atol``; the server's own scores are
    non-increasing; the returned scores are the k largest expected ones (ties
    within ``atol`` may be broken either way); ids are distinct candidates.
    """
    expected_scores = np.asarray(expected_scores, dtype=np.float32)
    rankable = expected_scores[~np.isnan(expected_scores)]
    k = min(top_k, rankable.shape[0])
    assert reply.item_ids.shape == (k,)
    assert reply.scores.shape == (k,)
    assert np.unique(reply.item_ids).shape == (k,)
    pos = positions(items, reply.item_ids)
    np.testing.assert_allclose(reply.scores, expected_scores[pos], rtol=0, atol=atol)
    assert np.all(np.diff(reply.scores) <= 0), "scores are not best first"
    best = np.sort(rankable)[::-1][:k]
    np.testing.assert_allclose(expected_scores[pos], best, rtol=0, atol=atol)


def unknown_ids(reference, count, seed=0):
    """``count`` distinct uint64 ids absent from the demo item profile."""
    known = reference.profiles["item"]["ids"]
    rng = np.random.default_rng(seed)
    out = np.zeros(0, dtype=np.uint64)
    while out.shape[0] < count:
        cand = rng.integers(1, 2 ** 63, size=count * 2, dtype=np.uint64)
        cand = cand[~np.isin(cand, known)]
        out = np.unique(np.concatenate([out, cand]))
    return rng.permutation(out)[:count]


def shm_segments(instance):
    return sorted(p.name for p in SHM.glob(f"jizhi.{instance}.*"))


def processes_mentioning(text):
    """{pid: argv} of live processes whose command line contains ``text``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if any(text in a for a in argv):
            out[int(d.name)] = argv
    return out


def _flag(argv, name):
    i = argv.index(name)
    return argv[i + 1]


# ---------------------------------------------------------------------------
# The daemon under test


class JizhiServer:
    """One jizhid subprocess (its own process group) and what a test needs to poke it."""

    def __init__(self, *, instance, port, run_dir, models_dir, pipelines, config_text=None):
        self.instance = instance
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "jizhid.log"
        self.plan_path = self.run_dir / "plan.msgpack"
        self.pipelines = [str(p) for p in pipelines]
        self.argv = [str(JIZHID), "--models", str(models_dir), "--instance", instance,
                     "--frontend", self.endpoint, "--pipelines", ",".join(self.pipelines),
                     "--run-dir", str(self.run_dir)]
        config_text = config_text or ""
        if "[metrics]" not in config_text:
            # The default Prometheus port is one per host; tests run several instances at once.
            config_text = '[metrics]\nlisten = ""\n\n' + config_text
        cfg = write_text(self.run_dir / "jizhi.toml", config_text)
        self.argv += ["--config", str(cfg)]
        self.proc = None
        self.returncode = None
        self._log = None
        self._clients = []

    # -- lifecycle ------------------------------------------------------------

    def start(self, ready_timeout_s=READY_TIMEOUT_S):
        env = dict(os.environ)
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # never talk to the runner's systemd
            env.pop(var, None)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.run_dir,
                                     start_new_session=True)
        probe = Client(self.endpoint, timeout_s=1.0)
        try:
            def ready():
                if self.proc.poll() is not None:
                    raise AssertionError(f"jizhid exited with {self.proc.returncode} before it was ready\n"
                                         + self.log_tail())
                try:
                    return probe.info()["ready"]
                except TimeoutError:
                    return False
            try:
                wait_until(ready, ready_timeout_s, interval_s=0.1, what=f"jizhid {self.instance} to be ready")
                # "ready" means one worker per group; tests want every pool at its size.
                wait_until(lambda: self.pool_sizes(probe) == self.desired_pool_sizes(), ready_timeout_s,
                           interval_s=0.1, what=f"every pool of jizhid {self.instance} to be full")
            except AssertionError as e:
                if "before it was ready" in str(e):
                    raise
                raise AssertionError(f"{e}\n{self.log_tail()}") from None
        finally:
            probe.close()
        return self

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s=STOP_TIMEOUT_S):
        """SIGTERM the supervisor and wait (bounded); returns its exit code (None: did not exit)."""
        for c in self._clients:
            c.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return None
        self.returncode = self.proc.returncode
        return self.returncode

    def kill_group(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- observation ----------------------------------------------------------

    def client(self, timeout_s=10.0):
        c = Client(self.endpoint, timeout_s=timeout_s)
        self._clients.append(c)
        return c

    def info(self):
        with Client(self.endpoint, timeout_s=5.0) as c:
            return c.info()

    def segments(self):
        return shm_segments(self.instance)

    def plan(self):
        with open(self.plan_path, "rb") as f:
            return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)

    def desired_pool_sizes(self):
        """{(pipeline, group): pool} from the compiled plan."""
        return {(p, g): group["pool"] for p, plan in self.plan()["pipelines"].items()
                for g, group in plan["groups"].items()}

    def pool_sizes(self, client=None):
        """{(pipeline, group): workers the broker knows}, from info."""
        try:
            info = client.info() if client is not None else self.info()
        except TimeoutError:
            return None
        return {(p, g): v["workers"] for p, pv in info["pipelines"].items() for g, v in pv["groups"].items()}

    def children(self):
        """{pid: argv} of every live child (broker and workers) of this run."""
        return processes_mentioning(str(self.plan_path))

    def workers(self, pipeline=None, group=None):
        """{pid: (pipeline, group, wid)} of this run's live worker processes."""
        out = {}
        for pid, argv in self.children().items():
            if "jizhi.workers.run" not in argv:
                continue
            key = (_flag(argv, "--pipeline"), _flag(argv, "--group"), int(_flag(argv, "--wid")))
            if (pipeline is None or key[0] == pipeline) and (group is None or key[1] == group):
                out[pid] = key
        return out

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=60):
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)


class Launcher:
    """Starts jizhid instances for one test or module and tears every one down."""

    def __init__(self, tmp_path_factory, models_dir):
        self.tmp_path_factory = tmp_path_factory
        self.models_dir = models_dir
        self.servers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, pipelines=("demo",), config_text=None, ready_timeout_s=READY_TIMEOUT_S, wait_ready=True):
        instance = f"t{os.getpid()}x{next(_instances)}"
        run_dir = self.tmp_path_factory.mktemp(f"run-{instance}", numbered=False)
        server = JizhiServer(instance=instance, port=free_port(), run_dir=run_dir,
                             models_dir=self.models_dir, pipelines=pipelines, config_text=config_text)
        assert server.segments() == [], f"segments of {instance} exist before it started"
        self.servers.append(server)
        _live.append(server)
        if wait_ready:
            server.start(ready_timeout_s)
        return server

    def close(self):
        problems = []
        for server in self.servers:
            was_running = server.running
            rc = server.stop() if was_running else (server.proc.returncode if server.proc else None)
            server.kill_group()
            left = server.segments()
            strays = server.children()
            for name in left:  # do not let one failure pollute /dev/shm for the rest of the run
                try:
                    os.unlink(SHM / name)
                except FileNotFoundError:
                    pass
            if was_running and rc != 0:
                problems.append(f"jizhid {server.instance} exited with {rc} on SIGTERM (None: not within "
                                f"{STOP_TIMEOUT_S} s)\n{server.log_tail()}")
            if left:
                problems.append(f"jizhid {server.instance} left shared-memory segments: {left}\n{server.log_tail()}")
            if strays:
                problems.append(f"jizhid {server.instance} left processes after its group was killed: {strays}")
            if server in _live:
                _live.remove(server)
        self.servers = []
        assert not problems, "\n\n".join(problems)


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The session's demo bundle's version directory (str): DEMO_USERS users, DEMO_ITEMS items."""
    return init_demo(tmp_path_factory.mktemp("demo"), users=DEMO_USERS, items=DEMO_ITEMS, progress=False)


@pytest.fixture(scope="session")
def demo_cube_keys(reference):
    """How many keys the demo bundle's cube holds (the whole cube fits the default hot tier)."""
    return int(reference.cube_keys.shape[0])


@pytest.fixture(scope="session")
def demo_models(demo_bundle):
    return Path(demo_bundle).parent.parent


@pytest.fixture
def private_demo_models(demo_models, tmp_path):
    """A private copy of the demo model directory (version 1), for a test that publishes versions."""
    dst = tmp_path / "models"
    shutil.copytree(demo_models / "demo" / "1", dst / "demo" / "1")
    return dst


@pytest.fixture(scope="session")
def reference(demo_bundle):
    return ReferenceScorer(demo_bundle)


class Trace:
    """A trace.npz, by request: ``trace[q] -> (user int, items uint64, recall_scores float32)``."""

    def __init__(self, arrays):
        self.users = arrays["users"]
        self.offsets = arrays["offsets"]
        self.items = arrays["items"]
        self.recall_scores = arrays["recall_scores"]

    def __len__(self):
        return self.users.shape[0]

    def __getitem__(self, q):
        a, b = self.offsets[q], self.offsets[q + 1]
        return int(self.users[q]), self.items[a:b].copy(), self.recall_scores[a:b].copy()


@pytest.fixture(scope="session")
def demo_trace(demo_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    generate_trace(demo_bundle, path, requests=TRACE_REQUESTS, candidates=TRACE_CANDIDATES, progress=False)
    with np.load(path, allow_pickle=False) as data:
        return Trace({name: data[name] for name in data.files})


@pytest.fixture(scope="session")
def trace_scores(demo_trace, reference):
    """Reference scores of every trace request, by request index."""
    return [reference.score(*demo_trace[q][:2])[0] for q in range(len(demo_trace))]


@pytest.fixture
def launch(tmp_path_factory, demo_models):
    with Launcher(tmp_path_factory, demo_models) as launcher:
        yield launcher


@pytest.fixture(scope="module")
def launch_module(tmp_path_factory, demo_models):
    with Launcher(tmp_path_factory, demo_models) as launcher:
        yield launcher


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in list(_live):
            report.sections.append((f"jizhid {server.instance} log", server.log_tail()))
