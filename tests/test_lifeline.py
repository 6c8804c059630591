"""No child outlives its supervisor, and ready means ready (issue 16, items 1 and 2).

Every test here starts real jizhid processes and kills or blocks them the way an
operator's bad day does: a SIGKILLed supervisor at many instants of its start, a
leftover process holding the frontend port, another program on the port, a cold
Numba cache.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, assert_topk, wait_until
from daemon_helpers import jizhictl, popen, score_ok, wait_ready
from jizhi import lifeline
from jizhi.client import Client


def env_for_tests():
    env = dict(os.environ)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def wait_for_log(server, offset, text, timeout_s):
    """Poll the server's log past byte ``offset`` until ``text`` appears."""
    def seen():
        with open(server.log_path, "rb") as f:
            f.seek(offset)
            return text.encode() in f.read()
    wait_until(seen, timeout_s, interval_s=0.01, what=f"{text!r} in {server.log_path}")


def kill_at_instants(server, instants, env, survivors, gone_s):
    """Start ``server``'s jizhid once per instant and SIGKILL the supervisor that long after it logs
    ``started broker``; record in ``survivors`` any process of the instance still alive 10 s later,
    in ``gone_s`` how long its processes took to end."""
    with open(server.log_path, "ab") as log:
        for delay in instants:
            offset = server.log_path.stat().st_size if server.log_path.exists() else 0
            proc = subprocess.Popen(server.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=server.run_dir, start_new_session=True)
            try:
                wait_for_log(server, offset, "started broker", 60)
                time.sleep(delay)    # the fault's instant (deliberate: this is what is being varied)
            finally:
                proc.kill()
                proc.wait(10)
            t_kill = time.monotonic()
            # Nobody else ends them here: the death signal and the parent check must.
            try:
                wait_until(lambda: not lifeline.leftovers(server.instance), 10.0, interval_s=0.02)
                gone_s.append(time.monotonic() - t_kill)
            except AssertionError:
                survivors[float(delay)] = {pid: lifeline._cmdline(pid) for pid in lifeline.leftovers(server.instance)}
                lifeline.end_leftovers(server.instance)


@pytest.mark.slow
def test_a_supervisor_sigkilled_at_12_instants_of_its_start_leaves_no_process_and_the_next_run_answers_right(
        launch, demo_trace, trace_scores):
    # The instants: 0 to 3 s after the supervisor logs "started broker", while the broker binds, the
    # workers import, compile and warm up, and the hot-tier builder runs. Two instances take turns
    # (the even and the odd instants) so that the 12 starts take half the wall time.
    instants = np.linspace(0.0, 3.0, 12)
    servers = [launch.start(wait_ready=False), launch.start(wait_ready=False)]
    env = env_for_tests()
    survivors, gone_s = {}, []
    threads = [threading.Thread(target=kill_at_instants, args=(srv, instants[k::2], env, survivors, gone_s))
               for k, srv in enumerate(servers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a kill sequence is stuck"
    assert not survivors, f"processes outlived their SIGKILLed supervisor (by kill instant): {survivors}"
    print(f"\n{len(gone_s)} SIGKILLs: every child gone after median {np.median(gone_s):.3f} s, "
          f"max {max(gone_s):.3f} s")   # figures for docs/reliability.md (pytest -s)
    # A new supervisor of each instance: every reply equals the reference.
    for server in servers:
        popen(server)
    for server in servers:
        with Client(server.endpoint, timeout_s=30.0) as probe:
            wait_ready(server, probe)
        with Client(server.endpoint, timeout_s=30.0) as c:
            for q in range(len(demo_trace)):
                score_ok(c, demo_trace, trace_scores, q)
        assert "Address already in use" not in server.log_text()


def test_a_leftover_holding_the_port_is_ended_before_anything_starts_and_no_child_imports_from_the_cwd(
        launch, demo_trace, trace_scores):
    server = launch.start(wait_ready=False)
    # Modules named like ones jizhi's children import, in jizhid's working directory (the run
    # directory here): were any imported (``python -m`` puts the working directory first on
    # sys.path), it would leave a mark.
    marks = server.run_dir / "imported-from-cwd"
    for name in ("lmdb", "zmq", "msgpack", "onnxruntime"):
        (server.run_dir / f"{name}.py").write_text(
            f"open({str(marks)!r}, 'a').write('{name} ' + __file__ + '\\n')\nraise SystemExit(99)\n")
    port = int(server.endpoint.rsplit(":", 1)[1])
    # A process of an ended run that no death signal reached: marked with the instance, holding the
    # frontend port, ignoring SIGTERM.
    code = ("import signal, socket, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
            "print('holding', flush=True)\n"
            "time.sleep(120)\n")
    env = dict(env_for_tests(), **{lifeline.ENV_INSTANCE: server.instance})
    orphan = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert orphan.stdout.readline().strip() == "holding"
        popen(server)
        with Client(server.endpoint, timeout_s=30.0) as probe:
            wait_ready(server, probe)
        assert orphan.wait(5) == -signal.SIGKILL
        assert f"ended pid {orphan.pid}, left by a previous run of instance {server.instance}" in server.log_text()
        with Client(server.endpoint, timeout_s=30.0) as c:
            score_ok(c, demo_trace, trace_scores, 0)
        assert not marks.exists(), marks.read_text()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(5)


@pytest.mark.slow
def test_a_broker_that_cannot_bind_its_frontend_exits_7_and_jizhid_is_not_ready_until_the_port_is_free(launch):
    server = launch.start(wait_ready=False)
    port = int(server.endpoint.rsplit(":", 1)[1])
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        popen(server)
        wait_until(lambda: "cannot bind tcp://127.0.0.1:%d" % port in server.log_text(), 60,
                   what="the broker's bind failure in the log")
        wait_until(lambda: "(cannot bind its address" in server.log_text(), 30,
                   what="the supervisor's reading of exit code 7")
        assert "exit code 7 (cannot bind its address" in server.log_text()
        # Workers are up and warm by now, yet nothing may say ready while the broker cannot start.
        wait_until(lambda: "warmed up" in server.log_text(), 60, what="a warmed-up worker")
        st = jizhictl("status", "--json", run_dir=server.run_dir)
        assert st.returncode == 0, st.stderr
        assert '"health": "ready"' not in st.stdout
        assert "ready: serving" not in server.log_text()
    finally:
        holder.close()
    with Client(server.endpoint, timeout_s=30.0) as probe:
        wait_ready(server, probe, timeout_s=60)
    wait_until(lambda: "ready: serving" in server.log_text(), 30, what="ready once the port is free")


@pytest.mark.slow
def test_a_cold_numba_cache_is_compiled_before_ready_and_the_first_request_meets_the_default_deadline(
        launch, tmp_path, demo_trace, trace_scores):
    server = launch.start(wait_ready=False)
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    popen(server, {"NUMBA_CACHE_DIR": str(cache)})
    wait_until(lambda: "ready: serving" in server.log_text(), 180, interval_s=0.02,
               what="jizhid ready on a cold Numba cache")
    assert any(cache.rglob("*.nbi")), "the workers compiled nothing into the fresh Numba cache"
    user, items, recall = demo_trace[0]
    with Client(server.endpoint, timeout_s=5.0) as c:
        # The default deadline (limits.default_deadline_ms, 1,000 ms): past it the broker answers
        # DEADLINE_EXCEEDED, which score() raises.
        r = c.score(user, items, recall, top_k=10)
    assert_topk(r, items, trace_scores[0], 10)
