"""data_reader: user and item profiles from the columnar snapshot.

Reads, for a batch, the user's dense features and raw sparse values (hashed
later by feature_processor, because user profiles change online) and the
candidates' precomputed item signatures (static within a bundle version).
Everything is a gather over memory-mapped columns.

Unknown item ids are not errors (new items appear every hour): the pipeline
option ``on_unknown`` says what to do with them: ``default`` scores them with
empty bags (the default vectors), ``drop`` removes them from the ranking,
``reject`` fails the request with BAD_REQUEST. They are counted in the reply
as ``unknown_items`` in every case. A user the profiles do not know is
scored with zero dense features and empty bags (each field's default
vector) and counted in the reply as ``unknown_user`` (0 or 1).

The user's recent behaviour from ``feedback`` (the online overlay,
jizhi/overlay.py) is merged over the snapshot's history field here.

A request may carry features of its own (the client protocol's ``context``
and ``features``: README, "Wire protocol"): a context field's value (a user
field declared ``context = true`` in the manifest, which no profile holds),
and the user's own fields and ``dense`` features, which replace the
profiles' for that request; a user the profiles do not know is scored from
them. A name, type or length the model cannot take fails the request with
BAD_REQUEST naming the field.

With ``user_rows = "redis://HOST:PORT/NAME"`` (a team's online user
features, cube/userrows.py) the batch's users' rows are read from Redis in
front of the snapshot's (a user found there is known); feedback is merged
over them, and a request's own features replace them in turn.

A version that reads a profile store (``[profiles] store``) reads its newest
snapshot that fits, switched at batch boundaries (jizhi/profilestore.py);
each request counts the snapshot it read as ``profile_snapshot``, which the
reply carries.
"""
import numpy as np

from jizhi.cube.userrows import UserRows, parse_rows_url
from jizhi.errors import BAD_REQUEST
from jizhi.overlay import Overlay
from jizhi.profilestore import source as profile_source
from jizhi.stats import C_USER_ROWS, C_USER_ROWS_CACHED, C_USER_ROWS_DEGRADED
from jizhi.workers.stage import CANDIDATE, REQUEST, Output, Stage

ON_UNKNOWN = ("default", "drop", "reject")


class BadFeature(ValueError):
    """A request's feature that the model cannot take: its message names the field."""


class RequestFields:
    """The user-side fields a request may carry, by name: context fields (``context = true`` in the manifest:
    request-level values, in the request's ``context``) and the user's own fields and ``dense`` (in its
    ``features``, over the profiles' values for that request)."""

    def __init__(self, bundle):
        self.model = f"{bundle.name} version {bundle.version}"
        self.columns = {f.name: (c, f) for c, f in enumerate(bundle.user_fields)}
        self.dense = bundle.dense_features
        self.context_names = [f.name for f in bundle.user_fields if f.context]
        self.user_names = [f.name for f in bundle.user_fields if not f.context]

    def bag(self, where, name, value):
        """(column, raw values) of one given field; raises BadFeature naming it."""
        if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise BadFeature(f"{where}.{name}: expected an integer or a list of integers (raw values)")
        if any(not 0 <= v < 2 ** 63 for v in ([value] if isinstance(value, int) else value)):
            raise BadFeature(f"{where}.{name}: raw values are integers from 0 to 2**63 - 1")
        found = self.columns.get(name)
        if found is None:
            names = self.context_names if where == "context" else self.user_names + ["dense"]
            raise BadFeature(f"{where}.{name}: model {self.model} has no such {where} field (it takes: "
                             f"{', '.join(names) or 'none'})")
        c, f = found
        if f.context != (where == "context"):
            raise BadFeature(f"{where}.{name}: a {'context' if f.context else 'profile'} field of model {self.model}: "
                             f"send it in {'context' if f.context else 'features'}")
        bag = [v for v in ([value] if isinstance(value, int) else value) if v != 0]    # 0: missing, as in profiles
        if f.kind == "onehot":
            if len(bag) > 1:
                raise BadFeature(f"{where}.{name}: {len(bag)} values, a onehot field takes one")
        elif f.kind == "history":
            bag = bag[-f.max_len:]                  # its newest max_len values, as the profiles' serve
        elif len(bag) > f.max_len:
            raise BadFeature(f"{where}.{name}: {len(bag)} values, longer than the field's max_len {f.max_len}")
        if f.raw == "rows" and f.vocab and any(not 1 <= v <= f.vocab for v in bag):
            bad = next(v for v in bag if not 1 <= v <= f.vocab)
            raise BadFeature(f"{where}.{name}: raw value {bad} is outside 1..{f.vocab} (the table's rows + 1)")
        return c, bag


def uses_features(f, fields):
    """True when a request's features (``f``, one entry of ``batch.feats``) change what it scores: the
    user's own, or a context the model reads (a model without context fields ignores ``context``)."""
    if f is None:
        return False
    return bool(f.get("user")) or bool(f.get("context") and (fields is None or fields.context_names))


