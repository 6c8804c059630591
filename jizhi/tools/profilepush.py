"""``jizhictl profiles push`` and ``jizhictl profiles set``: user rows written to Redis (cube/userrows.py).

``push_users`` writes every user of the snapshot a model version reads, in
that version's row layout, with the Redis cube push's pipelined MSETs per
master, and the layout record last (a reader never sees the record of rows
not all there). ``write_user`` changes one user's row: the features given,
checked as a request's are, over the row in Redis (or the snapshot's).
"""
import json

import numpy as np

from jizhi.cube.layout import Layout, layout_key
from jizhi.cube.push import connect_cluster, write_values
from jizhi.cube.userrows import Schema, layout_doc, parse_rows_url, user_namespace
from jizhi.profilestore import profiles, source
from jizhi.workers.data_reader import BadFeature, RequestFields, apply_features


def connect(url):
    """The cluster of a user-row URL, its slot map loaded, and the namespace's name; raises ConnectionError
    (AuthError naming the node) or RuntimeError (cube/push.py, ``connect_cluster``)."""
    _, name, _ = parse_rows_url(url)
    return connect_cluster(url), name


def push_users(url, bundle, progress=None, chunk=20_000):
    """Every user of the snapshot ``bundle`` reads now (its own profiles, or its store's newest that fits)
    into the namespace of ``url``, in ``bundle``'s row layout; the layout record last. Returns it."""
    cluster, name = connect(url)
    schema = Schema.of_bundle(bundle)
    users = profiles(bundle, "user")
    snapshot = source(bundle).snapshot if bundle.profile_store is not None else None
    doc = layout_doc(name, schema, users.ids.shape[0], snapshot)
    layout = Layout(doc)
    mine = schema.bundle_columns
    total = users.ids.shape[0]
    for lo in range(0, total, chunk):
        ids = np.asarray(users.ids[lo:lo + chunk], dtype=np.uint64)
        rows = np.arange(lo, lo + ids.shape[0], dtype=np.int64)
        dense, vals, lens = users.user_features(rows, np.ones(ids.shape[0], dtype=bool))
        vals = vals[:, mine, :schema.user_len]
        write_values(cluster, layout, ids, schema.encode(dense, lens[:, mine], vals), f"user rows {name}")
        if progress:
            progress(lo + ids.shape[0], total)
    cluster.command(["SET", layout_key(doc["namespace"]), json.dumps(doc)], timeout_s=5.0)
    return doc


def read_layout(cluster, name):
    raw = cluster.command(["GET", layout_key(user_namespace(name))], timeout_s=5.0)
    return None if raw is None else json.loads(raw)


def write_user(url, user, bundle, features):
    """Change one user's row: ``features`` (a request's ``features`` map: field name -> raw value or list,
    ``dense`` -> list of floats) over the user's row in Redis (or, not there yet, the snapshot's, or an
    empty one). Checked as a request's features are (workers/data_reader.py); raises ValueError naming
    the field. Returns the row written, as ``{field: values, "dense": [...]}``."""
    cluster, name = connect(url)
    doc = read_layout(cluster, name)
    if doc is None:
        raise LookupError(f"no user rows {name!r} at {url}: run jizhictl profiles push first")
    schema = Schema.of_bundle(bundle)
    theirs = Schema(doc["rows"]["fields"], doc["rows"]["dense"], doc["rows"]["user_len"])
    why = schema.mismatch(theirs)
    if why is not None or theirs.row_bytes != schema.row_bytes:
        raise ValueError(f"user rows {name!r} at {url} were pushed for other fields ({why or 'another order'})")
    key = Layout(doc).keys_and_slots(np.array([user], dtype=np.uint64))[0][0].tobytes()
    raw = cluster.command(["GET", key], timeout_s=5.0)
    mine = schema.bundle_columns
    if raw is not None and len(raw) == schema.row_bytes:
        dense, lens, values = schema.decode(np.frombuffer(raw, dtype=np.uint8).reshape(1, -1))
        dense, lens, values = dense.copy(), lens.copy(), values.copy()
    else:
        users = profiles(bundle, "user")
        rows, known = users.rows(np.array([user], dtype=np.uint64))
        d, v, n = users.user_features(rows, known)
        dense, lens, values = d, n[:, mine], v[:, mine, :schema.user_len]
    F = len(bundle.user_fields)
    full_v = np.zeros((1, F, bundle.user_len), dtype=np.int64)
    full_l = np.zeros((1, F), dtype=np.int32)
    full_v[:, mine, :schema.user_len], full_l[:, mine] = values, lens
    try:
        apply_features(RequestFields(bundle), {"user": features}, dense, full_v, full_l, 0)
    except BadFeature as e:
        raise ValueError(str(e)) from None
    row = schema.encode(dense, full_l[:, mine], full_v[:, mine, :schema.user_len])
    cluster.command(["SET", key, row.tobytes()], timeout_s=5.0)
    out = {"dense": [float(x) for x in dense[0]]}
    for c, f in zip(mine, schema.fields):
        out[f["name"]] = full_v[0, c, :full_l[0, c]].tolist()
    return out
