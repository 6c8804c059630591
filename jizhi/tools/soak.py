"""The soak run: ``python -m jizhi.tools.soak`` (a benchmark, not a CI test).

Drives a running jizhid with open-loop Poisson load at a fixed rate (70% of
the measured capacity, say) for a long time, as consecutive load points of
``jizhictl bench`` (jizhi/tools/bench.py, on jizhi/tools/loadgen.py's
generator), and records per window p50/p99, errors and
the RSS of every process of the run (found through ``--run-dir``). The report
answers: did any process's memory grow without bound, did p99 drift, were
there errors. Requests repeat within the run when the trace is shorter than
rate x duration (there is no query cache yet for a repeat to hit).
"""
import json
import sys
import time

import click

from jizhi.ctl.inputs import Trace
from jizhi.tools.bench import LoadGenerator
from jizhi.tools.procfs import ServerCpu
from jizhi.stats import rss_bytes


def rss_by_process(cpu):
    """{"kind pid": rss MiB} of the run's processes."""
    out = {}
    for pid, kind in sorted(cpu.processes().items(), key=lambda kv: kv[1]):
        out[f"{kind} {pid}"] = round(rss_bytes(pid) / 2 ** 20, 1)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default="tcp://127.0.0.1:5555", show_default=True)
@click.option("--pipeline", default="default", show_default=True)
@click.option("--trace", "trace_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--rate", type=float, required=True, help="Offered load, requests/s.")
@click.option("--minutes", default=10.0, show_default=True, help="Length of the run.")
@click.option("--window-s", default=60.0, show_default=True, help="Seconds per reported window.")
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="jizhid's run directory (to find its processes).")
@click.option("--deadline-ms", default=1000.0, show_default=True)
@click.option("--slo-ms", default=50.0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
def main(endpoint, pipeline, trace_path, rate, minutes, window_s, run_dir, deadline_ms, slo_ms, json_path):
    """Soak a running jizhid at a fixed rate; report RSS per process, p99 drift and errors."""
    trace = Trace(trace_path)
    cpu = ServerCpu(run_dir)
    gen = LoadGenerator(endpoint, trace, deadline_ms=deadline_ms, top_k=10, slo_ms=slo_ms, cpu=cpu,
                        progress=False, allow_repeat=True)
    windows = int(round(minutes * 60 / window_s))
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rss_mib": rss_by_process(cpu)}
    rows = []
    click.echo(f"soak: {pipeline} at {rate:g} req/s for {windows} x {window_s:g} s", err=True)
    for i in range(windows):
        r = gen.run_point(pipeline, rate, window_s, 2.0 if i == 0 else 0.0)
        row = {"window": i + 1, "ok_rps": r["ok_rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
               "p999_ms": r.get("p99_9_ms"), "errors": r["errors"], "lost": r["lost"],
               "rss_mib": rss_by_process(cpu)}
        rows.append(row)
        click.echo(f"  window {i + 1:>2}: ok {r['ok_rps']:.1f}/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
                   f"errors {r['errors'] or 0} lost {r['lost']}", err=True)
    gen.close()
    end_rss = rows[-1]["rss_mib"] if rows else {}
    report = {"pipeline": pipeline, "rate": rate, "minutes": minutes, "start": start, "windows": rows,
              "end": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rss_mib": end_rss}}
    p99 = [w["p99_ms"] for w in rows if w["p99_ms"] is not None]
    report["p99_first_ms"], report["p99_last_ms"] = (p99[0], p99[-1]) if p99 else (None, None)
    report["errors_total"] = sum(sum(w["errors"].values()) for w in rows)
    report["lost_total"] = sum(w["lost"] for w in rows)
    click.echo(f"\n{'process':<34} {'RSS start MiB':>14} {'RSS end MiB':>12}")
    for k in sorted(set(start["rss_mib"]) | set(end_rss)):
        click.echo(f"{k:<34} {start['rss_mib'].get(k, '-'):>14} {end_rss.get(k, '-'):>12}")
    click.echo(f"p99 first window {report['p99_first_ms']} ms, last {report['p99_last_ms']} ms; "
               f"errors {report['errors_total']}, lost {report['lost_total']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
