"""The proof of ``jizhictl import``: random pairs of the new version's profiles
scored by jizhi's own stage processors and by the original model on the same
raw ids must agree within ``CHECK_ATOL + CHECK_RTOL * |original|``.

Runs in the importing process (the stage processors set up here as a worker
sets them up, reading the version's files; the original model through the
onnxruntime session ``load_model`` opened).
"""
import dataclasses
import os

import numpy as np

from jizhi.bundle import Bundle
from jizhi.ctl.progress import ProgressBar as _Progress
from jizhi.workers.builtins import load_class
from jizhi.tools.importer.fields import refuse
from jizhi.tools.importer.files import S_CHECK, raw_bags
from jizhi.workers.stage import Batch

# The check: |jizhi - original| <= CHECK_ATOL + CHECK_RTOL * |original| for every pair.
# float32 pools summed in another order differ by a few ulps; an MLP on top
# scales that by its gain, still far below 1e-5 for scores of order 1.
CHECK_ATOL = 1e-5
CHECK_RTOL = 1e-5
CHECK_USERS = 8          # requests (distinct users) the check pairs are spread over
ORIGINAL_BATCH = 256     # pairs per run of the original model: not request-aligned, on purpose

CHECK_STAGES = ("data_reader", "feature_processor", "cube_accessor", "model_inference")


@dataclasses.dataclass
class CheckResult:
    pairs: int
    users: int
    max_abs_diff: float
    ok: bool
    worst: str    # the pair farthest outside (or nearest to) the tolerance, for the message

    def line(self):
        return (f"check: {self.pairs} pairs over {self.users} users, jizhi's stages against the original model: "
                f"max |jizhi - original| = {self.max_abs_diff:.3g} (allowed: {CHECK_ATOL:g} + {CHECK_RTOL:g} * "
                f"|original|): {'PASS' if self.ok else 'FAIL'}")


def original_feeds(analysis, version_dir, user_rows, item_rows):
    """The original model's inputs for pairs (user_rows[k], item_rows[k]) of the bundle's profiles.

    Raw value r is row r - 1 of the field's table; a padded bag is filled
    with padding_idx; an EmbeddingBag's offsets are the bag starts (and the
    total with include_last_offset).
    """
    users = os.path.join(version_dir, "profiles", "users")
    items = os.path.join(version_dir, "profiles", "items")
    feeds = {}
    if analysis.dense_input is not None:
        feeds[analysis.dense_input] = np.ascontiguousarray(
            np.load(os.path.join(users, "dense.npy"), mmap_mode="r")[user_rows], dtype=np.float32)
    stacked = {}     # stacked input -> {slot: the field's own array}
    for lk in analysis.lookups:
        f = lk.field
        user = f.side == "user"
        values, lens = raw_bags(users if user else items, f, user_rows if user else item_rows)
        valid = np.arange(f.max_len) < lens[:, None]
        if f.input is not None:
            ids = np.full(values.shape, f.padding_idx or 0, dtype=np.int64)
            ids[valid] = values[valid] - 1
            own = {f.input: ids[:, 0] if lk.input_rank == 1 else ids}
        else:
            offsets = np.zeros(lens.shape[0] + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[1:])
            own = {f.indices: values[valid] - 1, f.offsets: offsets if lk.last_offset else offsets[:-1]}
        for name, array in own.items():
            if f.stacked:
                stacked.setdefault(name, {})[f.index] = (array, lk.stack_axis)
            else:
                feeds[name] = array.astype(analysis.dtypes[name])
    for name, slots in stacked.items():
        # Slot k of axis a: the fields' arrays stacked in slot order (bags of a stacked EmbeddingBag input
        # are all full, so every slot's flat ids have one length).
        axis = next(iter(slots.values()))[1]
        feeds[name] = np.stack([slots[k][0] for k in sorted(slots)], axis=axis).astype(analysis.dtypes[name])
    return feeds


