"""Validation of a candidate bundle version before any serving worker maps it.

Runs in a child process of the supervisor, one per candidate version
(``python -m jizhi.validate VERSION_DIR --name N --version V``, under a
timeout): loading a candidate can crash its process (a malformed graph in
onnxruntime, a cube file truncated under its mapping: SIGBUS), and that must
never touch the supervisor. The child prints one JSON line, the result of
``validate``, as the last line of stdout and exits 0 when the version is
accepted, 1 when it is rejected (2: bad arguments). Any other exit, a
signal or the timeout is a rejection the supervisor names itself.

The checks run in this order, each timed, and stop at the first failure:

``manifest``  the manifest parses, and carries the expected name and version;
``files``     the manifest lists the files the workers map, and every listed
              file has its listed size and sha256;
``onnx``      the graph's inputs and output are what ``ModelInference`` feeds
              and reads, with the manifest's sizes;
``cube``      the LMDB cube opens read-only, is non-empty, and a sample of
              its entries has 8-byte keys and ``dim`` finite float32s;
``profiles``  the columnar user and item profiles open with the manifest's
              shapes; every raw value is in its field's range (a field of a
              bounded table: 1..vocab, 0 = missing for onehot; any field: not
              negative; docs/formats.md, "Bounded tables"); every field's
              default vector (``default_vector``) can be computed;
``smoke``     the real stage classes, chained as a fused worker runs them,
              score every item of the catalogue (10 to a request, users
              spread over the profile; a catalogue over 1,000,000 items: an
              even sample of that many): every score is finite (the 64 pairs
              this check once scored missed a graph that was NaN on 9.6 % of
              real pairs).

A head bundle (manifest ``head = true``, docs/formats.md) is a dense graph
served on another model's features: it has no cube and no profiles, so its
``files`` check requires only the graph (and refuses listed ``cube/`` or
``profiles/`` files), ``cube`` and ``profiles`` are skipped, and ``smoke``
runs ``ModelInference`` alone on random pooled embeddings of the manifest's
shapes. Whether its features are its base's is the pipeline's check
(``jizhi.bundle.same_features``), not this one's: a version is validated
without knowing the pipelines that will serve it.

Nothing here writes to the version directory. Importing this module
imports numba, lmdb and onnxruntime (the stages'): the supervisor runs it as
a child and does not import it, and so the checks' timings exclude imports.
"""
if __name__ == "__main__":
    from jizhi import lifeline
    lifeline.hold()   # first, before the imports below: this process must never outlive jizhid
import argparse
import contextlib
import json
import os
import resource
import sys
import time

import numpy as np

from jizhi.bundle import Bundle
from jizhi.cube.pooling import default_vectors, table_is_bounded
from jizhi.cube.store import open_cube
from jizhi.errors import BundleError
from jizhi.profilestore import profiles as store_profiles
from jizhi.workers.cube_accessor import CubeAccessor
from jizhi.workers.data_reader import DataReader
from jizhi.workers.feature_processor import FeatureProcessor
from jizhi.workers.model_inference import ModelInference, open_session
from jizhi.workers.ranker import Ranker
from jizhi.workers.stage import REQUEST, Batch

CHECKS = ("manifest", "files", "onnx", "cube", "profiles", "smoke")
# Checks a head bundle skips: it has no cube and no profiles of its own.
HEAD_SKIPS = ("cube", "profiles")
SMOKE_STAGES = (DataReader, FeatureProcessor, CubeAccessor, ModelInference, Ranker)

# Smoke requests: every item of the catalogue, SMOKE_PER_USER items to a request, SMOKE_CHUNK
# candidates to a batch (bounded memory); a larger catalogue: an even sample of SMOKE_MAX_ITEMS
# (the demo's 100,000 items take 1.5 s on one core).
SMOKE_PER_USER = 10
SMOKE_CHUNK = 4096
SMOKE_MAX_ITEMS = 1_000_000
# A head's smoke batch: users x items of random pooled embeddings, about the demo cube's scale.
SMOKE_USERS = 2
SMOKE_ITEMS = 32
SMOKE_SEED = 0
SMOKE_EMBEDDING_STD = 0.1
# Cube entries sampled besides the first and the last (spread over the key space).
CUBE_SAMPLE = 8

_ONNX_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}


