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
import tomllib
from pathlib import Path

from jizhi.bundle import Bundle, find_version, same_features
from jizhi.config import etc_dir
from jizhi.errors import BundleError, PipelineError
from jizhi.stats import MAX_STAGES
from jizhi.workers.data_reader import ON_UNKNOWN
from jizhi.workers.ranker import SINK_OUTPUTS as SINK_STAGE_OUTPUTS
from jizhi.workers.builtins import BUILTINS, load_class
from jizhi.workers.stage import REQUEST_INPUTS

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

    def front(self, next):
        """The usual first stages: data_reader -> feature_processor -> cube_accessor -> ``next``."""
        return (self.stage("reader", "data_reader", next=["features"])
                .stage("features", "feature_processor", next=["cube"])
                .stage("cube", "cube_accessor", next=next))

    def toml(self):
        """The document as a pipeline file's text (etc/pipelines/*.toml)."""
        from jizhi.tomlw import toml_text
        return toml_text({k: v for k, v in self.doc.items() if v != []})


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


def pipeline_models(doc):
    """The models a pipeline document serves: ``{model: pinned version or None (latest)}``, the
    pipeline's own model (``model``, ``version``) first, then the heads its stages name
    (``model = "ctr"``, optional ``version = N`` on the stage). Raises PipelineError."""
    name = doc.get("name")
    base = doc.get("model")
    if not isinstance(base, str) or not base:
        raise PipelineError(f"pipeline {name!r} names no model")
    out = {}

    def add(model, version, where):
        if version != "latest" and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise PipelineError(f"{where}: version must be \"latest\" or a positive integer, got {version!r}")
        pinned = None if version == "latest" else version
        if out.get(model, pinned) != pinned:
            raise PipelineError(f"{where}: model {model} is pinned to two versions in one pipeline")
        out[model] = pinned

    add(base, doc.get("version", "latest"), f"pipeline {name!r}")
    for s in doc.get("stage", []):
        model = s.get("model", base)
        if model == base:
            continue
        if not isinstance(model, str) or not model:
            raise PipelineError(f"stage {s.get('name')!r}: model must be a model name, got {model!r}")
        if s.get("processor") != "model_inference":
            raise PipelineError(f"stage {s.get('name')!r} names model {model!r}: only a model_inference stage can "
                                f"serve another model than the pipeline's ({base!r}); the reader, features and "
                                "cube stages are the pipeline model's")
        add(model, s.get("version", "latest"), f"stage {s.get('name')!r}")
    return out


