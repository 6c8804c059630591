"""Model bundles: the manifest, its file check, and the columnar profiles.

A bundle version is a directory ``<models>/<name>/<version>/`` (format in
docs/formats.md). The supervisor calls ``verify()`` (sizes and sha256 of every
listed file) before any worker maps a file; workers construct ``Bundle`` and
``Profiles`` themselves after they start, which memory-maps the snapshot
read-only (nothing here allocates per entity; lookups are gathers).
"""
import hashlib
import mmap
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from jizhi.errors import BundleError
from jizhi.tomlw import toml_value  # noqa: F401 (the writers below and their callers use it)

FORMAT = 1
KINDS = ("onehot", "multihot", "history")
POOLINGS = ("mean", "sum")
# default_vector (docs/formats.md): what an empty bag and a signature missing from the cube read, per field.
DEFAULT_VECTORS = ("zeros", "mean", "row:N")
_ROW = re.compile(r"row:([1-9][0-9]{0,18})")


def parse_default_vector(value):
    """``("zeros", None)``, ``("mean", None)`` or ``("row", N)`` of a manifest's ``default_vector``; None when
    ``value`` is none of them (``row:N``: N a raw value of the field's table, 1 <= N < 2**63)."""
    if value in ("zeros", "mean"):
        return value, None
    m = _ROW.fullmatch(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) >= 2 ** 63:
        return None
    return "row", int(m.group(1))


# A field's ``raw`` (docs/formats.md): how its raw values map to its table's rows.
RAW_KINDS = ("rows", "ids")


@dataclass(frozen=True)
class Field:
    name: str
    id: int
    side: str
    kind: str
    max_len: int
    hash_id: int  # the field id its signatures are hashed with (shares=...)
    pooling: str = "mean"   # mean | sum
    vocab: int = 0          # raw values 1..vocab of a bounded table (0: not given)
    default_vector: str = "zeros"   # zeros | mean | row:N (the field's own, else the manifest's)
    raw: str | None = None  # rows: raw values are table rows + 1 (1..vocab); ids: entity ids; None: not said
    context: bool = False   # a request-level value the request carries (context = true), not in the profiles


def _checked(cond, message):
    if not cond:
        raise BundleError(message)