def apply_features(fields, f, dense, values, lens, i):
    """One request's features ``f`` (an entry of ``batch.feats``) over row ``i`` of ``dense``, ``values`` and
    ``lens``; raises BadFeature naming a feature the model cannot take (rows already changed stay so)."""
    # (a model without context fields ignores a request's context, as before they existed)
    context = (f.get("context") or {}) if fields.context_names else {}
    for where, given in (("context", context), ("features", f.get("user") or {})):
        for name, value in given.items():
            if where == "features" and name == "dense":
                if not isinstance(value, list) or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in value):
                    raise BadFeature("features.dense: expected a list of numbers (not NaN)")
                if len(value) != fields.dense:
                    raise BadFeature(f"features.dense: {len(value)} values, model {fields.model} takes "
                                     f"{fields.dense}")
                dense[i] = value
                continue
            c, bag = fields.bag(where, name, value)
            values[i, c, :] = 0
            values[i, c, :len(bag)] = bag
            lens[i, c] = len(bag)


def apply_request_features(batch, fields, dense, values, lens):
    """Each request's own features (``batch.feats``) over its row of ``dense`` f32[R, D], ``values``
    int64[R, F, L] and ``lens`` int32[R, F] (rows per request); a request with a feature the model cannot
    take fails with BAD_REQUEST naming it. A loop over the requests that carry features and their few
    values, never over candidates."""
    for i, f in enumerate(batch.feats):
        if f is None:
            continue
        try:
            apply_features(fields, f, dense, values, lens, i)
        except BadFeature as e:
            batch.fail(i, BAD_REQUEST, str(e))


class ProfileReader:
    """A stage that reads a version's profiles (the data reader, LEGACY): ``attach_profiles`` in ``setup``;
    ``users`` and ``items`` are the current snapshot's; the first reader of a version in a worker switches
    snapshots at its batch boundaries (jizhi/profilestore.py); ``count_snapshot`` names the snapshot a
    request read (the reply's ``profile_snapshot``)."""

    def attach_profiles(self, bundle):
        self.source = profile_source(bundle)
        self.source.register(self)

    def batch_boundary(self):
        self.source.poll(self)

    @property
    def users(self):
        return self.source.users

    @property
    def items(self):
        return self.source.items

    def count_snapshot(self, batch):
        if self.source.store is not None:
            batch.count("profile_snapshot", np.full(batch.n_requests, self.source.snapshot, dtype=np.int64))


class DataReader(ProfileReader, Stage):
    name = "data_reader"
    fixed_inputs = ("item_ids",)

    @classmethod
    def outputs(cls, config, bundle):
        fu, lu = len(bundle.user_fields), bundle.user_len
        fi, li = len(bundle.item_fields), bundle.item_len
        user = CANDIDATE if config.get("per_pair") else REQUEST   # pipeline structured = false: per pair
        if config.get("user_rows") is not None:
            if not isinstance(config["user_rows"], str):
                raise ValueError("user_rows must be a redis://HOST:PORT/NAME URL")
            parse_rows_url(config["user_rows"])
        return (Output("dense", user, "float32", (bundle.dense_features,)),
                Output("user_values", user, "int64", (fu, lu)),
                Output("user_lens", user, "int32", (fu,)),
                Output("item_sigs", CANDIDATE, "uint64", (fi, li)),
                Output("item_lens", CANDIDATE, "int32", (fi,)),
                Output("keep", CANDIDATE, "bool"))

    def setup(self, config, bundle):
        self.on_unknown = config.get("on_unknown", "default")
        self.per_pair = bool(config.get("per_pair"))
        # The version's profiles: its own, or a profile store's current snapshot (jizhi/profilestore.py),
        # switched at a batch boundary (this stage polls the store when it is the version's first reader).
        self.attach_profiles(bundle)
        self.fields = RequestFields(bundle)
        self.overlay = Overlay.attach(config.get("_overlay"))
        # A team's online user rows on Redis, read in front of the snapshot's (cube/userrows.py).
        self.online = UserRows(config["user_rows"], bundle) if config.get("user_rows") else None

    def report(self, counters):
        if self.online is not None:
            counters[C_USER_ROWS] = self.online.read_users
            counters[C_USER_ROWS_DEGRADED] = self.online.degraded + self.online.refused
            counters[C_USER_ROWS_CACHED] = self.online.cache_hits

    def process(self, batch):
        self.count_snapshot(batch)
        urows, uknown = self.users.rows(batch.users)
        online = self.online.read(batch.users) if self.online is not None else None
        batch.count("unknown_user", ~(uknown | online[0]) if online is not None else ~uknown)
        # One row per request (the profiles', or the user's row on Redis, with feedback merged), the
        # request's own features over it, then one per pair when the pipeline is not structured.
        dense, values, lens = self.users.user_features(urows, uknown, batch.users, self.overlay, online)
        if batch.feats is not None:
            apply_request_features(batch, self.fields, dense, values, lens)
        if self.per_pair:
            pair = batch.candidate_request()
            dense, values, lens = dense[pair], values[pair], lens[pair]
        irows, iknown = batch.profile_rows(self.items, batch["item_ids"])
        sigs, ilens = self.items.item_signatures(irows, iknown)
        unknown = batch.per_request_sum(~iknown)
        batch.count("unknown_items", unknown)
        keep = iknown if self.on_unknown == "drop" else np.ones_like(iknown)
        if self.on_unknown == "reject":
            for i in np.flatnonzero(unknown):
                batch.fail(i, BAD_REQUEST, f"{unknown[i]} unknown item ids (pipeline option on_unknown = reject)")
        return {"dense": dense, "user_values": values, "user_lens": lens,
                "item_sigs": sigs, "item_lens": ilens, "keep": keep}
