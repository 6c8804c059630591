"""Features in the request (issue 21, item 4): context fields and the user's own features, over the profiles.

A request may carry ``context`` (values of the model's context fields: user-side fields declared ``context =
true``, which no profile holds) and ``features`` (the user's own fields and ``dense``, which replace the
profiles' for that request). Shown on a real jizhid: the same values give the same scores whether they come
from the profiles or from the request, a user the profiles do not know is scored from the request alone, a
request with features never uses the query cache, and what the model cannot take is BAD_REQUEST naming the field.
"""
import os
import re
import shutil
import tomllib

import numpy as np
import pytest

from conftest import Launcher
from profile_helpers import profile_features as _profile_features
from jizhi.bundle import Bundle, Profiles, file_entries, write_text
from jizhi.errors import RequestError
from jizhi.protocol import decode_request, encode_request
from jizhi.tomlw import toml_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = {"max_candidates": 2000, "max_message_bytes": 1 << 20}
CONTEXT_FIELD = "u_cat5"


def _decode(**kw):
    frames = encode_request("score", user=1, item_ids=np.arange(3, dtype=np.uint64), **kw)
    return decode_request([bytes(f) if not isinstance(f, bytes) else f for f in frames], LIMITS)


def test_the_wire_carries_context_and_features_checked_for_shape():
    r = _decode(context={"hour": 3}, features={"dense": [0.5, 1], "u_tags": [1, 2]})
    assert r["feats"] == {"context": {"hour": 3}, "user": {"dense": [0.5, 1], "u_tags": [1, 2]}}
    assert _decode()["feats"] is None
    # context values are the worker's to check (a model without context fields ignores them, as before)
    assert _decode(context={"page": "home"})["feats"] == {"context": {"page": "home"}, "user": {}}
    for kw, why in (({"features": {"dense": 3}}, "features.dense: expected"),
                    ({"features": {"u": [1.5]}}, "features.u: expected a list of integers"),
                    ({"features": {"u": -1}}, "features.u: raw values are integers from 0"),
                    ({"features": {"dense": [float("nan")]}}, "features.dense: NaN"),
                    ({"features": {"u": list(range(5000))}}, "over the limit of 4096")):
        with pytest.raises(RequestError, match=re.escape(why)):
            _decode(**kw)


@pytest.fixture(scope="module")
def served(demo_bundle, tmp_path_factory):
    """One jizhid: ``demo`` and ``demo_cached`` on the demo model, and ``ctx`` on a copy of it whose
    manifest makes u_cat5 a context field (its profile column is then never read)."""
    d = tmp_path_factory.mktemp("reqfeat")
    models = d / "models"
    shutil.copytree(demo_bundle, models / "demo" / "1")
    ctx = models / "ctx" / "1"
    shutil.copytree(demo_bundle, ctx)
    with open(ctx / "manifest.toml", "rb") as f:
        m = tomllib.load(f)
    m["name"] = "ctx"
    for f in m["fields"]:
        if f["name"] == CONTEXT_FIELD:
            f["context"] = True
    os.unlink(ctx / "profiles" / "users" / f"{CONTEXT_FIELD}.npy")
    m["files"] = [{"path": p, "size": n, "sha256": h} for p, n, h in file_entries(ctx)]
    write_text(ctx / "manifest.toml", toml_text(m))
    # The shipped pipeline files with one worker each (what is tested is per request, not per worker).
    pipelines = []
    for name, source, model in (("demo", "demo.toml", "demo"), ("demo_cached", "demo_cached.toml", "demo"),
                                ("ctx", "demo.toml", "ctx")):
        text = open(os.path.join(ROOT, "etc", "pipelines", source)).read().replace("pool = 2", "pool = 1")
        text = re.sub(r'(?m)^name = "[^"]*"', f'name = "{name}"', text, count=1)
        path = d / f"{name}.toml"
        path.write_text(re.sub(r'(?m)^model = "[^"]*"', f'model = "{model}"', text, count=1))
        pipelines.append(str(path))
    with Launcher(tmp_path_factory, models) as launcher:
        server = launcher.start(pipelines=pipelines)
        yield server


def _same(a, b):
    """Two {item: score} of the same items, equal within float32 rounding."""
    return a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-6


def _all(c, user, items, pipeline="demo", **kw):
    r = c.score(user, items, pipeline=pipeline, ret="all", deadline_ms=10_000, **kw)
    return r, dict(zip(r.item_ids.tolist(), r.scores.tolist()))


