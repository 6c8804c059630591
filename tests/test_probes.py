"""Health probes on the metrics listener (issue 17, item 5), and ``jizhictl bench --plot`` (item 7).

One jizhid serves ``demo`` (a pool of 2) and ``sleepy`` (one ranker that
sleeps 2 s a batch: a request it holds stays in flight), its metrics
listener on a free port, with a short ``metrics.livez_stall_s``. In order:

* start: ``/readyz`` polled from the moment the process starts answers 503
  with a reason until every pool is full, then 200; ``/livez`` 200;
* paths: ``/metrics`` is the Prometheus text, ``/`` and unknown paths 404;
* ``jizhictl drain``: 503 "draining", ``resume``: 200 again;
* a SIGSTOPped worker (the broker expires it: the pool is not full): 503
  "degraded", and 200 once it runs again;
* a stalled supervisor loop (control commands that wait on a SIGSTOPped
  broker): ``/livez`` 503;
* ``jizhictl bench --rates ... --plot``: a PNG (skipped without matplotlib);
* SIGTERM with a request held in flight: 503 "stopping" (``/livez`` still 200)
  until the drain ends and jizhid exits 0.
"""
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import free_port, wait_until, write_text
from daemon_helpers import broker_pid, held_request, jizhictl, jizhictl_ok, popen, sleepy_pipeline_text
from jizhi import control, protocol

SLEEPY = sleepy_pipeline_text(2)

CONFIG = """
[metrics]
listen = "127.0.0.1:{port}"
livez_stall_s = 1.0

[workers]
heartbeat_interval_s = 0.5
"""

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through an http_proxy


