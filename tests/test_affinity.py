"""The affinity router's choice (serving/app/affinity.py), without Ray: golden ring vectors, residency first,
spill-over along the ring only past saturated replicas, at most K homes, a stable ring, base rows spread evenly."""
from __future__ import annotations

import bisect
import hashlib
import random
from collections import Counter

import pytest

from serving.app.affinity import (AffinityPolicy, AffinityStats, ReplicaState, choose, homes, key_hash, request_key,
                                  ring_order, saturated)

IDS = [f"r{i}" for i in range(8)]

# adapter -> its ring order over r0..r7 with 64 virtual nodes (homes = the first 2): these never change
GOLDEN = [
    ("adapter-a", ["r6", "r3", "r5", "r1", "r4", "r2", "r0", "r7"]),
    ("adapter-b", ["r0", "r6", "r1", "r3", "r5", "r4", "r7", "r2"]),
    ("support-bot", ["r4", "r7", "r1", "r0", "r5", "r3", "r6", "r2"]),
    ("sql@3", ["r5", "r1", "r4", "r0", "r2", "r7", "r3", "r6"]),
    ("é✓", ["r3", "r5", "r6", "r1", "r4", "r2", "r0", "r7"]),
    ("", ["r0", "r7", "r3", "r5", "r1", "r4", "r2", "r6"]),
]


def state(rid: str, queued: int = 0, resident=(), capacity: int = 64) -> ReplicaState:
    return ReplicaState(rid, frozenset(resident), queued, capacity)


def cluster(queued: dict[str, int] | None = None, resident: dict[str, set[str]] | None = None,
            ids=IDS) -> list[ReplicaState]:
    queued, resident = queued or {}, resident or {}
    return [state(r, queued.get(r, 0), resident.get(r, ())) for r in ids]


def flat(ranks: list[list[str]]) -> list[str]:
    return [r for group in ranks for r in group]


@pytest.mark.parametrize("adapter,order", GOLDEN)
def test_golden_ring_orders(adapter, order):
    assert ring_order(adapter, IDS) == order
    assert homes(adapter, IDS) == order[:2]
    assert homes(adapter, IDS, AffinityPolicy(homes=3)) == order[:3]
    assert homes(adapter, list(reversed(IDS))) == order[:2]  # the order replicas are listed in does not matter


def test_golden_hash():
    assert key_hash("adapter-a") == 2104919693360713261
    assert key_hash("") == 16406829232824261652


@pytest.mark.parametrize("adapter,order", GOLDEN)
def test_ring_is_the_documented_formula(adapter, order):
    def h(s):
        return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")
    points = sorted((h(f"{r}#{i}"), r) for r in IDS for i in range(64))
    start = bisect.bisect_left([p for p, _ in points], h(adapter))
    walk = [points[(start + j) % len(points)][1] for j in range(len(points))]
    assert list(dict.fromkeys(walk)) == order


def test_resident_replica_preferred_over_homes():
    order = ring_order("adapter-a", IDS)
    elsewhere = order[5]  # neither a home nor an early spill
    ranks = choose("adapter-a", cluster(queued={elsewhere: 3}, resident={elsewhere: {"adapter-a"}}))
    assert ranks[0] == [elsewhere]
    assert ranks[1] == sorted(order[:2], key=lambda r: (0, r))  # then the homes (both idle: by id)
    # resident on two replicas: the less loaded first
    ranks = choose("adapter-a", cluster(queued={"r1": 5, "r2": 2}, resident={"r1": {"adapter-a"}, "r2": {"adapter-a"}}))
    assert ranks[0] == ["r2", "r1"]


def test_saturated_resident_replica_is_not_preferred():
    order = ring_order("adapter-a", IDS)
    elsewhere = order[5]
    ranks = choose("adapter-a", cluster(queued={elsewhere: 64}, resident={elsewhere: {"adapter-a"}}))
    assert set(ranks[0]) == set(order[:2])
    assert ranks[-1] == [elsewhere]


def test_homes_ranked_least_loaded_first():
    h0, h1 = homes("adapter-b", IDS)
    ranks = choose("adapter-b", cluster(queued={h0: 4, h1: 1}))
    assert ranks[0] == [h1, h0]


