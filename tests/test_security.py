"""Security: CURVE with an allow-list, no TCP but the frontend (and metrics), nothing unpickled.

One jizhid requires CURVE on its frontend (keys from `jizhictl keys init`)
and serves Prometheus metrics on a free loopback port.
"""
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, free_port, write_text
from daemon_helpers import JIZHID, broker_pid, jizhictl_ok, listening_tcp, popen, score_ok, wait_ready
from jizhi.client import Client

SHORT_S = 1.0   # a refused CURVE client hears nothing; a served one answers in milliseconds


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """alice's keys (allowed) beside the server's; mallory's made by another `keys init` (not allowed)."""
    ours = tmp_path_factory.mktemp("keys")
    theirs = tmp_path_factory.mktemp("mallory-keys")
    out = jizhictl_ok("keys", "init", ours, "--client", "alice")
    assert out == (f"server keys: {ours / 'server.key'} (public), {ours / 'server.key_secret'} (secret)\n"
                   f"allowed clients in {ours / 'clients'}: alice\n")
    jizhictl_ok("keys", "init", theirs, "--client", "mallory")
    assert sorted(p.name for p in (ours / "clients").iterdir()) == ["alice.key"]
    assert (ours / "server.key_secret").stat().st_mode & 0o077 == 0
    return {"server": ours / "server.key", "server_secret": ours / "server.key_secret", "clients": ours / "clients",
            "alice": ours / "alice.key_secret", "mallory": theirs / "mallory.key_secret",
            "other_server": theirs / "server.key"}


def curve_config(keys, metrics_port=None, secret=True, clients=True):
    lines = ["[metrics]", f'listen = "127.0.0.1:{metrics_port}"' if metrics_port else 'listen = ""', "", "[security]"]
    if secret:
        lines.append(f'curve_server_secret = "{keys["server_secret"]}"')
    if clients:
        lines.append(f'curve_clients_dir = "{keys["clients"]}"')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(launch_module, keys, metrics_port):
    # conftest's readiness probe is a plain client, which a CURVE server never answers: probe as alice.
    server = launch_module.start(pipelines=["demo"], config_text=curve_config(keys, metrics_port), wait_ready=False)
    popen(server)
    probe = Client(server.endpoint, timeout_s=1.0, server_key=keys["server"], client_key=keys["alice"])
    try:
        wait_ready(server, probe)
    finally:
        probe.close()
    return server


def test_an_allowed_curve_client_is_answered_with_the_reference_scores(server, keys, demo_trace, trace_scores):
    with Client(server.endpoint, timeout_s=30, server_key=keys["server"], client_key=keys["alice"]) as c:
        for q in range(3):
            score_ok(c, demo_trace, trace_scores, q)
        assert c.ping().header["pong"] is True
    assert "frontend requires CURVE; allowed client keys from " + str(keys["clients"]) in server.log_text()


@pytest.mark.parametrize("who", ["mallory", "plain", "alice_with_the_wrong_server_key"])
def test_a_client_whose_key_is_not_allowed_or_that_speaks_no_curve_gets_no_answer(server, keys, who):
    if who == "mallory":
        c = Client(server.endpoint, timeout_s=SHORT_S, server_key=keys["server"], client_key=keys["mallory"])
    elif who == "plain":
        c = Client(server.endpoint, timeout_s=SHORT_S)
    else:
        c = Client(server.endpoint, timeout_s=SHORT_S, server_key=keys["other_server"], client_key=keys["alice"])
    with c:
        with pytest.raises(TimeoutError):
            c.ping()
    # ... and the server still serves alice.
    with Client(server.endpoint, timeout_s=30, server_key=keys["server"], client_key=keys["alice"]) as ok:
        assert ok.ping().header["pong"] is True


@pytest.mark.parametrize("secret,clients,reason", [
    (True, False, "security.curve_server_secret and security.curve_clients_dir are set together"),
    (False, True, "security.curve_server_secret and security.curve_clients_dir are set together"),
])
def test_check_config_rejects_one_curve_setting_without_the_other_with_exit_2(tmp_path, keys, secret, clients, reason):
    cfg = write_text(tmp_path / "jizhi.toml", curve_config(keys, secret=secret, clients=clients))
    r = subprocess.run([str(JIZHID), "--check-config", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith(f"jizhid: {reason}")
    assert r.stderr.count("\n") == 1


def test_check_config_accepts_both_curve_settings_and_rejects_a_missing_key_file(tmp_path, keys, demo_models):
    cfg = write_text(tmp_path / "ok.toml", curve_config(keys))
    # A start's other options too: --check-config checks everything that start would (a free port, a model directory).
    start = ["--models", str(demo_models), "--frontend", f"tcp://127.0.0.1:{free_port()}", "--instance", "curvecheck",
             "--run-dir", str(tmp_path / "run")]
    r = subprocess.run([str(JIZHID), "--check-config", "--config", str(cfg), *start], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f"\nconfig OK: {cfg}\n")
    bad = write_text(tmp_path / "bad.toml", curve_config(keys).replace("server.key_secret", "nosuch.key_secret"))
    r = subprocess.run([str(JIZHID), "--check-config", "--config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "no such file or directory" in r.stderr


def test_the_daemon_listens_on_tcp_only_at_its_frontend_and_metrics_ports(server, metrics_port):
    frontend_port = int(server.endpoint.rsplit(":", 1)[1])
    sup = server.proc.pid
    pids = [sup] + list(server.children())
    assert len(pids) == 4   # supervisor, broker, two scorer workers
    listening = listening_tcp(pids)
    # 0100007F: 127.0.0.1 in /proc/net/tcp's little-endian hex.
    assert listening == {(broker_pid(server), "0100007F", frontend_port), (sup, "0100007F", metrics_port)}
    # The control socket is a unix socket file, not a port.
    assert (server.run_dir / "control.ipc").is_socket()


SOURCE_DIRS = ("jizhi", "workers", "cube", "bin")
UNPICKLING = re.compile(r"\bpickle\.loads?\b|\bcPickle\b|\bimport pickle\b|\bfrom pickle\b|recv_pyobj|"
                        r"recv_serialized|cloudpickle|\bdill\b|marshal\.loads?\b|allow_pickle\s*=\s*True|"
                        r"\bshelve\b|jsonpickle")


def test_nothing_in_the_server_unpickles_anything():
    hits, scanned = [], 0
    for d in SOURCE_DIRS:
        for path in sorted((REPO / d).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix not in ("", ".py"):
                continue
            scanned += 1
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if UNPICKLING.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert scanned >= 30
    assert hits == []


def test_the_unpickling_pattern_would_catch_what_it_looks_for():
    for line in ("obj = pickle.loads(frame)", "sock.recv_pyobj()", "import cloudpickle",
                 "np.load(f, allow_pickle=True)", "from pickle import loads"):
        assert UNPICKLING.search(line), line
    for line in ("Nothing here unpickles anything.", "np.load(f, allow_pickle=False)"):
        assert not UNPICKLING.search(line), line


def test_the_plan_file_children_read_is_msgpack_not_pickle(server):
    raw = Path(server.plan_path).read_bytes()
    assert not raw.startswith(b"\x80")   # every pickle protocol >= 2 starts with PROTO (0x80)
    assert server.plan()["instance"] == server.instance
