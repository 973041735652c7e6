"""An experiment's statistics from its merged ArmStats: every number says which test produced it, every
distribution quantity comes from scipy.stats, and every float in a report is finite or None (JSON-safe).

    error_rate          errors / requests, Wilson 95 % interval (binomtest(...).proportion_ci)
    outcome_summary     mean outcome; binary outcomes: Wilson interval, numeric: Student t interval
    compare             arm - control outcome means: two-proportion z-test when both are binary (pooled SE for
                        the p-value, unpooled Wald interval), else Welch's t (Welch-Satterthwaite interval)
    srm                 sample-ratio mismatch: Pearson chi-square of distinct units per arm against the weights
    guardrail_breaches  arms whose error rate is surely above the limit, or whose outcome is surely worse
    experiment_report   all of the above for every arm; format_table renders it for the CLI

Inputs are plain: `arms` a list of {"name", "adapter", "weight", "rolled_back"}, `stats` arm name -> ArmStats
(a missing arm counts as empty), `guardrails` {"max_error_rate", "min_requests", "min_outcome_difference",
"min_outcomes"}.
"""
from __future__ import annotations

import math

from scipy import stats as st

from .stats import ArmStats, Moments

CONFIDENCE = 0.95
SRM_THRESHOLD = 0.001


def _num(x) -> float | None:
    """A finite Python float, or None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _wilson(k: int, n: int) -> list[float]:
    ci = st.binomtest(k, n).proportion_ci(CONFIDENCE, method="wilson")
    return [float(ci.low), float(ci.high)]


def error_rate(stats: ArmStats) -> dict:
    """{"value", "ci95", "method": "wilson"}; value and ci95 None when there were no requests."""
    n, k = stats.requests, stats.errors
    if n == 0:
        return {"value": None, "ci95": None, "method": "wilson"}
    return {"value": k / n, "ci95": _wilson(k, n), "method": "wilson"}


def outcome_summary(m: Moments) -> dict:
    """{"n", "mean", "ci95", "method"}: Wilson when every outcome was 0 or 1, else t; ci95 None when n < 2."""
    method = "wilson" if m.binary else "t"
    if m.n < 2:
        return {"n": m.n, "mean": m.mean, "ci95": None, "method": method}
    if m.binary:
        ci = _wilson(round(m.sum), m.n)
    else:
        half = st.t.ppf(0.5 + CONFIDENCE / 2, m.n - 1) * math.sqrt(m.variance / m.n)
        ci = [m.mean - half, m.mean + half]
    return {"n": m.n, "mean": m.mean, "ci95": ci, "method": method}


def compare(arm: Moments, control: Moments) -> dict | None:
    """{"difference" (arm - control), "ci95", "p_value" (two-sided), "test"}; None when either has n < 2.

    When the test statistic's standard error is 0 (both sides constant) the p-value is 1.0 for equal means and
    0.0 for different ones, and the interval is [d, d]."""
    if arm.n < 2 or control.n < 2:
        return None
    d = arm.mean - control.mean
    z = st.norm.ppf(0.5 + CONFIDENCE / 2)
    if arm.binary and control.binary:
        test = "two-proportion z"
        p1, p0 = arm.mean, control.mean
        pooled = (arm.sum + control.sum) / (arm.n + control.n)
        se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / arm.n + 1 / control.n))
        se = math.sqrt(p1 * (1 - p1) / arm.n + p0 * (1 - p0) / control.n)
        p_value = 2 * st.norm.sf(abs(d) / se_pooled) if se_pooled > 0 else (1.0 if d == 0 else 0.0)
        ci = [max(-1.0, d - z * se), min(1.0, d + z * se)]
    else:
        test = "welch t"
        v1, v0 = arm.variance / arm.n, control.variance / control.n
        se = math.sqrt(v1 + v0)
        if se > 0:
            p_value = st.ttest_ind_from_stats(arm.mean, math.sqrt(arm.variance), arm.n, control.mean,
                                              math.sqrt(control.variance), control.n, equal_var=False).pvalue
            df = (v1 + v0) ** 2 / (v1 ** 2 / (arm.n - 1) + v0 ** 2 / (control.n - 1))
            half = st.t.ppf(0.5 + CONFIDENCE / 2, df) * se
            ci = [d - half, d + half]
        else:
            p_value = 1.0 if d == 0 else 0.0
            ci = [d, d]
    return {"difference": d, "ci95": ci, "p_value": float(p_value), "test": test}


def srm(arms: list[dict], stats: dict[str, ArmStats]) -> dict | None:
    """Pearson chi-square goodness of fit of distinct units per arm against the normalized weights, over the arms
    with weight > 0 (those with weight 0 are listed in "excluded" with their units). None when fewer than two
    arms have weight > 0 or no unit was seen. When an arm's units hit the cap the counts are not comparable:
    the test still runs but "units_capped" is True and it never alerts."""
    live = [a for a in arms if a["weight"] > 0]
    if len(live) < 2:
        return None
    observed = {a["name"]: len(stats[a["name"]].units) if a["name"] in stats else 0 for a in live}
    total = sum(observed.values())
    if total == 0:
        return None
    weight = sum(a["weight"] for a in live)
    expected = {a["name"]: total * a["weight"] / weight for a in live}
    chi2, p_value = st.chisquare(list(observed.values()), list(expected.values()))
    capped = any(stats[a["name"]].units_capped for a in live if a["name"] in stats)
    excluded = {a["name"]: len(stats[a["name"]].units) if a["name"] in stats else 0
                for a in arms if a["weight"] <= 0}
    return {"test": "pearson chi-square", "chi2": float(chi2), "df": len(live) - 1, "p_value": float(p_value),
            "alert": bool(p_value < SRM_THRESHOLD) and not capped, "threshold": SRM_THRESHOLD,
            "observed": observed, "expected": expected, "excluded": excluded, "units_capped": capped}


def guardrail_breaches(arms: list[dict], stats: dict[str, ArmStats], control: str, guardrails: dict) -> list[dict]:
    """Breaches among the arms with weight > 0, in arm order:
    - "error_rate": requests >= min_requests and the Wilson interval's lower bound above max_error_rate;
    - "outcome": not the control, both sides with >= min_outcomes outcomes, and compare()'s interval's upper
      bound below min_outcome_difference.
    At least one arm with weight > 0 is always left unlisted: when every such arm breaches, the control keeps
    its weight (or, when the control has weight 0, the first such arm)."""
    empty = ArmStats()
    max_rate = guardrails.get("max_error_rate")
    min_requests = guardrails.get("min_requests") or 0
    min_diff = guardrails.get("min_outcome_difference")
    min_outcomes = guardrails.get("min_outcomes") or 0
    ctrl = stats.get(control, empty)
    live = [a["name"] for a in arms if a["weight"] > 0]
    out: list[dict] = []
    for name in live:
        s = stats.get(name, empty)
        if max_rate is not None and s.requests > 0 and s.requests >= min_requests:
            rate = error_rate(s)
            if rate["ci95"][0] > max_rate:
                out.append({"arm": name, "reason": "error_rate", "error_rate": rate["value"], "ci95": rate["ci95"],
                            "requests": s.requests, "limit": max_rate, "method": rate["method"]})
        if (min_diff is not None and name != control
                and s.outcomes.n >= min_outcomes and ctrl.outcomes.n >= min_outcomes):
            c = compare(s.outcomes, ctrl.outcomes)
            if c is not None and c["ci95"][1] < min_diff:
                out.append({"arm": name, "reason": "outcome", "difference": c["difference"], "ci95": c["ci95"],
                            "limit": min_diff, "p_value": c["p_value"], "test": c["test"]})
    if live and {b["arm"] for b in out} >= set(live):
        keep = control if control in live else live[0]
        out = [b for b in out if b["arm"] != keep]
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def experiment_report(name: str, version: int, phase: int, arms: list[dict], control: str,
                      stats: dict[str, ArmStats], guardrails: dict, shadow: dict | None) -> dict:
    """The report GET /v1/experiments/{name}/report answers (see the module docstring for the tests)."""
    empty = ArmStats()
    total = sum(a["weight"] for a in arms)
    ctrl = stats.get(control, empty)
    rows = []
    for a in arms:
        s = stats.get(a["name"], empty)
        rows.append({
            "name": a["name"], "adapter": a["adapter"], "weight": a["weight"],
            "share": a["weight"] / total if total > 0 else None, "rolled_back": a.get("rolled_back"),
            "units": len(s.units), "units_capped": s.units_capped, "requests": s.requests,
            "anonymous_requests": s.anonymous_requests, "forced_requests": s.forced_requests,
            "errors": s.errors, "error_codes": dict(s.error_codes), "error_rate": error_rate(s),
            "latency_ms": {"n": s.latency.n, "p50": _ms(s.latency.quantile(0.5)), "p99": _ms(s.latency.quantile(0.99))},
            "outcome": outcome_summary(s.outcomes),
            "vs_control": None if a["name"] == control else compare(s.outcomes, ctrl.outcomes),
            "shadow": {"rows": s.shadow_run, "dropped": s.shadow_dropped, "failed": s.shadow_failed,
                       "late": s.shadow_late, "agreement": {"n": s.agreement.n, "mean": s.agreement.mean}},
        })
    report = {"object": "experiment.report", "experiment": name, "version": version, "phase": phase,
              "control": control, "arms": rows, "srm": srm(arms, stats), "guardrails": guardrails, "shadow": shadow}
    return _json_safe(report)


def _json_safe(x):
    """Plain Python values with every non-finite float replaced by None."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if hasattr(x, "dtype") and x.dtype.kind == "b":
        return bool(x)
    if isinstance(x, int) or (hasattr(x, "dtype") and x.dtype.kind in "iu"):
        return int(x)
    if isinstance(x, float) or hasattr(x, "dtype"):
        return _num(x)
    return x