def test_saturated_homes_skipped_and_spill_follows_the_ring():
    order = ring_order("support-bot", IDS)
    policy = AffinityPolicy(homes=2, load_factor=1.25, slack_rows=1)
    # homes over load_factor x mean + slack (mean = 105/8: bound 17.4), the third replica full
    queued = {order[0]: 20, order[1]: 20, order[2]: 64, order[4]: 1}
    reps = cluster(queued=queued)
    assert [saturated(r, 105 / 8, policy) for r in reps if r.replica_id in order[:3]] == [True, True, True]
    ranks = choose("support-bot", reps, policy)
    # spill-over: the replicas after the homes in ring order, one rank each, the saturated ones last by load
    assert ranks[:5] == [[r] for r in order[3:]]
    assert ranks[5] == sorted(order[:3], key=lambda r: (queued[r], r))
    assert len(ranks) == 6


def test_saturation_rule():
    policy = AffinityPolicy(load_factor=1.25, slack_rows=16)
    assert saturated(state("r0", 64, capacity=64), 100.0, policy)  # full, whatever the mean
    assert not saturated(state("r0", 63, capacity=64), 100.0, policy)
    assert not saturated(state("r0", 16), 0.0, policy)  # an idle cluster: up to slack_rows
    assert saturated(state("r0", 17), 0.0, policy)
    assert not saturated(state("r0", 28), 9.6, policy)  # 1.25 x 9.6 + 16 = 28
    assert saturated(state("r0", 29), 9.6, policy)


def test_at_most_k_homes_while_unsaturated():
    rng = random.Random(1)
    for k in (1, 2, 3):
        policy = AffinityPolicy(homes=k)
        for adapter in ("adapter-a", "adapter-b", "hot-one"):
            resident: dict[str, set[str]] = {r: set() for r in IDS}
            used = set()
            for _ in range(200):
                queued = {r: rng.randrange(0, 8) for r in IDS}  # light, uneven load: nothing saturated
                chosen = flat(choose(adapter, cluster(queued, resident), policy))[0]
                used.add(chosen)
                resident[chosen].add(adapter)
                if rng.random() < 0.3:  # evictions now and then
                    resident[rng.choice(IDS)].discard(adapter)
            assert used <= set(homes(adapter, IDS, policy))
            assert len(used) <= k


def test_hot_adapter_spreads_only_past_saturated_replicas():
    """A hot adapter's rows pile up where they go; each new replica it reaches is the next one on its ring."""
    policy = AffinityPolicy(homes=2, load_factor=1.25, slack_rows=4)
    queued = {r: 2 for r in IDS}
    resident: dict[str, set[str]] = {r: set() for r in IDS}
    reached = []
    for _ in range(120):
        chosen = flat(choose("hot", cluster(queued, resident), policy))[0]
        queued[chosen] += 1
        resident[chosen].add("hot")
        if chosen not in reached:
            reached.append(chosen)
    order = ring_order("hot", IDS)
    assert set(reached[:2]) == set(order[:2])
    assert reached[2:] == order[2:len(reached)]
    assert 2 < len(reached) < 8  # spread, but only as far as load requires


def test_ring_stability_adding_a_replica():
    before = [f"r{i}" for i in range(8)]
    after = before + ["r8"]
    names = [f"adapter-{i}" for i in range(10_000)]
    moved = [a for a in names if homes(a, before, AffinityPolicy(homes=1)) != homes(a, after, AffinityPolicy(homes=1))]
    assert 0.05 <= len(moved) / len(names) <= 0.20  # about 1/9
    assert all(homes(a, after, AffinityPolicy(homes=1)) == ["r8"] for a in moved)  # only to the new replica
    # and removing it again moves exactly those back
    assert all(homes(a, before, AffinityPolicy(homes=1)) == homes(a, after[:-1], AffinityPolicy(homes=1))
               for a in moved[:50])


def test_base_rows_never_pinned_and_spread_evenly():
    rng = random.Random(7)
    reps = cluster()
    firsts = Counter(choose(None, reps, rng=rng)[0][0] for _ in range(10_000))
    assert set(firsts) == set(IDS)
    for r in IDS:
        assert abs(firsts[r] - 1250) <= 125, firsts  # within +-10 % of uniform


