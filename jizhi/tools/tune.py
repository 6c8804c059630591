"""The offline tuner: ``jizhictl tune`` (``tune_command``).

Runs in the operator's shell, never inside jizhid, and owns every jizhid it
starts. It answers one question for one pipeline and one load: which
deployment settings serve a request trace at a fixed offered rate with the
least server CPU per scored pair, under a p99 objective?

The settings it searches (``jizhi.tools.tunespace``): per worker group
its pool, batch and batch_wait_ms (the pools together at most 2 x cores),
per structured ``model_inference`` stage its item table, the hot tier's
budget, MALLOC_ARENA_MAX and, with a ``query_cache`` stage, its window; the
shipped default is a point of the space. An **evaluation** is one
measurement of ``jizhi.tools.testbed``: its own jizhid with the candidate
settings, full pools and the first hot tier, then one open-loop point at
``--rate`` (``--warmup`` + ``--duration`` seconds) with the CPU of every
process of the run read from /proc; the same requests at the same arrival
times every time, and nothing of the instance left in /dev/shm after.

The **objective** is server CPU-seconds per 1,000 pairs: the CPU time of
jizhid's processes (supervisor, broker, workers) over the measured window
divided by the goodput pairs (candidates that received a model score in OK
replies) of that window, x 1000. A point is **feasible** when its p99 is at
most ``--slo-p99`` ms and it has no error, nothing lost and every request
answered OK. An infeasible point is told to the optimizer as
``3 x the default's CPU (or twice its own, if more) x (1 + excess)``, excess
being how far p99 is over the objective (as a fraction, at most 1; 1 for
errors or a daemon that did not start), so the search learns both "worse"
and "how much worse".

The **search** is scikit-optimize's ask/tell ``Optimizer`` (a Gaussian-process
surrogate, the pool total as its ``space_constraint``). Evaluation 1 is the
shipped default, the next ``--initial-points - 1`` are random, the rest
follow the surrogate's acquisition. Every evaluated point is kept: the
solution path. The **chosen** setting is the feasible point with the least
CPU per 1,000 pairs (possibly the default).

The **comparison** measures the shipped default (the pipeline file and config
exactly as given) and the chosen setting (the overlay files as written)
alternately, ``--repeats`` times each (default, chosen, default, chosen, ...),
each with its own jizhid, and reports medians, min, max and spread (max - min)
of CPU per 1,000 pairs and p99, and the gain. A single search measurement
favours a lucky point; the alternating repeats are what the gain rests on.

Outputs in ``--out``: ``tune-report.json`` (inputs, environment, space, path,
chosen, comparison; rewritten after every evaluation), ``tune-settings.toml``
(the base config with the chosen settings; MALLOC_ARENA_MAX, an environment
variable, in its header), ``tune-pipeline.toml`` (the pipeline with the chosen
pool, batch and batch_wait_ms per group), ``tune-path.txt`` (the solution path
table) and ``evals/`` (each measurement's config, pipeline and jizhid log).
"""
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import click

from jizhi.tools.testbed import READY_TIMEOUT_S, Testbed
from jizhi.tools.tunespace import (ARENA, HOT_TIER, PIPELINE_FILE, SETTINGS_FILE, arena_advice, arena_from_env,
                                   search_space, write_overlay)

PENALTY_FACTOR = 3.0
REPORT = "tune-report.json"
PATH_TABLE = "tune-path.txt"


# ----------------------------------------------------------------------------
# The search and the comparison


def objective(rec, reference, slo_ms):
    """The value told to the optimizer for measurement ``rec``: CPU-s per 1,000
    pairs when feasible, else the penalty (see the module docstring)."""
    if rec.get("feasible") and rec.get("cpu_s_per_1000_pairs"):
        return rec["cpu_s_per_1000_pairs"]
    if rec.get("started") and not rec["errors"] and not rec["lost"] and rec.get("p99_ms") is not None:
        excess = min(1.0, max(0.0, rec["p99_ms"] / slo_ms - 1.0))
    else:
        excess = 1.0
    base = PENALTY_FACTOR * reference
    return round(max(base, 2.0 * (rec.get("cpu_s_per_1000_pairs") or 0.0)) * (1.0 + excess), 6)


