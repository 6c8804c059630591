"""docs/benchmarks.md, "A catalogue of 1,000,000 items and 10,000,000 users": what ``MADV_RANDOM`` on a profile
column's map saves (jizhi/bundle.py, ``_mapped``).

Writes a 3 GB int64[50,000,000, 8] ``.npy`` (a column of 50 M rows of 64 bytes), drops the page cache
(``/proc/sys/vm/drop_caches``: root), maps it as the profiles are mapped, with or without ``MADV_RANDOM``, reads
4,000 random rows, and prints how much file-backed RSS the reads mapped (``RssFile`` of /proc/self/status).
Each mode runs in a fresh process.

    sudo python docs/run-madvise-check.py [--path /tmp/madv_test.npy] [--keep]
"""
import argparse
import mmap
import os
import subprocess
import sys

import numpy as np


def rss_file_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) // 1024
    return 0


def one(path, mode):
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches")
    m = np.load(path, mmap_mode="r")
    if mode == "random":
        m._mmap.madvise(mmap.MADV_RANDOM)
    before = rss_file_mib()
    total = 0
    for r in np.random.default_rng(0).integers(0, m.shape[0], 4000):
        total += int(m[r, 0])
    print(f"{mode:<7} 4,000 random rows of 64 bytes mapped {rss_file_mib() - before} MiB of file-backed RSS")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="/tmp/madv_test.npy")
    ap.add_argument("--keep", action="store_true", help="keep the 3 GB file")
    ap.add_argument("--mode", choices=("normal", "random"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        return one(a.path, a.mode)
    if not os.path.exists(a.path):
        col = np.lib.format.open_memmap(a.path, mode="w+", dtype=np.int64, shape=(50_000_000, 8))
        col[:] = 1
        col.flush()
        del col
    try:
        ra = open("/sys/block/vda/queue/read_ahead_kb").read().strip()
    except OSError:
        ra = "?"
    print(f"read_ahead_kb of vda: {ra}")
    for mode in ("normal", "random"):
        subprocess.run([sys.executable, __file__, "--path", a.path, "--mode", mode], check=True)
    if not a.keep:
        os.unlink(a.path)


if __name__ == "__main__":
    main()