def get(port, path, method="GET"):
    """(status, body, content type) of one request; (None, "", None) when nothing answers."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with _opener.open(req, timeout=5) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type")
    except (urllib.error.URLError, ConnectionError):
        return None, "", None


def answer(port, path, status, text=""):
    """A predicate for wait_until: the (status, body) of ``path`` once it is ``status`` with ``text`` in it."""
    def check():
        st, body, _ = get(port, path)
        return (st, body) if st == status and text in body else None
    return check


@pytest.fixture(scope="module")
def server(launch_module, tmp_path_factory):
    port = free_port()
    sleepy = write_text(tmp_path_factory.mktemp("probes") / "sleepy.toml", SLEEPY)
    server = launch_module.start(pipelines=("demo", str(sleepy)), config_text=CONFIG.format(port=port),
                                 wait_ready=False)
    server.port = port
    seen = []      # (status, body) of /readyz each time it changed, from the moment the process starts
    popen(server)

    def ready():
        if server.proc.poll() is not None:
            raise AssertionError(f"jizhid exited with {server.proc.returncode}\n{server.log_tail()}")
        st, body, _ = get(port, "/readyz")
        if not seen or seen[-1] != (st, body.strip()):
            seen.append((st, body.strip()))
        return st == 200
    wait_until(ready, 90, interval_s=0.05, what="/readyz to answer 200")
    server.readyz_at_start = seen
    return server


def test_readyz_is_503_with_a_reason_until_every_pool_is_full_then_200(server):
    seen = [x for x in server.readyz_at_start if x[0] is not None]   # None: the listener was not up yet
    print("\n/readyz during start:\n  " + "\n  ".join(f"{st} {body}" for st, body in seen))
    assert seen[0][0] == 503, seen
    assert all(body.startswith("starting: ") for st, body in seen if st == 503), seen
    assert seen[-1] == (200, "ready: demo version 1, sleepy version 1")
    assert server.pool_sizes() == server.desired_pool_sizes()
    st, body, _ = get(server.port, "/livez")
    assert st == 200 and body.startswith("alive: "), body


def test_metrics_stay_on_slash_metrics_and_other_paths_are_404(server):
    st, body, ctype = get(server.port, "/metrics")
    assert st == 200 and ctype.startswith("text/plain; version=0.0.4"), ctype
    assert "# TYPE jizhi_request_latency_seconds histogram" in body
    assert "jizhi_ready 1.0" in body
    for path in ("/", "/healthz", "/v2/health/ready", "/readyz/", "/metricsx"):
        st, body, _ = get(server.port, path)
        assert st == 404, (path, st, body)
        assert "/metrics, /livez or /readyz" in body
    st, body, _ = get(server.port, "/readyz", method="HEAD")
    assert (st, body) == (200, "")
    st, _, _ = get(server.port, "/readyz", method="POST")
    assert st == 405


def test_readyz_is_503_while_draining_and_200_after_resume(server):
    jizhictl_ok("drain", run_dir=server.run_dir)
    st, body = wait_until(answer(server.port, "/readyz", 503, "draining"), 10, what="/readyz to say draining")
    assert body.strip() == "draining: admitting nothing new (jizhictl resume admits again)"
    assert get(server.port, "/livez")[0] == 200
    jizhictl_ok("resume", run_dir=server.run_dir)
    wait_until(answer(server.port, "/readyz", 200), 10, what="/readyz to be 200 after resume")


def test_readyz_is_503_degraded_while_a_worker_is_stopped_and_200_when_it_runs_again(server):
    victim = next(iter(server.workers("demo", "scorer")))
    os.kill(victim, signal.SIGSTOP)
    try:
        # Silent for 3 heartbeat intervals (1.5 s): the broker drops it, the pool has 1 of its 2 workers.
        st, body = wait_until(answer(server.port, "/readyz", 503, "degraded"), 20,
                              what="/readyz to say degraded")
        assert body.startswith("degraded: pool not full: ") and "demo/scorer has 1 of 2 workers" in body, body
        assert get(server.port, "/livez")[0] == 200      # the supervisor itself is fine
    finally:
        os.kill(victim, signal.SIGCONT)
    # Its next heartbeat reaches a broker that forgot it: told to register again, it does.
    wait_until(answer(server.port, "/readyz", 200), 30, what="/readyz to be 200 with the worker back")
    assert victim in server.workers("demo", "scorer")


def test_livez_is_503_while_the_supervisor_loop_is_stalled(server):
    broker = broker_pid(server)
    stop = threading.Event()

    def stall():
        # Each `stats` waits up to 2 s in the supervisor's loop for a broker that cannot answer.
        while not stop.is_set():
            try:
                control.call(server.run_dir, "stats", timeout_s=5.0)
            except (ConnectionError, control.ControlError):
                pass
    os.kill(broker, signal.SIGSTOP)
    t = threading.Thread(target=stall, daemon=True)
    try:
        t.start()
        st, body = wait_until(answer(server.port, "/livez", 503), 20, what="/livez to answer 503")
    finally:
        stop.set()
        os.kill(broker, signal.SIGCONT)
        t.join(10)
    assert body.startswith("the supervisor loop has not run for "), body
    assert "(metrics.livez_stall_s = 1)" in body
    wait_until(answer(server.port, "/livez", 200), 10, what="/livez to be 200 again")
    wait_until(answer(server.port, "/readyz", 200), 30, what="/readyz to be 200 again")


def test_bench_plot_draws_a_png_of_a_rate_sweep(server, demo_trace, tmp_path):
    pytest.importorskip("matplotlib")
    trace, png = tmp_path / "trace.npz", tmp_path / "sweep.png"
    np.savez(trace, users=demo_trace.users, offsets=demo_trace.offsets, items=demo_trace.items,
             recall_scores=demo_trace.recall_scores)      # 24 requests: 20 distinct ones a point at most
    t0 = time.monotonic()
    r = jizhictl("bench", "--endpoint", server.endpoint, "--pipeline", "demo", "--trace", trace,
                 "--rates", "10,20", "--duration", 1, "--warmup", 0.2, "--quiet", "--plot", png)
    assert r.returncode == 0, r.stderr + r.stdout
    print(f"\njizhictl bench --plot: {time.monotonic() - t0:.1f} s\n{r.stdout}")
    assert f"plot written to {png}" in r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_cpu_accounts_for_a_requests_cpu_by_process_thread_and_phase(server, demo_trace, tmp_path):
    """``jizhictl bench --cpu`` (jizhi/tools/account.py): each process kind's threads from /proc, and the main
    thread of the broker and of every worker by phase, from the stats segment, in us per answered request."""
    from jizhi.stats import BROKER_PHASES, WORKER_PHASES
    trace, out = tmp_path / "trace.npz", tmp_path / "bench.json"
    np.savez(trace, users=demo_trace.users, offsets=demo_trace.offsets, items=demo_trace.items,
             recall_scores=demo_trace.recall_scores)
    r = jizhictl("bench", "--endpoint", server.endpoint, "--pipeline", "demo", "--trace", trace, "--rate", 15,
                 "--duration", 1, "--warmup", 0.2, "--quiet", "--cpu", "--run-dir", server.run_dir, "--json", out)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "CPU account, us per answered request" in r.stdout
    point = json.loads(out.read_text())["runs"][0]["points"][0]
    assert point["ok"] > 0
    account = point["cpu"]["account"]
    broker, scorer = account["broker"], account["demo/scorer"]
    assert list(broker["phases"]) == [*BROKER_PHASES, "loop"]
    assert list(scorer["phases"]) == ["reader", "features", "cube", "dnn", "rank", *WORKER_PHASES, "loop"]
    for e, work in ((broker, ("admission", "dispatch", "done", "reply")), (scorer, ("reader", "cube", "dnn", "rank"))):
        assert all(e["phases"][k] > 0 for k in work), e
        # The phases are the main thread's CPU, split: together no more than it, give or take /proc's clock
        # tick at each end of the window (10 ms over this short point's requests).
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        assert sum(v for k, v in e["phases"].items() if k != "loop") <= e["parts"]["main"] + 2 * tick_us / point["ok"], e
        assert e["us"] >= e["parts"]["main"] > 0
    assert scorer["phases"]["dnn"] > scorer["phases"]["features"]      # the model, not the hashing, costs most
    assert "sleepy/" not in r.stdout.split("CPU account")[1]           # another pipeline's idle workers: one line


def test_readyz_is_503_stopping_while_sigterm_drains_a_held_request(server, demo_trace):
    dealer = held_request(server, demo_trace)
    try:
        server.proc.send_signal(signal.SIGTERM)
        st, body = wait_until(answer(server.port, "/readyz", 503, "stopping"), 5, interval_s=0.02,
                              what="/readyz to say stopping")
        assert body.strip() == "stopping: draining in-flight requests, admitting nothing new"
        assert server.info()["pipelines"]["sleepy"]["in_flight"] == 1   # still draining
        assert get(server.port, "/livez")[0] == 200
        assert server.proc.wait(30) == 0
        assert dealer.poll(1000), "the held request got no answer"
        header, _ = protocol.decode_reply(dealer.recv_multipart()[1:])
    finally:
        dealer.close(0)
    assert header["id"] == "held" and header["status"] == "ok", header
    assert get(server.port, "/readyz")[0] is None      # the listener is closed with the process
