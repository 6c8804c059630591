"""Further versions of a demo bundle, for hot reload: ``stage_version``, ``publish`` and the ``FAULTS``.

Runs offline (``jizhictl demo publish``, tests, benchmarks of hot reload),
never in a serving process. A further version copies a version ``init_demo``
(or this module) wrote, with other dense weights or a deliberate fault, and
arrives the way a model pipeline should deliver one: copied into
``<models>/.incoming/``, then one rename into the watch directory.
"""
import os
import shutil
import tomllib

import numpy as np
import onnx
from onnx import numpy_helper

from jizhi.bundle import file_entries, write_text
from jizhi.cube.build import read_all, write_cube
from jizhi.tools.demo.bundle import _field_entries, _Field, _manifest_text
from jizhi.tools.demo.dense import _write_calibrated
from jizhi.tools.publish import copy_file


#: Deliberately bad versions ``stage_version`` can make, for tests of validation and reload.
FAULTS = ("corrupt", "wrong_dim", "nan", "bad_onnx")
_WRONG_DIM = 16
_CORRUPT_BYTES = 16


def _read_demo_manifest(version_dir):
    """(manifest dict, fields) of a version whose manifest ``bundle._manifest_text`` wrote.

    Raises ValueError for any other manifest: re-rendering it from the parsed
    values must give the same text, so nothing in it is silently dropped.
    """
    path = os.path.join(version_dir, "manifest.toml")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    manifest = tomllib.loads(text)
    fields = tuple(_Field(f["name"], f["id"], f["side"], f["kind"], f["max_len"], f["vocab"], f.get("shares"))
                   for f in manifest.get("fields", []))
    files = [(e["path"], e["size"], e["sha256"]) for e in manifest.get("files", [])]
    rendered = _manifest_text(manifest.get("name", ""), manifest.get("version", 0), _field_entries(fields), files)
    if not files or rendered != text:
        raise ValueError(f"{path}: not a complete manifest written by jizhi.tools.demo")
    return manifest, fields


def _edit_onnx(path, edit):
    """Load the model at ``path``, apply ``edit(model)``, check it and save it in place."""
    model = onnx.load(path)
    edit(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _poison_final_bias(model):
    # NaN in the last bias reaches every score, whatever the inputs.
    for init in model.graph.initializer:
        if init.name == "top2.b":
            bias = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.full(bias.shape, np.nan, dtype=np.float32), init.name))
            return
    raise ValueError("dense.onnx has no initializer top2.b")


def _rename_output(old, new):
    def edit(model):
        for node in model.graph.node:
            node.output[:] = [new if name == old else name for name in node.output]
        for output in model.graph.output:
            if output.name == old:
                output.name = new
    return edit


def _flip_bytes_in_the_middle(path):
    with open(path, "r+b") as f:
        middle = os.fstat(f.fileno()).st_size // 2
        f.seek(middle)
        block = f.read(_CORRUPT_BYTES)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in block))


