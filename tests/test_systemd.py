"""jizhid as a systemd service: the units verify, and the notify protocol is spoken in order.

The notify test plays systemd: it binds the datagram socket NOTIFY_SOCKET
names, starts jizhid with WATCHDOG_USEC, and reads what arrives.
"""
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_until
from daemon_helpers import JIZHID, popen, wait_ready
from jizhi.client import Client

UNITS = REPO / "etc" / "systemd"
WATCHDOG_USEC = 1_000_000     # jizhid pings every half of it


@pytest.mark.parametrize("source,name", [("jizhi.service", "jizhi.service"), ("jizhi@.service", "jizhi@a.service")])
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path, source, name):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    text = (UNITS / source).read_text()
    assert "ExecStart=/usr/local/bin/jizhid " in text
    # verify checks that ExecStart's program exists: point it at the jizhid under test.
    unit = tmp_path / name
    unit.write_text(text.replace("ExecStart=/usr/local/bin/jizhid ", f"ExecStart={JIZHID} "))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_the_redis_cluster_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.skip("redis-server is not installed (Debian package: redis-server)")
    tool = Path(JIZHID).parent / "jizhi-redis-cluster"
    names = []
    for source, name in (("jizhi-redis@.service", "jizhi-redis@7000.service"),
                         ("jizhi-redis-cluster.service", "jizhi-redis-cluster.service"),
                         ("jizhi-redis-cluster.target", "jizhi-redis-cluster.target")):
        text = (UNITS / source).read_text().replace("/usr/bin/redis-server ", f"{redis} ")
        (tmp_path / name).write_text(text.replace("/usr/local/bin/jizhi-redis-cluster ", f"{tool} "))
        names.append(str(tmp_path / name))
    r = subprocess.run([analyze, "verify", *names], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_systemd_analyze_verify_would_report_a_broken_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = tmp_path / "broken.service"
    unit.write_text((UNITS / "jizhi.service").read_text().replace("Type=notify", "Type=notifyy"))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "Failed to parse service type" in r.stderr + r.stdout


class NotifyListener:
    """A bound AF_UNIX datagram socket and a thread stamping each datagram with time.monotonic() on arrival."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="jz-notify-", dir="/tmp"))   # sun_path holds 108 bytes
        self.path = self.dir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.got = []            # (time.monotonic(), [lines])
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            with self.lock:
                self.got.append((time.monotonic(), data.decode().split("\n")))

    def messages(self):
        with self.lock:
            return list(self.got)

    def first(self, line, after=0.0):
        return next((t for t, lines in self.messages() if t >= after and line in lines), None)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_jizhid_sends_ready_once_it_is_ready_then_watchdog_pings_then_stopping_on_sigterm(launch):
    listener = NotifyListener()
    try:
        server = launch.start(pipelines=["demo"], config_text='[metrics]\nlisten = ""\n', wait_ready=False)
        t_start = time.monotonic()
        popen(server, {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})

        def ready_sent():
            assert server.proc.poll() is None, server.log_tail()
            return listener.first("READY=1")
        t_ready = wait_until(ready_sent, 90, what="READY=1")
        probe = Client(server.endpoint, timeout_s=5.0)
        try:
            assert probe.info()["ready"] is True     # READY=1 is sent only once the broker says ready
            wait_ready(server, probe)
        finally:
            probe.close()
        ready_lines = next(lines for t, lines in listener.messages() if "READY=1" in lines)
        assert ready_lines[1].startswith(f"STATUS=serving demo on {server.endpoint}")

        wait_until(lambda: listener.first("WATCHDOG=1", after=t_ready), 5, what="a WATCHDOG=1 after READY=1")
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        wait_until(lambda: listener.first("STOPPING=1"), 5, what="STOPPING=1")
        t_stopping = listener.first("STOPPING=1")
        assert t_stopping >= t_term
        got = listener.messages()
        order = [line for _, lines in got for line in lines if line in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
        # READY once, watchdog pings (some may precede READY: the loop pings from its start), STOPPING last.
        assert order.count("READY=1") == 1 and order.count("STOPPING=1") == 1
        assert order[-1] == "STOPPING=1"
        assert "WATCHDOG=1" in order[order.index("READY=1"):order.index("STOPPING=1")]
        assert ("STOPPING=1" in next(lines for t, lines in got if "STOPPING=1" in lines)
                and "STATUS=draining" in next(lines for t, lines in got if "STOPPING=1" in lines))
        # Every half WATCHDOG_USEC: never a gap systemd would take for a hang.
        pings = [t for t, lines in got if "WATCHDOG=1" in lines]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert len(pings) >= 2 and max(gaps) < WATCHDOG_USEC / 1e6, gaps
        print(f"\nnotify: READY=1 {t_ready - t_start:.2f} s after start, {len(pings)} WATCHDOG=1 (largest gap "
              f"{max(gaps):.2f} s), STOPPING=1 {t_stopping - t_term:.3f} s after SIGTERM")
    finally:
        listener.close()
