"""The wire protocol without Python: examples/node/client.js against a real jizhid, and docs/protocol.md against
the server's replies.

* The Node.js client's top-k ids and scores equal the Python client's, bit for bit (trace requests, and ids given
  on its command line);
* every reply's fields are exactly the ones docs/protocol.md's tables list (the tables are read from the file,
  so the document cannot drift from the server);
* the request rules the document states hold (``v`` optional, exact dtype strings, array order, duplicate ids,
  ``id`` nil when frame 0 cannot be read), and ids sent as JavaScript Numbers fail as its "64-bit ids" says.

Needs ``node`` (18+) and ``npm``: the dependencies of examples/node are used in place when its node_modules
matches package-lock.json, else ``npm ci`` installs them into a temporary copy. Without node/npm, or with the
npm registry unreachable, the Node tests skip saying why; with JIZHI_REQUIRE_NODE set (.ci/run) they fail instead.
"""
import json
import os
import re
import shutil
import subprocess

import msgpack
import numpy as np
import pytest
import zmq

from conftest import REPO, free_port

NODE_DIR = REPO / "examples" / "node"
PROTOCOL_MD = REPO / "docs" / "protocol.md"
NPM_TIMEOUT_S = 240      # npm ci from an empty cache: a few seconds; npm's own fetch timeout is 20 s
NODE_TIMEOUT_S = 30
REQUESTS = (0, 5, 11, 17)
NETWORK_ERRORS = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|"
                            r"network|fetch failed|request to \S+ failed", re.I)


def unavailable(reason):
    if os.environ.get("JIZHI_REQUIRE_NODE"):
        pytest.fail(f"JIZHI_REQUIRE_NODE is set but {reason}", pytrace=False)
    pytest.skip(reason)


def dependencies_installed(d):
    """Every package of ``d``/package-lock.json is in ``d``/node_modules at its locked version."""
    lock = json.loads((d / "package-lock.json").read_text())
    for path, meta in lock["packages"].items():
        if not path:
            continue
        try:
            installed = json.loads((d / path / "package.json").read_text())
        except (FileNotFoundError, ValueError):
            return False
        if installed.get("version") != meta.get("version"):
            return False
    return True


@pytest.fixture(scope="module")
def node_client(tmp_path_factory):
    """The directory whose client.js to run, with its dependencies installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        unavailable("node and npm are not installed (Debian: apt-get install nodejs npm)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=NODE_TIMEOUT_S).stdout
    if int(re.match(r"v(\d+)", version).group(1)) < 18:
        unavailable(f"node {version.strip()} is older than 18 (@msgpack/msgpack 3 needs 18)")
    if dependencies_installed(NODE_DIR):
        return NODE_DIR
    work = tmp_path_factory.mktemp("node-client") / "node"
    shutil.copytree(NODE_DIR, work, ignore=shutil.ignore_patterns("node_modules"))
    argv = [npm, "ci", "--no-audit", "--no-fund", "--fetch-timeout=20000", "--fetch-retries=1"]
    env = dict(os.environ, npm_config_update_notifier="false")
    try:
        r = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        unavailable(f"npm ci did not finish in {NPM_TIMEOUT_S} s: is the npm registry reachable?")
    out = (r.stdout + r.stderr)[-3000:]
    if r.returncode != 0:
        network = NETWORK_ERRORS.search(out)
        if network:
            unavailable(f"the npm registry is unreachable: npm ci exited {r.returncode} ({network.group(0)})")
        pytest.fail(f"npm ci in a copy of examples/node exited {r.returncode}:\n{out}")
    assert dependencies_installed(work), f"npm ci left node_modules unlike package-lock.json:\n{out}"
    return work


def node(cwd, *args, expect=0):
    """Run ``node ARGS`` in ``cwd``; assert its exit code; return the CompletedProcess."""
    r = subprocess.run(["node", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=NODE_TIMEOUT_S,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == expect, f"node {' '.join(map(str, args))} exited {r.returncode}, not {expect}:\n" \
                                   f"{r.stdout}{r.stderr}"
    return r


def client_json(node_client, server, *args):
    """client.js --json ARGS against ``server``: the reply as a dict."""
    r = node(node_client, "client.js", "--endpoint", server.endpoint, "--timeout-ms", 20_000, "--json", *args)
    return json.loads(r.stdout)


def documented_fields(marker):
    """{key: present} of the table after ``<!-- fields: MARKER -->`` in docs/protocol.md."""
    lines = PROTOCOL_MD.read_text().splitlines()
    i = lines.index(f"<!-- fields: {marker} -->") + 3      # the marker, the header row, the separator
    fields = {}
    while i < len(lines) and lines[i].startswith("|"):
        cells = [c.strip() for c in lines[i].strip("|").split("|")]
        for key in re.findall(r"`([^`]+)`", cells[0]):
            fields[key] = cells[2]
        i += 1
    assert fields, f"no table after the {marker} marker in {PROTOCOL_MD}"
    return fields


def assert_documented(header, marker):
    """``header``'s keys are all in the ``marker`` table, and every row present "always" is in ``header``."""
    fields = documented_fields(marker)
    assert set(header) <= set(fields), f"reply fields missing from docs/protocol.md ({marker}): " \
                                       f"{sorted(set(header) - set(fields))}"
    always = {k for k, present in fields.items() if present == "always"}
    assert always <= set(header), f"fields docs/protocol.md ({marker}) says are always there are missing: " \
                                  f"{sorted(always - set(header))}"


