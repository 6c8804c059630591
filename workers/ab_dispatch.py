"""ab_dispatch: A/B test groups, each its own branch of the pipeline.

The stage routes a stable hash of the user to test groups with configured
fractions; every group is a branch (its own model, or another version of a
model as a head bundle), and the stages the branches share (reader,
features, cube before it; the ranker after) run once::

    [[stage]]
    name = "ab"
    processor = "ab_dispatch"
    salt = "exp-2026-11"         # another salt: an independent split of the users
    next = ["dnn_a", "dnn_b", "dnn_c"]
    groups = [
      { name = "control", fraction = 0.5, next = "dnn_a" },
      { name = "wide",    fraction = 0.3, next = "dnn_b" },
      { name = "deep",    fraction = 0.2, next = "dnn_c" },
    ]

The broker evaluates it itself when a request reaches it (one hash per
request, no worker and no hop): the request then walks only its group's
branch; the stages of the other branches are skipped (the broker's join
counts them done). A user's group depends only on the user id, the salt and
the fractions, so a user stays in its group across requests, restarts and
reloads. Changing the fractions is a config reload (``jizhictl reload``):
the groups are consecutive intervals of the hash's [0, 1) range in the order
written, so moving 0.1 from one group to the next moves only the users in
that 0.1 of the range. The reply names the group (``ab_group``) and
``jizhictl stats`` splits requests, latency and errors by group.
"""
import zlib

import numpy as np

from jizhi.workers.stage import Stage

_M64 = (1 << 64) - 1      # salt_key's 64 bits


def parse_groups(config):
    """``[(name, fraction, head stage)]`` of an ab_dispatch stage's config, checked (ValueError)."""
    groups = config.get("groups")
    if not isinstance(groups, list) or len(groups) < 2:
        raise ValueError("ab_dispatch needs groups = [{ name, fraction, next }, ...] with at least two groups")
    out, names = [], set()
    for g in groups:
        if not isinstance(g, dict):
            raise ValueError(f"ab_dispatch: a group must be a table {{ name, fraction, next }}, got {g!r}")
        name, fraction, head = g.get("name"), g.get("fraction"), g.get("next")
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"ab_dispatch: group names must be distinct strings, got {name!r}")
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ValueError(f"ab_dispatch: group {name!r}: fraction must be in [0, 1], got {fraction!r}")
        if not isinstance(head, str) or not head:
            raise ValueError(f"ab_dispatch: group {name!r}: next must name the first stage of its branch")
        names.add(name)
        out.append((name, float(fraction), head))
    total = sum(f for _, f, _ in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"ab_dispatch: the fractions sum to {total:g}, not 1")
    salt = config.get("salt", "")
    if not isinstance(salt, str):
        raise ValueError(f"ab_dispatch: salt must be a string, got {salt!r}")
    return out


def salt_key(salt):
    """A 64-bit key from the salt string."""
    return (zlib.crc32(salt.encode()) << 32 | zlib.crc32(salt.encode()[::-1] + b"\x01")) & _M64


def unit_hash_array(users, key):
    """Each user's place in [0, 1): splitmix64 of (user xor key), the top 53 bits (uint64 arithmetic
    wraps modulo 2**64, as splitmix64 wants)."""
    with np.errstate(over="ignore"):
        z = users.astype(np.uint64) ^ np.uint64(key)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Router:
    """The broker's side of an ab_dispatch stage: user -> group index."""

    def __init__(self, config):
        self.groups = parse_groups(config)
        self.names = [g[0] for g in self.groups]
        self.key = salt_key(config.get("salt", ""))
        self.bounds = np.cumsum([g[1] for g in self.groups])
        self.bounds[-1] = 1.0 + 1e-12       # every hash < 1 lands in a group despite rounding

    def route(self, user):
        return int(self.route_array(np.array([user], dtype=np.uint64))[0])

    def route_array(self, users):
        return np.searchsorted(self.bounds, unit_hash_array(users, self.key), side="right")


class AbDispatch(Stage):
    """Declares the stage to the compiler; the broker routes (``Router``), no worker runs it."""
    name = "ab_dispatch"
    in_broker = True

    @classmethod
    def outputs(cls, config, bundle):
        parse_groups(config)
        return ()

    def process(self, batch):
        raise RuntimeError("ab_dispatch runs in the broker, never in a worker")
