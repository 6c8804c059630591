"""jizhictl's commands agree with each other and with jizhid (issue 17, items 3 and 4).

One real jizhid for the module (a private pipeline file, so a test can change its pool):

* ``scale`` then ``reload``: the runtime size is kept and the reload says so; a reload whose config
  changed that pool's value applies the config, drops the runtime size and says so;
* ``jizhid --version`` says what ``jizhictl --version`` says;
* ``info``: a summary for people, ``--json`` for machines;
* ``status``, ``stats`` and ``info`` state one uptime;
* ``models`` has a load timeline for the version served since start;
* ``top`` quits on q (through a pty), and runs without a terminal;
* last, with the daemon stopped: ``query`` and ``info`` on its local endpoint say it is not running
  at once, as ``status`` does (measured medians printed; the bound asserted is generous).
"""
import json
import os
import pty
import select
import statistics
import subprocess
import time

import pytest

from conftest import demo_pipeline_text, wait_until, write_text
from daemon_helpers import JIZHICTL, JIZHID, jizhictl, jizhictl_ok
from jizhi import control

CONFIG = """
[metrics]
listen = ""
"""


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("agree") / "agree.toml", demo_pipeline_text("agree", pool=2, batch=4))


@pytest.fixture(scope="module")
def server(launch_module, pipeline_file):
    return launch_module.start(pipelines=[pipeline_file], config_text=CONFIG)


def scorer_pool(server, n):
    def full():
        return len(server.workers("agree", "scorer")) == n and server.pool_sizes() == {("agree", "scorer"): n}
    return full


def test_reload_keeps_a_runtime_scale_unless_the_config_changed_that_pool_and_says_which(server, pipeline_file):
    run_dir = server.run_dir
    assert jizhictl_ok("scale", "scorer", "3", run_dir=run_dir) == "agree/scorer: 2 -> 3 workers\n"
    assert jizhictl_ok("reload", run_dir=run_dir) == (
        "applied: nothing\nkept: agree/scorer pool=3 (kept from jizhictl scale; the config says 2)\n")
    r = json.loads(jizhictl_ok("reload", "--json", run_dir=run_dir))
    assert r["pools"] == {"agree/scorer": {"size": 3, "config": 2, "set_by": "jizhictl scale"}}
    wait_until(scorer_pool(server, 3), 60, what="three scorer workers, kept across two reloads")
    assert json.loads(jizhictl_ok("status", "--json", run_dir=run_dir))["pools"] == {"agree/scorer": 3}

    # The config's value for the pool changes (2 -> 1): the config wins, the runtime size is dropped.
    write_text(pipeline_file, demo_pipeline_text("agree", pool=1, batch=4))
    assert jizhictl_ok("reload", run_dir=run_dir) == (
        "applied: agree/scorer pool=1 (config changed 2 -> 1; runtime scale 3 dropped)\n")
    wait_until(scorer_pool(server, 1), 60, what="the pool to shrink to the config's 1")
    # ... and from then on the config's value is the pool's: the next reload has nothing to say.
    assert jizhictl_ok("reload", run_dir=run_dir) == "applied: nothing\n"
    r = json.loads(jizhictl_ok("reload", "--json", run_dir=run_dir))
    assert r["pools"] == {"agree/scorer": {"size": 1, "config": 1, "set_by": "config"}}
    assert "reload: applied ['agree/scorer pool=1 (config changed 2 -> 1; runtime scale 3 dropped)']" \
        in server.log_text()


def test_jizhid_version_says_what_jizhictl_version_says():
    d = subprocess.run([str(JIZHID), "--version"], capture_output=True, text=True, timeout=60)
    c = subprocess.run([str(JIZHICTL), "--version"], capture_output=True, text=True, timeout=60)
    assert (d.returncode, c.returncode) == (0, 0), (d.stderr, c.stderr)
    assert d.stdout.startswith("jizhid, version ") and c.stdout.startswith("jizhictl, version ")
    version = d.stdout.split("version ", 1)[1].strip()
    assert version and version == c.stdout.split("version ", 1)[1].strip()


def test_info_is_a_summary_for_people_and_json_for_machines(server):
    text = jizhictl_ok("info", "--endpoint", server.endpoint)
    lines = text.splitlines()
    assert lines[0].startswith(f"jizhid instance {server.instance} at {server.endpoint}: ready, up "), text
    assert "(broker pid " in lines[0]
    assert "limits: max_candidates 2000, max_message_bytes 256 KiB, max_in_flight 64, max_waiting 64, max_connections 1000" in text
    assert "pipeline agree (default): ready, serving demo 1;" in text
    assert "  version 1 (demo 1): active," in text
    assert "  group scorer: " in text and "reader > features > cube > dnn > rank" in text
    assert not text.lstrip().startswith("{")
    info = json.loads(jizhictl_ok("info", "--json", "--endpoint", server.endpoint))
    assert info["status"] == "ok" and info["ready"] is True
    assert info["frontend"] == server.endpoint and info["instance"] == server.instance
    assert info["limits"]["max_candidates"] == 2000
    assert set(info["pipelines"]) == {"agree"} and "uptime_s" in info and "broker_uptime_s" in info


