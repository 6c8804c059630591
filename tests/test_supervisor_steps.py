"""The supervisor's reconcile loop, stepped by hand: no process, no socket (issue 18, item 6).

A ``Supervisor`` is built with an injected clock, a spawner that hands out fake
processes (each exits when the test says so) and a list that captures what
would go to the broker; the test sets up what ``prepare()`` would have (one
pipeline ``demo`` with a ``scorer`` pool, its serving version in bank 0, the
stats rows) and calls the loop's verbs itself:

* ``manage()`` starts missing workers up to the desired pool size and retires
  extra ones (through the broker, then SIGTERM past the drain bound);
* ``reap()`` reports a dead worker to the broker at once and sets the restart
  backoff of a child that died young, doubling up to its cap; the restart
  budget makes a child degraded until it stays up;
* ``jizhictl scale`` only changes the desired size: the next ``manage()``
  changes the world;
* ``murder()`` replaces a worker whose heartbeat stopped;
* the version manager switches to a warm version, drains and unloads the old
  one, and fails a version that is not warm in time;
* the broker's messages are typed (jizhi/messages.py), each to its handler;
  the registry, the loader and the broker say a version's state with one set
  of words (jizhi/states.py).
"""
import logging
import signal
import types

from pathlib import Path

import numpy as np
import pytest

from conftest import Clock
from jizhi import config, messages, protocol
from jizhi import stats as stats_mod
from jizhi.states import VersionState
from jizhi.supervisor.arbiter import Supervisor
from jizhi.supervisor.children import BROKER, MAX_BACKOFF_S, RESTART_BUDGET, YOUNG_S, Child, Kind, WorkerKey
from jizhi.supervisor.commands import handle
from jizhi.supervisor.loader import Loader
from jizhi.supervisor.registry import Registry, VersionRecord

BACKOFF_S = 0.5     # workers.restart_backoff_s of these tests


class FakeProcess:
    """What the spawner returns: exits when the test calls ``exit(rc)``; records the signals sent to it."""

    def __init__(self, pid, argv):
        self.pid, self.argv = pid, argv
        self.returncode = None
        self.signals = []

    def poll(self):
        return self.returncode

    def exit(self, rc):
        self.returncode = rc

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append(signal.SIGKILL)


class Spawner:
    def __init__(self):
        self.started = []
        self.next_pid = 100

    def __call__(self, argv, env):
        self.next_pid += 1
        proc = FakeProcess(self.next_pid, argv)
        self.started.append(proc)
        return proc


class Stepper:
    """A Supervisor as ``prepare()`` leaves it, with ``demo`` serving version 1 in bank 0."""

    def __init__(self, tmp_path, pool=2):
        self.clock, self.spawner, self.sent = Clock(), Spawner(), []
        settings = config.load(None, {"server.run_dir": str(tmp_path), "workers.restart_backoff_s": BACKOFF_S,
                                      "workers.max_pool": 4})
        self.sup = sup = Supervisor(settings, tmp_path / "models", [], clock=self.clock, spawner=self.spawner,
                                    to_broker=self.sent.append)
        self.plan = {"name": "demo", "model": "demo", "version": 1,
                     "groups": {"scorer": {"pool": pool, "stages": ["scorer"]}},
                     "stages": {"scorer": {"processor": "ranker"}}}
        sup.run = {"pipelines": {"demo": self.plan}, "default_pipeline": "demo"}
        sup.plan_path = tmp_path / "plan.msgpack"
        rows, n = stats_mod.row_map(sup.run["pipelines"], settings["workers.max_pool"])
        sup.stats_spec = {"segment": None, "rows": n, "map": rows}
        sup.stats_shm = types.SimpleNamespace(heartbeat=np.zeros(n),
                                              counters=np.zeros((n, stats_mod.N_COUNTERS), dtype=np.int64))
        sup.versions.registry = Registry(tmp_path / "models", settings, {"demo": None})
        sup.versions.models_of = {"demo": ["demo"]}
        self.v1 = self.version(1, bank=0, state=VersionState.SERVING, record_state=VersionState.SERVING)
        sup.pools.start("demo", "scorer", pool)
        sup.children[BROKER] = Child.broker(["broker"])

    def version(self, v, bank, state, record_state):
        path = Path(self.sup.models_dir) / "demo" / str(v)     # (on disk: the registry's scans keep it)
        path.mkdir(parents=True)
        (path / "manifest.toml").touch()
        rec = VersionRecord("demo", v, path)
        rec.state = record_state
        self.sup.versions.registry.records["demo"][v] = rec
        ld = Loader("demo", rec, bank, state, now=self.clock())
        ld.plan = dict(self.plan, version=v)
        self.sup.versions.loaded.setdefault("demo", {})[bank] = ld
        return ld

    def workers(self, bank=0):
        """{wid: Child} of the scorer pool's bank."""
        return {c.wid: c for c in self.sup.children.values() if c.is_worker and c.bank == bank}

    def messages(self):
        """What went to the broker since the last call, decoded."""
        out = [protocol.unpackb(frames[0]) for frames in self.sent]
        self.sent.clear()
        return out

    def beat(self, child):
        """The worker's loop runs: its heartbeat in its stats row."""
        self.sup.stats_shm.heartbeat[self.sup.worker_row(child.key)] = self.clock()


