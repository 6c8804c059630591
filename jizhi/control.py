"""The control protocol: a registry of commands, served by the supervisor.

The supervisor binds a REP socket at ``ipc://<run_dir>/control.ipc`` (file
mode 0600: only the daemon's user can operate it; there is no TCP control
endpoint). A request is a msgpack map ``{v: 1, cmd, args}``; the reply is
``{v: 1, ok: true, result}`` or ``{v: 1, ok: false, error}``.

Each command is one class: its ``name``, a docstring that is also jizhictl's
``--help`` text, ``validate(args)`` (raises ControlError) and
``execute(supervisor, args)``. Commands change *desired* state and wake the
supervisor loop; only the loop's ``manage()`` starts or stops processes.
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


class Command:
    name = None

    def validate(self, args):
        return args

    def execute(self, sup, args):
        raise NotImplementedError


def _pool_key(sup, args):
    pipeline, group = args.get("pipeline"), args.get("group")
    plans = sup.run["pipelines"]
    if pipeline is None:
        pipeline = sup.run["default_pipeline"]
    if pipeline not in plans:
        raise ControlError(f"no pipeline {pipeline!r} (served: {', '.join(plans)})")
    groups = plans[pipeline]["groups"]
    if group not in groups:
        raise ControlError(f"pipeline {pipeline} has no stage or fused group {group!r} (groups: {', '.join(groups)})")
    return pipeline, group


class Status(Command):
    """Processes, pids, uptime, model versions and health."""
    name = "status"

    def execute(self, sup, args):
        return sup.status()


class Stats(Command):
    """Per stage: pool size, queue depth, events/s, wait and service p50/p99; per request: errors by code."""
    name = "stats"

    def execute(self, sup, args):
        return sup.stats()


class Scale(Command):
    """Set a pool's size: scale GROUP N [--pipeline P]. Requests in flight are not dropped."""
    name = "scale"

    def validate(self, args):
        n = args.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ControlError("the pool size must be an integer >= 1 (a group without a worker would hold its "
                               "requests until their deadline; `jizhictl drain` stops admitting)")
        return args

    def execute(self, sup, args):
        pipeline, group = _pool_key(sup, args)
        if args["n"] > sup.settings["workers.max_pool"]:
            raise ControlError(f"the pool size must be at most workers.max_pool = {sup.settings['workers.max_pool']}")
        before = sup.desired[(pipeline, group)]
        from jizhi.supervisor import SCALE
        sup.set_pool(pipeline, group, args["n"], source=SCALE)     # kept across a reload: Supervisor.reload_pool
        return {"pipeline": pipeline, "group": group, "before": before, "after": args["n"]}


class Drain(Command):
    """Stop admitting new requests (they get OVERLOADED) and finish the ones in flight; `resume` undoes it."""
    name = "drain"

    def execute(self, sup, args):
        sup.set_draining(True)
        return {"draining": True}


class Resume(Command):
    """Admit requests again after `drain`."""
    name = "resume"

    def execute(self, sup, args):
        sup.set_draining(False)
        return {"draining": False}


class Reload(Command):
    """Re-read the config and pipelines and rescan the model directory now (the same code path as SIGHUP).

    An invalid config is refused and the running one kept. Versions refused for
    the memory budget are tried again. A pool size set at run time (scale, the
    autoscaler) is kept unless the config's value for that pool changed; the
    reply says which (``applied``, ``kept``, ``pools``).
    """
    name = "reload"

    def execute(self, sup, args):
        model = args.get("model")
        if model is not None and model not in sup.registry.records:
            raise ControlError(f"no model {model!r} is served (served: {', '.join(sup.registry.records)})")
        return sup.reload(model)


class Models(Command):
    """Every model's policy and versions: state, when it appeared and started serving, the load timeline, errors."""
    name = "models"

    def execute(self, sup, args):
        return sup.models()


def _model_version(sup, args, need_version):
    model = args.get("model")
    if not isinstance(model, str) or not model:
        raise ControlError("name a model")
    v = args.get("version")
    if need_version and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ControlError("the version must be a positive integer")
    return model, v


class Pin(Command):
    """Serve one version of a model (rollback): pin MODEL VERSION. Remembered across restarts; `unpin` undoes it."""
    name = "pin"

    def execute(self, sup, args):
        model, v = _model_version(sup, args, True)
        return sup.pin(model, v)


class Unpin(Command):
    """Return a model to its pipeline file's policy (usually the latest good version): unpin MODEL."""
    name = "unpin"

    def execute(self, sup, args):
        model, _ = _model_version(sup, args, False)
        return sup.pin(model, None)


class Record(Command):
    """Live traffic for a trace: op start | fetch (what came since the last fetch) | stop."""
    name = "record"

    def validate(self, args):
        if args.get("op") not in ("start", "fetch", "stop"):
            raise ControlError("op must be start, fetch or stop")
        return args

    def execute(self, sup, args):
        return sup.record(args["op"])


class Shed(Command):
    """Load shedding of a pipeline with a shedder stage: op status | auto | set (quota, policy) | off."""
    name = "shed"

    def validate(self, args):
        op = args.get("op")
        if op not in ("status", "auto", "set", "off"):
            raise ControlError("shed: op must be status, auto, set or off")
        quota = args.get("quota")
        if quota is not None and (not isinstance(quota, (int, float)) or isinstance(quota, bool)
                                  or not 0 < quota <= 1):
            raise ControlError("shed set: the quota (mean fraction of candidates kept) must be in (0, 1]")
        return args

    def execute(self, sup, args):
        return sup.shed_command(args)


COMMANDS = {c.name: c for c in (Status, Stats, Scale, Drain, Resume, Reload, Models, Pin, Unpin, Record, Shed)}


def handle(sup, request):
    """Supervisor side: run one decoded request; return the reply map."""
    if not isinstance(request, dict) or request.get("v") != VERSION:
        return {"v": VERSION, "ok": False, "error": f"expected a map with v={VERSION}"}
    cls = COMMANDS.get(request.get("cmd"))
    if cls is None:
        return {"v": VERSION, "ok": False, "error": f"unknown command {request.get('cmd')!r} (known: {', '.join(COMMANDS)})"}
    args = request.get("args") or {}
    if not isinstance(args, dict):
        return {"v": VERSION, "ok": False, "error": "args must be a map"}
    cmd = cls()
    try:
        return {"v": VERSION, "ok": True, "result": cmd.execute(sup, cmd.validate(args))}
    except ControlError as e:
        return {"v": VERSION, "ok": False, "error": str(e)}


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