def test_status_stats_and_info_state_one_uptime(server):
    run_dir = server.run_dir
    t0 = time.monotonic()
    status = control.call(run_dir, "status")
    t1 = time.monotonic()
    stats = control.call(run_dir, "stats")
    t2 = time.monotonic()
    info = server.info()
    t3 = time.monotonic()
    # The start each implies (the moment of its answer minus its uptime), within the call's span.
    starts = {"status": ((t0 + t1) / 2 - status["uptime_s"], (t1 - t0) / 2),
              "stats": ((t1 + t2) / 2 - stats["uptime_s"], (t2 - t1) / 2),
              "info": ((t2 + t3) / 2 - info["uptime_s"], (t3 - t2) / 2)}
    ref = starts["status"][0]
    for name, (start, half) in starts.items():
        assert abs(start - ref) < 1.0 + half, (name, starts, status["uptime_s"], stats["uptime_s"], info["uptime_s"])
    # The broker's own age is named apart, and it is not more than jizhid's.
    assert stats["broker_uptime_s"] <= stats["uptime_s"] + 0.2
    out = jizhictl_ok("stats", run_dir=run_dir)
    assert " up " in out.splitlines()[0]


def test_models_shows_a_load_timeline_for_the_version_served_since_start(server):
    def timeline():
        v = json.loads(jizhictl_ok("models", "--json", run_dir=server.run_dir))["demo"]["versions"][0]
        return v if v["timings_ms"].get("total") is not None else None
    v1 = wait_until(timeline, 10, what="version 1's timeline")
    assert v1["version"] == 1 and v1["serving_since"] is not None
    t = v1["timings_ms"]
    for k in ("validation", "start", "load", "warm_up", "total"):
        assert isinstance(t.get(k), (int, float)) and t[k] >= 0, (k, t)
    assert t["total"] >= t["start"]
    row = [ln for ln in jizhictl_ok("models", run_dir=server.run_dir).splitlines() if ln.split()[:2] == ["1", "serving"]]
    assert len(row) == 1, row
    cells = row[0].split()          # version state appeared serving detect validate start load warm total
    assert cells[4] == "-" and all(c.isdigit() for c in cells[5:10]), row


def test_top_quits_on_q_in_a_terminal_and_runs_without_one(server):
    pid, fd = pty.fork()
    if pid == 0:   # the child: jizhictl top on the pty (a long interval: only q can end it soon)
        try:
            os.execv(str(JIZHICTL), [str(JIZHICTL), "top", "--run-dir", str(server.run_dir), "--interval", "60"])
        finally:
            os._exit(127)
    out = bytearray()

    def read(timeout_s):
        if select.select([fd], [], [], timeout_s)[0]:
            try:
                out.extend(os.read(fd, 65536))
            except OSError:      # EIO: the child closed the terminal
                pass
    status = None
    try:
        end = time.monotonic() + 30
        while b"(q quits)" not in out and time.monotonic() < end:
            read(0.2)
        assert b"(q quits)" in out, bytes(out[-2000:])
        t_q = time.monotonic()
        os.write(fd, b"q")
        while time.monotonic() - t_q < 10:
            read(0.1)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
        took = time.monotonic() - t_q
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None, f"jizhictl top did not quit on q within 10 s: {bytes(out[-2000:])}"
    assert os.waitstatus_to_exitcode(status) == 0
    assert took < 10
    # Without a terminal (stdin /dev/null): refreshes and stops after --count, exit 0, no key prompt.
    r = jizhictl("top", "--count", "2", "--interval", "0.1", run_dir=server.run_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("latency breakdown") == 2 and "(q quits)" not in r.stdout


def test_query_works_on_a_live_daemon(server, demo_bundle):
    out = jizhictl_ok("query", "--endpoint", server.endpoint, "--pipeline", "agree", "--random", "20",
                      "--bundle", demo_bundle, "--top-k", "3")
    assert out.startswith("pipeline agree  user ") and "timings (us):" in out


def test_with_the_daemon_stopped_query_and_info_say_so_at_once_as_status_does(server, demo_bundle, capsys):
    assert server.stop() == 0
    commands = {
        "status": ["status", "--run-dir", str(server.run_dir)],
        "info": ["info", "--endpoint", server.endpoint],
        "query": ["query", "--endpoint", server.endpoint, "--items", "1,2,3", "--user", "1"],
        "info ipc": ["info", "--endpoint", f"ipc://{server.run_dir}/frontend.ipc"],
    }
    took = {}
    for name, args in commands.items():
        took[name] = []
        for _ in range(1 if name == "info ipc" else 3):
            t0 = time.monotonic()
            r = jizhictl(*args)
            took[name].append(time.monotonic() - t0)
            assert r.returncode == 1, (name, r.returncode, r.stdout, r.stderr)
            assert r.stdout == "" and r.stderr.count("\n") == 1, (name, r.stderr)
            assert r.stderr.startswith("jizhictl: jizhid is not running ("), (name, r.stderr)
    medians = {name: statistics.median(t) for name, t in took.items()}
    with capsys.disabled():
        print("\njizhictl against a stopped jizhid, median of 3 runs (s; info ipc: 1 run): "
              + ", ".join(f"{n} {m:.2f}" for n, m in medians.items()))
    for name, m in medians.items():
        assert m < 3.0, (name, took)     # was 5.4-5.7 s for query and info (their 5 s --timeout)
