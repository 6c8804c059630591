"""The wire protocol: constants and one encode/decode pair per message type.

Two protocols live here:

* the **client protocol** (frontend, tcp): a msgpack header frame followed by
  one raw little-endian frame per array the header lists. Any language with
  ZeroMQ and msgpack can speak it (README, "Wire protocol");
* the **internal protocol** (backend, ipc, broker <-> workers and
  supervisor <-> broker): msgpack headers only; tensors stay in shared memory
  and messages carry slot numbers, never payloads. Its types are the ``T_*``
  constants below; one class per type (encode, decode) is in jizhi/messages.py.

Nothing here unpickles anything. Decoders validate and raise
``RequestError(BAD_REQUEST, ...)`` (client side) or ``ValueError`` (internal);
they never assert.
"""
import msgpack
import numpy as np

from jizhi.errors import BAD_REQUEST, RequestError

VERSION = 1

OPS = ("score", "feedback", "ping", "info")
RETURN_MODES = ("topk", "all")

# Array dtypes a client may send, by their wire names (always little-endian).
WIRE_DTYPES = {
    "uint64": np.dtype("<u8"),
    "float32": np.dtype("<f4"),
}
REQUEST_ARRAYS = {"item_ids": "uint64", "recall_scores": "float32"}

# Internal message types (the "t" field).
T_READY = "ready"      # worker -> broker: I serve (group, versions), window W
T_DONE = "done"        # worker -> broker: event finished, per-request results
T_HEARTBEAT = "hb"     # worker -> broker: alive while idle
T_EVENT = "ev"         # broker -> worker: a micro-batch of requests
T_STOP = "stop"        # broker -> worker: finish what you hold, then exit
T_WORKER_DEAD = "dead"  # supervisor -> broker: wid X of group G has exited
T_DRAIN = "drain"      # supervisor -> broker: stop admitting, answer in-flight
T_DRAINED = "drained"  # broker -> supervisor: nothing in flight any more
T_RESUME = "resume"    # supervisor -> broker: admit again after a drain
T_RETIRE = "retire"    # supervisor -> broker: send wid X nothing new, then STOP it
T_LEAVING = "leaving"  # worker -> broker: recycle me (max events / RSS): retire, then STOP
T_RESYNC = "resync"    # broker -> worker: I do not know you (I restarted): send READY again
T_INFO = "info"        # supervisor -> broker -> supervisor: the broker's figures
# Model versions (hot reload, jizhi/supervisor/registry.py): the supervisor adds a version's
# plan and arenas, its workers register, the broker warms it up with recorded
# requests and says WARM; the supervisor ACTIVATEs it (new admissions pin to
# it); the old version drains and the broker says IDLE once its last request is
# answered; the supervisor stops its workers, unlinks its arenas and DROPs it.
T_VERSION_ADD = "vadd"    # supervisor -> broker: {pipeline, version, plan, segments, warmup}
T_WARM = "warm"           # broker -> supervisor: {pipeline, version, ok, error, requests, took_ms}
T_ACTIVATE = "activate"   # supervisor -> broker: admit new requests to {pipeline, version}
T_VERSION_IDLE = "vidle"  # broker -> supervisor: a draining version answered its last request
T_INVALID = "invalid"     # broker -> supervisor: {pipeline, version, invalid, candidates, serving_s}: a serving
                          # version passed models.max_invalid_share (NaN or infinite scores)
T_VERSION_FAIL = "vfail"  # supervisor -> broker: {pipeline, version, reason}: answer its requests, forget it
T_VERSION_DROP = "vdrop"  # supervisor -> broker: forget {pipeline, version} (its arenas are gone)
T_PRIORITY = "prio"       # broker -> worker: you serve now: back to normal CPU priority
T_ROUTES = "routes"       # supervisor -> broker: {pipeline, routes: {group: ab_dispatch config}} (a reload)
T_LOAD = "load"           # supervisor -> broker -> supervisor: recent p99 and requests in flight per pipeline
T_SHED = "shed"           # supervisor -> broker: {pipeline, mode, quota, policy} (reported by info)
T_RECORD = "record"       # supervisor -> broker -> supervisor: {op: start|fetch|stop} live traffic


