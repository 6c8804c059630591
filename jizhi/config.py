"""Configuration: one table of settings that documents and checks itself.

Each setting declares its name (``section.key`` in ``jizhi.toml``), type,
default, validator and description. ``jizhid --check-config`` prints its
reference from ``SETTINGS`` (``describe``); docs/configuration.md is the same
table, with the rules of the file (types, flags, reload), and changes with it.
Loading validates everything before anything is applied; the caller keeps its
last good config when ``load`` raises ``ConfigError``.

Runs in the supervisor (jizhid), which hands the resolved values to its
children through the compiled plan file; children never read jizhi.toml.
"""
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from jizhi.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: object
    check: object  # callable(value) -> error message or None
    description: str


def _positive(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _endpoint(v):
    return None if v.startswith(("tcp://", "ipc://")) else "must be a tcp:// or ipc:// endpoint"


def _any(v):
    return None


SETTINGS = [
    Setting("server.instance", str, "default", lambda v: None if v.replace("-", "").replace("_", "").isalnum() else "letters, digits, - and _ only",
            "Instance name; names the run directory entries and shared-memory segments (jizhi.<instance>.*), so several instances can share a host."),
    Setting("server.frontend", str, "tcp://127.0.0.1:5555", _endpoint,
            "Client endpoint (ROUTER). Loopback by default; bind a public address deliberately."),
    Setting("server.run_dir", str, "", _any,
            "Directory for ipc sockets and the compiled plan. Empty: $RUNTIME_DIRECTORY (systemd) or /tmp/jizhi-<uid>-<instance>."),
    Setting("server.models", str, "", _any,
            "Model directory: <models>/<name>/<version>/ bundles (docs/formats.md)."),
    Setting("server.pipelines", list, ["demo"], lambda v: None if v and all(isinstance(x, str) for x in v) else "a non-empty list of pipeline names or .toml paths",
            "Pipelines served: names of etc/pipelines/*.toml or paths to pipeline files. The first is the default."),
    Setting("limits.max_candidates", int, 2000, _positive,
            "Most candidates one request may carry; more is BAD_REQUEST. Sizes the shared-memory arenas."),
    Setting("limits.max_message_bytes", int, 256 << 10, _positive,
            "Largest client message (all frames) accepted; more is BAD_REQUEST."),
    Setting("limits.max_in_flight", int, 64, _positive,
            "Requests admitted at once per pipeline (arena slots); more wait for a slot (limits.max_waiting)."),
    Setting("limits.max_waiting", int, 64, _nonneg,
            "Requests per pipeline that wait in the broker, in arrival order, for a request slot when every slot "
            "is taken (each until its deadline); more is OVERLOADED with retry_after_ms. 0: refuse at once."),
    Setting("limits.max_connections", int, 1000, _positive,
            "Client connections served at once. A connection past it is refused: its first request is answered "
            "OVERLOADED with retry_after_ms, then it is closed (the broker raises its descriptor limit to fit)."),
    Setting("limits.clients_memory_mb", int, 256, _positive,
            "Memory the broker may hold for client connections together (requests being received, replies "
            "waiting to be read), over its own at start; past three quarters of it, the connections holding the "
            "most are closed. One connection holds at most 3 x (limits.max_message_bytes + 64 KiB) + 64 KiB of "
            "request bytes and 64 replies (README, \"Limits\")."),
    Setting("limits.default_deadline_ms", float, 1000.0, _positive,
            "Deadline of a request that names none, counted from receipt at the frontend."),
    Setting("overlay.capacity_users", int, 65536, _positive,
            "Users whose recent behaviour (from feedback) the online overlay holds; feedback for more is dropped and counted."),
    Setting("limits.feedback_dedup", int, 100_000, _positive,
            "Idempotency ids of feedback remembered to drop duplicates."),
    Setting("broker.dispatch", str, "fifo", lambda v: None if v in ("fifo", "critical_path") else "fifo or critical_path",
            "Order of each stage's queue: fifo (arrival), or critical_path: least slack first, where slack is the "
            "deadline minus the request's remaining critical path through the DAG (measured service times), and a "
            "branch whose request waits on a slower branch anyway yields to ones it does not (docs/architecture.md)."),
    Setting("workers.prefetch", int, 2, _positive,
            "Events a worker may hold at once (credits): >1 hides the broker's wake-up latency."),
    Setting("workers.heartbeat_interval_s", float, 1.0, _positive,
            "Idle workers send a heartbeat this often; the broker expires a silent worker after 3 intervals."),
    Setting("workers.restart_backoff_s", float, 0.2, _nonneg,
            "First delay before a dead worker is restarted; doubles per quick failure up to 10 s."),
    Setting("workers.max_pool", int, 16, _positive,
            "Largest pool size `jizhictl scale` may set (sizes the stats segment)."),
    Setting("workers.hung_timeout_s", float, 30.0, _positive,
            "A worker whose work loop has not beaten for this long is stuck (e.g. inside a stage): SIGTERM, then SIGKILL, then a new one."),
    Setting("workers.boot_timeout_s", float, 120.0, _positive,
            "A worker that has not started its loop this long after spawn is killed and restarted."),
    Setting("workers.max_rss_mb", int, 0, _nonneg,
            "A worker whose RSS passes this many MiB is replaced gracefully (0: no limit)."),
    Setting("workers.max_events", int, 0, _nonneg,
            "A worker that has served this many events is replaced gracefully (0: never)."),
    Setting("metrics.listen", str, "127.0.0.1:9464", lambda v: None if v == "" or (":" in v and v.rsplit(":", 1)[1].isdigit()) else "HOST:PORT, or empty to disable",
            "Prometheus endpoint (HOST:PORT; loopback by default; empty disables it). Also serves the health "
            "probes /livez and /readyz (README, \"Health probes\")."),
    Setting("metrics.livez_stall_s", float, 30.0, _positive,
            "/livez answers 503 once the supervisor's loop has not run for this long (it runs about 10 times a "
            "second; systemd's WatchdogSec in etc/systemd is the same bound)."),
    Setting("security.curve_server_secret", str, "", _any,
            "CURVE: the frontend's secret key file (jizhictl keys init writes one). Empty: no encryption, no authentication."),
    Setting("security.curve_clients_dir", str, "", _any,
            "CURVE: directory of allowed client public key files (*.key). A client whose key is not there is refused: CURVE alone would accept any key pair."),
    Setting("models.poll_interval_s", float, 0.25, _positive,
            "How often the model directory is scanned for new versions (a version appears by a rename into it)."),
    Setting("models.warmup_requests", int, 32, _nonneg,
            "Recorded requests a new version answers (to nobody) before it serves: it is switched in warm."),
    Setting("models.warmup_sample_every", int, 8, _positive,
            "Every Nth admitted request is kept in the warm-up ring."),
    Setting("models.warmup_ring", int, 256, _positive,
            "Recent requests kept for warm-ups (memory: about this many x 6 bytes x candidates)."),
    Setting("models.load_priority", str, "idle", lambda v: None if v in ("idle", "nice") else "idle or nice",
            "CPU and I/O priority of a new version's loading work (validation, hot-tier builds, its workers until "
            "they serve). idle: SCHED_IDLE and the idle I/O class, the CPU and disk only when serving leaves them "
            "(workers only where they may come back: CAP_SYS_NICE, else nice); nice: models.load_nice."),
    Setting("models.load_nice", int, 10, lambda v: None if 0 <= v <= 19 else "must be 0..19",
            "Nice increment of a new version's loading work with models.load_priority = \"nice\" (and of its "
            "workers where they could not come back from idle)."),
    Setting("models.load_cores", str, "auto", lambda v: None if v == "auto" or all(
                c.strip().isdigit() for c in v.split(",") if c.strip()) else 'must be "auto", "" or a list like "1" or "2,3"',
            "Cores a new version's loading work runs on until it serves (validation, hot-tier builds, its workers), "
            "so serving workers keep the others. auto: the last core when there are two or more; \"\": no pinning."),
    Setting("models.load_pace", float, 0.25, lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
            "Share of the time a new version's loading work (validation, hot-tier builds, its workers until they "
            "serve) may run while another version serves: it is stopped for the rest of every 20 ms (SIGSTOP), "
            "so its kernel work (copies, page faults, process starts) does not delay serving; 1: not paced. "
            "Trades rename-to-switch time (about 1/share as long) for serving p99."),
    Setting("models.validate_timeout_s", float, 120.0, _positive,
            "A new version's validation (files, ONNX, cube, smoke inference; a child process) must finish within this."),
    Setting("models.memory_budget_mb", int, 0, _nonneg,
            "A new version whose expected memory (measured by its validation) would take jizhi past this many MiB "
            "is refused with the figures (0: no budget)."),
    Setting("models.load_attempts", int, 2, _positive,
            "Deaths of a new version's workers before it serves, after which that version is marked failed."),
    Setting("models.max_invalid_share", float, 0.001, lambda v: None if 0.0 <= v < 1.0 else "must be from 0 to below 1",
            "A new version whose share of NaN or infinite scores passes this fraction of the candidates it scored, "
            "in its warm-up or in its first models.invalid_watch_s of serving (judged from 10,000 candidates on), "
            "is failed and the previous good version is loaded; until that one is warm the failed version keeps "
            "answering, with those candidates dropped from every reply and counted (invalid_scores). 0: any "
            "invalid score fails it. Whatever the share, no NaN or infinite score is ever returned."),
    Setting("models.invalid_watch_s", float, 300.0, _nonneg,
            "How long after a version starts serving its share of invalid scores is still judged against "
            "models.max_invalid_share (0: only its warm-up is)."),
    Setting("cube.hot_tier_mb", int, 512, _nonneg,
            "Shared-memory hot tier per loaded model version: the whole cube when it fits in this many MiB, "
            "else the keys that fit (0: no hot tier, every lookup reads LMDB)."),
    Setting("cube.hot_rebuild_s", float, 60.0, _positive,
            "When the hot tier holds only part of a cube: rebuild it from the most used keys (sampled) this often."),
    Setting("qcache.entries", int, 1 << 20, _positive,
            "Query cache capacity (user-item scores) when a pipeline has a query_cache stage; split into one "
            "region per writer (the ranker's wids), least recently stored replaced first."),
    Setting("autoscale.enabled", bool, False, _any,
            "Move workers to the worker kind that is the bottleneck (jizhi/supervisor/autoscale.py), within autoscale.budget."),
    Setting("autoscale.budget", int, 0, _nonneg,
            "Most workers of a pipeline's kinds together; 0: the sum of the pipeline file's pools."),
    Setting("autoscale.period_s", float, 1.0, _positive,
            "How often the autoscaler reads each kind's utilisation and queue from the broker."),
    Setting("autoscale.high", float, 0.85, lambda v: None if 0 < v <= 1 else "in (0, 1]",
            "A kind busier than this (busy time per worker per second) is a bottleneck."),
    Setting("autoscale.wait_ms", float, 10.0, _nonneg,
            "A kind whose requests wait longer than this for a worker (p99 over a period, beyond its own "
            "batch_wait_ms) while another kind's p99 wait is under a quarter of it is queueing-bound: a worker "
            "moves to it from that kind (0: off). This is the bottleneck when the cores, not one kind's "
            "workers, are saturated."),
    Setting("autoscale.sustain", int, 3, _positive,
            "Periods in a row the same move must be indicated before it is made."),
    Setting("autoscale.cooldown_s", float, 10.0, _nonneg,
            "After a move, nothing moves for this long."),
    Setting("shed.mode", str, "auto", lambda v: None if v in ("auto", "off") else "auto or off",
            "Load shedding of pipelines with a shedder stage at start: auto (each request is cut at admission as far "
            "as the work queued and arriving needs, within shed.high x shed.slo_ms) or off. `jizhictl shed` changes "
            "it live."),
    Setting("shed.slo_ms", float, 50.0, _positive,
            "The p99 latency the load controller keeps requests under, in milliseconds."),
    Setting("shed.high", float, 0.8, lambda v: None if 0 < v <= 1 else "in (0, 1]",
            "The admission cut keeps each request's expected completion within this fraction of shed.slo_ms; the "
            "controller trims it while the recent p99 is over it."),
    Setting("shed.low", float, 0.65, lambda v: None if 0 < v < 1 else "in (0, 1)",
            "The controller loosens the cut while the recent p99 is under this fraction of shed.slo_ms and candidates "
            "are cut (between shed.low and shed.high it holds: no oscillation under a steady load)."),
    Setting("shed.period_s", float, 0.5, _positive,
            "How often the controller reads the broker's figures and sets its trim of the admission cut."),
    Setting("shed.policy_file", str, "", _any,
            "A learned pruning policy (jizhictl shed train); empty: the rule (every request keeps the quota)."),
    Setting("qcache.window_s", float, 120.0, _positive,
            "A cached score is reused for this long after it was computed."),
    Setting("qcache.bypass", str, "auto", lambda v: None if v in ("auto", "off") else "auto or off",
            "auto: each worker weighs what the query cache costs per candidate (lookup, store, narrowing the batch "
            "around the hits) against what it saves (its hit ratio x the time per candidate of the stages a hit "
            "skips), measured over every qcache.eval_candidates looked up, and bypasses it while it does not pay: "
            "then only 1 in qcache.sample_users users looks it up and stores (so it keeps measuring), until it "
            "would pay 1.5 times over. off: never bypassed (still measured; jizhictl stats shows the figures)."),
    Setting("qcache.start", str, "bypassed", lambda v: None if v in ("bypassed", "on") else "bypassed or on",
            "How each worker's query cache starts (qcache.bypass = auto): bypassed (only the sampled users use it "
            "until it shows it pays: turning the cache on never makes traffic that does not repeat slower, even "
            "before the first judgement) or on (every user from the first request; judged after the warm-up)."),
    Setting("qcache.min_hit_ratio", float, 0.0, lambda v: None if 0.0 <= v <= 1.0 else "must be from 0 to 1",
            "A floor under qcache.bypass = auto: below this hit ratio the query cache is bypassed even when "
            "its measured costs say it pays (back on at 1.5 times it). 0: no floor, the costs alone decide. "
            "(Before the costs were measured this was the only rule, at 0.05, and 0 meant always on: that is "
            "qcache.bypass = off now.)"),
    Setting("qcache.sample_users", int, 16, lambda v: None if v >= 1 and v & (v - 1) == 0 else "must be a power of two",
            "While the query cache is bypassed, 1 in this many users (by a hash of the user) still uses it, "
            "with 1 / this many of the table (so their hit ratio estimates the cache's in full use)."),
    Setting("qcache.eval_candidates", int, 200_000, _positive,
            "How many looked-up candidates a worker measures the query cache's hit ratio, costs and savings over "
            "before it judges again whether the cache pays."),
    Setting("workers.drain_timeout_s", float, 10.0, _positive,
            "SIGTERM: how long in-flight requests may take to finish before workers are stopped."),
]

_BY_NAME = {s.name: s for s in SETTINGS}


def load(path=None, overrides=None):
    """Return a dict of every setting (``section.key`` -> value).

    ``path`` is a jizhi.toml (or None for defaults); ``overrides`` a dict of
    ``section.key`` -> value applied on top (command-line flags). Raises
    ConfigError naming the first bad setting, before anything is applied.
    Called by jizhid at start and by the supervisor's reload with the same
    overrides. An int is accepted for a float setting; the CURVE pair is set
    together and must exist; an empty ``server.run_dir`` comes back resolved
    ($RUNTIME_DIRECTORY, else ``default_run_dir``).
    """
    raw = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}")
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}")
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"config {path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                raw[f"{section}.{key}"] = value
    raw.update(overrides or {})
    values = {}
    for name in raw:
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name!r} (jizhid --check-config lists them)")
    for s in SETTINGS:
        v = raw.get(s.name, s.default)
        if s.type is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, s.type) or (s.type is int and isinstance(v, bool)):
            raise ConfigError(f"setting {s.name} must be {s.type.__name__}, got {v!r}")
        err = s.check(v)
        if err:
            raise ConfigError(f"setting {s.name} = {v!r}: {err}")
        values[s.name] = v
    if bool(values["security.curve_server_secret"]) != bool(values["security.curve_clients_dir"]):
        raise ConfigError("security.curve_server_secret and security.curve_clients_dir are set together (a CURVE "
                          "server without an allow-list accepts any client key)")
    for key in ("security.curve_server_secret", "security.curve_clients_dir"):
        if values[key] and not os.path.exists(values[key]):
            raise ConfigError(f"setting {key} = {values[key]!r}: no such file or directory")
    if not values["server.run_dir"]:
        base = os.environ.get("RUNTIME_DIRECTORY")
        values["server.run_dir"] = base or default_run_dir(values["server.instance"])
    return values


def default_run_dir(instance):
    """The run directory of an instance started from a shell (no $RUNTIME_DIRECTORY)."""
    return f"/tmp/jizhi-{os.getuid()}-{instance}"


def etc_dir():
    """Where the shipped etc/ lives: $JIZHI_ETC, the source tree, or <prefix>/share/jizhi/etc."""
    env = os.environ.get("JIZHI_ETC")
    if env:
        return Path(env)
    tree = Path(__file__).resolve().parent.parent / "etc"
    if (tree / "pipelines").is_dir():
        return tree
    import sys
    return Path(sys.prefix) / "share" / "jizhi" / "etc"


def describe():
    """The settings reference as text lines (jizhid --check-config, docs)."""
    lines = []
    for s in SETTINGS:
        lines.append(f"{s.name} ({s.type.__name__}, default {s.default!r})\n    {s.description}")
    return "\n".join(lines)
