"""The assignment spec (serving/experiments/assign.py), pinned: golden vectors, exact shares, sticky units, and ramps
that move units only into the arm that gains share."""
from __future__ import annotations

import hashlib
import random

import pytest
from scipy.stats import chisquare

from serving.experiments.assign import BUCKETS, Allocation, bucket, bucket_counts, unit
from serving.experiments.catalog import ExperimentCatalog
from serving.experiments.spec import ExperimentBody, next_version

# (salt, unit key) -> bucket, 64-bit unit hash: these never change (every replica and every version agree)
GOLDEN = [
    ("s1", "user-0", 7286, 15614586070266207286),
    ("s1", "user-1", 1465, 17107523173934821465),
    ("checkout-2026", "alice", 8814, 1926446558588388814),
    ("checkout-2026", "bob", 7293, 13478415601016347293),
    ("x", "é✓", 6632, 4250796756285966632),
    ("", "", 4234, 14822734141671984234),
]


@pytest.mark.parametrize("salt,key,want_bucket,want_unit", GOLDEN)
def test_golden_buckets(salt, key, want_bucket, want_unit):
    assert bucket(salt, key) == want_bucket
    assert unit(salt, key) == (want_bucket, want_unit)
    # the documented formula, written out
    value = int.from_bytes(hashlib.sha256(f"{salt}.{key}".encode()).digest()[:8], "big")
    assert (value % 10_000, value) == (want_bucket, want_unit)


def test_golden_tables():
    assert Allocation.initial([90, 10]).runs() == [[0, 0, 9000], [1, 9000, 10000]]
    assert Allocation.initial([1, 1, 1]).runs() == [[0, 0, 3334], [1, 3334, 6667], [2, 6667, 10000]]
    ramped = Allocation.initial([45, 10, 45]).rebalanced(["a", "b", "c"], ["a", "b", "c"], [25, 50, 25])
    assert ramped.runs() == [[0, 0, 2500], [1, 2500, 5500], [2, 5500, 8000], [1, 8000, 10000]]
    assert bucket_counts([1, 1, 1]) == [3334, 3333, 3333]
    assert bucket_counts([0.3, 0.3, 0.4]) == [3000, 3000, 4000]


@pytest.mark.parametrize("weights", [[90, 10], [1, 1, 1], [50, 30, 20], [0, 1], [7, 0, 3]])
def test_counts_are_exact_shares(weights):
    counts = Allocation.initial(weights).counts(len(weights))
    assert sum(counts) == BUCKETS
    for w, c in zip(weights, counts):
        assert abs(c - BUCKETS * w / sum(weights)) < 1


def test_bad_weights_are_refused():
    for weights in ([], [0, 0], [-1, 2]):
        with pytest.raises(ValueError):
            bucket_counts(weights)


def _experiment(weights, salt="exp-salt", previous=None, names=None):
    names = names or [f"arm{i}" for i in range(len(weights))]
    body = ExperimentBody(arms=[{"name": n, "adapter": f"ad@{i + 1}", "weight": w}
                                for i, (n, w) in enumerate(zip(names, weights))], salt=salt)
    return next_version("exp", body, previous, task="seq_cls", base="base-model")


@pytest.mark.parametrize("weights", [[90, 10], [1, 1, 1], [50, 30, 20]])
def test_ten_thousand_keyed_units_split_as_the_weights_say(weights):
    catalog = ExperimentCatalog(store=None)
    experiment = _experiment(weights)
    counts = {a.name: 0 for a in experiment.arms}
    for i in range(10_000):
        counts[catalog.assign(experiment, f"unit-{i}", None).arm.name] += 1
    total = sum(weights)
    expected = [10_000 * w / total for w in weights]
    assert chisquare(list(counts.values()), expected).pvalue > 0.001


def test_a_unit_always_sees_one_arm():
    catalog = ExperimentCatalog(store=None)
    experiment = _experiment([1, 1, 1])
    for u in range(1000):
        arms = {catalog.assign(experiment, f"user-{u}", None).arm.name for _ in range(5)}
        assert len(arms) == 1
    anonymous = {catalog.assign(experiment, None, None).arm.name for _ in range(200)}
    assert len(anonymous) == 3  # no key: a random bucket per request


@pytest.mark.parametrize("seed", range(20))
def test_a_ramp_moves_units_only_into_the_ramped_arm(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    weights = [rng.choice([0, 1, 5, 10, 25]) for _ in range(n - 1)] + [10]
    ramped = rng.randrange(n)
    new = list(weights)
    new[ramped] = weights[ramped] + rng.choice([5, 20, 80])  # its share rises; the others keep their proportions
    before = _experiment(weights)
    after = _experiment(new, previous=before)
    assert after.phase == before.phase + 1
    catalog = ExperimentCatalog(store=None)
    for i in range(3000):
        a = catalog.assign(before, f"u{i}", None).arm.name
        b = catalog.assign(after, f"u{i}", None).arm.name
        assert a == b or b == f"arm{ramped}", (a, b)
    want = bucket_counts(new)
    assert after.allocation.counts(n) == want


def test_changes_move_units_only_from_arms_that_lost_share_to_arms_that_gained():
    before = _experiment([40, 30, 30], names=["a", "b", "c"])
    after = _experiment([20, 50, 0, 30], names=["a", "b", "c", "d"], previous=before)  # c stopped, d added
    old = dict(zip(["a", "b", "c"], before.allocation.counts(3)))
    new = dict(zip(["a", "b", "c", "d"], after.allocation.counts(4)))
    for b in range(BUCKETS):
        x = before.arms[before.allocation.arm_of(b)].name
        y = after.arms[after.allocation.arm_of(b)].name
        if x != y:
            assert new[x] < old[x] and new[y] > old.get(y, 0), (b, x, y)


def test_a_new_salt_reshuffles_and_restarts_the_table():
    before = _experiment([50, 50])
    after = _experiment([50, 50], salt="other", previous=before)
    assert after.phase == before.phase + 1
    assert after.allocation == Allocation.initial([50, 50])
    catalog = ExperimentCatalog(store=None)
    moved = sum(catalog.assign(before, f"u{i}", None).arm != catalog.assign(after, f"u{i}", None).arm
                for i in range(2000))
    assert 800 < moved < 1200  # about half: independent hashes


def test_forced_arm_and_unknown_arm():
    from serving.experiments.catalog import UnknownArm

    catalog = ExperimentCatalog(store=None)
    experiment = _experiment([100, 0])
    assert catalog.assign(experiment, "u", "arm1").arm.name == "arm1"
    assert catalog.assign(experiment, "u", "arm1").forced
    with pytest.raises(UnknownArm, match="arm0, arm1"):
        catalog.assign(experiment, "u", "nope")
