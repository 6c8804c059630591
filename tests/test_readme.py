"""The README's quick start, run as written, in order, in a fresh HOME and working directory.

The shell blocks the README marks with an ``<!-- readme-test ... -->`` line
right before their fence are run, line by line, with ``bash -c``; the test
fails naming the first command that fails. What it does not run as written,
and why (``SETUP``, ``SHORTER``, ``is_server``):

* the install (``python3 -m venv .venv && . .venv/bin/activate``, ``pip
  install -e .``) is not run: the test runs in the environment it made (this
  Python's ``bin/`` first on PATH); ``.ci/run`` does the install itself, in a
  fresh virtual environment;
* sizes and durations are scaled by 1/10 (``--duration 20`` -> ``2``,
  ``--requests 2000`` -> ``200``, every ``--duration N`` and ``--requests N``
  alike: a bench point needs rate x duration distinct requests, so a README
  whose trace is too short for its bench line still fails here);
* ``jizhid ...`` (a server: it runs until stopped) runs in the background; the
  test waits for its ``ready: serving demo on tcp://127.0.0.1:5555`` line,
  runs the commands after it, then stops it with SIGTERM and checks that it
  exits 0 and leaves no shared memory.

It uses what the README uses: port 5555 and instance ``default`` (it fails
at once, saying so, when something else holds either), and a fresh HOME, so
``jizhid --demo`` creates the demo bundle in ``~/.cache/jizhi/demo`` as a
first use does: that generation is part of what this test costs (a few
seconds of the module's time, on top of the session's own demo bundle).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, processes_mentioning, wait_until
from jizhi.config import default_run_dir
from jizhi.preflight import tcp_problem
from jizhi.rundir import instance_holder

README = REPO / "README.md"
MARK = re.compile(r"^<!--\s*readme-test\b.*-->\s*$")
SETUP = {"python3 -m venv .venv && . .venv/bin/activate": "the test runs in the environment the install made",
         "pip install -e .": "the test runs in the environment the install made (.ci/run installs afresh)"}
SHORTER = ("--duration", "--requests")    # N -> N / SCALE (at least 1)
SCALE = 10
READY_TIMEOUT_S = 300.0      # the demo bundle is created first; a loaded 2-core machine
COMMAND_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
INSTANCE = "default"         # the README's commands name no instance or endpoint


def marked_blocks(text):
    """[(line number of the fence, [commands])] of the shell blocks a readme-test line marks."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not MARK.match(line):
            continue
        j = i + 1
        assert lines[j].startswith("```"), f"README line {i + 1}: a readme-test mark not right before a fence"
        commands, k = [], j + 1
        while not lines[k].startswith("```"):
            cmd = lines[k]
            while cmd.endswith("\\"):       # a continued line is one command
                k += 1
                cmd = cmd[:-1] + lines[k]
            if cmd.strip() and not cmd.lstrip().startswith("#"):
                commands.append(cmd.strip())
            k += 1
        blocks.append((j + 1, commands))
    return blocks


def as_run(cmd):
    """The command the test runs for README command ``cmd`` (None: not run)."""
    if cmd in SETUP:
        return None
    for flag in SHORTER:
        cmd = re.sub(rf"{flag}(=| +)(\d+)\b", lambda m: f"{flag}{m.group(1)}{max(1, int(m.group(2)) // SCALE)}", cmd)
    return cmd


def is_server(cmd):
    return cmd.split()[0] == "jizhid" and not {"--help", "--check-config"} & set(cmd.split())


def test_the_readme_marks_its_quick_start():
    blocks = marked_blocks(README.read_text())
    assert len(blocks) >= 2, blocks
    commands = [c for _, cs in blocks for c in cs]
    assert sum(map(is_server, commands)) == 1, commands
    assert any(c.startswith("jizhictl bench") for c in commands), commands


