"""Pool autoscaling: the decision logic, and a real daemon moving a worker to its bottleneck."""
from conftest import wait_until, write_text
from daemon_helpers import Load
import numpy as np
import pytest

from jizhi.supervisor.autoscale import Autoscaler
from jizhi.broker.figures import RING, GroupStats
from jizhi.pipeline import Pipeline


def figures(busy, workers, queue=None, wait=None, p99=None):
    """``wait``: {group: (summed queue wait us, requests dispatched)} so far, as the broker counts them;
    ``p99``: {group: the period's p99 queue wait in us (None: too few requests)}."""
    return {g: {"busy_us": b, "workers": workers[g], "queue": (queue or {}).get(g, 0),
                "wait_us": (wait or {}).get(g, (0, 0))[0], "requests": (wait or {}).get(g, (0, 0))[1],
                "wait_p99_us": (p99 or {}).get(g)}
            for g, b in busy.items()}


def test_with_no_kind_busy_the_kind_whose_requests_queue_takes_a_worker_from_one_that_does_not():
    """The cores are the bottleneck (every kind under autoscale.high): the p99 queue wait decides."""
    a = Autoscaler(["front", "back"], budget=3, high=0.85, sustain=2, cooldown_s=5, wait_ms=10)
    pools = {"front": 2, "back": 1}
    busy, wait = {"front": 0.0, "back": 0.0}, {"front": (0, 0), "back": (0, 0)}
    a.update(0.0, figures(busy, pools, wait=wait), pools)
    moves = []
    for t in range(1, 4):
        busy = {g: busy[g] + 0.5e6 for g in busy}                       # 0.25 and 0.5 per worker
        # 200 requests a second each: mean waits 1 and 4 ms; p99 5 and 27 ms.
        wait = {"front": (wait["front"][0] + 200 * 1_000, wait["front"][1] + 200),
                "back": (wait["back"][0] + 200 * 4_000, wait["back"][1] + 200)}
        moves.append(a.update(float(t), figures(busy, pools, wait=wait, p99={"front": 5_000, "back": 27_000}),
                              pools))
    assert moves[0] == ({}, None)
    changes, why = moves[1]
    assert changes == {"back": 2, "front": 1}
    assert "requests wait 27.0 ms for a worker at p99, 4.0 ms mean" in why and "from front (p99 wait 5.0 ms)" in why
    assert a.last_wait_ms == {"front": 1.0, "back": 4.0}
    assert a.last_wait_p99_ms == {"front": 5.0, "back": 27.0}

    # After the move (and the cooldown) front waits 12 ms at p99 and back 2 ms: a sixth, not the eighth
    # that moving straight back needs; nothing moves.
    pools = {"front": 1, "back": 2}
    for t in range(10, 14):
        busy = {g: busy[g] + 0.5e6 for g in busy}
        assert a.update(float(t), figures(busy, pools, p99={"front": 12_000, "back": 2_000}), pools) == ({}, None)


def test_short_waits_or_no_spare_worker_move_nothing():
    a = Autoscaler(["front", "back"], budget=2, sustain=1, cooldown_s=0, wait_ms=10)
    pools = {"front": 1, "back": 1}
    a.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    # back waits 40 ms but front has a single worker and the budget is full.
    p99 = {"front": 1_000, "back": 40_000}
    assert a.update(1.0, figures({"front": 0.3e6, "back": 0.5e6}, pools, p99=p99), pools) == ({}, None)
    # ... and says why, for the supervisor's log.
    assert a.blocked == ("back's requests wait 40.0 ms at p99 (utilisation 0.50) but no kind can spare a worker "
                         "(one with more than one worker waiting under a quarter of that): front (1 worker, "
                         "p99 wait 1.0 ms)")
    b = Autoscaler(["front", "back"], budget=3, sustain=1, cooldown_s=0, wait_ms=10)
    pools = {"front": 2, "back": 1}
    b.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    assert b.update(1.0, figures({"front": 0.3e6, "back": 0.5e6}, pools, p99={"front": 1_000, "back": 8_000}),
                    pools) == ({}, None)                                  # 8 ms: under wait_ms
    assert b.update(2.0, figures({"front": 0.6e6, "back": 1.0e6}, pools, p99={"front": 5_000, "back": 15_000}),
                    pools) == ({}, None)                                  # front's wait is not under a quarter
    assert b.update(3.0, figures({"front": 0.9e6, "back": 1.5e6}, pools, p99={"front": None, "back": None}),
                    pools) == ({}, None)                                  # too few requests to tell
    off = Autoscaler(["front", "back"], budget=3, sustain=1, cooldown_s=0, wait_ms=0)
    off.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    assert off.update(1.0, figures({"front": 0.3e6, "back": 0.5e6}, pools, p99={"front": 1_000, "back": 80_000}),
                      pools) == ({}, None)