# ---- the CLI table ----

def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _f(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(ci: list | None, fmt: str = ".3g") -> str:
    return "" if ci is None else f" [{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"


def _p(p: float | None) -> str:
    return "-" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def format_table(report: dict) -> str:
    """A plain-text table of a report: one line per arm, then the SRM check and the rollbacks."""
    head = ["arm", "adapter", "share", "units", "requests", "err rate", "p50 ms", "p99 ms",
            "outcome [95% CI]", "vs control [95% CI]", "shadow agree"]
    lines = []
    for a in report["arms"]:
        rate, out, vs, agree = a["error_rate"], a["outcome"], a["vs_control"], a["shadow"]["agreement"]
        lines.append([
            a["name"] + (" (control)" if a["name"] == report["control"] else ""),
            a["adapter"], _pct(a["share"]), f"{a['units']}{'+' if a['units_capped'] else ''}", str(a["requests"]),
            _pct(rate["value"], 2), _f(a["latency_ms"]["p50"], ".1f"), _f(a["latency_ms"]["p99"], ".1f"),
            "-" if out["mean"] is None else f"{_f(out['mean'])}{_ci(out['ci95'])} n={out['n']}",
            "-" if vs is None else f"{vs['difference']:+.3g}{_ci(vs['ci95'], '+.3g')} {_p(vs['p_value'])}",
            "-" if agree["mean"] is None else f"{agree['mean']:.3f} n={agree['n']}",
        ])
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + lines]
    s = report.get("srm")
    if s is None:
        text.append("SRM: not tested (fewer than two arms with weight > 0, or no units yet)")
    else:
        detail = f"chi2={s['chi2']:.2f} df={s['df']} p={s['p_value']:.3g}"
        if s["alert"]:
            text.append(f"SRM ALERT: {detail} < {s['threshold']}: units per arm do not match the weights")
        elif s.get("units_capped"):
            text.append(f"SRM: {detail} (not judged: the unit count was capped)")
        else:
            text.append(f"SRM: {detail} OK")
    for a in report["arms"]:
        if a["rolled_back"]:
            why = ", ".join(f"{k}={v}" for k, v in a["rolled_back"].items())
            text.append(f"rolled back: {a['name']}: {why}")
    return "\n".join(text)
