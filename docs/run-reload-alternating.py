#!/usr/bin/env python
"""A reload that does not show (issue 23): p99 while a new version is published, against the same
load with no publish, in alternating runs; the rename-to-switch times; the extra memory.

    .venv/bin/python docs/run-reload-alternating.py --find-max          # the full run (~25 min)
    .venv/bin/python docs/run-reload-alternating.py --rate 160 --runs 5 --duration 90 --publish-at 20,55

Every figure from one jizhid, on a quiet machine (nothing else running):

1. The demo bundle (--base, ``init_demo``'s version 1; made if missing) is hard-linked into a private
   model directory, --work/models/demo/1 (made anew on every invocation, so versions start at 2), and
   served by ``etc/pipelines/demo.toml`` (the five stages fused, pool 2, batch 8, wait 3 ms) in one
   jizhid (docs/run-many-models-bench.py's ``Daemon``; run directory --work/run-ralt). The trace
   (--trace: 30,000 requests of 500 candidates, ``generate_trace``; made if missing) is replayed.
2. The rate: --rate, or --find-max: ``python -m jizhi.tools.bench --find-max`` against that jizhid as
   docs/run-benchmarks.sh step 3 runs it (p99 <= 50 ms, no error, 20 s points, other processes
   <= --max-other-cores), then --fraction (0.5) of the maximum it finds.
3. 2 x --runs runs, alternating (--first): a *reload* run and a *no-reload* run. Every run offers the
   same load: open-loop Poisson arrivals at the rate for --duration s, the same arrival times and the
   same requests (the trace's rows from 0, ``ReloadLoad`` of jizhi/tools/reloadbench.py with the
   same --seed: one DEALER socket, deadline 1000 ms, top_k 10), latency from each request's intended
   send time, *lost* for no reply within deadline + 1 s. In a reload run, at each --publish-at
   offset from the load's start (20 s and 55 s), this script runs the real CLI as the README shows
   it, ``jizhictl demo publish MODELS --to N --seed N`` (a subprocess: it copies version 1 into
   MODELS/.incoming with new dense weights, hashes it and renames it into MODELS/demo/N); the
   version numbers keep increasing across runs. A thread polls for MODELS/demo/N every 10 ms: the
   *rename* instant is the first poll that sees it (it happened at most one poll interval before);
   the command's own start and end are recorded. A no-reload run publishes nothing and is measured
   in the same windows.
4. Per publish, the *window*: the --window (10 s) of requests intended from the publish command's
   start (no-reload runs: from the same offset). Its p99 is compared with the p99 of the no-reload
   runs' requests in the same window, pooled over those runs: the ratio per publish (target <= 1.3),
   the median of the ratios, the pooled ratio (every reload window's requests against every
   no-reload window's) and the largest. The no-reload runs against the pool of the *other*
   no-reload runs give the ratio's noise floor on this machine. --long-window S: the same ratios over S
   seconds from each publish too (with paced loading work, models.load_pace, the switch comes long after
   the 10 s; S should hold it).
5. Per publish: rename to the first reply by the new version (each reply's ``model_versions``),
   rename to the server's switch (``serving_since`` from ``jizhictl models --json``, read after the
   run; also the server's own rename-to-switch, ``timings_ms.total``, from the directory's ctime,
   and its phases), rename to the old version's release (``standby``, from the control socket polled
   every --state-poll-s in every run, reload or not, so both kinds carry the same polling).
6. Memory: ``procfs.MemorySampler`` over the process tree of the jizhid supervisor (RSS every 0.1 s,
   PSS from smaps_rollup every 0.5 s) in every run. The run's baseline is the median from 3 s after
   the load's start to the first publish offset; per publish, the peak from the command's start to
   the next publish (or the run's end) minus that baseline: *peak extra* PSS and RSS (anonymous and
   /dev/shm too). No-reload runs get the same figures, the memory's own noise. The publish command
   is not in jizhid's tree; its CPU (this process's reaped children) is taken out of a window's
   "other cores" (the machine's CPU but jizhid's tree and this process), and a run whose baseline or
   window still had more than --max-other-cores of other load is named in a warning.
7. Between runs: the previous switch has fully finished (one version serving, every other one
   standby or refused/rejected/failed, per the control socket's ``models``; and jizhid's tree holds
   only its supervisor, broker and the serving version's workers: no validation child, no hot tier
   build), --pause s, then the machine is quiet (``procfs.wait_for_quiet``: other processes below
   --max-other-cores, waiting at most --settle-s).

Writes --out (JSON: every run's windows, counts, errors and lost, rename timings, memory, a 0.5 s
latency timeline) and prints the exact command line, the date, the machine
(``procfs.environment()``), the commit, and the summary. The daemon is always stopped; no process
and no /dev/shm/jizhi.<instance>.* segment is left behind.
"""
import argparse
import importlib.util
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

spec = importlib.util.spec_from_file_location("mm", REPO / "docs" / "run-many-models-bench.py")
mm = importlib.util.module_from_spec(spec)     # its Daemon: start a jizhid, jizhictl against it, stop it
spec.loader.exec_module(mm)

