"""jizhictl top: a live view of the daemon's figures, refreshed until q (or Ctrl-C).

Asks the ``stats`` control command every ``--interval`` seconds and prints
``figures``' tables, the latency breakdown per stage group and the shedding
state. In a terminal, stdin is put in cbreak mode (``_Keys``) so a single q
quits; without one (a pipe, a test) it refreshes until ``--count``.
"""
import os
import select
import sys
import termios
import time
import tty

import click

from jizhi.ctl import figures
from jizhi.ctl.reach import ask, run_dir_option


@click.command()
@run_dir_option
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--count", default=0, help="Stop after this many refreshes (0: until Ctrl-C).")
def top(run_dir, instance, interval, count):
    """A live view of the per-stage figures, refreshed every --interval seconds. q (or Ctrl-C) quits."""
    i = 0
    try:
        with _Keys() as keys:
            while True:
                info = ask(run_dir, instance, "stats")
                click.clear() if sys.stdout.isatty() else None
                click.echo(time.strftime("%H:%M:%S ") + figures.stats_table(info))
                click.echo(_breakdown(info))
                click.echo(figures.storage_lines(info))
                shed_lines = _shed_info_lines(info)
                if shed_lines:
                    click.echo(shed_lines)
                if keys.tty:
                    click.echo("(q quits)")
                i += 1
                if count and i >= count:
                    break
                if keys.wait_for_quit(interval):
                    break
    except KeyboardInterrupt:
        pass


class _Keys:
    """Single key presses from a terminal on stdin, without blocking (``top``'s q): the terminal is put in
    cbreak mode (keys arrive unbuffered and unechoed; Ctrl-C still interrupts) and restored on exit.
    When stdin is not a terminal, waiting is a plain sleep."""

    def __init__(self):
        self.fd, self.saved = None, None
        try:
            if sys.stdin is not None and sys.stdin.isatty():
                self.fd = sys.stdin.fileno()
        except (OSError, ValueError):
            self.fd = None

    @property
    def tty(self):
        return self.saved is not None

    def __enter__(self):
        if self.fd is not None:
            try:
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
            except termios.error:
                self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass

    def wait_for_quit(self, seconds):
        """Wait up to ``seconds``; True as soon as q (or Q) is pressed."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if not self.tty:
                time.sleep(left)
                continue
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 64)
                except OSError:
                    data = b""
                if not data:         # the terminal went away: keep refreshing, as without one
                    self.__exit__()
                    self.saved = None
                    continue
                if b"q" in data or b"Q" in data:
                    return True


def _shed_info_lines(info):
    """Shedding per pipeline with a shedder: mode, quota, the share of candidates shed lately."""
    lines = []
    for pname, p in info["pipelines"].items():
        sh = p.get("shedding")
        if sh:
            lines.append(f"{pname}: shedding {sh['mode']}, quota {sh['quota']:.3f}, policy {sh['policy']}, "
                         f"shed {100 * sh.get('shed_ratio_recent', 0.0):.1f} % of candidates in the last seconds")
    return "\n".join(lines)


def _breakdown(info):
    """Latency breakdown by stage (queue wait and service, p50), as bars."""
    lines = ["latency breakdown (p50 per group: wait '.', service '#', 1 char = 0.25 ms)"]
    for pname, p in info["pipelines"].items():
        for g, gs in p["groups"].items():
            w = gs["wait_us"]["p50"] or 0
            s = gs["service_us"]["p50"] or 0
            bar = "." * min(60, int(w / 250)) + "#" * min(60, int(s / 250))
            lines.append(f"  {pname + '/' + g:<24} {bar}")
    return "\n".join(lines)
