"""The reference scorer: a direct, independent computation of a bundle's scores.

Runs offline, in one process (tests, ``jizhi.tools.demo`` when it calibrates the
demo model and generates a trace, the ceiling). It shares no code with the
serving stages beyond the signature hash and the bundle format, so the
serving pipeline can be checked against it. It holds the whole cube in RAM;
it is not meant for a serving worker.

What a score is, spelled out (docs/formats.md gives the files):

* an entity's row is ``searchsorted`` on ``profiles/<side>/ids.npy``; an
  unknown user reads zero dense features and empty bags, an unknown item
  reads empty bags;
* a field's bag is its raw values for that row (onehot: the one value, 0 =
  missing = empty bag; multihot/history: the ragged slice, at most
  ``max_len`` entries, the newest kept);
* each raw value's signature is ``cube.signature.sign(hash_id, value,
  hash_seed)``, where ``hash_id`` is the field's id, or for a field with
  ``shares`` the id of the shared field; item signatures are recomputed from
  raw values, ``sigs.npy`` is not read (so it can be checked against this);
* a signature reads its cube vector, or its field's default vector when it
  is missing from the cube; the default vector (``default_vector``, the
  field's own else the manifest's): ``"zeros"``; ``"mean"``, the mean of
  the vectors the field's table stores, those of raw values 1..vocab when
  the cube stores any of them (a bounded table), else those of the raw
  values the profiles of the fields reading the table hold (a table of
  entity ids); ``"row:N"``, the vector of raw value N;
* mean pooling: the sum of the bag's vectors divided by the bag length
  (missing signatures count), an empty bag pools to the default vector; a
  field with ``pooling = "sum"``: the sum, an empty bag the default vector;
* ``dense.onnx`` maps ``dense``, ``user_emb``, ``item_emb``, ``user_index``
  to ``score``; with a head bundle (``dense=``), the head's graph does,
  on the base version's features.
"""
import os
import tomllib

import numpy as np
import onnxruntime as ort

from jizhi.bundle import Bundle, same_features
from jizhi.cube.build import read_all
from jizhi.cube.signature import sign
from jizhi.errors import BundleError