def _fill_staged(staged, source, manifest, fields, version, seed, fault):
    """Write the staged version's files into the empty directory ``staged`` (see ``stage_version``)."""
    name = manifest["name"]
    for entry in manifest["files"]:
        target = os.path.join(staged, entry["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        copy_file(os.path.join(source, entry["path"]), target)     # (1 MiB per call: pace can stop it)

    onnx_file = manifest["onnx"]["file"]
    onnx_path = os.path.join(staged, onnx_file)
    rewritten = set()
    if seed is not None:
        f_user = sum(1 for f in fields if f.side == "user")
        _write_calibrated(staged, _manifest_text(name, version, _field_entries(fields), []), seed, f_user,
                          len(fields) - f_user)
        rewritten.add(onnx_file)
    if fault == "nan":
        _edit_onnx(onnx_path, _poison_final_bias)
        rewritten.add(onnx_file)
    elif fault == "bad_onnx":
        output = manifest["onnx"]["output"]
        _edit_onnx(onnx_path, _rename_output(output, output + "_renamed"))
        rewritten.add(onnx_file)
    elif fault == "wrong_dim":
        cube_dir = os.path.join(staged, "cube")
        keys, vectors = read_all(cube_dir)
        os.remove(os.path.join(cube_dir, "data.mdb"))
        write_cube(cube_dir, keys, vectors[:, :_WRONG_DIM])
        rewritten.add("cube/data.mdb")

    entries = file_entries(staged)
    # Recomputing [[files]] must not launder a damaged source into a consistent version.
    expected = {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]}
    if sorted(expected) != [path for path, _, _ in entries]:
        raise ValueError(f"{staged}: staged files differ from the source's manifest")
    for path, size, digest in entries:
        if path not in rewritten and expected[path] != (size, digest):
            raise ValueError(f"{source}: {path} differs from its manifest entry; not staging a damaged version")
    write_text(os.path.join(staged, "manifest.toml"),
               _manifest_text(name, version, _field_entries(fields), entries))
    if fault == "corrupt":
        _flip_bytes_in_the_middle(onnx_path)


def stage_version(models_dir, source_version_dir, version, seed=None, fault=None):
    """Stage a new version of a demo bundle in ``<models_dir>/.incoming/<name>.<version>/``; return its path.

    Runs offline (tests, benchmarks of hot reload), never in a serving
    process. The listed files of ``source_version_dir`` (a version
    ``init_demo`` or this function wrote) are copied, byte for byte and
    never hardlinked (a version's files must not change when another
    version's are truncated), then the manifest is rewritten with
    ``version`` and recomputed [[files]], written last.

    With ``seed``, ``dense.onnx`` gets the dense weights of that seed,
    calibrated as ``init_demo`` calibrates them, so the version scores
    differently from its source in the same range. ``fault`` (one of
    ``FAULTS``) makes a deliberately bad version:

    * ``"corrupt"``: bytes in the middle of dense.onnx are flipped after the
      manifest is written, so its sha256 no longer matches;
    * ``"wrong_dim"``: the cube holds 16-float vectors while the manifest
      and the graph keep dim 32 (manifest consistent);
    * ``"nan"``: the final layer's bias is NaN, so every score is NaN
      (manifest consistent);
    * ``"bad_onnx"``: the graph's output is not named the manifest's
      ``[onnx] output`` (manifest consistent).

    The staged directory is hidden from a watcher (``.incoming``);
    ``publish`` makes it a version. Raises FileExistsError when the staged
    directory or the version exists already, ValueError for an unknown
    fault, a non-positive version, or a source that is not a demo bundle
    or whose files differ from its manifest; a failed staging leaves no
    directory behind.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    version = int(version)
    if version < 1:
        raise ValueError(f"version {version} is not a positive integer")
    source = os.fspath(source_version_dir)
    manifest, fields = _read_demo_manifest(source)
    name = manifest["name"]
    models_dir = os.fspath(models_dir)
    if os.path.lexists(os.path.join(models_dir, name, str(version))):
        raise FileExistsError(os.path.join(models_dir, name, str(version)))
    incoming = os.path.join(models_dir, ".incoming")
    os.makedirs(incoming, exist_ok=True)
    staged = os.path.join(incoming, f"{name}.{version}")
    os.mkdir(staged)
    try:
        _fill_staged(staged, source, manifest, fields, version, seed, fault)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def publish(staged_path, models_dir):
    """Make a staged version visible: rename it to ``<models_dir>/<name>/<version>``; return that path.

    The one atomic step of a version's arrival (docs/formats.md, "Publishing a version"):
    a watcher sees the version complete or not at all. ``staged_path`` must
    be on the same filesystem (``stage_version`` puts it in
    ``<models_dir>/.incoming``). Name and version come from its manifest.
    Raises FileExistsError when the version exists already (checked before
    the rename; two concurrent publishers of one version are not guarded).
    """
    staged_path = os.fspath(staged_path)
    with open(os.path.join(staged_path, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)
    model_dir = os.path.join(os.fspath(models_dir), manifest["name"])
    final = os.path.join(model_dir, str(int(manifest["version"])))
    os.makedirs(model_dir, exist_ok=True)
    if os.path.lexists(final):
        raise FileExistsError(final)
    os.rename(staged_path, final)
    return final
