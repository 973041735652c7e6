"""serving/experiments/report.py: each statistic against an independent computation (formulas written out here,
scipy on raw samples), SRM on the real assignment (assign.py), guardrails, and JSON-safe reports."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from serving.experiments.assign import Allocation, bucket
from serving.experiments.report import (compare, error_rate, experiment_report, format_table, guardrail_breaches,
                                        outcome_summary, srm)
from serving.experiments.assign import unit
from serving.experiments.stats import ArmStats, Moments

Z95 = st.norm.ppf(0.975)


def wilson(k: int, n: int) -> list[float]:
    """The Wilson score interval, written out."""
    p = k / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 / (1 + Z95 ** 2 / n) * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n))
    return [centre - half, centre + half]


def moments(values) -> Moments:
    m = Moments()
    for v in values:
        m.observe(float(v))
    return m


def arm_with(requests: int = 0, errors: int = 0, outcomes=(), units=()) -> ArmStats:
    s = ArmStats(requests=requests, errors=errors, units=set(units))
    for v in outcomes:
        s.outcomes.observe(float(v))
    return s


def arms_of(weights: dict[str, float]) -> list[dict]:
    return [{"name": n, "adapter": f"{n}-adapter@1", "weight": w, "rolled_back": None} for n, w in weights.items()]


# ---- error rate, outcome summary ----

@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (160, 200), (10, 10_000), (10_000, 10_000)])
def test_error_rate_is_wilson(k, n):
    r = error_rate(arm_with(n, k))
    assert r["method"] == "wilson" and r["value"] == k / n
    assert r["ci95"] == pytest.approx(wilson(k, n), abs=1e-12)


def test_error_rate_without_requests():
    assert error_rate(ArmStats()) == {"value": None, "ci95": None, "method": "wilson"}


def test_outcome_summary_binary_and_numeric():
    b = outcome_summary(moments([1] * 30 + [0] * 70))
    assert b["method"] == "wilson" and b["mean"] == 0.3 and b["ci95"] == pytest.approx(wilson(30, 100), abs=1e-12)
    x = np.random.default_rng(5).normal(10, 3, size=40)
    t = outcome_summary(moments(x))
    half = st.t.ppf(0.975, 39) * np.std(x, ddof=1) / math.sqrt(40)
    assert t["method"] == "t" and t["n"] == 40
    assert t["ci95"] == pytest.approx([x.mean() - half, x.mean() + half], rel=1e-9)
    assert outcome_summary(moments([2.5]))["ci95"] is None
    assert outcome_summary(Moments()) == {"n": 0, "mean": None, "ci95": None, "method": "wilson"}


# ---- compare ----

def test_compare_two_proportions_matches_the_formula():
    k1, n1, k0, n0 = 130, 1000, 100, 1000
    c = compare(moments([1] * k1 + [0] * (n1 - k1)), moments([1] * k0 + [0] * (n0 - k0)))
    p1, p0, pool = k1 / n1, k0 / n0, (k1 + k0) / (n1 + n0)
    z = (p1 - p0) / math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n0))
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    assert c["test"] == "two-proportion z" and c["difference"] == pytest.approx(0.03)
    assert c["p_value"] == pytest.approx(2 * (1 - st.norm.cdf(abs(z))), rel=1e-9)
    assert c["ci95"] == pytest.approx([p1 - p0 - Z95 * se, p1 - p0 + Z95 * se], rel=1e-9)
    # the z-test's p is the chi-square test of the 2x2 table without continuity correction
    chi2 = st.chi2_contingency([[k1, n1 - k1], [k0, n0 - k0]], correction=False)
    assert c["p_value"] == pytest.approx(chi2.pvalue, rel=1e-9)


def test_compare_welch_matches_scipy_on_raw_samples():
    rng = np.random.default_rng(6)
    a, b = rng.normal(1.2, 1.0, size=80), rng.normal(1.0, 3.0, size=300)
    c = compare(moments(a), moments(b))
    ref = st.ttest_ind(a, b, equal_var=False)
    assert c["test"] == "welch t" and c["difference"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert c["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
    lo, hi = ref.confidence_interval(0.95)  # scipy's own Welch interval from the raw samples
    assert c["ci95"] == pytest.approx([lo, hi], rel=1e-8)


def test_compare_mixed_binary_and_numeric_uses_welch():
    c = compare(moments([0, 1, 1, 0, 1]), moments([0.2, 0.9, 0.4]))
    assert c["test"] == "welch t"


@pytest.mark.parametrize("binary", [True, False])
def test_compare_ci_covers_the_true_difference(binary):
    rng = np.random.default_rng(7 if binary else 8)
    sims, covered = 400, 0
    for _ in range(sims):
        if binary:
            a, b, truth = rng.random(400) < 0.35, rng.random(400) < 0.30, 0.05
        else:
            a, b, truth = rng.exponential(2.0, 60), rng.normal(1.5, 0.5, 40), 0.5
        lo, hi = compare(moments(a), moments(b))["ci95"]
        covered += lo <= truth <= hi
    assert 0.92 <= covered / sims <= 0.98  # 95 % +- about 2.7 standard errors


def test_compare_constant_samples_stay_finite():
    same = compare(moments([2.0] * 5), moments([2.0] * 9))
    assert same == {"difference": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, "test": "welch t"}
    diff = compare(moments([3.0] * 5), moments([2.0] * 9))
    assert diff["p_value"] == 0.0 and diff["ci95"] == [1.0, 1.0]
    ones = compare(moments([1] * 50), moments([1] * 50))
    assert ones["test"] == "two-proportion z" and ones["p_value"] == 1.0 and ones["ci95"] == [0.0, 0.0]
    apart = compare(moments([1] * 50), moments([0] * 50))
    assert apart["ci95"] == [1.0, 1.0] and apart["p_value"] < 1e-20
    one_constant = compare(moments([1.0, 2.0, 3.0]), moments([2.0] * 4))  # Welch with one variance 0
    assert math.isfinite(one_constant["p_value"]) and math.isfinite(one_constant["ci95"][1])
    assert compare(moments([1.0]), moments([1.0, 2.0])) is None


# ---- SRM on the real assignment ----

def assigned_units(weights: list[float], n: int, salt: str = "srm-test") -> list[set[int]]:
    """Unit ids per arm for n keys, assigned the way the ingress does."""
    allocation = Allocation.initial(weights)
    out: list[set[int]] = [set() for _ in weights]
    for i in range(n):
        key = f"user-{i}"
        out[allocation.arm_of(bucket(salt, key))].add(unit(salt, key)[1])
    return out


def srm_of(weights: list[float], units: list[set[int]]) -> dict:
    names = [f"arm{i}" for i in range(len(weights))]
    return srm(arms_of(dict(zip(names, weights))), {n: ArmStats(units=u) for n, u in zip(names, units)})


def drop(units: set[int], fraction: float) -> set[int]:
    kept = sorted(units)
    return set(kept[: round(len(kept) * (1 - fraction))])


@pytest.mark.parametrize("weights", [[50, 50], [90, 10], [1, 1, 1]])
def test_srm_passes_on_the_real_assignment(weights):
    for n in (10_000, 40_000):
        units = assigned_units(weights, n)
        s = srm_of(weights, units)
        counts = [len(u) for u in units]
        expected = [n * w / sum(weights) for w in weights]
        chi2 = sum((o - e) ** 2 / e for o, e in zip(counts, expected))  # Pearson, written out
        assert s["test"] == "pearson chi-square" and s["df"] == len(weights) - 1
        assert s["chi2"] == pytest.approx(chi2, rel=1e-9)
        assert s["p_value"] == pytest.approx(st.chi2.sf(chi2, len(weights) - 1), rel=1e-9)
        assert s["p_value"] > 0.001 and not s["alert"], (n, counts)
        assert sum(s["observed"].values()) == n


@pytest.mark.parametrize("weights,n", [([50, 50], 40_000), ([1, 1, 1], 40_000), ([90, 10], 200_000)])
def test_srm_alerts_when_an_arm_loses_5_percent_of_its_units(weights, n):
    # a 5 % loss in either arm of a 90/10 split gives only chi2 ~ 9 at 40,000 units (p ~ 0.001-0.004): too few
    # units to see it at p < 0.001, so that split is checked at 200,000
    units = assigned_units(weights, n)
    units[-1] = drop(units[-1], 0.05)
    s = srm_of(weights, units)
    assert s["alert"] and s["p_value"] < 0.001


def test_srm_excludes_zero_weight_arms_and_needs_two_arms():
    units = assigned_units([50, 50], 2000)
    stats = {"a": ArmStats(units=units[0]), "b": ArmStats(units=units[1]), "off": ArmStats(units={1, 2})}
    s = srm(arms_of({"a": 50, "b": 50, "off": 0}), stats)
    assert set(s["observed"]) == {"a", "b"} and s["excluded"] == {"off": 2} and s["df"] == 1
    assert s["expected"] == {"a": 1000.0, "b": 1000.0}
    assert srm(arms_of({"a": 1, "off": 0}), stats) is None
    assert srm(arms_of({"a": 1, "b": 1}), {}) is None  # no units yet


def test_srm_never_alerts_on_capped_units():
    stats = {"a": ArmStats(units=set(range(900)), units_capped=True), "b": ArmStats(units=set(range(100)))}
    s = srm(arms_of({"a": 50, "b": 50}), stats)
    assert s["p_value"] < 1e-6 and s["units_capped"] and not s["alert"]


# ---- guardrails ----

GUARD = {"max_error_rate": 0.05, "min_requests": 100, "min_outcome_difference": None, "min_outcomes": 100}


def test_error_guardrail_breaches_only_the_failing_arm():
    stats = {"control": arm_with(10_000, 0), "bad": arm_with(200, 160), "young": arm_with(50, 50)}
    out = guardrail_breaches(arms_of({"control": 50, "bad": 25, "young": 25}), stats, "control", GUARD)
    assert [(b["arm"], b["reason"]) for b in out] == [("bad", "error_rate")]  # young: fewer than min_requests
    assert out[0]["error_rate"] == 0.8 and out[0]["requests"] == 200 and out[0]["limit"] == 0.05
    assert out[0]["ci95"] == pytest.approx(wilson(160, 200), abs=1e-12) and out[0]["ci95"][0] > 0.05


def test_error_guardrail_needs_the_whole_interval_above_the_limit():
    # 7 % observed, but the interval reaches below 5 %: not yet
    stats = {"control": arm_with(10_000, 0), "b": arm_with(200, 14)}
    assert wilson(14, 200)[0] < 0.05
    assert guardrail_breaches(arms_of({"control": 1, "b": 1}), stats, "control", GUARD) == []


def test_outcome_guardrail():
    control = [1] * 500 + [0] * 500
    worse = [1] * 300 + [0] * 700
    stats = {"control": arm_with(outcomes=control), "worse": arm_with(outcomes=worse),
             "few": arm_with(outcomes=[0] * 50), "off": arm_with(outcomes=[0] * 500)}
    guard = dict(GUARD, max_error_rate=None, min_outcome_difference=-0.05)
    out = guardrail_breaches(arms_of({"control": 1, "worse": 1, "few": 1, "off": 0}), stats, "control", guard)
    assert [(b["arm"], b["reason"]) for b in out] == [("worse", "outcome")]
    assert out[0]["difference"] == pytest.approx(-0.2) and out[0]["ci95"][1] < -0.05
    assert out[0]["test"] == "two-proportion z"
    close = {"control": arm_with(outcomes=control), "worse": arm_with(outcomes=[1] * 480 + [0] * 520)}
    assert guardrail_breaches(arms_of({"control": 1, "worse": 1}), close, "control", guard) == []


def test_guardrails_never_list_the_last_positive_weight_arm():
    failing = {n: arm_with(200, 160) for n in ("control", "b", "c")}
    out = guardrail_breaches(arms_of({"control": 1, "b": 1, "off": 0}), failing, "control", GUARD)
    assert [b["arm"] for b in out] == ["b"]  # the control keeps its weight
    assert guardrail_breaches(arms_of({"control": 1}), failing, "control", GUARD) == []
    # a control already at weight 0: the first positive arm stays
    out = guardrail_breaches(arms_of({"control": 0, "b": 1, "c": 1}), failing, "control", GUARD)
    assert [b["arm"] for b in out] == ["c"]
    # all but one breaching: all are listed
    mixed = dict(failing, c=arm_with(10_000, 0))
    out = guardrail_breaches(arms_of({"control": 1, "b": 1, "c": 1}), mixed, "control", GUARD)
    assert [b["arm"] for b in out] == ["control", "b"]


# ---- the report ----

def full_report(arms: list[dict], stats: dict, control: str = "control") -> dict:
    return experiment_report("exp", 3, 2, arms, control, stats, GUARD, {"adapter": "s@1", "percent": 10.0})


def test_report_fields():
    c = arm_with(1000, 10, outcomes=[1] * 100 + [0] * 100, units=range(500))
    b = arm_with(1000, 30, outcomes=[1] * 80 + [0] * 120, units=range(500, 1010))
    for s, ms in ((c, 20), (b, 40)):
        for _ in range(100):
            s.latency.observe(ms / 1000)
        s.agreement.observe(0.5)
    b.shadow_run, b.shadow_dropped = 7, 1
    arms = arms_of({"control": 3, "b": 1})
    r = full_report(arms, {"control": c, "b": b})
    assert r["object"] == "experiment.report" and (r["experiment"], r["version"], r["phase"]) == ("exp", 3, 2)
    rc, rb = r["arms"]
    assert rc["share"] == 0.75 and rb["share"] == 0.25
    assert rc["vs_control"] is None and rb["vs_control"]["difference"] == pytest.approx(-0.1)
    assert rb["error_rate"]["value"] == 0.03 and rb["units"] == 510
    assert rb["latency_ms"]["n"] == 100 and rb["latency_ms"]["p50"] == pytest.approx(40, rel=0.011)
    assert rb["shadow"] == {"rows": 7, "dropped": 1, "failed": 0, "late": 0, "agreement": {"n": 1, "mean": 0.5}}
    assert r["srm"]["observed"] == {"control": 500, "b": 510} and r["srm"]["alert"]  # 3:1 expected
    assert r["guardrails"] == GUARD
    table = format_table(r)
    assert "control (control)" in table and "b-adapter@1" in table and "SRM ALERT" in table
    assert "75.0%" in table and "-0.1 [" in table


@pytest.mark.parametrize("case", ["empty", "one arm", "zero variance", "rolled back"])
def test_report_is_json_safe(case):
    if case == "empty":
        arms, stats = arms_of({"control": 1, "b": 1}), {}
    elif case == "one arm":
        arms, stats = arms_of({"control": 1}), {"control": arm_with(5, 1, outcomes=[3.0], units=[1])}
    elif case == "zero variance":
        arms = arms_of({"control": 1, "b": 1, "c": 1})
        stats = {"control": arm_with(10, 0, outcomes=[2.0] * 10), "b": arm_with(10, 10, outcomes=[2.0] * 10),
                 "c": arm_with(10, 0, outcomes=[5.0] * 3)}
    else:
        arms = arms_of({"control": 1, "b": 0})
        arms[1]["rolled_back"] = {"reason": "error_rate", "error_rate": 0.8, "version": 2}
        stats = {"control": arm_with(10, 0, units=[1, 2]), "b": arm_with(200, 160, units=[3])}
    r = full_report(arms, stats)
    again = json.loads(json.dumps(r, allow_nan=False))
    assert again == r
    table = format_table(r)
    assert "SRM" in table and all(a["name"] in table for a in arms)
    if case == "rolled back":
        assert "rolled back: b: reason=error_rate" in table
        assert r["srm"] is None  # only one arm with weight > 0
    if case == "empty":
        assert r["arms"][0]["latency_ms"] == {"n": 0, "p50": None, "p99": None}
        assert r["arms"][1]["vs_control"] is None and r["srm"] is None