@pytest.fixture(scope="module")
def server(launch_module):
    return launch_module.start(pipelines=["demo"])


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout_s=20.0)


@pytest.fixture(scope="module")
def trace_path(demo_trace, tmp_path_factory):
    """The test trace as a trace.npz file (docs/formats.md) for client.js --trace."""
    path = tmp_path_factory.mktemp("node-trace") / "trace.npz"
    np.savez(path, users=demo_trace.users, offsets=demo_trace.offsets, items=demo_trace.items,
             recall_scores=demo_trace.recall_scores)
    return path


def assert_same_bits(node_reply, python_reply):
    ids = np.array([int(x) for x in node_reply["item_ids"]], dtype=np.uint64)
    scores = np.array(node_reply["scores"], dtype=np.float64).astype(np.float32)
    assert np.array_equal(scores.astype(np.float64), np.array(node_reply["scores"])), "a score is not a float32"
    assert np.array_equal(ids, python_reply.item_ids)
    assert np.array_equal(scores.view(np.uint32), python_reply.scores.view(np.uint32))


# ---------------------------------------------------------------------------
# The Node.js client


def test_ping_and_info_replies_have_exactly_the_documented_fields(node_client, server):
    pong = client_json(node_client, server, "ping")
    assert pong == {"v": 1, "status": "ok", "id": 1, "pong": True}
    assert_documented(pong, "ping-reply")
    info = client_json(node_client, server, "info")
    assert info["status"] == "ok" and info["ready"] is True and info["default_pipeline"] == "demo"
    assert_documented(info, "info-reply")
    assert list(info["pipelines"]) == ["demo"]
    assert_documented(info["pipelines"]["demo"], "info-pipeline")


def test_the_node_client_s_top_k_equals_the_python_client_s_bit_for_bit(node_client, server, client, demo_trace,
                                                                         trace_path):
    for q in REQUESTS:
        user, items, recall = demo_trace[q]
        expected = client.score(user, items, recall, top_k=10)
        got = client_json(node_client, server, "score", "--trace", trace_path, "--index", q, "--top-k", 10)
        assert got["status"] == "ok" and got["unknown_items"] == 0
        assert len(got["item_ids"]) == 10
        assert_same_bits(got, expected)
        header = {k: v for k, v in got.items() if k not in ("item_ids", "scores")}
        assert sorted(header) == sorted(expected.header)
        assert_documented(header, "score-reply")
    # Ids on the command line (decimal text -> BigInt), no recall scores, another top-k.
    user, items, _ = demo_trace[2]
    items = items[:60]
    expected = client.score(user, items, top_k=7)
    got = client_json(node_client, server, "score", "--user", user, "--items", ",".join(map(str, items)),
                      "--top-k", 7)
    assert len(got["item_ids"]) == 7
    assert_same_bits(got, expected)
    # The human-readable form prints the same ids.
    text = node(node_client, "client.js", "--endpoint", server.endpoint, "score", "--user", user,
                "--items", ",".join(map(str, items)), "--top-k", 7).stdout
    assert [int(line.split()[1]) for line in text.splitlines()[1:]] == [int(x) for x in expected.item_ids]


def test_a_request_s_own_features_from_node_score_an_unknown_user_as_the_profiles_score_a_known_one(
        node_client, server, client, demo_bundle, demo_trace):
    """README, "Wire protocol": features in the request, from another language."""
    from profile_helpers import profile_features
    user, items, _ = demo_trace[3]
    items = items[:40]
    # JSON numbers are JavaScript Numbers: the history of item ids (above 2**53) is left out here.
    feats = {k: v for k, v in profile_features(demo_bundle, user).items() if k != "u_hist"}
    stranger = 2 ** 40 + 12345            # no profile: scored from the request alone
    expected = client.score(stranger, items, top_k=10, features=feats)
    got = client_json(node_client, server, "score", "--user", stranger, "--items", ",".join(map(str, items)),
                      "--features", json.dumps(feats))
    assert got["unknown_user"] == 1 and expected["unknown_user"] == 1
    assert not np.allclose(client.score(stranger, items, top_k=10).scores, expected.scores)
    assert [int(x) for x in got["item_ids"]] == [int(x) for x in expected.item_ids]
    assert max(abs(a - b) for a, b in zip(got["scores"], expected.scores.tolist())) < 1e-6
    bad = node(node_client, "client.js", "--endpoint", server.endpoint, "score", "--user", user, "--items",
               ",".join(map(str, items)), "--features", '{"no_such_field": 1}', expect=1)
    assert "BAD_REQUEST" in bad.stdout + bad.stderr and "features.no_such_field" in bad.stdout + bad.stderr


