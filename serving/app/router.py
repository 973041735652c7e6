"""Ray Serve request router for model replicas: adapter affinity (serving/app/affinity.py) on what each replica
reports through `ModelServer.record_routing_stats`. Opt-in: ServeConfig.request_router = "affinity".

Each model replica reports {"resident": [adapter refs], "queued_rows": int, "capacity_rows": int}, polled by Serve's
controller every `request_routing_stats_period_s`; a replica not polled yet counts as empty with the configured
capacity. An `infer_rows` call is routed by its rows' adapter (`request_key`); every other call (info,
describe_adapter, add_adapter, ...) and multi-adapter or base rows spread by load.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .affinity import AffinityPolicy, AffinityStats, ReplicaState, choose, homes, request_key

ROUTED_METHOD = "infer_rows"
DEFAULT_CAPACITY_ROWS = 64


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
        return [[by_id[i] for i in rank] for rank in choose(key, states, self.policy)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._ensure_state()
        chosen = self._last.get(replica_id.unique_id)
        if chosen is None:
            return
        key, _ = routing_inputs((), _rows(pending_request), self.capacity_rows)
        self.stats.record(key, chosen, homes(key, list(self._last.values()), self.policy) if key else ())