@pytest.fixture
def step(tmp_path):
    return Stepper(tmp_path)


def test_manage_starts_the_broker_and_every_missing_worker_up_to_the_desired_pool_size(step):
    step.sup.manage()
    assert [p.argv[p.argv.index("-m") + 1] if "-m" in p.argv else p.argv[0] for p in step.spawner.started] == [
        "broker", "jizhi.workers.run", "jizhi.workers.run"]
    workers = step.workers()
    assert sorted(workers) == [0, 1]
    assert {c.key for c in workers.values()} == {WorkerKey("demo", "scorer", 0, 0), WorkerKey("demo", "scorer", 1, 0)}
    assert all(c.kind is Kind.WORKER and c.version == 1 and c.started == step.clock() for c in workers.values())
    argv = workers[1].proc.argv
    assert argv[argv.index("--wid") + 1] == "1" and argv[argv.index("--pipeline") + 1] == "demo"
    assert "--nice" not in argv     # a serving version's workers run at normal priority
    assert step.sup.children[BROKER].kind is Kind.BROKER and step.sup.children[BROKER].name == "broker"
    step.sup.manage()
    assert len(step.spawner.started) == 3     # nothing missing: nothing started
    assert step.messages() == []


def test_scale_changes_only_the_desired_size_and_the_next_manage_starts_or_retires_workers(step):
    sup = step.sup
    sup.manage()
    reply = handle(sup, {"v": 1, "cmd": "scale", "args": {"group": "scorer", "n": 3}})
    assert reply == {"v": 1, "ok": True, "result": {"pipeline": "demo", "group": "scorer", "before": 2, "after": 3}}
    assert sup.pools.desired == {("demo", "scorer"): 3} and sup.pools.source == {("demo", "scorer"): "jizhictl scale"}
    assert len(step.workers()) == 2     # the command changed no process
    sup.manage()
    assert sorted(step.workers()) == [0, 1, 2]

    assert handle(sup, {"v": 1, "cmd": "scale", "args": {"group": "scorer", "n": 1}})["ok"]
    sup.manage()
    workers = step.workers()
    retired = sorted((m["t"], m["wid"], m["pid"]) for m in step.messages())
    assert retired == [(protocol.T_RETIRE, 1, workers[1].pid), (protocol.T_RETIRE, 2, workers[2].pid)]
    assert [w for w, c in sorted(workers.items()) if c.retiring] == [1, 2]
    assert len(step.spawner.started) == 4

    # They leave once the broker stopped them: reaped, reported, removed, not restarted nor counted.
    for wid in (1, 2):
        workers[wid].proc.exit(0)
    sup.reap()
    assert sorted((m["t"], m["wid"]) for m in step.messages()) == [(protocol.T_WORKER_DEAD, 1),
                                                                   (protocol.T_WORKER_DEAD, 2)]
    sup.manage()
    assert sorted(step.workers()) == [0]
    assert len(step.spawner.started) == 4
    assert workers[1].restarts == 0 and workers[2].restarts == 0


