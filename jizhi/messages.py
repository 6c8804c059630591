"""Internal messages: one class per type, each with its ``encode`` and ``decode``.

They travel on the broker's backend (ipc, one host): worker <-> broker and
supervisor <-> broker. A message is one frame, a msgpack map whose ``"t"``
is its type (the ``T_*`` constants of jizhi/protocol.py); tensors never
travel here, they stay in shared memory and messages name arena slots.
Nothing is pickled.

* ``msg.encode()`` returns the frames to send (a list of one ``bytes``);
* ``Cls.decode(frames)`` reads a message of that type, ``decode(frames)`` one
  of any type (``TYPES``, keyed by ``"t"``). A decoder raises ``ValueError``
  for a frame that is no map, names no known type or lacks a field the type
  needs, and ignores keys it does not know.

The supervisor's messages keep the bytes its code built by hand before these
classes (some maps put ``"t"`` last, some first), so a broker and a supervisor
of either age read each other; ``tests/test_broker_steps.py`` checks that.

**The deadline** is ``deadline_s`` from admission to the stage: an instant of
``time.monotonic()``, in seconds (CLOCK_MONOTONIC is one clock for every
process on the host). The client's ``deadline_ms`` is a budget, turned into
``deadline_s`` once, at admission (jizhi/broker/admission.py); the broker's
requests, ``Event`` and the stages' ``Batch`` carry ``deadline_s``.

**The hot path.** ``Event`` and ``Done`` travel once per micro-batch. They
carry columns, one list per field aligned by position (``event.slot[i]``,
``event.deadline_s[i]`` are request i's), so neither side loops over the
requests in Python to encode or decode them, and the worker makes each column
an array in one call.

Runs in every process that speaks the backend; imports only the base layer.
"""
from dataclasses import dataclass, field

from jizhi import protocol
from jizhi.protocol import packb, unpackb