def _peak_rss_bytes():
    """This process's peak resident set: VmHWM of /proc/self/status.

    Not ru_maxrss: Linux carries it over an exec from the pre-exec memory
    (for a child started by fork or vfork, the parent's peak), so a small
    child of a large supervisor would report the supervisor's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _fail(message):
    raise BundleError(message)


def _shape_text(shape):
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _tensor_text(type_name, shape):
    return f"{_ONNX_TYPES.get(type_name, type_name)} {_shape_text(shape)}"


def _check_tensor(kind, arg, want_type, want_shape):
    """Compare an onnxruntime NodeArg with the expected type and shape.

    A str in ``want_shape`` is a batch dim (U users, P pairs): it varies per
    micro-batch, so the graph must leave it symbolic. An int must match a
    fixed dim of the graph; a symbolic dim of the graph is accepted.
    """
    shape = arg.shape
    why = None
    if arg.type != want_type or shape is None or len(shape) != len(want_shape):
        why = ""
    else:
        for want, got in zip(want_shape, shape):
            if isinstance(want, str) and isinstance(got, int):
                why = f" ({want} varies per batch: the graph must leave that dim symbolic)"
            elif isinstance(want, int) and isinstance(got, int) and want != got:
                why = ""
                break
    if why is not None:
        _fail(f"onnx {kind} {arg.name!r}: expected {_tensor_text(want_type, want_shape)}, "
              f"the graph has {_tensor_text(arg.type, shape)}{why}")


def _check_values(where, side, field, ids, col, bounded):
    """Every raw value of ``field``'s profile column ``col`` (onehot: int64 [R]; else (values, offsets)) in its
    range, vectorised; the first one out (and how many) in one line naming the file, the row and its id."""
    onehot = field.kind == "onehot"
    values = np.asarray(col if onehot else col[0])
    lo = 0 if onehot else 1
    bad = (values < lo) | (values > field.vocab) if bounded else values < 0
    if not bad.any():
        return
    i = int(np.argmax(bad))
    n = int(np.count_nonzero(bad))
    row = i if onehot else int(np.searchsorted(np.asarray(col[1]), i, side="right")) - 1
    file = f"{field.name}.npy" if onehot else f"{field.name}.values.npy"
    entry = "" if onehot else f", bag entry {i - int(col[1][row])}"
    if bounded:
        why = (f"outside {lo}..{field.vocab} (vocab = {field.vocab}"
               + (", 0 = missing)" if onehot else ")"))
    else:
        why = "negative (a raw value of a table of entity ids is an id, below 2**63)"
    more = f"; {n - 1} more such value{'s' if n > 2 else ''} in this file" if n > 1 else ""
    _fail(f"{where}/{file}: {side} field {field.name!r}, row {row} ({side} id {int(ids[row])}){entry}: "
          f"raw value {int(values[i])} is {why}{more}")


def _required_files(bundle):
    """Paths the workers map, which the manifest must therefore list."""
    if bundle.head:
        return [bundle.manifest.get("onnx", {}).get("file", "dense.onnx")]
    required = [bundle.manifest.get("onnx", {}).get("file", "dense.onnx"), "cube/data.mdb"]
    if bundle.profile_store is not None:
        return required         # its profiles are a store's snapshots, checked by profilestore.fits
    required += ["profiles/users/ids.npy", "profiles/users/dense.npy",
                 "profiles/items/ids.npy", "profiles/items/sigs.npy", "profiles/items/sig_lens.npy"]
    for f in bundle.user_fields + bundle.item_fields:
        if f.context:
            continue            # a request-level value: no profile column
        directory = f"profiles/{f.side}s/"
        if f.kind == "onehot":
            required.append(directory + f"{f.name}.npy")
        else:
            required += [directory + f"{f.name}.values.npy", directory + f"{f.name}.offsets.npy"]
    return required


class _Checks:
    """The state the checks share: one method per name in CHECKS, in order."""

    def __init__(self, version_dir, name, version):
        self.version_dir = version_dir
        self.name = name
        self.version = version
        self.bundle = None
        self.sizes = {"files_bytes": None, "cube_bytes": None, "onnx_bytes": None}

    def manifest(self):
        b = self.bundle = Bundle(self.version_dir)
        if self.name is not None and b.name != self.name:
            _fail(f"{b.path}: the manifest names model {b.name!r}, the directory is model {self.name!r}")
        if self.version is not None and b.version != int(self.version):
            _fail(f"{b.path}: the manifest says version {b.version}, the directory is version {int(self.version)}")

    def files(self):
        b = self.bundle
        listed = {}
        for entry in b.files:
            path = entry.get("path") if isinstance(entry, dict) else None
            if (not isinstance(path, str) or not isinstance(entry.get("size"), int)
                    or not isinstance(entry.get("sha256"), str)):
                _fail(f"{b.path}: a [[files]] entry lacks a path, an integer size or a sha256: {entry!r}")
            if os.path.isabs(path) or ".." in path.split("/"):
                _fail(f"{b.path}: [[files]] path {path!r} is outside the version directory")
            listed[path] = entry["size"]
        missing = [p for p in _required_files(b) if p not in listed]
        if missing:
            _fail(f"{b.path}: the manifest does not list {', '.join(missing)} (it must list every file a worker maps)")
        if b.head:
            own = [p for p in listed if p.startswith(("cube/", "profiles/"))]
            if own:
                _fail(f"{b.path}: a head bundle has no cube or profiles (it is served on its base model's), "
                      f"the manifest lists {', '.join(own)}")
        onnx_file = os.path.relpath(b.onnx_path, b.path).replace(os.sep, "/")
        self.sizes = {"files_bytes": sum(listed.values()),
                      "cube_bytes": sum(s for p, s in listed.items() if p.startswith("cube/")),
                      "onnx_bytes": listed[onnx_file]}
        b.verify()

    def onnx(self):
        b = self.bundle
        session = open_session(b.onnx_path)
        fu, fi = len(b.user_fields), len(b.item_fields)
        expected = {"dense": ("tensor(float)", ("U", b.dense_features)),
                    "user_emb": ("tensor(float)", ("U", fu, b.dim)),
                    "item_emb": ("tensor(float)", ("P", fi, b.dim)),
                    "user_index": ("tensor(int64)", ("P",))}
        inputs = {arg.name: arg for arg in session.get_inputs()}
        missing = [n for n in expected if n not in inputs]
        if missing:
            _fail(f"onnx: the graph has no input {', '.join(missing)} "
                  f"(ModelInference feeds {', '.join(expected)})")
        extra = [n for n in inputs if n not in expected]
        if extra:
            _fail(f"onnx: the graph needs input {', '.join(extra)}, which ModelInference does not feed "
                  f"(it feeds {', '.join(expected)})")
        for name, (type_name, shape) in expected.items():
            _check_tensor("input", inputs[name], type_name, shape)
        outputs = {arg.name: arg for arg in session.get_outputs()}
        if b.onnx_output not in outputs:
            _fail(f"onnx: the graph has no output {b.onnx_output!r} (the manifest's [onnx] output); "
                  f"its outputs are {', '.join(outputs)}")
        _check_tensor("output", outputs[b.onnx_output], "tensor(float)", ("P",))

    def cube(self):
        b = self.bundle
        # The process's one environment for this path (LMDB forbids a second),
        # which the smoke check's cube_accessor then reuses.
        cube = open_cube(b.cube_path, b.dim)
        with cube.env.begin() as txn:
            if txn.stat()["entries"] == 0:
                _fail(f"{b.cube_path}: the cube holds no entries")
            cursor = txn.cursor()
            sample = []
            if cursor.first():
                sample.append(cursor.item())
            for i in range(1, CUBE_SAMPLE + 1):
                # LMDB orders keys bytewise: spread probes over the first byte.
                if cursor.set_range(bytes([i * 256 // (CUBE_SAMPLE + 1)]) + bytes(7)):
                    sample.append(cursor.item())
            if cursor.last():
                sample.append(cursor.item())
        for key, value in sample:
            if len(key) != 8:
                _fail(f"{b.cube_path}: cube keys have {len(key)} bytes, signatures are 8 bytes")
            if len(value) != b.dim * 4:
                if len(value) % 4:
                    _fail(f"{b.cube_path}: cube values have {len(value)} bytes, not a whole number of "
                          f"float32s; the manifest says dim = {b.dim}")
                _fail(f"{b.cube_path}: cube vectors have {len(value) // 4} floats, the manifest says dim = {b.dim}")
            if not np.isfinite(np.frombuffer(value, dtype="<f4")).all():
                _fail(f"{b.cube_path}: the vector of signature {int.from_bytes(key, 'little'):#018x} is not finite")

    def profiles(self):
        b = self.bundle
        cube = open_cube(b.cube_path, b.dim)
        bounded = {}        # (table, vocab) -> whether vocab bounds its raw values
        if b.profile_store is not None:
            from jizhi.profilestore import newest_fitting
            found, refused = newest_fitting(b.profile_store, b)
            if found is None:
                _fail(f"{b.path}/manifest.toml: [profiles] store = {str(b.profile_store)!r}: no snapshot there fits "
                      f"this version (" + ("; ".join(f"snapshot {n}: {w}" for n, w in refused)
                                           or "no complete snapshot") + ")")
        for side in ("user", "item"):
            p = store_profiles(b, side)
            where = f"{p.root}/{side}s"
            ids = p.ids
            if ids.dtype != np.uint64 or ids.ndim != 1 or ids.shape[0] == 0:
                _fail(f"{where}/ids.npy is {ids.dtype} {ids.shape}, expected a non-empty uint64 [R]")
            if not (ids[1:] > ids[:-1]).all():
                _fail(f"{where}/ids.npy is not sorted ascending without duplicates")
            rows = ids.shape[0]
            for f in p.fields:
                if f.context:
                    continue
                if f.kind == "onehot":
                    col = p.cols[f.name]
                    if col.shape != (rows,):
                        _fail(f"{where}/{f.name}.npy has shape {col.shape}, expected ({rows},) like ids.npy")
                else:
                    values, offsets = p.cols[f.name]
                    if (offsets.shape != (rows + 1,) or offsets[0] != 0 or offsets[-1] != values.shape[0]
                            or (np.diff(offsets) < 0).any()):
                        _fail(f"{where}/{f.name}.offsets.npy is not {rows + 1} non-decreasing offsets "
                              f"from 0 to len({f.name}.values.npy)")
                table = (f.hash_id, f.vocab)
                if table not in bounded:
                    bounded[table] = table_is_bounded(cube, f.hash_id, f.vocab, b.hash_seed, f.raw)
                _check_values(where, side, f, ids, p.cols[f.name], bounded[table])
            if side == "user":
                want = (rows, b.dense_features)
                if p.dense.shape != want or p.dense.dtype != np.float32:
                    _fail(f"{where}/dense.npy is {p.dense.dtype} {p.dense.shape}, expected float32 {want} "
                          f"([dense] user_features = {b.dense_features})")
            else:
                want = (rows, len(b.item_fields), b.item_len)
                if p.sigs.shape != want or p.sigs.dtype != np.uint64:
                    _fail(f"{where}/sigs.npy is {p.sigs.dtype} {p.sigs.shape}, expected uint64 {want} "
                          f"(item fields x the longest item max_len)")
                if p.sig_lens.shape != want[:2] or p.sig_lens.dtype != np.int32:
                    _fail(f"{where}/sig_lens.npy is {p.sig_lens.dtype} {p.sig_lens.shape}, expected int32 {want[:2]}")
                if p.sig_lens.min() < 0 or p.sig_lens.max() > b.item_len:
                    _fail(f"{where}/sig_lens.npy has bag lengths outside 0..{b.item_len}")
        for side in ("user", "item"):
            try:
                default_vectors(b, side)     # the process's: the smoke check's stages reuse them
            except BundleError as e:
                _fail(f"{b.path}/manifest.toml: {e}")

    def skipped(self):
        """The checks of CHECKS that do not apply to this bundle (known once the manifest is read)."""
        return HEAD_SKIPS if self.bundle is not None and self.bundle.head else ()

    def _stage(self, cls, config):
        """``cls`` set up on this bundle (a failure is the version's)."""
        stage = cls()
        try:
            stage.setup(dict(config), self.bundle)
        except Exception as e:
            _fail(f"stage {cls.name}: {type(e).__name__}: {e}")
        return stage

    def _run_stage(self, cls, config, batch, r, p, stage=None):
        """Run ``stage`` (default: ``cls`` set up now) on ``batch``, check its declared outputs, add them."""
        b = self.bundle
        stage = stage or self._stage(cls, config)
        try:
            out = stage.process(batch)
        except Exception as e:
            _fail(f"stage {cls.name}: {type(e).__name__}: {e}")
        for o in cls.outputs(config, b):
            arr = out.get(o.name)
            want = ((r if o.scope == REQUEST else p),) + tuple(o.shape)
            if arr is None:
                _fail(f"stage {cls.name} did not return its output {o.name!r}")
            if arr.dtype != np.dtype(o.dtype) or arr.shape != want:
                _fail(f"stage {cls.name}: output {o.name!r} is {arr.dtype} {arr.shape}, "
                      f"declared {o.dtype} {want}")
        batch.columns.update(out)

    def smoke(self):
        # Every item of the catalogue (up to SMOKE_MAX_ITEMS, else an even sample), each scored once,
        # SMOKE_PER_USER to a request with users spread over the profile: a graph that is NaN on a band
        # of items (or of users) is caught here, before any worker maps the version.
        if self.bundle.head:
            self._smoke_head()
            return
        b = self.bundle
        user_ids, item_ids = (store_profiles(b, side).ids for side in ("user", "item"))
        if item_ids.shape[0] > SMOKE_MAX_ITEMS:
            item_ids = item_ids[np.linspace(0, item_ids.shape[0] - 1, SMOKE_MAX_ITEMS).astype(np.int64)]
        n_items, n_users = item_ids.shape[0], user_ids.shape[0]
        per = max(1, min(SMOKE_PER_USER, -(-n_items // n_users)))
        stride = max(1, n_users // -(-n_items // per))      # users spread over the profile
        config = {"on_unknown": "default", "_overlay": None}
        stages = [(cls, self._stage(cls, config)) for cls in SMOKE_STAGES]
        bad, example = 0, None
        chunk = SMOKE_CHUNK // per * per
        for start in range(0, n_items, chunk):
            items = item_ids[start:start + chunk]
            p = items.shape[0]
            r = -(-p // per)
            users = user_ids[(np.arange(start // per, start // per + r) * stride) % n_users]
            offsets = np.minimum(np.arange(r + 1, dtype=np.int64) * per, p)
            counts = np.diff(offsets)
            batch = Batch(np.ascontiguousarray(users, dtype=np.uint64), counts.astype(np.int64),
                          np.zeros(r, dtype=bool), np.full(r, np.inf), offsets,
                          {"item_ids": np.ascontiguousarray(items, dtype=np.uint64),
                           "recall_scores": np.full(p, 0.5, dtype=np.float32)})
            for cls, stage in stages:
                self._run_stage(cls, config, batch, r, p, stage)
            if batch.failed:
                i, (code, message) = next(iter(batch.failed.items()))
                _fail(f"smoke request (user {int(users[i])}) failed: {code}: {message}")
            nonfinite = ~np.isfinite(batch["score"])
            if nonfinite.any():
                if example is None:
                    j = int(np.flatnonzero(nonfinite)[0])
                    example = (int(users[np.searchsorted(offsets, j, side="right") - 1]), int(items[j]))
                bad += int(nonfinite.sum())
                continue
            # The ranker's order: per request, a permutation of its candidates (vectorised).
            order = batch["order"].astype(np.int64)
            req = np.repeat(np.arange(r, dtype=np.int64), counts)
            if ((order < 0) | (order >= counts[req])).any() or not np.array_equal(
                    np.sort(req * per + order), req * per + np.arange(p) - offsets[req]):
                _fail("smoke: the ranker's order is not a permutation of each request's candidates")
        if bad:
            onnx_file = os.path.relpath(b.onnx_path, b.path)
            _fail(f"{bad} of {n_items} smoke scores are not finite (NaN or inf); {onnx_file} on every item of "
                  f"the catalogue{'' if n_items == store_profiles(b, 'item').ids.shape[0] else ' (an even sample)'}, "
                  f"{per} to a user; the first: user {example[0]}, item {example[1]}")

    def _smoke_head(self):
        # A head has no profiles or cube to read: ModelInference alone scores
        # random pooled embeddings of the manifest's shapes (deterministic, so a
        # rejection reproduces).
        b = self.bundle
        r, n = SMOKE_USERS, SMOKE_ITEMS
        p = r * n
        rng = np.random.default_rng(SMOKE_SEED)
        offsets = np.arange(r + 1, dtype=np.int64) * n
        batch = Batch(np.arange(1, r + 1, dtype=np.uint64), np.full(r, n, dtype=np.int64),
                      np.zeros(r, dtype=bool), np.full(r, np.inf), offsets,
                      {"item_ids": np.tile(np.arange(1, n + 1, dtype=np.uint64), r),
                       "recall_scores": np.full(p, 0.5, dtype=np.float32),
                       "dense": rng.standard_normal((r, b.dense_features), dtype=np.float32),
                       "user_emb": rng.standard_normal((r, len(b.user_fields), b.dim), dtype=np.float32)
                       * np.float32(SMOKE_EMBEDDING_STD),
                       "item_emb": rng.standard_normal((p, len(b.item_fields), b.dim), dtype=np.float32)
                       * np.float32(SMOKE_EMBEDDING_STD)})
        config = {"structured": "on"}
        self._run_stage(ModelInference, config, batch, r, p)
        score = batch[ModelInference.outputs(config, b)[0].name]
        bad = int((~np.isfinite(score)).sum())
        if bad:
            onnx_file = os.path.relpath(b.onnx_path, b.path)
            _fail(f"{bad} of {p} smoke scores are not finite (NaN or inf); "
                  f"{onnx_file} on {r} users x {n} items of random pooled embeddings (a head bundle)")


def validate(version_dir, name=None, version=None):
    """Validate the bundle version at ``version_dir`` in this process; return a JSON-able dict.

    ``name`` and ``version`` (the directory's ``<name>/<version>``), when
    given, must be what the manifest says. The checks (module docstring)
    run in order and stop at the first failure. Result keys:

    * ``ok`` (bool), ``check`` (the failed check or None), ``error`` (its
      message or None; an unexpected exception reads ``TypeName: message``);
    * ``timings_ms``: {check: milliseconds} of every check that ran;
    * ``skipped``: the checks that did not run because they do not apply
      (a head bundle: ``HEAD_SKIPS``, cube and profiles), in CHECKS order;
      checks after a failure are in neither;
    * ``peak_rss_bytes``: this process's peak resident set at the end (after
      a smoke run: the imports, the session and the mapped pages it touched;
      VmHWM, see ``_peak_rss_bytes``);
    * ``files_bytes``, ``cube_bytes``, ``onnx_bytes``: listed sizes of all
      files, the cube's files, the graph (None until the files check read them).

    Opens the cube through ``cube.store.open_cube``, which keeps it open for
    the life of the process: validate a directory once per process (the
    supervisor's child does). Safe to call from a process that serves
    nothing; never call it in the supervisor itself.
    """
    checks = _Checks(os.fspath(version_dir), name, version)
    result = {"ok": True, "check": None, "error": None, "timings_ms": {}, "skipped": []}
    for check in CHECKS:
        if check in checks.skipped():
            result["skipped"].append(check)
            continue
        t0 = time.perf_counter()
        try:
            getattr(checks, check)()
            error = None
        except BundleError as e:
            error = str(e)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        result["timings_ms"][check] = round((time.perf_counter() - t0) * 1000.0, 1)
        if error is not None:
            result.update(ok=False, check=check, error=error)
            break
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result.update(checks.sizes)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m jizhi.validate",
        description="Validate a model bundle version before it is served: manifest, listed files "
                    "(size and sha256), the ONNX graph's inputs and output, the cube, the profiles, "
                    "and a smoke run of the stages on a few requests (a head bundle, head = true, has no cube "
                    "or profiles: those checks are skipped and the smoke run is model_inference alone). "
                    "Prints one JSON line "
                    "(ok, check, error, timings_ms, skipped, peak_rss_bytes, files_bytes, cube_bytes, onnx_bytes) "
                    "and exits 0 when the version is accepted, 1 when it is rejected, 2 on bad arguments.")
    parser.add_argument("version_dir", metavar="VERSION_DIR", help="the version directory, <models>/<name>/<version>")
    parser.add_argument("--name", help="the model name the manifest must carry (the directory's parent's name)")
    parser.add_argument("--version", type=int, help="the version the manifest must carry (the directory's name)")
    args = parser.parse_args(argv)
    from jizhi import logs
    logs.setup("jizhi.validate")    # a warning (a cube's reader, say) is a log line in jizhid's log, not a bare print
    # Only the result goes to stdout: the supervisor parses its last line.
    with contextlib.redirect_stdout(sys.stderr):
        result = validate(args.version_dir, args.name, args.version)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
