"""Pipelines: the DAG of stages and its compiled execution plan.

A pipeline is written in TOML (etc/pipelines/*.toml) or built in Python::

    p = Pipeline("mine", model="demo")
    p.stage("reader", "data_reader", next=["features"])
    p.stage("features", "feature_processor", next=["cube"])
    ...
    plan = compile_pipeline(p.doc, models_dir)

``compile_pipeline`` runs in the supervisor before anything starts. It checks
the DAG (unknown processor, cycle, an input no predecessor produces, a join
with a missing predecessor, a model the model directory lacks, a fusion that
would make a cycle) and raises ``PipelineError`` naming the offending stage.
It returns a plan: a plain dict (msgpack-able; children read it from the run
directory) with the stages, the *groups* (the worker kinds: a group is one
stage, or several stages fused into one process by ``[[fuse]]``), and the
shared-memory *arenas* (every column that crosses a process boundary, plus
the request inputs and the sink's outputs).
"""
import importlib
import tomllib
from pathlib import Path

from jizhi.bundle import Bundle, find_version
from jizhi.config import etc_dir
from jizhi.errors import BundleError, PipelineError
from jizhi.workers.data_reader import ON_UNKNOWN
from jizhi.workers.ranker import SINK_OUTPUTS as SINK_STAGE_OUTPUTS
from jizhi.workers.stage import REQUEST_INPUTS

BUILTINS = {
    "data_reader": "jizhi.workers.data_reader:DataReader",
    "feature_processor": "jizhi.workers.feature_processor:FeatureProcessor",
    "cube_accessor": "jizhi.workers.cube_accessor:CubeAccessor",
    "model_inference": "jizhi.workers.model_inference:ModelInference",
    "ranker": "jizhi.workers.ranker:Ranker",
    "query_cache": "jizhi.workers.query_cache:QueryCache",
    "legacy_scorer": "jizhi.workers.legacy:LegacyScorer",
}
SINK_OUTPUTS = tuple(o.name for o in SINK_STAGE_OUTPUTS)


class Pipeline:
    """Build a pipeline document in Python (the same shape as the TOML)."""

    def __init__(self, name, model, version="latest", on_unknown="default"):
        self.doc = {"name": name, "model": model, "version": version, "on_unknown": on_unknown,
                    "stage": [], "fuse": []}

    def stage(self, name, processor, next=(), pool=1, batch=8, **config):
        self.doc["stage"].append({"name": name, "processor": processor, "next": list(next),
                                  "pool": pool, "batch": batch, **config})
        return self

    def fuse(self, name, stages, pool=1, batch=8, batch_wait_ms=0):
        self.doc["fuse"].append({"name": name, "stages": list(stages), "pool": pool, "batch": batch,
                                 "batch_wait_ms": batch_wait_ms})
        return self


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


def pipeline_path(name_or_path):
    p = Path(name_or_path)
    if p.suffix == ".toml":
        return p
    return etc_dir() / "pipelines" / f"{name_or_path}.toml"


def read_pipeline(name_or_path):
    path = pipeline_path(name_or_path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise PipelineError(f"pipeline {name_or_path!r}: no file {path}")
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"pipeline file {path} is not valid TOML: {e}")