class Message:
    """Base of the message classes: ``T`` is the type; a subclass says its map (``to_map``, ``from_map``)."""

    __slots__ = ()
    T = None

    def encode(self):
        return [packb(self.to_map())]

    def to_map(self):
        return {"t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls()

    @classmethod
    def decode(cls, frames):
        m = _read(frames)
        if m["t"] != cls.T:
            raise ValueError(f"a {m['t']!r} message where {cls.T!r} was expected")
        return _from_map(cls, m)


def _read(frames):
    if not frames:
        raise ValueError("an internal message without a frame")
    try:
        m = unpackb(frames[0])
    except Exception as e:
        raise ValueError(f"an internal message that is not msgpack: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("t"), str):
        raise ValueError("an internal message without a type")
    return m


def _from_map(cls, m):
    try:
        return cls.from_map(m)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"a malformed {cls.T!r} message: {type(e).__name__}: {e}") from None


def decode(frames):
    """Any internal message, as an instance of its class (``TYPES``)."""
    m = _read(frames)
    cls = TYPES.get(m["t"])
    if cls is None:
        raise ValueError(f"an internal message of unknown type {m['t']!r}")
    return _from_map(cls, m)


def _dict(v):
    if not isinstance(v, dict):
        raise TypeError(f"a map expected, got {type(v).__name__}")
    return v


def _list(v):
    if not isinstance(v, list):
        raise TypeError(f"a list expected, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------
# worker -> broker


@dataclass(slots=True)
class Ready(Message):
    """I serve ``group`` of ``pipeline`` for ``versions`` ({model: version}), holding up to ``window``
    events at once. ``boot``: {start_ms, load_ms, warm_ms}: process start to main, stage setup, the
    warm-up batch. ``run``: the run whose plan and segments the worker serves (a broker of another
    run refuses it)."""
    T = protocol.T_READY
    pipeline: str
    group: str
    wid: int
    versions: dict
    window: int = 1
    boot: dict = field(default_factory=dict)
    run: str = None
    pid: int = None

    def to_map(self):
        return {"t": self.T, "pipeline": self.pipeline, "group": self.group, "wid": self.wid, "run": self.run,
                "pid": self.pid, "versions": self.versions, "window": self.window, "boot": self.boot}

    @classmethod
    def from_map(cls, m):
        boot = m.get("boot") or {}
        return cls(m["pipeline"], m["group"], m["wid"], _dict(m["versions"]), max(1, int(m.get("window", 1))),
                   _dict(boot), m.get("run"), m.get("pid"))


@dataclass(slots=True)
class Done(Message):
    """Event ``eid`` is finished. Columns aligned by position: ``slot`` every request the event
    carried; ``counts`` {name: [int per request]} (``batch.count``: returned, shed, cached, ...).
    ``errors`` {slot: [code, message]}: the requests that failed (deadline passed, a stage failed);
    the others are done with this group. ``svc_us`` {stage: microseconds} of the whole event."""
    T = protocol.T_DONE
    eid: int
    slot: list
    errors: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    svc_us: dict = field(default_factory=dict)

    def to_map(self):
        return {"t": self.T, "eid": self.eid, "slot": self.slot, "errors": self.errors, "counts": self.counts,
                "svc_us": self.svc_us}

    @classmethod
    def from_map(cls, m):
        slot = _list(m["slot"])
        counts = _dict(m.get("counts") or {})
        for name, col in counts.items():
            if len(_list(col)) != len(slot):
                raise ValueError(f"counts {name!r} has {len(col)} values for {len(slot)} requests")
        errors = _dict(m.get("errors") or {})
        for err in errors.values():         # (few: the failed requests only)
            if not isinstance(err, list) or len(err) != 2:
                raise ValueError(f"an error that is not [code, message]: {err!r}")
        return cls(m["eid"], slot, errors, counts, _dict(m.get("svc_us") or {}))


@dataclass(slots=True)
class Heartbeat(Message):
    """I am alive (a worker with nothing to answer; any message counts as life)."""
    T = protocol.T_HEARTBEAT
    wid: int = None

    def to_map(self):
        return {"wid": self.wid, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("wid"))


@dataclass(slots=True)
class Leaving(Message):
    """Recycle me (``workers.max_events``, ``workers.max_rss_mb``): send me nothing new, then STOP."""
    T = protocol.T_LEAVING
    wid: int = None

    def to_map(self):
        return {"wid": self.wid, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("wid"))


# ----------------------------------------------------------------------------
# broker -> worker


@dataclass(slots=True)
class Event(Message):
    """A micro-batch of requests for one group, pinned to ``versions`` ({model: version}) at
    admission. Columns aligned by position, one entry per request: ``slot`` its arena slot (every
    arena is indexed by it), ``n`` its candidates, ``deadline_s`` its deadline (module docstring),
    ``user``, ``top_k``, ``ret_all`` (``return: all``), ``feats`` (the request's own features: a small
    map of raw values, or None; workers/data_reader.py), ``keep`` (the fraction of its candidates the
    shedder keeps, decided at admission: jizhi/shedding.py; None: all). On the wire ``feats`` and
    ``keep`` are left out when no request of the event has any."""
    T = protocol.T_EVENT
    eid: int
    versions: dict
    slot: list
    n: list
    deadline_s: list
    user: list
    top_k: list
    ret_all: list
    feats: list = None
    keep: list = None

    def to_map(self):
        m = {"t": self.T, "eid": self.eid, "versions": self.versions, "slot": self.slot, "n": self.n,
             "deadline_s": self.deadline_s, "user": self.user, "top_k": self.top_k, "ret_all": self.ret_all}
        if self.feats is not None and any(f is not None for f in self.feats):
            m["feats"] = list(self.feats)
        if self.keep is not None and any(k is not None for k in self.keep):
            m["keep"] = [1.0 if k is None else k for k in self.keep]
        return m

    @classmethod
    def from_map(cls, m):
        ev = cls(m["eid"], m["versions"], m["slot"], m["n"], m["deadline_s"], m["user"], m["top_k"], m["ret_all"],
                 m.get("feats"), m.get("keep"))
        # (a column that is no list fails here or where the worker makes it an array: a malformed event)
        if not len(ev.slot) == len(ev.n) == len(ev.deadline_s) == len(ev.user) == len(ev.top_k) == len(ev.ret_all):
            raise ValueError("columns of different lengths")
        if ev.feats is not None and (not isinstance(ev.feats, list) or len(ev.feats) != len(ev.slot)):
            raise ValueError("feats is not one entry per request")
        if ev.keep is not None and (not isinstance(ev.keep, list) or len(ev.keep) != len(ev.slot)):
            raise ValueError("keep is not one entry per request")
        return ev


@dataclass(slots=True)
class Stop(Message):
    """Finish what you hold and exit (to a worker; to the broker: end the loop)."""
    T = protocol.T_STOP


@dataclass(slots=True)
class Resync(Message):
    """I do not know you (this broker restarted): send READY again."""
    T = protocol.T_RESYNC


@dataclass(slots=True)
class Priority(Message):
    """You serve now: back to normal CPU priority, on your group's cores."""
    T = protocol.T_PRIORITY


# ----------------------------------------------------------------------------
# supervisor -> broker


@dataclass(slots=True)
class WorkerDead(Message):
    """Worker ``wid`` (process ``pid``) of ``group`` has exited: its events go back to their channel."""
    T = protocol.T_WORKER_DEAD
    pipeline: str
    group: str
    wid: int
    pid: int

    def to_map(self):
        return {"pipeline": self.pipeline, "group": self.group, "wid": self.wid, "pid": self.pid, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("group"), m.get("wid"), m.get("pid"))


@dataclass(slots=True)
class Retire(Message):
    """Send worker ``wid`` (process ``pid``) of ``group`` nothing new, then STOP it (a scale-down)."""
    T = protocol.T_RETIRE
    pipeline: str
    group: str
    wid: int
    pid: int

    def to_map(self):
        return {"pipeline": self.pipeline, "group": self.group, "wid": self.wid, "pid": self.pid, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("group"), m.get("wid"), m.get("pid"))


@dataclass(slots=True)
class Drain(Message):
    """Admit nothing new; with ``reply``, say DRAINED to the sender once nothing is in flight."""
    T = protocol.T_DRAIN
    reply: bool = True

    def to_map(self):
        return {"t": self.T} if self.reply else {"reply": False, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(bool(m.get("reply", True)))


@dataclass(slots=True)
class Resume(Message):
    """Admit again after a drain. (A supervisor of before these classes also sent ``reply: false`` with
    it, which means nothing here.)"""
    T = protocol.T_RESUME


@dataclass(slots=True)
class VersionAdd(Message):
    """Load ``version`` of ``pipeline``: its compiled ``plan``, its arenas' ``segments``, ``warmup``
    ({users, items}: ids of the bundle, for a warm-up when no traffic was recorded) and ``pool``
    ({group: workers} the supervisor starts; the warm-up waits for all of them)."""
    T = protocol.T_VERSION_ADD
    pipeline: str
    version: int
    plan: dict
    segments: dict
    warmup: dict = None
    pool: dict = None

    def to_map(self):
        return {"t": self.T, "pipeline": self.pipeline, "version": self.version, "plan": self.plan,
                "segments": self.segments, "warmup": self.warmup, "pool": self.pool}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"), _dict(m["plan"]), _dict(m["segments"]), m.get("warmup"),
                   m.get("pool"))


@dataclass(slots=True)
class Activate(Message):
    """New admissions of ``pipeline`` pin to ``version``; the version serving before drains."""
    T = protocol.T_ACTIVATE
    pipeline: str
    version: int

    def to_map(self):
        return {"pipeline": self.pipeline, "version": self.version, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"))


@dataclass(slots=True)
class VersionFail(Message):
    """``version``'s files broke (``reason``): answer its requests for a retry, stop feeding its workers."""
    T = protocol.T_VERSION_FAIL
    pipeline: str
    version: int
    reason: str = None

    def to_map(self):
        return {"pipeline": self.pipeline, "version": self.version, "reason": self.reason, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"), m.get("reason"))


@dataclass(slots=True)
class VersionDrop(Message):
    """Forget ``version`` of ``pipeline`` (its arenas are gone)."""
    T = protocol.T_VERSION_DROP
    pipeline: str
    version: int

    def to_map(self):
        return {"pipeline": self.pipeline, "version": self.version, "t": self.T}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"))


@dataclass(slots=True)
class Routes(Message):
    """The A/B dispatch of ``pipeline`` changed (a reload): ``routes`` {router group: its stage config}."""
    T = protocol.T_ROUTES
    pipeline: str
    routes: dict

    def to_map(self):
        return {"t": self.T, "pipeline": self.pipeline, "routes": self.routes}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), _dict(m["routes"]))


@dataclass(slots=True)
class Shed(Message):
    """The load shedding of ``pipeline`` now: ``mode``, ``quota`` (manual: every request's; auto: the
    recent mean), ``policy`` (``info`` reports them), ``trim`` (auto: the load controller's
    correction of the admission cut, jizhi/shedding.py), ``reset`` (the admission cut starts afresh:
    ``jizhictl shed auto``). ``trim`` and ``reset`` are on the wire only when not 1.0 and False."""
    T = protocol.T_SHED
    pipeline: str
    mode: str
    quota: float
    policy: str
    trim: float = 1.0
    reset: bool = False

    def to_map(self):
        m = {"t": self.T, "pipeline": self.pipeline, "mode": self.mode, "quota": self.quota, "policy": self.policy}
        if self.trim != 1.0:
            m["trim"] = self.trim
        if self.reset:
            m["reset"] = True
        return m

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m["mode"], m["quota"], m["policy"], float(m.get("trim", 1.0)),
                   bool(m.get("reset", False)))


# ----------------------------------------------------------------------------
# broker -> supervisor, and the supervisor's questions with their answers


@dataclass(slots=True)
class Warm(Message):
    """``version``'s warm-up ended: ``ok`` or ``error``, after ``requests`` in ``took_ms``; ``boot`` its
    slowest worker's start-up times."""
    T = protocol.T_WARM
    pipeline: str
    version: int
    ok: bool
    error: str = None
    requests: int = 0
    took_ms: float = 0.0
    boot: dict = field(default_factory=dict)

    def to_map(self):
        return {"t": self.T, "pipeline": self.pipeline, "version": self.version, "ok": self.ok,
                "error": self.error, "requests": self.requests, "took_ms": self.took_ms, "boot": self.boot}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"), bool(m.get("ok")), m.get("error"), m.get("requests", 0),
                   m.get("took_ms", 0.0), m.get("boot") or {})