from jizhi import control                                                           # noqa: E402
from jizhi.ctl.inputs import Trace                                                  # noqa: E402
from jizhi.tools.loadgen import LOST, OK, PROGRESS_INTERVAL_S, Progress, load_socket      # noqa: E402
from jizhi.tools.procfs import MemorySampler, ServerCpu, environment, wait_for_quiet   # noqa: E402
from jizhi.tools.reloadbench import ReloadLoad                                      # noqa: E402
from jizhi.tools.reloadreport import WARMUP_S, latency_stats, memory_window, timeline   # noqa: E402

MODEL = PIPELINE = "demo"
NAME = "ralt"                       # the Daemon's run directory run-ralt, instance mmralt
DONE = ("standby", "rejected", "refused", "failed", "removed")    # no work left for a version
SERVED = ("serving", "draining", "stopping", "standby")           # it has served
MEM_KEYS = ("pss_mib", "rss_mib", "anon_mib", "shm_mib")
BIN = Path(sys.executable).parent


def log(s=""):
    print(s, flush=True)


# ----------------------------------------------------------------------------
# The daemon


def start_daemon(work, port, load_pace=None):
    """run-many-models-bench's Daemon (nothing left behind, even when it never gets ready) on demo.toml;
    ``load_pace``: models.load_pace (None: the setting's default)."""
    config = f"[models]\nload_pace = {load_pace}\n" if load_pace is not None else ""
    return mm.Daemon(work, NAME, port, [REPO / "etc" / "pipelines" / "demo.toml"], config=config)


def versions_now(run_dir):
    """{version: summary} of the model, from the control socket."""
    try:
        m = control.call(run_dir, "models", timeout_s=5.0)
    except (ConnectionError, control.ControlError) as e:
        raise SystemExit(f"jizhid stopped answering on its control socket: {e}")
    return {v["version"]: v for v in m[MODEL]["versions"]}


def wait_settled(d, sup_pid, instance, timeout_s):
    """Wait until one version serves, every other one has no work left (standby, refused, ...) and
    jizhid's tree holds only its supervisor, broker and the serving version's workers. Returns
    (the serving version, seconds waited); SystemExit after ``timeout_s``."""
    t = time.monotonic()
    probe = MemorySampler(sup_pid, instance)
    while True:
        vs = versions_now(d.run_dir)
        serving = [v for v, s in vs.items() if s["state"] == "serving"]
        busy = {v: s["state"] for v, s in vs.items() if s["state"] not in DONE and s["state"] != "serving"}
        extra = set()
        if len(serving) == 1 and not busy:
            extra = probe.roles_now() - {"supervisor", "broker", f"workers v{serving[0]}"}
            if not extra:
                return serving[0], round(time.monotonic() - t, 1)
        if time.monotonic() - t > timeout_s:
            raise SystemExit(f"jizhid did not settle within {timeout_s:g} s: serving {serving}, busy {busy}, "
                             f"processes {sorted(extra)}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------
# Beside the load: the publishes and the version states


class Publisher(threading.Thread):
    """At each (monotonic time, version) of ``plan``, runs ``jizhictl demo publish MODELS --to N --seed N``
    and polls every ``poll_s`` for MODELS/demo/N: per publish the command's start and end, its exit
    code and output, and the rename instant (the first poll that saw the directory, and the last that
    did not)."""

    def __init__(self, models, plan, loop, timeout_s, poll_s=0.01):
        super().__init__(name="publisher", daemon=True)
        self.models, self.plan, self.loop, self.timeout_s, self.poll_s = models, plan, loop, timeout_s, poll_s
        self.records = []
        self.cancel = threading.Event()
        self.proc = None
        self.pace = None        # the command's --pace (None: its default)

    def run(self):
        try:
            for t, version in self.plan:
                if self.cancel.wait(max(0.0, t - time.monotonic())):
                    return
                self.publish(version)
        except Exception as e:   # said in the run's record; the load goes on
            self.records.append({"error": f"{type(e).__name__}: {e}"})

    def publish(self, version):
        target = self.models / MODEL / str(version)
        cmd = [str(BIN / "jizhictl"), "demo", "publish", str(self.models), "--to", str(version), "--seed", str(version)]
        if self.pace is not None:
            cmd += ["--pace", f"{self.pace:g}"]
        rec = {"version": version, "command": shlex.join(cmd), "t_cmd_start": time.monotonic(),
               "t_cmd_start_wall": time.time(), "t_rename": None, "t_rename_wall": None, "t_not_yet": None,
               "t_cmd_end": None, "rc": None}
        self.records.append(rec)
        self.loop.phase = f"publishing v{version}"
        # The command's CPU: this process's reaped children before and after (no other child runs meanwhile).
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        end = rec["t_cmd_start"] + self.timeout_s
        last_absent = rec["t_cmd_start"]
        while True:
            now = time.monotonic()
            if target.is_dir():
                rec.update(t_rename=now, t_rename_wall=time.time(), t_not_yet=last_absent)
                self.loop.phase = f"v{version} renamed"
                break
            last_absent = now
            if self.proc.poll() is not None and not target.is_dir():
                break   # the command ended without the version appearing
            if now > end or self.cancel.wait(self.poll_s):
                break
        try:
            out, err = self.proc.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            err += f"\n(killed after {self.timeout_s:g} s)"
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rec.update(t_cmd_end=time.monotonic(), rc=self.proc.returncode, stdout=out.strip(), stderr=err.strip()[-2000:],
                   cpu_s=round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 3))

    def kill(self):
        """Stop: no further publish, the running command killed (by its pid)."""
        self.cancel.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


