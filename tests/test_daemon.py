"""The daemon as an operator meets it: kill -9, SIGSTOP, SIGTERM, SIGHUP, jizhictl, metrics, leaks.

Real jizhid processes, real sockets, a closed-loop load of REQ clients.
Servers are shared per purpose (module fixtures) where tests leave them as
they found them; the recovery times printed here are measured, not asserted
beyond their bounds (run with ``-s`` to see them).
"""
import json
import os
import signal
import stat
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import assert_topk, demo_pipeline_text, free_port, wait_until, write_text
from daemon_helpers import (Load, assert_answered_in_time, broker_pid, jizhictl, jizhictl_ok, log_lines, log_time,
                            open_fds, score_ok, thread_count)
from jizhi.errors import CODES, OVERLOADED
from jizhi.stats import BUCKETS_US

DEADLINE_MS = 2000
DEMO_STAGES = ["reader", "features", "cube", "dnn", "rank"]
FAST_CONFIG = """
[metrics]
listen = ""

[workers]
hung_timeout_s = 2.0
"""


def pools_full(server):
    return server.pool_sizes() == server.desired_pool_sizes()


# ---------------------------------------------------------------------------
# kill -9 and SIGSTOP under load (one server: the fused demo and the unfused DAG)


@pytest.fixture(scope="module")
def kill_server(launch_module):
    return launch_module.start(pipelines=["demo", "demo_unfused"], config_text=FAST_CONFIG)


@pytest.mark.parametrize("pipeline,group", [("demo", "scorer"), ("demo_unfused", "cube"), ("demo_unfused", "dnn")])
def test_a_sigkilled_worker_under_load_loses_no_request_and_its_pool_is_back_within_a_bound(
        kill_server, demo_trace, trace_scores, pipeline, group):
    server = kill_server
    wait_until(lambda: pools_full(server), 30, what="every pool to be full before the kill")
    before = server.workers(pipeline, group)
    assert len(before) == server.desired_pool_sizes()[(pipeline, group)]
    victim, (_, _, wid) = sorted(before.items())[0]
    with Load(server.endpoint, demo_trace, pipeline=pipeline, deadline_ms=DEADLINE_MS) as load:
        wait_until(lambda: load.count_ok() >= 20, 60, what="the load to get going")
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()

        def replaced():
            now = server.workers(pipeline, group)
            fresh = {pid: key for pid, key in now.items() if pid not in before}
            return victim not in now and len(now) == len(before) and fresh
        fresh = wait_until(replaced, 30, what=f"the supervisor to restart {pipeline}/{group}/{wid}")
        assert [key[2] for key in fresh.values()] == [wid]   # the same wid, a new process
        wait_until(lambda: pools_full(server), 30, what="the broker to count every worker again")
        t_pool = time.monotonic()
        wait_until(lambda: load.count_ok(since=t_pool) >= 20, 60, what="answers after the pool is back")
    records = load.snapshot()
    outcomes = assert_answered_in_time(records, demo_trace, trace_scores, DEADLINE_MS)
    first_ok = load.first_ok_after(t_kill)
    gap = load.longest_gap_without_ok(t_kill, t_pool)
    print(f"\nkill -9 {pipeline}/{group}/{wid}: pool back after {t_pool - t_kill:.2f} s, first OK answer to a "
          f"request sent after the kill after {first_ok:.2f} s, longest time without an OK answer {gap:.2f} s; "
          f"outcomes {outcomes}")
    assert t_pool - t_kill < 30
    assert server.info()["pipelines"][pipeline]["in_flight"] == 0
    assert f"pid={victim} died: killed by SIGKILL" in server.log_text()


