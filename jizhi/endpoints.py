"""ZeroMQ endpoints as jizhi writes them (``tcp://HOST:PORT``, ``ipc://PATH``), parsed in one place.

Who reads them here: ``jizhid --check-config`` (``jizhi.preflight``: could the
broker bind the frontend now?), jizhictl (``jizhi.ctl.reach``: does anything
listen on a local endpoint, said at once instead of after ``--timeout``) and
the Python client (``jizhi.client``: a comma-separated list of nodes). Pure
string work, safe in any process: no socket is opened here.
"""
from typing import NamedTuple


class Endpoint(NamedTuple):
    """One endpoint, parsed.

    ``scheme``: ``tcp``, ``ipc``, or another ZeroMQ transport (kept, not
    looked into); ``""`` when there is no ``://``. ``address``: what follows
    ``://``. For tcp: ``host`` without IPv6 brackets (``*`` or ``""`` mean
    every interface; ZeroMQ also takes an interface name) and ``port``, an
    int, or None when it is ``*`` (ZeroMQ picks one) or not a number. For
    ipc: ``path``, the socket file, or ``@name`` for a Linux abstract socket.
    """

    scheme: str
    address: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def abstract(self):
        """An ipc endpoint in the abstract namespace (no file)."""
        return self.path is not None and self.path.startswith("@")

    @property
    def unix_address(self):
        """The ipc endpoint as ``socket.AF_UNIX`` takes it (the abstract namespace starts with a NUL byte)."""
        return "\0" + self.path[1:] if self.abstract else self.path


def parse(endpoint):
    """``endpoint`` (a str) -> Endpoint. Never raises: what is not understood is left None for the caller."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return Endpoint("", endpoint)
    if scheme == "ipc":
        return Endpoint(scheme, rest, path=rest)
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        return Endpoint(scheme, rest, host=host.strip("[]"), port=int(port) if port.isdigit() else None)
    return Endpoint(scheme, rest)


def split(endpoint):
    """``"tcp://a,tcp://b"`` or ``["tcp://a", "tcp://b"]`` -> ``["tcp://a", "tcp://b"]`` (blanks dropped).

    Raises ValueError when no endpoint is left."""
    parts = endpoint.split(",") if isinstance(endpoint, str) else list(endpoint)
    out = [p.strip() for p in parts if p and p.strip()]
    if not out:
        raise ValueError(f"no endpoint in {endpoint!r}")
    return out