class StateWatch(threading.Thread):
    """Polls the control socket's ``models`` every ``period_s``: per version, its state changes
    [(monotonic time, state)]."""

    def __init__(self, run_dir, period_s):
        super().__init__(name="state-watch", daemon=True)
        self.run_dir, self.period_s = run_dir, period_s
        self.seen = {}
        self.failures = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(self.period_s):
            try:
                m = control.call(self.run_dir, "models", timeout_s=5.0)[MODEL]
            except (ConnectionError, control.ControlError, KeyError):
                self.failures += 1
                continue
            now = time.monotonic()
            for v in m["versions"]:
                seq = self.seen.setdefault(v["version"], [])
                if not seq or seq[-1][1] != v["state"]:
                    seq.append((now, v["state"]))

    def first(self, version, state, after):
        return next((t for t, s in self.seen.get(version, []) if s == state and t >= after), None)


# ----------------------------------------------------------------------------
# One run


def ok_latency_ms(loop, a, b):
    """Latencies (ms from the intended send time) of the OK replies to requests intended in [a, b)."""
    due = loop.t0 + loop.due_rel
    sel = (due >= a) & (due < b) & (loop.status == OK)
    return (loop.done_at[sel] - due[sel]) * 1000.0


def ms(x):
    return None if x is None else round(x * 1000.0, 1)


