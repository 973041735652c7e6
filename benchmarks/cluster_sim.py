"""cluster_sim: a discrete-event simulation of model replicas behind four request routers (no Ray, no torch).

polyhead's router is the real code: `serving.app.affinity.choose` ranks the replicas for every request. Beside it,
re-implementations of Ray Serve's routers (checked against Ray 2.60, see shared/notes "Topic 2"):
- `pow2`: the default PowerOfTwoChoicesRequestRouter: two random replicas, the one with fewer ongoing requests
  (when both are full, the least loaded replica with room: Ray retries new pairs with a backoff).
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
load imbalance (max / mean busy time of the replicas), throughput (rows/s completed over the window's second
half) and p99 latency. Saturation is the highest arrival rate a router keeps up with (over the window's second
half, completions >= 98 % of arrivals, and the router's own queue under N x max_batch rows), found within 7 % by a
short search (`saturation`). Beside each hit rate also the LRU bound: Che's approximation of one LRU cache of
N x S slots, which no router can beat with LRU slots (rows of one adapter sharing a batch, and so a load, aside).

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
    i0 = int(n_req * warm)
    ramp = np.minimum(1.0, 0.25 + 0.75 * np.arange(n_req) / max(i0, 1))  # warm-up: the rate ramps from 1/4
    t_arr = np.cumsum(rs.exponential(1.0, n_req) / (rate * ramp))
    ad = np.searchsorted(zipf_cdf(s.adapters, s.alpha), rs.random(n_req)).astype(np.int64)
    ad = np.minimum(ad, s.adapters - 1)
    names = [f"adapter-{i}" for i in range(s.adapters)]
    rng = random.Random(seed)
    t_list, a_list = t_arr.tolist(), ad.tolist()
    done = np.full(n_req, np.nan)
    w0, w1 = t_list[i0], t_list[-1]
    reps = [Replica(i, 2 * s.max_batch) for i in range(s.replicas)]
    ids = [r.rid for r in reps]
    holders: dict[int, set[int]] = {}  # adapter -> replicas whose slots hold it (multiplexed ids)
    pending: deque[int] = deque()  # router queue (every replica full)
    ch_pending: list[deque] = [deque() for _ in reps]  # consistent_hash: per candidate replica, [req, taken]
    ch_cands: dict[int, list[int]] = {}
    cap, B = s.max_ongoing, s.max_batch
    rows_w = loads_w = batches_w = distinct_w = done_w = done_late = 0
    im = (i0 + n_req) // 2
    wm = t_list[im]  # the window's second half decides whether the router kept up (queues may fill in the first)
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
                backlog = len(pending) + len({item[0] for dq in ch_pending for item in dq if not item[1]})
            continue
        now, idx, batch = heapq.heappop(heap)
        r = reps[idx]
        r.running = 0
        for q in batch:
            done[q] = now
        if w0 <= now < w1:
            done_w += len(batch)
            if now >= wm:
                done_late += len(batch)
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
        "rate": rate, "rows_window": arrived, "throughput": done_late / (w1 - wm),
        "kept_up": bool(done_late >= 0.98 * (n_req - im) and backlog <= n * B), "router_backlog": backlog,
        "hit_rate": 1.0 - loads_w / rows_w if rows_w else None,
        "loads_per_s": loads_w / window,
        "imbalance": float(busy.max() / busy.mean()) if busy.mean() > 0 else None,
        "util_mean": float(busy.mean() / window), "util_max": float(busy.max() / window),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": rows_w / batches_w if batches_w else None,
        "adapters_per_batch": distinct_w / batches_w if batches_w else None,
    }


# the search, the sweeps, the report ---------------------------------------------------------------

WARM = 0.4  # share of each run's requests before the measurement window (the rate ramps up meanwhile)
KEEP = ("rate", "throughput", "kept_up", "hit_rate", "loads_per_s", "imbalance", "p50_ms", "p99_ms", "util_mean",
        "mean_batch", "adapters_per_batch", "router_backlog")


def lru_bound(s: Setup) -> float:
    """Che's approximation of one LRU cache of N x S slots under the same Zipf stream (what LRU slots can reach)."""
    slots = s.replicas * s.slots
    if slots >= s.adapters:
        return 1.0
    p = np.diff(zipf_cdf(s.adapters, s.alpha), prepend=0.0)
    lo, hi = 1.0, 1e15  # characteristic time T: sum(1 - exp(-p T)) = slots
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if np.sum(-np.expm1(-p * mid)) < slots else (lo, mid)
    return float(np.sum(p * -np.expm1(-p * lo)))


