"""User rows on Redis (issue 21, item 3): a team's online user features, read in front of the profile snapshot.

On a real Redis Cluster (3 masters, started by these tests): ``jizhictl profiles push`` writes a snapshot's
users, a reader gets back exactly the snapshot's rows, ``jizhictl profiles set`` changes one user's row and
that user's next score on a real jizhid (the score a request carrying the same values gets), a frozen master
or a stopped cluster degrades its users to the snapshot's row, counted, never a hang, and rows pushed for
other fields are refused, not misread.
"""
import json
import os
import shutil
import signal
import time
import tomllib

import numpy as np
import pytest

from conftest import demo_pipeline_text, wait_until, write_text
from daemon_helpers import jizhictl, jizhictl_ok
from profile_helpers import profile_features
from redis_helpers import require_redis, small_cluster
from jizhi.bundle import Bundle, Profiles, file_entries
from jizhi.bundle import write_text as write_file
from jizhi.cube.userrows import UserRows
from jizhi.pipeline import PipelineError, compile_pipeline
from jizhi.tomlw import toml_text

require_redis()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with small_cluster(tmp_path_factory, "redis-users") as c:
        yield c


@pytest.fixture(scope="module")
def pushed(cluster, demo_bundle):
    url = f"{cluster.url}/demo-users"
    out = jizhictl_ok("profiles", "push", "--model", demo_bundle, url, "--quiet")
    assert "user rows" in out
    return url


def _snapshot_rows(bundle_dir, users):
    b = Bundle(bundle_dir)
    p = Profiles(b, "user")
    rows, known = p.rows(np.asarray(users, dtype=np.uint64))
    dense, values, lens = p.user_features(rows, known)
    return known, dense, values, lens