def one_run(d, a, trace, rate, kind, index, sup_pid, instance, next_version, serving):
    """One run of --duration s of load; with kind "reload", a publish at each --publish-at offset.
    Returns (its record, {window index: OK latencies}, the next version number, the version serving after)."""
    models = d.run_dir.parent / "models"
    sock = load_socket(d.endpoint)
    loop = ReloadLoad(sock, trace, pipeline=PIPELINE, model=MODEL, rate=rate, seed=a.seed, horizon_s=a.duration,
                      deadline_ms=a.deadline_ms, top_k=a.top_k)
    loop.phase = kind
    sampler = MemorySampler(sup_pid, instance, a.sample_interval_s, a.pss_interval_s)
    watch = StateWatch(d.run_dir, a.state_poll_s)
    t0 = time.monotonic() + 1.0     # the sampler's first second is before the load
    versions = list(range(next_version, next_version + len(a.publish_at))) if kind == "reload" else []
    pub = Publisher(models, [(t0 + p, v) for p, v in zip(a.publish_at, versions)], loop, a.publish_timeout)
    pub.pace = a.load_pace
    progress = Progress(sys.stderr.isatty())
    if progress.enabled:
        loop.every(PROGRESS_INTERVAL_S, lambda now: progress.show(f"run {index} {kind:<6} " + loop.progress_line(now),
                                                                   force=True))
    t0_wall = time.time() + (t0 - time.monotonic())
    sampler.start()
    watch.start()
    pub.start()
    try:
        loop.run(t0)
        t_end = time.monotonic()
        pub.join(a.publish_timeout)     # (a command still running when the load ended)
    finally:
        pub.kill()
        pub.join(10.0)
        watch.halt.set()
        sampler.stop()
        watch.join(10.0)
        sampler.join(10.0)
        sock.close(0)
        if progress.enabled:
            progress.show("", force=True)
            progress.done()
    # The switch finishes (the server's timings are final) before the figures are read.
    now_serving, settle_s = wait_settled(d, sup_pid, instance, a.settle_timeout)
    final = {v["version"]: v for v in json.loads(d.ctl("models", MODEL, "--json"))[MODEL]["versions"]}

    rec = {"run": index, "kind": kind, "t0_wall": round(t0_wall, 3), "serving_at_start": serving,
           "serving_at_end": now_serving, "settled_after_s": settle_s, "rate": rate,
           "sent": int(loop.sent), "errors": dict(loop.codes), "lost": int((loop.status == LOST).sum()),
           "load_s": round(t_end - t0, 2)}
    rec["ok"] = int((loop.status == OK).sum())
    pre_a, pre_b = t0 + WARMUP_S, t0 + a.publish_at[0]
    rec["pre_publish"] = latency_stats(loop, pre_a, pre_b)
    rec["pre_publish"]["other_cores"] = sampler.other_cores(pre_a, pre_b)
    rec["whole_run"] = latency_stats(loop, t0 + WARMUP_S, t0 + a.duration)
    baseline = memory_window(sampler, pre_a, pre_b)
    rec["memory_baseline"] = baseline

    starts = []
    for k, p in enumerate(a.publish_at):
        r = pub.records[k] if k < len(pub.records) else None
        starts.append(r["t_cmd_start"] if r and r.get("t_cmd_start") else t0 + p)
    raw, windows, old = {}, [], serving
    for k, p in enumerate(a.publish_at):
        w0 = starts[k]
        w1 = w0 + a.window
        raw[k] = ok_latency_ms(loop, w0, w1)
        if a.long_window:
            raw[("long", k)] = ok_latency_ms(loop, w0, w0 + a.long_window)
        w = {"publish": k + 1, "at_s": p, "start_s": round(w0 - t0, 3)}
        w.update(latency_stats(loop, w0, w1))
        w["other_cores"] = w["other_cores_but_publish"] = sampler.other_cores(w0, w1)
        m_end = starts[k + 1] if k + 1 < len(starts) else t_end
        peak = memory_window(sampler, w0, m_end, t_ref=w0, how="peak")
        w["memory_peak"] = peak
        w["memory_peak_extra"] = ({key: (round(peak[key] - baseline[key], 1) if peak.get(key) is not None
                                         and baseline.get(key) is not None else None) for key in MEM_KEYS}
                                  if peak and baseline else None)
        if kind == "reload" and k < len(pub.records) and "version" in pub.records[k]:
            r = pub.records[k]
            v = r["version"]
            srv = final.get(v) or {}
            w.update(version=v, old_version=old, command=r["command"], rc=r["rc"],
                     command_output=r.get("stdout") or r.get("stderr"), state_after=srv.get("state"),
                     error=srv.get("error"))
            w["t_cmd_start_s"] = round(r["t_cmd_start"] - t0, 3)
            w["cmd_cpu_s"] = r.get("cpu_s")
            if w["other_cores"] is not None and r.get("cpu_s") is not None:    # (the command runs within the window)
                w["other_cores_but_publish"] = round(max(0.0, w["other_cores"] - r["cpu_s"] / a.window), 2)
            w["t_cmd_end_s"] = None if r["t_cmd_end"] is None else round(r["t_cmd_end"] - t0, 3)
            tr = r["t_rename"]
            if tr is not None:
                answered = (loop.version == v) & (loop.status == OK)
                released = watch.first(old, "standby", tr)
                serving_seen = watch.first(v, "serving", tr)
                since = srv.get("serving_since")
                prev_released = (windows[-1].get("t_released") if windows else None)
                w.update({
                    "rename_s": round(tr - t0, 3),
                    "rename_poll_uncertainty_ms": ms(tr - r["t_not_yet"]),
                    "cmd_start_to_rename_ms": ms(tr - r["t_cmd_start"]),
                    "cmd_ms": None if r["t_cmd_end"] is None else ms(r["t_cmd_end"] - r["t_cmd_start"]),
                    "rename_to_first_reply_ms": ms(float(np.min(loop.done_at[answered])) - tr) if answered.any()
                    else None,
                    "rename_to_switch_ms": ms(since - r["t_rename_wall"]) if since else None,
                    "server_rename_to_switch_ms": (srv.get("timings_ms") or {}).get("total"),
                    "server_timings_ms": srv.get("timings_ms"),
                    "rename_ctime_vs_polled_ms": ms(srv["renamed_at"] - r["t_rename_wall"])
                    if srv.get("renamed_at") else None,
                    "rename_to_serving_seen_ms": ms(serving_seen - tr) if serving_seen else None,
                    "rename_to_released_ms": ms(released - tr) if released else None,
                    "t_released": released,
                    "previous_released_before_publish": None if k == 0 else bool(
                        prev_released is not None and prev_released <= r["t_cmd_start"]),
                })
            if srv.get("serving_since"):
                old = v
        windows.append(w)
    for w in windows:
        w.pop("t_released", None)
    rec["windows"] = windows
    # Other load above --max-other-cores in the baseline or a window (the publish command's own CPU aside).
    rec["noisy"] = [name for name, oc in [("pre", rec["pre_publish"]["other_cores"])]
                    + [(f"w{w['publish']}", w["other_cores_but_publish"]) for w in windows]
                    if oc is not None and oc > a.max_other_cores]
    rec["publisher_error"] = next((x["error"] for x in pub.records if "error" in x), None)
    rec["states_seen"] = {str(v): [[round(t - t0, 2), s] for t, s in seq] for v, seq in watch.seen.items()
                          if len(seq) > 1 or v in versions}
    rec["state_poll_failures"] = watch.failures
    rec["sampler"] = {"samples": len(sampler.samples), "pss_samples": len(sampler.pss), "cpu_s": round(sampler.cpu_s, 3)}
    rec["latency_timeline"] = timeline(loop)
    return rec, raw, next_version + len(versions), now_serving


# ----------------------------------------------------------------------------
# The summary


def p99(x):
    return round(float(np.percentile(x, 99)), 2) if x.shape[0] else None


def ratio(x, y):
    return round(x / y, 3) if x is not None and y else None