@dataclass(slots=True)
class VersionIdle(Message):
    """A draining ``version`` answered its last request."""
    T = protocol.T_VERSION_IDLE
    pipeline: str
    version: int

    def to_map(self):
        return {"t": self.T, "pipeline": self.pipeline, "version": self.version}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"))


@dataclass(slots=True)
class Invalid(Message):
    """A serving ``version`` passed ``models.max_invalid_share``: ``invalid`` NaN or infinite scores of
    ``candidates`` in its first ``serving_s`` seconds of serving."""
    T = protocol.T_INVALID
    pipeline: str
    version: int
    invalid: int
    candidates: int
    serving_s: float

    def to_map(self):
        return {"t": self.T, "pipeline": self.pipeline, "version": self.version, "invalid": self.invalid,
                "candidates": self.candidates, "serving_s": self.serving_s}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("pipeline"), m.get("version"), m.get("invalid", 0), m.get("candidates", 0),
                   m.get("serving_s"))


@dataclass(slots=True)
class Drained(Message):
    """Nothing is in flight any more (the answer to a DRAIN with ``reply``)."""
    T = protocol.T_DRAINED


@dataclass(slots=True)
class Info(Message):
    """The question (``info`` None) and the answer: the broker's figures (jizhi/broker/figures.py)."""
    T = protocol.T_INFO
    info: dict = None

    def to_map(self):
        return {"t": self.T} if self.info is None else {"t": self.T, "info": self.info}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("info"))