def compile_pipeline(doc, models_dir, pinned_version=None, versions=None, generation=None):
    """Check a pipeline document and return its plan (see module docstring).

    ``versions``: ``{model: version}`` to compile against (every model of ``pipeline_models``; a
    model missing from it takes its policy's version: the pinned one or the newest on disk).
    ``pinned_version`` is the pipeline model's version (the single-model form of ``versions``).
    ``generation``: the label this plan's workers, arenas and routing are keyed by (default: the
    pipeline model's version; the supervisor numbers the version sets of a multi-model pipeline).
    """
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

    # The model bundles: the pipeline's own (reader, features, cube) and the heads stages name.
    policies = pipeline_models(doc)
    versions = dict(versions or {})
    if pinned_version is not None:
        versions.setdefault(model, pinned_version)
    bundles = {}
    for m, pinned in policies.items():
        try:
            v = versions.get(m, pinned)
            bundles[m] = Bundle(find_version(models_dir, m, v))
        except (BundleError, ValueError) as e:
            if m == model:
                raise PipelineError(f"pipeline {name!r}: model {m!r}: {e}")
            stage = next(st.get("name") for st in stages_in if st.get("model") == m)
            raise PipelineError(f"stage {stage!r} names model {m!r}, which the model directory cannot serve: {e}")
    bundle = bundles[model]
    if bundle.head:
        raise PipelineError(f"pipeline {name!r}: model {model!r} is a head bundle (dense only); a pipeline's "
                            "model must have the cube and profiles its heads share")
    for m, b in bundles.items():
        if m != model:
            why = same_features(bundle, b)
            if why is not None:
                raise PipelineError(f"pipeline {name!r}: model {m!r} cannot be served on {model!r}'s "
                                    f"features: {why}")
    vdir = bundle.path

    stages, order_in = {}, []
    for s in stages_in:
        sname = s.get("name")
        if not isinstance(sname, str) or not sname:
            raise PipelineError(f"pipeline {name!r}: a stage has no name")
        if sname in stages:
            raise PipelineError(f"stage {sname!r} is defined twice")
        smodel = s.get("model", model)
        proc = s.get("processor")
        try:
            cls = load_class(proc) if isinstance(proc, str) else None
        except (ImportError, AttributeError) as e:
            raise PipelineError(f"stage {sname!r}: unknown processor {proc!r} ({e})")
        if cls is None:
            raise PipelineError(f"stage {sname!r}: processor must be a name or module:Class")
        config = {k: v for k, v in s.items()
                  if k not in ("name", "processor", "next", "pool", "batch", "batch_wait_ms", "cores", "version")}
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
                         "cores": list(s.get("cores", [])), "_cls": cls, "_bundle": bundles[smodel]}
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
    branch_of = _branches(stages, topo)
    producers = {}
    for s in topo:
        st = stages[s]
        try:
            outs = list(st["_cls"].outputs(st["config"], st["_bundle"]))
        except Exception as e:
            raise PipelineError(f"stage {s!r}: processor {st['processor']!r} cannot declare its outputs: {e}")
        st["outputs"] = {o.name: {"scope": o.scope, "dtype": o.dtype, "shape": list(o.shape)} for o in outs}
        for o in outs:
            if o.name in REQUEST_INPUTS:
                raise PipelineError(f"stage {s!r}: output {o.name!r} is already produced by the request")
            for other in producers.get(o.name, ()):
                # Two A/B groups' branches may write the same column (a request runs one of them).
                a, b = branch_of.get(other), branch_of.get(s)
                if a is None or b is None or a[0] != b[0] or a[1] == b[1] \
                        or stages[other]["outputs"][o.name] != st["outputs"][o.name]:
                    raise PipelineError(f"stage {s!r}: output {o.name!r} is already produced by {other!r}")
            producers.setdefault(o.name, []).append(s)
    producer = {col: ps[0] for col, ps in producers.items()}
    for s in topo:
        st = stages[s]
        inputs = []
        for raw in st["_cls"].inputs(st["config"]):
            optional = raw.endswith("?")
            col = raw.rstrip("?")
            if col in REQUEST_INPUTS:
                inputs.append(col)
            elif col in producer and any(p in ancestors[s] for p in producers[col]):
                inputs.append(col)
            elif col in producer and not optional:
                raise PipelineError(f"stage {s!r} reads {col!r}, produced by {producer[col]!r}, which is not one of its predecessors (a join is missing an edge)")
            elif not optional:
                raise PipelineError(f"stage {s!r} reads {col!r}, which no stage produces")
        st["inputs"] = inputs
    rows_from = [s for s in topo if stages[s]["config"].get("user_rows")]
    cached = [s for s in topo if stages[s]["processor"] == "query_cache"]
    if rows_from and cached:
        raise PipelineError(f"stage {cached[0]!r}: a query cache would serve scores computed before a user's row on "
                            f"Redis changed (stage {rows_from[0]!r} reads user_rows): one or the other")
    for col in SINK_OUTPUTS:
        if producers.get(col) != [sinks[0]]:
            raise PipelineError(f"stage {sinks[0]!r} ends the pipeline but does not output {col!r} (use ranker)")

    # Groups: fused chains from [[fuse]], every other stage alone.
    group_of, groups = {}, {}
    for f in doc.get("fuse", []):
        gname = f.get("name")
        members = f.get("stages", [])
        if not gname or not members:
            raise PipelineError(f"pipeline {name!r}: a [[fuse]] needs a name and stages")
        if len(members) > MAX_STAGES:
            # (a worker's stats row keeps a histogram and a CPU account per stage, MAX_STAGES of them)
            raise PipelineError(f"fuse {gname!r}: {len(members)} stages; a group fuses at most {MAX_STAGES}")
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
    for s in topo:
        if getattr(stages[s]["_cls"], "narrows", False):     # a cascade, a shedder
            for n in stages[s]["next"]:
                if group_of[n] != group_of[s] and stages[n]["processor"] != "ranker":
                    raise PipelineError(f"stage {n!r} follows the {stages[s]['processor']} {s!r} but runs in another worker kind: "
                                        f"fuse it into {group_of[s]!r} (the pruned batch exists only inside "
                                        "one worker)")
    for g in groups.values():
        routers = [s for s in g["stages"] if stages[s]["processor"] == "ab_dispatch"]
        if routers and len(g["stages"]) > 1:
            raise PipelineError(f"stage {routers[0]!r} (ab_dispatch) runs in the broker: it cannot be fused "
                                f"into {g['name']!r}")
        labels = {branch_of.get(s) for s in g["stages"]}
        if len(labels) > 1:
            raise PipelineError(f"group {g['name']!r} fuses stages of different A/B branches "
                                f"({', '.join(sorted(str(x[1]) if x else 'shared' for x in labels))})")
        label = labels.pop()
        g["branch"] = list(label) if label else None         # [router group, A/B group] or None: every request
        if routers:
            g["router"] = stages[routers[0]]["config"]
            g["pool"] = 0                                     # no worker: the broker routes
    for g in groups.values():
        if g["branch"]:
            g["branch"][0] = group_of[g["branch"][0]]
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
        del st["_cls"], st["_bundle"]
    return {"name": name, "model": model,
            "version": bundle.version if generation is None else generation, "version_dir": str(vdir),
            "versions": {m: b.version for m, b in bundles.items()},
            "version_dirs": {m: str(b.path) for m, b in bundles.items()},
            "on_unknown": on_unknown, "stages": stages, "stage_order": topo,
            "groups": groups, "group_order": gtopo,
            "sources": [g for g in gtopo if not groups[g]["prev"]],
            "sink": group_of[sinks[0]], "arenas": arenas}


