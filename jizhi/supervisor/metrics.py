"""The Prometheus endpoint, served by the supervisor (``metrics.listen``).

A custom collector builds every family at scrape time from what the
supervisor already has: the stats segment (per-stage service-time
histograms written by the workers, request latency histograms and errors by
code written by the broker), the broker's last figures (queue depths, pool
sizes; refreshed by the supervisor loop about once a second, never from the
HTTP thread, which must not touch the loop's sockets), and /proc (RSS per
process). Latencies are *histograms* (they aggregate across nodes), with
buckets from 50 us to 100 ms.

The same listener answers the health probes (a WSGI app around prometheus_client's
``make_wsgi_app``, served like its ``start_wsgi_server`` but with paths):

* ``/metrics``: the Prometheus text;
* ``/livez``: 200 while the supervisor's loop runs (it stamps ``loop_beat`` every turn,
  about 10 times a second), 503 once it has not for ``metrics.livez_stall_s``;
* ``/readyz``: 200 only when every pipeline serves a version with every pool at its
  desired size, no child is failing to start and jizhid is neither draining nor
  stopping; 503 otherwise, the reason in one line;
* anything else: 404.
"""
import collections
import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from jizhi.errors import CODES
from jizhi.stats import BANKS, BUCKETS_US, C_EVENTS, C_INVALID_SCORES, C_UNKNOWN_USERS, rss_bytes
from jizhi.states import VersionState
from jizhi.supervisor.registry import TRANSITIONS as REGISTRY_TRANSITIONS

log = logging.getLogger("jizhi.metrics")


def _buckets(counts, total_us):
    cum, out = 0, []
    for edge, c in zip(BUCKETS_US[:-1], counts[:-1]):
        cum += int(c)
        out.append((f"{edge / 1e6:g}", cum))
    cum += int(counts[-1])
    out.append(("+Inf", cum))
    return out, total_us / 1e6


class Collector:
    def __init__(self, sup):
        self.sup = sup

    def collect(self):
        sup = self.sup
        st = sup.stats_shm
        rows = sup.stats_spec["map"]
        stage_h = HistogramMetricFamily("jizhi_stage_service_seconds",
                                        "Service time of a stage per micro-batch", labels=["pipeline", "stage"])
        req_h = HistogramMetricFamily("jizhi_request_latency_seconds",
                                      "Request latency from receipt to answer (answered OK)", labels=["pipeline"])
        errors = CounterMetricFamily("jizhi_errors", "Error replies by code", labels=["pipeline", "code"])
        invalid = CounterMetricFamily("jizhi_invalid_scores", "Candidates dropped from ok replies because their "
                                      "score was NaN or infinite", labels=["pipeline"])
        unknown_users = CounterMetricFamily("jizhi_unknown_users", "Ok replies to a user the profiles do not know "
                                            "(scored with the default vectors)", labels=["pipeline"])
        events = CounterMetricFamily("jizhi_worker_events", "Events processed per worker",
                                     labels=["pipeline", "group", "wid"])
        for pname, plan in sup.run["pipelines"].items():
            prow = rows[pname]
            b, s = _buckets(st.hist[prow, 0], int(st.sum_us[prow, 0]))
            req_h.add_metric([pname], b, s)
            for ci, code in enumerate(CODES):
                errors.add_metric([pname, code], int(st.errors[prow, ci]))
            invalid.add_metric([pname], int(st.counters[prow, C_INVALID_SCORES]))
            unknown_users.add_metric([pname], int(st.counters[prow, C_UNKNOWN_USERS]))
            for g, group in plan["groups"].items():
                base = rows[f"{pname}/{g}"]
                pool = sup.settings["workers.max_pool"]
                n = BANKS * pool
                for si, sname in enumerate(group["stages"]):
                    counts = st.hist[base:base + n, si].sum(axis=0)
                    b, s = _buckets(counts, int(st.sum_us[base:base + n, si].sum()))
                    stage_h.add_metric([pname, sname], b, s)
                for wid in range(pool):   # a wid's two banks (serving and loading versions) summed
                    ev = int(st.counters[base + wid:base + n:pool, C_EVENTS].sum())
                    if ev:
                        events.add_metric([pname, g, str(wid)], ev)
        yield stage_h
        yield req_h
        yield errors
        yield invalid
        yield unknown_users
        yield events
        info = sup.reports.broker_info or {}
        queue = GaugeMetricFamily("jizhi_queue_depth", "Requests queued per group", labels=["pipeline", "group"])
        workers = GaugeMetricFamily("jizhi_pool_workers", "Workers registered with the broker",
                                    labels=["pipeline", "group"])
        desired = GaugeMetricFamily("jizhi_pool_desired", "Desired pool size", labels=["pipeline", "group"])
        inflight = GaugeMetricFamily("jizhi_in_flight", "Requests admitted and not yet answered", labels=["pipeline"])
        for pname, p in info.get("pipelines", {}).items():
            inflight.add_metric([pname], p["in_flight"])
            for g, gs in p["groups"].items():
                queue.add_metric([pname, g], gs["queue"])
                workers.add_metric([pname, g], gs["workers"])
        for (pname, g), n in sup.pools.desired.items():
            desired.add_metric([pname, g], n)
        yield queue
        yield workers
        yield desired
        yield inflight
        rss = GaugeMetricFamily("jizhi_process_rss_bytes", "Resident set size per process (and model version)",
                                labels=["process", "version"])
        rss.add_metric(["supervisor", ""], rss_bytes())
        for c in list(sup.children.values()):
            if c.pid:
                rss.add_metric([c.name, "" if c.version is None else str(c.version)], rss_bytes(c.pid))
        yield rss
        up = GaugeMetricFamily("jizhi_ready", "1 when every stage has a warmed-up worker and no child is failing "
                                              "to start")
        up.add_metric([], 1 if sup.reports.readiness(info)[0] else 0)
        yield up
        # Read from the HTTP thread while the supervisor loop changes them: iterate over copies.
        serving = GaugeMetricFamily("jizhi_serving_version", "Model version new requests are pinned to",
                                    labels=["pipeline", "model"])
        for pname, banks in list(sup.versions.loaded.items()):
            for ld in list(banks.values()):
                if ld.state == VersionState.SERVING:
                    serving.add_metric([pname, ld.model], ld.version)
        yield serving
        states = GaugeMetricFamily("jizhi_model_versions", "Model versions on disk by state (jizhictl models)",
                                   labels=["model", "state"])
        for model, recs in list(sup.versions.registry.records.items()):
            counts = collections.Counter(r.state.value for r in list(recs.values()))
            for st in REGISTRY_TRANSITIONS:     # the registry's states (jizhictl models shows them)
                states.add_metric([model, st.value], counts.get(st.value, 0))
        yield states


