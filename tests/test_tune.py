"""The offline tuner (jizhi/tools/tune.py): its search space, its overlay files, and
one real tune end to end (two evaluations and one comparison round, each a
real jizhid started and stopped by the tuner)."""
import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import REPO, processes_mentioning, shm_segments
from jizhi import config
from jizhi.pipeline import compile_pipeline, read_pipeline
from jizhi.tools.tune import REPORT
from jizhi.tools.tunespace import (ARENA, HOT_TIER, PIPELINE_FILE, QCACHE_WINDOW, SETTINGS_FILE, search_space,
                                   write_overlay)

TUNE_TIMEOUT_S = 240   # 4 daemons x (start + 1 s warm-up + 3 s + stop), with room for a slow shared machine


def plan_of(name, models):
    doc = read_pipeline(name)
    return doc, compile_pipeline(doc, str(models))


def test_the_space_of_the_fused_demo_has_one_group_and_no_query_cache_window(demo_models):
    _, plan = plan_of("demo", demo_models)
    space = search_space(plan, config.load(None), cores=2, arena_default=0)
    assert space.groups == ["scorer"]
    assert space.names == ["demo/scorer.pool", "demo/scorer.batch", "demo/scorer.batch_wait_ms",
                           "demo/dnn.item_cache", HOT_TIER, ARENA]
    pool, batch, wait, item_cache, hot, arena = space.dims
    assert (pool.kind, pool.low, pool.high) == ("int", 1, 4)
    assert batch.values == (1, 2, 4, 8, 16, 32)
    assert (wait.kind, wait.low, wait.high) == ("real", 0.0, 5.0)
    # The shipped default (512 MiB) joins the listed budgets, in order.
    assert hot.values == (0, 64, 256, 512, 1024)
    assert arena.values == (1, 2, 4, 0)
    assert item_cache.values == (False, True)
    assert space.default == {"demo/scorer.pool": 2, "demo/scorer.batch": 8, "demo/scorer.batch_wait_ms": 3.0,
                             "demo/dnn.item_cache": False, HOT_TIER: 512, ARENA: 0}
    assert space.max_total_pool == 4
    assert space.from_x(space.to_x(space.default)) == space.default


def test_the_space_of_the_cached_demo_adds_the_window_and_keeps_the_shipped_arena_count(demo_models):
    _, plan = plan_of("demo_cached", demo_models)
    space = search_space(plan, config.load(None, {"qcache.window_s": 120.0, HOT_TIER: 64}), cores=2,
                         arena_default=3)
    assert space.names[-1] == QCACHE_WINDOW
    window = space.dim(QCACHE_WINDOW)
    assert (window.low, window.high, window.default) == (10, 300, 120)
    assert space.dim(HOT_TIER).values == (0, 64, 256, 1024)
    assert space.dim(ARENA).values == (1, 2, 3, 4, 0)
    assert space.default[ARENA] == 3
    assert space.default["demo_cached/dnn.item_cache"] is True      # shipped on in demo_cached.toml


def test_the_pool_total_of_an_unfused_plan_is_bounded_and_the_constraint_rejects_more(demo_models):
    _, plan = plan_of("demo_unfused", demo_models)
    space = search_space(plan, config.load(None), cores=2)
    assert space.groups == ["reader", "features", "cube", "dnn", "rank"]
    # The shipped plan has 6 workers (dnn 2): the total may reach that, each group at most 6 - 4.
    assert space.max_total_pool == 6
    assert {space.dim(f"demo_unfused/{g}.pool").high for g in space.groups} == {2}
    assert space.constraint(space.to_x(space.default))
    crowded = dict(space.default, **{"demo_unfused/reader.pool": 2, "demo_unfused/cube.pool": 2})
    assert space.total_pool(crowded) == 8
    assert not space.allows(crowded) and not space.constraint(space.to_x(crowded))