def test_pushed_rows_read_back_as_the_snapshot_and_absent_users_as_absent(pushed, demo_bundle):
    b = Bundle(demo_bundle)
    ids = np.asarray(Profiles(b, "user").ids)
    some = ids[::max(1, ids.shape[0] // 60)][:60]
    n = some.shape[0]
    users = np.concatenate([some, np.array([int(ids.max()) + 1, int(ids.max()) + 2], dtype=np.uint64)])
    rows = UserRows(pushed + "?ttl_ms=0", b)
    found, dense, lens, values = rows.read(users)
    known, sdense, svalues, slens = _snapshot_rows(demo_bundle, users)
    assert np.array_equal(found, known) and found[:n].all() and not found[n:].any()
    assert np.array_equal(dense[found], sdense[found])
    assert np.array_equal(lens[found], slens[found]) and np.array_equal(values[found], svalues[found])
    assert rows.degraded == 0 and rows.read_users == n
    rows.close()


def test_profiles_set_changes_one_users_row_and_refuses_what_the_model_cannot_take(pushed, demo_bundle):
    b = Bundle(demo_bundle)
    user = int(np.asarray(Profiles(b, "user").ids)[5])
    feats = profile_features(demo_bundle, user)
    new_dense = [round(x + 0.25, 3) for x in feats["dense"]]
    out = json.loads(jizhictl_ok("profiles", "set", "--model", demo_bundle, pushed, str(user),
                                 json.dumps({"dense": new_dense, "u_cat0": 17})))
    assert out["row"]["u_cat0"] == [17] and np.allclose(out["row"]["dense"], new_dense)
    rows = UserRows(pushed + "?ttl_ms=0", b)
    found, dense, lens, values = rows.read(np.array([user], dtype=np.uint64))
    c = [f.name for f in b.user_fields].index("u_cat0")
    assert found[0] and values[0, c, 0] == 17 and lens[0, c] == 1 and np.allclose(dense[0], new_dense)
    other = [f.name for f in b.user_fields].index("u_multi0")          # a field not given keeps its values
    assert lens[0, other] == len(feats["u_multi0"]) and values[0, other, :lens[0, other]].tolist() == feats["u_multi0"]
    rows.close()
    r = jizhictl("profiles", "set", "--model", demo_bundle, pushed, str(user), '{"u_cat0": 5000}')
    assert r.returncode == 2 and "features.u_cat0: raw value 5000 is outside 1..1000" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = jizhictl("profiles", "set", "--model", demo_bundle, pushed.rsplit("/", 1)[0] + "/nobody", str(user), "{}")
    assert r.returncode == 2 and "no user rows 'nobody'" in r.stderr and "profiles push first" in r.stderr


def test_rows_pushed_for_other_fields_are_refused_not_misread(cluster, demo_bundle, tmp_path):
    """A version with one more user field than the pushed rows hold reads the snapshot, and says why once."""
    narrow = tmp_path / "narrow" / "1"
    shutil.copytree(demo_bundle, narrow)
    with open(narrow / "manifest.toml", "rb") as f:
        m = tomllib.load(f)
    for f in m["fields"]:
        if f["name"] == "u_cat5":
            f["context"] = True                  # then not in its rows: rows pushed from it lack u_cat5
    os.unlink(narrow / "profiles" / "users" / "u_cat5.npy")
    m["files"] = [{"path": p, "size": n, "sha256": h} for p, n, h in file_entries(narrow)]
    write_file(narrow / "manifest.toml", toml_text(m))
    url = f"{cluster.url}/narrow-users"
    jizhictl_ok("profiles", "push", "--model", str(narrow), url, "--quiet")
    b = Bundle(demo_bundle)
    rows = UserRows(url + "?ttl_ms=0", b)
    users = np.asarray(Profiles(b, "user").ids)[:10].astype(np.uint64)
    found, _, _, _ = rows.read(users)
    assert not found.any() and rows.refused == 10
    assert not rows.usable
    wide = UserRows(url + "?ttl_ms=0", Bundle(str(narrow)))        # the version it was pushed for reads it
    assert wide.read(users)[0].all()
    rows.close()
    wide.close()


def test_a_frozen_master_degrades_its_users_to_the_snapshot_counted_and_never_hangs(cluster, pushed, demo_bundle):
    b = Bundle(demo_bundle)
    users = np.asarray(Profiles(b, "user").ids)[:200].astype(np.uint64)
    rows = UserRows(pushed + "?ttl_ms=0&timeout_ms=100&retry_ms=300", b)
    assert rows.read(users)[0].all()
    pid = cluster.pid(cluster.masters_of(cluster.ports[0])[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        found, _, _, _ = rows.read(users)
        assert time.monotonic() - t0 < 2.0                   # one budget (100 ms), never a hang
        assert 0 < (~found).sum() < users.shape[0]           # the other masters' users still read
        assert rows.degraded == (~found).sum()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: rows.read(users)[0].all(), 20, interval_s=0.2, what="the thawed master's users")
    rows.close()


def test_a_query_cache_and_user_rows_in_one_pipeline_are_refused(demo_models, tmp_path):
    doc = tomllib.loads(open(os.path.join(os.path.dirname(__file__), "..", "etc", "pipelines",
                                          "demo_cached.toml")).read())
    for s in doc["stage"]:
        if s["processor"] == "data_reader":
            s["user_rows"] = "redis://127.0.0.1:7000/demo-users"
    with pytest.raises(PipelineError, match="a query cache would serve scores computed before"):
        compile_pipeline(doc, str(demo_models))
    for s in doc["stage"]:
        if s["processor"] == "data_reader":
            s["user_rows"] = "redis://127.0.0.1:7000/a/b"
    with pytest.raises(PipelineError, match="names its namespace"):
        compile_pipeline(doc, str(demo_models))


def test_jizhid_reads_user_rows_a_changed_row_changes_the_next_score_and_a_stopped_cluster_degrades(
        cluster, pushed, launch, demo_bundle, demo_trace, tmp_path):
    url = pushed + "?ttl_ms=100&timeout_ms=100&retry_ms=200"
    rows_pipeline = write_text(tmp_path / "rows.toml",
                               demo_pipeline_text("rows", pool=1, options={"reader": [f'user_rows = "{url}"']}))
    plain_pipeline = write_text(tmp_path / "plain.toml", demo_pipeline_text("plain", pool=1))
    server = launch.start(pipelines=(str(rows_pipeline), str(plain_pipeline)))
    user, items, _ = demo_trace[7]
    feats = profile_features(demo_bundle, user)
    changed = dict(feats, dense=[x + 0.5 for x in feats["dense"]], u_cat0=feats["u_cat0"] % 900 + 3)

    def scores(c, pipeline, **kw):
        r = c.score(user, items, pipeline=pipeline, ret="all", deadline_ms=5000, **kw)
        assert r.ok
        return dict(zip(r.item_ids.tolist(), r.scores.tolist()))

    def same(a, b):
        return a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-6

    with server.client(timeout_s=10) as c:
        snapshot = scores(c, "plain")
        assert same(scores(c, "rows"), snapshot)                   # the pushed row is the snapshot's
        jizhictl_ok("profiles", "set", "--model", demo_bundle, pushed, str(user),
                    json.dumps({"dense": changed["dense"], "u_cat0": changed["u_cat0"]}))
        expect = scores(c, "plain", features=changed)              # the same values, carried by a request
        assert not same(expect, snapshot)
        wait_until(lambda: same(scores(c, "rows"), expect), 10, interval_s=0.1, what="the changed row's score")
        # the whole cluster frozen: the user reads the snapshot's row, counted, each request within budget
        pids = [cluster.pid(p) for p in cluster.ports]
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        try:
            # (once the local cache's 100 ms passed, the frozen cluster's users read the snapshot's row)
            wait_until(lambda: same(scores(c, "rows"), snapshot), 10, interval_s=0.05, what="the snapshot's row")
            t0 = time.monotonic()
            for _ in range(4):
                assert same(scores(c, "rows"), snapshot)
            assert time.monotonic() - t0 < 4 * 1.0
            fig = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["rows"]
            assert fig["user_rows"]["degraded"] >= 4 and fig["user_rows"]["read"] >= 2
            assert "user rows on Redis" in jizhictl_ok("stats", run_dir=server.run_dir)
        finally:
            for p in pids:
                os.kill(p, signal.SIGCONT)
        cluster.wait_ok(30)
        wait_until(lambda: same(scores(c, "rows"), expect), 20, interval_s=0.2, what="the row again")
        # a request's own features still win over the row on Redis
        assert same(scores(c, "rows", features=feats), snapshot)
    assert server.stop() == 0