def window_ratios(runs, raws, a, key):
    """Per publish, the p99 of its window (``raws[run][key(k)]``, the OK latencies) against the pooled
    no-reload p99 of the same window: (the no-reload pool per publish, the per-publish rows, and the
    median, largest and pooled ratios with the pooled p99s and whether every publish met --target)."""
    nk = len(a.publish_at)
    none_idx = [i for i, r in enumerate(runs) if r["kind"] == "none"]
    rel_idx = [i for i, r in enumerate(runs) if r["kind"] == "reload"]
    pool = {k: np.concatenate([raws[i][key(k)] for i in none_idx] or [np.zeros(0)]) for k in range(nk)}
    per = [{"run": runs[i]["run"], "publish": k + 1, "p99_ms": p99(raws[i][key(k)]), "none_p99_ms": p99(pool[k]),
            "ratio": ratio(p99(raws[i][key(k)]), p99(pool[k]))} for i in rel_idx for k in range(nk)]
    rs = [x["ratio"] for x in per if x["ratio"] is not None]
    all_rel = np.concatenate([raws[i][key(k)] for i in rel_idx for k in range(nk)] or [np.zeros(0)])
    all_none = np.concatenate([pool[k] for k in range(nk)])
    return pool, per, {"ratio_median": round(float(np.median(rs)), 3) if rs else None, "ratio_max": max(rs) if rs else None,
                       "ratio_pooled": ratio(p99(all_rel), p99(all_none)), "reload_pooled_p99_ms": p99(all_rel),
                       "none_pooled_p99_ms": p99(all_none), "target_met": bool(rs) and all(x <= a.target for x in rs)}


def summarize_long(runs, raws, a):
    """The same ratios over --long-window s from each publish (the switch inside it)."""
    _, per, stats = window_ratios(runs, raws, a, lambda k: ("long", k))
    return {"window_s": a.long_window, "per_publish": per, **stats}


def summarize(runs, raws, a):
    """Per publish, its window's p99 against the pooled no-reload p99 of the same window."""
    nk = len(a.publish_at)
    none_idx = [i for i, r in enumerate(runs) if r["kind"] == "none"]
    rel_idx = [i for i, r in enumerate(runs) if r["kind"] == "reload"]
    pool, per, stats = window_ratios(runs, raws, a, lambda k: k)
    out = {"target_ratio": a.target, "none_pooled_p99_ms": {str(k + 1): p99(pool[k]) for k in range(nk)},
           "per_publish": [], "none_against_other_none": []}
    for row in per:
        w = runs[next(i for i in rel_idx if runs[i]["run"] == row["run"])]["windows"][row["publish"] - 1]
        out["per_publish"].append({**row, "version": w.get("version"), "errors": w["errors"], "lost": w["lost"]})
    for i in none_idx:     # the noise floor: each no-reload run against the pool of the others
        others = [j for j in none_idx if j != i]
        for k, w in enumerate(runs[i]["windows"]):
            ref = p99(np.concatenate([raws[j][k] for j in others])) if others else None
            out["none_against_other_none"].append({"run": runs[i]["run"], "publish": k + 1, "p99_ms": w["p99_ms"],
                                                   "others_p99_ms": ref, "ratio": ratio(w["p99_ms"], ref)})
    ns = [x["ratio"] for x in out["none_against_other_none"] if x["ratio"] is not None]
    out.update(ratio_median=stats["ratio_median"], ratio_max=stats["ratio_max"], ratio_pooled=stats["ratio_pooled"],
               reload_windows_pooled_p99_ms=stats["reload_pooled_p99_ms"],
               none_windows_pooled_p99_ms=stats["none_pooled_p99_ms"],
               noise_ratio_median=round(float(np.median(ns)), 3) if ns else None, noise_ratio_max=max(ns) if ns else None)
    out["target_met"] = stats["target_met"]
    out["noisy"] = {str(r["run"]): r["noisy"] for r in runs if r["noisy"]}
    for kind, idx in (("reload", rel_idx), ("none", none_idx)):
        ws = [w for i in idx for w in runs[i]["windows"]]
        out[f"{kind}_windows"] = {"requests": sum(w["requests"] for w in ws), "errors": sum(w["errors"] for w in ws),
                                  "lost": sum(w["lost"] for w in ws)}
        out[f"{kind}_runs"] = {"sent": sum(runs[i]["sent"] for i in idx),
                               "errors": sum(sum(runs[i]["errors"].values()) for i in idx),
                               "error_codes": {c: sum(runs[i]["errors"].get(c, 0) for i in idx)
                                               for c in sorted({c for i in idx for c in runs[i]["errors"]})},
                               "lost": sum(runs[i]["lost"] for i in idx)}
    return out


