"""The query cache (jizhi/qcache.py) in real shared memory.

Every test makes its own segment ``/dev/shm/jizhi.test-qcache-<pid>-<n>`` and
removes it on the way out, pass or fail. The hammer tests start fresh
interpreters (this file run as a script, one role per process) that attach
to the segment the test created, wait for "go" on stdin, work for a bounded
time and print one JSON line; teardown kills whichever is still running.
"""
import itertools
import json
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest

from jizhi import qcache, shm
from jizhi.qcache import QueryCache

_names = itertools.count(1)

HAMMER_S = 2.0
CHILD_READY_TIMEOUT_S = 90.0   # a first import on a busy machine compiles the kernels
CHILD_SLACK_S = 30.0


# ---------------------------------------------------------------------------
# Helpers (also used by the child processes)


def expected_scores(users, items, version):
    """The deterministic score of each (user, item, version): float32 in [0, 1)."""
    x = np.asarray(users, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.asarray(items, np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    x ^= np.uint64(((int(version) + 1) * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return ((x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)).astype(np.float32)


def random_batch(rng, n_users, n_items, requests, per_request):
    """Random users (1..n_users) and items (1..n_items): users [R], offsets, items [N], user of each item."""
    users = rng.integers(1, n_users + 1, size=requests).astype(np.uint64)
    offsets = np.arange(requests + 1, dtype=np.int64) * per_request
    items = rng.integers(1, n_items + 1, size=requests * per_request).astype(np.uint64)
    return users, offsets, items, np.repeat(users, per_request)


def csr(*requests):
    """users, offsets, items from (user, [items]) pairs."""
    users = np.array([u for u, _ in requests], dtype=np.uint64)
    counts = [len(i) for _, i in requests]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = np.array([x for _, i in requests for x in i], dtype=np.uint64)
    return users, offsets, items


@pytest.fixture
def make_cache():
    """Factory: init a segment with the given sizes and attach it; all removed at teardown."""
    made, caches = [], []

    def make(writers=2, slots=64, ways=4, epoch_buckets=256, window_ms=120_000):
        name = f"jizhi.test-qcache-{os.getpid()}-{next(_names)}"
        made.append(name)
        spec = qcache.init(name, writers, slots, ways=ways, epoch_buckets=epoch_buckets, window_ms=window_ms)
        cache = QueryCache.attach(spec)
        caches.append(cache)
        return cache, spec

    yield make
    for c in caches:
        try:
            c.close()
        except BufferError:
            pass
    for name in made:
        shm.unlink(name)
    assert not [n for n in made if (shm.SHM_DIR / n).exists()]


# ---------------------------------------------------------------------------
# One process


def test_a_stored_score_hits_exactly_and_another_version_user_or_item_misses(make_cache):
    cache, spec = make_cache()
    users, offsets, items = csr((7, [100, 101, 102]), (8, [100]))
    scores = expected_scores(np.repeat(users, np.diff(offsets)), items, 3)
    epochs = cache.epochs_of(users)
    assert cache.store(1, users, offsets, items, scores, 3, epochs, now_ms=1000) == 4

    got, hit = cache.lookup(users, offsets, items, 3, now_ms=1001)
    assert hit.tolist() == [True, True, True, True]
    assert got.view(np.uint32).tolist() == scores.view(np.uint32).tolist()
    assert got.dtype == np.float32

    _, hit = cache.lookup(users, offsets, items, 4, now_ms=1001)            # other version
    assert not hit.any()
    _, hit = cache.lookup(*csr((9, [100, 101, 102])), 3, now_ms=1001)        # other user
    assert not hit.any()
    got, hit = cache.lookup(*csr((7, [103, 100, 8])), 3, now_ms=1001)        # other items
    assert hit.tolist() == [False, True, False]
    assert got.tolist()[0] == 0.0 and got.tolist()[2] == 0.0

    # Another process's view (a second attach) sees the same entries.
    other = QueryCache.attach(spec)
    try:
        _, hit = other.lookup(users, offsets, items, 3, now_ms=1001)
        assert hit.all()
        assert other.stats(now_ms=1001) == {"capacity": 64, "entries": [0, 4], "fresh": [0, 4]}
    finally:
        other.close()


def test_a_mask_stores_only_the_selected_candidates(make_cache):
    cache, _ = make_cache()
    users, offsets, items = csr((5, [1, 2, 3, 4]))
    scores = expected_scores(np.full(4, 5), items, 1)
    n = cache.store(0, users, offsets, items, scores, 1, cache.epochs_of(users), now_ms=0,
                    mask=np.array([True, False, True, False]))
    assert n == 2
    _, hit = cache.lookup(users, offsets, items, 1, now_ms=0)
    assert hit.tolist() == [True, False, True, False]


def test_an_entry_older_than_the_window_misses(make_cache):
    cache, _ = make_cache(window_ms=5000)
    users, offsets, items = csr((1, [10, 11]))
    scores = np.array([0.25, 0.5], np.float32)
    cache.store(0, users, offsets, items, scores, 1, cache.epochs_of(users), now_ms=10_000)
    assert cache.lookup(users, offsets, items, 1, now_ms=14_999)[1].all()
    assert cache.lookup(users, offsets, items, 1, now_ms=9_990)[1].all()     # stamped "after" the reader's clock
    assert not cache.lookup(users, offsets, items, 1, now_ms=15_000)[1].any()
    cache.window_ms = 60_000                                                  # a lookup policy
    assert cache.lookup(users, offsets, items, 1, now_ms=15_000)[1].all()
    assert cache.stats(now_ms=80_000) == {"capacity": 64, "entries": [2, 0], "fresh": [0, 0]}


def test_the_default_window_is_120_s_and_now_ms_counts_from_the_segment_time_base(make_cache):
    cache, _ = make_cache(window_ms=qcache.DEFAULT_WINDOW_MS)
    assert cache.window_ms == 120_000
    a = cache.now_ms()
    assert 0 <= a < 60_000
    assert cache.now_ms() >= a


def test_a_bumped_epoch_invalidates_exactly_that_users_entries(make_cache):
    cache, _ = make_cache(epoch_buckets=1024)
    candidates = np.arange(1, 50, dtype=np.uint64)
    buckets = cache.epoch_bucket(candidates)
    a = candidates[0]
    others = [u for u, b in zip(candidates[1:], buckets[1:]) if b != buckets[0]][:3]
    assert len(others) == 3
    users = np.array([a] + others, dtype=np.uint64)
    offsets = np.arange(5, dtype=np.int64) * 3
    items = np.tile(np.array([5, 6, 7], np.uint64), 4)
    scores = expected_scores(np.repeat(users, 3), items, 1)
    cache.store(0, users, offsets, items, scores, 1, cache.epochs_of(users), now_ms=100)
    assert cache.lookup(users, offsets, items, 1, now_ms=101)[1].all()

    cache.bump_epoch(a)
    assert cache.epochs_of(users).tolist() == [1, 0, 0, 0]
    got, hit = cache.lookup(users, offsets, items, 1, now_ms=102)
    assert hit.tolist() == [False] * 3 + [True] * 9
    assert got[3:].view(np.uint32).tolist() == scores[3:].view(np.uint32).tolist()

    # Stored again under the new epoch, it hits again.
    cache.store(1, users[:1], offsets[:2], items[:3], scores[:3], 1, cache.epochs_of(users[:1]), now_ms=103)
    assert cache.lookup(users, offsets, items, 1, now_ms=104)[1].all()


def test_a_score_computed_under_an_epoch_read_before_feedback_misses_once_stored(make_cache):
    cache, _ = make_cache()
    users, offsets, items = csr((42, [1, 2, 3]))
    epochs = cache.epochs_of(users)            # a request starts ...
    cache.bump_epochs(users)                   # ... feedback for the user is acknowledged ...
    cache.store(0, users, offsets, items, np.ones(3, np.float32), 1, epochs, now_ms=5)  # ... its scores land
    assert not cache.lookup(users, offsets, items, 1, now_ms=6)[1].any()


def test_filling_a_set_replaces_its_oldest_entry(make_cache):
    cache, _ = make_cache(writers=1, slots=16, ways=4)
    user = np.array([3], np.uint64)
    cands = np.arange(1, 400, dtype=np.uint64)
    sets = cache.set_of(user, np.array([0, cands.size], np.int64), cands)
    same = cands[sets == sets[0]][:6]
    assert same.size == 6
    one = np.array([0, 1], np.int64)
    ep = cache.epochs_of(user)

    def store(item, t, score=None):
        s = expected_scores(user, [item], 1) if score is None else np.array([score], np.float32)
        cache.store(0, user, one, np.array([item], np.uint64), s, 1, ep, now_ms=t)

    def hits(t=100):
        return cache.lookup(user, np.array([0, same.size], np.int64), same, 1, now_ms=t)[1].tolist()

    for t, item in enumerate(same[:4]):
        store(item, 10 + t)
    assert hits() == [True, True, True, True, False, False]
    store(same[0], 20, score=0.5)              # refreshing an entry replaces it in place
    assert hits() == [True, True, True, True, False, False]
    store(same[4], 21)                         # set full: the oldest (same[1], t=11) goes
    assert hits() == [True, False, True, True, True, False]
    store(same[5], 22)                         # then same[2] (t=12)
    assert hits() == [True, False, False, True, True, True]
    got, _ = cache.lookup(user, one, same[:1], 1, now_ms=100)
    assert got.tolist() == [0.5]
    assert cache.stats(now_ms=100)["entries"] == [4]


def test_a_slot_mixing_the_words_of_two_stores_reads_as_a_miss_and_an_empty_slot_never_hits(make_cache):
    cache, _ = make_cache(writers=2, slots=4, ways=4)              # one set: every key shares it
    zero = (np.zeros(1, np.uint64), np.array([0, 1], np.int64), np.zeros(1, np.uint64))
    assert not cache.lookup(*zero, 0, now_ms=0)[1].any()          # all-zero slots: key (0, 0), v0, epoch 0

    a_key, b_key = csr((9, [77])), csr((10, [78]))
    ep = np.zeros(1, np.uint32)
    cache.store(0, *a_key, np.array([0.75], np.float32), 2, ep, now_ms=50)
    cache.store(1, *b_key, np.array([0.5], np.float32), 3, ep, now_ms=51)
    a = cache.slots[0, 0, 0].copy()
    b = cache.slots[1, 0, 0].copy()
    assert (a != b).all()                                           # every word differs
    cache.slots[1] = 0
    # A reader racing a store of B over A may see any mixture of their words:
    # each of the 62 proper mixtures must read as a miss for both keys.
    for pick in range(64):
        take_b = ((pick >> np.arange(6)) & 1).astype(bool)
        cache.slots[0, 0, 0] = np.where(take_b, b, a)
        hit_a = cache.lookup(*a_key, 2, now_ms=52)[1][0]
        hit_b = cache.lookup(*b_key, 3, now_ms=52)[1][0]
        assert (hit_a, hit_b) == (pick == 0, pick == 63), pick
        assert not cache.lookup(*a_key, 3, now_ms=52)[1][0] and not cache.lookup(*b_key, 2, now_ms=52)[1][0]
    assert cache.torn > 0
    cache.slots[0, 0, 0] = a
    got, hit = cache.lookup(*a_key, 2, now_ms=52)
    assert hit.tolist() == [True] and got.tolist() == [0.75]
    cache.slots[0, 0, 0, 5] ^= np.uint64(1)                       # a flipped check bit
    assert not cache.lookup(*a_key, 2, now_ms=52)[1].any()


def test_attach_refuses_a_spec_that_does_not_match_the_header_and_init_refuses_bad_sizes(make_cache):
    _, spec = make_cache()
    with pytest.raises(ValueError):
        QueryCache.attach(dict(spec, ways=8))
    with pytest.raises(ValueError):
        QueryCache.attach(dict(spec, slots=spec["slots"] * 4))
    assert QueryCache.attach(None) is None
    with pytest.raises(ValueError):
        qcache.init(f"jizhi.test-qcache-{os.getpid()}-never", 1, 24, ways=4)   # 6 sets
    with pytest.raises(ValueError):
        qcache.init(f"jizhi.test-qcache-{os.getpid()}-never", 1, 16, epoch_buckets=100)
    assert not (shm.SHM_DIR / f"jizhi.test-qcache-{os.getpid()}-never").exists()
    cache = QueryCache.attach(spec)
    try:
        with pytest.raises(ValueError):
            cache.store(2, *csr((1, [1])), np.ones(1, np.float32), 1, np.zeros(1, np.uint32))
        with pytest.raises(ValueError):
            cache.lookup(np.ones(1, np.uint64), np.array([0, 5], np.int64), np.ones(2, np.uint64), 1)
    finally:
        cache.close()


# ---------------------------------------------------------------------------
# Several processes


def _start_children(tmp_path, spec, roles):
    procs = []
    for i, role in enumerate(roles):
        err = open(tmp_path / f"child{i}.err", "wb")
        procs.append(subprocess.Popen([sys.executable, __file__, json.dumps(spec)] + [str(a) for a in role],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0))
        err.close()
    return procs


def _read_line(p, deadline, tmp_path, i):
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
            raise AssertionError(f"child {i} timed out; stderr: {(tmp_path / f'child{i}.err').read_text()[-2000:]}")
        b = p.stdout.read(1)
        if not b:
            raise AssertionError(f"child {i} exited; stderr: {(tmp_path / f'child{i}.err').read_text()[-2000:]}")
        buf += b
    return buf.decode()


def run_children(tmp_path, spec, roles):
    """Start one process per role, release them together, return their JSON results."""
    procs = _start_children(tmp_path, spec, roles)
    try:
        deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
        for i, p in enumerate(procs):
            assert _read_line(p, deadline, tmp_path, i).strip() == "ready"
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.close()
        deadline = time.monotonic() + HAMMER_S + CHILD_SLACK_S
        results = [json.loads(_read_line(p, deadline, tmp_path, i)) for i, p in enumerate(procs)]
        for p in procs:
            assert p.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_concurrent_writers_and_readers_in_other_processes_never_see_a_torn_or_wrong_score(make_cache, tmp_path):
    # Small: 2 x 256 slots for 16 x 128 keys, so writers overwrite the slots
    # readers are reading all the time.
    _, spec = make_cache(writers=2, slots=256, ways=4)
    roles = [("writer", 0, 1, 16, 128), ("writer", 1, 2, 16, 128), ("reader", 5, 3, 16, 128), ("reader", 5, 4, 16, 128)]
    results = run_children(tmp_path, spec, roles)
    writers, readers = results[:2], results[2:]
    print("\nqcache hammer:", json.dumps(results))
    assert all(w["stored"] > 0 for w in writers)
    assert all(r["hits"] > 0 for r in readers)
    assert [r["violations"] for r in readers] == [0, 0]


@pytest.mark.slow
def test_a_reader_of_version_2_never_gets_a_version_1_score_while_a_writer_alternates(make_cache, tmp_path):
    _, spec = make_cache(writers=1, slots=64, ways=4)
    results = run_children(tmp_path, spec, [("alternating", 0, 7, 8, 32), ("reader", 2, 8, 8, 32), ("reader", 1, 9, 8, 32)])
    print("\nqcache versions:", json.dumps(results))
    writer, v2, v1 = results
    assert writer["stored"] > 0 and v2["hits"] > 0 and v1["hits"] > 0
    assert (v2["violations"], v2["other_version"], v1["violations"], v1["other_version"]) == (0, 0, 0, 0)


def test_a_share_confines_entries_to_that_part_of_the_sets_and_round_trips(make_cache):
    # A bypassed worker's sampled users use 1/share of the table (workers/query_cache.py).
    cache, _ = make_cache(writers=1, slots=1 << 16, ways=4)       # 2,048 sets x 4 ways in 1/8: room for 400
    users = np.array([5, 6], np.uint64)
    offsets = np.array([0, 200, 400], np.int64)
    items = np.arange(1, 401, dtype=np.uint64)
    scores = expected_scores(np.repeat(users, 200), items, 3)
    assert cache.store(0, users, offsets, items, scores, 3, cache.epochs_of(users), now_ms=0, share=8) == 400
    got, hit = cache.lookup(users, offsets, items, 3, now_ms=1, share=8)
    assert hit.all() and np.array_equal(got, scores)
    used = np.flatnonzero(cache.slots[0, :, :, 5].any(axis=1))        # sets holding a written way
    assert used.max() < cache.sets // 8
    with pytest.raises(ValueError, match="power of two"):
        cache.lookup(users, offsets, items, 3, share=3)


def test_lookup_rate_of_a_500_candidate_request_on_one_core(make_cache, capsys):
    cache, _ = make_cache(writers=2, slots=1 << 14, ways=4, epoch_buckets=1 << 16)
    rng = np.random.default_rng(0)
    users = np.array([123456789], np.uint64)
    offsets = np.array([0, 500], np.int64)
    items = rng.integers(1, 1 << 40, size=500).astype(np.uint64)
    scores = expected_scores(np.repeat(users, 500), items, 1)
    mask = np.zeros(500, np.bool_)
    mask[::2] = True
    cache.store(0, users, offsets, items, scores, 1, cache.epochs_of(users), now_ms=0, mask=mask)
    now = 1
    _, hit = cache.lookup(users, offsets, items, 1, now_ms=now)
    assert hit.sum() == 250

    def rate(fn, budget_s=0.3):
        n, t0 = 0, time.perf_counter()
        while True:
            for _ in range(100):
                fn()
            n += 100
            dt = time.perf_counter() - t0
            if dt >= budget_s:
                return n / dt

    bits = np.empty(500, np.uint32)
    hitbuf = np.empty(500, np.bool_)
    kernel = rate(lambda: qcache._lookup(cache.slots, cache.epochs, users, offsets, items, np.uint64(1),
                                         np.int64(now), np.int64(cache.window_ms), bits, hitbuf, 1))
    call = rate(lambda: cache.lookup(users, offsets, items, 1, now_ms=now))
    with capsys.disabled():
        print(f"\nqcache lookup, 500 candidates (half hits), 2 regions x 4 ways: "
              f"kernel {kernel:,.0f} requests/s ({kernel * 500 / 1e6:.1f} M candidates/s, "
              f"{1e6 / kernel:.1f} us/request); QueryCache.lookup {call:,.0f} requests/s "
              f"({1e6 / call:.1f} us/request)")


# ---------------------------------------------------------------------------
# Child processes: python tests/test_qcache.py SPEC_JSON ROLE ARG SEED


def _child(spec_json, role, arg, seed, n_users, n_items):
    """``writer W``: store version 5 into region W; ``alternating W``: versions 1 and 2
    by turns; ``reader V``: look up version V and check every hit's score."""
    cache = QueryCache.attach(json.loads(spec_json))
    rng = np.random.default_rng(int(seed))
    n_users, n_items, arg = int(n_users), int(n_items), int(arg)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    out = {"role": role, "stored": 0, "lookups": 0, "hits": 0, "violations": 0, "other_version": 0}
    stop = time.monotonic() + HAMMER_S
    batches = 0
    while time.monotonic() < stop:
        if role == "reader":
            users, offsets, items, per_item = random_batch(rng, n_users, n_items, 4, 32)
            got, hit = cache.lookup(users, offsets, items, arg)
            got = got.view(np.uint32)
            bad = hit & (got != expected_scores(per_item, items, arg).view(np.uint32))
            other = expected_scores(per_item, items, 3 - arg if arg in (1, 2) else 5).view(np.uint32)
            out["lookups"] += int(items.size)
            out["hits"] += int(hit.sum())
            out["violations"] += int(bad.sum())
            out["other_version"] += int((bad & (got == other)).sum())
        else:
            version = 1 + batches % 2 if role == "alternating" else 5
            users, offsets, items, per_item = random_batch(rng, n_users, n_items, 4, 16)
            epochs = cache.epochs_of(users)
            out["stored"] += cache.store(arg, users, offsets, items, expected_scores(per_item, items, version),
                                         version, epochs)
        batches += 1
    out["batches"] = batches
    out["torn"] = cache.torn
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:7])
