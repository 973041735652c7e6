"""Prometheus metrics of the app, served on GET /metrics by the ingress (single-machine default).

The model replica runs in another process, so it reports what the ingress records:
each row's result carries its batch's size, distinct adapters and compute time (the
first row of a batch carries `batch_first`, so a batch is counted once), and
`ModelServer.stats()` gives slot residency and load/eviction counts, read on scrape.

Clusters (several ingress or model replicas): each process here has its own registry,
so a scrape of one ingress sees only its share. There, use `ray.serve.metrics`
(Counter/Gauge/Histogram, exported by Ray's per-node metrics agent) in the replicas
instead and scrape every node; that is a later step. Ray's own ray_serve_* series already arrive
that way: deploy/prometheus/prometheus.yml scrapes both, deploy/grafana/ charts both (deploy/README.md).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineStats:
    """A collector that reports the last ModelServer.stats() snapshot."""

    def __init__(self):
        self.snapshot: dict = {}

    def collect(self):
        s = self.snapshot
        yield GaugeMetricFamily("polyhead_resident_slots", "adapters resident in slots", value=s.get("resident", 0))
        yield GaugeMetricFamily("polyhead_max_slots", "slots of the engine", value=s.get("max_slots", 0))
        yield GaugeMetricFamily("polyhead_registered_adapters", "adapters loaded in the engine",
                                value=s.get("registered", 0))
        yield GaugeMetricFamily("polyhead_slot_bytes", "bytes held by slot tensors", value=s.get("slot_bytes", 0))
        yield CounterMetricFamily("polyhead_slot_loads", "adapter copies into slots", value=s.get("loads", 0))
        yield CounterMetricFamily("polyhead_slot_evictions", "adapters evicted from slots (LRU)",
                                  value=s.get("evictions", 0))
        yield CounterMetricFamily("polyhead_forwards", "batched forwards of the base", value=s.get("forwards", 0))


class AppMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("polyhead_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)
        self.rows = Counter("polyhead_rows", "rows served by route and adapter (base: no adapter)",
                            ["route", "adapter"], registry=r)
        self.errors = Counter("polyhead_errors", "errors by route, adapter (registered names only, else "
                              "unknown/none) and type", ["route", "adapter", "type"], registry=r)
        self.latency = Histogram("polyhead_request_seconds", "end-to-end request latency in the ingress",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_compute = Histogram("polyhead_batch_compute_seconds", "Engine.infer time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("polyhead_batch_size", "rows per batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_adapters = Histogram("polyhead_batch_adapters", "distinct adapters per batch",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.adapter_loads = Counter("polyhead_adapter_loads", "adapters loaded into the engine (on demand or admin)",
                                     registry=r)
        self.adapter_load_seconds = Histogram("polyhead_adapter_load_seconds", "time to validate and load an adapter",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_unloads = Counter("polyhead_adapter_unloads", "adapters removed through the admin route",
                                       registry=r)
        self.engine = EngineStats()
        r.register(self.engine)

    def observe_row(self, route: str, adapter: str | None, row: dict) -> None:
        self.rows.labels(route, adapter or "base").inc()
        if row.get("batch_first"):
            self.batch_size.observe(row["batch_size"])
            self.batch_adapters.observe(row["batch_adapters"])
            self.batch_compute.observe(row["compute_s"])
        if row.get("load_s") is not None:
            self.observe_load(row["load_s"])

    def observe_load(self, seconds: float) -> None:
        self.adapter_loads.inc()
        self.adapter_load_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