def packb(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data):
    # strict_map_key=False: integer keys are legal in our internal maps.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ----------------------------------------------------------------------------
# Client protocol: requests


def split_envelope(frames):
    """Split a ROUTER message into (envelope, body).

    The envelope is every frame up to and including the first empty delimiter
    (REQ sockets add it; DEALER clients send it themselves). Returns
    ``(None, frames)`` when there is no delimiter within the first 8 frames.
    """
    for i in range(1, min(len(frames), 9)):
        if len(frames[i]) == 0:
            return frames[:i + 1], frames[i + 1:]
    return None, frames


def _bad(message):
    return RequestError(BAD_REQUEST, message)


def decode_request(body, limits):
    """Decode and validate a client request body (frames after the envelope).

    ``limits`` is a mapping with ``max_candidates`` and ``max_message_bytes``.
    Returns a dict with ``op``, ``id`` and, for score, ``pipeline``, ``user``
    (int), ``context`` (dict), ``top_k``, ``return``, ``deadline_ms`` (or
    None), ``heads``, ``item_ids`` (uint64 array) and ``recall_scores``
    (float32 array or None). The arrays are read-only views of the frames.
    Raises ``RequestError`` with code BAD_REQUEST for anything malformed.
    """
    if not body:
        raise _bad("empty message")
    total = 0
    for f in body:
        total += len(f)
    if total > limits["max_message_bytes"]:
        raise _bad(f"message of {total} bytes is over the limit of {limits['max_message_bytes']}")
    try:
        header = unpackb(body[0])
    except Exception:
        raise _bad("frame 0 is not a msgpack map")
    if not isinstance(header, dict):
        raise _bad("frame 0 is not a msgpack map")
    v = header.get("v", VERSION)
    if v != VERSION:
        raise _bad(f"protocol version {v!r} is not supported (this server speaks {VERSION})")
    op = header.get("op")
    if op not in OPS:
        raise _bad(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    rid = header.get("id")
    if rid is not None and not isinstance(rid, (int, str, bytes)):
        raise _bad("id must be an integer or a string")
    req = {"op": op, "id": rid}
    if op in ("ping", "info"):
        return req
    if op == "feedback":
        return _decode_feedback(header, req)
    pipeline = header.get("pipeline", "default")
    if not isinstance(pipeline, str):
        raise _bad("pipeline must be a string")
    user = header.get("user")
    if not isinstance(user, int) or isinstance(user, bool) or not 0 <= user < 2 ** 64:
        raise _bad("user must be an unsigned 64-bit integer")
    context = header.get("context", {})
    if not isinstance(context, dict):
        raise _bad("context must be a map")
    features = header.get("features", {})
    if not isinstance(features, dict):
        raise _bad("features must be a map")
    feats = _request_features(context, features)
    top_k = header.get("top_k", 10)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise _bad("top_k must be a positive integer")
    ret = header.get("return", "topk")
    if ret not in RETURN_MODES:
        raise _bad(f"return must be one of {', '.join(RETURN_MODES)}")
    deadline_ms = header.get("deadline_ms")
    if deadline_ms is not None:
        if not isinstance(deadline_ms, (int, float)) or isinstance(deadline_ms, bool) \
                or not 0 < deadline_ms <= 600_000 or deadline_ms != deadline_ms:
            raise _bad("deadline_ms must be a number in (0, 600000]")
    specs = header.get("arrays")
    if not isinstance(specs, list):
        raise _bad("arrays must be a list of {name, dtype, shape}")
    if len(specs) != len(body) - 1:
        raise _bad(f"header lists {len(specs)} arrays but {len(body) - 1} array frames follow")
    arrays = {}
    for spec, frame in zip(specs, body[1:]):
        if not isinstance(spec, dict):
            raise _bad("each arrays entry must be a map {name, dtype, shape}")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if name not in REQUEST_ARRAYS:
            raise _bad(f"unknown array {name!r}; expected item_ids or recall_scores")
        if name in arrays:
            raise _bad(f"array {name} given twice")
        if dtype != REQUEST_ARRAYS[name]:
            raise _bad(f"array {name} must have dtype {REQUEST_ARRAYS[name]}, not {dtype!r}")
        if (not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int)
                or isinstance(shape[0], bool) or shape[0] < 0):
            raise _bad(f"array {name} must have shape [N]")
        n = shape[0]
        if n > limits["max_candidates"]:
            raise _bad(f"{n} candidates is over the limit of {limits['max_candidates']}")
        wire = WIRE_DTYPES[dtype]
        if len(frame) != n * wire.itemsize:
            raise _bad(f"array {name} frame has {len(frame)} bytes, shape {shape} {dtype} needs {n * wire.itemsize}")
        arrays[name] = np.frombuffer(frame, dtype=wire)
    items = arrays.get("item_ids")
    if items is None:
        raise _bad("item_ids is required")
    if items.shape[0] == 0:
        raise _bad("item_ids is empty")
    recall = arrays.get("recall_scores")
    if recall is not None:
        if recall.shape[0] != items.shape[0]:
            raise _bad("recall_scores and item_ids differ in length")
        if not np.isfinite(recall).all():
            raise _bad("recall_scores has NaN or infinite values")
    req.update(pipeline=pipeline, user=user, context=context, feats=feats, top_k=top_k,
               ret=ret, deadline_ms=deadline_ms, heads=bool(header.get("heads", False)),
               item_ids=items, recall_scores=recall)
    return req


