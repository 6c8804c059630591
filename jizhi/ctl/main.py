"""jizhictl's click group: the commands of jizhi.ctl's families, and ``main``.

``cli`` holds the commands that operate a server and its files (the
families of ``jizhi.ctl``). The tools above it (bench, demo, import, tune,
shed train, cube bench) add theirs in ``jizhi.tools.commands``, whose
``main`` is what ``bin/jizhictl`` runs; ``run`` is the one way either entry
runs a group.
"""
import logging

import click

from jizhi import logs
from jizhi.ctl import cube, frontend, keys, server, shed, top
from jizhi.errors import JizhiError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jizhi")
def cli():
    """Operate and exercise a jizhi server.

    jizhictl talks to jizhid's frontend (ZeroMQ, the same protocol any client
    speaks). Start a server with `jizhid --demo`, then try
    `jizhictl query --random 500 --bundle ~/.cache/jizhi/demo/models/demo/1`.

    Exit codes: 0 success; 1 the daemon could not be reached; 2 a usage
    error or an input that is not what the command needs (one line names
    it); 3 the daemon refused or answered an error.
    """


for command in (server.status, server.stats, server.scale, server.drain, server.resume, server.reload,
                server.models, server.pin, server.unpin, server.record, top.top, shed.shed,
                frontend.info, frontend.query, keys.keys, cube.cube):
    cli.add_command(command)


def run(group, argv=None):
    """Run the click ``group`` as jizhictl: its exit code (0, 1, 2 or 3, jizhi.ctl.reach)."""
    logs.setup("jizhictl", level=logging.WARNING)   # a library's warning is a log line, never a bare print
    try:
        return group.main(args=argv, prog_name="jizhictl")
    except (OSError, JizhiError) as e:
        # An input that is not what the command needs (a file missing or unreadable, a bundle that is not
        # one) found below the command's own checks: one line, exit 2, never a traceback.
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        click.echo(f"jizhictl: {where}{e.strerror if isinstance(e, OSError) and e.strerror else e}", err=True)
        return 2


def main(argv=None):
    """jizhictl without the tools' commands (the tools' ``main`` runs the whole CLI)."""
    return run(cli, argv)
