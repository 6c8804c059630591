"""Mistaken invocations of jizhid and jizhictl: one line naming the problem, the documented exit code, no traceback.

Exit codes (README, `jizhid --help`, `jizhictl --help`): jizhid 2 when it
cannot start or its `--check-config` finds a problem; jizhictl 1 the daemon
is not reachable, 2 a usage error or an input that is not what the command
needs, 3 the daemon refused. Each case runs the real command as a
subprocess; they run concurrently (a thread pool: each one is mostly Python
import time), the few that need a daemon against one small jizhid of this
module (one worker, no hot tier), started while the others run. Cases with
the same command line share one run: `--check-config` reports every problem
it finds, each on its own line.
"""
import os
import signal
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import demo_pipeline_text, free_port, write_text

BIN = Path(sys.executable).parent
TIMEOUT_S = 120.0    # a case that does not fail fast is a failure (and is killed)


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple        # formatted with the context (paths, ports) before it runs
    code: int
    words: tuple       # each in one line of stderr, formatted like argv
    daemon: bool = False


def jizhid(*a):
    return (str(BIN / "jizhid"), *a)


def ctl(*a):
    return (str(BIN / "jizhictl"), *a)


# A start's own options, on a free port, a private instance and run directory, metrics off.
START = ("--instance", "{instance}", "--run-dir", "{tmp}/run-{instance}", "--frontend", "tcp://127.0.0.1:{free}",
         "--config", "{tmp}/nometrics.toml")
CHECK = ("--check-config", "--models", "{models}", *START)
STOPPED = ("--run-dir", "{tmp}/no-daemon")
LISTENING = ("--endpoint", "tcp://127.0.0.1:{busy}")
# Everything wrong at once: one --check-config run says each on its own line.
BUSY_EVERYWHERE = jizhid("--check-config", "--models", "{models}", "--pipelines", "typo_pipeline.toml", "--instance",
                         "{instance}", "--run-dir", "{tmp}/open-run", "--frontend", "tcp://127.0.0.1:{busy}",
                         "--config", "{tmp}/busy_metrics.toml")
MISSING_AND_LONG = jizhid("--check-config", "--models", "{tmp}/no-models", "--instance", "{instance}", "--run-dir",
                          "{tmp}/" + "r" * 110, "--frontend", "tcp://127.0.0.1:{free}", "--config",
                          "{tmp}/nometrics.toml")

