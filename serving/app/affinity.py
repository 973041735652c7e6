"""Adapter affinity: which model replicas a request should go to, most preferred first. Pure: no Ray, no torch.

The spec (pinned by golden vectors in tests/test_affinity.py; every router process and every future version of
polyhead ranks the same way):

- **Hash.** `h(s) = int.from_bytes(SHA-256(utf8(s))[:8], "big")` (never Python `hash()`, which differs between
  processes).
- **Ring.** Replica `r` owns `virtual_nodes` points `h(f"{r}#{i}")`, i = 0 .. virtual_nodes - 1. An adapter key `k`
  starts at `h(k)`; its ring order is the distinct replicas met going clockwise from there (the first point at or
  after `h(k)`, wrapping; equal points ordered by replica id). A replica joining or leaving moves only the keys
  whose walk meets its points first: about 1/N of them.
- **Homes.** The first `homes` (K) replicas of the ring order.
- **Saturated.** `queued_rows >= capacity_rows`, or `queued_rows > load_factor * mean(queued_rows) + slack_rows`
  over the replicas ranked (bounded-load consistent hashing). The slack (16 rows, half a 32-row batch) is there
  because rows queued behind a running batch join the next one almost for free, while a spill costs an adapter
  load: with `+ 1` (slack_rows=1) benchmarks/cluster_sim.py spills early, and the slot hit rate at saturation
  drops from 0.676 to 0.648 (16 replicas, 10,000 adapters, Zipf 1.0; benchmarks/results/cluster_sim.md,
  "Policy investigation"; saturation throughput moved less than that search resolves, 7 %).
- **Ranks** (`choose`), for an adapter: (1) replicas where it is resident and not saturated, least loaded first;
  (2) its homes that are not saturated, least loaded first; (3) spill-over: each further replica along its ring
  order that is not saturated, one rank each, so a hot adapter spreads to one more replica at a time and only while
  those before are saturated; (4) the rest (all saturated), least loaded first. For no adapter (base rows, a
  multi-adapter or head-only request): two replicas drawn at random, the less loaded first, then the other, then
  the rest least loaded first. "Least loaded" is fewest `queued_rows`, ties by replica id. Every replica appears
  exactly once, so the answer is never empty when replicas exist.

Ranks are what Ray Serve's `RequestRouter.choose_replicas` returns: the router takes the first rank with a replica
below `max_ongoing_requests` (within a rank, the one with the shortest queue).
"""
from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence


@dataclass(frozen=True)
class ReplicaState:
    """What the router knows of one model replica (from its `record_routing_stats`)."""
    replica_id: str
    resident: frozenset[str]  # adapter keys in its slots
    queued_rows: int  # rows waiting + running there
    capacity_rows: int  # rows at which it is saturated (e.g. 2 x max_batch_size)
    node_id: str = ""

    def __post_init__(self):
        if not self.replica_id:
            raise ValueError("replica_id must be a non-empty string")
        if self.queued_rows < 0:
            raise ValueError(f"queued_rows must be >= 0, got {self.queued_rows}")
        if self.capacity_rows < 1:
            raise ValueError(f"capacity_rows must be >= 1, got {self.capacity_rows}")


@dataclass(frozen=True)
class AffinityPolicy:
    homes: int = 2  # K: home replicas per adapter while they are not saturated
    virtual_nodes: int = 64  # ring points per replica
    load_factor: float = 1.25  # saturated above load_factor x the mean queued rows + slack_rows
    slack_rows: int = 16  # rows a replica may hold above the bound: about half a batch queues at no cost

    def __post_init__(self):
        if self.homes < 1:
            raise ValueError(f"homes must be >= 1, got {self.homes}")
        if self.virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {self.virtual_nodes}")
        if self.slack_rows < 0:
            raise ValueError(f"slack_rows must be >= 0, got {self.slack_rows}")
        if not self.load_factor >= 1.0:
            raise ValueError(f"load_factor must be >= 1, got {self.load_factor}")


def key_hash(s: str) -> int:
    """The ring position of a string: the first 8 bytes of its SHA-256, big-endian."""
    return int.from_bytes(hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest()[:8], "big")


@lru_cache(maxsize=64)
def _ring(replica_ids: tuple[str, ...], virtual_nodes: int) -> tuple[list[int], list[str]]:
    """(sorted point positions, the replica owning each point) for a sorted tuple of distinct replica ids."""
    points = sorted((key_hash(f"{r}#{i}"), r) for r in replica_ids for i in range(virtual_nodes))
    return [p for p, _ in points], [r for _, r in points]


@lru_cache(maxsize=1 << 16)
def _ring_order(adapter: str, replica_ids: tuple[str, ...], virtual_nodes: int) -> tuple[str, ...]:
    positions, owners = _ring(replica_ids, virtual_nodes)
    n, start = len(positions), bisect.bisect_left(positions, key_hash(adapter))
    order: list[str] = []
    seen: set[str] = set()
    for j in range(n):
        r = owners[(start + j) % n]
        if r not in seen:
            seen.add(r)
            order.append(r)
            if len(order) == len(replica_ids):
                break
    return tuple(order)


