"""The run directory and the bundle against another local user (issue 16, item 5).

A real second user (``useradd`` here, ``userdel`` at the end; skipped when this test cannot create
one) pre-creates run directories under /tmp with links in them, squats the instance's abstract
socket names, and runs jizhictl against a daemon that is not its own. The interpreter lives under
/root, which that user cannot enter: its processes start as root, import what they need, and then
become the other user for good (setgroups, setgid, setuid) before they do anything under test.
"""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO, wait_until
from daemon_helpers import JIZHICTL, popen, score_ok, wait_ready
from jizhi.client import Client
from jizhi.config import default_run_dir

BECOME = """
import os, sys, socket, fcntl, time
sys.path[:0] = [{repo!r}]
import jizhi.ctl.main, jizhi.control, zmq, msgpack, pwd
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
"""


@pytest.fixture(scope="module")
def other():
    """A local user that is not root: {name, uid, gid}; removed at the end."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("creating another local user needs root and useradd")
    name = f"jzt{os.getpid() % 100000}"
    r = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd {name} failed: {r.stderr.strip()}")
    try:
        import pwd
        pw = pwd.getpwnam(name)
        yield {"name": name, "uid": pw.pw_uid, "gid": pw.pw_gid}
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_other(other, code, **kw):
    """Run python ``code`` as the other user (see the module docstring); returns the CompletedProcess."""
    script = BECOME.format(repo=str(REPO), uid=other["uid"], gid=other["gid"]) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, **kw)


def hostile_dir(other, mode):
    """A run directory under /tmp that the other user made (``mode``), holding links to a root-owned file."""
    d = Path(f"/tmp/jizhi-hostile-{uuid.uuid4().hex[:8]}")
    r = as_other(other, f"""
d = {str(d)!r}
os.mkdir(d); os.chmod(d, {mode})
for name in ("plan.tmp", ".plan.msgpack.tmp", "plan.msgpack", "control.ipc", "instance.lock"):
    os.symlink({str(d)!r} + ".precious", os.path.join(d, name))
