"""The built-in stage processors by name, and ``load_class``: the one way a processor class is found
from a pipeline file's ``processor`` (a built-in name, or ``module:Class`` of the user's own), used by the
plan compiler (jizhi/pipeline.py), the worker runtime (workers/run.py) and the tools."""
import importlib

BUILTINS = {
    "data_reader": "jizhi.workers.data_reader:DataReader",
    "feature_processor": "jizhi.workers.feature_processor:FeatureProcessor",
    "cube_accessor": "jizhi.workers.cube_accessor:CubeAccessor",
    "model_inference": "jizhi.workers.model_inference:ModelInference",
    "ranker": "jizhi.workers.ranker:Ranker",
    "query_cache": "jizhi.workers.query_cache:QueryCache",
    "legacy_scorer": "jizhi.workers.legacy:LegacyScorer",
    "combiner": "jizhi.workers.combiner:Combiner",
    "cascade": "jizhi.workers.combiner:Cascade",
    "ab_dispatch": "jizhi.workers.ab_dispatch:AbDispatch",
    "shedder": "jizhi.workers.shedder:Shedder",
}


def load_class(path):
    """Import a processor class from a built-in name or ``module:Class``."""
    target = BUILTINS.get(path, path)
    if ":" in target:
        mod, _, cls = target.partition(":")
    else:
        mod, _, cls = target.rpartition(".")
    if not mod:
        raise ImportError(f"{path!r} is neither a built-in processor ({', '.join(BUILTINS)}) nor module:Class")
    return getattr(importlib.import_module(mod), cls)
