"""The model registry: which versions are on disk, which are good, which should serve.

The supervisor owns one. It scans the model directory every
``models.poll_interval_s`` (a version appears complete or not at all: it is
copied into ``<models>/.incoming/`` and renamed to ``<models>/<name>/<version>``;
a directory whose name is not a number is ignored, and so is a version
without ``manifest.toml``). Before any worker maps a new version's files, a
child process validates it (``python -m jizhi.validate``: manifest schema,
sizes and sha256 of every file, ONNX inputs/outputs, cube dimension, a smoke
inference), so a crash while validating never touches the supervisor.

Each model has a serving policy: ``latest`` (the newest version that is not
rejected or failed), or ``pinned VERSION`` (from the pipeline file's
``version = N``, or ``jizhictl pin``, which is remembered in
``<models>/<name>/.pinned`` so a restart keeps a rollback). Versions are never
deleted here: older ones stay on disk as the fallback when a serving version
fails.

Version states (``VersionState``, jizhi/states.py: the words the loader and
the broker use too), as ``jizhictl models`` shows them, and the registry's legal
transitions (``TRANSITIONS``; an illegal one is logged as a bug):

==========  ==========================================================  ==============================
state       meaning                                                     next
==========  ==========================================================  ==============================
available   complete on disk, not examined yet                          validating, valid (boot check)
validating  its validation child is running                             valid, rejected
valid       passed validation, not loaded                               loading, serving (boot),
                                                                        rejected, refused
rejected    failed validation (the reason is kept); never served        -
refused     would pass ``models.memory_budget_mb``                      available (``jizhictl reload``)
loading     new workers start beside the serving ones and warm up       serving, failed
serving     new requests are pinned to it                               draining, failed
draining    answers what it holds after a newer version took over      standby, serving, failed
standby     served before; a fallback (validated again before use)     validating
failed      broke while loading or serving (file truncated, workers    available (``jizhictl pin``)
            died, warm-up error)
==========  ==========================================================  ==============================

Any state may become ``removed`` (its directory disappeared); a version that
reappears starts again as ``available``.
"""
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from jizhi import lifeline
from jizhi.shm import sigbus_cause
from jizhi.rundir import write_file
from jizhi.states import VersionState

log = logging.getLogger("jizhi.registry")

PIN_FILE = ".pinned"


S = VersionState
TRANSITIONS = {
    S.AVAILABLE: {S.VALIDATING, S.VALID},
    S.VALIDATING: {S.VALID, S.REJECTED},
    S.VALID: {S.LOADING, S.SERVING, S.REJECTED, S.REFUSED},
    S.REJECTED: set(),
    S.REFUSED: {S.AVAILABLE},
    S.LOADING: {S.SERVING, S.FAILED},
    S.SERVING: {S.DRAINING, S.FAILED},
    S.DRAINING: {S.STANDBY, S.SERVING, S.FAILED},
    S.STANDBY: {S.VALIDATING},
    S.FAILED: {S.AVAILABLE},
    S.REMOVED: set(),
}
NOT_SERVABLE = (S.REJECTED, S.REFUSED, S.FAILED, S.REMOVED)


def child_report(proc, rc):
    """The JSON report a finished child (validator, hot-tier builder) printed last, and how it ended.

    Returns ``(report or None, how)``; closes the child's stdout.
    """
    out = proc.stdout.read().decode("utf-8", "replace").strip().splitlines()
    proc.stdout.close()
    try:
        report = json.loads(out[-1]) if out else None
    except ValueError:
        report = None
    if rc == -signal.SIGBUS:
        return report, f"killed by SIGBUS ({sigbus_cause()})"
    return report, (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}")