def test_base_rows_prefer_the_less_loaded_of_two_picks():
    rng = random.Random(3)
    reps = cluster(queued={r: i for i, r in enumerate(IDS)})
    for _ in range(200):
        ranks = choose(None, reps, rng=rng)
        a, b = ranks[0][0], ranks[1][0]
        assert int(a[1:]) <= int(b[1:])  # queued = index here
        assert ranks[2] == sorted(set(IDS) - {a, b}, key=lambda r: int(r[1:]))
    assert choose(None, [state("only")]) == [["only"]]


def test_base_rows_are_deterministic_with_a_seeded_rng():
    reps = cluster()
    assert ([choose(None, reps, rng=random.Random(5)) for _ in range(3)]
            == [choose(None, reps, rng=random.Random(5))] * 3)


@pytest.mark.parametrize("adapters,head_only,want", [
    (["a", "a", "a"], set(), "a"),
    (["a", None, "a"], set(), "a"),  # base rows beside one adapter: routed by the adapter
    ([None, None], set(), None),
    ([], set(), None),
    (["a", "b"], set(), None),  # two adapters with bodies: no one home
    (["h1", "h2", None], {"h1", "h2"}, None),  # head-only adapters share the base forward
    (["h1", "a"], {"h1"}, "a"),
    (["h1"], {"h1"}, None),
])
def test_request_key(adapters, head_only, want):
    assert request_key(adapters, head_only) == want


def test_ranking_never_empty_and_each_replica_once():
    rng = random.Random(11)
    assert choose("a", []) == [] and choose(None, []) == []
    for _ in range(300):
        n = rng.randrange(1, 12)
        ids = [f"n{i}" for i in range(n)]
        reps = [state(r, rng.choice([0, 1, 5, 30, 64, 90]), {a for a in ("x", "y") if rng.random() < 0.3})
                for r in ids]
        for adapter in ("x", "y", "z", None):
            ranks = choose(adapter, reps, AffinityPolicy(homes=rng.randrange(1, 4)), rng)
            assert ranks and all(ranks)
            assert sorted(flat(ranks)) == sorted(ids)


def test_everything_saturated_still_ranks_all_by_load():
    queued = {r: 64 for r in IDS} | {"r3": 70, "r5": 65}
    ranks = choose("adapter-a", cluster(queued))
    assert ranks == [sorted(IDS, key=lambda r: (queued[r], r))]


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="duplicate replica ids"):
        choose("a", [state("r0"), state("r0")])
    with pytest.raises(ValueError, match="homes"):
        AffinityPolicy(homes=0)
    with pytest.raises(ValueError, match="load_factor"):
        AffinityPolicy(load_factor=0.5)
    with pytest.raises(ValueError, match="virtual_nodes"):
        AffinityPolicy(virtual_nodes=0)
    with pytest.raises(ValueError, match="slack_rows"):
        AffinityPolicy(slack_rows=-1)
    with pytest.raises(ValueError, match="capacity_rows"):
        state("r0", capacity=0)
    with pytest.raises(ValueError, match="queued_rows"):
        state("r0", queued=-1)


def test_stats_count_hits_misses_spills_and_homes():
    stats = AffinityStats()
    h = homes("adapter-a", IDS)
    away = next(r for r in IDS if r not in h)
    stats.record("adapter-a", state(h[0]), h)  # cold at its home: a miss, no spill
    stats.record("adapter-a", state(h[0], resident={"adapter-a"}), h)  # a hit
    stats.record("adapter-a", state(away), h)  # cold away from home: a miss and a spill
    stats.record("adapter-a", state(away, resident={"adapter-a"}), h)  # resident away from home: a hit
    stats.record(None, state(away), [])
    assert (stats.hits, stats.misses, stats.spills, stats.unpinned) == (2, 2, 1, 1)
    assert stats.hit_rate == 0.5
    assert stats.homes_per_adapter() == {"adapter-a": 2}
    assert AffinityStats().hit_rate is None
