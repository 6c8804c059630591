"""A one-line progress bar on stderr, for the commands that write or push many keys.

Used by `jizhictl cube push` and by the offline tools above jizhictl (the
demo and the importer). Drawn with ``\\r`` on one line; silent when disabled
(``--quiet``, or a caller that wants no output).
"""
import sys


class ProgressBar:
    """``label [######........] done/total note``, rewritten in place as ``advance`` is called."""

    def __init__(self, label, total, enabled):
        self.label, self.total, self.enabled, self.done = label, max(int(total), 1), enabled, 0
        self._draw("")

    def _draw(self, note):
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {note:<24}")
        sys.stderr.flush()

    def advance(self, n=1, note=""):
        self.done = min(self.done + n, self.total)
        self._draw(note)

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