class ReferenceScorer:
    """Scores (user, items) pairs of one bundle version directly.

    ``version_dir`` is ``<models>/<name>/<version>/`` holding ``manifest.toml``.
    The constructor loads everything (profiles, the whole cube, an
    onnxruntime session with one intra-op and one inter-op thread, so results
    are reproducible run to run). Not thread-safe.

    ``dense``, when given, is a head bundle's version directory (manifest
    ``head = true``): the features, the cube and the profiles still come from
    ``version_dir`` and the graph from the head's onnx file, as a pipeline
    serves the head on its base model. Raises BundleError when ``dense`` is
    not a head, ``version_dir`` is one, or their features differ
    (``jizhi.bundle.same_features``).
    """

    def __init__(self, version_dir, dense=None):
        self.version_dir = os.fspath(version_dir)
        with open(os.path.join(self.version_dir, "manifest.toml"), "rb") as f:
            self.manifest = tomllib.load(f)
        onnx_path = os.path.join(self.version_dir, self.manifest["onnx"]["file"])
        self.output = self.manifest["onnx"]["output"]
        if dense is not None:
            # Checked before the profiles and the cube are read: a mismatch fails fast.
            onnx_path, self.output = self._head_graph(os.fspath(dense))
        self.dim = int(self.manifest["dim"])
        self.hash_seed = int(self.manifest["hash_seed"])
        fields = self.manifest["fields"]
        ids_by_name = {f["name"]: int(f["id"]) for f in fields}
        raw_by_name = {f["name"]: f.get("raw") for f in fields}
        for f in fields:
            if f.get("pooling", "mean") not in ("mean", "sum"):
                raise ValueError(f"field {f['name']}: unsupported pooling {f['pooling']!r}")
        self.fields = {
            # raw: rows | ids | None (not said); a field sharing a table reads it as its owner does
            side: [dict(f, hash_id=ids_by_name[f["shares"]] if "shares" in f else int(f["id"]),
                        raw=f.get("raw", raw_by_name.get(f.get("shares"))))
                   for f in fields if f["side"] == side]
            for side in ("user", "item")
        }
        self.profiles = {side: self._load_profile(side) for side in ("user", "item")}
        self.cube_keys, self.cube_vectors = read_all(os.path.join(self.version_dir, "cube"))
        if self.cube_vectors.shape[0] and self.cube_vectors.shape[1] != self.dim:
            raise ValueError(f"cube dim {self.cube_vectors.shape[1]} != manifest dim {self.dim}")
        top = self.manifest.get("default_vector", "zeros")
        for side in ("user", "item"):
            for f in self.fields[side]:
                f["default"] = self._default(f, f.get("default_vector", top))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])

    def _head_graph(self, head_dir):
        """(onnx path, output name) of the head bundle at ``head_dir``, checked against this base."""
        base, head = Bundle(self.version_dir), Bundle(head_dir)
        if base.head:
            raise BundleError(f"{base.path} is a head bundle (no cube or profiles): the features must come "
                              "from a full bundle")
        if not head.head:
            raise BundleError(f"{head.path}: not a head bundle (its manifest lacks head = true)")
        why = same_features(base, head)
        if why is not None:
            raise BundleError(f"{head.path}: cannot be scored on the features of {base.path}: {why}")
        return os.fspath(head.onnx_path), head.onnx_output

    mmap_mode = None      # "r": the profiles memory-mapped, not read (the demo's calibration at 10 M users)

    def _load_profile(self, side):
        directory = os.path.join(self.version_dir, "profiles", side + "s")

        def load(name):
            return np.load(os.path.join(directory, name + ".npy"), mmap_mode=self.mmap_mode, allow_pickle=False)

        profile = {"ids": load("ids")}
        if side == "user":
            profile["dense"] = load("dense")
        for f in self.fields[side]:
            if f["kind"] == "onehot":
                profile[f["name"]] = load(f["name"])
            else:
                profile[f["name"]] = (load(f["name"] + ".values"), load(f["name"] + ".offsets"))
        return profile

    def rows(self, side, ids):
        """Rows of ``ids`` (uint64) in the ``side`` profile, -1 for unknown ids."""
        known = self.profiles[side]["ids"]
        ids = np.asarray(ids, dtype=np.uint64).reshape(-1)
        if known.shape[0] == 0:
            return np.full(ids.shape[0], -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(known, ids), known.shape[0] - 1)
        return np.where(known[pos] == ids, pos, -1).astype(np.int64)

    def _bag(self, side, field, rows):
        """Raw values of ``field`` for ``rows``, padded: (int64 [n, max_len], lens int64 [n]).

        Entries past a row's length are 0 and are not part of the bag.
        """
        data = self.profiles[side][field["name"]]
        max_len = int(field["max_len"])
        known = rows >= 0
        values = np.zeros((rows.shape[0], max_len), dtype=np.int64)
        if field["kind"] == "onehot":
            values[known, 0] = data[rows[known]]
            return values, (values[:, 0] != 0).astype(np.int64)
        flat, offsets = data
        ends = np.where(known, offsets[rows + 1], 0)
        starts = np.where(known, np.maximum(offsets[np.maximum(rows, 0)], ends - max_len), 0)
        lens = ends - starts
        valid = np.arange(max_len) < lens[:, None]
        values[valid] = flat[(starts[:, None] + np.arange(max_len))[valid]]
        return values, lens

    def _vectors(self, signatures, default=None):
        """Cube vectors of ``signatures``; ``default`` (zeros) for those missing from the cube; and the hits."""
        out = np.zeros((signatures.shape[0], self.dim), dtype=np.float32)
        if default is not None:
            out[:] = default
        if self.cube_keys.shape[0] == 0:
            return out, np.zeros(signatures.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(self.cube_keys, signatures), self.cube_keys.shape[0] - 1)
        hit = self.cube_keys[pos] == signatures
        out[hit] = self.cube_vectors[pos[hit]]
        return out, hit

    def _default(self, field, value):
        """The default vector float32 [dim] of ``field`` for its ``default_vector`` ``value``."""
        h = field["hash_id"]
        if value == "zeros":
            return np.zeros(self.dim, dtype=np.float32)
        if value == "mean":
            rows = 0 if field["raw"] == "ids" else int(field.get("vocab", 0))
            vectors, hit = self._vectors(sign(h, np.arange(1, rows + 1), self.hash_seed))
            if not hit.any():   # a table of entity ids: the raw values its fields' profiles hold
                values = []
                for side in ("user", "item"):
                    for f in self.fields[side]:
                        if f["hash_id"] == h:
                            data = self.profiles[side][f["name"]]
                            values.append(data[data != 0] if f["kind"] == "onehot" else data[0])
                vectors, hit = self._vectors(sign(h, np.unique(np.concatenate(values)), self.hash_seed))
            if not hit.any():
                raise ValueError(f"field {field['name']}: default_vector mean of a table the cube does not hold")
            return vectors[hit].astype(np.float64).mean(axis=0).astype(np.float32)
        if isinstance(value, str) and value.startswith("row:") and value[4:].isdigit() and int(value[4:]) >= 1:
            vector, hit = self._vectors(sign(h, np.array([int(value[4:])]), self.hash_seed))
            if not hit[0]:
                raise ValueError(f"field {field['name']}: default_vector {value}: no such row in the cube")
            return vector[0]
        raise ValueError(f"field {field['name']}: unsupported default_vector {value!r}")

    def embeddings(self, side, rows):
        """Pooled embeddings float32 [len(rows), F_side, dim] for profile ``rows`` (-1 = unknown)."""
        fields = self.fields[side]
        out = np.zeros((rows.shape[0], len(fields), self.dim), dtype=np.float32)
        for column, field in enumerate(fields):
            values, lens = self._bag(side, field, rows)
            valid = np.arange(values.shape[1]) < lens[:, None]
            vectors = np.zeros(values.shape + (self.dim,), dtype=np.float32)
            vectors[valid] = self._vectors(sign(field["hash_id"], values[valid], self.hash_seed), field["default"])[0]
            total = vectors.sum(axis=1)
            if field.get("pooling", "mean") == "sum":
                out[:, column, :] = total
            else:
                out[:, column, :] = total / np.maximum(lens, 1).astype(np.float32)[:, None]
            out[lens == 0, column, :] = field["default"]
        return out

    def score_requests(self, users, offsets, items):
        """Scores of many requests in one onnxruntime call.

        ``users`` uint64 [Q]; request q's candidates are
        ``items[offsets[q]:offsets[q+1]]`` (uint64, ``offsets`` int64 [Q+1]).
        Returns ``(scores float32 [len(items)], unknown_items int)``, the
        latter counting candidate ids absent from the item profile.
        """
        users = np.asarray(users, dtype=np.uint64).reshape(-1)
        offsets = np.asarray(offsets, dtype=np.int64)
        items = np.asarray(items, dtype=np.uint64).reshape(-1)
        user_rows = self.rows("user", users)
        item_rows = self.rows("item", items)
        dense_profile = self.profiles["user"]["dense"]
        dense = np.zeros((users.shape[0], dense_profile.shape[1]), dtype=np.float32)
        dense[user_rows >= 0] = dense_profile[user_rows[user_rows >= 0]]
        feeds = {
            "dense": dense,
            "user_emb": self.embeddings("user", user_rows),
            "item_emb": self.embeddings("item", item_rows),
            "user_index": np.repeat(np.arange(users.shape[0], dtype=np.int64), np.diff(offsets)),
        }
        scores = self.session.run([self.output], feeds)[0]
        return np.asarray(scores, dtype=np.float32).reshape(-1), int(np.count_nonzero(item_rows < 0))

    def score(self, user_id, item_ids):
        """Scores of ``item_ids`` (uint64 [N]) for one user: ``(float32 [N], unknown_items)``."""
        item_ids = np.asarray(item_ids, dtype=np.uint64).reshape(-1)
        return self.score_requests(np.array([user_id], dtype=np.uint64),
                                   np.array([0, item_ids.shape[0]], dtype=np.int64), item_ids)
