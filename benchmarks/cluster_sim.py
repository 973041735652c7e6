"""cluster_sim: a discrete-event simulation of model replicas behind four request routers (no Ray, no torch).

polyhead's router is the real code: `serving.app.affinity.choose` ranks the replicas for every request. Beside it,
re-implementations of Ray Serve's routers (checked against Ray 2.60, see shared/notes "Topic 2"):
- `pow2`: the default PowerOfTwoChoicesRequestRouter: two random replicas, the one with fewer ongoing requests.
- `multiplexed`: MultiplexMixin + power of two, the model id being the adapter: two random replicas among those
  holding it, else among those with the fewest models, else among all (Ray waits up to 1 s at each step; here the
  steps are taken at once when the picks are full).
- `consistent_hash`: ConsistentHashRouter keyed by the adapter (a ring with 100 virtual nodes; polyhead's SHA-256
  ring stands in for MurmurHash3): the ring's replica, the next `num_fallback_replicas` = 2 only when it is at
  max ongoing, else the request waits for one of the three. It ignores load.

Model. N replicas, each with S LRU adapter slots, admitting at most `max_ongoing` rows (Ray's
max_ongoing_requests; beyond that a request waits in the router, FIFO) and running one batch at a time (continuous
batching: when a batch ends the next takes up to `max_batch` rows from its queue). A batch of `rows` rows with
`d` distinct adapters of which `m` are not resident takes `a + b*rows + c*d + L*m`, loading the `m` first (LRU
eviction). Requests are one row each, Poisson arrivals, adapter ~ Zipf(alpha) over A adapters. The router sees
every replica's state at once (queue and slots; in Ray they come from routing stats up to a period late).

Cost profiles: `measured` (default) is derived at start from benchmarks/results/engine_throughput.json (the
engine on this project's CPU machine, all-MiniLM-L6-v2, 32-token rows): b = base forward time per row (mean of
shapes a and b), a = 0 (a two-point fit gives a negative intercept: the per-batch overhead is below the noise),
c = (polyhead - base) / adapters in shape a (64 rows, 64 adapters; shape b came out negative), L = the median
adapter load time (mean of shapes a and b). `assumed` is a=4 ms, b=0.6 ms, c=0.3 ms, L=8 ms: GPU-like figures
from the task brief, measured nowhere in this repository; reported beside the measured ones for the targets.

Metrics per router, over the requests arriving after the warm-up: slot hit rate (1 - loads/rows, the issue's
definition; beside it the ideal: the share of requests for the N x S most popular adapters), adapter loads/s,
load imbalance (max / mean busy time of the replicas), throughput (rows/s completed) and p99 latency. Saturation
is the highest arrival rate a router keeps up with (>= 98 % of the window's arrivals completed within it and the
router's own queue under N x max_batch rows), found by a short search from an all-hit bound.

Run: `python benchmarks/cluster_sim.py` (full sweep, a few minutes), `--quick` (fewer requests, for a look).
Writes benchmarks/results/cluster_sim.{json,md,png}.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import platform
import random
import sys
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serving.app.affinity import AffinityPolicy, ReplicaState, choose, ring_order  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROUTERS = ("pow2", "multiplexed", "consistent_hash", "polyhead")


@dataclass(frozen=True)
class Cost:
    a_ms: float  # per batch
    b_ms: float  # per row
    c_ms: float  # per distinct adapter in the batch
    L_ms: float  # per adapter load (miss)
    source: str

    def batch_s(self, rows: int, distinct: int, misses: int) -> float:
        return (self.a_ms + self.b_ms * rows + self.c_ms * distinct + self.L_ms * misses) / 1000.0


ASSUMED = Cost(4.0, 0.6, 0.3, 8.0, "assumed: the task brief's GPU-like figures, not measured in this repository")
MEASURED_FALLBACK = Cost(0.0, 4.59, 0.88, 14.97, "benchmarks/results/engine_throughput.json (2026-11-29), constants")


def measured_cost(path: Path = RESULTS / "engine_throughput.json") -> Cost:
    """The cost model from the engine benchmark's JSON (see the module docstring for the derivation)."""
    try:
        d = json.loads(path.read_text())
        shapes = d["config"]["shapes"]
        med = {(s["variant"], s["shape"]): s["median_s"] for s in d["summary"]}
        b = float(np.mean([med["base", k] / shapes[k]["rows"] for k in ("a", "b")]))
        c = (med["polyhead", "a"] - med["base", "a"]) / shapes["a"]["adapters"]
        L = float(np.mean([d["polyhead"][k]["load_median_ms"] for k in ("a", "b")])) / 1000.0
        return Cost(0.0, 1000 * b, 1000 * max(c, 0.0), 1000 * L,
                    f"{path.relative_to(ROOT)} ({d['environment']['date'][:10]}, {d['environment']['base']}, "
                    f"{d['environment']['torch_threads']} threads)")
    except (OSError, KeyError, ValueError) as exc:
        print(f"engine_throughput.json unusable ({exc}); using its recorded constants")
        return MEASURED_FALLBACK


