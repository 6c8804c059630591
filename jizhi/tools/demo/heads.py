"""Head bundles on the demo's features: ``write_head`` (and ``python -m jizhi.tools.demo head``).

Runs offline (``jizhictl demo head``, tests, benchmarks of multi-model
pipelines). A head bundle (docs/formats.md, "Head bundles") is a dense graph
only, the demo's graph with a top MLP of its own widths, served by a pipeline
on its base model's features.
"""
import os
import tomllib

from jizhi.bundle import Bundle, file_entries, find_version, write_text
from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.errors import BundleError
from jizhi.tools.demo.bundle import NAME, _assembled, _manifest_text
from jizhi.tools.demo.dense import _layers, _write_calibrated


#: Top MLP widths of a head like the demo's own (``hidden`` of ``write_head``).
HEAD_HIDDEN = (256, 128)
# A head's logits over sampled pairs: spread enough to rank, far from saturating the sigmoid.
_HEAD_LOGIT_STD = 1.0


def _head_manifest_text(base_manifest, name, version, files):
    """manifest.toml of a head bundle: the base's dim, hash_seed, default_vector,
    [dense] and [[fields]] (every key copied), ``head = true``, its own graph and files."""
    for f in base_manifest["fields"]:
        for key, value in f.items():
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"field {f.get('name')!r}: cannot copy {key} = {value!r} (strings and integers only)")
    return _manifest_text(name, version, [tuple(f.items()) for f in base_manifest["fields"]], files, head=True,
                          dim=base_manifest["dim"], hash_seed=base_manifest.get("hash_seed", 0),
                          default_vector=base_manifest.get("default_vector", "zeros"),
                          user_features=base_manifest.get("dense", {}).get("user_features", 0))


def write_head(models_dir, name, version=1, base=None, hidden=HEAD_HIDDEN, seed=11, progress=False):
    """Write the head bundle ``<models_dir>/<name>/<version>/`` for ``base``'s features; return its path.

    Runs offline (tests, benchmarks of multi-model pipelines). A head bundle
    (docs/formats.md, "Head bundles") is a dense graph only: ``manifest.toml``
    (``head = true``, the base's dim, hash_seed, [dense] and [[fields]]) and
    ``dense.onnx``, no cube and no profiles; a pipeline serves it on its
    base model's features (``[[stage]] processor = "model_inference"``,
    ``model = "<name>"``). ``base`` is a full bundle's version directory
    (default: the newest version of ``demo`` in ``models_dir``).

    The graph is the demo's (``_dense_model``: bottom MLP, user tower, dot
    interactions with each item field, top MLP, sigmoid) with a top MLP of
    widths ``hidden`` (``(32,)`` light, ``(512, 256, 128)`` heavy) and
    weights from ``seed``; its final layer is rescaled so the logits over
    pairs sampled from the base's profiles (scored by the ReferenceScorer)
    have std ``_HEAD_LOGIT_STD``, which keeps the sigmoid away from 0 and 1.
    Deterministic: the same base and arguments give byte-identical files.

    Assembled in the hidden sibling ``.<version>.partial`` with the manifest
    written last, then renamed into place, like ``init_demo``. Raises
    FileExistsError when the version exists, ValueError for bad arguments
    (a name that is not a plain directory name or is the base's, empty or
    non-positive widths), BundleError for a base that is not a full bundle.
    """
    models_dir = os.fspath(models_dir)
    if not isinstance(name, str) or not name or name.startswith(".") or os.sep in name or name in (".", ".."):
        raise ValueError(f"head name {name!r} is not a plain directory name")
    version = int(version)
    if version < 1:
        raise ValueError(f"version {version} is not a positive integer")
    hidden = tuple(hidden)
    if not hidden or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in hidden):
        raise ValueError(f"hidden must be one or more positive layer widths, got {hidden!r}")
    base = os.fspath(base) if base is not None else os.fspath(find_version(models_dir, NAME))
    base_bundle = Bundle(base)
    if base_bundle.head:
        raise BundleError(f"{base} is a head bundle: a head's base must have the cube and profiles")
    if name == base_bundle.name:
        raise ValueError(f"head name {name!r} is the base model's: a head is a model of its own")
    with open(os.path.join(base, "manifest.toml"), "rb") as f:
        base_manifest = tomllib.load(f)

    model_dir = os.path.join(models_dir, name)
    with _assembled(model_dir, version) as partial:
        bar = _Progress(f"head {name}", 2, progress)
        try:
            f_user, f_item = len(base_bundle.user_fields), len(base_bundle.item_fields)
            layers = _layers(hidden, base_bundle.dense_features, f_user, f_item, base_bundle.dim)
            _write_calibrated(partial, _head_manifest_text(base_manifest, name, version, []), seed, f_user, f_item,
                              base=base, logit_std=_HEAD_LOGIT_STD, layers=layers,
                              dense_features=base_bundle.dense_features, dim=base_bundle.dim,
                              graph_name="jizhi_demo_head")
            bar.advance(note="dense.onnx")
            write_text(os.path.join(partial, "manifest.toml"),
                       _head_manifest_text(base_manifest, name, version, file_entries(partial)))
            bar.advance(note="manifest")
        finally:
            bar.close()
    return os.path.join(model_dir, str(version))
