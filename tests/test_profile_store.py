"""Profile stores (jizhi/profilestore.py): a version reads a store's snapshots, and a new snapshot published
under load is served from the next batch on, without a reload, a new process or a failed request.

The demo version is copied with its manifest saying ``[profiles] store = DIR`` and without its own
``profiles/``; snapshot 1 is the demo's own profiles built back from npz files (``jizhictl profiles build
--store``), so its scores are the reference scorer's; snapshot 2 changes one user's dense features and carries
the items over (hard links).
"""
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import Launcher, wait_until
from jizhi.bundle import Bundle, Profiles
from jizhi.errors import BundleError
from jizhi.profilestore import profiles as store_profiles, snapshots
from jizhi.tools.profilebuild import BuildError, build_profiles
from profile_helpers import team_tables, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _pipelines(d):
    """demo.toml and demo_cached.toml, one worker each (a worker switches on its own: one is enough)."""
    out = []
    for name in ("demo.toml", "demo_cached.toml"):
        path = d / name
        path.write_text(open(os.path.join(ROOT, "etc", "pipelines", name)).read().replace("pool = 2", "pool = 1"))
        out.append(str(path))
    return out


def _store_version(demo_bundle, models, store):
    """<models>/demo/1: the demo version reading ``store`` (a path relative to ``models``), without profiles/."""
    from jizhi.bundle import file_entries, write_text
    import tomllib
    from jizhi.tomlw import toml_text
    dst = models / "demo" / "1"
    shutil.copytree(demo_bundle, dst, ignore=shutil.ignore_patterns("profiles"))
    with open(dst / "manifest.toml", "rb") as f:
        m = tomllib.load(f)
    m["profiles"] = {"store": store}
    m["files"] = [{"path": p, "size": n, "sha256": h} for p, n, h in file_entries(dst)]
    write_text(dst / "manifest.toml", toml_text(m))
    return dst


