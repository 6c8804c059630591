"""model_inference: the dense part of the model through onnxruntime.

One ``InferenceSession.run`` per micro-batch: the graph takes U users (dense
features and pooled user embeddings) and P candidates with a candidate ->
user index, so the user tower runs once per request, not once per pair
(RecServe's structured features). The session uses one intra-op and one
inter-op thread and does not spin, so worker processes, not threads, share
the cores.
"""
import numpy as np
import onnxruntime as ort

from jizhi.workers.stage import CANDIDATE, Output, Stage


def session_options():
    """SessionOptions for a worker process: one thread, no spinning."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def open_session(path):
    return ort.InferenceSession(str(path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


class ModelInference(Stage):
    name = "model_inference"

    @classmethod
    def inputs(cls, config):
        return ("dense", "user_emb", "item_emb")

    @classmethod
    def outputs(cls, config, bundle):
        return (Output("score", CANDIDATE, "float32"),)

    def setup(self, config, bundle):
        self.session = open_session(bundle.onnx_path)
        self.output = bundle.onnx_output

    def process(self, batch):
        score, = self.session.run([self.output], {
            "dense": np.ascontiguousarray(batch["dense"], dtype=np.float32),
            "user_emb": np.ascontiguousarray(batch["user_emb"], dtype=np.float32),
            "item_emb": np.ascontiguousarray(batch["item_emb"], dtype=np.float32),
            "user_index": batch.candidate_request(),
        })
        return {"score": score.reshape(-1)}