# Read a trace request the way a careless JavaScript client would: its ids through Number.
NUMBERS_SCRIPT = r"""
const { call, scoreRequest } = require("./client.js");
const { readNpz } = require("./npz.js");
const [endpoint, trace, q] = process.argv.slice(1);
(async () => {
  const t = readNpz(trace);
  const a = Number(t.offsets[q]), b = Number(t.offsets[Number(q) + 1]);
  const user = t.users[q], items = Array.from(t.items.subarray(a, b));
  const ask = async (req) => (await call(endpoint, 20000, ...scoreRequest({ topK: 10, ...req })));
  const good = await ask({ user, items });
  const viaNumber = await ask({ user, items: items.map((id) => BigInt(Number(id))) });   // JSON.parse, Number(...)
  const userNumber = await ask({ user: Number(user), items });
  const top1 = (r) => String(r.arrays.item_ids[0]);
  console.log(JSON.stringify({
    n: items.length, roundTrips: items.filter((id) => BigInt(Number(id)) === id).length,
    good: { status: good.header.status, unknown: good.header.unknown_items, top1: top1(good) },
    viaNumber: { status: viaNumber.header.status, unknown: viaNumber.header.unknown_items, top1: top1(viaNumber) },
    userNumber: { status: userNumber.header.status, code: userNumber.header.code, message: userNumber.header.message },
  }));
})();
"""


def test_ids_sent_as_javascript_numbers_fail_as_the_document_warns(node_client, server, demo_trace, trace_path):
    doc = PROTOCOL_MD.read_text()
    doc = " ".join(doc.split())
    assert "useBigInt64: true" in doc and "This failure is silent" in doc
    user, items, _ = demo_trace[0]
    assert user >= 2 ** 53
    r = json.loads(node(node_client, "-e", NUMBERS_SCRIPT, server.endpoint, trace_path, 0).stdout)
    assert r["good"] == {"status": "ok", "unknown": 0, "top1": r["good"]["top1"]}
    # Item ids rounded through a double: answered ok, nearly all unknown, a wrong top-1. Silent.
    assert r["viaNumber"]["status"] == "ok"
    assert r["viaNumber"]["unknown"] == r["n"] - r["roundTrips"]
    assert r["viaNumber"]["unknown"] >= 0.9 * r["n"]
    assert r["viaNumber"]["top1"] != r["good"]["top1"]
    # A user id as a Number above 2^53 is written as a msgpack float64: refused, loudly.
    assert r["userNumber"] == {"status": "error", "code": "BAD_REQUEST",
                               "message": "user must be an unsigned 64-bit integer"}


def test_the_document_s_javascript_example_runs_as_written(node_client, server):
    doc = PROTOCOL_MD.read_text()
    example = re.search(r"```js\n(.*?)```", doc[doc.index("## 64-bit ids"):], re.S).group(1)
    script = ('const zmq = require("zeromq");\n(async () => {\n'
              'const sock = new zmq.Request({ linger: 0, receiveTimeout: 20000 });\n'
              f'sock.connect({json.dumps(server.endpoint)});\n{example}\nsock.close();\n}})();\n')
    out = node(node_client, "-e", script).stdout.split()
    assert out[0::2] == ["4006619014170560379n", "602261923939046469n"] or \
        out[0::2] == ["602261923939046469n", "4006619014170560379n"], out
    assert all(0.0 < float(x) < 1.0 for x in out[1::2]), out


def test_the_exit_codes_are_the_documented_ones(node_client, server):
    r = node(node_client, "client.js", "--endpoint", server.endpoint, "score", "--user", "1", "--items", "1,2",
             "--pipeline", "nope", expect=1)
    assert r.stdout.startswith("error UNKNOWN_PIPELINE: ")
    silent = f"tcp://127.0.0.1:{free_port()}"       # nobody listens there: no reply
    r = node(node_client, "client.js", "--endpoint", silent, "--timeout-ms", 300, "ping", expect=3)
    assert "no reply" in r.stderr
    r = node(node_client, "client.js", "score", "--user", str(2 ** 64), "--items", "1", expect=2)
    assert "not an unsigned 64-bit integer" in r.stderr


# ---------------------------------------------------------------------------
# The request rules of docs/protocol.md, over a raw socket (no client library in between)