@pytest.fixture(scope="module")
def store_setup(demo_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("pstore")
    models = d / "models"
    store = models.parent / "stores" / "demo"
    version = _store_version(demo_bundle, models, "../stores/demo")
    tables, spec = team_tables(demo_bundle)
    (d / "spec.toml").write_text(spec)
    for side in ("user", "item"):
        write_table("npz", tables[side], d / f"{side}s.npz")
    r = build_profiles(str(version), users=str(d / "users.npz"), items=str(d / "items.npz"),
                       spec=str(d / "spec.toml"), store=str(store))
    assert r["snapshot"] == 1 and snapshots(store) == [1]
    return {"dir": d, "models": models, "store": store, "version": version, "tables": tables}


def test_a_version_reading_a_store_validates_and_says_which_snapshot_it_reads(store_setup, demo_bundle):
    from jizhi.validate import validate
    b = Bundle(store_setup["version"])
    assert b.profile_store == store_setup["store"].resolve()
    validate(str(store_setup["version"]))            # raises on any failed check
    p = store_profiles(b, "user")
    assert p.root == store_setup["store"].resolve() / "1"
    with pytest.raises(BundleError, match="reads profile store"):
        Profiles(b, "user")                         # it has no profiles of its own
    assert np.array_equal(p.ids, Profiles(Bundle(demo_bundle), "user").ids)


def test_a_snapshot_published_under_load_is_served_from_the_next_batch_without_a_failed_request(
        store_setup, demo_trace, trace_scores, tmp_path_factory):
    d, store, version = store_setup["dir"], store_setup["store"], store_setup["version"]
    tables = store_setup["tables"]
    with Launcher(tmp_path_factory, store_setup["models"]) as launcher:
        server = launcher.start(pipelines=_pipelines(d))
        user, items, recall = demo_trace[0]
        with server.client() as c:
            for pipeline in ("demo", "demo_cached"):
                r = c.score(user, items, recall, pipeline=pipeline, ret="all", deadline_ms=10_000)
                assert r["profile_snapshot"] == 1
                ref = trace_scores[0]
                got = dict(zip(r.item_ids.tolist(), r.scores.tolist()))
                assert max(abs(got[int(i)] - s) for i, s in zip(items, ref)) < 1e-5
            before = c.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=10_000)
            other_user, other_items, _ = demo_trace[1]
            other_before = c.score(other_user, other_items, pipeline="demo", ret="all", deadline_ms=10_000)

        # Load from another client while snapshot 2 is published: user's dense features change.
        stop, replies, failures = threading.Event(), [], []

        def load():
            with server.client(timeout_s=10.0) as lc:
                q = 2
                while not stop.is_set():
                    u, its, rs = demo_trace[q % len(demo_trace)]
                    try:
                        r = lc.score(u, its, rs, pipeline=("demo", "demo_cached")[q % 2], deadline_ms=5_000)
                        replies.append((time.monotonic(), r["profile_snapshot"]))
                    except Exception as e:         # any failure fails the test below
                        failures.append(repr(e))
                    q += 1

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            wait_until(lambda: len(replies) >= 20, 30, what="the load running on snapshot 1")
            users = {k: (list(v) if isinstance(v, list) else np.array(v)) for k, v in tables["user"].items()}
            row = int(np.flatnonzero(users["user_id"] == user)[0])
            users["dense"][row] = users["dense"][row] + 1.0
            write_table("npz", users, d / "users2.npz")
            r = build_profiles(str(version), users=str(d / "users2.npz"), spec=str(d / "spec.toml"),
                               store=str(store))
            assert r["snapshot"] == 2
            # the items were carried over: the same files, hard-linked
            assert os.path.samefile(store / "1" / "items" / "sigs.npy", store / "2" / "items" / "sigs.npy")
            wait_until(lambda: [s for _, s in replies[-20:]].count(2) == 20, 30, what="replies from snapshot 2")
        finally:
            stop.set()
            t.join(20)
        assert not failures, failures[:3]
        seen = [s for _, s in replies]
        assert set(seen) <= {1, 2} and seen.count(1) > 0
        # Each worker switches at its own next batch boundary (it looks at most every POLL_S = 1 s): the
        # replies of both snapshots overlap for about that long, then only snapshot 2 answers.
        first2 = next(t for t, s in replies if s == 2)
        last1 = max(t for t, s in replies if s == 1)
        assert last1 - first2 < 3.0, (last1 - first2)
        with server.client() as c:
            after = c.score(user, items, recall, pipeline="demo", ret="all", deadline_ms=10_000)
            other_after = c.score(other_user, other_items, pipeline="demo", ret="all", deadline_ms=10_000)
        assert after["profile_snapshot"] == 2
        assert not np.allclose(after.scores, before.scores)             # the changed user's scores changed
        assert np.allclose(other_after.scores, other_before.scores, rtol=0, atol=1e-6)  # nobody else's
        log = server.log_text()
        assert "snapshot 1 -> 2" in log
        assert not re.search(r"item_rows: .*profile snapshot 2", log)   # items carried over: rows kept

        # Snapshot 3 changes one item's category (users carried over): demo_cached builds its item rows and
        # item table again, and the item's score changes in both pipelines.
        item = int(items[0])
        cats = np.array(tables["item"]["i_cat1"])
        row = int(np.flatnonzero(tables["item"]["item_id"] == item)[0])
        changed = {k: (list(v) if isinstance(v, list) else np.array(v)) for k, v in tables["item"].items()}
        changed["i_cat1"][row] = (cats[row] + 1) % 50
        write_table("npz", changed, d / "items3.npz")
        assert build_profiles(str(version), items=str(d / "items3.npz"), spec=str(d / "spec.toml"),
                              store=str(store))["snapshot"] == 3
        with server.client() as c:
            def on3():
                return all(c.score(user, items, recall, pipeline=p, deadline_ms=10_000)["profile_snapshot"] == 3
                           for p in ("demo", "demo", "demo_cached", "demo_cached"))
            wait_until(on3, 30, what="snapshot 3 served")
            for pipeline in ("demo", "demo_cached"):
                r3 = c.score(user, items, recall, pipeline=pipeline, ret="all", deadline_ms=10_000)
                got = dict(zip(r3.item_ids.tolist(), r3.scores.tolist()))
                was = dict(zip(after.item_ids.tolist(), after.scores.tolist()))
                assert got[item] != was[item]
                assert all(abs(got[int(i)] - was[int(i)]) < 1e-6 for i in items[1:20])
        log = server.log_text()
        # demo_cached built its new item rows and item table a step per batch, then switched
        assert re.search(r"item_rows: .*profile snapshot 3, built in .* into the version's shared copy in steps "
                         r"between batches", log)
        assert re.search(r"item_cache: item table of profile snapshot 3 built in .* into the version's shared copy "
                         r"in steps between batches", log)

        # A snapshot that does not fit (built for another hashing) is refused, logged, and 3 stays.
        bad = store / "4"
        shutil.copytree(store / "3", bad)
        text = (bad / "profiles.toml").read_text()
        (bad / "profiles.toml").write_text(text.replace("hash_seed = 0", "hash_seed = 99"))
        with server.client() as c:
            def refused():       # (a worker looks for snapshots at its batch boundaries: it needs requests)
                assert c.score(user, items, recall, pipeline="demo", deadline_ms=10_000)["profile_snapshot"] == 3
                return "profile snapshot 4 not used" in server.log_text()
            wait_until(refused, 30, interval_s=0.2, what="snapshot 4 refused")
        assert "hash_seed 99" in server.log_text()
        out = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), "profiles", "list", str(store),
                              "--models", str(store_setup["models"])], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "items carried over" in out.stdout and "users carried over" in out.stdout
        assert "read by demo version 1: snapshot 3" in out.stdout and "snapshot 4 does not fit" in out.stdout

        # With no request at all, every worker takes up the next snapshot (idle, its batch boundaries run).
        assert build_profiles(str(version), users=str(d / "users2.npz"), spec=str(d / "spec.toml"),
                              store=str(store))["snapshot"] == 5
        wait_until(lambda: server.log_text().count("snapshot 3 -> 5") == 2, 30, interval_s=0.2,
                   what="every worker of both pipelines on snapshot 5 without a request")

        # The old snapshots are unmapped once no worker reads them: the workers map 5's users and 3's items.
        def mapped():
            paths = set()
            for pid in server.workers():
                with open(f"/proc/{pid}/maps") as f:
                    paths |= {line.split()[-1] for line in f if str(store) in line}
            return paths
        wait_until(lambda: all(p.startswith((f"{store}/5/", f"{store}/3/items/")) for p in mapped()), 15,
                   what="only snapshot 5's users and 3's items mapped")
        assert any(p.startswith(f"{store}/5/users/") for p in mapped())


