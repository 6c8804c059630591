"""A worker that keeps dying young spends the restart budget: jizhid says it is degraded."""
import json
import pytest

from conftest import wait_until, write_text
from daemon_helpers import jizhictl, popen

PIPELINE = """
name = "broken"
model = "demo"

[[stage]]
name = "rank"
processor = "tests.stages:FailingSetup"
"""


@pytest.mark.slow
def test_a_worker_that_cannot_load_is_retried_with_backoff_and_reported_degraded(launch, tmp_path):
    pipe = write_text(tmp_path / "broken.toml", PIPELINE)
    # Never "ready" (the broken pool never fills), so started without the readiness wait.
    server = popen(launch.start(pipelines=("demo", str(pipe)), wait_ready=False,
                                config_text="[workers]\nrestart_backoff_s = 0.05\n"))

    def degraded():
        r = jizhictl("status", "--json", run_dir=server.run_dir)
        if r.returncode != 0:
            return None
        st = json.loads(r.stdout)
        return st if st["health"] == "degraded" else None

    st = wait_until(degraded, 90, interval_s=0.5, what="jizhid to report the broken worker degraded")
    broken = [p for p in st["processes"] if p["name"] == "broken/rank/0"]
    assert len(broken) == 1
    assert broken[0]["state"] == "degraded"
    assert broken[0]["last_death"] == "exit code 4 (model load failure)"
    assert broken[0]["restarts"] >= 5
    assert "is degraded: 5 quick deaths in a row (last: exit code 4 (model load failure))" in server.log_text()
    demo = [p for p in st["processes"] if p["name"].startswith("demo/scorer/")]
    assert len(demo) == 2
    assert {p["state"] for p in demo} == {"running"}
