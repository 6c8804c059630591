"""legacy_scorer: the LEGACY baseline, one monolithic stage.

What a model server without structured features does (the baseline of the
JIZHI paper): each request is handled alone (batch size 1) and synchronously,
as one sample per user-item pair. The user's features are repeated for every
candidate: the user bags are hashed and pooled once per pair and the dense
graph runs its user tower once per pair (U = P, user_index = arange). No
caches. It reuses the same profile, hashing, cube and ONNX code as the
staged pipeline, so the comparison measures the serving design, not
different kernels.
"""
import numpy as np

from jizhi.cube.pooling import default_vectors, pool_blocks
from jizhi.cube.signature import sign_padded
from jizhi.cube.store import open_cube
from jizhi.errors import BAD_REQUEST
from jizhi.overlay import Overlay
from jizhi.workers.data_reader import ProfileReader
from jizhi.workers.model_inference import open_session
from jizhi.workers.ranker import SINK_OUTPUTS, rank
from jizhi.workers.stage import Stage


class LegacyScorer(ProfileReader, Stage):
    name = "legacy_scorer"
    fixed_inputs = ("item_ids",)
    fixed_outputs = SINK_OUTPUTS

    def setup(self, config, bundle):
        self.bundle = bundle
        self.attach_profiles(bundle)     # its own profiles, or a store's snapshot (jizhi/profilestore.py)
        self.cube = open_cube(bundle.cube_path, bundle.dim)
        self.defaults = [default_vectors(bundle, "user"), default_vectors(bundle, "item")]
        self.session = open_session(bundle.onnx_path)
        self.overlay = Overlay.attach(config.get("_overlay"))

    def process(self, batch):
        b = self.bundle
        for i, f in enumerate(batch.feats or ()):
            if f is not None:       # (LEGACY reads the profiles only: never a score from other features)
                batch.fail(i, BAD_REQUEST, "the legacy pipeline does not read a request's context or features")
        self.count_snapshot(batch)
        scores, unknown, missing = [], [], []
        for i in range(batch.n_requests):
            a, e = batch.offsets[i], batch.offsets[i + 1]
            items = batch["item_ids"][a:e]
            p = e - a
            # One sample per pair: the user row repeated for every candidate.
            users = np.repeat(batch.users[i:i + 1], p)
            urows, uknown = self.users.rows(users)
            dense, values, lens = self.users.user_features(urows, uknown, users, self.overlay)
            usigs = sign_padded(b.user_hash_ids, values, lens, b.hash_seed)
            irows, iknown = self.items.rows(items)
            isigs, ilens = self.items.item_signatures(irows, iknown)
            (uemb, iemb), (um, im) = pool_blocks(self.cube, [(usigs, lens), (isigs, ilens)], b.dim,
                                                 [b.user_sums, b.item_sums], self.defaults)
            s, = self.session.run([b.onnx_output], {
                "dense": dense, "user_emb": uemb, "item_emb": iemb,
                "user_index": np.arange(p, dtype=np.int64)})
            scores.append(s.reshape(-1))
            unknown.append(int((~iknown).sum()))
            missing.append(int(um[0] + im.sum()))
        batch.count("unknown_items", unknown)
        batch.count("unknown_user", ~self.users.rows(batch.users)[1])
        batch.count("missing_signatures", missing)
        return rank(batch, batch.drop_invalid(np.concatenate(scores)), None)