def raw(server, frames, timeout_ms=20_000):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        reply = sock.recv_multipart()
    finally:
        sock.close(0)
    return msgpack.unpackb(reply[0], raw=False), reply[1:]


def packb(header):
    return msgpack.packb(header, use_bin_type=True)


def score_header(user, n, arrays=None, **fields):
    header = {"v": 1, "op": "score", "id": "r", "user": user, "top_k": 10,
              "arrays": arrays or [{"name": "item_ids", "dtype": "uint64", "shape": [n]}]}
    header.update(fields)
    return header


def test_v_is_optional_and_the_dtype_strings_are_exact(server, demo_trace):
    user, items, _ = demo_trace[1]
    n = items.shape[0]
    with_v = raw(server, [packb(score_header(user, n)), items.tobytes()])
    header = score_header(user, n)
    del header["v"]
    without_v = raw(server, [packb(header), items.tobytes()])
    assert with_v[0]["status"] == without_v[0]["status"] == "ok"
    assert with_v[1] == without_v[1]
    for dtype in ("<u8", "u8", "UINT64"):
        h, frames = raw(server, [packb(score_header(user, n, [{"name": "item_ids", "dtype": dtype, "shape": [n]}])),
                                 items.tobytes()])
        assert (h["status"], h["code"], frames) == ("error", "BAD_REQUEST", [])
        assert_documented(h, "error-reply")


def test_array_and_candidate_order_do_not_change_the_reply(server, demo_trace):
    user, items, recall = demo_trace[3]
    n = items.shape[0]
    ids_first = [{"name": "item_ids", "dtype": "uint64", "shape": [n]},
                 {"name": "recall_scores", "dtype": "float32", "shape": [n]}]
    a = raw(server, [packb(score_header(user, n, ids_first)), items.tobytes(), recall.tobytes()])
    b = raw(server, [packb(score_header(user, n, ids_first[::-1])), recall.tobytes(), items.tobytes()])
    perm = np.random.default_rng(3).permutation(n)
    c = raw(server, [packb(score_header(user, n, ids_first)), items[perm].tobytes(), recall[perm].tobytes()])
    assert a[0]["status"] == "ok"
    assert a[1] == b[1] == c[1], "the reply's frames differ"


def test_duplicate_item_ids_are_accepted_and_scored_as_separate_candidates(server, demo_trace):
    user, items, _ = demo_trace[4]
    dup = np.concatenate([items, items[:3]])
    n = dup.shape[0]
    h, frames = raw(server, [packb(score_header(user, n, **{"return": "all"})), dup.tobytes()])
    assert h["status"] == "ok" and h["arrays"][0]["shape"] == [n]
    ids, scores = np.frombuffer(frames[0], "<u8"), np.frombuffer(frames[1], "<f4")
    assert np.array_equal(ids, dup)
    assert np.array_equal(scores[:3].view(np.uint32), scores[-3:].view(np.uint32))
    h, frames = raw(server, [packb(score_header(user, n, top_k=n)), dup.tobytes()])
    assert h["status"] == "ok" and h["arrays"][0]["shape"] == [n]   # each copy is ranked on its own


def test_the_reply_id_is_the_request_s_and_nil_when_frame_0_cannot_be_read(server):
    assert raw(server, [packb({"v": 1, "op": "ping", "id": 2 ** 64 - 1})])[0]["id"] == 2 ** 64 - 1
    assert raw(server, [packb({"v": 1, "op": "ping", "id": "abc"})])[0]["id"] == "abc"
    assert raw(server, [packb({"v": 1, "op": "ping"})])[0]["id"] is None
    for frame0 in (b"\xc1 not msgpack", packb([1, 2, 3]), packb({"v": 1, "op": "ping", "id": 1.5})):
        h, _ = raw(server, [frame0])
        assert (h["status"], h["code"], h["id"]) == ("error", "BAD_REQUEST", None)
        assert_documented(h, "error-reply")
    h, _ = raw(server, [packb({"v": 1, "op": "nope", "id": 9})])
    assert (h["code"], h["id"]) == ("BAD_REQUEST", 9)


def test_a_feedback_reply_has_the_documented_fields(server, demo_trace):
    _, items, _ = demo_trace[5]
    # (a user of no trace request: its overlay changes, so its next scores would)
    fb = {"v": 1, "op": "feedback", "id": "f", "user": 1, "item": int(items[0]), "event": "click",
          "idempotency_id": f"node-test-{os.getpid()}"}
    first, again = raw(server, [packb(fb)])[0], raw(server, [packb(fb)])[0]
    assert (first["applied"], first["duplicate"]) == (True, False)
    assert (again["applied"], again["duplicate"]) == (False, True)
    assert_documented(first, "feedback-reply")
