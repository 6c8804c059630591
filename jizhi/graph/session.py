"""onnxruntime sessions as a jizhi worker runs them.

``session_options`` is the one definition of the options a model inference
worker (workers/model_inference.py), the validator and the graph passes'
checks (``jizhi.graph.structured.check``, ``jizhi.tools.structbench``) run a
dense graph with: one intra-op thread by default (processes, not threads,
share the cores), one inter-op thread, sequential execution, all graph
optimisations, no spinning. Creating a session is the caller's: nothing here
is shared across processes.
"""
import onnxruntime as ort


def session_options(threads=1):
    """SessionOptions for a worker process: ``threads`` intra-op threads (default one: processes,
    not threads, share the cores), no spinning."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def model_session(model):
    """A CPU InferenceSession of the ModelProto ``model`` with ``session_options()``."""
    return ort.InferenceSession(model.SerializeToString(), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