def _f(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def print_summary(res, log):
    s = res["summary"]
    c = res["conditions"]
    log("")
    log(f"{c['rate']:g} req/s on pipeline {PIPELINE} (Poisson, {c['candidates_mean']:.0f} candidates, deadline "
        f"{c['deadline_ms']:g} ms, top_k {c['top_k']})"
        + (f", {c['fraction']:g} x the max {c['max_rate']:g} req/s" if c.get("max_rate") else "")
        + f"; {c['duration_s']:g} s runs, publishes at {', '.join(f'{p:g}' for p in c['publish_at_s'])} s, "
        f"{c['window_s']:g} s windows")
    log("")
    log("per run: p99 (ms) before the first publish and in each window; errors, lost; other cores before and in "
        "the windows (the publish command aside)")
    log(f"  {'run':>3} {'kind':<7}{'pre p99':>8}" + "".join(f"{'w' + str(k + 1) + ' p99':>9}" for k in
                                                           range(len(c["publish_at_s"])))
        + f"{'errors':>7}{'lost':>6}  other cores")
    for r in res["runs"]:
        log(f"  {r['run']:>3} {r['kind']:<7}{_f(r['pre_publish']['p99_ms']):>8}"
            + "".join(f"{_f(w['p99_ms']):>9}" for w in r["windows"])
            + f"{sum(r['errors'].values()):>7}{r['lost']:>6}  "
            + ", ".join(_f(x, 2) for x in [r["pre_publish"]["other_cores"]]
                        + [w["other_cores_but_publish"] for w in r["windows"]]))
    log("")
    log("per publish: window p99 against the no-reload runs' pooled p99 of the same window; rename to the first "
        "reply by the new version and to the switch (measured, and the server's own); peak extra memory (MiB)")
    log(f"  {'run':>3} {'#':>1} {'version':<9}{'p99':>7}{'none p99':>9}{'ratio':>7}{'cmd s':>7}{'->rename':>9}"
        f"{'->1st reply':>12}{'->switch':>9}{'server':>8}{'->released':>11}{'+PSS':>7}{'+RSS':>7}  state")
    by = {(x["run"], x["publish"]): x for x in s["per_publish"]}
    for r in res["runs"]:
        if r["kind"] != "reload":
            continue
        for w in r["windows"]:
            x = by[(r["run"], w["publish"])]
            ex = w.get("memory_peak_extra") or {}
            log(f"  {r['run']:>3} {w['publish']:>1} {'v' + str(w.get('old_version')) + '->v' + str(w.get('version')):<9}"
                f"{_f(w['p99_ms']):>7}{_f(x['none_p99_ms']):>9}{_f(x['ratio'], 2):>7}"
                f"{_f((w.get('cmd_ms') or 0) / 1000 if w.get('cmd_ms') is not None else None):>7}"
                f"{_f(w.get('cmd_start_to_rename_ms'), 0):>9}{_f(w.get('rename_to_first_reply_ms'), 0):>12}"
                f"{_f(w.get('rename_to_switch_ms'), 0):>9}{_f(w.get('server_rename_to_switch_ms'), 0):>8}"
                f"{_f(w.get('rename_to_released_ms'), 0):>11}{_f(ex.get('pss_mib')):>7}{_f(ex.get('rss_mib')):>7}"
                f"  {w.get('state_after')}" + (f" rc {w['rc']}: {w.get('command_output')}" if w.get("rc") else ""))
    nones = [w.get("memory_peak_extra") or {} for r in res["runs"] if r["kind"] == "none" for w in r["windows"]]
    if nones:
        log("  no-reload windows, peak extra (the memory's own noise): PSS "
            + ", ".join(_f(e.get("pss_mib")) for e in nones) + "; RSS " + ", ".join(_f(e.get("rss_mib")) for e in nones))
    log("")
    log(f"p99 ratio, reload window / pooled no-reload window (target <= {s['target_ratio']:g}): "
        f"median {_f(s['ratio_median'], 2)}, pooled {_f(s['ratio_pooled'], 2)} "
        f"({_f(s['reload_windows_pooled_p99_ms'])} / {_f(s['none_windows_pooled_p99_ms'])} ms), "
        f"max {_f(s['ratio_max'], 2)}: {'met' if s['target_met'] else 'MISSED'} (every publish)")
    lw = s.get("long_window")
    if lw:
        log(f"over {lw['window_s']:g} s from each publish (the switch inside): per publish "
            + ", ".join(_f(x["ratio"], 2) for x in lw["per_publish"])
            + f"; median {_f(lw['ratio_median'], 2)}, pooled {_f(lw['ratio_pooled'], 2)} "
            f"({_f(lw['reload_pooled_p99_ms'])} / {_f(lw['none_pooled_p99_ms'])} ms), max {_f(lw['ratio_max'], 2)}: "
            f"{'met' if lw['target_met'] else 'MISSED'} (every publish)")
    log(f"noise floor, each no-reload window / the other no-reload runs' pool: median {_f(s['noise_ratio_median'], 2)}, "
        f"max {_f(s['noise_ratio_max'], 2)}")
    for kind in ("reload", "none"):
        rw, rr = s[f"{kind}_windows"], s[f"{kind}_runs"]
        log(f"{kind + ' runs:':<13} windows {rw['requests']} requests, {rw['errors']} errors, {rw['lost']} lost; "
            f"whole runs {rr['sent']} sent, {rr['errors']} errors{' ' + str(rr['error_codes']) if rr['errors'] else ''}, "
            f"{rr['lost']} lost")
    if s["noisy"]:
        log(f"WARNING: other processes used more than {res['conditions']['max_other_cores']:g} cores (the publish "
            "command aside) in: " + "; ".join(f"run {k} {', '.join(v)}" for k, v in s["noisy"].items())
            + ": not a quiet machine, the ratios above carry that load")


# ----------------------------------------------------------------------------


def find_max_rate(d, a, trace_path, log):
    """docs/run-benchmarks.sh step 3 against this jizhid, pipeline demo: the max passing rate."""
    out = Path(a.work) / "find-max.json"
    cmd = [sys.executable, "-m", "jizhi.tools.bench", "--endpoint", d.endpoint, "--trace", str(trace_path),
           "--pipeline", PIPELINE, "--find-max", "--start-rate", "50", "--duration", "20", "--warmup", "2",
           "--slo-ms", "50", "--cpu", "--run-dir", str(d.run_dir), "--max-other-cores", str(a.max_other_cores),
           "--json", str(out), "--quiet"]
    log(f"find-max: {shlex.join(cmd)}")
    subprocess.run(cmd, check=True, timeout=3600, stdin=subprocess.DEVNULL, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    best = json.loads(out.read_text())["runs"][0]["max"]
    if not best:
        raise SystemExit(f"find-max: no passing point (see {out})")
    return float(best["offered_rps"]), str(out)


def git(*args):
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rate = ap.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="Offered load, requests/s.")
    rate.add_argument("--find-max", action="store_true",
                      help="Find the max rate first (python -m jizhi.tools.bench --find-max) and offer --fraction of it.")
    ap.add_argument("--fraction", type=float, default=0.5, help="--find-max: the share of the max rate offered.")
    ap.add_argument("--runs", type=int, default=5, help="Reload runs, and as many no-reload runs, alternating.")
    ap.add_argument("--first", choices=("reload", "none"), default="reload", help="The kind of the first run.")
    ap.add_argument("--duration", type=float, default=90.0, help="Seconds of load per run.")
    ap.add_argument("--publish-at", default="20,55", help="Offsets (s from the load's start) of the publishes.")
    ap.add_argument("--window", type=float, default=10.0, help="Seconds of requests measured from each publish.")
    ap.add_argument("--load-pace", type=float, default=None,
                    help="models.load_pace for the daemon and --pace for the publish command (default: theirs).")
    ap.add_argument("--long-window", type=float, default=0.0,
                    help="Also the p99 ratio over this many seconds from each publish (0: not): with paced loading "
                         "work (models.load_pace) the switch comes after --window, and this one should cover it.")
    ap.add_argument("--target", type=float, default=1.3, help="The p99 ratio a publish must stay within.")
    ap.add_argument("--seed", type=int, default=1, help="The arrivals (the same in every run).")
    ap.add_argument("--deadline-ms", type=float, default=1000.0)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--work", default="/tmp/jzb/reload-alt", help="Model directory, run directory, find-max JSON.")
    ap.add_argument("--base", default="/tmp/jzb/demo/models/demo/1", help="The demo version (made if missing).")
    ap.add_argument("--trace", default="/tmp/jzb/trace30k.npz", help="The request trace (made if missing).")
    ap.add_argument("--port", type=int, default=5631, help="jizhid's frontend on 127.0.0.1.")
    ap.add_argument("--max-other-cores", type=float, default=0.3, help="A quiet machine: other processes below this.")
    ap.add_argument("--settle-s", type=float, default=120.0, help="Longest wait for a quiet machine before a run.")
    ap.add_argument("--settle-timeout", type=float, default=300.0,
                    help="Longest wait for a switch to finish (old version standby) after a run.")
    ap.add_argument("--pause", type=float, default=5.0, help="Seconds between a settled switch and the next run.")
    ap.add_argument("--publish-timeout", type=float, default=120.0, help="Longest a publish command may run.")
    ap.add_argument("--state-poll-s", type=float, default=0.25, help="Version states polled this often in every run.")
    ap.add_argument("--sample-interval-s", type=float, default=0.1, help="Memory sampler: RSS this often.")
    ap.add_argument("--pss-interval-s", type=float, default=0.5, help="Memory sampler: PSS this often.")
    ap.add_argument("--out", default="/tmp/jzb/reload-alt/results.json")
    a = ap.parse_args()
    a.publish_at = sorted(float(x) for x in a.publish_at.split(","))
    if a.publish_at[0] <= WARMUP_S + 2:
        ap.error(f"--publish-at: the first publish must leave a baseline after the {WARMUP_S:g} s warm-up")
    if a.publish_at[-1] + a.window > a.duration:
        ap.error("--duration must hold the last publish's window")
    if any(q - p < a.window for p, q in zip(a.publish_at, a.publish_at[1:])):
        ap.error("--publish-at: publishes closer than --window")
    if a.runs < 1:
        ap.error("--runs must be at least 1")

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    commit = git("rev-parse", "HEAD")
    dirty = (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()
    command = shlex.join([sys.executable, *sys.argv])
    log(f"command: {command}")
    log(f"date: {env['date']}")
    log(f"machine: {env['host']}, {env['cpu_model']}, {env['cpus']} CPUs, {env['mem_gib']} GiB; python "
        f"{env['python']}, numpy {env['numpy']}, onnxruntime {env['onnxruntime']}, numba {env['numba']}, pyzmq "
        f"{env['pyzmq']}; load average {', '.join(f'{x:.2f}' for x in env['loadavg'])}")
    log(f"commit: {commit}" + (f" (with uncommitted changes to {len(dirty)} tracked files)" if dirty else ""))

    base = Path(a.base)
    if not base.is_dir():
        from jizhi.tools.demo import init_demo
        log(f"making the demo bundle: {base}")
        init_demo(str(base.parent.parent.parent))
    if not Path(a.trace).exists():
        from jizhi.tools.demo import generate_trace
        log(f"making the trace {a.trace} (30,000 requests x 500 candidates, ~2 min)")
        generate_trace(str(base), a.trace, requests=30000, candidates=500, progress=False)
    trace = Trace(a.trace)
    models = work / "models"
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(base, models / MODEL / "1", copy_function=os.link)   # versions start at 2 again

    res = {"command": command, "argv": sys.argv[1:], "environment": env, "commit": commit, "dirty": dirty,
           "conditions": {}, "runs": []}
    d = None
    try:
        d = start_daemon(work, a.port, a.load_pace)
        status = control.call(d.run_dir, "status", timeout_s=5.0)
        sup_pid, instance = status["pid"], status["instance"]
        serving, waited = wait_settled(d, sup_pid, instance, a.settle_timeout)
        log(f"jizhid ready ({d.endpoint}, run dir {d.run_dir}); serving {MODEL} v{serving} (settled {waited:g} s)")
        max_rate = find_json = None
        if a.find_max:
            max_rate, find_json = find_max_rate(d, a, a.trace, log)
            r = round(a.fraction * max_rate, 1)
            log(f"max rate {max_rate:g} req/s; offering {a.fraction:g} x = {r:g} req/s")
        else:
            r = a.rate
        if r * a.duration > len(trace):
            log(f"note: {r * a.duration:.0f} requests per run from a trace of {len(trace)}: requests repeat within a run")
        res["conditions"] = {
            "rate": r, "max_rate": max_rate, "fraction": a.fraction if a.find_max else None, "find_max_json": find_json,
            "runs_per_kind": a.runs, "first": a.first, "duration_s": a.duration, "publish_at_s": a.publish_at,
            "window_s": a.window, "long_window_s": a.long_window, "load_pace": a.load_pace, "seed": a.seed, "deadline_ms": a.deadline_ms, "top_k": a.top_k,
            "pipeline": PIPELINE, "pipeline_file": str(REPO / "etc" / "pipelines" / "demo.toml"),
            "trace": a.trace, "trace_requests": len(trace), "candidates_mean": trace.mean_candidates(),
            "models": str(models), "run_dir": str(d.run_dir), "instance": instance, "supervisor_pid": sup_pid,
            "max_other_cores": a.max_other_cores, "state_poll_s": a.state_poll_s,
            "sample_interval_s": a.sample_interval_s, "pss_interval_s": a.pss_interval_s}
        kinds = ["reload", "none"] if a.first == "reload" else ["none", "reload"]
        raws, next_version = [], 2
        for i in range(2 * a.runs):
            kind = kinds[i % 2]
            time.sleep(a.pause)
            quiet = wait_for_quiet(a.max_other_cores, a.settle_s, ServerCpu(d.run_dir), log)
            rec, raw, next_version, serving = one_run(d, a, trace, r, kind, i + 1, sup_pid, instance, next_version,
                                                      serving)
            rec["quiet_wait"] = {"waited_s": quiet[0], "other_cores": quiet[1]}
            res["runs"].append(rec)
            raws.append(raw)
            ws = rec["windows"]
            log(f"run {i + 1:>2} {kind:<6}: pre p99 {_f(rec['pre_publish']['p99_ms'])} ms, windows p99 "
                + ", ".join(_f(w["p99_ms"]) for w in ws) + f" ms; errors {rec['errors'] or 0} lost {rec['lost']}"
                + ("".join(f"; v{w.get('version')} rename->1st reply {_f(w.get('rename_to_first_reply_ms'), 0)} ms, "
                           f"->switch {_f(w.get('rename_to_switch_ms'), 0)} ms ({w.get('state_after')})"
                           for w in ws) if kind == "reload" else "")
                + (f"; publisher: {rec['publisher_error']}" if rec.get("publisher_error") else ""))
        res["summary"] = summarize(res["runs"], raws, a)
        if a.long_window:
            res["summary"]["long_window"] = summarize_long(res["runs"], raws, a)
    finally:
        if d is not None:
            d.stop()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print_summary(res, log)
    log(f"results: {a.out}")


if __name__ == "__main__":
    main()
