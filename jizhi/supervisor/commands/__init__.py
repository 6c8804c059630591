"""The control commands jizhid serves: one module per command, registered in ``COMMANDS``.

The control protocol (the socket, the request and reply maps, the client) is
jizhi/control.py. Each command is one class (``base.Command``): its ``name``;
its docstring, which is the ``--help`` text of the jizhictl command of that
name (``COMMANDS[name].__doc__``); ``validate(args)`` and
``execute(supervisor, args)``. Commands change *desired* state and wake the
supervisor loop; only the loop's ``manage()`` starts or stops processes.

jizhictl imports this package for the help texts: nothing heavy is imported
here or in the command modules (no numpy, onnx, numba or zmq).
"""
from jizhi.control import VERSION, ControlError
from jizhi.supervisor.commands.drain import Drain
from jizhi.supervisor.commands.models import Models
from jizhi.supervisor.commands.pin import Pin
from jizhi.supervisor.commands.record import Record
from jizhi.supervisor.commands.reload import Reload
from jizhi.supervisor.commands.resume import Resume
from jizhi.supervisor.commands.scale import Scale
from jizhi.supervisor.commands.shed import Shed
from jizhi.supervisor.commands.stats import Stats
from jizhi.supervisor.commands.status import Status
from jizhi.supervisor.commands.unpin import Unpin

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