class Bundle:
    """One model version's manifest and paths. Cheap: reads manifest.toml only."""

    def __init__(self, path):
        self.path = Path(path)
        mpath = self.path / "manifest.toml"
        try:
            with open(mpath, "rb") as f:
                m = tomllib.load(f)
        except FileNotFoundError:
            raise BundleError(f"{self.path}: no manifest.toml (a version exists only once its manifest is written)")
        except tomllib.TOMLDecodeError as e:
            raise BundleError(f"{mpath}: not valid TOML: {e}")
        self.manifest = m
        _checked(m.get("format") == FORMAT, f"{mpath}: format {m.get('format')!r} is not {FORMAT}")
        self.name = m.get("name")
        self.version = m.get("version")
        _checked(isinstance(self.name, str) and self.name, f"{mpath}: name missing")
        _checked(isinstance(self.version, int) and self.version > 0, f"{mpath}: version must be a positive integer")
        self.dim = int(m.get("dim", 0))
        _checked(self.dim > 0, f"{mpath}: dim must be > 0")
        self.hash_seed = int(m.get("hash_seed", 0))
        self.default_vector = m.get("default_vector", "zeros")
        _checked(parse_default_vector(self.default_vector) is not None,
                 f"{mpath}: default_vector = {self.default_vector!r} is not one of zeros, mean, row:N "
                 f"(N a raw value of the field's table, e.g. row:1)")
        # A head bundle is dense only: it is served on another (base) model's cube and profiles.
        self.head = m.get("head", False)
        _checked(isinstance(self.head, bool), f"{mpath}: head must be true or false, got {self.head!r}")
        self.dense_features = int(m.get("dense", {}).get("user_features", 0))
        onnx = m.get("onnx", {})
        self.onnx_path = self.path / onnx.get("file", "dense.onnx")
        self.onnx_output = onnx.get("output", "score")
        self.cube_path = self.path / "cube"
        raw_fields = m.get("fields", [])
        _checked(raw_fields, f"{mpath}: no [[fields]]")
        ids = {}
        for f in raw_fields:
            _checked(f.get("kind") in KINDS, f"{mpath}: field {f.get('name')!r} kind must be one of {KINDS}")
            _checked(f.get("side") in ("user", "item"), f"{mpath}: field {f.get('name')!r} side must be user or item")
            _checked(f.get("pooling", "mean") in POOLINGS,
                     f"{mpath}: field {f.get('name')!r} pooling must be one of {POOLINGS}")
            _checked(parse_default_vector(f.get("default_vector", "zeros")) is not None,
                     f"{mpath}: field {f.get('name')!r} default_vector = {f.get('default_vector')!r} is not one "
                     f"of zeros, mean, row:N (N a raw value of the field's table, e.g. row:1)")
            _checked(f.get("raw", "rows") in RAW_KINDS,
                     f"{mpath}: field {f.get('name')!r} raw = {f.get('raw')!r} is not one of {', '.join(RAW_KINDS)}")
            _checked(isinstance(f.get("vocab", 0), int) and not isinstance(f.get("vocab", 0), bool)
                     and f.get("vocab", 0) >= 0, f"{mpath}: field {f.get('name')!r} vocab must be an integer >= 0")
            _checked(f.get("context", False) in (True, False) and (not f.get("context") or f.get("side") == "user"),
                     f"{mpath}: field {f.get('name')!r} context must be true or false, and only a user-side field "
                     f"is a context field (a request-level value)")
            ids[f["name"]] = int(f["id"])
        fields = []
        raw_of = {f["name"]: f.get("raw") for f in raw_fields}
        for f in raw_fields:
            share = f.get("shares")
            _checked(share is None or share in ids, f"{mpath}: field {f['name']!r} shares unknown field {share!r}")
            fields.append(Field(f["name"], int(f["id"]), f["side"], f["kind"],
                                int(f.get("max_len", 1)), ids[share] if share else int(f["id"]),
                                f.get("pooling", "mean"), int(f.get("vocab", 0)),
                                f.get("default_vector", self.default_vector),
                                # A field sharing a table reads it as the owner does (a history of item ids).
                                f.get("raw", raw_of.get(share) if share else None),
                                bool(f.get("context", False))))
        self.user_fields = [f for f in fields if f.side == "user"]
        self.item_fields = [f for f in fields if f.side == "item"]
        self.user_len = max([f.max_len for f in self.user_fields] or [1])
        self.item_len = max([f.max_len for f in self.item_fields] or [1])
        self.user_hash_ids = np.array([f.hash_id for f in self.user_fields], dtype=np.int64)
        # Per field of each side: True where the bag's vectors are summed, not averaged.
        self.user_sums = np.array([f.pooling == "sum" for f in self.user_fields], dtype=np.bool_)
        self.item_sums = np.array([f.pooling == "sum" for f in self.item_fields], dtype=np.bool_)
        self.files = m.get("files", [])
        # [profiles] store = DIR: the version reads a profile store's snapshots (jizhi/profilestore.py), not its
        # own profiles/; a relative DIR is relative to the models directory (<models>/<name>/<version>).
        prof = m.get("profiles", {})
        _checked(isinstance(prof, dict) and set(prof) <= {"store"} and isinstance(prof.get("store", ""), str),
                 f"{mpath}: [profiles] takes one key, store = \"DIR\" (a profile store's directory)")
        store = prof.get("store")
        self.profile_store = None if not store else (self.path.parent.parent / store).resolve()

    def verify(self):
        """Check every listed file's size and sha256, and that no file of the version resolves outside its
        directory. Raises BundleError naming the first bad file."""
        _checked(self.files, f"{self.path}: manifest lists no files")
        escaped = self.escapes()
        if escaped is not None:
            raise BundleError(f"{self.path}: {escaped[0]} resolves to {escaped[1]}, outside the version directory "
                              "(a version serves only its own files: copy the file in instead of linking it)")
        for entry in self.files:
            p = self.path / entry["path"]
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:
                raise BundleError(f"{self.path}: {entry['path']} is listed in the manifest but missing")
            _checked(size == entry["size"], f"{self.path}: {entry['path']} has {size} bytes, the manifest says {entry['size']}")
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            _checked(h.hexdigest() == entry["sha256"], f"{self.path}: {entry['path']} sha256 differs from the manifest")
        return True

    def escapes(self):
        """``(name, real path)`` of the first file of the version that resolves outside its directory (a
        symbolic link out of it, a ``..`` or absolute path in the manifest), or None. Looks at the listed
        files, the graph and every entry under the directory (links are not followed into)."""
        root = os.path.realpath(self.path)
        names = [str(e.get("path")) for e in self.files if isinstance(e, dict)]
        names.append(os.path.relpath(self.onnx_path, self.path))
        for top, dirs, files in os.walk(root):
            names += [os.path.relpath(os.path.join(top, n), root) for n in dirs + files]
        for name in names:
            real = os.path.realpath(os.path.join(root, name))
            if real != root and not real.startswith(root + os.sep):
                return name, real
        return None

    def changed_files(self):
        """Cheap (stat only): the first listed file now missing or not the size this manifest says, or None."""
        for entry in self.files:
            try:
                size = os.stat(self.path / entry["path"]).st_size
            except FileNotFoundError:
                return f"{entry['path']} was deleted"
            if size != entry["size"]:
                return f"{entry['path']} has {size} bytes, the manifest says {entry['size']}"
        return None


