"""``jizhictl import``: an ONNX model that holds its embedding tables -> a bundle version.

Runs offline, in the process that calls it (``jizhictl import``, tests), never
in a serving process. ``import_model`` reads a DLRM-style model trained
elsewhere (its embedding tables are initializers read by Gather nodes, pooled
by ReduceSum/ReduceMean or by the Loop ``torch.onnx.export`` writes for
``nn.EmbeddingBag``) and a FIELDS.toml that says what its inputs are
(docs/formats.md, "Importing a model"), and writes a bundle version
directory:

* ``cube/``: every row of every table, row ``v`` of field ``f`` under
  ``sign(f.id, v + 1, hash_seed)`` (raw value = row + 1: raw value 0 means
  "missing" in jizhi);
* ``dense.onnx``: the graph with the ids inputs and the lookups replaced by
  jizhi's inputs (``dense``, ``user_emb``, ``item_emb``, ``user_index``) in
  the naive per-pair form: ``Gather(dense, user_index)`` -> ``dense_pp`` and
  ``Gather(user_emb, user_index)`` -> ``user_emb_pp`` first, every pooled
  tensor read from a column of those, the rest of the graph unchanged, its
  output a float32 ``score`` [P];
* ``profiles/``: generated (seeded random valid values) or copied;
* ``manifest.toml``, written last.

Then it proves the split: random pairs scored by jizhi's own stage
processors (data_reader, feature_processor, cube_accessor, model_inference,
in this process, reading the new version's files) must match the original
model run by onnxruntime on the same raw ids within ``CHECK_ATOL +
CHECK_RTOL * |original|``. Everything is written in a hidden directory beside
the target and renamed into place only when the check passes, so a failed
import leaves nothing behind.

Refusals raise ``BundleError`` naming the FIELDS.toml entry, the graph input
or the node (its name and op type) that cannot be imported.

The steps, one module each: ``fields`` (FIELDS.toml, ``refuse``),
``lookups`` (finding the tables and pooled bags: ``analyse``, with ``scope``
for the graph and ``bags`` for EmbeddingBag loops), ``rewrite``
(the bundle's graph), ``files`` (profiles, signatures, cube, manifest) and
``check`` (the proof); this module loads the model and runs them in order
(``import_model``). The ONNX helpers are jizhi.graph.proto's, shared with the
graph passes.
"""
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from jizhi.bundle import file_entries, write_text
from jizhi.graph.session import session_options
from jizhi.tools.importer.check import check
from jizhi.tools.importer.fields import NAME, read_fields, refuse
from jizhi.tools.importer.files import (copy_profiles, generate_profiles, manifest_order, manifest_text, table_owners,
                                        write_cube, write_item_signatures)
from jizhi.tools.importer.lookups import analyse
from jizhi.tools.importer.rewrite import rewrite


# --- loading ---------------------------------------------------------------------------

def _session_options():
    options = session_options()
    options.log_severity_level = 3   # errors only: optimizer notes about Loop bodies are noise here
    return options