def test_scale_refuses_a_pool_of_zero_an_unknown_group_and_more_than_max_pool(step):
    def error(args):
        reply = handle(step.sup, {"v": 1, "cmd": "scale", "args": args})
        assert reply["ok"] is False
        return reply["error"]
    assert error({"group": "scorer", "n": 0}).startswith("the pool size must be an integer >= 1")
    assert error({"group": "ranker", "n": 2}) == ("pipeline demo has no stage or fused group 'ranker' "
                                                  "(groups: scorer)")
    assert error({"group": "scorer", "n": 5}) == "the pool size must be at most workers.max_pool = 4"
    assert step.sup.pools.desired == {("demo", "scorer"): 2}


def test_a_retired_worker_that_does_not_stop_within_the_drain_bound_gets_sigterm(step):
    sup = step.sup
    sup.manage()
    sup.pools.set("demo", "scorer", 1)
    sup.manage()
    late = step.workers()[1]
    step.clock.advance(sup.settings["workers.drain_timeout_s"])
    sup.manage()
    assert late.proc.signals == []
    step.clock.advance(0.1)
    sup.manage()
    assert late.proc.signals == [signal.SIGTERM]
    sup.manage()
    assert late.proc.signals == [signal.SIGTERM]     # once


def test_a_dead_worker_is_reported_to_the_broker_at_once_and_restarted_after_its_backoff(step, caplog):
    sup = step.sup
    sup.manage()
    victim = step.workers()[0]
    pid = victim.pid
    step.messages()
    step.clock.advance(1.0)
    victim.proc.exit(-signal.SIGKILL)
    with caplog.at_level(logging.INFO, logger="jizhi.supervisor"):
        sup.reap()
    assert step.messages() == [{"t": protocol.T_WORKER_DEAD, "pipeline": "demo", "group": "scorer", "wid": 0,
                                "pid": pid}]
    assert f"demo/scorer/0 pid={pid} died: killed by SIGKILL" in caplog.text
    assert (victim.proc, victim.restarts, victim.quick_deaths, victim.last_death) == (None, 1, 1, "killed by SIGKILL")
    assert victim.not_before == step.clock() + BACKOFF_S
    sup.manage()
    assert victim.proc is None      # backing off
    step.clock.advance(BACKOFF_S)
    sup.manage()
    assert victim.pid != pid and victim.started == step.clock()


def test_each_quick_death_in_a_row_doubles_the_backoff_up_to_its_cap(step):
    sup = step.sup
    sup.manage()
    victim = step.workers()[0]
    backoffs = []
    for _ in range(7):
        victim.proc.exit(1)
        sup.reap()
        backoffs.append(victim.backoff_s)
        step.clock.advance(victim.backoff_s)
        sup.manage()
    assert backoffs == [0.5, 1.0, 2.0, 4.0, 8.0, MAX_BACKOFF_S, MAX_BACKOFF_S]


def test_a_child_that_dies_after_young_s_is_restarted_at_once(step):
    sup = step.sup
    sup.manage()
    broker = sup.children[BROKER]
    step.clock.advance(YOUNG_S + 1)
    broker.proc.exit(1)
    sup.reap()
    assert step.messages() == []     # the broker is no worker to report
    assert (broker.backoff_s, broker.quick_deaths, broker.restarts) == (0.0, 0, 1)
    sup.manage()
    assert broker.proc is step.spawner.started[-1] and broker.started == step.clock()


def test_a_worker_that_recycles_itself_is_replaced_at_once_without_a_backoff(step, caplog):
    sup = step.sup
    sup.manage()
    worker = step.workers()[1]
    pid = worker.pid
    worker.proc.exit(0)
    with caplog.at_level(logging.INFO, logger="jizhi.supervisor"):
        sup.reap()
    assert f"demo/scorer/1 pid={pid} recycled itself" in caplog.text
    assert (worker.backoff_s, worker.quick_deaths) == (0.0, 0)
    sup.manage()
    assert worker.pid not in (None, pid)


