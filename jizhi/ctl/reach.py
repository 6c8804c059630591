"""How jizhictl reaches jizhid, and the exit codes when it cannot.

Two ways in: the control socket (``ask``: the run directory's
``control.ipc``, found from ``--run-dir``/``--instance``; a control
command's help text is its docstring in the registry,
``jizhi.supervisor.commands``) and the frontend
(``client``: the protocol any client speaks, at ``--endpoint``). Every
jizhictl command that talks to the daemon goes through here, so each failure
is said one way:

* 1 (``EXIT_UNREACHABLE``): the daemon could not be reached; one line says
  what to check. Nothing listening on a local endpoint is found at once
  (``exit_if_not_running``), not after ``--timeout``.
* 2: an input the command refuses (``refused``: click's one line with the
  usage-error code).
* 3 (``EXIT_ERROR_REPLY``): the daemon answered with an error.

Runs in the jizhictl process only. ``jizhi.client`` (zmq, numpy) is imported
by ``client`` when a command needs it: the commands that never talk to the
frontend start without it.
"""
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import click

from jizhi import control, endpoints
from jizhi.supervisor.commands import COMMANDS

EXIT_UNREACHABLE = 1
EXIT_ERROR_REPLY = 3
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


def refused(message):
    """An input the command refuses: click's one line, with the usage-error exit code 2 (not ClickException's 1)."""
    e = click.ClickException(message)
    e.exit_code = 2
    return e


# -- the control socket -------------------------------------------------------

def run_dir_option(f):
    """``--run-dir`` and ``--instance``: where ``ask`` looks for the daemon's control socket."""
    # readable=False: a run directory that is not ours is reported by ask() in its own words.
    f = click.option("--run-dir", type=click.Path(file_okay=False, readable=False), default=None,
                     help="The daemon's run directory (holds control.ipc). Default: $JIZHI_RUN_DIR, "
                          "/run/jizhi (systemd), then /tmp/jizhi-<uid>-<instance>.")(f)
    f = click.option("--instance", default="default", show_default=True, help="Instance name (server.instance).")(f)
    return f


def json_option(help="Print JSON."):
    """``--json`` (``as_json``): the command prints the daemon's reply as JSON (``show``)."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def show(reply, as_json, text):
    """Print a control command's ``reply``: JSON with ``--json``, else ``text(reply)``, lines for people
    (nothing when they are none)."""
    out = json.dumps(reply, indent=2) if as_json else text(reply)
    if out:
        click.echo(out)


def control_help(name, op=None):
    """The help text of control command ``name`` (of its ``op``, for a command with ops, like shed): the
    registry's docstring, the one place a command's help is written, for jizhictl's --help and the docs."""
    return COMMANDS[name].ops[op] if op else COMMANDS[name].__doc__


def control_command(name, op=None, **attrs):
    """``click.command`` for control command ``name`` (``jizhictl shed OP`` for an ``op``), its help text
    from the registry (``control_help``)."""
    return click.command(op or name, help=control_help(name, op), **attrs)


def ask(run_dir, instance, cmd, args=None, timeout_s=5.0):
    """Send control command ``cmd`` to the daemon of ``run_dir`` (else of ``instance``); its result.

    Exits 1 when no daemon can be reached (no control socket, not answering, not this user's) and 3 when
    it refused the command."""
    dirs = [Path(run_dir)] if run_dir else control.run_dir_candidates(instance)
    tried, denied = [], None
    for d in dirs:
        try:
            if not control.present(d):
                tried.append(str(d))
                continue
        except control.NoAccess as e:
            denied = denied or e    # (another candidate may still be ours)
            continue
        try:
            return control.call(d, cmd, args, timeout_s)
        except ConnectionError as e:
            click.echo(f"jizhictl: jizhid is not answering on {d / control.SOCKET_NAME} ({e}); "
                       "is it running (systemctl status jizhi, or its log)?", err=True)
            sys.exit(EXIT_UNREACHABLE)
        except control.ControlError as e:
            click.echo(f"jizhictl: {cmd} refused: {e}", err=True)
            sys.exit(EXIT_ERROR_REPLY)
    if denied is not None:
        click.echo(f"jizhictl: {denied}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"jizhictl: jizhid is not running (no control socket in {', '.join(tried)}); "
               "pass --run-dir or --instance if it runs elsewhere", err=True)
    sys.exit(EXIT_UNREACHABLE)


# -- the frontend -------------------------------------------------------------

def client(endpoint, timeout_s):
    """A ``jizhi.client.Client`` of ``endpoint`` (one, or several comma-separated)."""
    from jizhi.client import Client     # (zmq and numpy: only for the commands that use the frontend)
    return Client(endpoint, timeout_s=timeout_s)


def unreachable(endpoint, e):
    """Exit 1: ``endpoint`` did not answer within the request's timeout (``e``)."""
    click.echo(f"jizhictl: no answer from {endpoint} ({e}); is jizhid running and is --endpoint right?", err=True)
    sys.exit(EXIT_UNREACHABLE)


def not_listening(endpoint):
    """Why nothing can answer on a local ``endpoint`` (ipc://, or tcp:// on a loopback address), found at
    once: no socket file, or the connection refused. None when something listens there, and for any other
    endpoint (a remote host: only the request's --timeout can tell)."""
    e = endpoints.parse(endpoint)
    if e.scheme == "ipc":
        if not e.abstract and not os.path.exists(e.path):
            return f"no socket file {e.path}"
        targets = [(socket.AF_UNIX, e.unix_address)]
    elif e.scheme == "tcp" and e.port is not None:
        try:
            if e.host == "localhost":
                targets = [(ai[0], ai[4]) for ai in socket.getaddrinfo(e.host, e.port, type=socket.SOCK_STREAM)]
            elif ipaddress.ip_address(e.host).is_loopback:
                targets = [(socket.AF_INET6 if ":" in e.host else socket.AF_INET, (e.host, e.port))]
            else:
                return None
        except (ValueError, OSError):
            return None
    else:
        return None
    for family, addr in targets:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect(addr)
            return None                           # something listens (it is asked properly next)
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        except OSError:
            return None                           # cannot tell here: the request's timeout decides
        finally:
            s.close()
    return "connection refused"


def exit_if_not_running(endpoint_list):
    """A local endpoint with nothing listening is said at once, as `status` says a missing control socket:
    one line, exit code 1 (not after --timeout). With several endpoints, only when none listens."""
    reasons = [not_listening(e) for e in endpoint_list]
    if all(reasons):
        where = "; ".join(f"{e}: {r}" for e, r in zip(endpoint_list, reasons))
        click.echo(f"jizhictl: jizhid is not running (nothing listens on {where}); "
                   "pass --endpoint if it runs elsewhere", err=True)
        sys.exit(EXIT_UNREACHABLE)