def summarize(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "spread": None, "spread_pct": None}
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    return {"n": len(vals), "median": round(med, 6), "min": round(lo, 6), "max": round(hi, 6),
            "spread": round(hi - lo, 6), "spread_pct": round((hi - lo) / med * 100.0, 1) if med else None}


def compare(measurements):
    """Medians, ranges and the gain of the alternating default/chosen measurements."""
    out = {}
    for which in ("default", "chosen"):
        ms = [m for m in measurements if m["setting"] == which]
        out[which] = {"cpu_s_per_1000_pairs": summarize([m.get("cpu_s_per_1000_pairs") for m in ms]),
                      "p99_ms": summarize([m.get("p99_ms") for m in ms]),
                      "feasible": sum(1 for m in ms if m.get("feasible")), "measured": len(ms)}
    d, c = out["default"]["cpu_s_per_1000_pairs"], out["chosen"]["cpu_s_per_1000_pairs"]
    if d["median"] and c["median"] is not None:
        gain = d["median"] - c["median"]
        out["gain_cpu_s_per_1000_pairs"] = round(gain, 6)
        out["gain_pct"] = round(gain / d["median"] * 100.0, 1)
        if c["max"] < d["min"]:
            out["verdict"] = "the chosen setting used less CPU in every measurement than the default in any"
        elif c["min"] > d["max"]:
            out["verdict"] = "the chosen setting used more CPU in every measurement than the default in any"
        else:
            out["verdict"] = "the ranges overlap: the difference is within the run-to-run spread"
    else:
        out["gain_cpu_s_per_1000_pairs"] = out["gain_pct"] = None
        out["verdict"] = "no comparison: a setting scored nothing"
    return out


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def path_table(space, path):
    """The solution path as text lines: eval #, settings, CPU-s per 1,000 pairs, p99, feasible."""
    rows = [(str(e["eval"]) + (" (default)" if e["is_default"] else ""), space.label(e["settings"]),
             _num(e["measurement"].get("cpu_s_per_1000_pairs"), ".5f"), _num(e["measurement"].get("p99_ms"), ".1f"),
             ("yes" if e["measurement"].get("feasible") else
              "no" + (" (did not start)" if not e["measurement"].get("started") else
                      " (errors)" if e["measurement"].get("errors") or e["measurement"].get("lost") else "")),
             _num(e["objective"], ".5f")) for e in path]
    head = ("eval", "settings", "CPU-s/1000 pairs", "p99 ms", "feasible", "objective")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i in (0, 1, 4) else c.rjust(widths[i]) for i, c in enumerate(r))
    return [fmt(head)] + [fmt(r) for r in rows]


def comparison_lines(cmp, measurements, rate, slo_ms):
    lines = [f"comparison at {rate:g} requests/s, SLO p99 <= {slo_ms:g} ms, measured alternately:",
             f"  {'setting':<8} {'round':>5} {'CPU-s/1000 pairs':>17} {'p99 ms':>8} {'goodput pairs/s':>16} "
             f"{'errors':>8}  feasible"]
    for m in measurements:
        errs = sum((m.get("errors") or {}).values()) + (m.get("lost") or 0)
        lines.append(f"  {m['setting']:<8} {m['round']:>5} {_num(m.get('cpu_s_per_1000_pairs'), '.5f'):>17} "
                     f"{_num(m.get('p99_ms'), '.1f'):>8} {_num(m.get('goodput_pairs_s'), ',.0f'):>16} "
                     f"{errs if m.get('started') else '-':>8}  "
                     f"{'yes' if m.get('feasible') else 'no' if m.get('started') else 'no (did not start)'}")
    lines.append(f"  {'':<8} {'':>5} {'median':>10} {'min':>9} {'max':>9} {'spread':>9}   p99 median")
    for which in ("default", "chosen"):
        s, p = cmp[which]["cpu_s_per_1000_pairs"], cmp[which]["p99_ms"]
        lines.append(f"  {which:<8} {'':>5} {_num(s['median'], '.5f'):>10} {_num(s['min'], '.5f'):>9} "
                     f"{_num(s['max'], '.5f'):>9} {_num(s['spread'], '.5f'):>9}   {_num(p['median'], '.1f')} ms"
                     + (f" (spread {s['spread_pct']} %)" if s["spread_pct"] is not None else ""))
    if cmp["gain_cpu_s_per_1000_pairs"] is not None:
        lines.append(f"  gain: {cmp['gain_cpu_s_per_1000_pairs']:.5f} CPU-s per 1,000 pairs "
                     f"({cmp['gain_pct']:+.1f} % of the default's median); {cmp['verdict']}")
    else:
        lines.append(f"  {cmp['verdict']}")
    return lines