@dataclass(slots=True)
class Load(Message):
    """The question (``load`` None) and the answer: per pipeline, the recent p99, requests in flight
    and queued, and per group the figures the autoscaler and the load controller read."""
    T = protocol.T_LOAD
    load: dict = None

    def to_map(self):
        return {"t": self.T} if self.load is None else {"t": self.T, "load": self.load}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("load"))


@dataclass(slots=True)
class Record(Message):
    """``jizhictl record``. The question: ``op`` start, fetch or stop. The answer (``op`` None):
    ``records`` since the last fetch, ``dropped`` of them, and whether it still ``recording``."""
    T = protocol.T_RECORD
    op: str = None
    records: list = None
    dropped: int = 0
    recording: bool = False

    def to_map(self):
        if self.op is not None:
            return {"t": self.T, "op": self.op}
        return {"t": self.T, "records": self.records, "dropped": self.dropped, "recording": self.recording}

    @classmethod
    def from_map(cls, m):
        return cls(m.get("op"), m.get("records"), m.get("dropped", 0), bool(m.get("recording")))


TYPES = {cls.T: cls for cls in (
    Ready, Done, Heartbeat, Leaving, Event, Stop, Resync, Priority, WorkerDead, Retire, Drain, Resume,
    VersionAdd, Activate, VersionFail, VersionDrop, Routes, Shed, Warm, VersionIdle, Invalid, Drained,
    Info, Load, Record)}