INFO_STALE_S = 5.0     # the broker's figures are asked for every second: older ones mean it does not answer


def livez(sup):
    """(alive, one line): the supervisor's loop has turned within ``metrics.livez_stall_s``."""
    bound = sup.settings["metrics.livez_stall_s"]
    beat = sup.loop_beat
    if beat is None:
        return False, "the supervisor loop has not started"
    age = time.monotonic() - beat
    if age > bound:
        return False, f"the supervisor loop has not run for {age:.1f} s (metrics.livez_stall_s = {bound:g})"
    return True, f"alive: the supervisor loop ran {age:.2f} s ago"


def readyz(sup, state=None):
    """(ready, one line): what a load balancer needs; stricter than ``readiness`` (every pool full).

    ``state`` (the app's dict) remembers whether it was ever ready: a reason is "starting: ..."
    before that and "degraded: ..." after.
    """
    state = {} if state is None else state
    phase = "degraded: " if state.get("was_ready") else "starting: "
    if sup.stopping:
        return False, "stopping: draining in-flight requests, admitting nothing new"
    info = sup.reports.broker_info
    if info is None:
        return False, "starting: the broker has not answered yet"
    age = time.monotonic() - sup.reports.broker_info_at
    if age > INFO_STALE_S:
        return False, f"{phase}the broker has not answered for {age:.1f} s"
    if info.get("draining"):
        return False, "draining: admitting nothing new (jizhictl resume admits again)"
    ready, why = sup.reports.readiness(info)
    if not ready:
        return False, phase + why
    pipes = info.get("pipelines", {})
    short = []
    for (pname, g), n in sorted(list(sup.pools.desired.items())):
        p = pipes.get(pname)
        if p is None or p.get("version") is None:
            return False, f"{phase}pipeline {pname} serves no version"
        have = (p.get("groups", {}).get(g) or {}).get("workers", 0)
        if have < n:
            short.append(f"{pname}/{g} has {have} of {n} workers")
    for pname, p in pipes.items():
        # Per group the broker counts every loaded version's workers: check the serving version's own total.
        want = sum(n for (pn, _), n in list(sup.pools.desired.items()) if pn == pname)
        have = (p.get("versions", {}).get(str(p.get("version"))) or {}).get("workers", want)
        if have < want and not any(s.startswith(f"{pname}/") for s in short):
            short.append(f"{pname} version {p['version']} has {have} of {want} workers")
    if short:
        return False, phase + "pool not full: " + "; ".join(short)
    state["was_ready"] = True
    return True, "ready: " + ", ".join(f"{pname} version {p['version']}" for pname, p in pipes.items())


def make_app(sup, registry):
    """The listener's WSGI app: /metrics, /livez, /readyz; 404 elsewhere."""
    metrics_app = make_wsgi_app(registry)
    state = {}
    probes = {"/livez": livez, "/readyz": lambda sup: readyz(sup, state)}

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if path in probes and method not in ("GET", "HEAD"):
            status, text = "405 Method Not Allowed", f"{method}: use GET or HEAD"
        elif path in probes:
            try:
                ok, text = probes[path](sup)
            except Exception as e:    # read while the loop changes things: say so, never a 500 page
                log.exception("%s failed", path)
                ok, text = False, f"{path} failed: {type(e).__name__}: {e}"
            status = "200 OK" if ok else "503 Service Unavailable"
        else:
            status, text = "404 Not Found", f"no such path {path!r}: /metrics, /livez or /readyz"
        body = (text + "\n").encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [b""] if method == "HEAD" else [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True     # a slow scraper never holds the stop

    def shutdown(self):
        super().shutdown()
        self.server_close()   # refused from now on, not left waiting in the backlog


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass                  # probes every few seconds: not one log line each


def serve(sup, listen):
    """Start the endpoint in a daemon thread; returns the server or None (logged) on failure."""
    host, _, port = listen.rpartition(":")
    host = (host or "127.0.0.1").strip("[]")
    registry = CollectorRegistry()
    registry.register(Collector(sup))
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]

        class Server(_Server):
            address_family = family   # an IPv6 address needs an AF_INET6 socket

        server = make_server(addr[0], int(port), make_app(sup, registry), Server, handler_class=_QuietHandler)
    except OSError as e:
        log.error("metrics endpoint %s not started: %s (set metrics.listen, or empty to disable)", listen, e)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s/metrics, health probes on /livez and /readyz", listen)
    return server