def test_a_sigkilled_broker_loses_what_it_held_but_retrying_clients_succeed_and_workers_rejoin(
        kill_server, demo_trace, trace_scores):
    server = kill_server
    wait_until(lambda: pools_full(server), 30, what="every pool to be full before the kill")
    workers = server.workers()
    old_broker = broker_pid(server)
    with Load(server.endpoint, demo_trace, deadline_ms=1000, timeout_s=1.5, retry=True, give_up_s=30) as load:
        wait_until(lambda: load.count_ok() >= 20, 60, what="the load to get going")
        os.kill(old_broker, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_until(lambda: pools_full(server), 60, what="a new broker with every worker registered")
        t_pool = time.monotonic()
        wait_until(lambda: load.count_ok(since=t_pool) >= 20, 60, what="answers after the broker came back")
    records = load.snapshot()
    final = {}
    for r in records:   # the last attempt of each logical request
        final[(r["client"], r["seq"])] = r
    not_ok = [r for r in final.values() if r["outcome"] != "ok"]
    assert not_ok == [], f"logical requests that never succeeded: {[(r['outcome'], r.get('message')) for r in not_ok]}"
    lost = sum(1 for r in records if r["outcome"] == "timeout")
    assert lost >= 1, "no request was lost with the broker: the kill did not happen under load"
    for r in final.values():
        _, items, _ = demo_trace[r["q"]]
        assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    first_ok = load.first_ok_after(t_kill)
    print(f"\nkill -9 broker: pools full again after {t_pool - t_kill:.2f} s, first OK answer to a request sent "
          f"after the kill after {first_ok:.2f} s; {lost} attempts timed out and were retried; "
          f"outcomes {load.outcomes()}")
    new_broker = broker_pid(server)
    assert new_broker != old_broker
    assert server.workers() == workers   # the workers survived the broker and registered with the new one
    assert f"broker pid={old_broker} died: killed by SIGKILL" in server.log_text()
    assert server.info()["pipelines"]["demo"]["in_flight"] == 0


def test_a_sigstopped_worker_is_killed_and_replaced_within_the_hung_timeout_while_requests_succeed(
        kill_server, demo_trace, trace_scores):
    server = kill_server
    wait_until(lambda: pools_full(server), 30, what="every pool to be full")
    before = server.workers("demo", "scorer")
    victim, (_, _, wid) = sorted(before.items())[0]
    with Load(server.endpoint, demo_trace, deadline_ms=DEADLINE_MS) as load:
        wait_until(lambda: load.count_ok() >= 20, 60, what="the load to get going")
        os.kill(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            def replaced():
                now = server.workers("demo", "scorer")
                return victim not in now and len(now) == 2 and [k[2] for p, k in now.items() if p not in before]
            assert wait_until(replaced, 20, what="the stopped worker to be killed and replaced") == [wid]
            t_replaced = time.monotonic()
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_until(lambda: pools_full(server), 30, what="the broker to count both scorer workers")
        t_pool = time.monotonic()
        # The stuck worker's events expire (DEADLINE_EXCEEDED); the other one keeps answering meanwhile.
        ok_while_stopped = load.count_ok(since=t_stop) - load.count_ok(since=t_replaced)
        wait_until(lambda: load.count_ok(since=t_pool) >= 20, 60, what="answers after the replacement")
    outcomes = assert_answered_in_time(load.snapshot(), demo_trace, trace_scores, DEADLINE_MS)
    print(f"\nSIGSTOP demo/scorer/{wid}: replaced after {t_replaced - t_stop:.2f} s (hung_timeout_s 2.0), pool "
          f"back after {t_pool - t_stop:.2f} s; {ok_while_stopped} OK answers while it was stopped; "
          f"outcomes {outcomes}")
    # Stale for hung_timeout_s (the last beat is at most one heartbeat interval old), SIGTERM, SIGKILL 2 s later.
    assert 2.0 - 1.0 + 2.0 <= t_replaced - t_stop <= 2.0 + 2.0 + 5.0
    assert ok_while_stopped >= 1
    log = server.log_text()
    assert f"demo/scorer/{wid} pid={victim} no heartbeat for" in log
    assert f"demo/scorer/{wid} pid={victim} died: killed by SIGKILL" in log


# ---------------------------------------------------------------------------
# SIGTERM under load


def test_sigterm_under_load_answers_every_admitted_request_ok_and_exits_0(launch, demo_trace, trace_scores):
    server = launch.start(pipelines=["demo"], config_text=FAST_CONFIG)
    with Load(server.endpoint, demo_trace, deadline_ms=10_000, timeout_s=5.0, stop_on_draining=True) as load:
        wait_until(lambda: load.count_ok() >= 40, 60, what="the load to get going")
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        wait_until(lambda: not any(t.is_alive() for t in load.threads), 15,
                   what="every load client to notice the server is gone")
    records = load.snapshot()
    drain_lines = log_lines(server, "jizhi.broker draining: admitting nothing new")
    assert len(drain_lines) == 1, server.log_tail()
    t_drain_wall = log_time(drain_lines[0])
    assert "drained: every admitted request was answered" in server.log_text()
    assert "drain bound reached" not in server.log_text()
    before = [r for r in records if r["t_send"] < t_term]
    assert before and all(r["outcome"] == "ok" for r in before), load.outcomes(before)
    assert_answered_in_time(before, demo_trace, trace_scores, 10_000)
    for r in records:
        if r["outcome"] == "ok":
            continue
        if r["outcome"] == OVERLOADED:
            assert "draining" in r["message"], r["message"]
        else:
            # Never admitted: sent after the broker stopped admitting (log times have ms resolution).
            assert r["outcome"] == "timeout", r
            assert r["wall_send"] >= t_drain_wall - 0.001, (r, drain_lines[0])
    after = [r for r in records if r["t_send"] >= t_term]
    print(f"\nSIGTERM under load: {len(before)} requests before it (all OK), after it {load.outcomes(after)}; "
          f"{drain_lines[0].split('jizhi.broker ')[1]}")
    assert server.segments() == []
    assert server.children() == {}


# ---------------------------------------------------------------------------
# SIGHUP and jizhictl reload


@pytest.fixture(scope="module")
def reload_pipeline(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("hup") / "hup.toml", demo_pipeline_text("hup", pool=2, batch=4))


RELOAD_CONFIG = """
[metrics]
listen = ""

[workers]
hung_timeout_s = 5.0
"""


@pytest.fixture(scope="module")
def reload_server(launch_module, reload_pipeline):
    return launch_module.start(pipelines=[reload_pipeline], config_text=RELOAD_CONFIG)


def test_sighup_with_invalid_toml_is_refused_logged_and_the_server_keeps_serving(
        reload_server, demo_trace, trace_scores):
    server = reload_server
    config = server.run_dir / "jizhi.toml"
    workers = server.workers()
    write_text(config, "[metrics\nlisten = \n")
    try:
        os.kill(server.proc.pid, signal.SIGHUP)
        line = wait_until(lambda: log_lines(server, "reload refused, keeping the running configuration"), 10,
                          what="the supervisor to log the refused reload")
        assert len(line) == 1 and f"config {config} is not valid TOML" in line[0], line
        with server.client() as c:
            for q in range(4):
                score_ok(c, demo_trace, trace_scores, q)
        assert server.workers() == workers
        assert server.pool_sizes() == {("hup", "scorer"): 2}
    finally:
        write_text(config, RELOAD_CONFIG)
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_until(lambda: log_lines(server, "reload: applied nothing; needs a restart to change: nothing"), 10,
               what="the valid config to be reloaded")
    assert server.running


def test_jizhictl_reload_refuses_an_unknown_setting_with_exit_3_then_applies_a_pool_change(
        reload_server, reload_pipeline, demo_trace, trace_scores):
    server = reload_server
    config = server.run_dir / "jizhi.toml"
    write_text(config, RELOAD_CONFIG + "bogus_knob = 1\n")
    try:
        r = jizhictl("reload", run_dir=server.run_dir)
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1
        assert r.stderr.startswith("jizhictl: reload refused: ")
        assert "unknown setting 'workers.bogus_knob'" in r.stderr
    finally:
        write_text(config, RELOAD_CONFIG)
    with server.client() as c:
        score_ok(c, demo_trace, trace_scores, 0)
    assert server.pool_sizes() == {("hup", "scorer"): 2}

    retiring = [pid for pid, key in server.workers("hup", "scorer").items() if key[2] == 1]
    write_text(reload_pipeline, demo_pipeline_text("hup", pool=1, batch=4))
    try:
        assert jizhictl_ok("reload", run_dir=server.run_dir) == "applied: hup/scorer pool=1\n"
        wait_until(lambda: len(server.workers("hup", "scorer")) == 1 and server.pool_sizes() == {("hup", "scorer"): 1},
                   30, what="the pool to shrink to 1")
        assert list(server.workers("hup", "scorer").values()) == [("hup", "scorer", 0)]
        wait_until(lambda: log_lines(server, f"hup/scorer/1 pid={retiring[0]} retired"), 10,
                   what="the supervisor to log the retired worker")
        with server.client() as c:
            for q in range(4):
                score_ok(c, demo_trace, trace_scores, q)
        st = json.loads(jizhictl_ok("status", "--json", run_dir=server.run_dir))
        assert st["pools"] == {"hup/scorer": 1}
    finally:
        write_text(reload_pipeline, demo_pipeline_text("hup", pool=2, batch=4))
    assert jizhictl_ok("reload", run_dir=server.run_dir) == "applied: hup/scorer pool=2\n"
    wait_until(lambda: server.pool_sizes() == {("hup", "scorer"): 2}, 30, what="the pool to grow back to 2")


# ---------------------------------------------------------------------------
# jizhictl against a running daemon, metrics, and flat resources


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def ctl_server(launch_module, metrics_port):
    return launch_module.start(pipelines=["demo"], config_text=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')


def test_jizhictl_status_names_the_supervisor_broker_and_every_worker_with_their_pids(ctl_server):
    server = ctl_server
    st = json.loads(jizhictl_ok("status", "--json", run_dir=server.run_dir))
    assert st["instance"] == server.instance
    assert st["pid"] == server.proc.pid
    assert st["health"] == "ready"
    assert st["frontend"] == server.endpoint
    assert st["models"] == {"demo": 1}
    assert st["pipelines"] == ["demo"]
    assert st["pools"] == {"demo/scorer": 2}
    procs = {p["name"]: p for p in st["processes"]}
    assert sorted(procs) == ["broker", "demo/scorer/0", "demo/scorer/1"]
    assert procs["broker"]["pid"] == broker_pid(server)
    assert {procs[f"demo/scorer/{wid}"]["pid"]: ("demo", "scorer", wid) for wid in (0, 1)} == server.workers()
    assert all(p["state"] == "running" and p["rss_bytes"] > 0 for p in procs.values())
    text = jizhictl_ok("status", run_dir=server.run_dir).splitlines()
    assert text[0].startswith(f"jizhid instance {server.instance}  pid {server.proc.pid}  up ")
    assert text[0].endswith("health ready")
    assert [line.split()[0] for line in text[3:]] == ["broker", "demo/scorer/0", "demo/scorer/1"]


def test_jizhictl_stats_json_and_top_show_per_group_figures(ctl_server, demo_trace, trace_scores):
    server = ctl_server
    with server.client() as c:
        for q in range(10):
            score_ok(c, demo_trace, trace_scores, q)
    info = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))
    assert info["ready"] is True
    assert info["answered"] == 10      # the first requests this server sees (the status test sends none)
    assert info["errors"] == {} and info["malformed"] == 0
    scorer = info["pipelines"]["demo"]["groups"]["scorer"]
    assert scorer["workers"] == 2
    assert scorer["queue"] == 0
    assert scorer["stages"] == DEMO_STAGES
    assert scorer["requests"] == 10 and 1 <= scorer["events"] <= 10
    for key in ("wait_us", "service_us"):
        assert sorted(scorer[key]) == ["p50", "p99"]
        assert isinstance(scorer[key]["p50"], int) and scorer[key]["p99"] >= scorer[key]["p50"] >= 0
    requests = info["pipelines"]["demo"]["requests"]
    assert requests["ok"] == 10
    assert sorted(requests["latency_us"]) == ["p50", "p99", "p99_9"]
    assert requests["latency_us"]["p99_9"] >= requests["latency_us"]["p99"] >= requests["latency_us"]["p50"] > 0
    table = jizhictl_ok("stats", run_dir=server.run_dir).splitlines()
    assert table[0].startswith(f"answered {info['answered']}")
    assert table[1].split()[:5] == ["pipeline", "in", "flight", "ok/s", "pairs/s"]
    assert table[2].split()[:2] == ["demo", "0"]
    assert table[4].split()[:3] == ["demo/scorer", "2", "0"]
    top = jizhictl_ok("top", "--count", "1", run_dir=server.run_dir).splitlines()
    assert top[2].split()[:2] == ["demo", "0"]
    assert top[4].split()[:3] == ["demo/scorer", "2", "0"]
    assert top[5].startswith("latency breakdown")


def test_jizhictl_scale_up_to_3_and_down_to_1_under_load_fails_no_request(ctl_server, demo_trace, trace_scores):
    server = ctl_server

    def pool_is(n):
        return lambda: len(server.workers("demo", "scorer")) == n and server.pool_sizes() == {("demo", "scorer"): n}
    with Load(server.endpoint, demo_trace, deadline_ms=10_000) as load:
        wait_until(lambda: load.count_ok() >= 20, 60, what="the load to get going")
        assert jizhictl_ok("scale", "scorer", "3", run_dir=server.run_dir) == "demo/scorer: 2 -> 3 workers\n"
        wait_until(pool_is(3), 30, what="three scorer workers")
        t3 = time.monotonic()
        wait_until(lambda: load.count_ok(since=t3) >= 20, 60, what="answers with three workers")
        assert jizhictl_ok("scale", "scorer", "1", run_dir=server.run_dir) == "demo/scorer: 3 -> 1 workers\n"
        wait_until(pool_is(1), 30, what="one scorer worker")
        t1 = time.monotonic()
        wait_until(lambda: load.count_ok(since=t1) >= 20, 60, what="answers with one worker")
        assert jizhictl_ok("scale", "scorer", "2", run_dir=server.run_dir) == "demo/scorer: 1 -> 2 workers\n"
        wait_until(pool_is(2), 30, what="two scorer workers again")
    records = load.snapshot()
    assert load.outcomes() == {"ok": len(records)}
    assert_answered_in_time(records, demo_trace, trace_scores, 10_000)
    assert server.info()["pipelines"]["demo"]["in_flight"] == 0


def test_jizhictl_scale_refuses_an_unknown_group_and_a_pool_over_max_pool_with_exit_3(ctl_server):
    server = ctl_server
    r = jizhictl("scale", "nosuch", "1", run_dir=server.run_dir)
    assert (r.returncode, r.stdout) == (3, "")
    assert r.stderr == "jizhictl: scale refused: pipeline demo has no stage or fused group 'nosuch' (groups: scorer)\n"
    r = jizhictl("scale", "scorer", "17", run_dir=server.run_dir)
    assert (r.returncode, r.stdout) == (3, "")
    assert r.stderr == "jizhictl: scale refused: the pool size must be at most workers.max_pool = 16\n"
    assert server.pool_sizes() == {("demo", "scorer"): 2}


def test_jizhictl_drain_makes_requests_overloaded_and_resume_admits_them_again(ctl_server, demo_trace, trace_scores):
    server = ctl_server
    user, items, recall = demo_trace[0]
    with server.client() as c:
        assert jizhictl_ok("drain", run_dir=server.run_dir) == "draining: no new requests are admitted\n"
        try:
            def refused():
                r = c.score(user, items, recall, check=False)
                return None if r.ok else r
            r = wait_until(refused, 10, what="a request to be refused while draining")
            assert r["code"] == OVERLOADED
            assert r["message"] == "server is draining (jizhictl drain or shutdown)"
            assert r["retry_after_ms"] == 1000
            assert json.loads(jizhictl_ok("status", "--json", run_dir=server.run_dir))["health"] == "draining"
            assert server.info()["draining"] is True
        finally:
            assert jizhictl_ok("resume", run_dir=server.run_dir) == "admitting requests\n"
        wait_until(lambda: c.score(user, items, recall, check=False).ok, 10, what="requests to be admitted again")
        score_ok(c, demo_trace, trace_scores, 1)
    assert json.loads(jizhictl_ok("status", "--json", run_dir=server.run_dir))["health"] == "ready"


def test_the_control_socket_is_a_0600_unix_socket_of_our_user(ctl_server):
    st = os.stat(ctl_server.run_dir / "control.ipc")
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_the_prometheus_endpoint_has_stage_histograms_request_counts_queues_pools_errors_and_rss(
        ctl_server, metrics_port, demo_trace, trace_scores):
    server = ctl_server
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def scrape():
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return text, samples

    def latency_count(samples):
        return samples[("jizhi_request_latency_seconds_count", (("pipeline", "demo"),))]
    _, first = scrape()
    with server.client() as c:
        for q in range(12):
            score_ok(c, demo_trace, trace_scores, q)
        assert c.score(12345, demo_trace[0][1], top_k=10, deadline_ms=30_000)["unknown_user"] == 1
    text, samples = scrape()
    info = server.info()
    assert latency_count(samples) - latency_count(first) == 13
    assert latency_count(samples) == info["answered"]   # every OK answer of this broker, and only those
    unknown = ("jizhi_unknown_users_total", (("pipeline", "demo"),))
    assert samples[unknown] - first[unknown] == 1 and samples[unknown] == info["pipelines"]["demo"]["unknown_users"]

    assert "jizhi_stage_service_seconds_bucket{" in text and 'le="0.0001"' in text
    edges = [f"{b / 1e6:g}" for b in BUCKETS_US[:-1]] + ["+Inf"]
    for stage in DEMO_STAGES:
        labels = (("pipeline", "demo"), ("stage", stage))
        buckets = [samples[("jizhi_stage_service_seconds_bucket", tuple(sorted(labels + (("le", le),))))]
                   for le in edges]
        assert buckets == sorted(buckets), f"{stage}: buckets are not cumulative"
        assert buckets[-1] == samples[("jizhi_stage_service_seconds_count", labels)] >= 12
        assert samples[("jizhi_stage_service_seconds_sum", labels)] > 0

    def gauges_current():
        # The broker's gauges come from its figures, asked for once a second: a snapshot taken while one
        # of the 12 requests was in flight (held batch_wait_ms for company, it counts as queued) is stale;
        # wait for one taken after them.
        _, s = scrape()
        workers = s.get(("jizhi_pool_workers", (("group", "scorer"), ("pipeline", "demo"))))
        return s if workers == 2 and s.get(("jizhi_in_flight", (("pipeline", "demo"),))) == 0 else None
    samples = wait_until(gauges_current, 10, what="the metrics to show two scorer workers and nothing in flight")
    assert samples[("jizhi_queue_depth", (("group", "scorer"), ("pipeline", "demo")))] == 0
    assert samples[("jizhi_pool_desired", (("group", "scorer"), ("pipeline", "demo")))] == 2
    errors = {dict(k[1])["code"]: v for k, v in samples.items() if k[0] == "jizhi_errors_total"}
    assert sorted(errors) == sorted(CODES)
    assert errors == {code: info["errors"].get(code, 0) for code in CODES}
    rss = {dict(k[1])["process"]: v for k, v in samples.items() if k[0] == "jizhi_process_rss_bytes"}
    assert sorted(rss) == ["broker", "demo/scorer/0", "demo/scorer/1", "supervisor"]
    assert all(v > 1 << 20 for v in rss.values())
    assert samples[("jizhi_ready", ())] == 1
    assert samples[("jizhi_serving_version", (("model", "demo"), ("pipeline", "demo")))] == 1
    assert samples[("jizhi_model_versions", (("model", "demo"), ("state", "serving")))] == 1
    assert samples[("jizhi_model_versions", (("model", "demo"), ("state", "rejected")))] == 0


@pytest.mark.slow
def test_ten_reloads_and_three_scale_cycles_leave_the_supervisors_fds_threads_and_dev_shm_flat(ctl_server):
    server = ctl_server
    sup = server.proc.pid

    def pool_is(n):
        return lambda: len(server.workers("demo", "scorer")) == n and server.pool_sizes() == {("demo", "scorer"): n}

    def cycle():
        assert jizhictl_ok("scale", "scorer", "3", run_dir=server.run_dir) == "demo/scorer: 2 -> 3 workers\n"
        wait_until(pool_is(3), 30, what="three scorer workers")
        assert jizhictl_ok("scale", "scorer", "2", run_dir=server.run_dir) == "demo/scorer: 3 -> 2 workers\n"
        wait_until(pool_is(2), 30, what="two scorer workers")

    def resources():
        return {"fds": open_fds(sup), "threads": thread_count(sup), "shm": server.segments(),
                "children": len(server.children())}
    # Warm up once (first control connection, first reload, first spawn of wid 2), then measure.
    assert jizhictl_ok("reload", run_dir=server.run_dir) == "applied: nothing\n"
    cycle()

    def settled():
        r = resources()
        return r if r["children"] == 3 else None
    baseline = wait_until(settled, 10, what="three children")
    for _ in range(10):
        assert jizhictl_ok("reload", run_dir=server.run_dir) == "applied: nothing\n"
    for _ in range(3):
        cycle()
    def flat(r):   # a leak grows; one transient descriptor open at the baseline's instant may be gone now
        return r["fds"] <= baseline["fds"] and {k: v for k, v in r.items() if k != "fds"} == \
            {k: v for k, v in baseline.items() if k != "fds"}
    try:   # a closed jizhictl connection or a retired worker may take a moment to go
        wait_until(lambda: flat(resources()), 10, what="the supervisor's resources to settle")
    except AssertionError:
        pass   # the assertion below shows the difference
    after = resources()
    print(f"\nsupervisor: {baseline['fds']} fds, {baseline['threads']} threads, {len(baseline['shm'])} segments "
          f"before; {after['fds']} fds, {after['threads']} threads, {len(after['shm'])} segments after 10 reloads "
          f"and 3 scale cycles")
    assert flat(after), (after, baseline)


def test_jizhictl_against_a_stopped_daemon_exits_1_with_one_line_saying_what_to_check(tmp_path):
    for args in (["status"], ["stats", "--json"], ["scale", "scorer", "2"], ["drain"], ["resume"], ["reload"],
                 ["top", "--count", "1"]):
        r = jizhictl(*args, run_dir=tmp_path)
        assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
        assert r.stdout == ""
        assert r.stderr == (f"jizhictl: jizhid is not running (no control socket in {tmp_path}); "
                            "pass --run-dir or --instance if it runs elsewhere\n"), args


# ---------------------------------------------------------------------------
# Graceful recycling


@pytest.mark.slow
def test_workers_are_recycled_after_max_events_without_failing_a_request(launch, demo_trace, trace_scores):
    server = launch.start(pipelines=["demo"], config_text='[metrics]\nlisten = ""\n\n[workers]\nmax_events = 20\n')
    first = server.workers("demo", "scorer")
    assert len(first) == 2
    with server.client(timeout_s=60) as c:
        for i in range(100):
            score_ok(c, demo_trace, trace_scores, i % len(demo_trace), deadline_ms=30_000)
    wait_until(lambda: pools_full(server), 30, what="both scorer workers to be back")
    now = server.workers("demo", "scorer")
    assert len(now) == 2
    assert not set(first) & set(now), f"workers {set(first) & set(now)} were not recycled"
    recycled = log_lines(server, "recycled itself (workers.max_events or workers.max_rss_mb)")
    assert len(recycled) >= 4   # 100 events over workers that leave after 20 each
    assert log_lines(server, "recycling after 20 events")
    assert server.info()["errors"] == {}