def run_tune(*, trace_path, slo_ms, rate, evals, duration_s, warmup_s, repeats, out_dir, models, pipeline,
             config_path, seed=1, initial_points=None, deadline_ms=1000.0, top_k=10, allow_repeat=False,
             ready_timeout_s=READY_TIMEOUT_S, max_other_cores=None, settle_s=60.0, retries=2, progress=False,
             echo=print, note=None):
    """The whole tune: search, overlay, comparison, report. Returns the report dict.

    ``echo`` prints the tables (stdout), ``note`` the progress lines (stderr).
    Raises click.ClickException when the shipped default does not start.
    """
    import tomllib
    import warnings

    from jizhi import config as config_mod
    from jizhi.ctl.inputs import Trace
    from jizhi.tools.bench import check_trace_length
    from jizhi.tools.procfs import environment
    from jizhi.errors import ConfigError, PipelineError
    from jizhi.pipeline import compile_pipeline, pipeline_path, read_pipeline

    note = note or echo
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings = config_mod.load(config_path)
    except ConfigError as e:
        raise click.ClickException(f"--config: {e}")
    base_doc = {}
    if config_path:
        with open(config_path, "rb") as f:
            base_doc = tomllib.load(f)
    models = models or settings["server.models"]
    if not models:
        raise click.UsageError("give --models (or server.models in --config)")
    pipeline = pipeline or settings["server.pipelines"][0]
    src_pipeline = pipeline_path(pipeline).resolve()
    try:
        doc = read_pipeline(str(src_pipeline))
        plan = compile_pipeline(doc, models)
    except PipelineError as e:
        raise click.ClickException(f"--pipeline: {e}")
    trace = Trace(trace_path)
    check_trace_length(trace, rate, duration_s, allow_repeat)
    cores = len(os.sched_getaffinity(0))
    space = search_space(plan, settings, cores, arena_from_env())
    n_init = initial_points or max(2, round(evals / 3))
    n_init = max(1, min(n_init, evals))
    report = {
        "status": "searching", "started": started, "command": sys.argv, "environment": environment(),
        "inputs": {"trace": str(trace_path), "trace_requests": len(trace),
                   "mean_candidates": round(trace.mean_candidates(), 1), "pipeline": str(src_pipeline),
                   "pipeline_name": plan["name"], "config": str(config_path) if config_path else None,
                   "models": str(models), "rate_rps": rate, "slo_p99_ms": slo_ms, "duration_s": duration_s,
                   "warmup_s": warmup_s, "evals": evals, "repeats": repeats, "seed": seed,
                   "initial_points": n_init, "cores": cores, "deadline_ms": deadline_ms, "top_k": top_k,
                   "max_other_cores": max_other_cores},
        "objective": "server CPU-seconds per 1,000 goodput pairs (supervisor + broker + workers, from /proc); "
                     f"infeasible (p99 > SLO, errors, lost): {PENALTY_FACTOR:g} x the default's x (1 + excess)",
        "space": space.describe(), "path": [], "chosen": None, "comparison": None,
        "files": {"report": str(out_dir / REPORT), "settings": str(out_dir / SETTINGS_FILE),
                  "pipeline": str(out_dir / PIPELINE_FILE), "path_table": str(out_dir / PATH_TABLE)},
    }

    def save():
        (out_dir / REPORT).write_text(json.dumps(report, indent=1, default=str))

    per_eval_s = duration_s + warmup_s + 15.0
    note(f"tune {plan['name']} ({', '.join(space.groups)}; {len(space.dims)} dimensions) at {rate:g} requests/s, "
         f"SLO p99 <= {slo_ms:g} ms: {evals} evaluations + {2 * repeats} comparison measurements of "
         f"{warmup_s:g} + {duration_s:g} s, about {(evals + 2 * repeats) * per_eval_s / 60:.0f} min")
    for n in space.notes:
        note(f"  note: {n}")
    if duration_s < 20.0:
        note(f"  note: {duration_s:g} s measured per point is shorter than the benchmark rule's 20 s")
    bed = Testbed(models=models, trace=trace, pipeline_name=plan["name"], rate=rate, slo_ms=slo_ms,
                  duration_s=duration_s, warmup_s=warmup_s, work_dir=out_dir, deadline_ms=deadline_ms,
                  top_k=top_k, allow_repeat=allow_repeat, ready_timeout_s=ready_timeout_s,
                  max_other_cores=max_other_cores, settle_s=settle_s, retries=retries, progress=progress, log=note)

    from skopt import Optimizer
    opt = Optimizer(space.skopt_dimensions(), base_estimator="GP", n_initial_points=n_init,
                    initial_point_generator="random", acq_func="gp_hedge", random_state=seed,
                    space_constraint=space.constraint)
    default = space.default
    reference = None
    cand_dir = out_dir / "evals"
    for i in range(1, evals + 1):
        if i == 1:
            point = default
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "evaluated before, using a random point": logged below
                point = space.from_x(opt.ask())
        tag = f"e{i:02d}"
        if i == 1:
            rec = bed.measure_settled(tag, src_pipeline, base_doc, None, point[HOT_TIER], early_stop=True)
        else:
            s_path, p_path = write_overlay(cand_dir / tag, space, point, base_doc, doc, f"evaluation {i}")
            with open(s_path, "rb") as f:
                cfg_doc = tomllib.load(f)
            rec = bed.measure_settled(tag, p_path, cfg_doc, point[ARENA], point[HOT_TIER], early_stop=True)
        if i == 1:
            if not rec["started"]:
                report["path"].append({"eval": 1, "is_default": True, "settings": point, "objective": None,
                                       "measurement": rec})
                report["status"] = "failed: the shipped default did not start"
                save()
                raise click.ClickException(f"the shipped default did not start: {rec['error']}")
            reference = rec.get("cpu_s_per_1000_pairs") or 1.0
            if not rec["feasible"]:
                note(f"  warning: the shipped default misses the objective at {rate:g} requests/s (p99 "
                     f"{rec['p99_ms']} ms, errors {rec['errors'] or 0}, lost {rec['lost']}): give a --rate of "
                     f"70-80 % of its maximum (jizhictl bench --find-max)")
        y = objective(rec, reference, slo_ms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.tell(space.to_x(point), y)
        report["path"].append({"eval": i, "is_default": point == default, "settings": point, "objective": y,
                               "measurement": rec})
        feasible = [e for e in report["path"] if e["measurement"].get("feasible")]
        best = min(feasible, key=lambda e: e["measurement"]["cpu_s_per_1000_pairs"]) if feasible else None
        m = rec
        note(f"[{i:>2}/{evals}] {space.label(point)} -> "
             + (f"{_num(m.get('cpu_s_per_1000_pairs'), '.5f')} CPU-s/1000 pairs, p99 {_num(m.get('p99_ms'), '.1f')} ms, "
                f"{'feasible' if m['feasible'] else 'INFEASIBLE'}" if m["started"] else
                f"did not start: {m['error'].splitlines()[0]}")
             + (f"  (best: #{best['eval']} {best['measurement']['cpu_s_per_1000_pairs']:.5f})" if best else ""))
        save()

    table = path_table(space, report["path"])
    (out_dir / PATH_TABLE).write_text("\n".join(table) + "\n")
    echo("")
    echo(f"solution path ({plan['name']} at {rate:g} requests/s, SLO p99 <= {slo_ms:g} ms; objective = CPU-s per "
         f"1,000 pairs, or the penalty when infeasible):")
    for line in table:
        echo("  " + line)

    feasible = [e for e in report["path"] if e["measurement"].get("feasible")]
    if not feasible:
        report["status"] = "done: no evaluated point met the objective"
        save()
        raise click.ClickException(f"no evaluated point met p99 <= {slo_ms:g} ms without errors at {rate:g} "
                                   f"requests/s: lower --rate (70-80 % of the default's maximum from "
                                   f"jizhictl bench --find-max). The path is in {out_dir / REPORT}")
    best = min(feasible, key=lambda e: e["measurement"]["cpu_s_per_1000_pairs"])
    chosen = best["settings"]
    s_path, p_path = write_overlay(out_dir, space, chosen, base_doc, doc,
                                   f"evaluation {best['eval']} of {evals} ({'the shipped default' if best['is_default'] else 'chosen'}), "
                                   f"{rate:g} requests/s, SLO p99 <= {slo_ms:g} ms, {started}")
    report["chosen"] = {"eval": best["eval"], "is_default": best["is_default"], "settings": chosen,
                        "changed": {k: [default[k], chosen[k]] for k in space.names if chosen[k] != default[k]},
                        "arena_advice": arena_advice(chosen[ARENA])}
    echo("")
    echo(f"chosen: evaluation {best['eval']}" + (" (the shipped default: no evaluated point used less CPU)"
                                                  if best["is_default"] else ""))
    for k, (a, b) in report["chosen"]["changed"].items():
        echo(f"  {k}: {a if k != ARENA else (a or 'unset')} -> {b if k != ARENA else (b or 'unset')}")
    echo(f"  written: {s_path}, {p_path}")
    save()

    with open(s_path, "rb") as f:
        chosen_cfg = tomllib.load(f)
    measurements = []
    for r in range(1, repeats + 1):
        for which in ("default", "chosen"):
            tag = f"c{r}-{which}"
            if which == "default":
                rec = bed.measure_settled(tag, src_pipeline, base_doc, None, default[HOT_TIER])
            else:
                rec = bed.measure_settled(tag, p_path, chosen_cfg, chosen[ARENA], chosen[HOT_TIER])
            rec.update(setting=which, round=r)
            measurements.append(rec)
            note(f"[compare {r}/{repeats}] {which:<7} -> "
                 + (f"{_num(rec.get('cpu_s_per_1000_pairs'), '.5f')} CPU-s/1000 pairs, p99 "
                    f"{_num(rec.get('p99_ms'), '.1f')} ms" if rec["started"] else "did not start"))
            report["comparison"] = {"measurements": measurements}
            save()
    cmp = compare(measurements)
    report["comparison"] = dict(cmp, measurements=measurements)
    report["status"] = "done"
    report["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    save()
    echo("")
    for line in comparison_lines(cmp, measurements, rate, slo_ms):
        echo(line)
    echo(f"report: {out_dir / REPORT}")
    return report


# ----------------------------------------------------------------------------
# The command


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Request trace to replay (trace.npz, docs/formats.md); it should hold at least "
                   "--rate x --duration requests (no request repeats within a point).")
@click.option("--slo-p99", "slo_ms", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="Latency objective, ms: a point is feasible with p99 <= this, no error and nothing lost.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Offered load, requests/s, the same for every measurement. Give 70-80 % of the shipped "
                   "default's maximum (jizhictl bench --find-max, --slo-ms the same): CPU per pair is then "
                   "compared at a load the default meets, and p99 is checked under it.")
@click.option("--evals", type=click.IntRange(1), default=20, show_default=True,
              help="Evaluations in the search (the first is the shipped default).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Seconds measured per evaluation (the benchmark rule: at least 20).")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds of the same load before each measured window, not counted.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Final comparison: measurements of the default and of the chosen setting each, alternating.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output directory: tune-report.json, tune-settings.toml, tune-pipeline.toml, tune-path.txt, evals/.")
@click.option("--models", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model directory <models>/<name>/<version>/ [default: server.models of --config].")
@click.option("--pipeline", default=None,
              help="Pipeline to tune: a name in etc/pipelines or a .toml path [default: the first of "
                   "server.pipelines of --config].")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Base jizhi.toml: the shipped default's settings, and the base of tune-settings.toml "
                   "[default: built-in defaults].")
@click.option("--seed", type=int, default=1, show_default=True, help="Random state of the optimizer.")
@click.option("--initial-points", type=click.IntRange(1), default=None,
              help="Evaluations before the surrogate model steers (the default counts as one) "
                   "[default: a third of --evals, at least 2].")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Deadline sent with every request; no reply within deadline + 1 s counts as lost.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--allow-repeat", is_flag=True, help="Allow a trace shorter than --rate x --duration.")
@click.option("--ready-timeout", "ready_timeout_s", type=click.FloatRange(min=1), default=READY_TIMEOUT_S,
              show_default=True, help="Seconds a started jizhid may take to serve with full pools.")
@click.option("--max-other-cores", type=click.FloatRange(min=0), default=None,
              help="A shared machine: before each measurement wait until other processes use at most this many "
                   "cores, and measure again when they used more while it ran.")
@click.option("--settle-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="--max-other-cores: longest wait for a quiet machine before a measurement.")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="--max-other-cores: how often a disturbed measurement is repeated.")
@click.option("--quiet", is_flag=True, help="No live load line on stderr (the line per evaluation stays).")
def tune_command(trace_path, slo_ms, rate, evals, duration_s, warmup_s, repeats, out_dir, models, pipeline,
                 config_path, seed, initial_points, deadline_ms, top_k, allow_repeat, ready_timeout_s,
                 max_other_cores, settle_s, retries, quiet):
    """Search the deployment settings that serve a trace with the least CPU
    per pair under a p99 objective, offline, against real jizhid runs.

    Each evaluation starts its own jizhid (a fresh instance, free port,
    metrics off) with candidate settings, waits for full pools and the hot
    tier, replays the trace open loop at --rate for --warmup + --duration
    seconds and measures the server's CPU-seconds per 1,000 scored pairs
    (every jizhid process, from /proc) and the p99 latency; then stops it
    and checks /dev/shm. Run it on a quiet machine: other load inflates the
    CPU and latency figures (each record notes other processes' cores).

    \b
    Searched (scikit-optimize, a Gaussian process, ask/tell):
      per worker group: pool 1..2 x cores, batch 1/2/4/8/16/32,
                        batch_wait_ms 0..5 (pools together <= 2 x cores)
      cube.hot_tier_mb  0 (off)/64/256/1024
      MALLOC_ARENA_MAX  1/2/4/unset (jizhid's environment)
      qcache.window_s   10..300 s (pipelines with a query_cache stage)
    The shipped default's values join the lists; evaluation 1 is the
    default. A point is feasible with p99 <= --slo-p99, no error, nothing
    lost; an infeasible one counts as 3 x the default's CPU x (1 + how far
    p99 is over, up to 1). The chosen setting is the feasible point with the
    least CPU per 1,000 pairs.

    Then the default (files as given) and the chosen setting (the overlay
    files as written) are measured alternately --repeats times each; the
    report gives medians, min, max and spread, and the gain.

    \b
    Writes in --out: tune-settings.toml (the base config with the chosen
    settings; MALLOC_ARENA_MAX advice in its header), tune-pipeline.toml
    (the pipeline with the chosen pool/batch/batch_wait_ms), tune-report.json
    (everything, rewritten after every evaluation), tune-path.txt (the
    solution path) and evals/ (each run's config, pipeline and jizhid log).
    Time: about (--evals + 2 x --repeats) x (--warmup + --duration + 15 s).

    \b
      jizhictl bench --trace trace.npz --find-max --pipeline demo   # on a served default: its max
      jizhictl tune --models models --trace trace.npz --pipeline demo \\
          --rate 250 --slo-p99 50 --evals 16 --repeats 3 --out tune/
    """
    run_tune(trace_path=trace_path, slo_ms=slo_ms, rate=rate, evals=evals, duration_s=duration_s,
             warmup_s=warmup_s, repeats=repeats, out_dir=out_dir, models=models, pipeline=pipeline,
             config_path=config_path, seed=seed, initial_points=initial_points, deadline_ms=deadline_ms,
             top_k=top_k, allow_repeat=allow_repeat, ready_timeout_s=ready_timeout_s,
             max_other_cores=max_other_cores, settle_s=settle_s, retries=retries,
             progress=not quiet and sys.stderr.isatty(), echo=click.echo,
             note=lambda s: click.echo(s, err=True))


if __name__ == "__main__":
    tune_command(prog_name="python -m jizhi.tools.tune")
