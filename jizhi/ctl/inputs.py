"""The files jizhictl's commands take as input: a request trace and a bundle named by any of its directories.

``Trace`` reads the trace format (docs/formats.md, "Trace") that `jizhictl
record` and `jizhictl demo trace` write; `query --trace` takes one request of
it, and the tools (bench, shed train) replay whole traces through it.
``resolve_bundle`` turns a version, model or demo directory into the bundle
version directory a command reads. Both refuse with ``click.BadParameter``
(exit 2, one line naming the option), never with a traceback.
"""
import zipfile
from pathlib import Path

import click
import numpy as np


class Trace:
    """A request trace (docs/formats.md): ``users`` uint64 [Q], ``offsets``
    int64 [Q+1], ``items`` uint64, ``recall_scores`` float32."""

    def __init__(self, path):
        self.path = str(path)
        if not zipfile.is_zipfile(path):
            raise click.BadParameter(f"{path} is not a request trace (not an .npz file; jizhictl demo trace or "
                                     "jizhictl record writes one, docs/formats.md)", param_hint="--trace")
        try:
            with np.load(path, allow_pickle=False) as data:
                self.users = np.ascontiguousarray(data["users"], dtype=np.uint64)
                self.offsets = np.ascontiguousarray(data["offsets"], dtype=np.int64)
                self.items = np.ascontiguousarray(data["items"], dtype="<u8")
                self.recall = np.ascontiguousarray(data["recall_scores"], dtype="<f4")
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:    # exit 2, one line, no traceback
            raise click.BadParameter(f"{path} is not a request trace (an .npz of users, offsets, items and "
                                     f"recall_scores, docs/formats.md): {e}", param_hint="--trace") from None
        if self.offsets.shape[0] != self.users.shape[0] + 1 or self.offsets[-1] != self.items.shape[0]:
            raise click.BadParameter(f"trace {path}: offsets do not match users and items", param_hint="--trace")
        self.counts = np.diff(self.offsets)

    def __len__(self):
        return self.users.shape[0]

    def mean_candidates(self):
        return float(self.counts.mean()) if len(self) else 0.0


def resolve_bundle(path):
    """A bundle version directory from ``path``: the version directory itself,
    a model directory (``<models>/<name>``: its newest version) or a directory
    holding ``models/<name>/`` (the demo layout; one model)."""
    from jizhi.bundle import find_version     # (onnx, ~0.7 s: only when a bundle is named)
    p = Path(path)
    if (p / "manifest.toml").is_file():
        return p
    if any(c.name.isdigit() for c in p.iterdir()) if p.is_dir() else False:
        return find_version(p.parent, p.name)
    models = p / "models"
    if models.is_dir():
        names = [c.name for c in models.iterdir() if c.is_dir() and not c.name.startswith(".")]
        if len(names) == 1:
            return find_version(models, names[0])
    raise click.BadParameter(f"{path} is not a bundle version directory (no manifest.toml)", param_hint="--bundle")