class VersionRecord:
    def __init__(self, model, version, path):
        self.model = model
        self.version = version
        self.path = Path(path)
        self.state = VersionState.AVAILABLE
        self.error = None
        self.seen = time.monotonic()
        self.seen_wall = time.time()
        try:
            # A rename updates the directory's ctime: the moment the version became visible.
            self.renamed_wall = os.stat(path).st_ctime
        except OSError:
            self.renamed_wall = self.seen_wall
        self.validation = None      # the validator's report
        self.timings_ms = {}        # detection, validation, start, load, warm-up, switch
        self.loaded_wall = None     # when it started serving
        self.proc = None            # the validation child while it runs
        self.proc_started = 0.0

    def to(self, state, error=None):
        """Move to ``state`` (with the reason when it is a bad one). Same state: only the error changes.
        A word that is no state of the registry (``warm``, ``stopping``) raises ValueError."""
        state = VersionState(state)
        if state not in TRANSITIONS:
            raise ValueError(f"{state.value!r} is not a state of the registry")
        if state != self.state and state != VersionState.REMOVED and state not in TRANSITIONS[self.state]:
            log.error("illegal version state transition: model %s version %d %s -> %s (a bug; applied anyway)",
                      self.model, self.version, self.state.value, state.value)
        self.state, self.error = state, error

    def summary(self):
        return {"version": self.version, "state": self.state.value, "error": self.error, "path": str(self.path),
                "renamed_at": self.renamed_wall, "serving_since": self.loaded_wall,
                "timings_ms": dict(self.timings_ms)}