def test_the_restart_budget_spent_makes_a_child_degraded_until_it_stays_up_young_s(step, caplog):
    sup = step.sup
    sup.manage()
    victim = step.workers()[0]
    with caplog.at_level(logging.INFO, logger="jizhi.supervisor"):
        for i in range(RESTART_BUDGET):
            assert victim.state() == "running"
            victim.proc.exit(4)
            sup.reap()
            assert victim.state() == ("degraded" if i == RESTART_BUDGET - 1 else "restarting")
            assert sup.reports.failing_children() == ["demo/scorer/0"]
            step.clock.advance(victim.backoff_s)
            sup.manage()
    assert caplog.text.count("is degraded") == 1
    assert (f"demo/scorer/0 is degraded: {RESTART_BUDGET} quick deaths in a row (last: exit code 4 "
            f"(model load failure)); retrying every {MAX_BACKOFF_S:.0f} s") in caplog.text
    assert victim.state() == "degraded" and victim.restarts == RESTART_BUDGET
    step.clock.advance(YOUNG_S - 0.1)
    sup.manage()
    assert victim.state() == "degraded"
    step.clock.advance(0.1)
    with caplog.at_level(logging.INFO, logger="jizhi.supervisor"):
        sup.manage()
    assert victim.state() == "running" and victim.quick_deaths == 0
    assert sup.reports.failing_children() == []
    assert f"demo/scorer/0 is up again for {YOUNG_S:.0f} s: no longer degraded" in caplog.text


def test_murder_sends_sigterm_to_a_worker_whose_heartbeat_stopped_then_sigkill(step):
    sup = step.sup
    sup.manage()
    workers = step.workers()
    for c in workers.values():
        step.beat(c)
    step.clock.advance(sup.settings["workers.hung_timeout_s"])
    step.beat(workers[1])
    sup.murder()
    assert workers[0].proc.signals == [] and workers[1].proc.signals == []
    step.clock.advance(0.5)
    sup.murder()
    assert workers[0].proc.signals == [signal.SIGTERM] and workers[1].proc.signals == []
    step.clock.advance(2.0)
    sup.murder()
    assert workers[0].proc.signals == [signal.SIGTERM, signal.SIGKILL]


def test_a_worker_that_never_starts_its_loop_is_killed_after_the_boot_timeout(step):
    sup = step.sup
    sup.manage()
    stuck = step.workers()[0]
    step.clock.advance(sup.settings["workers.boot_timeout_s"] + 0.1)
    step.beat(step.workers()[1])
    sup.murder()
    assert stuck.proc.signals == [signal.SIGTERM] and step.workers()[1].proc.signals == []


def test_a_warm_version_serves_the_old_one_drains_and_is_unloaded_once_its_workers_are_gone(step):
    sup = step.sup
    sup.manage()
    v2 = step.version(2, bank=1, state=VersionState.LOADING, record_state=VersionState.LOADING)
    v2.record.t_load = 0.0
    sup.manage()
    loading = step.workers(bank=1)
    # A loading version's workers start one at a time, the next once the one before runs its loop.
    assert {w: c.proc is not None for w, c in loading.items()} == {0: True, 1: False}
    argv = loading[0].proc.argv
    # At the idle priority (models.load_priority) where it may come back from it (this test runs as a user
    # that may: root or CAP_SYS_NICE), else niced.
    from jizhi import priority
    if priority.can_leave_idle():
        assert "--idle" in argv and "--nice" not in argv
    else:
        assert argv[argv.index("--nice") + 1] == str(sup.settings["models.load_nice"])
    sup.manage()
    assert loading[1].proc is None
    step.beat(loading[0])
    sup.manage()
    assert loading[1].proc is not None
    step.messages()

    sup.on_broker_message(messages.Warm("demo", 2, True, took_ms=5))
    assert (v2.state, step.v1.state) == (VersionState.SERVING, VersionState.DRAINING)
    assert (v2.record.state, step.v1.record.state) == (VersionState.SERVING, VersionState.DRAINING)
    assert step.messages() == [{"t": protocol.T_ACTIVATE, "pipeline": "demo", "version": 2}]
    assert sup.versions.find_serving("demo") is v2

    sup.on_broker_message(messages.VersionIdle("demo", 1))
    assert step.v1.state == VersionState.STOPPING
    sup.manage()
    old = step.workers(bank=0)
    assert sorted((m["t"], m["wid"]) for m in step.messages()) == [(protocol.T_RETIRE, 0), (protocol.T_RETIRE, 1)]
    for c in old.values():
        c.proc.exit(0)
    sup.reap()
    sup.manage()
    sup.manage()
    assert list(sup.versions.loaded["demo"]) == [1]
    assert [m for m in step.messages() if m["t"] == protocol.T_VERSION_DROP] == [
        {"t": protocol.T_VERSION_DROP, "pipeline": "demo", "version": 1}]
    assert step.v1.record.state == VersionState.STANDBY
    assert sorted(step.workers(bank=1)) == [0, 1] and step.workers(bank=0) == {}