def test_a_move_needs_sustained_evidence_and_then_waits_for_the_cooldown():
    a = Autoscaler(["front", "back"], budget=3, high=0.85, sustain=3, cooldown_s=10)
    pools = {"front": 2, "back": 1}
    busy = {"front": 0.0, "back": 0.0}
    assert a.update(0.0, figures(busy, pools), pools) == ({}, None)      # the first call only records
    moves = []
    for t in range(1, 6):
        busy = {"front": busy["front"] + 0.4e6, "back": busy["back"] + 0.98e6}   # front 0.2/worker, back 0.98
        moves.append(a.update(float(t), figures(busy, pools), pools)[0])
    assert moves[:2] == [{}, {}] and moves[2] == {"back": 2, "front": 1}
    assert moves[3:] == [{}, {}]                 # cooldown
    assert a.last_util["back"] > 0.95


def test_a_budget_with_room_grows_the_bottleneck_and_a_busy_donor_gives_nothing():
    a = Autoscaler(["front", "back"], budget=4, sustain=1, cooldown_s=0)
    pools = {"front": 2, "back": 1}
    a.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    changes, why = a.update(1.0, figures({"front": 0.2e6, "back": 0.99e6}, pools), pools)
    assert changes == {"back": 2} and "budget has room" in why
    full = Autoscaler(["front", "back"], budget=3, sustain=1, cooldown_s=0)
    full.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    # front at 0.6 per worker would be at 1.2 with one worker: it keeps both.
    assert full.update(1.0, figures({"front": 1.2e6, "back": 0.99e6}, pools), pools) == ({}, None)


@pytest.mark.slow
def test_the_daemon_moves_a_worker_to_the_slow_kind_and_keeps_serving(launch, demo_trace, tmp_path):
    # The ranker sleeps 30 ms a request: "back" is the bottleneck, "front" can spare a worker.
    text = (Pipeline("two", model="demo").front(next=["dnn"])
            .stage("dnn", "model_inference", next=["rank"])
            .stage("rank", "tests.stages:SleepyRanker", sleep_s=0.03)
            .fuse("front", ["reader", "features", "cube", "dnn"], pool=2)
            .fuse("back", ["rank"], pool=1, batch=1)).toml()
    path = write_text(tmp_path / "two.toml", text)
    server = launch.start(pipelines=(str(path),), config_text=(
        "[autoscale]\nenabled = true\nperiod_s = 0.3\nsustain = 2\ncooldown_s = 3.0\n"))
    with Load(server.endpoint, demo_trace, pipeline="two", clients=4) as load:
        wait_until(lambda: server.pool_sizes() == {("two", "front"): 1, ("two", "back"): 2}, 60,
                   what="a worker to move from front to back")
        n = load.count_ok()
        wait_until(lambda: load.count_ok() >= n + 20, 30, what="answers after the move")
    assert {r["outcome"] for r in load.snapshot()} == {"ok"}
    assert "autoscale two: back is the bottleneck" in server.log_text()


def test_a_busy_donor_a_batch_hold_or_too_few_requests_give_no_queueing_move():
    pools = {"front": 2, "back": 1}
    p99 = {"front": 2_000, "back": 30_000}
    # front at 0.6 per worker would be at 1.2 with one worker: it keeps both, however long back waits.
    a = Autoscaler(["front", "back"], budget=3, sustain=1, cooldown_s=0, wait_ms=10)
    a.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    assert a.update(1.0, figures({"front": 1.2e6, "back": 0.5e6}, pools, p99=p99), pools) == ({}, None)
    # back holds partial batches 25 ms for company: 30 ms at p99 is 5 ms of queueing, under wait_ms.
    b = Autoscaler(["front", "back"], budget=3, sustain=1, cooldown_s=0, wait_ms=10, holds={"back": 25.0})
    b.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    assert b.update(1.0, figures({"front": 0.3e6, "back": 0.5e6}, pools, p99=p99), pools) == ({}, None)
    # front had too few requests to tell its wait: it is no donor.
    c = Autoscaler(["front", "back"], budget=3, sustain=1, cooldown_s=0, wait_ms=10)
    c.update(0.0, figures({"front": 0, "back": 0}, pools), pools)
    assert c.update(1.0, figures({"front": 0.3e6, "back": 0.5e6}, pools, p99={"front": None, "back": 30_000}),
                    pools) == ({}, None)
    assert c.update(2.0, figures({"front": 0.6e6, "back": 1.0e6}, pools, p99=p99), pools)[0] == \
        {"back": 2, "front": 1}


def test_the_brokers_period_p99_wait_covers_the_requests_since_the_last_figure():
    st = GroupStats()
    assert st.period_wait_p99_us() is None
    for us in range(10):                       # too few: no figure, and they count in the next period
        st.add_wait(1_000)
    assert st.period_wait_p99_us() is None
    for us in range(90):
        st.add_wait(2_000)
    assert st.period_wait_p99_us() == 2_000    # 100 waits: 10 of 1 ms, 90 of 2 ms
    for us in range(99):
        st.add_wait(500)
    st.add_wait(50_000)
    assert st.period_wait_p99_us() == int(np.percentile([500] * 99 + [50_000], 99))
    for us in range(RING + 500):               # more than the ring holds: the last RING of them
        st.add_wait(7_000 if us < 450 else 3_000)    # the first 450 fall out of the ring
    assert st.period_wait_p99_us() == 3_000
    assert st.wait_total_us == 10 * 1_000 + 90 * 2_000 + 99 * 500 + 50_000 + 450 * 7_000 + (RING + 50) * 3_000
