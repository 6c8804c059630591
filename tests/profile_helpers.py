"""The demo bundle's profiles as a team would hold them, written as Parquet, CSV, JSON lines or npz
(tests/test_profile_build.py, tests/test_profile_store.py). Parquet needs pyarrow; npz needs nothing more."""
import csv
import json

import numpy as np

from jizhi.bundle import Bundle, Profiles

SPEC = """
[users]
id = "user_id"
[items]
id = "item_id"
"""


def team_tables(version_dir, seed=5):
    """{side: (columns {name: list or array}, spec lines)}: the bundle's profiles as a team would hold them."""
    b = Bundle(version_dir)
    rng = np.random.default_rng(seed)
    tables, spec = {}, [SPEC]
    for side, fields in (("user", b.user_fields), ("item", b.item_fields)):
        p = Profiles(b, side)
        n = p.ids.shape[0]
        order = rng.permutation(n)                       # the team's files are in no particular order
        cols = {f"{side}_id": np.asarray(p.ids)[order]}
        if side == "user":
            cols["dense"] = np.asarray(p.dense)[order]
        for f in fields:
            if f.kind == "onehot":
                raw = np.asarray(p.cols[f.name])[order]
                if f.raw == "rows":                     # 0-based rows, -1 for missing
                    cols[f.name] = raw - 1
                    spec.append(f"[{side}s.fields.{f.name}]\nfirst_row = 0\nmissing = [-1]\n")
                else:
                    cols[f.name] = raw                  # entity ids as they are, 0 = missing
            else:
                values, offsets = (np.asarray(a) for a in p.cols[f.name])
                cols[f.name] = [values[offsets[r]:offsets[r + 1]].tolist() for r in order]
                spec.append(f"[{side}s.fields.{f.name}]\nsep = \"|\"\n")
        tables[side] = cols
    return tables, "\n".join(spec)


def write_table(fmt, cols, path):
    names = list(cols)
    n = len(cols[names[0]])
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        arrays = {}
        for k, v in cols.items():
            if k == "dense":
                arrays[k] = pa.array(list(v.astype(np.float64)), type=pa.list_(pa.float64()))
            elif isinstance(v, list):
                arrays[k] = pa.array(v, type=pa.list_(pa.int64()))
            else:
                arrays[k] = pa.array(v)
        pq.write_table(pa.table(arrays), path, row_group_size=max(1, n // 3))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for r in range(n):
                row = []
                for k in names:
                    v = cols[k][r]
                    if k == "dense":
                        row.append(" ".join(repr(float(x)) for x in v))
                    elif isinstance(cols[k], list):
                        row.append("|".join(map(str, v)))
                    else:
                        row.append(str(int(v)))
                w.writerow(row)
    elif fmt == "jsonl":
        with open(path, "w") as f:
            for r in range(n):
                o = {}
                for k in names:
                    v = cols[k][r]
                    o[k] = [float(x) for x in v] if k == "dense" else v if isinstance(cols[k], list) else int(v)
                f.write(json.dumps(o) + "\n")
    else:
        arrays = {}
        for k, v in cols.items():
            if isinstance(v, list):
                lens = np.array([len(x) for x in v], np.int64)
                arrays[k + ".offsets"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
                arrays[k + ".values"] = np.array([x for bag in v for x in bag], np.int64)
            else:
                arrays[k] = np.asarray(v)
        np.savez(path, **arrays)


def profile_features(bundle_dir, user):
    """The user's own profile values as a request's ``features`` (every non-context user field, dense)."""
    b = Bundle(bundle_dir)
    p = Profiles(b, "user")
    r = int(np.searchsorted(p.ids, user))
    assert p.ids[r] == user
    feats = {"dense": [float(x) for x in p.dense[r]]}
    for f in b.user_fields:
        if f.kind == "onehot":
            feats[f.name] = int(p.cols[f.name][r])
        else:
            values, offsets = p.cols[f.name]
            feats[f.name] = [int(v) for v in values[offsets[r]:offsets[r + 1]]]
    return feats