def test_a_version_not_warm_within_the_boot_timeout_fails_and_its_workers_stop(step):
    sup = step.sup
    sup.manage()
    v2 = step.version(2, bank=1, state=VersionState.LOADING, record_state=VersionState.LOADING)
    sup.manage()
    step.messages()
    limit = sup.settings["workers.boot_timeout_s"] + 60
    step.clock.advance(limit)
    sup.versions.converge_models()
    assert v2.state == VersionState.LOADING
    step.clock.advance(0.1)
    sup.versions.converge_models()
    assert v2.state == VersionState.FAILED and step.v1.state == VersionState.SERVING
    assert v2.record.state == VersionState.FAILED and v2.record.error == f"not ready and warm within {limit:g} s"
    assert step.messages() == [{"t": protocol.T_VERSION_FAIL, "pipeline": "demo", "version": 2,
                                "reason": f"not ready and warm within {limit:g} s"}]
    stopping = step.workers(bank=1)     # wid 0 started, wid 1 waiting for it
    assert {w: (c.retiring, c.proc is not None) for w, c in stopping.items()} == {0: (True, True), 1: (True, False)}
    stopping[0].proc.exit(-signal.SIGTERM)
    sup.reap()
    sup.manage()
    sup.manage()
    assert list(sup.versions.loaded["demo"]) == [0]
    assert step.workers(bank=1) == {}
    assert sorted(step.workers(bank=0)) == [0, 1]


def test_the_broker_s_messages_reach_one_handler_per_type_and_a_malformed_one_is_logged_and_dropped(step, caplog):
    sup = step.sup
    sup.on_broker_message(messages.Info({"run_id": "another"}))
    assert sup.reports.broker_info == {"run_id": "another"}
    sup.on_broker_message(messages.Invalid("demo", 1, 20, 100, 4.5))
    assert step.v1.record.state == VersionState.FAILED
    assert step.v1.record.error.startswith("20 of 100 scores not finite (NaN or infinite), 20.00% > ")
    sup.on_broker_message(messages.Drained())     # (only the stop waits for it: nothing happens here)
    frames = iter([b"\xc1", protocol.packb({"t": "nope"}), messages.VersionIdle("demo", 1).encode()[0]])
    sup.ctl = types.SimpleNamespace(recv=lambda: next(frames))
    with caplog.at_level(logging.WARNING, logger="jizhi.supervisor"):
        assert sup.read_broker() is None and sup.read_broker() is None
    assert sup.read_broker() == messages.VersionIdle("demo", 1)
    assert caplog.text.count("dropping a malformed message from the broker") == 2


def test_a_drain_and_a_resume_go_to_the_broker_as_its_typed_messages(step):
    step.sup.set_draining(True)
    step.sup.set_draining(False)
    assert [messages.decode(frames) for frames in step.sent] == [messages.Drain(reply=False), messages.Resume()]


def test_one_set_of_state_words_each_owner_using_its_own_and_refusing_the_others(step):
    from jizhi.broker import versions as broker_versions
    from jizhi.supervisor import loader, registry
    tables = [registry.TRANSITIONS, loader.TRANSITIONS, broker_versions.TRANSITIONS]
    for table in tables:
        assert all(set(nexts) <= set(table) for nexts in table.values())
    assert set().union(*tables) == set(VersionState)
    with pytest.raises(ValueError):
        step.v1.to(VersionState.WARM)           # the broker's word, not a loader's
    with pytest.raises(ValueError):
        step.v1.record.to(VersionState.STOPPING)    # the loader's word, not the registry's
    # On the wire, info says "active" for serving (jizhictl prints it); the plan file says a stopping
    # version is still draining (the broker has no stopping).
    assert VersionState.SERVING.wire == "active" and VersionState.DRAINING.wire == "draining"
    assert VersionState.from_wire("active") is VersionState.from_wire("serving") is VersionState.SERVING
    assert step.v1.entry()["state"] == "serving"
    step.v1.to(VersionState.DRAINING)
    step.v1.to(VersionState.STOPPING)
    assert step.v1.entry()["state"] == "draining"
