"""docs/benchmarks.md, "Pooling through the hot tier": the cube stage's work on real micro-batches, in one process.

The demo trace's requests, 8 per micro-batch (the shipped plan's batch), go through the real data_reader and
feature_processor; then the same user and item bag blocks are pooled (a) through the hot tier's own pooling
(TieredStore.pool: a probe per signature where it lies) and (b) through the deduplicating path every other
store takes (valid signatures -> np.unique -> one lookup in the same hot table -> pooled), alternating, and
the pooled vectors compared. Run from the source tree with its venv:

    .venv/bin/python docs/run-pool-bench.py BUNDLE_VERSION_DIR TRACE.npz [--batches 40] [--repeats 5]
"""
import argparse
import statistics
import time

import numpy as np

from jizhi.bundle import Bundle
from jizhi.cube import pooling
from jizhi.cube.build import read_all
from jizhi.cube.hot import TieredStore, private_table
from jizhi.workers.builtins import load_class
from jizhi.workers.stage import Batch


class Dedup:
    """The hot table behind the plain lookup contract: pool_blocks deduplicates, then looks up."""

    def __init__(self, store):
        self.store = store

    def lookup(self, keys):
        return self.store.lookup(keys)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("trace")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bundle = Bundle(args.bundle)
    keys, vectors = read_all(bundle.cube_path)
    stages = []
    for proc in ("data_reader", "feature_processor", "cube_accessor"):
        st = load_class(proc)()
        st.setup({"on_unknown": "default"}, bundle)
        stages.append(st)
    store = TieredStore(stages[2].store.cube, None)
    store.table = private_table(keys, vectors)
    t = np.load(args.trace)
    users, offsets, items = t["users"], t["offsets"], t["items"]
    blocks = []
    for b in range(args.batches):
        s = b * 8
        off = offsets[s:s + 9] - offsets[s]
        batch = Batch(users[s:s + 8], np.full(8, 10, np.int64), np.zeros(8, bool), np.full(8, np.inf), off,
                      {"item_ids": items[offsets[s]:offsets[s + 8]]})
        for st in stages[:2]:
            batch.columns.update(st.process(batch))
        blocks.append([(batch["user_sigs"], batch["user_lens"]), (batch["item_sigs"], batch["item_lens"])])
    n_sigs = sum(int(l.sum()) for bl in blocks for _, l in bl) / len(blocks)
    times = {"hot tier pooling (probe per signature)": [], "deduplicated lookup, then pooling": []}
    dedup = Dedup(store)
    for _ in range(args.repeats):
        for label, st in zip(times, (store, dedup)):
            t0 = time.perf_counter()
            for bl in blocks:
                pooling.pool_blocks(st, bl, bundle.dim)
            times[label].append((time.perf_counter() - t0) / len(blocks))
    a, b = pooling.pool_blocks(store, blocks[0], bundle.dim), pooling.pool_blocks(dedup, blocks[0], bundle.dim)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a[0], b[0]))
    print(f"{len(blocks)} micro-batches of 8 requests, {n_sigs:,.0f} signatures each; medians of {args.repeats}:")
    for label, ts in times.items():
        print(f"  {label:42s} {statistics.median(ts) * 1e6:8,.0f} us per micro-batch")
    print(f"  max difference of the pooled vectors: {diff}")


if __name__ == "__main__":
    main()
