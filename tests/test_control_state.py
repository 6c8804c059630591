"""jizhi/controlstate.py: the supervisor's published control state (docs/architecture.md, "Shared memory").

One writer; each change a new immutable shared-memory-dict (JSON) named ``<base>.g<generation>``;
the generation in a one-word array readers load per batch; no resource tracker; old dicts
unlinked. Segments are real, named ``jizhi.test-cs-<pid>...``, removed at the end. The torn-read
test runs a writer and a reader as separate fresh interpreters, as the supervisor and a worker are.
"""
import json
import logging
import os
import subprocess
import sys

import pytest

from jizhi import controlstate, shm
from jizhi.errors import ShmFull
from jizhi.shedding import Control

INSTANCE = f"test-cs-{os.getpid()}"


def segments():
    return sorted(p.name for p in shm.SHM_DIR.glob(f"jizhi.{INSTANCE}.*"))


@pytest.fixture
def base():
    name = shm.segment_name(INSTANCE, "r1", "demo", "shed")
    yield name
    left = segments()
    shm.remove_instance(INSTANCE)
    assert left == [], "the test left segments"


def test_a_reader_sees_nothing_before_the_first_change_then_each_change_whole_with_its_generation(base):
    w = controlstate.Writer(base)
    r = controlstate.Reader(base)
    assert r.read() is None and w.read() is None
    assert w.publish({"mode": "auto", "quota": 0.4}) == 1
    assert r.read() == {"mode": "auto", "quota": 0.4, "generation": 1}
    assert r.read() is r.read()                  # decoded once per change, not per batch
    w.publish({"mode": "manual", "quota": 0.1 + 0.2, "versions": {"demo": 3}})
    assert r.read() == {"mode": "manual", "quota": 0.1 + 0.2, "versions": {"demo": 3}, "generation": 2}
    assert w.read() == r.read()
    w.close()
    r.close()
    shm.unlink(base)


def test_each_change_is_a_new_json_segment_named_by_its_generation_and_the_old_one_is_unlinked(base):
    w = controlstate.Writer(base)
    r = controlstate.Reader(base)
    for i in range(1, 101):
        w.publish({"quota": i / 100})
        assert segments() == sorted([base, f"{base}.g{i}"])
        if i % 7 == 0:
            assert r.read()["quota"] == i / 100
    raw = (shm.SHM_DIR / f"{base}.g100").read_bytes()
    assert json.loads(raw.rstrip(b"\0")) == {"quota": 1.0, "generation": 100}    # JSON: never pickle
    assert r.read()["generation"] == 100
    w.close()
    assert segments() == [base]                  # the writer's close unlinks its live dict
    assert r.read()["generation"] == 100         # what a reader decoded stays readable
    r.close()
    shm.unlink(base)


def test_a_reader_that_missed_generations_reads_only_the_newest():
    base = shm.segment_name(INSTANCE, "r1", "skip", "shed")
    w = controlstate.Writer(base)
    try:
        r = controlstate.Reader(base)
        for i in range(5):
            w.publish({"i": i})
        assert r.read() == {"i": 4, "generation": 5}
        r.close()
    finally:
        w.close()
        shm.unlink(base)
    assert segments() == []


def test_the_shedding_control_keeps_its_api_and_reads_through_the_control_state(base):
    w = Control(base, writable=True, create=True)
    r = Control(base)
    assert r.read() == {"generation": 0, "mode": "off", "quota": 1.0, "policy_generation": 0, "queue": 0.0,
                        "p99_ms": 0.0}
    w.publish("manual", 0.25, 3, queue=5, p99=12.5)
    assert r.read() == {"generation": 1, "mode": "manual", "quota": 0.25, "policy_generation": 3, "queue": 5.0,
                        "p99_ms": 12.5}
    assert segments() == sorted([base, f"{base}.g1"])
    with pytest.raises(ValueError, match="shedding mode 'fast' is not one of off, auto, manual"):
        w.publish("fast", 0.5, 0)
    assert r.read()["generation"] == 1
    w.close()
    r.close()
    shm.unlink(base)


