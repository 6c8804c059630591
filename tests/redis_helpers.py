"""Real Redis Clusters for the tests (jizhi/tools/redis_local.py): the skip when redis-server is missing (a
failure under .ci/run, which sets JIZHI_REQUIRE_REDIS), and a small cluster started for a module."""
import os
from contextlib import contextmanager

import pytest

from jizhi.tools.redis_local import LocalCluster, free_port_block, server_binary


def require_redis():
    """Call at a test module's top: skip the module without redis-server (fail under JIZHI_REQUIRE_REDIS)."""
    if server_binary() is None:
        if os.environ.get("JIZHI_REQUIRE_REDIS"):
            raise RuntimeError("JIZHI_REQUIRE_REDIS is set but redis-server is not installed")
        pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)


@contextmanager
def small_cluster(tmp_path_factory, name, masters=3, replicas=0, node_timeout_ms=1000, **kw):
    """A started cluster of ``masters`` (and ``replicas`` each) on loopback, stopped at the end."""
    c = LocalCluster(tmp_path_factory.mktemp(name), base_port=free_port_block(masters * (1 + replicas)),
                     masters=masters, replicas=replicas, node_timeout_ms=node_timeout_ms, **kw)
    c.start(timeout_s=90)
    try:
        yield c
    finally:
        c.stop()