def load_model(path):
    """``(ModelProto with its weights, onnxruntime session)`` of the model at ``path``, both checked.

    ``onnx.checker.check_model`` runs with ``full_check`` (strict shape
    inference) on the loaded model, weights in an external data file read
    from the model's directory (on the path for a model over 2 GB). Raises
    BundleError naming what failed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        refuse(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as e:   # protobuf's DecodeError, a missing external data file, ...
        refuse(f"{path}: onnx cannot read the model: {type(e).__name__}: {e}")
    try:
        # The loaded proto when it fits in one protobuf (every tensor readable, even shape constants
        # kept in the external data file, which a check on the path cannot read); the path otherwise.
        onnx.checker.check_model(model if model.ByteSize() < 2 ** 31 - 1 else path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        refuse(f"{path}: onnx.checker rejects the model: {e}")
    except Exception as e:
        refuse(f"{path}: onnx cannot check the model: {type(e).__name__}: {e}")
    try:
        session = ort.InferenceSession(path, sess_options=_session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime raises its own Fail/InvalidGraph/... types
        refuse(f"{path}: onnxruntime cannot load the model: {e}")
    return model, session


# --- the command -------------------------------------------------------------------------

def import_model(model_path, fields_path, out_dir, *, name=None, version=1, users=1000, items=10000, seed=1,
                 hash_seed=0, profiles=None, check_pairs=2000, progress=True, log=print):
    """Import the ONNX model at ``model_path`` as the bundle version directory ``out_dir``; the check result.

    ``fields_path``: FIELDS.toml. ``name`` defaults to the model file's stem.
    ``profiles``: a directory holding ``users/`` and ``items/`` snapshots to
    copy; without it ``users`` users and ``items`` items are generated from
    ``seed``. ``check_pairs`` random pairs are then scored by jizhi and by
    the original model (``check``). Everything is written into a hidden
    directory beside ``out_dir`` (same filesystem) and renamed to
    ``out_dir`` only when the check passes; on any failure it is removed.
    ``log`` gets the summary lines; progress bars go to stderr when
    ``progress``. Raises BundleError (refused input, or the check failed)
    and FileExistsError when ``out_dir`` exists.
    """
    model_path = os.fspath(model_path)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        raise FileExistsError(out_dir)
    name = name or os.path.splitext(os.path.basename(model_path))[0]
    if not NAME.match(name):
        refuse(f"model name {name!r}: letters, digits, _ . - only (it is a directory name); give --name")
    if version < 1:
        refuse(f"version {version} is not a positive integer")
    if hash_seed < 0:
        refuse(f"hash seed {hash_seed} is negative")
    if profiles is None and (users < 1 or items < 1):
        refuse("users and items must be positive")
    spec = read_fields(fields_path)
    model, session = load_model(model_path)
    analysis = analyse(model, spec)
    graph = rewrite(model, spec, analysis)
    del model
    owners = table_owners(analysis.lookups)
    log(f"{model_path}: {len(analysis.lookups)} embedding lookups, dim {analysis.dim}, "
        f"{analysis.dense_features} dense user features, opset {analysis.opset}")
    for lk in manifest_order(analysis.lookups):
        f = lk.field
        shared = "" if owners[lk.table] is lk else f", shares {owners[lk.table].field.name!r}'s table"
        log(f"  {f.side} field {f.name!r} ({f.kind}, max_len {f.max_len}): table {lk.table!r} "
            f"{list(lk.vectors.shape)}, {lk.pooling} pooling, read by {lk.where}{shared}")

    parent = os.path.dirname(out_dir)
    if os.path.basename(out_dir).isdigit() and (int(os.path.basename(out_dir)) != version
                                                or os.path.basename(parent) != name):
        log(f"note: the manifest says model {name!r} version {version}; jizhid serves a version only from "
            f"<models>/{name}/{version}/ (publish it there, or give --name and --version)")
    made = []     # directories this import creates, removed again if it fails
    ancestor = parent
    while not os.path.isdir(ancestor):
        made.append(ancestor)
        ancestor = os.path.dirname(ancestor)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.import-", dir=parent)
    try:
        # mkdtemp makes it 0700: give it the mode of every other directory of the model directory (0777 less
        # the umask, 0755 usually), or a jizhid running as another user could not read the version.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)
        onnx_path = os.path.join(partial, "dense.onnx")
        if graph.ByteSize() < 2 ** 31 - 1:
            onnx.save(graph, onnx_path)
        else:
            onnx.save(graph, onnx_path, save_as_external_data=True, all_tensors_to_one_file=True,
                      location="dense.onnx.data")
        del graph
        if profiles is not None:
            copy_profiles(profiles, partial, analysis)
        else:
            generate_profiles(partial, analysis, users, items, seed)
        hash_ids = {lk.field.name: owners[lk.table].field.id for lk in analysis.lookups}
        write_item_signatures(partial, analysis, hash_ids, hash_seed)
        counts = [np.load(os.path.join(partial, "profiles", side, "ids.npy"), mmap_mode="r").shape[0]
                  for side in ("users", "items")]
        log(f"profiles: {counts[0]} users, {counts[1]} items "
            + (f"(from {profiles})" if profiles is not None else f"(generated, seed {seed})"))
        keys = write_cube(partial, analysis, hash_seed, progress)
        log(f"cube: {keys} signatures from {len(owners)} tables (raw value = row + 1)")
        write_text(os.path.join(partial, "manifest.toml"),
                   manifest_text(name, version, analysis, hash_seed, model_path, file_entries(partial)))
        result = check(partial, analysis, session, check_pairs, seed, progress)
        log(result.line())
        if not result.ok:
            refuse(f"the imported graph does not score like the original model (worst pair: {result.worst}); "
                   f"nothing was written to {out_dir}")
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for directory in made:
            try:
                os.rmdir(directory)
            except OSError:
                break
        raise
    log(f"imported {out_dir}")
    return result
