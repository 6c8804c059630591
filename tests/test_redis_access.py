"""Redis Cluster as teams run it (issue 22, items 1-3): passwords, ACL users, TLS, announced addresses.

Real ``redis-server`` clusters started by these tests (3 masters, no replica, loopback): one with
``requirepass``, one with an ACL user (the default user off), one TLS only (certificates made here with
``openssl``), one whose nodes announce host names no resolver knows (``cluster-announce-hostname``), reached
through the URL's ``map``. Through each, ``jizhictl cube push`` and the cube reader (cube/redis.py) read back
exactly the local cube; a wrong or missing password is one line naming the node and Redis's message.
"""
import json
import re

import numpy as np
import pytest

from conftest import demo_pipeline_text, write_text
from daemon_helpers import jizhictl, jizhictl_ok, popen
from redis_helpers import require_redis
from jizhi.bundle import Bundle
from jizhi.cube.connect import Access, AuthError
from jizhi.cube.push import read_cube
from jizhi.cube.redis import RedisCube
from jizhi.tools.redis_local import LocalCluster, command, free_port_block, make_certificates

require_redis()

SECRET = "s3cret-Pa55"


def _cluster(tmp_path_factory, name, **kw):
    c = LocalCluster(tmp_path_factory.mktemp(name), base_port=free_port_block(3), replicas=0, node_timeout_ms=1000,
                     **kw)
    c.start(timeout_s=60)
    return c


