"""How late a serving process wakes while a model version is copied in, by each way of copying it.

    .venv/bin/python docs/run-publish-probe.py --bundle ~/.cache/jizhi/demo/models/demo/1 [--extra-mb 200] [--rounds 3]

A *probe* (a normal-priority process that sleeps 2 ms in a loop and records how late each wake-up
is: what a serving worker waiting for its next event goes through) runs pinned to CPU 1; each copy
runs pinned to the same CPU, as on a serving machine whose cores serving keeps busy. The version
copied is ``--bundle`` plus an unlisted file of ``--extra-mb`` MB (a larger cube). Ways, in turn, for
``--rounds`` rounds:

* ``cp``: the README's recipe by hand, ``chrt --idle 0 ionice -c 3 cp -r`` then ``mv``;
* ``copytree``: Python's ``shutil.copytree`` at the idle priority (``sendfile``, a whole file per
  call; what ``jizhictl demo publish`` used before it copied through ``jizhi.tools.publish``);
* ``publish``: ``jizhictl publish`` as shipped (idle priority, ``copy_file_range`` 1 MiB per
  system call, every file flushed to disk, not paced);
* ``publish-paced``: ``jizhictl publish --pace 0.25``.

Per copy: its wall time to the rename and to the data on disk (a ``sync`` after it: ``cp`` leaves
its writeback for later, ``jizhictl publish`` flushes every file), and the probe's wake-up lateness
over that (p99, p99.9, max, and the count over 5 ms), against the probe alone before it. Prints a table and writes JSON.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROBE = r"""
import os, sys, time
import numpy as np
out, stop, period = sys.argv[1], sys.argv[2], 0.002
late, stamp = [], []
while not (len(late) % 50 == 0 and os.path.exists(stop)):
    t0 = time.monotonic()
    time.sleep(period)
    t1 = time.monotonic()
    late.append(t1 - t0 - period)
    stamp.append(t1)
np.savez(out, late=np.array(late), stamp=np.array(stamp))
"""


def stats(late_s):
    ms = np.asarray(late_s) * 1000.0
    if ms.size == 0:
        return None
    return {"n": int(ms.size), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "p999_ms": round(float(np.percentile(ms, 99.9)), 2), "max_ms": round(float(ms.max()), 2),
            "over_5ms": int((ms > 5.0).sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="A bundle version directory (its manifest names the version).")
    ap.add_argument("--extra-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ways", default="cp,copytree,publish,publish-paced")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    jizhictl = str(Path(sys.executable).parent / "jizhictl")
    work = Path(tempfile.mkdtemp(prefix="jizhi-publish-probe-"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cores": os.cpu_count(), "argv": sys.argv[1:], "copies": []}
    try:
        src = work / "src" / Path(a.bundle).name
        shutil.copytree(a.bundle, src)
        with open(src / "extra.bin", "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(a.extra_mb):
                f.write(block)
        size_mb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 1e6
        name = __import__("tomllib").loads((src / "manifest.toml").read_text())["name"]
        pin = ["taskset", "-c", "1"]
        for r in range(a.rounds):
            for way in a.ways.split(","):
                models = work / f"models-{r}-{way}"
                (models / ".incoming").mkdir(parents=True)
                if way == "cp":
                    staged = models / ".incoming" / "v"
                    final = models / name / src.name
                    (models / name).mkdir()
                    cmd = ["bash", "-c", f"{' '.join(pin)} chrt --idle 0 ionice -c 3 cp -r {src} {staged} "
                                         f"&& mv {staged} {final}"]
                elif way == "copytree":
                    final = models / name / src.name
                    cmd = pin + ["chrt", "--idle", "0", "ionice", "-c", "3", sys.executable, "-c",
                                 f"import shutil; shutil.copytree({str(src)!r}, {str(final)!r})"]
                else:
                    cmd = pin + [jizhictl, "publish", str(src), str(models), "--quiet"] + \
                        (["--pace", "0.25"] if way == "publish-paced" else [])
                probe_out, stop = work / f"probe-{r}-{way}.npz", work / f"stop-{r}-{way}"
                subprocess.run(["sync"], check=True)
                probe = subprocess.Popen(pin + [sys.executable, "-c", PROBE, str(probe_out), str(stop)])
                time.sleep(3.0)                 # the probe alone (its start, then the baseline)
                t0 = time.monotonic()
                subprocess.run(cmd, check=True, capture_output=True)
                t_copied = time.monotonic()
                subprocess.run(pin + ["sync"], check=True)     # (cp leaves its writeback for later)
                t1 = time.monotonic()
                stop.touch()
                probe.wait(30)
                d = np.load(probe_out)
                late, stamp = d["late"], d["stamp"]
                base = late[(stamp >= t0 - (t1 - t0) - 0.5) & (stamp < t0) & (stamp >= stamp[0] + 1.0)]
                during = late[(stamp >= t0) & (stamp <= t1)]
                row = {"round": r, "way": way, "copy_s": round(t_copied - t0, 2), "to_disk_s": round(t1 - t0, 2),
                       "during": stats(during),
                       "alone": stats(base)}
                results["copies"].append(row)
                print(f"round {r} {way:<16} copy {row['copy_s']:6.2f} s, on disk {row['to_disk_s']:6.2f} s  during: {row['during']}  "
                      f"alone: {row['alone']}", flush=True)
                shutil.rmtree(models)
        results["size_mb"] = round(size_mb)
        summary = {}
        for way in a.ways.split(","):
            rows = [c for c in results["copies"] if c["way"] == way]
            summary[way] = {"copy_s_median": float(np.median([c["copy_s"] for c in rows])),
                            "max_ms_median": float(np.median([c["during"]["max_ms"] for c in rows])),
                            "max_ms_max": max(c["during"]["max_ms"] for c in rows),
                            "p999_ms_median": float(np.median([c["during"]["p999_ms"] for c in rows])),
                            "over_5ms_total": sum(c["during"]["over_5ms"] for c in rows),
                            "alone_max_ms_max": max(c["alone"]["max_ms"] for c in rows)}
            print(f"{way:<16} copy median {summary[way]['copy_s_median']:.2f} s; probe late while copying: max "
                  f"median {summary[way]['max_ms_median']:.2f} ms (worst {summary[way]['max_ms_max']:.2f}), p99.9 "
                  f"median {summary[way]['p999_ms_median']:.2f} ms, {summary[way]['over_5ms_total']} wake-ups over "
                  f"5 ms; alone: max {summary[way]['alone_max_ms_max']:.2f} ms")
        results["summary"] = summary
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))
        print(f"copied {size_mb:.0f} MB per copy")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