def check(version_dir, analysis, session, pairs=2000, seed=1, progress=True):
    """Score random pairs of the version's profiles both ways; a ``CheckResult``.

    jizhi: the stage processors data_reader, feature_processor,
    cube_accessor and model_inference, set up on ``version_dir`` as a worker
    sets them up, one request (a user and its candidates) per micro-batch.
    The original: ``session`` on ``original_feeds``, ``ORIGINAL_BATCH`` pairs
    per run, deliberately not aligned with the requests, so a model whose
    score depends on the rest of its batch fails. Pairs are spread over
    ``CHECK_USERS`` distinct users, candidates drawn uniformly.
    """
    bundle = Bundle(version_dir)
    stages = [load_class(name)() for name in CHECK_STAGES]
    try:
        for stage in stages:
            stage.setup({"on_unknown": "default", "_overlay": None}, bundle)
        return _check(version_dir, analysis, session, stages, pairs, seed, progress)
    finally:
        # LMDB refuses a second environment on one file in a process: close the
        # check's, so this process may open the version once it is renamed.
        cube_accessor = stages[CHECK_STAGES.index("cube_accessor")]
        cube = getattr(getattr(cube_accessor, "store", None), "cube", None)
        if cube is not None:
            cube.close()


def _check(version_dir, analysis, session, stages, pairs, seed, progress):
    user_ids = np.load(os.path.join(version_dir, "profiles", "users", "ids.npy"))
    item_ids = np.load(os.path.join(version_dir, "profiles", "items", "ids.npy"))
    rng = np.random.default_rng([seed, S_CHECK])
    requests = max(1, min(CHECK_USERS, user_ids.shape[0], pairs))
    per = -(-pairs // requests)
    user_rows = rng.choice(user_ids.shape[0], requests, replace=False)
    item_rows = np.concatenate([rng.choice(item_ids.shape[0], per, replace=per > item_ids.shape[0])
                                for _ in range(requests)])
    total = requests * per
    bar = _Progress("check", 2 * total, progress)
    try:
        jizhi = []
        for q in range(requests):
            candidates = item_ids[item_rows[q * per:(q + 1) * per]]
            batch = Batch(user_ids[user_rows[q:q + 1]], np.array([per], dtype=np.int64), np.zeros(1, dtype=bool),
                          np.full(1, np.inf), np.array([0, per], dtype=np.int64),
                          {"item_ids": candidates, "recall_scores": np.full(per, 0.5, dtype=np.float32)})
            for stage in stages:
                batch.columns.update(stage.process(batch))
            if batch.failed:
                refuse(f"check: jizhi failed a request: {batch.failed[0]}")
            jizhi.append(np.asarray(batch["score"], dtype=np.float32).reshape(-1))
            bar.advance(per)
        jizhi = np.concatenate(jizhi)
        pair_users = np.repeat(user_rows, per)
        original = np.empty(total, dtype=np.float32)
        for start in range(0, total, ORIGINAL_BATCH):
            stop = min(total, start + ORIGINAL_BATCH)
            feeds = original_feeds(analysis, version_dir, pair_users[start:stop], item_rows[start:stop])
            try:
                out = np.asarray(session.run([analysis.output], feeds)[0]).reshape(-1)
            except Exception as e:   # onnxruntime's own error types: the feeds FIELDS.toml describes do not fit
                refuse(f"check: the original model cannot run on the inputs FIELDS.toml describes "
                       f"({', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())}): {e}")
            if out.shape[0] != stop - start:
                refuse(f"check: the original model's output {analysis.output!r} has {out.shape[0]} values for "
                       f"{stop - start} examples")
            original[start:stop] = out
            bar.advance(stop - start)
    finally:
        bar.close()
    diff = np.abs(jizhi.astype(np.float64) - original.astype(np.float64))
    allowed = CHECK_ATOL + CHECK_RTOL * np.abs(original.astype(np.float64))
    finite = np.isfinite(jizhi) & np.isfinite(original)
    ok = bool(finite.all() and (diff <= allowed).all())
    excess = np.where(finite, diff / allowed, np.inf)
    k = int(np.argmax(excess))
    worst = (f"user {int(user_ids[pair_users[k]])}, item {int(item_ids[item_rows[k]])}: "
             f"jizhi {float(jizhi[k]):.7g}, original {float(original[k]):.7g}")
    max_abs = float(np.max(np.where(finite, diff, np.inf)))
    return CheckResult(total, requests, max_abs, ok, worst)