class View:
    """One of the started clusters as a kind of client sees it: its URL (credentials) and options."""

    def __init__(self, cluster, url, options):
        self.cluster, self.url, self._options = cluster, url, options

    def options(self):
        return self._options


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Two clusters, four kinds of access: ``password`` (requirepass: the default user's) and ``acl`` (an ACL
    user, on the same nodes); ``tls``, TLS only, whose nodes announce names no resolver knows, so every
    client of it needs the map as well as the CA (``names``: the same)."""
    made = []
    try:
        pw = _cluster(tmp_path_factory, "redis-pw", password=SECRET)
        made.append(pw)
        for port in pw.ports:
            command(port, "ACL", "SETUSER", "jizhi", "on", f">{SECRET}", "~*", "&*", "+@all", access=pw.access)
        tls = _cluster(tmp_path_factory, "redis-tls", tls=make_certificates(tmp_path_factory.mktemp("certs")),
                       announce_hostname="node-{port}.jizhi.invalid")
        made.append(tls)
        yield {"password": View(pw, pw.url, ""), "acl": View(pw, pw.url.replace("://:", "://jizhi:"), ""),
               "tls": View(tls, tls.url, tls.options()), "names": View(tls, tls.url, tls.options())}
    finally:
        for c in made:
            c.stop()


@pytest.fixture(scope="module")
def cube(demo_bundle):
    return read_cube(Bundle(demo_bundle))


def _reads_back(url, demo_bundle, cube):
    b = Bundle(demo_bundle)
    keys, vectors = cube
    q = np.random.default_rng(3).choice(keys, 2000)
    base, _, opts = url.partition("?")
    r = RedisCube(f"{base}/{b.name}/{b.version}" + (f"?{opts}" if opts else ""), b.dim, timeout_ms=500)
    try:
        v, found = r.lookup(q)
    finally:
        r.close()
    pos = np.searchsorted(keys, q)
    assert found.all() and np.array_equal(v, vectors[pos]) and r.degraded == 0


def test_urls_carry_credentials_ipv6_seeds_tls_and_address_maps(tmp_path, monkeypatch):
    a = Access("redis://jizhi:p%40ss@[::1]:7300,10.0.0.5:7001/demo/1?map=10.0.0.5:7001=127.0.0.1:17001,"
               "node-a.invalid=127.0.0.1")
    assert (a.user, a.password) == ("jizhi", "p@ss") and a.seeds == [("::1", 7300), ("10.0.0.5", 7001)]
    assert a.parts == ["demo", "1"] and "p@ss" not in a.redacted() and "jizhi:***@" in a.redacted()
    assert a.reach(("10.0.0.5", 7001)) == ("127.0.0.1", 17001)
    assert a.reach(("node-a.invalid", 7002)) == ("127.0.0.1", 7002) and a.reach(("x", 1)) == ("x", 1)
    (tmp_path / "pw").write_text("from-a-file\n")
    assert Access(f"redis://:ignored@h:1?password_file={tmp_path / 'pw'}").password == "from-a-file"
    monkeypatch.setenv("JZ_TEST_PW", "from-env")
    assert Access("redis://h:1?password_env=JZ_TEST_PW").password == "from-env"
    for url, why in (("redis://h:1?password_env=JZ_NOPE_NOPE", "no such environment variable"),
                     ("redis://jizhi@h:1", "without a password"), ("redis://::1:7000", "in brackets"),
                     ("redis://h:1?tls_ca=x", "need a rediss:// URL"), ("http://h:1", "not a redis://"),
                     ("redis://h:1?map=a:1", "ANNOUNCED=REACHABLE")):
        with pytest.raises(ValueError, match=why):
            Access(url)


@pytest.mark.parametrize("kind", ["password", "acl", "tls"])
def test_push_and_read_through_each_kind_of_cluster_equal_the_local_cube(clusters, kind, demo_bundle, cube):
    c = clusters[kind]
    url = c.url + c.options()
    out = jizhictl_ok("cube", "push", demo_bundle, "--redis", url, "--strategy", "table", "--quiet")
    assert "pushed jz:demo:1" in out
    _reads_back(url, demo_bundle, cube)
    assert SECRET not in out


def test_a_wrong_or_missing_password_is_one_line_naming_the_node_and_redis_message(clusters, demo_bundle):
    for kind, url, why in (
            ("password", clusters["password"].url.replace(f":{SECRET}@", ""), "NOAUTH Authentication required"),
            ("password", clusters["password"].url.replace(SECRET, "wrong"), "WRONGPASS"),
            ("acl", clusters["acl"].url.replace(SECRET, "wrong"), "WRONGPASS")):
        r = jizhictl("cube", "push", demo_bundle, "--redis", url, "--quiet")
        assert r.returncode == 1, r.stderr
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and why in line and "127.0.0.1:" in line, line
        assert "Traceback" not in r.stderr and "wrong" not in line.replace("WRONGPASS", "")
        with pytest.raises(AuthError, match=why):
            RedisCube(url + "/demo/1", timeout_ms=500)


def test_plain_tcp_to_a_tls_cluster_and_an_unmapped_announced_name_fail_clearly(clusters, demo_bundle):
    tls = clusters["tls"]
    ca, mapping = tls.options().lstrip("?").split("&")
    r = jizhictl("cube", "push", demo_bundle, "--redis", tls.url.replace("rediss://", "redis://") + "?" + mapping,
                 "--quiet")
    assert r.returncode == 1 and "no node of" in r.stderr
    r = jizhictl("cube", "push", demo_bundle, "--redis", f"{tls.url}?{mapping}", "--quiet")   # no CA: refused
    assert r.returncode == 1 and "TLS" in r.stderr and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    r = jizhictl("cube", "push", demo_bundle, "--redis", f"{tls.url}?{ca}", "--quiet")        # names, no map
    assert r.returncode == 1 and "node-" in r.stderr and ".jizhi.invalid" in r.stderr and "map=" in r.stderr


def _remote_pipeline(tmp_path, url, name):
    return write_text(tmp_path / f"{name}.toml", demo_pipeline_text(
        name, pool=1, options={"cube": [f'remote = "{url}"', "disk_cache_keys = 2000"]}))


def test_jizhid_refuses_to_start_on_refused_credentials_or_serves_degraded_when_told(
        clusters, launch, demo_bundle, demo_trace, tmp_path):
    c = clusters["password"]
    jizhictl_ok("cube", "push", demo_bundle, "--redis", c.url, "--strategy", "key", "--quiet")
    wrong = c.url.replace(SECRET, "wrong") + "/{name}/{version}?timeout_ms=100&retry_ms=200"
    server = launch.start(pipelines=(str(_remote_pipeline(tmp_path, wrong, "refuse")),), wait_ready=False)
    popen(server)
    assert server.proc.wait(60) == 2
    log = server.log_text()
    assert re.search(r"jizhid: pipeline refuse: the Redis cube at redis://:\*\*\*@127\.0\.0\.1:\d+.* refused our "
                     r"credentials: 127\.0\.0\.1:\d+: WRONGPASS", log), server.log_tail()
    assert "Traceback" not in log and "wrong" not in log.replace("WRONGPASS", "")
    server = launch.start(pipelines=(str(_remote_pipeline(tmp_path, wrong + "&on_auth_error=degrade", "degrade")),),
                          config_text="[cube]\nhot_tier_mb = 1\n")
    with server.client(timeout_s=10) as client:
        user, items, _ = demo_trace[0]
        assert client.score(user, items, pipeline="degrade", deadline_ms=5000).ok
    fig = json.loads(jizhictl_ok("stats", "--json", run_dir=server.run_dir))["cube"]["degrade"]
    assert fig["remote_degraded"] > 0
    assert "on_auth_error=degrade: serving the default vectors" in server.log_text()
    assert server.stop() == 0


def test_user_rows_reach_a_cluster_through_the_same_client_credentials_and_tls(clusters, demo_bundle):
    """The online user rows (cube/userrows.py) read through the cube's client: the same URL options hold."""
    from jizhi.bundle import Profiles
    from jizhi.cube.userrows import UserRows
    b = Bundle(demo_bundle)
    users = np.asarray(Profiles(b, "user").ids)[:50].astype(np.uint64)
    for kind in ("acl", "tls"):
        c = clusters[kind]
        url = f"{c.url}/demo-users{c.options()}"
        assert "user rows" in jizhictl_ok("profiles", "push", "--model", demo_bundle, url, "--quiet")
        rows = UserRows(url + ("&" if "?" in url else "?") + "ttl_ms=0", b)
        try:
            assert rows.read(users)[0].all() and rows.degraded == 0
        finally:
            rows.close()
