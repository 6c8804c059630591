"""A cube behind a (deliberately slow) backend in a running jizhid: hot tier -> disk cache -> remote."""
import json
import pytest

from conftest import assert_topk, demo_pipeline_text, wait_until, write_text
from daemon_helpers import Load, jizhictl_ok, log_lines


def remote_pipeline(tmp_path):
    # The bundle's own cube, read as if it were remote: 1 ms per round trip.
    return write_text(tmp_path / "remote.toml", demo_pipeline_text(
        "remote", pool=2, batch=8,
        options={"cube": ['remote = "slow+file://{cube}?delay_ms=1"', "disk_cache_keys = 3000"]}))


@pytest.mark.slow
def test_three_levels_answer_a_remote_cube_with_the_reference_scores_and_count_their_hits(
        launch, demo_trace, trace_scores, tmp_path, capsys):
    server = launch.start(pipelines=(str(remote_pipeline(tmp_path)),),
                          config_text="[cube]\nhot_tier_mb = 1\nhot_rebuild_s = 1.0\n")
    with Load(server.endpoint, demo_trace, pipeline="default", clients=2, rate=30, deadline_ms=10_000) as load:
        def levels():
            c = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["remote"]
            return c if c["hot_hits"] and c.get("disk_hits") and c.get("remote_keys") else None
        fig = wait_until(levels, 60, interval_s=0.5, what="hits at every level")
    records = load.snapshot()
    assert load.outcomes(records) == {"ok": len(records)}
    for r in records:
        user, items, _ = demo_trace[r["q"]]
        assert_topk(r["reply"], items, trace_scores[r["q"]], 10)
    assert fig["hot_hits"] + fig["disk_hits"] + fig["remote_keys"] == fig["lookups"]
    assert log_lines(server, "disk cache manager pid=")
    text = jizhictl_ok("stats", run_dir=server.run_dir)
    assert "disk cache" in text and "remote cube" in text
    with capsys.disabled():
        print(f"\nremote cube, {len(records)} requests: {fig['lookups']:,} lookups: hot tier {fig['hot_ratio']:.1%}, "
              f"disk cache {fig['disk_ratio']:.1%}, remote {fig['remote_ratio']:.1%}")
    assert server.stop() == 0
    assert not list(server.run_dir.glob("disk-*"))     # the disk cache is removed with its version
