"""The version manager: which model version set each pipeline serves, and switching without a gap.

Hot reload is source -> loader -> manager, as TF Serving has it
(docs/architecture.md, "Model versions (hot reload)"). The registry
(``registry.py``) is the source; a ``Loader`` (``loader.py``) is one version
set of a pipeline in one bank; the ``VersionManager`` is the manager. Every
turn of the supervisor loop, ``converge_models()`` notices new versions on
disk, has the ones a policy wants validated (a child process), and loads the
wanted set beside the serving one (``load_version``). When the broker says
its workers are warm (``on_warm``), ``activate`` switches new requests to it
and the previous set drains; once it answered its last request
(``on_version_idle``) its workers are retired and ``unload`` removes its
arenas. A version whose files break, whose workers keep dying while loading,
or whose scores are not finite (``on_invalid``) fails (``fail_version``) and
the previous good one serves; the last good version is never unloaded before
another serves.

A reload (SIGHUP and ``jizhictl reload``, one code path: ``reload``) rescans
the model directory, re-reads the config and the pipeline files, applies the
pool sizes and A/B fractions that changed and names what needs a restart.

Runs in the supervisor process only; the supervisor loop calls it.
"""
import logging
import os
import signal
import time
from pathlib import Path

from jizhi import config, messages, notify, priority
from jizhi.bundle import Bundle
from jizhi.control import ControlError
from jizhi.errors import BundleError, ConfigError, PipelineError
from jizhi.pipeline import compile_pipeline, pipeline_models, read_pipeline
from jizhi.states import VersionState
from jizhi.supervisor.loader import LIVE, Loader, LoadRefused
from jizhi.supervisor.registry import Registry

log = logging.getLogger("jizhi.supervisor")


def doc_stage(doc, name):
    return next((st for st in doc.get("stage", []) if st.get("name") == name), {})


