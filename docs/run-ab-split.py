#!/usr/bin/env python
"""A/B groups through a real daemon (issue 6): 100,000 simulated users, fractions 0.5/0.3/0.2.

    .venv/bin/python docs/run-ab-split.py [--users 100000]

Starts a jizhid serving ``etc/pipelines/ab.toml`` (control: the demo model, wide: the ``cvr`` head,
deep: the ``dwell`` head; the models of docs/run-many-models-bench.py), sends one request (10
candidates) per simulated user (distinct random uint64 ids: users the profile does not know are
scored on default features, routing only needs the id), 64 in flight over one DEALER socket, and
counts the ``ab_group`` of every reply. Then it reloads the configuration (``jizhictl reload``,
fractions unchanged, a pool size changed) and sends 10,000 of the users again: each must land in
its first group. Prints the split against the fractions, the broker's per-group counts
(``jizhictl stats --json``) against the client's, and writes --out.
"""
import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("mm", REPO / "docs" / "run-many-models-bench.py")
mm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mm)

from jizhi import protocol          # noqa: E402

JIZHICTL = str(Path(sys.executable).parent / "jizhictl")


def send_all(endpoint, users, items, window=64):
    """{user: ab_group} of one request per user, ``window`` in flight."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    groups, errors, k, pending = {}, collections.Counter(), 0, 0
    while k < len(users) or pending:
        while k < len(users) and pending < window:
            sock.send_multipart([b""] + protocol.encode_request(
                "score", id=k, pipeline="ab", user=int(users[k]), item_ids=items, top_k=5, deadline_ms=10_000))
            k += 1
            pending += 1
        if not sock.poll(30_000):
            raise SystemExit(f"no reply for 30 s ({pending} pending)")
        fr = sock.recv_multipart()
        h = protocol.unpackb(fr[1])
        pending -= 1
        if h.get("status") == "ok":
            groups[int(users[h["id"]])] = h["ab_group"]
        else:
            errors[h.get("code")] += 1
    sock.close(0)
    return groups, dict(errors)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/jzb/many")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--again", type=int, default=10_000)
    ap.add_argument("--out", default="/tmp/jzb/many/ab-split.json")
    a = ap.parse_args()
    work = Path(a.work)
    log = lambda s: print(s, flush=True)   # noqa: E731
    text = (REPO / "etc" / "pipelines" / "ab.toml").read_text()
    fractions = {m.group(1): float(m.group(2)) for m in re.finditer(r'name = "(\w+)", fraction = ([0-9.]+)', text)}
    path = work / "ab.toml"
    path.write_text(text)
    users = np.unique(np.random.default_rng(2026).integers(1, 2 ** 63, size=int(a.users * 1.01), dtype=np.uint64))
    users = np.random.default_rng(1).permutation(users)[:a.users]
    with np.load("/tmp/jzb/trace30k.npz") as t:
        items = np.ascontiguousarray(t["items"][:10], dtype=np.uint64)
    d = mm.Daemon(work, "ab", 5641, [path])
    try:
        t0 = time.monotonic()
        groups, errors = send_all(d.endpoint, users, items)
        took = time.monotonic() - t0
        counts = collections.Counter(groups.values())
        log(f"{len(groups)} users answered in {took:.0f} s ({len(groups) / took:.0f}/s), errors {errors}")
        split = {g: counts[g] / len(groups) for g in fractions}
        for g, f in fractions.items():
            log(f"  {g:<8} fraction {f:.3f}  got {split[g]:.4f}  ({100 * (split[g] - f):+.2f} points, "
                f"{100 * (split[g] - f) / f:+.2f} % of the fraction)")
        stats = json.loads(subprocess.run([JIZHICTL, "stats", "--json", "--run-dir", str(d.run_dir)],
                                          capture_output=True, text=True, check=True).stdout)
        broker = {g: x["ok"] for g, x in stats["pipelines"]["ab"]["ab"]["ab"]["groups"].items()}
        log(f"  the broker's per-group answers: {broker} (client: {dict(counts)})")
        # A reload (fractions unchanged, another pool size): the same users stay in their group.
        path.write_text(text.replace("pool = 2\n", "pool = 1\n", 1))
        out = subprocess.run([JIZHICTL, "reload", "--run-dir", str(d.run_dir)], capture_output=True, text=True)
        log(f"  reload: {out.stdout.strip() or out.stderr.strip()}")
        again = users[:a.again]
        groups2, errors2 = send_all(d.endpoint, again, items)
        moved = sum(1 for u in again if groups2.get(int(u)) != groups.get(int(u)))
        log(f"  after the reload: {moved} of {len(again)} users changed group, errors {errors2}")
    finally:
        d.stop()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
           "cores": os.cpu_count(), "users": len(groups), "errors": errors, "fractions": fractions, "split": split,
           "broker_counts": broker, "client_counts": dict(counts), "took_s": round(took, 1),
           "again": len(again), "moved_after_reload": moved, "errors_after_reload": errors2}
    Path(a.out).write_text(json.dumps(res, indent=1))
    log(f"results: {a.out}")


if __name__ == "__main__":
    main()