def _int(stage, key, value, low=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PipelineError(f"stage {stage!r}: {key} must be an integer >= {low}, got {value!r}")
    return value


def _wait(stage, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
        raise PipelineError(f"stage {stage!r}: batch_wait_ms must be a number of milliseconds from 0 to 100, got {value!r}")
    return float(value)


def compile_pipeline(doc, models_dir, pinned_version=None):
    """Check a pipeline document and return its plan (see module docstring)."""
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise PipelineError("pipeline has no name")
    model = doc.get("model")
    stages_in = doc.get("stage", [])
    if not stages_in:
        raise PipelineError(f"pipeline {name!r} has no [[stage]]")
    on_unknown = doc.get("on_unknown", "default")
    if on_unknown not in ON_UNKNOWN:
        raise PipelineError(f"pipeline {name!r}: on_unknown must be one of {', '.join(ON_UNKNOWN)}")
    # structured = false: every stage works per pair (the user's features read, hashed, looked up and
    # fed to the network once per candidate), as a generic serving system does. For comparison.
    structured = doc.get("structured", True)
    if not isinstance(structured, bool):
        raise PipelineError(f"pipeline {name!r}: structured must be true or false, got {structured!r}")

    # The model bundle every stage reads (a stage may name it; it must be this one).
    try:
        version = pinned_version if pinned_version is not None else \
            (None if doc.get("version", "latest") == "latest" else int(doc["version"]))
        vdir = find_version(models_dir, model, version)
        bundle = Bundle(vdir)
    except (BundleError, ValueError) as e:
        raise PipelineError(f"pipeline {name!r}: model {model!r}: {e}")

    stages, order_in = {}, []
    for s in stages_in:
        sname = s.get("name")
        if not isinstance(sname, str) or not sname:
            raise PipelineError(f"pipeline {name!r}: a stage has no name")
        if sname in stages:
            raise PipelineError(f"stage {sname!r} is defined twice")
        if s.get("model", model) != model:
            raise PipelineError(f"stage {sname!r} names model {s['model']!r}, which the pipeline's bundle ({model!r}) lacks")
        proc = s.get("processor")
        try:
            cls = load_class(proc) if isinstance(proc, str) else None
        except (ImportError, AttributeError) as e:
            raise PipelineError(f"stage {sname!r}: unknown processor {proc!r} ({e})")
        if cls is None:
            raise PipelineError(f"stage {sname!r}: processor must be a name or module:Class")
        config = {k: v for k, v in s.items()
                  if k not in ("name", "processor", "next", "pool", "batch", "batch_wait_ms", "cores")}
        config.setdefault("on_unknown", on_unknown)
        config.setdefault("per_pair", not structured)
        if proc == "model_inference":
            config.setdefault("structured", "on" if structured else "off")
        nxt = s.get("next", [])
        if isinstance(nxt, str):
            nxt = [nxt]
        stages[sname] = {"name": sname, "processor": proc,
                         "class": BUILTINS.get(proc, proc), "config": config, "next": list(nxt),
                         "prev": [], "pool": _int(sname, "pool", s.get("pool", 1)),
                         "batch": _int(sname, "batch", s.get("batch", 8)),
                         "batch_wait_ms": _wait(sname, s.get("batch_wait_ms", 0)),
                         "cores": list(s.get("cores", [])), "_cls": cls}
        order_in.append(sname)
    for sname, st in stages.items():
        for n in st["next"]:
            if n not in stages:
                raise PipelineError(f"stage {sname!r}: next stage {n!r} is not defined")
            stages[n]["prev"].append(sname)
    topo = _toposort(stages, lambda s: stages[s]["next"], "stage")
    sinks = [s for s in topo if not stages[s]["next"]]
    if len(sinks) != 1:
        raise PipelineError(f"pipeline {name!r} must end in exactly one stage, has {len(sinks)}: {', '.join(sinks)}")

    # Outputs and inputs: every input must come from an ancestor or the request.
    ancestors = {s: set() for s in topo}
    for s in topo:
        for p in stages[s]["prev"]:
            ancestors[s] |= ancestors[p] | {p}
    producer = {}
    for s in topo:
        st = stages[s]
        try:
            outs = list(st["_cls"].outputs(st["config"], bundle))
        except Exception as e:
            raise PipelineError(f"stage {s!r}: processor {st['processor']!r} cannot declare its outputs: {e}")
        st["outputs"] = {o.name: {"scope": o.scope, "dtype": o.dtype, "shape": list(o.shape)} for o in outs}
        for o in outs:
            if o.name in producer or o.name in REQUEST_INPUTS:
                raise PipelineError(f"stage {s!r}: output {o.name!r} is already produced by {producer.get(o.name, 'the request')!r}")
            producer[o.name] = s
    for s in topo:
        st = stages[s]
        inputs = []
        for raw in st["_cls"].inputs(st["config"]):
            optional = raw.endswith("?")
            col = raw.rstrip("?")
            if col in REQUEST_INPUTS:
                inputs.append(col)
            elif col in producer and producer[col] in ancestors[s]:
                inputs.append(col)
            elif col in producer and not optional:
                raise PipelineError(f"stage {s!r} reads {col!r}, produced by {producer[col]!r}, which is not one of its predecessors (a join is missing an edge)")
            elif not optional:
                raise PipelineError(f"stage {s!r} reads {col!r}, which no stage produces")
        st["inputs"] = inputs
    for col in SINK_OUTPUTS:
        if producer.get(col) != sinks[0]:
            raise PipelineError(f"stage {sinks[0]!r} ends the pipeline but does not output {col!r} (use ranker)")

    # Groups: fused chains from [[fuse]], every other stage alone.
    group_of, groups = {}, {}
    for f in doc.get("fuse", []):
        gname = f.get("name")
        members = f.get("stages", [])
        if not gname or not members:
            raise PipelineError(f"pipeline {name!r}: a [[fuse]] needs a name and stages")
        for m in members:
            if m not in stages:
                raise PipelineError(f"fuse {gname!r}: stage {m!r} is not defined")
            if m in group_of:
                raise PipelineError(f"stage {m!r} is fused into both {group_of[m]!r} and {gname!r}")
            group_of[m] = gname
        groups[gname] = {"name": gname, "stages": [s for s in topo if s in members],
                         "pool": _int(gname, "pool", f.get("pool", 1)),
                         "batch": _int(gname, "batch", f.get("batch", 8)),
                         "batch_wait_ms": _wait(gname, f.get("batch_wait_ms", 0)),
                         "cores": list(f.get("cores", []))}
    for s in topo:
        if s not in group_of:
            group_of[s] = s
            st = stages[s]
            groups[s] = {"name": s, "stages": [s], "pool": st["pool"], "batch": st["batch"],
                         "batch_wait_ms": st["batch_wait_ms"],
                         "cores": st["cores"]}
    for g in groups.values():
        g["next"] = sorted({group_of[n] for s in g["stages"] for n in stages[s]["next"]} - {g["name"]})
        g["prev"] = sorted({group_of[p] for s in g["stages"] for p in stages[s]["prev"]} - {g["name"]})
    try:
        gtopo = _toposort(groups, lambda g: groups[g]["next"], "group")
    except PipelineError as e:
        raise PipelineError(f"fusing stages makes a cycle between groups: {e}")

    # Arenas: request inputs, columns read across groups, the sink's outputs.
    arenas = {n: {"scope": o.scope, "dtype": o.dtype, "shape": list(o.shape)} for n, o in REQUEST_INPUTS.items()}
    for g in groups.values():
        reads = []
        for s in g["stages"]:
            for col in stages[s]["inputs"]:
                if col in REQUEST_INPUTS or group_of[producer[col]] != g["name"]:
                    if col not in reads:
                        reads.append(col)
                    if col not in arenas:
                        arenas[col] = stages[producer[col]]["outputs"][col]
        g["reads"] = reads
    for col in SINK_OUTPUTS:
        arenas[col] = stages[sinks[0]]["outputs"][col]
    for g in groups.values():
        g["writes"] = [c for s in g["stages"] for c in stages[s]["outputs"] if c in arenas]

    for st in stages.values():
        del st["_cls"]
    return {"name": name, "model": model, "version": bundle.version, "version_dir": str(vdir),
            "on_unknown": on_unknown, "stages": stages, "stage_order": topo,
            "groups": groups, "group_order": gtopo,
            "sources": [g for g in gtopo if not groups[g]["prev"]],
            "sink": group_of[sinks[0]], "arenas": arenas}


def bytes_per_request(plan, candidates):
    """Bytes of tensors one request of ``candidates`` moves: ``{"written": every stage output,
    "shared": the arenas (request inputs, columns read across processes, the sink's outputs)}``.
    Per-request columns count once, per-candidate ones ``candidates`` times."""
    import numpy as np

    def size(col):
        rows = candidates if col["scope"] == "candidate" else 1
        return rows * int(np.prod(col["shape"], dtype=np.int64)) * np.dtype(col["dtype"]).itemsize

    written = sum(size(c) for st in plan["stages"].values() for c in st["outputs"].values())
    return {"written": int(written), "shared": int(sum(size(c) for c in plan["arenas"].values()))}


def _toposort(nodes, succ, what):
    indeg = {n: 0 for n in nodes}
    for n in nodes:
        for m in succ(n):
            indeg[m] += 1
    ready = [n for n in nodes if indeg[n] == 0]
    out = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for m in succ(n):
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    if len(out) != len(indeg):
        # Name an actual cycle: every blocked node has a blocked predecessor
        # (else its in-degree would have reached 0), so walking predecessors
        # among the blocked nodes must come back to one of them.
        stuck = [x for x in nodes if x not in out]
        preds = {x: [p for p in stuck if x in succ(p)] for x in stuck}
        walk, seen = [], {}
        n = stuck[0]
        while n not in seen:
            seen[n] = len(walk)
            walk.append(n)
            n = preds[n][0]
        cycle = [n] + list(reversed(walk[seen[n] + 1:])) + [n]   # forward order, from the node met twice
        raise PipelineError(f"{what} {cycle[0]!r} is on a cycle ({' -> '.join(cycle)})")
    return out