class VersionManager:
    def __init__(self, sup):
        self.sup = sup
        self.registry = None
        self.loaded = {}                # pipeline -> {bank: Loader}
        self.docs = {}                  # pipeline -> its pipeline file, read
        self.models_of = {}             # pipeline -> its models (the pipeline's own first, then heads)
        self.generations = {}           # pipeline -> the last version-set label of a multi-model pipeline
        self.next_files_check = 0.0
        self.pacer = priority.Pacer(sup.settings["models.load_pace"])    # loading work, a share of the time

    # -- start --------------------------------------------------------------

    def read_pipelines(self):
        """The pipeline files, read, and the version policy of every model they name: (docs, policies)."""
        docs, policies = [], {}
        for p in self.sup.pipeline_names:
            doc = read_pipeline(p)
            name = doc.get("name")
            for model, pinned in pipeline_models(doc).items():
                if policies.get(model, pinned) != pinned:
                    raise PipelineError(f"pipeline {name!r}: model {model} is pinned to different versions by "
                                        "two pipelines")
                policies[model] = pinned
            docs.append(doc)
        return docs, policies

    def resolve(self):
        """The pipelines compiled against each model's boot version: {pipeline: plan} (``Supervisor.resolve``)."""
        sup = self.sup
        docs, policies = self.read_pipelines()
        if not Path(sup.models_dir).is_dir():
            raise BundleError(f"the model directory {sup.models_dir} does not exist")
        self.registry = Registry(sup.models_dir, sup.settings, policies)
        self.registry.scan(initial=True)
        boot = {m: self.boot_version(m) for m in policies}
        plans, self.docs = {}, {}
        for doc in docs:
            models = list(pipeline_models(doc))
            self.models_of[doc["name"]] = models
            plan = compile_pipeline(doc, sup.models_dir, versions={m: boot[m] for m in models},
                                    generation=self.next_generation(doc["name"]))
            plans[plan["name"]] = plan
            self.docs[plan["name"]] = doc
            for g, group in plan["groups"].items():
                if group["pool"] > sup.settings["workers.max_pool"]:
                    raise PipelineError(f"pipeline {plan['name']}: group {g!r} pool {group['pool']} is over "
                                        f"workers.max_pool = {sup.settings['workers.max_pool']}")
        return plans

    def boot_version(self, model):
        """The version a model starts with: its policy's target, checked (sizes, sha256) here.

        Under ``latest`` a version that fails the check is rejected and the next
        older one is tried; a pinned version that fails stops the start.
        """
        while True:
            v = self.registry.target(model)
            if v is None:
                bad = "; ".join(f"{r.version}: {r.error}" for r in self.registry.records[model].values() if r.error)
                raise BundleError(f"model {model!r} has no version to serve in {self.sup.models_dir}"
                                  + (f" (rejected: {bad})" if bad else "")
                                  + (f" (policy: {' '.join(map(str, self.registry.policy(model)[:2]))})"))
            rec = self.registry.records[model][v]
            t0 = time.monotonic()
            try:
                b = Bundle(rec.path)
                if (b.name, b.version) != (model, v):
                    raise BundleError(f"{rec.path}: the manifest says {b.name} version {b.version}")
                b.verify()
            except BundleError as e:
                self.registry.reject(rec, str(e))
                continue
            rec.timings_ms["validation"] = round((time.monotonic() - t0) * 1000, 1)   # (the start's check)
            rec.to(VersionState.VALID)
            log.info("bundle verified: %s", rec.path)
            return v

    def load_boot(self, plans):
        """At start: each pipeline's boot version set, serving in bank 0 (its arenas created, no broker yet)."""
        for name, plan in plans.items():
            records = {m: self.registry.records[m][v] for m, v in plan["versions"].items()}
            ld = Loader(name, records[plan["model"]], 0, VersionState.SERVING, records=records,
                        generation=plan["version"], now=self.sup.clock())
            self.loaded[name] = {0: ld}
            try:
                ld.load(self.sup, self.docs[name], plan=plan, announce=False)
            except LoadRefused as e:        # (a Redis cube refusing our credentials): jizhid does not start
                raise PipelineError(str(e)) from None

    def mark_serving(self, plans):
        """At start, once the plan file says them: the boot versions serve."""
        for plan in plans.values():
            for m, v in plan["versions"].items():
                rec = self.registry.records[m][v]
                rec.to(VersionState.SERVING)
                rec.loaded_wall = time.time()

    def next_generation(self, pipeline):
        """The label of a multi-model pipeline's next version set (None: a single model, labelled by its
        version)."""
        if len(self.models_of[pipeline]) == 1:
            return None
        self.generations[pipeline] = self.generations.get(pipeline, 0) + 1
        return self.generations[pipeline]

    def entries(self):
        """What the plan file says of every loaded version: {pipeline: {version: entry}}."""
        return {p: {str(ld.version): ld.entry() for ld in banks.values()} for p, banks in self.loaded.items()}

    # -- lookups ------------------------------------------------------------

    def find_loaded(self, pipeline, version, states):
        for ld in self.loaded.get(pipeline, {}).values():
            if ld.version == version and ld.state in states:
                return ld
        return None

    def find_serving(self, pipeline):
        """The pipeline's serving Loader, or None."""
        for ld in self.loaded.get(pipeline, {}).values():
            if ld.state == VersionState.SERVING:
                return ld
        return None

    def serving_versions(self):
        """{model: version} of every serving version set (``jizhictl status``)."""
        out = {}
        for banks in self.loaded.values():
            for ld in banks.values():
                if ld.state == VersionState.SERVING:
                    out.update(ld.versions)
        return out

    def loading_banks(self):
        return {(p, ld.bank) for p, banks in self.loaded.items() for ld in banks.values()
                if ld.state == VersionState.LOADING}

    # -- the lifecycle --------------------------------------------------------

    def converge_models(self):
        """Notice new versions, validate them, load the one each policy wants, beside the serving one."""
        reg = self.registry
        reg.scan()
        reg.poll_validations()
        now = self.sup.clock()
        self.sup.hot_tiers.manage(now)
        if now >= self.next_files_check:
            # A file of a loaded version truncated, replaced or deleted: fail it before its workers hit SIGBUS.
            self.next_files_check = now + 1.0
            for banks in self.loaded.values():
                for ld in list(banks.values()):
                    if ld.state in LIVE:
                        model, broken = ld.changed_files()
                        if broken:
                            self.fail_version(ld, f"its files changed under it: {broken}", model)
        for pipeline, banks in self.loaded.items():
            loading = [ld for ld in banks.values() if ld.state == VersionState.LOADING]
            limit = self.sup.settings["workers.boot_timeout_s"] + 60
            for ld in loading:
                if now - ld.t_start > limit:
                    self.fail_version(ld, f"not ready and warm within {limit:g} s")
            if loading:
                continue
            serving = self.find_serving(pipeline)
            # The version each model's policy wants; a model with none keeps what serves (a multi-model
            # pipeline: one head's failed version does not stop the others), or falls back.
            want = {}
            for model in self.models_of[pipeline]:
                target = reg.target(model)
                if target is None and serving is not None:
                    target = serving.versions.get(model)
                if target is None:
                    failed = [ld.versions[model] for ld in banks.values() if model in ld.versions]
                    target = reg.fallback(model, min(failed)) if failed else None
                want[model] = target
            if None in want.values() or (serving is not None and want == serving.versions) or len(banks) >= 2:
                continue    # nothing to do, or the previous version is still being released
            records = {m: reg.records[m][v] for m, v in want.items()}
            waiting = False
            for rec in records.values():
                if serving is not None and rec is serving.records.get(rec.model):
                    continue    # serving here already
                if rec.state == VersionState.VALIDATING:
                    waiting = True
                elif rec.validation is None or not rec.validation.get("ok"):
                    rec.timings_ms = {k: v for k, v in rec.timings_ms.items() if k == "detection"}
                    rec.t_wanted_wall = time.time()
                    reg.validate(rec, self.as_loader)
                    waiting = True
            if waiting:
                continue
            # The load is blamed on (and timed for) the first model whose version changes.
            lead = next((r for m, r in records.items() if serving is None or serving.versions.get(m) != r.version),
                        records[self.models_of[pipeline][0]])
            self.load_version(pipeline, lead, records)

    def load_version(self, pipeline, rec, records=None):
        """Start loading a validated version (a multi-model pipeline: the version set ``records``, ``rec``
        the model that changed) in the pipeline's free bank (its workers warm up; the broker says WARM)."""
        banks = self.loaded[pipeline]
        ld = Loader(pipeline, rec, 1 if 0 in banks else 0, records=records,
                    generation=self.next_generation(pipeline), now=self.sup.clock())
        try:
            ld.load(self.sup, self.docs[pipeline])
        except LoadRefused as e:
            self.registry.reject(rec, str(e), state=VersionState(e.state))
            return
        banks[ld.bank] = ld
        self.sup.write_run()
        for r in ld.records.values():
            if r.state == VersionState.VALID:     # (another pipeline of the same model may have it loaded already)
                r.to(VersionState.LOADING)
        rec.t_load = time.monotonic()

    def on_warm(self, msg):
        """The broker's WARM (``messages.Warm``): a loading version's workers warmed up (or failed to)."""
        ld = self.find_loaded(msg.pipeline, msg.version, (VersionState.LOADING,))
        if ld is None:
            return
        rec = ld.record
        self.pacer.release(self.bank_pids(ld))     # warm: they wait to serve, at full speed from the switch on
        if not msg.ok:
            self.fail_version(ld, f"warm-up: {msg.error}")
            return
        if ld.hot is not None and not ld.hot_done:
            ld.warm_msg = msg       # switched in once its hot tier is built too
            return
        boot = msg.boot
        now = time.monotonic()
        t_ready = now - (msg.took_ms or 0) / 1000.0
        rec.timings_ms.update({"start": boot.get("start_ms"), "load": boot.get("load_ms"),
                               "ready": round((t_ready - rec.t_load) * 1000, 1), "warm_up": msg.took_ms})
        self.activate(ld, rec)

    def activate(self, ld, rec):
        """New requests go to ``ld``; the version set serving before drains."""
        sup = self.sup
        old = self.find_serving(ld.pipeline)
        t0 = time.monotonic()
        if old is not None:
            old.to(VersionState.DRAINING)
            for orec in old.records.values():
                if orec.state == VersionState.SERVING and not any(
                        orec in o.records.values() and o.state == VersionState.SERVING
                        for banks in self.loaded.values() for o in banks.values() if o is not old) \
                        and orec not in ld.records.values():
                    orec.to(VersionState.DRAINING)
        ld.to(VersionState.SERVING)
        sup.run["pipelines"][ld.pipeline] = ld.plan
        sup.write_run()
        sup.tell_broker(messages.Activate(ld.pipeline, ld.version))
        for r in ld.records.values():
            if r.state != VersionState.SERVING:
                r.to(VersionState.SERVING)
                r.loaded_wall = time.time()
        rec.timings_ms["switch"] = round((time.monotonic() - t0) * 1000, 2)
        # A version new in this run: from its rename; one served again (pin, fallback): from the decision.
        start = rec.renamed_wall if "detection" in rec.timings_ms else getattr(rec, "t_wanted_wall", rec.renamed_wall)
        rec.timings_ms["total"] = round((rec.loaded_wall - start) * 1000, 1)
        log.info("pipeline %s: now serving %s%s (rename to switch %.1f s: %s)", ld.pipeline, ld.describe(),
                 f"; {old.describe()} drains" if old else "", rec.timings_ms["total"] / 1000,
                 ", ".join(f"{k} {v:.0f} ms" for k, v in rec.timings_ms.items() if v is not None and k != "total"))
        notify.notify(f"STATUS=serving {ld.describe()}")

    def on_version_idle(self, msg):
        """The broker's VIDLE (``messages.VersionIdle``): a draining version answered its last request."""
        ld = self.find_loaded(msg.pipeline, msg.version, (VersionState.DRAINING,))
        if ld is not None:
            ld.to(VersionState.STOPPING)    # manage() retires its workers; unload() follows when they are gone

    def on_invalid(self, msg):
        """The broker's INVALID (``messages.Invalid``): it judged a serving version's first
        ``models.invalid_watch_s`` and its share of NaN or infinite scores passed ``models.max_invalid_share``.
        The version is failed and the previous good one is loaded, validated and warmed up by
        ``converge_models`` (the target skips failed versions);
        unlike a version whose files broke, it answers meanwhile (its replies drop those candidates and
        count them), and drains once the previous one serves: no request is refused for it."""
        ld = self.find_loaded(msg.pipeline, msg.version, (VersionState.SERVING,))
        if ld is None or ld.record is None:
            return
        candidates = max(1, msg.candidates)
        reason = (f"{msg.invalid} of {msg.candidates} scores not finite (NaN or infinite), "
                  f"{msg.invalid / candidates:.2%} > models.max_invalid_share "
                  f"{self.sup.settings['models.max_invalid_share']:g}, in its first {msg.serving_s} s of "
                  "serving")
        self.registry.reject(ld.record, reason, state=VersionState.FAILED)
        ld.record.validation = None
        fallback = self.registry.target(ld.record.model)
        log.error("pipeline %s: serving version %d failed; it answers (those candidates dropped) %s", ld.pipeline,
                  ld.version, f"until version {fallback} is warm" if fallback is not None else
                  "on: the policy names no other good version (jizhictl pin one)")
        notify.notify(f"STATUS=degraded: {ld.describe()} failed ({reason}); falling back")

    def fail_version(self, ld, reason, model=None):
        """``model``: the model whose files broke (default: the one whose new version this load brought)."""
        sup = self.sup
        was = ld.state
        ld.to(VersionState.FAILED)
        rec = ld.records.get(model, ld.record)
        if rec is not None:
            self.registry.reject(rec, reason, state=VersionState.FAILED)
            rec.validation = None
        sup.write_run()
        self.pacer.release(self.bank_pids(ld))
        sup.tell_broker(messages.VersionFail(ld.pipeline, ld.version, reason))
        if was == VersionState.SERVING:
            log.error("pipeline %s: serving version %d failed; falling back to the previous good version",
                      ld.pipeline, ld.version)
            notify.notify(f"STATUS=degraded: {ld.describe()} failed ({reason}); falling back")
        sup.stop_bank(ld.pipeline, ld.bank, within_s=2.0)

    def worker_died(self, child, rc, how):
        """A worker died: is it its model version that broke?

        A worker of a version still loading that dies ``models.load_attempts``
        times fails that version (the serving one is untouched). A serving
        worker killed by SIGBUS, or whose bundle's files no longer match the
        manifest's sizes, means the files were truncated or replaced under the
        mapping: that version fails and the previous good one is loaded, with
        no restart loop.
        """
        ld = self.loaded[child.pipeline].get(child.bank)
        if ld is None or ld.version != child.version:
            return
        if ld.state == VersionState.LOADING:
            ld.deaths += 1
            if ld.deaths >= self.sup.settings["models.load_attempts"]:
                self.fail_version(ld, f"its workers died while loading ({ld.deaths}x, last: {how})")
        elif ld.state in (VersionState.SERVING, VersionState.DRAINING):
            model, broken = ld.changed_files()
            if rc == -signal.SIGBUS or broken:
                self.fail_version(ld, f"a worker was {how}" + (f"; {broken}" if broken else
                                                              " (a mapped file was truncated?)"), model)

    def unload(self, ld):
        """A version's workers are gone: remove its arenas and tell the broker to forget it."""
        del self.loaded[ld.pipeline][ld.bank]
        self.sup.write_run()
        ld.unload(self.sup)
        for rec in ld.records.values() if ld.state == VersionState.STOPPING else ():
            still = any(rec in o.records.values() for banks in self.loaded.values() for o in banks.values())
            if not still and rec.state != VersionState.FAILED:    # (failed while serving: on_invalid)
                rec.to(VersionState.STANDBY)
                rec.validation = None     # validated again before it serves again

    # -- loading work's CPU ---------------------------------------------------

    def load_cores(self):
        """Cores the loading work (validation, hot-tier builds, a new version's workers) is confined to."""
        cores = self.sup.settings["models.load_cores"]
        if cores == "auto":
            cpus = sorted(os.sched_getaffinity(0))
            return [cpus[-1]] if len(cpus) > 1 else []
        return [int(c) for c in cores.split(",") if c.strip()]

    def load_idle(self, workers=False):
        """Does loading work run at the idle priority (models.load_priority)? A new version's ``workers``
        only where they may come back to normal once they serve (jizhi/priority.py)."""
        if self.sup.settings["models.load_priority"] != "idle":
            return False
        return not workers or priority.can_leave_idle(os.getpriority(os.PRIO_PROCESS, 0))

    def pacing(self):
        """Is loading work paced now (``models.load_pace`` < 1 and a version serves: the start's own
        loading work, before anything serves, runs at full speed)?"""
        return self.pacer.duty < 1.0 and self.sup.reports.ready_logged

    def pace(self, pid, name):
        """Loading work runs ``models.load_pace`` of the time while a version serves (jizhi/priority.py,
        ``Pacer``): its kernel work (file reads, page faults, a process's start) is spread thin."""
        if self.pacing() and self.pacer.add(pid, name):
            log.debug("pacing %s (pid %d): it runs %.0f%% of the time", name, pid, self.pacer.duty * 100)

    def loading(self, key):
        """Is the worker ``key``'s version still loading?"""
        ld = self.loaded.get(key.pipeline, {}).get(key.bank)
        return ld is not None and ld.state == VersionState.LOADING

    def bank_pids(self, ld):
        """The running workers of ``ld``'s bank."""
        return [c.proc.pid for c in list(self.sup.children.values())
                if c.is_worker and c.proc is not None and c.key.pipeline == ld.pipeline and c.key.bank == ld.bank]

    def as_loader(self, pid, name="loading work"):
        """A loading child: the idle (or a lower) CPU and I/O priority and (models.load_cores) one core, so
        serving keeps the rest, and paced (``pace``)."""
        self.pace(pid, name)
        try:
            if self.load_idle():
                priority.idle(pid)
            else:
                os.setpriority(os.PRIO_PROCESS, pid,
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.sup.settings["models.load_nice"]))
            if self.load_cores():
                os.sched_setaffinity(pid, self.load_cores())
        except OSError:
            pass

    # -- commands -----------------------------------------------------------------

    def pin(self, model, version):
        """``jizhictl pin`` (``version``) and ``unpin`` (None)."""
        try:
            persisted = self.registry.pin(model, version)
        except KeyError as e:
            raise ControlError(e.args[0])
        return {"model": model, "policy": " ".join(str(x) for x in self.registry.policy(model)[:2] if x is not None),
                "target": self.registry.target(model), "persisted": persisted}

    def reload(self, model=None):
        """SIGHUP and `jizhictl reload`: validate everything, then apply what can change live.

        Applied live: pool sizes from the pipelines' files and A/B fractions. Anything
        else that changed is reported under ``needs_restart``. An invalid config or
        pipeline is refused with its reason (ControlError); the running configuration stays.
        """
        sup = self.sup
        new = self.registry.rescan(model)
        try:
            settings = config.load(sup.config_path, sup.overrides)
            plans, docs = {}, {}
            for p in settings["server.pipelines"]:
                doc = read_pipeline(p)
                docs[doc.get("name")] = doc
                serving = self.find_serving(doc.get("name"))
                plan = compile_pipeline(doc, sup.models_dir, versions=serving.versions if serving else None,
                                        generation=serving.version if serving else None)
                plans[plan["name"]] = plan
        except (ConfigError, PipelineError, BundleError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            raise ControlError(f"the running configuration stays: {e}")
        applied, kept, needs_restart = [], [], []
        for name, plan in plans.items():
            if name not in sup.run["pipelines"]:
                needs_restart.append(f"pipeline {name} (new)")
                continue
            for g, group in plan["groups"].items():
                if (name, g) in sup.pools.desired:
                    what, note = sup.pools.reload(name, g, group["pool"])
                    (applied if what == "applied" else kept if what == "kept" else []).append(note)
            routes = {g: group["router"] for g, group in plan["groups"].items()
                      if group.get("router") and sup.run["pipelines"][name]["groups"].get(g, {}).get("router")
                      not in (None, group["router"])}
            if routes:
                self.set_routes(name, routes, docs[name])
                applied += [f"{name}/{g} A/B fractions " + ", ".join(f"{x['name']}={x['fraction']:g}" for x in r["groups"])
                            for g, r in routes.items()]
        sup.load_control.rebudget()
        for k, v in settings.items():
            if v != sup.settings.get(k) and k != "server.run_dir":
                needs_restart.append(k)
        log.info("reload: applied %s; needs a restart to change: %s; new model versions: %s%s", applied or "nothing",
                 needs_restart or "nothing", [f"{r.model} {r.version}" for r in new] or "none",
                 f"; kept {kept}" if kept else "")
        return {"applied": applied, "kept": kept, "needs_restart": needs_restart,
                "new_versions": [f"{r.model} {r.version}" for r in new], "pools": sup.pools.summary()}

    def set_routes(self, pipeline, routes, doc):
        """New A/B fractions (``{router stage: config}``): the broker routes by them from now on; the
        plans (a restarted broker, the next model version) say them too."""
        sup = self.sup
        for sname, cfg in routes.items():
            for st in self.docs[pipeline]["stage"]:
                if st.get("name") == sname:
                    st.update({k: v for k, v in doc_stage(doc, sname).items() if k in ("groups", "salt")})
            plans = [sup.run["pipelines"][pipeline]] + [ld.plan for ld in self.loaded[pipeline].values()]
            for plan in plans:
                plan["groups"][sname]["router"] = cfg
                plan["stages"][sname]["config"] = cfg
        sup.write_run()
        sup.tell_broker(messages.Routes(pipeline, routes))