CASES = [
    # -- jizhid: arguments and config
    Case("jizhid-unknown-option", jizhid("--nosuch"), 2, ("unrecognized arguments: --nosuch",)),
    Case("jizhid-config-missing", jizhid("--config", "{tmp}/missing.toml"), 2,
         ("cannot read config {tmp}/missing.toml: No such file or directory",)),
    Case("jizhid-config-toml-syntax", jizhid("--config", "{tmp}/syntax.toml"), 2,
         ("config {tmp}/syntax.toml is not valid TOML",)),
    Case("jizhid-config-unknown-setting", jizhid("--config", "{tmp}/unknown.toml"), 2,
         ("unknown setting 'server.nosuch'",)),
    Case("jizhid-config-bad-value", jizhid("--config", "{tmp}/zero.toml"), 2,
         ("setting limits.max_in_flight = 0: must be > 0",)),
    Case("jizhid-no-model-directory", jizhid("--instance", "{instance}", "--run-dir", "{tmp}/run-{instance}"), 2,
         ("jizhid: no model directory: set server.models in the config, pass --models, or use --demo",)),
    # -- jizhid: a start that cannot start (nothing is left behind: no child was started)
    Case("start-models-dir-missing", jizhid("--models", "{tmp}/no-models", *START), 2,
         ("jizhid: the model directory {tmp}/no-models does not exist",)),
    Case("start-pipeline-file-missing", jizhid("--models", "{models}", "--pipelines", "typo_pipeline.toml", *START), 2,
         ("jizhid: pipeline 'typo_pipeline.toml': no file typo_pipeline.toml",)),
    Case("start-run-dir-others-may-write", jizhid("--models", "{models}", "--instance", "{instance}", "--run-dir",
                                                  "{tmp}/open-run", "--frontend", "tcp://127.0.0.1:{free}",
                                                  "--config", "{tmp}/nometrics.toml"), 2,
         ("jizhid: run directory {tmp}/open-run: group or others may write it (mode 0777)",)),
    # -- jizhid --check-config: what a start would fail on, without starting
    Case("check-pipeline-toml-syntax", jizhid(*CHECK, "--pipelines", "{tmp}/broken.toml"), 2,
         ("pipeline file {tmp}/broken.toml is not valid TOML",)),
    Case("check-pipeline-unknown-processor", jizhid(*CHECK, "--pipelines", "{tmp}/unknown_processor.toml"), 2,
         ("stage 'cube': unknown processor 'cube_acessor'",)),
    Case("check-pipeline-model-missing", jizhid(*CHECK, "--pipelines", "{tmp}/other_model.toml"), 2,
         ("model 'nosuchmodel'", "{models}")),
    Case("check-models-dir-missing", MISSING_AND_LONG, 2, ("jizhid: the model directory {tmp}/no-models does not exist",)),
    Case("check-no-model-directory", jizhid("--check-config", *START), 2,
         ("jizhid: no model directory: set server.models",)),
    Case("check-demo-pipeline-missing", jizhid("--check-config", "--demo", "--demo-dir", "{tmp}/no-demo",
                                               "--pipelines", "nosuch", *START), 2,
         ("jizhid: pipeline 'nosuch': no file",)),
    Case("check-frontend-port-in-use", BUSY_EVERYWHERE, 2,
         ("jizhid: server.frontend tcp://127.0.0.1:{busy}: address in use by pid {pid}", "exit 7")),
    Case("check-metrics-port-in-use", BUSY_EVERYWHERE, 2,
         ("jizhid: metrics.listen 127.0.0.1:{busy}: address in use by pid {pid}",
          "the metrics endpoint would not start")),
    Case("check-run-dir-others-may-write", BUSY_EVERYWHERE, 2,
         ("jizhid: run directory {tmp}/open-run: group or others may write it",)),
    Case("check-pipeline-file-missing", BUSY_EVERYWHERE, 2,
         ("jizhid: pipeline 'typo_pipeline.toml': no file typo_pipeline.toml",)),
    Case("check-run-dir-path-too-long", MISSING_AND_LONG, 2,
         ("jizhid: run directory {tmp}/" + "r" * 110 + ": its socket paths would be", "over the 107 a unix socket")),
    # -- jizhictl: arguments
    Case("ctl-unknown-command", ctl("nosuch"), 2, ("No such command 'nosuch'",)),
    Case("ctl-unknown-option", ctl("query", "--nosuch"), 2, ("No such option", "--nosuch")),
    Case("ctl-query-no-candidates", ctl("query"), 2, ("give candidates: --trace, --items or --random",)),
    Case("ctl-scale-to-0", ctl("scale", "scorer", "0", *STOPPED), 2, ("Invalid value for 'N': 0 is not in the range x>=1",)),
    Case("ctl-scale-to-minus-1", ctl("scale", "scorer", "-1", *STOPPED), 2,
         ("Invalid value for 'N': -1 is not in the range x>=1",)),
    # -- jizhictl: inputs that are not what the command needs (query reads them once something listens at
    # --endpoint: here a bare TCP listener, which never answers)
    Case("ctl-query-bundle-not-a-bundle", ctl("query", "--random", "5", "--bundle", "{tmp}", *LISTENING), 2,
         ("{tmp} is not a bundle version directory (no manifest.toml)",)),
    Case("ctl-query-trace-not-npz", ctl("query", "--trace", "{tmp}/trace.txt", *LISTENING), 2,
         ("{tmp}/trace.txt is not a request trace (not an .npz file",)),
    Case("ctl-query-trace-missing-arrays", ctl("query", "--trace", "{tmp}/partial.npz", *LISTENING), 2,
         ("{tmp}/partial.npz is not a request trace", "offsets")),
    Case("ctl-query-trace-index-out-of-range", ctl("query", "--trace", "{tmp}/small.npz", "--index", "3",
                                                   *LISTENING), 2,
         ("3 is not a request of {tmp}/small.npz (it has 3: 0 .. 2)",)),
    Case("ctl-query-random-more-than-items", ctl("query", "--random", "100000000", "--bundle", "{bundle}",
                                                 *LISTENING), 2, ("100000000: the bundle {bundle} has", "items to draw from")),
    Case("ctl-bench-trace-missing", ctl("bench", "--trace", "{tmp}/missing.npz", "--rate", "10"), 2,
         ("'{tmp}/missing.npz' does not exist",)),
    Case("ctl-bench-trace-too-short", ctl("bench", "--trace", "{tmp}/small.npz", "--rate", "100", "--duration", "20",
                                          *LISTENING), 2,
         ("the trace has 3 requests, a point at 100 requests/s for 20 s needs 2000 distinct ones",)),
    Case("ctl-demo-trace-not-a-bundle", ctl("demo", "trace", "{tmp}", "{tmp}/t.npz"), 2,
         ("{tmp} is not a bundle version directory",)),
    Case("ctl-shed-train-trace-not-npz", ctl("shed", "train", "--trace", "{tmp}/trace.txt", "--bundle", "{bundle}",
                                             "--out", "{tmp}/policy.json"), 2, ("is not a request trace",)),
    Case("ctl-cube-build-input-missing", ctl("cube", "build", "{tmp}/new-cube", "--from", "{tmp}/missing.npz"), 2,
         ("{tmp}/missing.npz: no such file",)),
    Case("ctl-cube-info-not-a-cube", ctl("cube", "info", "{tmp}"), 2, ("neither a cube (no data.mdb) nor a bundle",)),
    Case("ctl-import-not-onnx", ctl("import", "{tmp}/not.onnx", "--fields", "{tmp}/fields.toml", "--out",
                                    "{tmp}/imported/m/1"), 2, ("{tmp}/not.onnx", "onnx")),
    Case("ctl-import-out-exists", ctl("import", "{tmp}/not.onnx", "--fields", "{tmp}/fields.toml", "--out", "{tmp}"),
         2, ("{tmp} exists already",)),
    # -- jizhictl: no daemon there
    Case("ctl-status-stopped", ctl("status", *STOPPED), 1, ("jizhictl: jizhid is not running (no control socket in",)),
    Case("ctl-stats-stopped", ctl("stats", *STOPPED), 1, ("jizhictl: jizhid is not running",)),
    Case("ctl-reload-stopped", ctl("reload", *STOPPED), 1, ("jizhictl: jizhid is not running",)),
    Case("ctl-scale-stopped", ctl("scale", "scorer", "2", *STOPPED), 1, ("jizhictl: jizhid is not running",)),
    Case("ctl-query-no-daemon", ctl("query", "--random", "5", "--bundle", "{bundle}", "--endpoint",
                                    "tcp://127.0.0.1:{free}"), 1,
         ("jizhictl: jizhid is not running (nothing listens on tcp://127.0.0.1:{free}",)),
    Case("ctl-query-not-a-jizhid", ctl("query", "--random", "5", "--bundle", "{bundle}", *LISTENING, "--timeout",
                                       "0.5"), 1, ("jizhictl: no answer from tcp://127.0.0.1:{busy}",)),
    # -- against a running jizhid
    Case("ctl-query-bundle-is-the-model-dir", ctl("query", "--random", "5", "--bundle", "{models}/demo", "--endpoint",
                                                  "{server_endpoint}"), 0, ("candidates 5",), daemon=True),
    Case("ctl-scale-unknown-pool", ctl("scale", "nosuch", "2", "--run-dir", "{server_run_dir}"), 3,
         ("scale refused: pipeline demo has no stage or fused group 'nosuch'",), daemon=True),
    Case("ctl-pin-unknown-version", ctl("pin", "demo", "99", "--run-dir", "{server_run_dir}"), 3,
         ("model demo has no version 99",), daemon=True),
    Case("ctl-query-unknown-pipeline", ctl("query", "--pipeline", "nosuch", "--items", "1,2", "--user", "1",
                                           "--endpoint", "{server_endpoint}"), 3, ("UNKNOWN_PIPELINE",), daemon=True),
    Case("check-instance-already-running", jizhid("--check-config", "--models", "{models}", "--instance",
                                                  "{server_instance}", "--run-dir", "{server_run_dir}", "--frontend",
                                                  "{server_endpoint}", "--config", "{tmp}/nometrics.toml"), 2,
         ("server.instance '{server_instance}': another jizhid runs it on this host (pid {server_pid})",
          "server.frontend {server_endpoint}: address in use by pid"), daemon=True),
]


