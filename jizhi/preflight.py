"""``jizhid --check-config``: everything a start would fail on, found without starting.

It runs the start's own code where the start has it (``Supervisor.resolve``:
pipelines read and compiled, the model directory scanned, each boot version
verified; ``Supervisor.check_shm``; ``rundir.check``, the run directory's
checks without creating it) and adds what a start only finds out later, from
a child or a thread: whether the frontend and the metrics addresses can be
bound, and whether another jizhid runs the instance. It writes nothing and
starts nothing. Each problem is one line naming the setting and what would
fail.
"""
import errno
import os
import socket
from pathlib import Path

from jizhi import endpoints, rundir
from jizhi.errors import BundleError, PipelineError, RunDirError, ShmFull


def check(sup, demo_to_create=None):
    """Problems (one line each) and facts (what was checked) for the Supervisor ``sup`` (not prepared).

    ``demo_to_create``: the demo directory a ``--demo`` start would create first; the pipelines are then
    read but not compiled (there is no bundle yet to compile them against).
    """
    problems, facts = [], []
    settings = sup.settings
    if demo_to_create is not None:
        facts.append(f"the demo bundle would be created in {demo_to_create} (pipelines read, not compiled)")
        try:
            sup.read_pipelines()
        except PipelineError as e:
            problems.append(str(e))
    elif not sup.models_dir or sup.models_dir == "None":
        problems.append("no model directory: set server.models in the config, pass --models, or use --demo")
    else:
        try:
            plans = sup.resolve()
            sup.check_shm(plans)
            facts.append("pipelines " + ", ".join(
                f"{name} ({', '.join(f'{m} version {v}' for m, v in plan['versions'].items())})"
                for name, plan in plans.items()) + f" compiled against {sup.models_dir}, versions verified; "
                "/dev/shm has room for the arenas")
        except (PipelineError, BundleError, ShmFull) as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"{e.filename or sup.models_dir}: {e.strerror}")
    try:
        rundir.check(sup.run_dir)
        facts.append(f"run directory {sup.run_dir} usable")
    except RunDirError as e:
        problems.append(str(e))
    holder = rundir.instance_holder(sup.instance)
    if holder is not None:
        problems.append(f"server.instance {sup.instance!r}: another jizhid runs it on this host (pid {holder}); "
                        "a start would be refused: stop it, or choose another --instance")
    frontend = settings["server.frontend"]
    why = endpoint_problem(frontend)
    if why:
        problems.append(f"server.frontend {frontend}: {why}: the broker could not bind it (it would exit 7 and "
                        "jizhid would never be ready); choose another --frontend, or stop that process")
    else:
        facts.append(f"frontend {frontend} free")
    listen = settings["metrics.listen"]
    if listen:
        host, _, port = listen.rpartition(":")
        why = tcp_problem(host or "127.0.0.1", int(port))
        if why:
            problems.append(f"metrics.listen {listen}: {why}: the metrics endpoint would not start; choose "
                            'another port, or metrics.listen = "" to disable it')
        else:
            facts.append(f"metrics {listen} free")
    return problems, facts


def endpoint_problem(endpoint):
    """Why a ZeroMQ ``tcp://`` or ``ipc://`` endpoint cannot be bound now, or None."""
    e = endpoints.parse(endpoint)
    if e.scheme == "ipc":
        if not e.abstract:      # (an abstract socket has no file and no directory)
            parent = Path(e.path).parent
            if not os.path.isdir(parent):
                return f"no directory {parent}"
            if not os.path.exists(e.path):
                return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(e.unix_address)
            except OSError:
                return None     # a leftover file (the broker replaces it), or no listener
            return "in use (a process listens on that socket)"
    if e.scheme != "tcp" or e.port is None:
        return None     # a port ZeroMQ picks itself ("*"), or another transport: nothing to check
    return tcp_problem(e.host, e.port)


def tcp_problem(host, port):
    """Why a TCP listener on (host, port) cannot be bound now (naming the process that holds it), or None."""
    host = host.strip("[]")
    if host in ("*", ""):
        host = "0.0.0.0"
    if _interface(host):
        return None     # an interface name (ZeroMQ accepts one): not checked
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        return f"cannot resolve {host!r} ({e.strerror})"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as ZeroMQ and the metrics server bind
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                who = port_holder(port)
                return "address in use" + (f" by pid {who[0]} ({who[1]})" if who else "")
            return e.strerror.lower()
    return None


def _interface(name):
    try:
        return name in {n for _, n in socket.if_nameindex()}
    except OSError:
        return False


def port_holder(port):
    """(pid, command) of a process of ours (all of them, as root) listening on TCP ``port``, or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pid = rundir.socket_holder(inodes)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return pid, (cmd if len(cmd) <= 80 else cmd[:77] + "...")