@dataclass(frozen=True)
class Setup:
    replicas: int
    adapters: int
    alpha: float
    slots: int = 64
    max_batch: int = 32
    max_ongoing: int = 64  # rows admitted per replica (Ray's max_ongoing_requests; one row per request)
    policy: AffinityPolicy = AffinityPolicy()


def zipf_cdf(adapters: int, alpha: float) -> np.ndarray:
    w = np.arange(1, adapters + 1, dtype=np.float64) ** -alpha
    return np.cumsum(w) / w.sum()


def ideal_hit(s: Setup) -> float:
    return float(zipf_cdf(s.adapters, s.alpha)[min(s.replicas * s.slots, s.adapters) - 1])


class Replica:
    __slots__ = ("idx", "rid", "lru", "queue", "running", "busy_until", "busy", "state", "dirty")

    def __init__(self, idx: int, capacity_rows: int):
        self.idx, self.rid = idx, f"r{idx}"
        self.lru: OrderedDict[int, None] = OrderedDict()  # adapter -> None, least recently used first
        self.queue: deque[int] = deque()  # request ids waiting here
        self.running = 0  # rows in the running batch
        self.busy = 0.0  # seconds busy inside the window
        self.state = ReplicaState(self.rid, frozenset(), 0, capacity_rows)
        self.dirty = False  # resident set changed since `state` was made

    @property
    def ongoing(self) -> int:
        return len(self.queue) + self.running


