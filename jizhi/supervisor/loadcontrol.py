"""Load control: the shedding controller's glue and the autoscalers, fed by the broker's recent figures.

Every ``shed.period_s`` (or ``autoscale.period_s``) the supervisor loop hands
over to ``LoadControl.ask``, which asks the broker for its recent figures
(LOAD); ``on_load`` gets the reply:

* shedding (jizhi/shedding.py): a pipeline with a ``shedder`` stage has a
  control segment (one writer: this process) and a ``Controller``; the broker
  decides each request's quota at admission, and in mode ``auto`` the
  controller only corrects it: a *trim* from the recent p99 (without warming
  workers' requests) against ``shed.slo_ms``; ``publish_shed`` writes mode,
  quota and policy generation to the segment (the workers read the policy's)
  and tells the broker mode, quota, trim and policy (``messages.Shed``).
  ``jizhictl shed`` is ``shed_command``; ``shed auto`` starts afresh.
* autoscaling (``autoscale.py``): one ``Autoscaler`` per pipeline when
  ``autoscale.enabled``; its decisions become desired pool sizes
  (``Pools.set``, source ``AUTOSCALER``); ``manage()`` does the rest.

Runs in the supervisor process only.
"""
import logging

from jizhi import messages, shedding, shm
from jizhi.control import ControlError
from jizhi.supervisor.autoscale import Autoscaler
from jizhi.supervisor.pools import AUTOSCALER

log = logging.getLogger("jizhi.supervisor")

AUTOSCALE_NOTE_S = 30.0    # why a queueing kind got no worker: logged at most this often
TRIM_LOG_EVERY_S = 5.0     # a shedding trim's changes: logged at most this often (and when it leaves or reaches 1)


