"""data_reader: user and item profiles from the columnar snapshot.

Reads, for a batch, the user's dense features and raw sparse values (hashed
later by feature_processor, because user profiles change online) and the
candidates' precomputed item signatures (static within a bundle version).
Everything is a gather over memory-mapped columns.

Unknown item ids are not errors (new items appear every hour): the pipeline
option ``on_unknown`` says what to do with them: ``default`` scores them with
empty bags (the default vectors), ``drop`` removes them from the ranking,
``reject`` fails the request with BAD_REQUEST. They are counted in the reply
as ``unknown_items`` in every case. A user the profiles do not know is
scored with zero dense features and empty bags (each field's default
vector) and counted in the reply as ``unknown_user`` (0 or 1).

The user's recent behaviour from ``feedback`` (the online overlay,
jizhi/overlay.py) is merged over the snapshot's history field here.

A version that reads a profile store (``[profiles] store``) reads its newest
snapshot that fits, switched at batch boundaries (jizhi/profilestore.py);
each request counts the snapshot it read as ``profile_snapshot``, which the
reply carries.
"""
import numpy as np

from jizhi.errors import BAD_REQUEST
from jizhi.overlay import Overlay
from jizhi.profilestore import source as profile_source
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage

ON_UNKNOWN = ("default", "drop", "reject")


class DataReader(Stage):
    name = "data_reader"
    fixed_inputs = ("item_ids",)

    @classmethod
    def outputs(cls, config, bundle):
        fu, lu = len(bundle.user_fields), bundle.user_len
        fi, li = len(bundle.item_fields), bundle.item_len
        user = CANDIDATE if config.get("per_pair") else REQUEST   # pipeline structured = false: per pair
        return (Output("dense", user, "float32", (bundle.dense_features,)),
                Output("user_values", user, "int64", (fu, lu)),
                Output("user_lens", user, "int32", (fu,)),
                Output("item_sigs", CANDIDATE, "uint64", (fi, li)),
                Output("item_lens", CANDIDATE, "int32", (fi,)),
                Output("keep", CANDIDATE, "bool"))

    def setup(self, config, bundle):
        self.on_unknown = config.get("on_unknown", "default")
        self.per_pair = bool(config.get("per_pair"))
        # The version's profiles: its own, or a profile store's current snapshot (jizhi/profilestore.py),
        # switched at a batch boundary (this stage polls the store when it is the version's first reader).
        self.source = profile_source(bundle)
        self.source.register(self)
        self.overlay = Overlay.attach(config.get("_overlay"))

    def batch_boundary(self):
        self.source.poll(self)

    @property
    def users(self):
        return self.source.users

    @property
    def items(self):
        return self.source.items

    def process(self, batch):
        if self.source.store is not None:
            batch.count("profile_snapshot", np.full(batch.n_requests, self.source.snapshot, dtype=np.int64))
        urows, uknown = self.users.rows(batch.users)
        batch.count("unknown_user", ~uknown)
        users = batch.users
        if self.per_pair:
            pair = batch.candidate_request()
            urows, uknown, users = urows[pair], uknown[pair], users[pair]
        dense, values, lens = self.users.user_features(urows, uknown, users, self.overlay)
        irows, iknown = batch.profile_rows(self.items, batch["item_ids"])
        sigs, ilens = self.items.item_signatures(irows, iknown)
        unknown = batch.per_request_sum(~iknown)
        batch.count("unknown_items", unknown)
        keep = iknown if self.on_unknown == "drop" else np.ones_like(iknown)
        if self.on_unknown == "reject":
            for i in np.flatnonzero(unknown):
                batch.fail(i, BAD_REQUEST, f"{unknown[i]} unknown item ids (pipeline option on_unknown = reject)")
        return {"dense": dense, "user_values": values, "user_lens": lens,
                "item_sigs": sigs, "item_lens": ilens, "keep": keep}