def _branches(stages, topo):
    """``{stage: (ab_dispatch stage, A/B group)}`` for the stages only one A/B group's requests run.

    The stages a group's head reaches belong to it; those every group reaches (the ranker, a
    join) belong to all. A stage some groups reach and others not, or A/B dispatch inside a
    branch, is refused."""
    from jizhi.workers.ab_dispatch import parse_groups
    out = {}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += stages[n]["next"]
        return seen

    for r in topo:
        if stages[r]["processor"] != "ab_dispatch":
            continue
        try:
            groups = parse_groups(stages[r]["config"])
        except ValueError as e:
            raise PipelineError(f"stage {r!r}: {e}")
        heads = [h for _, _, h in groups]
        if sorted(heads) != sorted(stages[r]["next"]) or len(set(heads)) != len(heads):
            raise PipelineError(f"stage {r!r}: next must list each group's first stage once "
                                f"(groups start at {', '.join(heads)}; next is {', '.join(stages[r]['next'])})")
        reached = {g: reach(h) for g, _, h in groups}
        for s in set().union(*reached.values()):
            by = [g for g in reached if s in reached[g]]
            if len(by) == len(reached):
                continue
            if len(by) > 1:
                raise PipelineError(f"stage {s!r} is reached by A/B groups {', '.join(by)} of {r!r} but not by "
                                    "the others: a branch must be one group's, or every group's")
            if s in out or stages[s]["processor"] == "ab_dispatch":
                raise PipelineError(f"stage {s!r}: A/B dispatch inside an A/B branch is not supported")
            out[s] = (r, by[0])
    return out


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