def same_features(base, head):
    """None when ``head`` (a Bundle) can be served on ``base``'s features, else the first difference.

    A head's graph takes the ``dense``, ``user_emb`` and ``item_emb`` that the base's
    reader, feature and cube stages compute, so everything those depend on must be
    the same: ``dim``, ``hash_seed``, ``[dense] user_features``, the number of user
    and of item fields, and per field in column order (``user_fields`` then
    ``item_fields``) its name, id, side, kind, max_len, hash id (``shares``),
    pooling and default vector. Reads only the two manifests (both already parsed); any process may call it.
    """
    where = f"base {base.name} version {base.version}, head {head.name} version {head.version}"
    for what, b, h in (("dim", base.dim, head.dim), ("hash_seed", base.hash_seed, head.hash_seed),
                       ("[dense] user_features", base.dense_features, head.dense_features),
                       ("the number of user fields", len(base.user_fields), len(head.user_fields)),
                       ("the number of item fields", len(base.item_fields), len(head.item_fields))):
        if b != h:
            return f"{what} is {b} in the base, {h} in the head ({where})"
    for side, base_fields, head_fields in (("user", base.user_fields, head.user_fields),
                                           ("item", base.item_fields, head.item_fields)):
        for column, (b, h) in enumerate(zip(base_fields, head_fields)):
            for attribute in ("name", "id", "side", "kind", "max_len", "hash_id", "pooling", "default_vector"):
                bv, hv = getattr(b, attribute), getattr(h, attribute)
                if bv != hv:
                    what = "hash id (the id of the field it shares)" if attribute == "hash_id" else attribute
                    return (f"field {b.name!r} ({side} field {column}): {what} is {bv!r} in the base, "
                            f"{hv!r} in the head ({where})")
    return None


def find_version(models_dir, name, version=None):
    """Path of a model's version (the newest complete one when version is None)."""
    base = Path(models_dir) / name
    if not base.is_dir():
        raise BundleError(f"model {name!r} not found in {models_dir}")
    versions = sorted(int(p.name) for p in base.iterdir()
                      if p.name.isdigit() and (p / "manifest.toml").is_file())
    if not versions:
        raise BundleError(f"model {name!r} has no complete version in {base}")
    if version is None:
        version = versions[-1]
    if version not in versions:
        raise BundleError(f"model {name!r} has no version {version} in {base}")
    return base / str(version)


# --- writing a version (jizhi.tools.demo, jizhi.tools.importer) --------------------------------

def save_array(directory, name, array):
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, name + ".npy"), np.ascontiguousarray(array), allow_pickle=False)


def save_field(directory, field, data):
    if field.kind == "onehot":
        save_array(directory, field.name, data)
    else:
        save_array(directory, field.name + ".values", data[0])
        save_array(directory, field.name + ".offsets", data[1])


def file_entries(version_dir):
    """(path relative to ``version_dir``, size, sha256) of every file but the manifest, sorted."""
    entries = []
    for root, _, names in os.walk(version_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, version_dir).replace(os.sep, "/")
            if rel == "manifest.toml":
                continue
            digest = hashlib.sha256()
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            entries.append((rel, os.path.getsize(full), digest.hexdigest()))
    return sorted(entries)


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


@njit(cache=True, nogil=True)
def _gather_ragged(values, offsets, rows, known, L, out_vals, out_lens, col):
    # Take the last min(len, L) values of each row (history: newest last).
    for i in range(rows.shape[0]):
        if not known[i]:
            out_lens[i, col] = 0
            continue
        r = rows[i]
        a, b = offsets[r], offsets[r + 1]
        if b - a > L:
            a = b - L
        n = b - a
        for j in range(n):
            out_vals[i, col, j] = values[a + j]
        out_lens[i, col] = n