def test_the_users_own_values_in_the_request_score_as_the_profiles_do(served, demo_bundle, demo_trace):
    user, items, _ = demo_trace[0]
    feats = _profile_features(demo_bundle, user)
    with served.client() as c:
        _, plain = _all(c, user, items)
        _, given = _all(c, user, items, features=feats)
        changed = dict(feats, dense=[x + 0.5 for x in feats["dense"]])
        _, other = _all(c, user, items, features=changed)
    assert _same(given, plain)
    assert not _same(other, plain)                         # the request's values are the ones scored


def test_a_user_the_profiles_do_not_know_is_scored_from_the_request_alone(served, demo_bundle, demo_trace):
    user, items, _ = demo_trace[1]
    feats = _profile_features(demo_bundle, user)
    ids = np.asarray(Profiles(Bundle(demo_bundle), "user").ids)
    stranger = int(ids.max()) + 12345
    with served.client() as c:
        _, known = _all(c, user, items)
        r, scored = _all(c, stranger, items, features=feats)
        bare, _ = _all(c, stranger, items)
    assert r["unknown_user"] == 1 and bare["unknown_user"] == 1
    assert _same(scored, known)                        # the same values, the same scores
    assert not np.allclose(bare.scores, r.scores)


def test_a_context_field_comes_from_the_request(served, demo_bundle, demo_trace):
    user, items, _ = demo_trace[2]
    b = Bundle(demo_bundle)
    p = Profiles(b, "user")
    value = int(p.cols[CONTEXT_FIELD][int(np.searchsorted(p.ids, user))])
    other = value % 20 + 1 if value else 1
    with served.client() as c:
        _, plain = _all(c, user, items)                                     # the demo model, u_cat5 profiled
        _, ctx = _all(c, user, items, pipeline="ctx", context={CONTEXT_FIELD: value})
        _, ctx_other = _all(c, user, items, pipeline="ctx", context={CONTEXT_FIELD: other})
    assert _same(ctx, plain)
    assert not _same(ctx_other, plain)


def test_a_request_with_features_never_uses_the_query_cache(served, demo_bundle, demo_trace):
    user, items, _ = demo_trace[3]
    feats = dict(_profile_features(demo_bundle, user))
    feats["dense"] = [x + 1.0 for x in feats["dense"]]
    with served.client() as c:
        for _ in range(3):
            r = c.score(user, items, pipeline="demo_cached", ret="all", deadline_ms=10_000, features=feats)
            assert r["cached"] == 0
        _, plain = _all(c, user, items)
    assert not _same(dict(zip(r.item_ids.tolist(), r.scores.tolist())), plain)


@pytest.mark.parametrize("pipeline, kw, why", [
    ("demo", {"features": {"u_nope": 3}}, "features.u_nope: model demo version 1 has no such features field"),
    ("demo", {"features": {"dense": [1.0] * 12}}, "features.dense: 12 values, model demo version 1 takes 13"),
    ("demo", {"features": {"u_cat0": [3, 4]}}, "features.u_cat0: 2 values, a onehot field takes one"),
    ("demo", {"features": {"u_multi0": [1, 2, 3, 4, 5, 6]}},
     "features.u_multi0: 6 values, longer than the field's max_len 5"),
    ("demo", {"features": {"u_cat0": 5000}}, "features.u_cat0: raw value 5000 is outside 1..1000"),
    ("ctx", {"context": {"hour": 3}}, "context.hour: model ctx version 1 has no such context field"),
    ("ctx", {"context": {CONTEXT_FIELD: "x"}}, f"context.{CONTEXT_FIELD}: expected an integer or a list of integers"),
])
def test_what_the_model_cannot_take_is_bad_request_naming_the_field(served, demo_trace, pipeline, kw, why):
    user, items, _ = demo_trace[4]
    with served.client() as c:
        with pytest.raises(RequestError) as e:
            c.score(user, items, pipeline=pipeline, deadline_ms=10_000, **kw)
        assert e.value.code == "BAD_REQUEST" and why in e.value.message
        assert c.score(user, items, pipeline=pipeline, deadline_ms=10_000).ok      # the next request is served


def test_a_model_without_context_fields_ignores_a_requests_context(served, demo_trace):
    """As before context fields existed: any context, even one no model could read, is no error there."""
    user, items, _ = demo_trace[6]
    with served.client() as c:
        _, plain = _all(c, user, items)
        _, given = _all(c, user, items, context={"page": "home", "hour": 3})
    assert _same(given, plain)


def test_a_context_field_sent_as_a_feature_is_refused_naming_where_it_goes(served, demo_trace):
    user, items, _ = demo_trace[5]
    with served.client() as c:
        with pytest.raises(RequestError, match="features.u_cat5: a context field of model ctx version 1: send it "
                                               "in context"):
            c.score(user, items, pipeline="ctx", deadline_ms=10_000, features={CONTEXT_FIELD: 2})