def _ids(replicas: Iterable[ReplicaState | str]) -> tuple[str, ...]:
    return _sorted_ids(tuple(r if isinstance(r, str) else r.replica_id for r in replicas))


@lru_cache(maxsize=256)
def _sorted_ids(ids: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate replica ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    return tuple(sorted(ids))


def ring_order(adapter: str, replicas: Sequence[ReplicaState | str], virtual_nodes: int = 64) -> list[str]:
    """Every replica id, in the adapter's clockwise order on the ring (the spec's "ring order")."""
    ids = _ids(replicas)
    return list(_ring_order(adapter, ids, virtual_nodes)) if ids else []


def homes(adapter: str, replicas: Sequence[ReplicaState | str],
          policy: AffinityPolicy = AffinityPolicy()) -> list[str]:
    """The adapter's home replicas: the first K distinct replicas clockwise from h(adapter)."""
    return ring_order(adapter, replicas, policy.virtual_nodes)[:policy.homes]


def saturated(replica: ReplicaState, mean_rows: float, policy: AffinityPolicy) -> bool:
    return (replica.queued_rows >= replica.capacity_rows
            or replica.queued_rows > policy.load_factor * mean_rows + policy.slack_rows)


def _by_load(replicas: Iterable[ReplicaState]) -> list[str]:
    return [r.replica_id for r in sorted(replicas, key=lambda r: (r.queued_rows, r.replica_id))]


def choose(adapter: str | None, replicas: Sequence[ReplicaState], policy: AffinityPolicy = AffinityPolicy(),
           rng: random.Random | None = None) -> list[list[str]]:
    """Ranked groups of replica ids, most preferred first (see the module's spec). Empty only without replicas."""
    if not replicas:
        return []
    ids = _sorted_ids(tuple([r.replica_id for r in replicas]))
    if adapter is None:
        return _unpinned(replicas, rng or random)
    bound = policy.load_factor * sum([r.queued_rows for r in replicas]) / len(replicas) + policy.slack_rows
    by_id: dict[str, ReplicaState] = {}
    open_: set[str] = set()  # not saturated (saturated(), inlined: this runs for every request)
    resident: list[ReplicaState] = []
    for r in replicas:
        by_id[r.replica_id] = r
        if r.queued_rows < r.capacity_rows and r.queued_rows <= bound:
            open_.add(r.replica_id)
            if adapter in r.resident:
                resident.append(r)
    order = _ring_order(adapter, ids, policy.virtual_nodes)
    ranks: list[list[str]] = []
    placed: set[str] = set()
    if resident:
        ranks.append(_by_load(resident))
        placed.update(ranks[-1])
    home = [by_id[h] for h in order[:policy.homes] if h in open_ and h not in placed]
    if home:
        ranks.append(_by_load(home))
        placed.update(ranks[-1])
    spill = [r for r in order[policy.homes:] if r in open_ and r not in placed]
    ranks += [[r] for r in spill]
    placed.update(spill)
    if len(placed) < len(replicas):
        ranks.append(_by_load([r for r in replicas if r.replica_id not in placed]))
    return ranks


def _unpinned(replicas: Sequence[ReplicaState], rng) -> list[list[str]]:
    """Power of two choices: two random replicas, the less loaded first, then the rest by load."""
    if len(replicas) == 1:
        return [[replicas[0].replica_id]]
    a, b = rng.sample(list(replicas), 2)
    if b.queued_rows < a.queued_rows:
        a, b = b, a
    rest = _by_load(r for r in replicas if r is not a and r is not b)
    return [[a.replica_id], [b.replica_id]] + ([rest] if rest else [])


def request_key(adapters: Sequence[str | None], head_only: set[str] | frozenset[str]) -> str | None:
    """The adapter a request is routed by: the one adapter with a body among its rows, else None.

    None (never pinned) for base rows only, head-only adapters only (they share the base forward), or several
    adapters with bodies (a multi-adapter request has no one home)."""
    bodies = {a for a in adapters if a is not None and a not in head_only}
    return next(iter(bodies)) if len(bodies) == 1 else None


@dataclass
class AffinityStats:
    """What a router counts: hits/misses (routed where the adapter was resident or not), spills (routed to neither
    a home nor a replica holding the adapter) and the replicas each adapter was sent to."""
    hits: int = 0
    misses: int = 0
    spills: int = 0
    unpinned: int = 0  # requests routed by load alone (adapter None)
    replicas_by_adapter: dict[str, set[str]] = field(default_factory=dict)

    def record(self, adapter: str | None, chosen: ReplicaState, home_ids: Sequence[str]) -> None:
        if adapter is None:
            self.unpinned += 1
            return
        resident = adapter in chosen.resident
        self.hits += resident
        self.misses += not resident
        self.spills += not resident and chosen.replica_id not in home_ids
        self.replicas_by_adapter.setdefault(adapter, set()).add(chosen.replica_id)

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    def homes_per_adapter(self) -> dict[str, int]:
        return {a: len(rs) for a, rs in self.replicas_by_adapter.items()}
