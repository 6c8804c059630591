"""docs/benchmarks.md, "Profiles from a team's files: `jizhictl profiles build`": how long a build takes.

Writes synthetic team files for the demo model's fields (ids at random, onehot categories as 0-based rows with
-1 for about 5 % missing, bags as list columns, the users' 13 dense features as a list column, a history of up
to 50 item ids) as Parquet and CSV, then builds each with ``jizhictl profiles build`` in a subprocess and
reports the wall time, the rows per second, the peak RSS of the build (``ru_maxrss`` of the child) and the
size of the snapshot it wrote.

    python docs/run-profile-build-bench.py --bundle MODELS/demo/1 --out /tmp/jizhi-pbuild [--items 1000000]
                                           [--users 1000000] [--formats parquet,csv]
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SPEC = """[users]
id = "user_id"
[items]
id = "item_id"
"""


def team_table(bundle, side, n, rng):
    """{column: array or list column (pyarrow)} of ``n`` synthetic rows of ``side`` for the demo model."""
    import pyarrow as pa
    from jizhi.bundle import Bundle
    b = Bundle(bundle)
    cols = {f"{side}_id": pa.array(rng.choice(2 ** 62, n, replace=False).astype(np.uint64))}
    if side == "user":
        dense = rng.standard_normal((n, b.dense_features)).astype(np.float32)
        cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), b.dense_features)
    spec = []
    for f in (b.user_fields if side == "user" else b.item_fields):
        if f.kind == "onehot":
            if f.raw == "ids":
                v = rng.integers(1, 2 ** 40, n)
            else:
                v = rng.integers(0, f.vocab, n)
                v[rng.random(n) < 0.05] = -1
                spec.append(f"[{side}s.fields.{f.name}]\nfirst_row = 0\nmissing = [-1]\nsep = \"|\"\n")
            cols[f.name] = pa.array(v)
        else:
            lens = rng.integers(0, f.max_len + 1, n)
            flat = rng.integers(1, 2 ** 40, int(lens.sum())) if f.raw == "ids" or f.vocab == 0 \
                else rng.integers(0, f.vocab, int(lens.sum()))
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
            if not (f.raw == "ids" or f.vocab == 0):
                spec.append(f"[{side}s.fields.{f.name}]\nfirst_row = 0\nsep = \"|\"\n")
            else:
                spec.append(f"[{side}s.fields.{f.name}]\nsep = \"|\"\n")
    return pa.table(cols), "\n".join(spec)


def write_csv(table, path):
    """CSV as a team exports it: bags as "a|b|c" cells, the dense features as one space-separated cell."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    out = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            sep = " " if name == "dense" else "|"
            col = pc.binary_join(pc.cast(col, pa.list_(pa.string())), sep)
        out[name] = col
    pcsv.write_csv(pa.table(out), path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--formats", default="parquet,csv")
    args = ap.parse_args()
    import pyarrow.parquet as pq
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rng = np.random.default_rng(5)
    specs = [SPEC]
    tables = {}
    for side, n in (("user", args.users), ("item", args.items)):
        tables[side], spec = team_table(args.bundle, side, n, rng)
        specs.append(spec)
    spec_path = os.path.join(args.out, "spec.toml")
    with open(spec_path, "w") as f:
        f.write("\n".join(specs))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} cores; "
          f"{args.users:,} users, {args.items:,} items (the demo model's fields)", flush=True)
    print("| format | input MB | build s | users/s + items/s | peak RSS MiB | snapshot MB |\n|---|---:|---:|---:|---:|---:|")
    for fmt in args.formats.split(","):
        paths = {}
        for side in ("user", "item"):
            paths[side] = os.path.join(args.out, f"{side}s.{fmt}")
            if fmt == "parquet":
                pq.write_table(tables[side], paths[side])
            else:
                write_csv(tables[side], paths[side])
        snap = os.path.join(args.out, f"snap-{fmt}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.monotonic()
        subprocess.run([sys.executable, os.path.join(ROOT, "bin", "jizhictl"), "profiles", "build", "--model",
                        args.bundle, "--users", paths["user"], "--items", paths["item"], "--spec", spec_path,
                        "--out", snap, "--quiet"], check=True)
        took = time.monotonic() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(snap) for f in fs)
        inputs = sum(os.path.getsize(p) for p in paths.values())
        print(f"| {fmt} | {inputs / 1e6:,.0f} | {took:.1f} | {(args.users + args.items) / took:,.0f} | "
              f"{max(peak, before) / 1024:,.0f} | {size / 1e6:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