class Registry:
    def __init__(self, models_dir, settings, policies):
        """``policies``: {model: None (latest) or a pinned version} from the pipeline files."""
        self.models_dir = Path(models_dir)
        self.settings = settings
        self.configured = dict(policies)
        self.records = {m: {} for m in policies}     # model -> {version: VersionRecord}
        self.pins = {m: self.read_pin(m) for m in policies}
        self.next_scan = 0.0

    # -- policy ---------------------------------------------------------------

    def read_pin(self, model):
        try:
            text = (self.models_dir / model / PIN_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the pin of model %s: %s", model, e)
            return None
        if not text.isdigit():
            log.warning("ignoring %s: %r is not a version number", self.models_dir / model / PIN_FILE, text)
            return None
        return int(text)

    def policy(self, model):
        pin = self.pins.get(model)
        if pin is not None:
            return ("pinned", pin, "jizhictl pin")
        if self.configured.get(model) is not None:
            return ("pinned", self.configured[model], "pipeline file")
        return ("latest", None, "pipeline file")

    def pin(self, model, version):
        """Pin ``model`` to ``version`` (None: unpin). Persisted so a restart keeps a rollback."""
        if model not in self.records:
            raise KeyError(f"no model {model!r} is served (served: {', '.join(self.records)})")
        path = self.models_dir / model / PIN_FILE
        if version is not None:
            rec = self.records[model].get(version)
            if rec is None:
                raise KeyError(f"model {model} has no version {version} on disk "
                               f"(versions: {', '.join(map(str, sorted(self.records[model]))) or 'none'})")
            if rec.state in ("rejected", "removed"):
                raise KeyError(f"model {model} version {version} is {rec.state}"
                               + (f": {rec.error}" if rec.error else ""))
            if rec.state == "failed":
                rec.to(VersionState.AVAILABLE)   # an explicit pin retries a failed version
        persisted = True
        try:
            if version is None:
                path.unlink(missing_ok=True)
            else:
                write_file(path, f"{version}\n".encode(), mode=0o644)    # (never through a link)
        except OSError as e:
            persisted = False
            log.warning("pin of model %s kept in memory only (cannot write %s: %s)", model, path, e)
        self.pins[model] = version
        log.info("model %s: %s", model, f"pinned to version {version}" if version is not None else
                 f"unpinned (policy: {self.policy(model)[0]})")
        return persisted

    def target(self, model):
        """The version the policy asks to serve now, or None when there is none to serve."""
        kind, version, _ = self.policy(model)
        recs = self.records.get(model, {})
        if kind == "pinned":
            rec = recs.get(version)
            return version if rec is not None and rec.state not in NOT_SERVABLE else None
        good = [v for v, r in recs.items() if r.state not in NOT_SERVABLE]
        return max(good) if good else None

    def fallback(self, model, failed):
        """The newest servable version older than ``failed`` (when the policy's own target is gone)."""
        good = [v for v, r in self.records.get(model, {}).items() if v < failed and r.state not in NOT_SERVABLE]
        return max(good) if good else None

    # -- disk ---------------------------------------------------------------------

    def scan(self, now=None, initial=False):
        """Notice new and removed versions (at most every poll interval). Returns the new records.

        ``initial``: the scan at start; those versions were not "detected" (no detection time).
        """
        now = time.monotonic() if now is None else now
        if now < self.next_scan:
            return []
        self.next_scan = now + self.settings["models.poll_interval_s"]
        new = []
        for model, recs in self.records.items():
            base = self.models_dir / model
            on_disk = set()
            try:
                entries = list(os.scandir(base))
            except FileNotFoundError:
                entries = []
            for e in entries:
                if not e.name.isdigit() or not e.is_dir() or not os.path.isfile(os.path.join(e.path, "manifest.toml")):
                    continue
                v = int(e.name)
                on_disk.add(v)
                rec = recs.get(v)
                if rec is None or rec.state == "removed":
                    rec = recs[v] = VersionRecord(model, v, e.path)
                    if not initial:
                        rec.timings_ms["detection"] = round((rec.seen_wall - rec.renamed_wall) * 1000, 1)
                    new.append(rec)
            for v, rec in recs.items():
                if v not in on_disk and rec.state != "removed":
                    log.warning("model %s version %d: its directory is gone", model, v)
                    rec.to(VersionState.REMOVED, "directory removed")
        for rec in new:
            log.info("model %s version %d appeared (%s)", rec.model, rec.version, rec.path)
        return new

    def rescan(self, model=None):
        """`jizhictl reload [MODEL]`: scan now; refused versions are tried again."""
        for m, recs in self.records.items():
            if model is None or m == model:
                for rec in recs.values():
                    if rec.state == "refused":
                        rec.to(VersionState.AVAILABLE)
        self.next_scan = 0.0
        return self.scan()

    # -- validation (a child process) ---------------------------------------------

    def validate(self, rec, as_loader=None):
        rec.to(VersionState.VALIDATING)
        rec.proc = subprocess.Popen(lifeline.child_argv("jizhi.validate", rec.path, "--name", rec.model,
                                                        "--version", rec.version),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    env=lifeline.child_environ(dict(os.environ, OMP_NUM_THREADS="1"),
                                                               self.settings["server.instance"]),
                                    preexec_fn=lifeline.killed_with_parent)     # (it may be paced)
        rec.proc_started = time.monotonic()
        if as_loader is not None:
            as_loader(rec.proc.pid, f"the validation of {rec.model} {rec.version}")   # lower priority, loading cores, paced
        log.info("model %s version %d: validating (pid %d)", rec.model, rec.version, rec.proc.pid)

    def poll_validations(self):
        """Collect finished validations; returns the records that finished (valid or rejected)."""
        done = []
        limit = self.settings["models.validate_timeout_s"]
        for recs in self.records.values():
            for rec in recs.values():
                if rec.proc is None:
                    continue
                rc = rec.proc.poll()
                took = time.monotonic() - rec.proc_started
                if rc is None:
                    if took > limit:
                        rec.proc.kill()
                        rec.proc.wait()
                        self._finish(rec, None, f"validation did not finish within {limit:g} s "
                                                "(models.validate_timeout_s)", took)
                        done.append(rec)
                    continue
                report, how = child_report(rec.proc, rc)
                if report is None:
                    self._finish(rec, None, f"the validation process crashed ({how})", took)
                else:
                    self._finish(rec, report, None if report.get("ok") else
                                 f"{report.get('check')}: {report.get('error')}", took)
                done.append(rec)
        return done

    def _finish(self, rec, report, error, took_s):
        if not rec.proc.stdout.closed:
            rec.proc.stdout.close()
        rec.proc = None
        rec.validation = report
        rec.timings_ms["validation"] = round(took_s * 1000, 1)
        if error is None:
            rec.to(VersionState.VALID)
            log.info("model %s version %d: valid (validated in %.0f ms)", rec.model, rec.version, took_s * 1000)
        else:
            self.reject(rec, error)

    def reject(self, rec, error, state=VersionState.REJECTED):
        rec.to(state, error)
        state = rec.state.value
        log.error("model %s version %d %s: %s", rec.model, rec.version, state, error)

    def stop(self):
        for recs in self.records.values():
            for rec in recs.values():
                if rec.proc is not None:
                    rec.proc.kill()
                    rec.proc.wait()
                    rec.proc.stdout.close()
                    rec.proc = None

    def summary(self):
        out = {}
        for model, recs in self.records.items():
            kind, version, source = self.policy(model)
            out[model] = {"policy": kind if version is None else f"{kind} {version}", "policy_from": source,
                          "target": self.target(model),
                          "versions": [recs[v].summary() for v in sorted(recs)]}
        return out