def n_requests(s: Setup, scale: float) -> int:
    return int(scale * min(32_000, max(16_000, 1_000 * s.replicas)))


def saturation(s: Setup, router: str, cost: Cost, scale: float, seed: int, runs: int = 7) -> dict:
    """The highest arrival rate the router keeps up with, within 7 %: start at half the capacity that one-row
    batches at the LRU bound's hit rate would have; while it keeps up, go up (to rate / mean busy share, at least
    x 1.2); once a rate fails, bisect between the best kept-up rate and the lowest failed one."""
    lam = 0.5 * s.replicas / cost.batch_s(1, 1, 1 - lru_bound(s))
    best, fail, tried = None, math.inf, []
    for _ in range(runs):
        r = simulate(s, router, lam, n_requests(s, scale), WARM, cost, seed)
        tried.append({k: r[k] for k in KEEP})
        if r["kept_up"]:
            best = r if best is None or lam > best["rate"] else best
        else:
            fail = min(fail, lam)
        if best is None:
            lam = 0.9 * min(r["throughput"], lam)  # overloaded: below what it completed
        elif fail == math.inf:
            lam = max(1.2 * lam, min(lam / max(r["util_mean"], 0.05), 2 * lam))
        elif fail <= 1.07 * best["rate"]:
            break
        else:
            lam = math.sqrt(best["rate"] * fail)
    if best is None:  # never kept up: report the last (overloaded) run
        best = r
    return {"router": router, **asdict_setup(s), "ideal": ideal_hit(s), "lru_bound": lru_bound(s),
            "saturation": {k: best[k] for k in KEEP}, "tried": tried}


def asdict_setup(s: Setup) -> dict:
    d = asdict(s)
    d["policy"] = asdict(s.policy)
    return d