def test_a_store_build_of_one_side_needs_a_snapshot_to_carry_the_other_from(demo_bundle, tmp_path):
    tables, spec = team_tables(demo_bundle)
    (tmp_path / "spec.toml").write_text(spec)
    write_table("npz", tables["user"], tmp_path / "users.npz")
    with pytest.raises(BuildError, match="the first one needs --users and --items"):
        build_profiles(demo_bundle, users=str(tmp_path / "users.npz"), spec=str(tmp_path / "spec.toml"),
                       store=str(tmp_path / "store"))
    assert snapshots(tmp_path / "store") == []


def test_one_build_at_a_time_per_store_and_a_snapshot_laid_out_for_other_item_fields_does_not_fit(
        store_setup, tmp_path):
    import fcntl
    from jizhi.profilestore import fits
    d, store, version = store_setup["dir"], store_setup["store"], store_setup["version"]
    with open(store / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BuildError, match="another jizhictl profiles build is publishing into this store"):
            build_profiles(str(version), users=str(d / "users.npz"), spec=str(d / "spec.toml"), store=str(store))
    snap = tmp_path / "snap"
    shutil.copytree(store / "1", snap)
    text = (snap / "profiles.toml").read_text()
    order = re.search(r'item_order = \[(.*?)\]', text).group(1)
    names = [n.strip() for n in order.split(",")]
    swapped = ", ".join([names[1], names[0]] + names[2:])
    (snap / "profiles.toml").write_text(text.replace(order, swapped))
    why = fits(str(snap), Bundle(str(version)))
    assert why is not None and "item signatures laid out for item fields" in why
