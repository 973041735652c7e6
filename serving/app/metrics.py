"""Prometheus metrics: every series defined once, recorded through one Recorder per process.

A Recorder writes every value twice:
- into the process's prometheus-client registry. Each replica (ingress and model) sends that
  registry's cumulative values to the app's MetricsHub (serving/app/hub.py), and GET /metrics, on
  whichever ingress replica answers, serves the hub's combination of every replica: complete with several
  ingress and model replicas on several nodes, at most `metrics_push_s` behind. Each series says how
  (`Series.aggregate`): counters and histograms are summed; a gauge that describes one replica (its slots,
  its adapters) keeps one series per replica, labelled `replica` (Ray's replica id, the value Ray's own
  export gives that label), since no sum or maximum of them means what its name says;
- into ray.serve.metrics, which each Ray node's metrics agent exports (as `ray_polyhead_*`, with
  deployment/replica/application labels): the route Prometheus scrapes in a cluster (deploy/README.md).

Each series is recorded where its event happens: request-level series (requests, errors, rows per
adapter, end-to-end and queue latency) in the ingress; batch, adapter-load and slot series in the
model replica. Adapter label values are registered adapter names (without `@N`), else "unknown"
(a name nothing is registered under), "none" (no adapter involved) or "base".
Route label values are the routes' names; a request no route answers (404 route_not_found, 405) is
counted under route "unknown", never under its path.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
AGREEMENT_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


@dataclass(frozen=True)
class Series:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # how GET /metrics combines the replicas' values (serving/app/hub.py): "sum"; "max" (e.g. build_info:
    # 1 per version); "replica": one series per replica, labelled replica=<Ray's replica id>
    aggregate: str = "sum"

    def __post_init__(self):
        if self.aggregate not in ("sum", "max", "replica") or (self.aggregate != "sum" and self.kind != "gauge"):
            raise ValueError(f"{self.name}: aggregate {self.aggregate!r} (sum for every kind; max, replica: gauges)")


INGRESS_SERIES = {
    "requests": Series("polyhead_requests", "counter", "HTTP requests by route and status code", ("route", "code")),
    "errors": Series("polyhead_errors", "counter", "error answers by route, adapter (a registered name, else "
                     "unknown/none) and error code", ("route", "adapter", "type")),
    "rows": Series("polyhead_rows", "counter", "rows served by route and adapter (base: no adapter)",
                   ("route", "adapter")),
    "latency": Series("polyhead_request_seconds", "histogram", "end-to-end request latency in the ingress",
                      ("route",), LATENCY_BUCKETS),
    "queue": Series("polyhead_queue_seconds", "histogram", "per row: the ingress's wait for its result minus its "
                    "batch's compute time (queues, batch wait, transfers)", ("route",), LATENCY_BUCKETS),
    "adapter_latency": Series("polyhead_adapter_request_seconds", "histogram", "end-to-end latency of the "
                              "answered requests that named each adapter (base: the base model), by route",
                              ("route", "adapter"), LATENCY_BUCKETS),
    "build_info": Series("polyhead_build_info", "gauge", "1, labelled with the polyhead version the ingress "
                         "replicas run", ("version",), aggregate="max"),
    "ab_requests": Series("polyhead_experiment_requests", "counter", "requests an experiment's arm served (forced "
                          "ones included), by status code", ("experiment", "arm", "code")),
    "ab_errors": Series("polyhead_experiment_errors", "counter", "errors of an experiment's arm (its adapter's: "
                        "counted for its error rate and guardrail)", ("experiment", "arm", "type")),
    "ab_latency": Series("polyhead_experiment_request_seconds", "histogram", "end-to-end latency of the answered "
                         "requests an experiment's arm served", ("experiment", "arm"), LATENCY_BUCKETS),
    "ab_shadow_rows": Series("polyhead_experiment_shadow_rows", "counter", "shadow rows by outcome: run, dropped "
                             "(under load), failed (an error), late (not done with their primary)",
                             ("experiment", "outcome")),
    "ab_agreement": Series("polyhead_experiment_shadow_agreement", "histogram", "per shadow row, its agreement "
                           "with the primary (label agreement, entity F1, cosine) by the primary's arm",
                           ("experiment", "arm"), AGREEMENT_BUCKETS),
    "ab_outcomes": Series("polyhead_experiment_outcomes", "counter", "outcomes (POST /v1/feedback) counted per arm",
                          ("experiment", "arm")),
    "ab_outcome_sum": Series("polyhead_experiment_outcome_sum", "counter", "the sum of the outcome values per arm "
                             "(mean: this / polyhead_experiment_outcomes)", ("experiment", "arm")),
    "ab_weight": Series("polyhead_experiment_arm_weight", "gauge", "each arm's weight now (0 after a rollback)",
                        ("experiment", "arm"), aggregate="max"),
    "ab_rolled_back": Series("polyhead_experiment_rolled_back", "gauge", "1 for an arm a guardrail rolled back to "
                             "weight 0", ("experiment", "arm"), aggregate="max"),
    "affinity_routed": Series("polyhead_affinity_routed", "counter", "infer calls the affinity request router "
                              "(request_router: affinity) sent to a replica: hit (the adapter was resident there), "
                              "miss (a home replica that had to load it), spill (neither: its homes were "
                              "saturated), unpinned (base rows, several adapters)", ("outcome",)),
    "adapter_homes": Series("polyhead_adapter_homes", "gauge", "adapter versions resident on this many model "
                            "replicas (label homes), as the affinity router last saw them", ("homes",),
                            aggregate="max"),
    "model_call_rows": Series("polyhead_model_call_rows", "histogram", "rows per call from the ingress to the model "
                              "deployment (concurrent requests share calls: serving/app/coalesce.py)", (),
                              SIZE_BUCKETS),
}
MODEL_SERIES = {
    "batch_size": Series("polyhead_batch_size", "histogram", "rows per batch", (), SIZE_BUCKETS),
    "batch_adapters": Series("polyhead_batch_adapters", "histogram", "distinct adapters per batch", (), SIZE_BUCKETS),
    "batch_compute": Series("polyhead_batch_compute_seconds", "histogram", "Engine.infer time per batch", (),
                            LATENCY_BUCKETS),
    "adapter_loads": Series("polyhead_adapter_loads", "counter", "adapter versions loaded into a model replica "
                            "(on demand or admin)"),
    "adapter_load_seconds": Series("polyhead_adapter_load_seconds", "histogram", "time to validate and load an "
                                   "adapter version", (), LATENCY_BUCKETS),
    "adapter_unloads": Series("polyhead_adapter_unloads", "counter", "adapter versions unloaded from a model replica "
                              "(deleted, or gone from the store)"),
    "slot_loads": Series("polyhead_slot_loads", "counter", "adapter copies into slots"),
    "slot_evictions": Series("polyhead_slot_evictions", "counter", "adapters evicted from slots (LRU)"),
    "forwards": Series("polyhead_forwards", "counter", "batched forwards of the base"),
    "resident_slots": Series("polyhead_resident_slots", "gauge", "adapters resident in the slots of one model "
                             "replica (label replica)", aggregate="replica"),
    "max_slots": Series("polyhead_max_slots", "gauge", "slots of one model replica's engine, max_slots of the "
                        "config (label replica)", aggregate="replica"),
    "registered_adapters": Series("polyhead_registered_adapters", "gauge", "adapter versions loaded in one model "
                                  "replica's engine (label replica)", aggregate="replica"),
    "slot_bytes": Series("polyhead_slot_bytes", "gauge", "bytes held by one model replica's slot tensors (label "
                         "replica)", aggregate="replica"),
    "replica_rows": Series("polyhead_replica_rows", "gauge", "rows one model replica has run since it started "
                           "(label replica): how the router spread them", aggregate="replica"),
    "replica_adapter_rows": Series("polyhead_replica_adapter_rows", "gauge", "rows naming an adapter that one model "
                                   "replica has run since it started (label replica); its adapter hit rate is "
                                   "1 - polyhead_replica_adapter_loads / this", aggregate="replica"),
    "replica_adapter_loads": Series("polyhead_replica_adapter_loads", "gauge", "adapter versions one model replica "
                                    "has loaded since it started (label replica)", aggregate="replica"),
    "replica_slot_evictions": Series("polyhead_replica_slot_evictions", "gauge", "adapters one model replica has "
                                     "evicted from its slots since it started (label replica)", aggregate="replica"),
    "broken_versions": Series("polyhead_broken_adapter_versions", "gauge", "published adapter versions the store "
                              "cannot read back (skipped by listings; remove them), as of the last listing",
                              aggregate="max"),
}
GATE_SERIES = {
    "refusals": Series("polyhead_gate_refusals", "counter", "inference requests refused (429) by the front gate in "
                       "Ray's proxy, before any Ray work (also counted in requests and errors)", ("route",)),
}
HUB_SERIES = {
    "sources": Series("polyhead_metrics_sources", "gauge", "replicas whose series this answer sums, by deployment "
                      "(those that reported recently)", ("deployment",)),
}
ALL_SERIES = {s.name: s for group in (INGRESS_SERIES, MODEL_SERIES, GATE_SERIES, HUB_SERIES) for s in group.values()}

_PROM_TYPES = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def _ray_metric(series: Series):
    from ray.serve import metrics as serve_metrics

    tags = series.labels or None
    if series.kind == "histogram":
        return serve_metrics.Histogram(series.name, series.help, boundaries=list(series.buckets), tag_keys=tags)
    kind = serve_metrics.Counter if series.kind == "counter" else serve_metrics.Gauge
    return kind(series.name, series.help, tag_keys=tags)


class _Child:
    """One label combination of a series, in both places."""

    __slots__ = ("prom", "ray", "tags", "last")

    def __init__(self, prom, ray_metric, tags: dict[str, str]):
        self.prom, self.ray, self.tags = prom, ray_metric, tags
        self.last: float | None = None  # a gauge's value, written to Ray again by refresh()

    def inc(self, amount: float = 1.0) -> None:
        if amount <= 0:  # ray.util.metrics refuses 0; a counter never goes down
            return
        self.prom.inc(amount)
        if self.ray is not None:
            self.ray.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self.prom.observe(value)
        if self.ray is not None:
            self.ray.observe(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.prom.set(value)
        self.last = value
        if self.ray is not None:
            self.ray.set(value, tags=self.tags)

    def refresh(self) -> None:
        """Write a gauge's value to Ray's export again: Ray's per-node export dropped a replica's gauges (slots,
        registered adapters) that no batch or load had set for a while, so an idle replica vanished from it."""
        if self.ray is not None and self.last is not None:
            self.ray.set(self.last, tags=self.tags)


class Instrument:
    """One series: a prometheus-client metric in the Recorder's registry and, inside Ray, a ray.serve.metrics one."""

    def __init__(self, series: Series, registry: CollectorRegistry, ray_export: bool):
        self.series = series
        extra = {"buckets": series.buckets} if series.kind == "histogram" else {}
        self._prom = _PROM_TYPES[series.kind](series.name, series.help, series.labels, registry=registry, **extra)
        self._ray = _ray_metric(series) if ray_export else None
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values) -> _Child:
        values = tuple(str(v) for v in values)
        child = self._children.get(values)
        if child is None:
            prom = self._prom.labels(*values) if self.series.labels else self._prom
            child = self._children[values] = _Child(prom, self._ray, dict(zip(self.series.labels, values)))
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def remove(self, label: str, value: str) -> int:
        """Stop reporting every label combination whose `label` is `value` (prometheus-client's remove();
        ray.util.metrics has no such call: Ray's export keeps the last values until the replica restarts)."""
        if label not in self.series.labels:
            return 0
        i = self.series.labels.index(label)
        gone = [v for v in self._children if v[i] == value]
        for values in gone:
            del self._children[values]
            self._prom.remove(*values)
        return len(gone)