def fmt(v, nd=2) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(rows: list[dict], ladder: bool = False) -> str:
    head = ("| replicas | adapters | alpha | router | rate rows/s | kept up | hit rate | ideal | LRU bound | "
            "loads/s | imbalance | throughput rows/s | p50 ms | p99 ms | mean batch |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        m = row["saturation"]
        out.append(f"| {row['replicas']} | {row['adapters']} | {row['alpha']} | {row['router']} | {m['rate']:.0f} | "
                   f"{'yes' if m['kept_up'] else 'NO'} | {fmt(m['hit_rate'], 3)} | {row['ideal']:.3f} | "
                   f"{row['lru_bound']:.3f} | {m['loads_per_s']:.0f} | {fmt(m['imbalance'])} | "
                   f"{m['throughput']:.0f} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} | {fmt(m['mean_batch'], 1)} |")
    return "\n".join(out)


def run_all(args) -> dict:
    t0, c0 = time.time(), time.process_time()
    measured = measured_cost()
    policy = AffinityPolicy(*args.policy) if args.policy else AffinityPolicy()
    scale, seed = (1 / 3 if args.quick else 1.0), args.seed
    head = Setup(16, 10_000, 1.0, policy=policy)
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"python": platform.python_version(), "platform": platform.platform()},
                    "settings": {"quick": args.quick, "seed": seed, "warm_share": WARM, "slots": head.slots,
                                 "max_batch": head.max_batch, "max_ongoing": head.max_ongoing,
                                 "polyhead_policy": asdict(policy), "requests_per_run": "min(32000, max(16000, "
                                 "1000 x replicas))" + (" / 3" if args.quick else "")},
                    "costs": {"measured": asdict(measured), "assumed": asdict(ASSUMED)}}

    def log(msg):
        print(f"[{time.time() - t0:5.0f} s, cpu {time.process_time() - c0:4.0f} s] {msg}", flush=True)

    # 1. the grid (measured costs): every router's saturation point
    grid = []
    for n in (8, 16, 64):
        for a in (1_000, 10_000):
            for alpha in (0.8, 1.0, 1.2):
                s = Setup(n, a, alpha, policy=policy)
                for router in ROUTERS:
                    grid.append(saturation(s, router, measured, scale, seed))
                log(f"grid N={n} A={a} alpha={alpha}: " + ", ".join(
                    f"{g['router']} {g['saturation']['throughput']:.0f}/s hit {fmt(g['saturation']['hit_rate'])}"
                    for g in grid[-len(ROUTERS):]))
    report["grid"] = grid

    # 2. the headline setup: every router at fractions of pow2's saturation rate (p99 at equal load)
    base_rate = cell(grid, "pow2", 16, 10_000, 1.0)["saturation"]["rate"]
    ladder = []
    for f in (0.5, 0.75, 1.0, 1.25, 1.5):
        for router in ROUTERS:
            r = simulate(head, router, f * base_rate, n_requests(head, scale), WARM, measured, seed)
            ladder.append({"router": router, **asdict_setup(head), "ideal": ideal_hit(head),
                           "lru_bound": lru_bound(head), "fraction_of_pow2_saturation": f,
                           "saturation": {k: r[k] for k in KEEP}})
    report["ladder"] = ladder
    log("ladder done")

    # 3. the same targets with the brief's assumed (GPU-like) costs
    assumed = {router: saturation(head, router, ASSUMED, scale, seed) for router in ROUTERS}
    for n in (8, 64):
        assumed[f"polyhead@{n}"] = saturation(Setup(n, 10_000, 1.0, policy=policy), "polyhead", ASSUMED, scale, seed)
    p2c_rate = assumed["pow2"]["saturation"]["rate"]
    assumed["polyhead_at_pow2_rate"] = simulate(head, "polyhead", p2c_rate, n_requests(head, scale), WARM,
                                                ASSUMED, seed)
    report["assumed_costs"] = assumed
    log("assumed-cost targets done")

    # 4. policy investigation (headline setup, measured costs)
    variants = [(2, 64, 1.25, 1), (1, 64, 1.25, 1), (3, 64, 1.25, 1), (2, 64, 1.5, 1), (2, 64, 2.0, 1),
                (2, 64, 1.25, 8), (2, 64, 1.25, 16), (2, 64, 1.5, 16), (1, 64, 1.5, 16), (2, 64, 1.25, 32)]
    if args.quick:
        variants = variants[:1] + variants[6:8]
    report["policies"] = [saturation(Setup(16, 10_000, 1.0, policy=AffinityPolicy(*v)), "polyhead", measured,
                                     scale, seed) for v in variants]
    log("policy investigation done")
    report["targets"] = targets(report)
    report["elapsed_s"] = time.time() - t0
    report["cpu_s"] = time.process_time() - c0
    return report


def cell(rows: list[dict], router: str, n: int, a: int, alpha: float) -> dict:
    return next(g for g in rows if g["router"] == router and g["replicas"] == n and g["adapters"] == a
                and g["alpha"] == alpha)