def simulate(s: Setup, router: str, rate: float, n_req: int, warm: float, cost: Cost, seed: int) -> dict:
    """One run: n_req Poisson arrivals at `rate` rows/s; metrics over requests arriving after the first warm share."""
    rs = np.random.default_rng(seed)
    t_arr = np.cumsum(rs.exponential(1.0 / rate, n_req))
    ad = np.searchsorted(zipf_cdf(s.adapters, s.alpha), rs.random(n_req)).astype(np.int64)
    ad = np.minimum(ad, s.adapters - 1)
    names = [f"adapter-{i}" for i in range(s.adapters)]
    rng = random.Random(seed)
    t_list, a_list = t_arr.tolist(), ad.tolist()
    done = np.full(n_req, np.nan)
    i0 = int(n_req * warm)
    w0, w1 = t_list[i0], t_list[-1]
    reps = [Replica(i, 2 * s.max_batch) for i in range(s.replicas)]
    ids = [r.rid for r in reps]
    holders: dict[int, set[int]] = {}  # adapter -> replicas whose slots hold it (multiplexed ids)
    pending: deque[int] = deque()  # router queue (every replica full)
    ch_pending: list[deque] = [deque() for _ in reps]  # consistent_hash: per candidate replica, [req, taken]
    ch_cands: dict[int, list[int]] = {}
    cap, B = s.max_ongoing, s.max_batch
    rows_w = loads_w = batches_w = distinct_w = done_w = 0
    heap: list[tuple[float, int]] = []
    n = s.replicas

    states = [r.state for r in reps]  # what polyhead's router sees, refreshed where a replica changes

    def refresh(r: Replica) -> None:
        if router != "polyhead":
            return
        st = r.state
        if r.dirty:
            st = ReplicaState(r.rid, frozenset(names[k] for k in r.lru), r.ongoing, st.capacity_rows)
            r.dirty = False
        elif st.queued_rows != r.ongoing:
            st = ReplicaState(r.rid, st.resident, r.ongoing, st.capacity_rows)
        r.state = states[r.idx] = st

    def pow2(pool) -> Replica | None:
        picks = rng.sample(pool, 2) if len(pool) > 1 else list(pool)
        ok = [r for r in picks if r.ongoing < cap]
        if ok:
            return min(ok, key=lambda r: r.ongoing)
        return None

    def route(req: int) -> Replica | None:
        a = a_list[req]
        if router == "pow2":
            r = pow2(reps)
            return r or _least_loaded_open()
        if router == "multiplexed":
            hold = holders.get(a)
            r = pow2([reps[i] for i in hold]) if hold else None
            if r is None:  # fewest models: every replica once their slots fill
                fewest = min(len(x.lru) for x in reps)
                r = pow2([x for x in reps if len(x.lru) == fewest])
            return r or _least_loaded_open()
        if router == "consistent_hash":
            cands = ch_cands.get(a)
            if cands is None:
                cands = ch_cands[a] = [int(x[1:]) for x in ring_order(names[a], ids, 100)[:3]]
            for i in cands:
                if reps[i].ongoing < cap:
                    return reps[i]
            item = [req, False]
            for i in cands:
                ch_pending[i].append(item)
            return None
        ranks = choose(names[a], states, s.policy, rng)
        for group in ranks:
            for rid in group:
                r = reps[int(rid[1:])]
                if r.ongoing < cap:
                    return r
        return None

    def _least_loaded_open() -> Replica | None:
        r = min(reps, key=lambda x: x.ongoing)
        return r if r.ongoing < cap else None

    def start(r: Replica, now: float) -> None:
        nonlocal rows_w, loads_w, batches_w, distinct_w
        batch = [r.queue.popleft() for _ in range(min(B, len(r.queue)))]
        seen = {a_list[q] for q in batch}
        misses = 0
        for a in seen:
            if a in r.lru:
                r.lru.move_to_end(a)
            else:
                misses += 1
                r.lru[a] = None
                holders.setdefault(a, set()).add(r.idx)
                if len(r.lru) > s.slots:
                    old, _ = r.lru.popitem(last=False)
                    holders[old].discard(r.idx)
        if misses:
            r.dirty = True
        dur = cost.batch_s(len(batch), len(seen), misses)
        r.running = len(batch)
        end = now + dur
        if w0 <= now < w1:
            rows_w += len(batch)
            loads_w += misses
            batches_w += 1
            distinct_w += len(seen)
        r.busy += max(0.0, min(end, w1) - max(now, w0))
        heapq.heappush(heap, (end, r.idx, batch))

    def admit(r: Replica, req: int, now: float) -> None:
        r.queue.append(req)
        if r.running == 0:
            start(r, now)
        refresh(r)

    i = backlog = 0
    while i < n_req or heap:
        if i < n_req and (not heap or t_list[i] <= heap[0][0]):
            now = t_list[i]
            r = route(i)
            if r is not None:
                admit(r, i, now)
            elif router != "consistent_hash":
                pending.append(i)
            i += 1
            if i == n_req:
                backlog = len(pending) + sum(1 for dq in ch_pending for item in dq if not item[1]) // 1
            continue
        now, idx, batch = heapq.heappop(heap)
        r = reps[idx]
        r.running = 0
        for q in batch:
            done[q] = now
        if w0 <= now < w1:
            done_w += len(batch)
        # freed capacity: the router's waiting requests first (they can only go here: every other replica is full)
        if router == "consistent_hash":
            dq = ch_pending[idx]
            while dq and r.ongoing < cap:
                item = dq.popleft()
                if not item[1]:
                    item[1] = True
                    r.queue.append(item[0])
        else:
            while pending and r.ongoing < cap:
                r.queue.append(pending.popleft())
        if r.queue:
            start(r, now)
        refresh(r)

    window = w1 - w0
    arrived = n_req - i0
    lat = (done[i0:] - t_arr[i0:]) * 1000.0
    busy = np.array([r.busy for r in reps])
    return {
        "rate": rate, "rows_window": arrived, "throughput": done_w / window,
        "kept_up": bool(done_w >= 0.98 * arrived and backlog <= n * B), "router_backlog": backlog,
        "hit_rate": 1.0 - loads_w / rows_w if rows_w else None,
        "loads_per_s": loads_w / window,
        "imbalance": float(busy.max() / busy.mean()) if busy.mean() > 0 else None,
        "util_mean": float(busy.mean() / window), "util_max": float(busy.max() / window),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": rows_w / batches_w if batches_w else None,
        "adapters_per_batch": distinct_w / batches_w if batches_w else None,
    }