def _run(code, *args, stdin=None):
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# The values of generation g are a function of g (sizes vary, so a dict is never rewritten in place
# by accident): a reader checks that everything it sees is exactly one of them.
VALUES = """
def values(g):
    return {"mode": ("off", "auto", "manual")[g % 3], "quota": g / 7, "policy_generation": g // 5,
            "pad": "x" * (g * 37 % 1500), "tail": [g, -g, g * 0.5]}
"""

WRITER = VALUES + """
import sys
from multiprocessing import resource_tracker
from jizhi import controlstate
w = controlstate.Writer(sys.argv[1])
print("created", flush=True)
assert sys.stdin.readline() == "go\\n"
for g in range(1, int(sys.argv[2]) + 1):
    w.publish(values(g))
sys.stdin.readline()                # the reader is done
print(resource_tracker._resource_tracker._fd is None, flush=True)
"""     # exits without close(): its live dict goes with the process

READER = VALUES + """
import json, sys
from multiprocessing import resource_tracker
from jizhi import controlstate
r = controlstate.Reader(sys.argv[1])
last, seen, reads, bad = 0, 0, 0, []
print("attached", flush=True)
while last < int(sys.argv[2]):
    v = r.read()
    reads += 1
    if v is None:
        continue
    g = v["generation"]
    if g != last:
        seen += 1
        if g < last or v != dict(values(g), generation=g):
            bad.append([last, v])
        last = g
print(json.dumps({"reads": reads, "seen": seen, "bad": bad[:3], "n_bad": len(bad),
                  "tracker": resource_tracker._resource_tracker._fd is None}), flush=True)
"""


def test_a_reader_process_sees_only_values_written_whole_while_a_writer_process_changes_them_fast():
    base = shm.segment_name(INSTANCE, "r1", "race", "shed")
    changes = 3000
    writer = _run(WRITER, base, str(changes), stdin=subprocess.PIPE)
    reader = None
    try:
        assert writer.stdout.readline() == "created\n", writer.stderr.read()
        reader = _run(READER, base, str(changes))
        assert reader.stdout.readline() == "attached\n", reader.stderr.read()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        out, err = reader.communicate(timeout=300)
        assert reader.returncode == 0, err
        result = json.loads(out)
        writer.stdin.write("done\n")
        writer.stdin.flush()
        w_out, w_err = writer.communicate(timeout=60)
        assert writer.returncode == 0, w_err
    finally:
        for p in (writer, reader):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    print(f"\n{result['reads']} reads saw {result['seen']} of {changes} generations")
    assert result["n_bad"] == 0, result["bad"]
    assert result["seen"] > 1                     # the reader did follow a moving writer
    assert result["tracker"] is True and w_out == "True\n"    # neither process started a resource tracker
    assert segments() == [base]                   # the writer's exit unlinked its live dict
    shm.unlink(base)


def test_a_full_dev_shm_keeps_the_last_published_values_and_says_so_once(base, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="jizhi.shedding")
    w = Control(base, writable=True, create=True)
    r = Control(base)
    assert w.publish("auto", 0.5, 0) is True

    def full(name, nbytes):
        raise ShmFull(shm.full_message(f"segment {name}", nbytes))
    with monkeypatch.context() as m:
        m.setattr(shm, "create", full)
        assert w.publish("auto", 0.3, 0) is False
        assert w.publish("auto", 0.2, 0) is False
    assert r.read()["quota"] == 0.5 and r.read()["generation"] == 1
    errors = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"shedding control {base}: a change was not published, "
                                                     f"the shedders keep the previous values: /dev/shm is full: "
                                                     f"segment {base}.g2: ")
    assert w.publish("auto", 0.2, 0) is True
    assert r.read()["quota"] == 0.2 and r.read()["generation"] == 2
    assert f"shedding control {base}: changes are published again" in caplog.text
    w.close()
    r.close()
    shm.unlink(base)