def run(argv, cwd, env):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err + f"\n(still running after {TIMEOUT_S} s: killed)"
    return proc.returncode, out, err


def write_files(tmp, busy):
    write_text(tmp / "syntax.toml", "[server]\nfrontend = \n")
    write_text(tmp / "unknown.toml", "[server]\nnosuch = 1\n")
    write_text(tmp / "zero.toml", '[metrics]\nlisten = ""\n[limits]\nmax_in_flight = 0\n')
    write_text(tmp / "nometrics.toml", '[metrics]\nlisten = ""\n')
    write_text(tmp / "busy_metrics.toml", f'[metrics]\nlisten = "127.0.0.1:{busy}"\n')
    write_text(tmp / "broken.toml", 'name = "broken\n')
    write_text(tmp / "unknown_processor.toml",
               demo_pipeline_text("typo").replace('processor = "cube_accessor"', 'processor = "cube_acessor"'))
    write_text(tmp / "other_model.toml", demo_pipeline_text("other").replace('model = "demo"', 'model = "nosuchmodel"'))
    (tmp / "open-run").mkdir()
    os.chmod(tmp / "open-run", 0o777)
    assert stat.S_IMODE((tmp / "open-run").stat().st_mode) == 0o777
    write_text(tmp / "trace.txt", "user,item\n1,2\n")
    np.savez(tmp / "partial.npz", users=np.arange(3, dtype=np.uint64))
    np.savez(tmp / "small.npz", users=np.arange(3, dtype=np.uint64), offsets=np.array([0, 2, 4, 6], np.int64),
             items=np.arange(6, dtype=np.uint64), recall_scores=np.ones(6, np.float32))
    write_text(tmp / "not.onnx", "this is not a model\n")
    write_text(tmp / "fields.toml", '[[fields]]\nname = "u"\nside = "user"\nkind = "onehot"\ninput = "u"\n')


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, demo_bundle, demo_models, launch_module):
    tmp = tmp_path_factory.mktemp("mistakes")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                             "XDG_CACHE_HOME", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                                                             "JIZHI_RUN_DIR")}
    env["HOME"] = str(tmp)      # no ~/.cache/jizhi of the user running the tests
    try:
        write_files(tmp, busy.getsockname()[1])
        ctx = {"tmp": str(tmp), "models": str(demo_models), "bundle": str(demo_bundle), "free": free_port(),
               "busy": busy.getsockname()[1], "pid": os.getpid()}
        small = write_text(tmp / "demo.toml", demo_pipeline_text("demo", pool=1))
        server = launch_module.start(pipelines=(small,), config_text="[cube]\nhot_tier_mb = 0\n", wait_ready=False)
        runs = {}    # argv -> future: cases with the same command line share its run
        with ThreadPoolExecutor(4) as pool:
            started = pool.submit(server.start)
            for case in (c for c in CASES if not c.daemon):
                if case.argv not in runs:
                    argv = [a.format(**ctx, instance=f"m{os.getpid()}x{len(runs)}") for a in case.argv]
                    runs[case.argv] = pool.submit(run, argv, tmp, env)
            started.result()
            ctx.update(server_run_dir=str(server.run_dir), server_endpoint=server.endpoint,
                       server_instance=server.instance, server_pid=server.proc.pid)
            for case in (c for c in CASES if c.daemon):
                runs[case.argv] = pool.submit(run, [a.format(**ctx) for a in case.argv], tmp, env)
        yield {case.id: runs[case.argv].result() for case in CASES}, ctx
    finally:
        busy.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_is_one_line_naming_it_with_the_documented_exit_code(outcomes, case):
    results, ctx = outcomes
    code, out, err = results[case.id]
    shown = f"{' '.join(case.argv)}\nexit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out, shown
    assert code == case.code, shown
    lines = (out if code == 0 else err).splitlines()
    for words in case.words:
        want = words.format(**ctx)
        assert any(want in line for line in lines), f"{want!r} is not in one line of stderr\n{shown}"
    assert "config OK" not in out, shown


def test_every_case_has_its_own_name_and_there_are_enough():
    assert len({c.id for c in CASES}) == len(CASES) >= 20