""")
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.parametrize("made_by", ["the other user, mode 0777", "root, mode 0777"])
def test_a_run_directory_another_user_could_write_is_refused_and_nothing_is_written_through_its_links(
        launch, other, made_by):
    d = hostile_dir(other, 0o777)
    precious = Path(str(d) + ".precious")
    try:
        precious.write_text("root's own file\n")
        if made_by.startswith("root"):
            os.chown(d, 0, 0)       # (its links stay the other user's)
        server = launch.start(wait_ready=False)
        i = server.argv.index("--run-dir")
        server.argv[i + 1] = str(d)
        popen(server)
        assert server.proc.wait(60) == 2
        log = server.log_text()
        if made_by.startswith("root"):
            assert f"jizhid: run directory {d}: group or others may write it (mode 0777); another user could " \
                   "replace its files: chmod go-w it, or choose another --run-dir\n" in log
        else:
            assert f"jizhid: run directory {d}: it belongs to uid {other['uid']} ({other['name']}), not to this " \
                   "user (uid 0 (root)); another user created it first: remove it, or choose another --run-dir\n" \
                   in log
        assert "Traceback" not in log
        assert precious.read_text() == "root's own file\n"
        assert sorted(p.name for p in d.iterdir()) == [".plan.msgpack.tmp", "control.ipc", "instance.lock",
                                                       "plan.msgpack", "plan.tmp"]
        assert all(p.is_symlink() for p in d.iterdir())
    finally:
        shutil.rmtree(d, ignore_errors=True)
        precious.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def squatted(launch_module, other):
    """A daemon in its default run directory (/tmp/jizhi-0-<instance>, made by jizhid), started while
    the other user holds the instance's abstract socket names (the old fixed one and one of the new form)."""
    server = launch_module.start(wait_ready=False)
    names = [f"jizhi.instance.{server.instance}", f"jizhi.instance.{server.instance}.1.squatter"]
    squatter = subprocess.Popen([sys.executable, "-c", BECOME.format(repo=str(REPO), uid=other["uid"],
                                                                     gid=other["gid"]) + f"""
held = []
for n in {names!r}:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind("\\0" + n); s.listen(1); held.append(s)
print("bound", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert squatter.stdout.readline() == "bound\n"
    run_dir = Path(default_run_dir(server.instance))
    assert not run_dir.exists()
    i = server.argv.index("--run-dir")
    del server.argv[i:i + 2]
    server.plan_path = run_dir / "plan.msgpack"     # (where conftest finds this run's children)
    try:
        popen(server)
        probe = Client(server.endpoint, timeout_s=1.0)
        try:
            wait_ready(server, probe)
        finally:
            probe.close()
        yield {"server": server, "run_dir": run_dir, "squatter": squatter}
    finally:
        squatter.kill()
        squatter.wait()
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_jizhid_creates_its_default_run_directory_mode_0700_and_serves_while_another_user_squats_its_names(
        squatted, demo_trace, trace_scores):
    st = squatted["run_dir"].stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    assert squatted["squatter"].poll() is None
    with squatted["server"].client() as c:
        for q in range(3):
            score_ok(c, demo_trace, trace_scores, q)
    assert "another jizhid is running" not in squatted["server"].log_text()


def test_the_other_user_can_neither_take_the_instance_lock_nor_move_the_control_socket(squatted, other):
    run_dir = squatted["run_dir"]
    r = as_other(other, f"""
for what, act in (("lock", lambda: fcntl.flock(os.open({str(run_dir / 'instance.lock')!r}, os.O_RDWR), fcntl.LOCK_EX)),
                  ("move", lambda: os.rename({str(run_dir / 'control.ipc')!r}, "/tmp/{run_dir.name}.moved"))):
    try:
        act()
        print(what, "done")
    except PermissionError:
        print(what, "denied")
""")
    assert r.stdout == "lock denied\nmove denied\n", r.stderr
    assert (run_dir / "control.ipc").exists()


def test_a_second_jizhid_of_the_instance_is_refused_in_its_run_directory_and_in_another(squatted, launch):
    first = squatted["server"]
    for where in ("the same run directory", "another run directory"):
        second = launch.start(wait_ready=False)
        second.argv[second.argv.index("--instance") + 1] = first.instance
        if where == "the same run directory":
            i = second.argv.index("--run-dir")
            del second.argv[i:i + 2]
        popen(second)
        assert second.proc.wait(60) == 2, second.log_tail()
        assert f"jizhid: another jizhid is running instance {first.instance!r} on this host (stop it, or choose " \
               "another --instance)" in second.log_text()
    assert first.running
    assert first.info()["ready"]


def test_jizhictl_as_a_user_without_access_says_so_in_one_line_and_exits_1(squatted, other):
    run_dir = squatted["run_dir"]
    r = as_other(other, f"sys.exit(jizhi.ctl.main.main(['status', '--run-dir', {str(run_dir)!r}]))")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"jizhictl: permission denied on {run_dir}/control.ipc: jizhid runs as uid 0 (root) and "
                        "only that user may operate it; run jizhictl as that user (sudo -u, or as root)\n")
    env = dict(os.environ, JIZHI_RUN_DIR=str(run_dir))
    r = as_other(other, f"sys.exit(jizhi.ctl.main.main(['stats', '--instance', {squatted['server'].instance!r}]))", env=env)
    assert (r.returncode, r.stdout, r.stderr.count("\n")) == (1, "", 1), r.stderr
    assert r.stderr.startswith(f"jizhictl: permission denied on {run_dir}/control.ipc")
    r = subprocess.run([str(JIZHICTL), "status", "--run-dir", str(run_dir)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "health ready" in r.stdout, r.stderr


def test_after_a_crash_no_stale_lock_and_no_write_through_links_left_in_its_run_directory(
        squatted, demo_trace, trace_scores):
    server, run_dir = squatted["server"], squatted["run_dir"]
    server.kill_group()
    wait_until(lambda: not server.children(), 10, what="the killed run's children to exit")
    # Links in its own run directory (only root could put them there): replaced, never written through.
    precious = Path(f"{run_dir}.precious")
    precious.write_text("root's own file\n")
    for name in (".plan.msgpack.tmp", "plan.msgpack"):
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(precious)
    plan = run_dir / "plan.msgpack"
    try:
        popen(server)
        wait_until(lambda: not plan.is_symlink(), 60, what="jizhid to replace the plan file's link")
        probe = Client(server.endpoint, timeout_s=1.0)
        try:
            wait_ready(server, probe)
        finally:
            probe.close()
        with server.client() as c:
            score_ok(c, demo_trace, trace_scores, 1)
        assert precious.read_text() == "root's own file\n"
        assert not plan.is_symlink() and plan.stat().st_mode & 0o777 == 0o600
        assert not (run_dir / ".plan.msgpack.tmp").exists()
    finally:
        precious.unlink()


def test_a_bundle_file_linked_from_outside_its_version_directory_is_rejected(launch, demo_models, tmp_path):
    models = tmp_path / "models"
    version = models / "demo" / "1"
    shutil.copytree(demo_models / "demo" / "1", version, copy_function=os.link)
    outside = tmp_path / "elsewhere.onnx"
    os.link(version / "dense.onnx", outside)      # the same bytes: the manifest's size and sha256 still hold
    (version / "dense.onnx").unlink()
    (version / "dense.onnx").symlink_to(outside)
    why = f"{version}: dense.onnx resolves to {outside}, outside the version directory"
    r = subprocess.run([sys.executable, "-m", "jizhi.validate", str(version), "--name", "demo", "--version", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert why in r.stdout.splitlines()[-1]
    server = launch.start(wait_ready=False)
    server.argv[server.argv.index("--models") + 1] = str(models)
    popen(server)
    assert server.proc.wait(60) == 2
    assert f"jizhid: model 'demo' has no version to serve in {models} (rejected: 1: {why}" in server.log_text()
