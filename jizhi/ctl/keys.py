"""jizhictl keys: CURVE key pairs for the frontend (encryption plus an allow-list of clients).

Offline: writes files only (ZeroMQ's ``zmq.auth``); jizhid reads them at
start from [security] curve_server_secret and curve_clients_dir.
"""
import os
import shutil
from pathlib import Path

import click

from jizhi.ctl.reach import refused


@click.group()
def keys():
    """CURVE keys for the frontend (encryption plus an allow-list of clients)."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, default=("client",), show_default=True,
              help="Name of a client key pair to create and allow (repeatable).")
def keys_init(directory, clients):
    """Create a server key pair and client key pairs in DIRECTORY.

    Writes DIRECTORY/server.key (public: give it to clients),
    server.key_secret (keep it for jizhid), <client>.key and
    <client>.key_secret, and DIRECTORY/clients/<client>.key: the allow-list.
    Then set in jizhi.toml: [security] curve_server_secret =
    "DIRECTORY/server.key_secret", curve_clients_dir = "DIRECTORY/clients".
    """
    import zmq.auth      # (zmq: for this command only, jizhictl starts without it)
    d = Path(directory)
    allow = d / "clients"
    allow.mkdir(parents=True, exist_ok=True)
    if (d / "server.key_secret").exists():
        raise refused(f"{d / 'server.key_secret'} exists; not overwriting keys")
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(d), "server")
        for name in clients:
            pub, _sec = zmq.auth.create_certificates(str(d), name)
            shutil.copy(pub, allow / f"{name}.key")
    finally:
        os.umask(old)
    click.echo(f"server keys: {d / 'server.key'} (public), {d / 'server.key_secret'} (secret)")
    click.echo(f"allowed clients in {allow}: {', '.join(clients)}")