MAX_FEATURES = 64           # keys of context plus features
MAX_FEATURE_VALUES = 4096   # values of one key (a bag, or the dense features)


def _request_features(context, features):
    """The request's own features, ``features`` checked for shape (the model's fields are checked by the
    worker that reads them, workers/data_reader.py, which checks ``context`` too):
    ``{"context": {field: value}, "user": {field: value}}`` with ``dense`` among the user's, or None when the
    request carries none. A value is an integer or a list of integers (a bag); ``dense`` a list of numbers."""
    if not context and not features:
        return None
    if len(context) + len(features) > MAX_FEATURES:
        raise _bad(f"context and features hold {len(context) + len(features)} keys, over the limit of {MAX_FEATURES}")
    out = {}
    for where, given in (("context", context), ("features", features)):
        checked = {}
        for name, value in given.items():
            if not isinstance(name, str):
                raise _bad(f"{where}: keys must be field names (strings), got {name!r}")
            if where == "context":
                # Checked by the worker against the model's context fields (a model without any ignores the
                # context, whatever it holds, as this server did before context fields existed).
                checked[name] = value
                continue
            if isinstance(value, list):
                if len(value) > MAX_FEATURE_VALUES:
                    raise _bad(f"{where}.{name}: {len(value)} values, over the limit of {MAX_FEATURE_VALUES}")
                number = (int, float) if (where == "features" and name == "dense") else (int,)
                if not all(isinstance(v, number) and not isinstance(v, bool) for v in value):
                    raise _bad(f"{where}.{name}: expected a list of {'numbers' if len(number) == 2 else 'integers'}")
                if number == (int,) and not all(0 <= v < 2 ** 63 for v in value):
                    raise _bad(f"{where}.{name}: raw values are integers from 0 to 2**63 - 1")
                if len(number) == 2 and not all(v == v and abs(v) != float("inf") for v in value):
                    raise _bad(f"{where}.{name}: NaN or infinite value")
            elif isinstance(value, int) and not isinstance(value, bool) and not (where == "features"
                                                                                and name == "dense"):
                if not 0 <= value < 2 ** 63:
                    raise _bad(f"{where}.{name}: raw values are integers from 0 to 2**63 - 1")
            else:
                raise _bad(f"{where}.{name}: expected an integer or a list of integers"
                           + (" (dense: a list of numbers)" if where == "features" else ""))
            checked[name] = value
        out["context" if where == "context" else "user"] = checked
    return out


def _u64(header, key):
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 64:
        raise _bad(f"{key} must be an unsigned 64-bit integer")
    return v


