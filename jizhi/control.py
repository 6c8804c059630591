"""The control protocol, client side: how jizhictl reaches a running jizhid.

The supervisor binds a REP socket at ``ipc://<run_dir>/control.ipc`` (file
mode 0600: only the daemon's user can operate it; there is no TCP control
endpoint). A request is a msgpack map ``{v: 1, cmd, args}``; the reply is
``{v: 1, ok: true, result}`` or ``{v: 1, ok: false, error}``.

The commands themselves, one class each with the docstring that is
jizhictl's ``--help`` text, are served by the supervisor
(jizhi/supervisor/commands/, ``COMMANDS``). This module is the base layer:
it imports nothing of the supervisor.
"""
import os
from pathlib import Path

from jizhi.config import default_run_dir
from jizhi.errors import JizhiError

VERSION = 1
SOCKET_NAME = "control.ipc"


class ControlError(JizhiError):
    """A control command was refused; the message says why."""


class NoAccess(ConnectionError):
    """The control socket, or the run directory holding it, is not this user's to use."""


def endpoint(run_dir):
    return f"ipc://{Path(run_dir) / SOCKET_NAME}"


def present(run_dir):
    """Client side: True when ``run_dir`` holds a control socket this user may connect to, False when
    it holds none. Raises NoAccess (one line: who owns it, what to do) when this user may not look."""
    path = Path(run_dir) / SOCKET_NAME
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        pass
    else:
        if os.access(path, os.R_OK | os.W_OK):
            return True
    try:
        owner = os.stat(run_dir).st_uid
        import pwd
        who = f"uid {owner} ({pwd.getpwuid(owner).pw_name})"
    except (OSError, KeyError):
        who = "another user"
    raise NoAccess(f"permission denied on {path}: jizhid runs as {who} and only that user may operate it; "
                   f"run jizhictl as that user (sudo -u, or as root)")


def run_dir_candidates(instance="default"):
    """Where jizhictl looks for a daemon's run directory, in order."""
    out = []
    env = os.environ.get("JIZHI_RUN_DIR")
    if env:
        out.append(Path(env))
    if instance == "default":
        out.append(Path("/run/jizhi"))
    else:
        out.append(Path(f"/run/jizhi-{instance}"))
    out.append(Path(default_run_dir(instance)))
    return out


def call(run_dir, cmd, args=None, timeout_s=5.0):
    """Client side (jizhictl): send one command; returns the result or raises.

    Raises ConnectionError when no daemon answers (no socket file, or no reply
    in time; NoAccess: not this user's), and ControlError when the daemon
    refused the command.
    """
    import msgpack
    import zmq
    path = Path(run_dir) / SOCKET_NAME
    if not present(run_dir):
        raise ConnectionError(f"no control socket at {path}")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint(run_dir))
        sock.send(msgpack.packb({"v": VERSION, "cmd": cmd, "args": args or {}}, use_bin_type=True))
        if not sock.poll(int(timeout_s * 1000)):
            raise ConnectionError(f"no answer on {path} within {timeout_s:g} s")
        reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
    finally:
        sock.close(0)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "refused"))
    return reply["result"]