class LoadControl:
    def __init__(self, sup):
        self.sup = sup
        self.shed = {}              # pipeline -> its shedding state (segment, controller, mode, quota, ...)
        self.autoscalers = {}       # pipeline -> Autoscaler
        self.autoscale_note_at = {}
        self.next_load = 0.0
        self.next_shed = 0.0

    # -- start --------------------------------------------------------------

    def start(self, plans):
        """At start: the shedding segments and the autoscalers of ``plans``."""
        self.create_shedding(plans)
        settings = self.sup.settings
        if not settings["autoscale.enabled"]:
            return
        for name, plan in plans.items():
            kinds = [g for g, grp in plan["groups"].items() if grp["pool"] > 0]
            budget = settings["autoscale.budget"] or sum(plan["groups"][g]["pool"] for g in kinds)
            self.autoscalers[name] = Autoscaler(kinds, budget, high=settings["autoscale.high"],
                                                sustain=settings["autoscale.sustain"],
                                                cooldown_s=settings["autoscale.cooldown_s"],
                                                wait_ms=settings["autoscale.wait_ms"],
                                                holds={g: float(plan["groups"][g].get("batch_wait_ms", 0.0))
                                                       for g in kinds})
            log.info("autoscaling pipeline %s: %d workers over %s", name, budget, ", ".join(kinds))

    def create_shedding(self, plans):
        """A shedding control segment per pipeline with a shedder stage (jizhi/shedding.py), and its
        load controller; the policy file named by shed.policy_file is checked and copied into the run
        directory (workers read it there)."""
        sup = self.sup
        for name, plan in plans.items():
            if not any(st["processor"] == "shedder" for st in plan["stages"].values()):
                continue
            seg = f"{shm.PREFIX}{sup.instance}.{sup.run_id}.{name}.shed"
            st = {"segment": seg, "control": shedding.Control(seg, writable=True, create=True),
                  "policy_path": str(sup.run_dir / f"shed-{name}.json"), "policy": "rule", "policy_gen": 0,
                  "mode": sup.settings["shed.mode"], "quota": 1.0, "trim": 1.0, "p99_ms": None, "in_flight": 0,
                  "controller": shedding.Controller(sup.settings["shed.slo_ms"], high=sup.settings["shed.high"],
                                                    low=sup.settings["shed.low"])}
            sup.segments[f"_shed.{name}"] = {"shed": seg}
            self.shed[name] = st
            if sup.settings["shed.policy_file"]:
                self.set_shed_policy(st, sup.settings["shed.policy_file"])
            self.publish_shed(name, st)
        self.next_shed = 0.0

    def plan_entry(self):
        """What the plan file says of shedding: {pipeline: {control segment, policy path}}."""
        return {p: {"control": s["segment"], "policy": s["policy_path"]} for p, s in self.shed.items()}

    def rebudget(self):
        """After a reload: an autoscaler whose budget is the config's pools (autoscale.budget = 0) follows them."""
        if self.sup.settings["autoscale.budget"]:
            return
        for name, scaler in self.autoscalers.items():
            scaler.budget = sum(self.sup.pools.config[(name, g)] for g in scaler.groups)

    # -- every turn -------------------------------------------------------------

    def ask(self, now):
        """When due, ask the broker for its recent figures (the reply comes to ``on_load``)."""
        if not (self.shed or self.autoscalers) or now < self.next_load:
            return
        settings = self.sup.settings
        self.next_load = now + min(settings["shed.period_s"] if self.shed else 1e9,
                                   settings["autoscale.period_s"] if self.autoscalers else 1e9)
        self.sup.tell_broker(messages.Load())

    def on_load(self, msg):
        """The broker's LOAD (``messages.Load``), its recent figures: the load controller of every pipeline
        in mode auto, the autoscalers."""
        sup = self.sup
        load = msg.load or {}
        now = sup.clock()
        for name, scaler in self.autoscalers.items():
            fig = (load.get(name) or {}).get("groups")
            if not fig or sup.stopping:
                continue
            pools = {g: sup.pools.desired[(name, g)] for g in scaler.groups}
            changes, why = scaler.update(now, fig, pools)
            if not changes and scaler.blocked and now >= self.autoscale_note_at.get(name, 0.0):
                log.info("autoscale %s: %s", name, scaler.blocked)
                self.autoscale_note_at[name] = now + AUTOSCALE_NOTE_S
            if changes:
                log.info("autoscale %s: %s: %s", name, why,
                         ", ".join(f"{g} {pools[g]} -> {n}" for g, n in changes.items()))
                for g, n in sorted(changes.items(), key=lambda x: x[1] - pools[x[0]]):   # retire first
                    sup.pools.set(name, g, n, source=AUTOSCALER)
        if now < self.next_shed:
            return
        self.next_shed = now + sup.settings["shed.period_s"] - 0.01
        for name, st in self.shed.items():
            fig = load.get(name) or {}
            st["p99_ms"], st["in_flight"] = fig.get("p99_ms"), fig.get("in_flight", 0)
            # Requests refused OVERLOADED for want of a slot since the last period (a new broker counts from 0).
            refused, st["refused"] = fig.get("refused", 0) > st.get("refused", 0), fig.get("refused", 0)
            if st["mode"] == "auto":
                before, st["quota"] = st["trim"], fig.get("kept_recent", 1.0)
                st["trim"] = st["controller"].update(st["p99_ms"], cutting=st["quota"] < 0.995, refused=refused,
                                                     slots_used=fig.get("peak_in_flight", 0) / max(fig.get("slots", 1), 1))
                if st["trim"] != before and (now >= st.get("logged_at", 0.0) or (st["trim"] == 1.0) != (before == 1.0)):
                    st["logged_at"] = now + TRIM_LOG_EVERY_S
                    log.info("pipeline %s: shedding trim %.2f -> %.2f (recent p99 %s ms, %d in flight, mean kept %.2f%s)",
                             name, before, st["trim"], "-" if st["p99_ms"] is None else f"{st['p99_ms']:.1f}",
                             st["in_flight"], st["quota"], ", requests refused for want of a slot" if refused else "")
            self.publish_shed(name, st)

    # -- shedding -----------------------------------------------------------------

    def set_shed_policy(self, st, source):
        """``rule``, or a policy file (checked, then copied where the workers read it)."""
        if source == "rule":
            st["policy"] = "rule"
        else:
            try:
                policy = shedding.load_policy(source)
            except (OSError, ValueError, KeyError) as e:
                raise ControlError(f"shedding policy {source}: {e}")
            shedding.save_policy(policy.doc if hasattr(policy, "doc") else {"policy": "rule"}, st["policy_path"])
            st["policy"] = f"{policy.name} ({source})"
        st["policy_gen"] += 1

    def publish_shed(self, name, st, reset=False):
        """The segment the workers read, and the broker (whose info reports it). At start no broker runs
        yet: its first LOAD reply tells it (``tell_broker`` sends nothing before the sockets open)."""
        st["control"].publish(st["mode"], st["quota"], st["policy_gen"] if st["policy"] != "rule" else 0,
                              st["in_flight"], st["p99_ms"] or 0.0)
        self.sup.tell_broker(messages.Shed(name, st["mode"], round(st["quota"], 4), st["policy"],
                                           round(st["trim"], 4) if st["mode"] == "auto" else 1.0, reset))

    def shed_command(self, args):
        """``jizhictl shed``: status | auto | off | set (quota, policy), for one pipeline or all."""
        names = [args["pipeline"]] if args.get("pipeline") else list(self.shed)
        for n in names:
            if n not in self.shed:
                raise ControlError(f"pipeline {n!r} has no shedder stage (with one: {', '.join(self.shed) or 'none'})")
        op = args["op"]
        for n in names if op != "status" else ():
            st = self.shed[n]
            if op == "auto":       # afresh: the admission cut forgets its rates, the trim is 1
                st["mode"], st["quota"], st["trim"] = "auto", 1.0, 1.0
                st["controller"].trim = 1.0
            elif op == "off":
                st["mode"], st["quota"] = "off", 1.0
            else:
                if args.get("policy"):
                    self.set_shed_policy(st, args["policy"])
                if args.get("quota") is not None:
                    st["mode"], st["quota"] = "manual", float(args["quota"])
            log.info("pipeline %s: shedding %s, quota %.3f, policy %s (jizhictl shed %s)", n, st["mode"], st["quota"],
                     st["policy"], op)
            self.publish_shed(n, st, reset=op == "auto")
        return {n: {"mode": self.shed[n]["mode"], "quota": self.shed[n]["quota"], "trim": self.shed[n]["trim"],
                    "policy": self.shed[n]["policy"],
                    "p99_ms": self.shed[n]["p99_ms"], "in_flight": self.shed[n]["in_flight"],
                    "slo_ms": self.sup.settings["shed.slo_ms"]} for n in names}
