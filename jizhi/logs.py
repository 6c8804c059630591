"""Logging set-up shared by every jizhi process.

One line per lifecycle event or error, on stderr, never one per request at
INFO. Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts
with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info, as
sd-daemon(3) describes) and carries no timestamp, since journald adds its
own; in a shell it starts with the time. Every line names the process
(``jizhi.broker``, ``jizhi.worker[demo/scorer/0]``, ...) and states facts as
``key=value`` where a script may want to grep them.
"""
import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record):
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def _under_journald():
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(name_format="%(name)s", level=logging.INFO):
    """Configure the root logger of this process; ``name_format`` names the process in each line."""
    handler = logging.StreamHandler(sys.stderr)
    if _under_journald():
        handler.setFormatter(_JournalFormatter(f"%(levelname)s {name_format} %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name_format} %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