def targets(report: dict) -> list[dict]:
    """The issue's targets at alpha = 1, 10,000 adapters, 16 replicas, under both cost profiles."""
    out = []

    def add(costs, target, measured, bound, note=""):
        out.append({"costs": costs, "target": target, "measured": measured, "bound": bound,
                    "met": None if measured is None else measured >= bound, "note": note})

    grid, ladder = report["grid"], report["ladder"]
    poly, p2c = cell(grid, "polyhead", 16, 10_000, 1.0), cell(grid, "pow2", 16, 10_000, 1.0)
    at_rate = {r["router"]: r["saturation"] for r in ladder if r["fraction_of_pow2_saturation"] == 1.0}
    scale = (cell(grid, "polyhead", 64, 10_000, 1.0)["saturation"]["throughput"]
             / cell(grid, "polyhead", 8, 10_000, 1.0)["saturation"]["throughput"])
    a = report["assumed_costs"]
    for costs, ph, pw, p99s, up in (
            ("measured", poly, p2c, (at_rate["polyhead"]["p99_ms"], at_rate["pow2"]["p99_ms"]), scale),
            ("assumed", a["polyhead"], a["pow2"],
             (a["polyhead_at_pow2_rate"]["p99_ms"], a["pow2"]["saturation"]["p99_ms"]),
             a["polyhead@64"]["saturation"]["throughput"] / a["polyhead@8"]["saturation"]["throughput"])):
        hit = ph["saturation"]["hit_rate"]
        add(costs, "polyhead hit rate / ideal at saturation", hit / ph["ideal"], 0.9,
            f"hit {hit:.3f}, ideal {ph['ideal']:.3f}, LRU bound {ph['lru_bound']:.3f} "
            f"(= {ph['lru_bound'] / ph['ideal']:.3f} x ideal)")
        ratio = ph["saturation"]["throughput"] / pw["saturation"]["throughput"]
        add(costs, "polyhead / pow2 throughput at saturation", ratio, 1.5,
            f"{ph['saturation']['throughput']:.0f} vs {pw['saturation']['throughput']:.0f} rows/s")
        add(costs, "pow2 p99 / polyhead p99 at pow2's saturation rate", p99s[1] / p99s[0], 1.0,
            f"polyhead {p99s[0]:.0f} ms, pow2 {p99s[1]:.0f} ms")
        add(costs, "polyhead throughput 64 / 8 replicas", up, 0.8 * 64 / 8, "bound 0.8 x 8")
    return out


def targets_table(rows: list[dict]) -> str:
    out = ["| costs | target | measured | bound | met | note |", "|---|---|---|---|---|---|"]
    for t in rows:
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        out.append(f"| {t['costs']} | {t['target']} | {fmt(t['measured'])} | {fmt(float(t['bound']))} | {met} | "
                   f"{t['note']} |")
    return "\n".join(out)


