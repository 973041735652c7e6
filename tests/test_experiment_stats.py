"""serving/experiments/stats.py: histogram quantiles against numpy, merges equal to one accumulator, JSON round
trips, the units cap."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from serving.experiments.stats import (HIST_RATIO, ArmStats, ExperimentStats, LatencyHistogram, Moments)
from serving.experiments.assign import unit

HALF_BUCKET = math.sqrt(HIST_RATIO)  # the most a bucket's geometric middle is off from a value in it


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mean=math.log(0.05), sigma=1.0, size=n)  # ~50 ms median


def histogram(values) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values:
        h.observe(float(v))
    return h


def json_round_trip(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))


@pytest.mark.parametrize("q", [0.01, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_histogram_quantile_matches_numpy_within_a_bucket(q):
    x = lognormal(20_000)
    got = histogram(x).quantile(q)
    exact = float(np.quantile(x, q, method="inverted_cdf"))  # the same rank definition as quantile()
    assert 1 / HALF_BUCKET - 1e-12 <= got / exact <= HALF_BUCKET + 1e-12, (got, exact)
    assert abs(got / float(np.percentile(x, 100 * q)) - 1) < 0.02  # numpy's default (linear) too


def test_histogram_edges():
    h = LatencyHistogram()
    assert h.quantile(0.5) is None and h.n == 0
    for v in (0.0, 1e-9, 1e-6):  # at or below the floor: bucket 0
        h.observe(v)
    assert h.buckets == {0: 3}
    h.observe(1.0)
    assert h.index(1.0) == math.floor(math.log(1e6) / math.log(1.02))
    assert h.quantile(1.0) == pytest.approx(1.0, rel=0.011)
    assert h.quantile(0.0) == h.quantile(0.75) == LatencyHistogram.middle(0)
    for bad in (-0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency"):
            h.observe(bad)
    with pytest.raises(ValueError, match="quantile"):
        h.quantile(1.5)


def test_histogram_merge_equals_one_histogram_and_survives_json():
    x = lognormal(6_000, seed=1)
    parts = [histogram(x[:1000]), histogram(x[1000:1001]), histogram(x[1001:])]
    merged = LatencyHistogram()
    for p in parts:
        merged.merge(LatencyHistogram.from_dict(json_round_trip(p.to_dict())))
    whole = histogram(x)
    assert merged.buckets == whole.buckets and merged.n == whole.n == 6000
    assert merged.to_dict() == json_round_trip(whole.to_dict())
    # int keys (a dict passed by pickle, not JSON) read back the same
    assert LatencyHistogram.from_dict({"buckets": {int(k): v for k, v in whole.to_dict()["buckets"].items()}}).buckets \
        == whole.buckets


def test_moments_against_numpy_and_merge():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=1001)
    m = Moments()
    for v in x:
        m.observe(float(v))
    assert m.n == 1001 and not m.binary
    assert m.mean == pytest.approx(float(np.mean(x)), rel=1e-12)
    assert m.variance == pytest.approx(float(np.var(x, ddof=1)), rel=1e-9)
    a, b = Moments(), Moments()
    for v in x[:400]:
        a.observe(float(v))
    for v in x[400:]:
        b.observe(float(v))
    a.merge(Moments.from_dict(json_round_trip(b.to_dict())))
    assert a.n == m.n and a.min == m.min and a.max == m.max
    assert a.variance == pytest.approx(m.variance, rel=1e-9)


def test_moments_binary_and_constant():
    m = Moments()
    assert m.mean is None and m.variance is None and m.binary
    m.observe(1)
    assert m.variance is None
    m.observe(0)
    m.observe(1)
    assert m.binary and m.mean == pytest.approx(2 / 3) and m.variance == pytest.approx(1 / 3)
    m.observe(0.5)
    assert not m.binary
    c = Moments()
    for _ in range(7):
        c.observe(0.1)  # sums alone would leave a rounding residue; min == max makes it exactly 0
    assert c.variance == 0.0
    with pytest.raises(ValueError, match="finite"):
        c.observe(float("nan"))


def sample_arm(seed: int, units: range) -> ArmStats:
    rng = np.random.default_rng(seed)
    s = ArmStats()
    for u in units:
        s.record_request(float(rng.lognormal(-3, 0.5)), unit=u, error_code=503 if rng.random() < 0.1 else None)
    s.record_request(0.02, unit=None, error_code="timeout")
    s.forced_requests += 2
    for v in rng.random(20) < 0.3:
        s.outcomes.observe(float(v))
    s.shadow_run, s.shadow_dropped, s.shadow_failed, s.shadow_late = 9, 2, 1, 1
    for v in rng.random(9):
        s.agreement.observe(float(v))
    return s


def test_arm_stats_record_request_counts():
    s = ArmStats()
    s.record_request(0.01, unit=unit("s", "alice")[1])
    s.record_request(0.02, unit=unit("s", "alice")[1], error_code=500)
    s.record_request(0.03, unit=None, error_code=500)
    assert (s.requests, s.anonymous_requests, s.errors, s.latency.n) == (3, 1, 2, 3)
    assert s.units == {unit("s", "alice")[1]} and s.error_codes == {"500": 2}
    assert not s.is_empty() and ArmStats().is_empty()


def test_arm_stats_json_round_trip_and_merge():
    a, b = sample_arm(3, range(0, 50)), sample_arm(4, range(40, 100))
    a2 = ArmStats.from_dict(json_round_trip(a.to_dict()))
    assert a2.to_dict() == a.to_dict() and a2.units == a.units
    a2.merge(ArmStats.from_dict(json_round_trip(b.to_dict())))
    assert a2.requests == a.requests + b.requests
    assert a2.anonymous_requests == 2 and a2.forced_requests == 4
    assert a2.errors == a.errors + b.errors
    assert a2.error_codes == {k: a.error_codes.get(k, 0) + b.error_codes.get(k, 0)
                              for k in set(a.error_codes) | set(b.error_codes)}
    assert a2.units == set(range(100)) and not a2.units_capped
    assert a2.latency.n == a.latency.n + b.latency.n
    assert a2.outcomes.n == 40 and a2.outcomes.sum == a.outcomes.sum + b.outcomes.sum and a2.outcomes.binary
    assert (a2.shadow_run, a2.shadow_dropped, a2.shadow_failed, a2.shadow_late) == (18, 4, 2, 2)
    assert a2.agreement.n == 18


def test_units_cap():
    s = ArmStats(units={1, 2, 3})
    s.merge(ArmStats(units={3, 4}), max_units=5)  # 4 fits: not capped
    assert s.units == {1, 2, 3, 4} and not s.units_capped
    s.merge(ArmStats(units=set(range(10, 20))), max_units=5)
    assert len(s.units) == 5 and s.units_capped
    s.merge(ArmStats(units={1, 2}), max_units=5)  # known units do not need room
    assert len(s.units) == 5
    assert ArmStats.from_dict(json_round_trip(s.to_dict())).units_capped
    t = ArmStats()
    t.merge(ArmStats(units={7}, units_capped=True), max_units=100)  # a capped delta stays capped
    assert t.units_capped
    u = ArmStats()
    u.merge(ArmStats(units=set(range(1000))))  # no cap given: no cap
    assert len(u.units) == 1000 and not u.units_capped


def test_experiment_stats_merge_by_phase():
    total = ExperimentStats(phase=2)
    r1, r2 = ExperimentStats(phase=2), ExperimentStats(phase=2)
    r1.arm("a").record_request(0.01, unit=1)
    r1.arm("b").record_request(0.01, unit=2, error_code=500)
    r2.arm("a").record_request(0.02, unit=3)
    for delta in (r1, r2):
        total.merge(json_round_trip(delta.to_dict()), max_units=10)
    assert sorted(total.arms) == ["a", "b"]
    assert total.arms["a"].requests == 2 and total.arms["a"].units == {1, 3}
    assert total.arms["b"].errors == 1
    assert ExperimentStats.from_dict(json_round_trip(total.to_dict())).to_dict() == total.to_dict()
    with pytest.raises(ValueError, match="phase 3"):
        total.merge(ExperimentStats(phase=3).to_dict())
    assert ExperimentStats(phase=1).is_empty() and not total.is_empty()