def test_the_readme_quick_start_runs_as_written(tmp_path):
    blocks = marked_blocks(README.read_text())
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "JIZHI_RUN_DIR", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HOME=str(home), PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    holder = instance_holder(INSTANCE)
    busy = tcp_problem("127.0.0.1", 5555)
    assert holder is None and busy is None, (
        f"the README's commands use instance {INSTANCE!r} and port 5555: "
        + "; ".join(x for x in (holder and f"pid {holder} runs instance {INSTANCE!r}", busy and f"5555: {busy}") if x))
    run_dir = Path(default_run_dir(INSTANCE))
    run_dir_was_there = run_dir.exists()
    shm = sorted(p.name for p in Path("/dev/shm").glob(f"jizhi.{INSTANCE}.*"))
    assert not shm, f"shared-memory segments of instance {INSTANCE!r} exist before the test: {shm}"

    server = log = None
    ran = []
    try:
        for fence_line, commands in blocks:
            for cmd in commands:
                run = as_run(cmd)
                if run is None:
                    continue
                where = f"README line {fence_line} block, command {cmd!r}" + (f" (run as {run!r})" if run != cmd else "")
                if is_server(run):
                    assert server is None, f"{where}: a second server"
                    log = open(tmp_path / "jizhid.log", "wb")
                    server = subprocess.Popen(["bash", "-c", f"exec {run}"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

                    def ready():
                        text = (tmp_path / "jizhid.log").read_text(errors="replace")
                        if server.poll() is not None:
                            raise AssertionError(f"{where} exited with {server.returncode} before it was ready:\n"
                                                 + text[-4000:])
                        return "ready: serving demo on tcp://127.0.0.1:5555" in text
                    wait_until(ready, READY_TIMEOUT_S, interval_s=0.2, what=f"{where} to log its ready line")
                    assert (home / ".cache/jizhi/demo/models/demo/1/manifest.toml").is_file()
                    ran.append(cmd)
                    continue
                r = subprocess.run(["bash", "-c", run], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
                assert r.returncode == 0, (f"{where} failed with exit code {r.returncode}\nstdout:\n{r.stdout[-3000:]}"
                                           f"\nstderr:\n{r.stderr[-3000:]}")
                assert "Traceback" not in r.stderr, f"{where}: a traceback\n{r.stderr[-3000:]}"
                ran.append(cmd)
        assert server is not None, "no README block starts the server"
        server.send_signal(signal.SIGTERM)      # as the README says: "Stop it with Ctrl-C or SIGTERM"
        rc = server.wait(STOP_TIMEOUT_S)
        text = (tmp_path / "jizhid.log").read_text(errors="replace")
        assert rc == 0, f"jizhid --demo exited {rc} on SIGTERM\n{text[-4000:]}"
        assert "Traceback" not in text, text[-4000:]
        left = sorted(p.name for p in Path("/dev/shm").glob(f"jizhi.{INSTANCE}.*"))
        assert not left, f"jizhid --demo left shared memory: {left}"
        assert not processes_mentioning(str(run_dir / "plan.msgpack")), "jizhid --demo left processes"
        assert len(ran) >= 6, ran
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        if log is not None:
            log.close()
        for p in Path("/dev/shm").glob(f"jizhi.{INSTANCE}.*"):
            p.unlink(missing_ok=True)
        if not run_dir_was_there:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("cmd, want", [
    ("jizhictl bench --trace trace.npz --rate 100 --duration 20   # x", "jizhictl bench --trace trace.npz --rate 100 "
                                                                       "--duration 2   # x"),
    ("jizhictl demo trace D trace.npz --requests 2000", "jizhictl demo trace D trace.npz --requests 200"),
    ("jizhictl bench --duration=200 --rate 20", "jizhictl bench --duration=20 --rate 20"),
    ("jizhictl demo trace D trace.npz --requests 200", "jizhictl demo trace D trace.npz --requests 20"),
    ("pip install -e .", None),
])
def test_the_substitutions_are_the_documented_ones(cmd, want):
    assert as_run(cmd) == want
