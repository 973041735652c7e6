"""Ray Serve request router for model replicas: adapter affinity (serving/app/affinity.py) on what each replica
reports through `ModelServer.record_routing_stats`. Opt-in: ServeConfig.request_router = "affinity".

Each model replica reports {"resident": [adapter refs], "queued_rows": int, "capacity_rows": int}, polled by Serve's
controller every `request_routing_stats_period_s`; a replica not polled yet counts as empty with the configured
capacity. An `infer_rows` call is routed by its rows' adapter (`request_key`); every other call (info,
describe_adapter, add_adapter, ...) and multi-adapter or base rows spread by load.
"""
from __future__ import annotations

import collections
import time
import weakref
from typing import Any, Iterable, List, Mapping, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .affinity import AffinityPolicy, AffinityStats, ReplicaState, choose, homes, request_key

ROUTED_METHOD = "infer_rows"
DEFAULT_CAPACITY_ROWS = 64
OUTCOMES = ("hit", "miss", "spill", "unpinned")
_ROUTERS: weakref.WeakSet = weakref.WeakSet()  # this process's affinity routers (one per handle)


def routing_inputs(stats: Iterable[tuple[str, Mapping[str, Any] | None]], rows: Any,
                   capacity_rows: int) -> tuple[str | None, list[ReplicaState]]:
    """(the request's adapter key, a ReplicaState per (replica id, routing stats)). `rows` is infer_rows's argument
    (a list of row dicts), or None for any other call; missing or empty stats: nothing resident, nothing queued."""
    states = []
    for replica_id, s in stats:
        s = s or {}
        states.append(ReplicaState(replica_id, frozenset(s.get("resident") or ()),
                                   max(0, int(s.get("queued_rows") or 0)),
                                   max(1, int(s.get("capacity_rows") or capacity_rows))))
    key = None
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        key = request_key([r.get("adapter") for r in rows], frozenset())  # head-only adapters: unknown here
    return key, states


def routing_key(rows: list) -> str | None:
    """The adapter an infer_rows call of these rows is routed by (the ingress's coalescer groups calls by it)."""
    key, _ = routing_inputs((), rows, DEFAULT_CAPACITY_ROWS)
    return key


def _rows(pending_request: Optional[PendingRequest]) -> Any:
    if pending_request is None or pending_request.metadata.call_method != ROUTED_METHOD or not pending_request.args:
        return None
    return pending_request.args[0]


class AffinityRouter(RequestRouter):
    """Ranks from `affinity.choose`: replicas holding the adapter, then its homes, then spill-over along its ring.
    No FIFOMixin: a chosen replica goes to the request it was chosen for, not to the oldest one waiting."""

    def initialize_state(self, homes: int = 2, capacity_rows: int = DEFAULT_CAPACITY_ROWS, **kwargs):
        self.policy = AffinityPolicy(homes=homes, **kwargs)
        self.capacity_rows = capacity_rows
        self.stats = AffinityStats()  # in this (ingress) process: what it routed
        self._last: dict[str, ReplicaState] = {}
        self._last_at = 0.0  # when _last was seen (several handles: the newest one says which replicas run)
        # Serve cloudpickles this class by value: its methods see a copy of this module's globals, not the
        # module process_stats reads. The imported module is the one.
        from serving.app import router as module

        module._ROUTERS.add(self)

    def _ensure_state(self) -> None:
        if not hasattr(self, "policy"):  # initialize_state not called (no kwargs)
            self.initialize_state()

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        self._ensure_state()
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key, states = routing_inputs(((i, r.routing_stats) for i, r in by_id.items()), _rows(pending_request),
                                     self.capacity_rows)
        self._last = {s.replica_id: s for s in states}
        self._last_at = time.monotonic()
        return [[by_id[i] for i in rank] for rank in choose(key, states, self.policy)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._ensure_state()
        chosen = self._last.get(replica_id.unique_id)
        if chosen is None:
            return
        key, _ = routing_inputs((), _rows(pending_request), self.capacity_rows)
        self.stats.record(key, chosen, homes(key, list(self._last.values()), self.policy) if key else ())



def process_stats() -> tuple[dict[str, int], dict[int, int]]:
    """Over this process's affinity routers: calls routed by outcome (OUTCOMES), and {k: adapter versions
    resident on k replicas} from the replicas' last routing stats ({} without an affinity router)."""
    routed = dict.fromkeys(OUTCOMES, 0)
    routers = list(_ROUTERS)
    for router in routers:
        s = router.stats
        routed["hit"] += s.hits
        routed["miss"] += s.misses - s.spills
        routed["spill"] += s.spills
        routed["unpinned"] += s.unpinned
    resident: dict[str, set[str]] = {}
    newest = max(routers, key=lambda r: r._last_at, default=None)  # another handle's view may predate a replica's loss
    for state in newest._last.values() if newest is not None else ():
        for ref in state.resident:
            if "@" in ref:  # a store version (its bare name is reported too); static adapters: no homes count
                resident.setdefault(ref, set()).add(state.replica_id)
    return routed, dict(collections.Counter(len(r) for r in resident.values()))


class RouterMetrics:
    """A Recorder collector (Recorder.collectors): the ingress's affinity_routed counter and adapter_homes gauge
    follow process_stats()."""

    def __init__(self):
        self._counted = dict.fromkeys(OUTCOMES, 0)
        self._homes: set[int] = set()

    def __call__(self, recorder) -> None:
        routed, homes = process_stats()
        if not _ROUTERS:
            return
        for outcome, n in routed.items():
            recorder.affinity_routed.labels(outcome).inc(max(0, n - self._counted[outcome]))
            self._counted[outcome] = max(n, self._counted[outcome])
        for k in self._homes - homes.keys():
            recorder.adapter_homes.labels(str(k)).set(0)
        for k, n in homes.items():
            recorder.adapter_homes.labels(str(k)).set(n)
        self._homes |= homes.keys()