def _mapped(path):
    """A profile column memory-mapped read-only, read at random: ``MADV_RANDOM`` (without it the kernel's
    read-ahead maps far more than a row: 4,000 random rows of a 10M-user history column mapped 647 MiB
    where 31 MiB were read, docs/benchmarks.md, issue 21)."""
    m = np.load(path, mmap_mode="r")
    mm = getattr(m, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except OSError:
            pass
    return np.asarray(m)


class Profiles:
    """The columnar snapshot of one side (users or items), memory-mapped."""

    def __init__(self, bundle, side, root=None):
        """``root``: the snapshot directory (``users/``, ``items/``); default the version's own ``profiles/``
        (a version that reads a profile store has none: jizhi/profilestore.py's ``source`` opens its snapshot)."""
        self.bundle = bundle
        self.side = side
        if root is None:
            if bundle.profile_store is not None:
                raise BundleError(f"{bundle.path} reads profile store {bundle.profile_store}: open its snapshot "
                                  "with jizhi.profilestore.source(bundle)")
            root = bundle.path / "profiles"
        self.root = Path(root)
        d = self.root / (side + "s")
        try:
            self.ids = _mapped(d / "ids.npy")
        except FileNotFoundError:
            raise BundleError(f"{self.root}: no {side} profiles ({side}s/ids.npy)")
        self.fields = bundle.user_fields if side == "user" else bundle.item_fields
        self.cols = {}
        for f in self.fields:
            if f.context:
                continue        # the request carries it (workers/data_reader.py): no column
            if f.kind == "onehot":
                self.cols[f.name] = _mapped(d / f"{f.name}.npy")
            else:
                # np.asarray: a plain ndarray view of the mapping (Numba wants no subclass).
                self.cols[f.name] = (_mapped(d / f"{f.name}.values.npy"),
                                     _mapped(d / f"{f.name}.offsets.npy"))
        # Plain ndarray views of the mappings: np.memmap's indexing costs more (4,000 rows of item
        # signatures: 202 us as a memmap, 60 us through np.take on the view).
        if side == "user":
            self.dense = _mapped(d / "dense.npy")
        else:
            self.sigs = _mapped(d / "sigs.npy")
            self.sig_lens = _mapped(d / "sig_lens.npy")

    def rows(self, ids):
        """(rows int64, known bool) of ``ids`` (uint64); unknown rows read 0.

        Many ids are searched in sorted order (a candidate list's 4,000 ids in 10,000: 254 us against 345
        searched as they come: the binary searches share their cache lines)."""
        ids = np.asarray(ids, dtype=np.uint64)
        if ids.shape[0] > 256:
            order = np.argsort(ids)
            pos = np.empty(ids.shape[0], dtype=np.int64)
            pos[order] = np.searchsorted(self.ids, ids[order])
        else:
            pos = np.searchsorted(self.ids, ids)
        pos_c = np.minimum(pos, self.ids.shape[0] - 1)
        known = self.ids[pos_c] == ids
        return np.where(known, pos_c, 0).astype(np.int64), known

    def user_features(self, rows, known, users=None, overlay=None, online=None):
        """Users: (dense f32 [U, D], raw bag values int64 [U, F, L], lens int32 [U, F]).

        ``online``: (found bool[U], dense, lens, values) of rows kept elsewhere (user rows on Redis,
        cube/userrows.py: the non-context fields, in order), which replace the found users' rows.
        With ``overlay`` (jizhi/overlay.py) and the ``users`` ids, each user's
        recent behaviour from ``feedback`` is then appended to the history fields.
        """
        U, F, L = rows.shape[0], len(self.fields), self.bundle.user_len
        dense = np.asarray(self.dense[rows], dtype=np.float32)
        dense[~known] = 0.0
        vals = np.zeros((U, F, L), dtype=np.int64)
        lens = np.zeros((U, F), dtype=np.int32)
        for c, f in enumerate(self.fields):
            if f.context:
                continue        # empty unless the request gives it
            if f.kind == "onehot":
                v = np.asarray(self.cols[f.name][rows])
                vals[:, c, 0] = v
                lens[:, c] = (v != 0) & known
            else:
                values, offsets = self.cols[f.name]
                _gather_ragged(values, offsets, rows, known, min(f.max_len, L), vals, lens, c)
        if online is not None and online[0].any():
            found, odense, olens, ovalues = online
            mine = [c for c, f in enumerate(self.fields) if not f.context]
            n = min(L, ovalues.shape[2])
            dense[found] = odense[found]
            for j, c in enumerate(mine):
                vals[found, c, :] = 0
                vals[found, c, :n] = ovalues[found, j, :n]
                lens[found, c] = np.minimum(olens[found, j], n)
        if overlay is not None and users is not None:
            recent, recent_n = overlay.recent(users)
            if recent_n.any():
                from jizhi.overlay import merge_history
                for c, f in enumerate(self.fields):
                    if f.kind == "history":
                        merge_history(vals, lens, c, min(f.max_len, L), recent, recent_n)
        return dense, vals, lens

    def item_signatures(self, rows, known):
        """Items: precomputed (sigs uint64 [P, F, L], lens int32 [P, F]); unknown -> empty bags."""
        sigs = np.take(self.sigs, rows, axis=0)
        lens = np.take(self.sig_lens, rows, axis=0).astype(np.int32, copy=False)
        lens[~known] = 0
        return sigs, lens