def _decode_feedback(header, req):
    """feedback: {user, item, event, idempotency_id?}: the user acted on the item."""
    event = header.get("event")
    if not isinstance(event, str) or not 0 < len(event) <= 64:
        raise _bad("event must be a non-empty string of at most 64 characters")
    idem = header.get("idempotency_id")
    if idem is not None and not (isinstance(idem, (str, bytes)) and len(idem) <= 128
                                 or isinstance(idem, int) and not isinstance(idem, bool)):
        raise _bad("idempotency_id must be a string of at most 128 characters or an integer")
    req.update(user=_u64(header, "user"), item=_u64(header, "item"), event=event, idempotency_id=idem)
    return req


def encode_request(op="score", *, id=None, pipeline="default", user=None, item_ids=None,
                   recall_scores=None, context=None, top_k=10, ret="topk", deadline_ms=None,
                   item=None, event=None, idempotency_id=None, heads=False, features=None):
    """Client side: the frames of a request (header, then array frames)."""
    header = {"v": VERSION, "op": op, "id": id}
    frames = []
    if op == "feedback":
        header.update(user=int(user), item=int(item), event=event)
        if idempotency_id is not None:
            header["idempotency_id"] = idempotency_id
    if op == "score":
        items = np.ascontiguousarray(item_ids, dtype="<u8")
        arrays = [{"name": "item_ids", "dtype": "uint64", "shape": [int(items.shape[0])]}]
        frames.append(items)
        if recall_scores is not None:
            rs = np.ascontiguousarray(recall_scores, dtype="<f4")
            arrays.append({"name": "recall_scores", "dtype": "float32", "shape": [int(rs.shape[0])]})
            frames.append(rs)
        header.update(pipeline=pipeline, user=int(user), context=context or {}, top_k=int(top_k),
                      arrays=arrays)
        header["return"] = ret
        if deadline_ms is not None:
            header["deadline_ms"] = deadline_ms
        if heads:
            header["heads"] = True
        if features:
            header["features"] = features
    return [packb(header)] + frames


# ----------------------------------------------------------------------------
# Client protocol: replies


def encode_ok(rid, *, model_versions, shed_ratio, unknown_items, timings_us, item_ids, scores,
              extra=None, more=None):
    """``more``: further float32 arrays ``{name: array}`` (each head's scores, ``heads: true``)."""
    header = {"v": VERSION, "status": "ok", "id": rid, "model_versions": model_versions,
              "shed_ratio": shed_ratio, "unknown_items": unknown_items, "timings_us": timings_us,
              "arrays": [{"name": "item_ids", "dtype": "uint64", "shape": [int(item_ids.shape[0])]},
                         {"name": "scores", "dtype": "float32", "shape": [int(scores.shape[0])]}]}
    if extra:
        header.update(extra)
    more = more or {}
    for name, a in more.items():
        header["arrays"].append({"name": name, "dtype": "float32", "shape": [int(a.shape[0])]})
    return [packb(header), np.ascontiguousarray(item_ids, dtype="<u8"),
            np.ascontiguousarray(scores, dtype="<f4")] + [np.ascontiguousarray(a, dtype="<f4") for a in more.values()]


def encode_info(rid, info):
    header = {"v": VERSION, "status": "ok", "id": rid}
    header.update(info)
    return [packb(header)]


def encode_error(rid, code, message, retry_after_ms=None):
    header = {"v": VERSION, "status": "error", "id": rid, "code": code, "message": message}
    if retry_after_ms is not None:
        header["retry_after_ms"] = int(retry_after_ms)
    return [packb(header)]


def decode_reply(frames):
    """Client side: (header, arrays) of a reply; arrays by name."""
    header = unpackb(frames[0])
    arrays = {}
    for spec, frame in zip(header.get("arrays", []), frames[1:]):
        arrays[spec["name"]] = np.frombuffer(frame, dtype=WIRE_DTYPES[spec["dtype"]])
    return header, arrays


# ----------------------------------------------------------------------------
# Internal protocol (broker <-> workers, supervisor <-> broker): one class per
# message type, with its encode and decode, in jizhi/messages.py.