def policy_table(rows: list[dict]) -> str:
    out = ["| K | virtual nodes | load_factor | slack_rows | saturation rows/s | hit rate | hit / ideal | loads/s "
           "| imbalance | p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m = r["policy"], r["saturation"]
        out.append(f"| {p['homes']} | {p['virtual_nodes']} | {p['load_factor']} | {p['slack_rows']} | "
                   f"{m['throughput']:.0f} | {fmt(m['hit_rate'], 3)} | {fmt(m['hit_rate'] / r['ideal'])} | "
                   f"{m['loads_per_s']:.0f} | {fmt(m['imbalance'])} | {m['p99_ms']:.0f} |")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = report["grid"]
    colors = {"pow2": "tab:gray", "multiplexed": "tab:red", "consistent_hash": "tab:green", "polyhead": "tab:blue"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, (xs, key, pick, xlabel) in enumerate((
            ((8, 16, 64), "replicas", lambda x: (x, 10_000, 1.0), "replicas (10,000 adapters, alpha 1.0)"),
            ((0.8, 1.0, 1.2), "alpha", lambda x: (16, 10_000, x), "Zipf alpha (16 replicas, 10,000 adapters)"))):
        for router, color in colors.items():
            rows = [cell(grid, router, *pick(x)) for x in xs]
            axes[0][col].plot(xs, [r["saturation"]["hit_rate"] for r in rows], "o-", color=color, label=router)
            axes[1][col].plot(xs, [r["saturation"]["throughput"] for r in rows], "o-", color=color, label=router)
        rows = [cell(grid, "polyhead", *pick(x)) for x in xs]
        axes[0][col].plot(xs, [r["ideal"] for r in rows], "k--", label="ideal (top N x S share)")
        axes[0][col].plot(xs, [r["lru_bound"] for r in rows], "k:", label="LRU bound (Che)")
        axes[0][col].set_ylabel("slot hit rate at saturation (1 - loads/rows)")
        axes[1][col].set_ylabel("throughput at saturation (rows/s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            if key == "replicas":
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
        if key == "replicas":
            axes[1][col].set_yscale("log")
    c = report["costs"]["measured"]
    fig.suptitle(f"cluster_sim: 64 LRU slots per replica, measured costs a={c['a_ms']:.1f} b={c['b_ms']:.2f} "
                 f"c={c['c_ms']:.2f} L={c['L_ms']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict, out: Path, name: str = "cluster_sim") -> None:
    s, c = report["settings"], report["costs"]
    m, a = c["measured"], c["assumed"]
    parts = [f"# cluster_sim ({report['date']})\n",
             f"Discrete-event simulation (benchmarks/cluster_sim.py; polyhead's router is "
             f"serving.app.affinity.choose itself, policy `{json.dumps(s['polyhead_policy'])}`): "
             f"{s['slots']} LRU slots, batches of up to {s['max_batch']} rows, {s['max_ongoing']} rows admitted "
             f"per replica, one-row Poisson requests, Zipf adapters; {s['requests_per_run']} requests per run, the "
             f"first {s['warm_share']:.0%} (a rate ramp) not measured. Batch time a + b x rows + c x distinct "
             f"adapters + L x loads. Measured costs from {m['source']}: a={m['a_ms']:.2f} b={m['b_ms']:.3f} "
             f"c={m['c_ms']:.3f} L={m['L_ms']:.2f} ms. Assumed costs ({a['source']}): a={a['a_ms']} b={a['b_ms']} "
             f"c={a['c_ms']} L={a['L_ms']} ms. Saturation = the highest arrival rate kept up with (completions >= "
             "98 % of arrivals over the window's second half, router queue < N x max_batch; found within 7 %); "
             "throughput = rows completed per second over that half. Hit rate = 1 - loads/rows; "
             "ideal = share of requests for the N x S most popular adapters; LRU bound = Che's approximation "
             "of one LRU cache of N x S slots.\n",
             f"## Targets (alpha 1.0, 10,000 adapters, 16 replicas)\n\n{targets_table(report['targets'])}\n",
             "## Saturation, every setup (measured costs)\n\n" + table(report["grid"]) + "\n",
             "## 16 replicas, 10,000 adapters, alpha 1.0, at fractions of pow2's saturation rate (measured costs)\n"
             "\n" + table(report["ladder"]).replace("| rate rows/s |", "| rate rows/s |") + "\n",
             "## Saturation with the assumed costs (16 replicas unless named)\n\n"
             + table([v for k, v in report["assumed_costs"].items() if isinstance(v, dict) and "saturation" in v])
             + "\n",
             "## Policy investigation (polyhead, 16 replicas, 10,000 adapters, alpha 1.0, measured costs)\n\n"
             + policy_table(report["policies"]) + "\n",
             f"elapsed {report['elapsed_s']:.0f} s ({report['cpu_s']:.0f} s of CPU, one core)\n"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(parts))
    try:
        plot(report, out / f"{name}.png")
    except Exception as exc:  # noqa: BLE001 - the tables matter more
        print(f"no plot: {exc}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a third of the requests per run, fewer policies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", type=float, nargs=4, metavar=("K", "VNODES", "LOAD_FACTOR", "SLACK"),
                    help="polyhead's AffinityPolicy (default: its defaults)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="cluster_sim", help="file stem under --out")
    args = ap.parse_args(argv)
    if args.policy:
        k, v, lf, sl = args.policy
        args.policy = (int(k), int(v), lf, int(sl))
    report = run_all(args)
    write_report(report, args.out, args.name)
    print(targets_table(report["targets"]))
    print(f"wrote {args.out / args.name}.json/.md/.png in {report['elapsed_s']:.0f} s ({report['cpu_s']:.0f} s CPU)")


if __name__ == "__main__":
    main()