def test_the_overlay_files_read_back_and_compile_with_the_chosen_settings(demo_models, tmp_path):
    doc, plan = plan_of("demo_cached", demo_models)
    space = search_space(plan, config.load(None), cores=2)
    point = dict(space.default, **{"demo_cached/scorer.pool": 3, "demo_cached/scorer.batch": 16,
                                   "demo_cached/scorer.batch_wait_ms": 1.5, HOT_TIER: 64, ARENA: 2,
                                   QCACHE_WINDOW: 45})
    base = {"workers": {"prefetch": 4}, "metrics": {"listen": "127.0.0.1:9999"}}
    settings_path, pipeline_path = write_overlay(tmp_path, space, point, base, doc, "a test point")
    assert (settings_path.name, pipeline_path.name) == (SETTINGS_FILE, PIPELINE_FILE)

    with open(pipeline_path, "rb") as f:
        tuned = tomllib.load(f)
    tuned_plan = compile_pipeline(tuned, str(demo_models))
    assert tuned_plan["name"] == "demo_cached"
    group = tuned_plan["groups"]["scorer"]
    assert (group["pool"], group["batch"], group["batch_wait_ms"]) == (3, 16, 1.5)
    assert tuned_plan["stage_order"] == plan["stage_order"]
    assert {s: st["processor"] for s, st in tuned_plan["stages"].items()} == \
        {s: st["processor"] for s, st in plan["stages"].items()}
    assert tuned["stage"] == doc["stage"]
    # The item table off: the stage option goes, the rest stays.
    point["demo_cached/dnn.item_cache"] = False
    _, pipeline_path = write_overlay(tmp_path, space, point, base, doc, "a test point")
    with open(pipeline_path, "rb") as f:
        tuned = tomllib.load(f)
    dnn = next(st for st in tuned["stage"] if st["name"] == "dnn")
    assert "item_cache" not in dnn
    assert compile_pipeline(tuned, str(demo_models))["stages"]["dnn"]["config"].get("item_cache") is None

    settings = config.load(str(settings_path))
    assert settings[HOT_TIER] == 64
    assert settings[QCACHE_WINDOW] == 45.0
    assert settings["workers.prefetch"] == 4                      # the base config is kept
    assert settings["metrics.listen"] == "127.0.0.1:9999"          # (the tuner's own runs turn metrics off)
    assert "MALLOC_ARENA_MAX=2" in settings_path.read_text()


def test_the_item_table_is_switched_on_in_the_overlay_and_heads_are_not_offered_it(demo_models, tmp_path):
    doc, plan = plan_of("demo", demo_models)
    space = search_space(plan, config.load(None), cores=2)
    point = dict(space.default, **{"demo/dnn.item_cache": True})
    _, pipeline_path = write_overlay(tmp_path, space, point, {}, doc, "a test point")
    with open(pipeline_path, "rb") as f:
        tuned = tomllib.load(f)
    assert next(st for st in tuned["stage"] if st["name"] == "dnn")["item_cache"] is True
    assert compile_pipeline(tuned, str(demo_models))["stages"]["dnn"]["config"]["item_cache"] is True
    assert "dnn item table on" in space.label(point)


def test_the_overlay_of_an_unfused_plan_sets_pool_and_batch_on_each_stage(demo_models, tmp_path):
    doc, plan = plan_of("demo_unfused", demo_models)
    space = search_space(plan, config.load(None), cores=2)
    point = dict(space.default, **{"demo_unfused/dnn.pool": 1, "demo_unfused/dnn.batch": 32,
                                   "demo_unfused/cube.batch_wait_ms": 2.5})
    _, pipeline_path = write_overlay(tmp_path, space, point, {}, doc, "a test point")
    with open(pipeline_path, "rb") as f:
        tuned_plan = compile_pipeline(tomllib.load(f), str(demo_models))
    assert {g: (v["pool"], v["batch"], v["batch_wait_ms"]) for g, v in tuned_plan["groups"].items()} == {
        "reader": (1, 8, 0.0), "features": (1, 8, 0.0), "cube": (1, 8, 2.5), "dnn": (1, 32, 3.0),
        "rank": (1, 8, 0.0)}


