"""systemd's notify protocol, spoken without systemd or libsystemd.

``notify("READY=1")`` sends one datagram to the unix socket named by
``$NOTIFY_SOCKET`` (an abstract socket when it starts with ``@``). Without the
variable (a plain shell, a test) it does nothing, so jizhid runs the same
everywhere. The supervisor sends READY=1 when every stage has a ready worker,
STATUS=... lines on changes, WATCHDOG=1 every half ``$WATCHDOG_USEC``, and
STOPPING=1 when it starts to drain.
"""
import os
import socket


def _address():
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    return addr


def notify(*lines):
    """Send ``lines`` (``KEY=value``) as one message; False when there is no socket."""
    addr = _address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(lines).encode(), addr)
        except OSError:
            return False
    return True


def watchdog_interval_s():
    """Half the watchdog period systemd asked for, or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
