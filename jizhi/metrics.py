"""The Prometheus endpoint, served by the supervisor (``metrics.listen``).

A custom collector builds every family at scrape time from what the
supervisor already has: the stats segment (per-stage service-time
histograms written by the workers, request latency histograms and errors by
code written by the broker), the broker's last figures (queue depths, pool
sizes; refreshed by the supervisor loop about once a second, never from the
HTTP thread, which must not touch the loop's sockets), and /proc (RSS per
process). Latencies are *histograms* (they aggregate across nodes), with
buckets from 50 us to 100 ms.
"""
import collections
import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from jizhi.errors import CODES
from jizhi.registry import State
from jizhi.stats import BANKS, BUCKETS_US, C_EVENTS, C_INVALID_SCORES, rss_bytes

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
        events = CounterMetricFamily("jizhi_worker_events", "Events processed per worker",
                                     labels=["pipeline", "group", "wid"])
        for pname, plan in sup.run["pipelines"].items():
            prow = rows[pname]
            b, s = _buckets(st.hist[prow, 0], int(st.sum_us[prow, 0]))
            req_h.add_metric([pname], b, s)
            for ci, code in enumerate(CODES):
                errors.add_metric([pname, code], int(st.errors[prow, ci]))
            invalid.add_metric([pname], int(st.counters[prow, C_INVALID_SCORES]))
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
        yield events
        info = sup.last_broker_info or {}
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
        for (pname, g), n in sup.desired.items():
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
        up.add_metric([], 1 if sup.readiness(info)[0] else 0)
        yield up
        # Read from the HTTP thread while the supervisor loop changes them: iterate over copies.
        serving = GaugeMetricFamily("jizhi_serving_version", "Model version new requests are pinned to",
                                    labels=["pipeline", "model"])
        for pname, banks in list(sup.loaded.items()):
            for ld in list(banks.values()):
                if ld.state == "active":
                    serving.add_metric([pname, ld.model], ld.version)
        yield serving
        states = GaugeMetricFamily("jizhi_model_versions", "Model versions on disk by state (jizhictl models)",
                                   labels=["model", "state"])
        for model, recs in list(sup.registry.records.items()):
            counts = collections.Counter(r.state.value for r in list(recs.values()))
            for st in State:
                states.add_metric([model, st.value], counts.get(st.value, 0))
        yield states


def serve(sup, listen):
    """Start the endpoint in a daemon thread; returns the server or None (logged) on failure."""
    from prometheus_client import start_http_server
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(Collector(sup))
    try:
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    except OSError as e:
        log.error("metrics endpoint %s not started: %s (set metrics.listen, or empty to disable)", listen, e)
        return None
    log.info("metrics on http://%s/metrics", listen)
    return server
