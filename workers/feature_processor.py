"""feature_processor: raw user feature values -> uint64 signatures.

The Numba-compiled universal hash (cube/signature.py) runs over the whole
padded [R, F, L] block of the batch at once. Item signatures are
precomputed per bundle version and pass through untouched.
"""
from jizhi.cube.signature import sign_padded
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage


class FeatureProcessor(Stage):
    name = "feature_processor"
    fixed_inputs = ("user_values", "user_lens")

    @classmethod
    def outputs(cls, config, bundle):
        return (Output("user_sigs", CANDIDATE if config.get("per_pair") else REQUEST, "uint64",
                       (len(bundle.user_fields), bundle.user_len)),)

    def setup(self, config, bundle):
        self.hash_ids = bundle.user_hash_ids
        self.seed = bundle.hash_seed

    def process(self, batch):
        return {"user_sigs": sign_padded(self.hash_ids, batch["user_values"], batch["user_lens"], self.seed)}