class Recorder:
    """The series of one process (`INGRESS_SERIES` or `MODEL_SERIES`), each an attribute: `rec.rows.labels(...).inc()`.

    ray_export: also write ray.serve.metrics (default: when Ray is initialized in this process).
    """

    def __init__(self, series: dict[str, Series], ray_export: bool | None = None):
        if ray_export is None:
            import ray

            ray_export = ray.is_initialized()
        self.registry = CollectorRegistry(auto_describe=True)
        self.instruments = {attr: Instrument(s, self.registry, ray_export) for attr, s in series.items()}
        for attr, instrument in self.instruments.items():
            setattr(self, attr, instrument)
        self.collectors: list = []  # callables refresh_gauges runs first: values kept elsewhere, copied in


    def refresh_gauges(self) -> None:
        """The collectors' values copied in, then every gauge's value written to Ray's export again
        (MetricsPusher does it each interval)."""
        for collect in self.collectors:
            collect(self)
        for instrument in self.instruments.values():
            if instrument.series.kind == "gauge":
                for child in instrument._children.values():
                    child.refresh()

    def forget_adapter(self, name: str) -> int:
        """Stop reporting the series labelled with adapter `name` (it was deleted); how many were dropped."""
        return sum(i.remove("adapter", name) for i in self.instruments.values())

    def values(self) -> dict[tuple[str, str, tuple], float]:
        """Cumulative values: (family, sample name, sorted label items) -> value (no `_created` samples)."""
        out = {}
        for family in self.registry.collect():
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(family.name, s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def exposition(self) -> bytes:
        """This process's series alone, in the Prometheus text format."""
        return generate_latest(self.registry)


def polyhead_version() -> str:
    """The installed polyhead package's version (build_info), "unknown" when run from a tree not installed."""
    try:
        return version("polyhead")
    except PackageNotFoundError:
        return "unknown"


def adapter_label(ref: str | None) -> str:
    """The adapter label of a row: its name without `@N`, or "base"."""
    return "base" if ref is None else ref.partition("@")[0]
