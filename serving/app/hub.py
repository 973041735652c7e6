"""MetricsHub: where GET /metrics gathers the series of every replica of the app.

Each replica (ingress and model) runs a MetricsPusher that sends its Recorder's cumulative values to
the hub, a named Ray actor per app (`polyhead-metrics:<app>`), every `interval_s` when something
changed (only the changed series) and at least every HEARTBEAT_S. The hub keeps the latest values per
replica and answers their combination, rendered with prometheus-client:

- counters and histograms: the sum over every replica that ever reported since the hub started (a
  replica that stopped keeps its final counts, so sums never go down while the hub lives);
- gauges: over the replicas heard from within `ttl_s` (a stopped replica's slots are not counted), as
  their Series.aggregate says: one series per replica, labelled `replica` (the slot gauges: a sum of
  every replica's max_slots is no replica's), their maximum (build_info) or their sum;
- `polyhead_metrics_sources{deployment}`: how many replicas the gauges cover, so a scrape says what it covers.

Values are cumulative, so a lost or repeated push cannot skew a sum; each push carries the replica's
sequence number, and a late one (a push that timed out, say while the hub started) is ignored.
The hub is created, on its own node, by the first ingress replica (or gate) that looks for it, and lives as
long as that replica (Ray ties an actor to its creator); model replicas only look it up (hub_handle), so the
loss of a worker node and its model replicas keeps the hub and their final counts. If the hub goes, the next
push creates a new one, and the hub's new epoch makes every replica send all its values again (the stopped
replicas' history is then lost, as when a Prometheus target restarts).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from .metrics import ALL_SERIES, HUB_SERIES, Recorder

HEARTBEAT_S = 5.0
MODEL_DEPLOYMENT = "ModelServer"  # its replicas never create the hub (hub_handle)
FORGET_GRACE_S = 60.0  # after a delete, late rows (admitted before it, drained up to 30 s) recreate no series
WARN_EVERY_S = 60.0
_SUFFIX_ORDER = {"_bucket": 0, "_count": 1, "_sum": 2}
log = logging.getLogger("ray.serve")  # Serve writes it into the replica's log

Key = tuple  # (family, sample name, sorted label items)


def merge(sources: list[tuple[str, str, dict[Key, float], bool]]) -> list[Metric]:
    """(replica id, deployment, values, live) per replica -> combined families (module docstring), each
    sample in a stable order."""
    totals: dict[str, dict[tuple, float]] = {}
    live_by_deployment: dict[str, int] = {}
    for source, deployment, values, live in sources:
        if live:
            live_by_deployment[deployment] = live_by_deployment.get(deployment, 0) + 1
        for (family, sample, labels), value in values.items():
            series = ALL_SERIES.get(family)
            if series is None or (series.kind == "gauge" and not live):
                continue
            samples = totals.setdefault(family, {})
            if series.aggregate == "replica":
                labels = tuple(sorted(labels + (("replica", source),)))
            old = samples.get((sample, labels))
            samples[(sample, labels)] = (value if old is None else max(old, value) if series.aggregate == "max"
                                         else old + value)
    sources_series = HUB_SERIES["sources"]
    totals[sources_series.name] = {(sources_series.name, (("deployment", d),)): float(n)
                                   for d, n in live_by_deployment.items()}
    families = []
    for family in sorted(totals):
        series = ALL_SERIES[family]
        metric = Metric(family, series.help, series.kind)
        for sample, labels in sorted(totals[family], key=_sample_order):
            metric.add_sample(sample, dict(labels), totals[family][(sample, labels)])
        families.append(metric)
    return families


def _sample_order(item: tuple[str, tuple]) -> tuple:
    sample, labels = item
    rest = tuple(kv for kv in labels if kv[0] != "le")
    le = dict(labels).get("le")
    suffix = next((s for s in _SUFFIX_ORDER if sample.endswith(s)), "")
    return rest, _SUFFIX_ORDER.get(suffix, 0), float(le) if le is not None else 0.0


def render(families: list[Metric]) -> bytes:
    """Families in the Prometheus text format, through prometheus-client."""

    class _Families:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)


class _Source:
    __slots__ = ("deployment", "values", "seen", "ttl_s", "seq")

    def __init__(self, deployment: str, ttl_s: float):
        self.deployment, self.values, self.seen, self.ttl_s, self.seq = deployment, {}, 0.0, ttl_s, -1


class MetricsHub:
    """The latest cumulative values of every replica of one app; answers their combination (run as a Ray actor)."""

    def __init__(self):
        self.epoch = secrets.token_hex(8)
        self._sources: dict[str, _Source] = {}
        self._forgotten: list[str] = []  # deleted adapters, in order
        self._forgotten_at: dict[str, float] = {}  # deleted adapter -> when (within FORGET_GRACE_S: late series)

    def push(self, source: str, deployment: str, epoch: str | None, seq: int, values: dict, full: bool,
             ttl_s: float, forgotten_seen: int) -> tuple[str, bool, list[str], list[str]]:
        """Take a replica's values (all of them when `full`, else the changed ones) as of its push number `seq`.

        Answers (hub epoch, accepted, adapters deleted since the replica's `forgotten_seen`-th, adapters
        deleted within FORGET_GRACE_S whose series it sent again); the replica drops those adapters' series
        too, and until it has, its values for them are ignored: a row admitted before a delete and answered
        after it (the replica had already dropped the series) never brings the deleted adapter's series back.
        An adapter registered again through the admin route is remembered at once (remember_adapter).
        Changes against another epoch (this hub restarted) are refused: the replica then sends all.
        A push older than one already taken is ignored (accepted: a newer one holds its values).
        """
        if epoch != self.epoch:
            forgotten_seen = 0
            if not full:
                return self.epoch, False, list(self._forgotten), []
        entry = self._sources.get(source)
        if entry is not None and seq <= entry.seq:
            return self.epoch, True, [], []
        news = self._forgotten[forgotten_seen:]
        now = time.monotonic()
        for name in [n for n, at in self._forgotten_at.items() if now - at >= FORGET_GRACE_S]:
            del self._forgotten_at[name]
        drop = set(news) | set(self._forgotten_at)
        late: set[str] = set()
        if drop:
            kept = {}
            for key, value in values.items():
                adapter = dict(key[2]).get("adapter")
                if adapter in drop:
                    late.add(adapter)
                else:
                    kept[key] = value
            values = kept
        if entry is None or full:
            entry = self._sources[source] = _Source(deployment, ttl_s)
        entry.values.update(values)
        entry.seen, entry.ttl_s, entry.seq = now, ttl_s, seq
        return self.epoch, True, news, sorted(late - set(news))

    def forget_adapter(self, name: str) -> None:
        """Drop every series labelled with adapter `name`, from every replica's values; replicas learn it
        from their next push."""
        self._forgotten.append(name)
        self._forgotten_at[name] = time.monotonic()
        for entry in self._sources.values():
            for key in [k for k in entry.values if ("adapter", name) in k[2]]:
                del entry.values[key]

    def remember_adapter(self, name: str) -> None:
        """`name` was registered again: its new series count from now on, within FORGET_GRACE_S too."""
        self._forgotten_at.pop(name, None)

    def exposition(self) -> bytes:
        now = time.monotonic()
        sources = [(name, e.deployment, e.values, now - e.seen <= e.ttl_s) for name, e in self._sources.items()]
        return render(merge(sources))


# a plain (one-thread) actor: Ray runs one caller's calls in the order they were made
MetricsHubActor = ray.remote(num_cpus=0, max_restarts=0)(MetricsHub)


def hub_name(app_name: str) -> str:
    return f"polyhead-metrics:{app_name}"


class MetricsPusher:
    """Sends one replica's Recorder values to the app's MetricsHub (see the module docstring)."""

    def __init__(self, recorder: Recorder, app_name: str, deployment: str, source: str, interval_s: float):
        self.recorder, self.app_name, self.deployment, self.source = recorder, app_name, deployment, source
        self.interval_s = interval_s
        self.ttl_s = 3 * max(HEARTBEAT_S, interval_s)
        self._hub = None
        self._epoch: str | None = None
        self._sent: dict[Key, float] = {}
        self._seq = 0
        self._forgotten_seen = 0  # deleted adapters the hub told about
        self._last_push = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    @classmethod
    def in_replica(cls, recorder: Recorder, interval_s: float) -> "MetricsPusher | None":
        """A pusher for the Serve replica this runs in, started if an event loop runs; None outside Serve."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            ctx = serve.get_replica_context()
        except RayServeException:  # not in a replica (unit tests)
            return None
        pusher = cls(recorder, ctx.app_name, ctx.deployment, ctx.replica_tag or uuid.uuid4().hex, interval_s)
        pusher.ensure_started()
        return pusher

    def ensure_started(self) -> None:
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # started later, from the first async call
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        warned = -WARN_EVERY_S
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.recorder.refresh_gauges()
                await self.push()
            except NoHubYet:  # the ingress creates it; everything is sent once it exists
                continue
            except Exception as exc:  # noqa: BLE001 - metrics never take a replica down
                if time.monotonic() - warned >= WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning("polyhead metrics: push to the hub failed (retrying every %s s): %s: %s",
                                self.interval_s, type(exc).__name__, exc)

    async def push(self, timeout_s: float = 5.0) -> None:
        """Send what changed since the last accepted push (everything after a removal or a hub restart)."""
        async with self._lock:
            values = self.recorder.values()
            full = self._epoch is None or any(k not in values for k in self._sent)
            changes = values if full else {k: v for k, v in values.items() if self._sent.get(k) != v}
            if not changes and not full and time.monotonic() - self._last_push < HEARTBEAT_S:
                return
            hub = await self._hub_handle()
            try:
                self._seq += 1
                epoch, accepted, forgotten, late = await asyncio.wait_for(hub.push.remote(
                    self.source, self.deployment, self._epoch, self._seq, changes, full, self.ttl_s,
                    self._forgotten_seen), timeout_s)
                if not accepted:  # a new hub: send everything
                    self._seq += 1
                    epoch, accepted, forgotten, late = await asyncio.wait_for(hub.push.remote(
                        self.source, self.deployment, epoch, self._seq, values, True, self.ttl_s, 0), timeout_s)
            except ray.exceptions.RayActorError:
                self._hub, self._epoch = None, None  # gone: the next push creates a new one and sends all
                raise
            if epoch != self._epoch:  # another hub than last time: it counted its deletions from the first
                self._forgotten_seen = 0
            self._epoch, self._sent, self._last_push = epoch, values, time.monotonic()
            self._forgotten_seen += len(forgotten)
            for name in [*forgotten, *late]:  # deleted (late: rows answered after): the next push sends all, without
                self.recorder.forget_adapter(name)

    async def _hub_handle(self):
        if self._hub is None:
            self._hub = await asyncio.to_thread(hub_handle, self.app_name, self.deployment != MODEL_DEPLOYMENT)
        return self._hub

    async def forget_adapter(self, name: str) -> None:
        """Drop adapter `name`'s series here and in the hub (other replicas' copies included)."""
        self.recorder.forget_adapter(name)
        hub = await self._hub_handle()
        await asyncio.wait_for(hub.forget_adapter.remote(name), 5.0)

    async def remember_adapter(self, name: str) -> None:
        """`name` was registered (again): its series count at once, even just after a delete (best effort)."""
        try:
            hub = await self._hub_handle()
            await asyncio.wait_for(hub.remember_adapter.remote(name), 5.0)
        except Exception:  # noqa: BLE001 - metrics never fail a registration; the grace period ends anyway
            pass

    async def exposition(self, timeout_s: float = 5.0) -> bytes:
        """Every replica's series, combined by the hub (this replica's latest values pushed first)."""
        await self.push(timeout_s)
        hub = await self._hub_handle()
        return await asyncio.wait_for(hub.exposition.remote(), timeout_s)


class NoHubYet(LookupError):
    """A model replica looked for the hub before any ingress replica created it."""


def hub_handle(app_name: str, create: bool = True):
    """The app's hub, created if it does not exist yet and `create` (blocking: call it off the event loop).

    Only ingress replicas and gates create it, on their own node: an actor dies with the process that created it
    (and with its node), and on a cluster the ingress stays on the head (ServeConfig.ingress_resources) while a
    worker node and its model replicas may go. A hub created by a model replica went with it, and took every
    stopped replica's counts with it: /metrics sums went down after a node loss."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not create:
        try:
            return ray.get_actor(hub_name(app_name))
        except ValueError:
            raise NoHubYet(hub_name(app_name)) from None
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # soft: anywhere
    return MetricsHubActor.options(name=hub_name(app_name), get_if_exists=True, scheduling_strategy=here).remote()