@pytest.mark.slow
def test_a_short_tune_measures_two_points_then_the_default_against_the_chosen_and_writes_the_overlay(
        demo_models, demo_trace, tmp_path):
    trace = tmp_path / "trace.npz"
    np.savez(trace, users=demo_trace.users, offsets=demo_trace.offsets, items=demo_trace.items,
             recall_scores=demo_trace.recall_scores)
    out = tmp_path / "tune"
    argv = [sys.executable, "-m", "jizhi.tools.tune", "--models", str(demo_models), "--trace", str(trace),
            "--pipeline", "demo", "--rate", "20", "--slo-p99", "500", "--evals", "2", "--repeats", "1",
            "--duration", "3", "--warmup", "1", "--allow-repeat", "--quiet", "--out", str(out)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TUNE_TIMEOUT_S, cwd=REPO,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"jizhi.tools.tune exited {r.returncode}\n{r.stderr}\n{r.stdout}"
    report = json.loads((out / REPORT).read_text())
    assert report["status"] == "done"

    path = report["path"]
    assert [e["eval"] for e in path] == [1, 2]
    assert path[0]["is_default"] and path[0]["settings"] == report["space"]["default"]
    for e in path:
        m = e["measurement"]
        assert m["started"] and m["requests"] == 60
        assert m["cpu_s_per_1000_pairs"] > 0 and m["p99_ms"] > 0
        assert m["feasible"] == (m["ok"] == 60 and not m["errors"] and m["lost"] == 0 and m["p99_ms"] <= 500)
        assert m["exit_code"] == 0 and m["shm_left"] == [] and not m["killed"]
    assert path[0]["measurement"]["feasible"], "the default must meet 500 ms at 20 requests/s"

    chosen = report["chosen"]
    assert chosen["eval"] in (1, 2)
    assert path[chosen["eval"] - 1]["measurement"]["feasible"]
    measured = report["comparison"]["measurements"]
    assert [(m["setting"], m["round"]) for m in measured] == [("default", 1), ("chosen", 1)]
    assert all(m["started"] and m["cpu_s_per_1000_pairs"] > 0 for m in measured)
    for which in ("default", "chosen"):
        s = report["comparison"][which]["cpu_s_per_1000_pairs"]
        assert s["n"] == 1 and s["median"] == s["min"] == s["max"] and s["spread"] == 0
    assert report["comparison"]["gain_cpu_s_per_1000_pairs"] == pytest.approx(
        report["comparison"]["default"]["cpu_s_per_1000_pairs"]["median"]
        - report["comparison"]["chosen"]["cpu_s_per_1000_pairs"]["median"], abs=1e-6)

    with open(out / PIPELINE_FILE, "rb") as f:
        tuned_plan = compile_pipeline(tomllib.load(f), str(demo_models))
    settings = config.load(str(out / SETTINGS_FILE))
    want = chosen["settings"]
    group = tuned_plan["groups"]["scorer"]
    assert (group["pool"], group["batch"], group["batch_wait_ms"]) == (
        want["demo/scorer.pool"], want["demo/scorer.batch"], want["demo/scorer.batch_wait_ms"])
    assert settings[HOT_TIER] == want[HOT_TIER]
    table = (out / "tune-path.txt").read_text().splitlines()
    assert table[0].split()[:2] == ["eval", "settings"] and len(table) == 3
    assert "solution path" in r.stdout and "gain:" in r.stdout

    instances = [e["measurement"]["instance"] for e in path] + [m["instance"] for m in measured]
    assert len(set(instances)) == 4
    for instance in instances:
        assert shm_segments(instance) == []
        assert processes_mentioning(f"jizhi-{instance}-") == {}
