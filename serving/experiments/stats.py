"""Mergeable per-arm counts: each ingress replica keeps an ExperimentStats per experiment phase and sends it, as a
JSON-able dict, to the ledger actor, which merges the deltas. Nothing here does statistics (report.py does).

    LatencyHistogram  log-spaced buckets: index = floor(log(seconds / 1e-6) / log(1.02)), clamped at 0, so a
                      quantile is exact to the bucket's width (2 %); the answer is the bucket's geometric middle
    Moments           n, sum, sum of squares, min, max, and whether every value was 0 or 1 (binary outcomes)
    ArmStats          one arm's requests, errors, latency, outcomes, distinct units (64-bit key hashes, capped)
                      and shadow counts
    ExperimentStats   ArmStats by arm name, for one phase

Every `to_dict()` survives `json.loads(json.dumps(...))` unchanged, and `from_dict` accepts both its own output
and the JSON round trip (dict keys that were ints come back as strings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

HIST_FLOOR_S = 1e-6  # the lower edge of bucket 1; bucket 0 also holds everything below
HIST_RATIO = 1.02
_LOG_RATIO = math.log(HIST_RATIO)


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return value


class LatencyHistogram:
    """Latencies in seconds, in log-spaced buckets of ratio 1.02 (see the module docstring)."""

    def __init__(self, buckets: dict[int, int] | None = None):
        self.buckets: dict[int, int] = dict(buckets or {})  # bucket index -> count
        self.n = sum(self.buckets.values())

    @staticmethod
    def index(seconds: float) -> int:
        if seconds <= HIST_FLOOR_S:
            return 0
        return max(0, math.floor(math.log(seconds / HIST_FLOOR_S) / _LOG_RATIO))

    @staticmethod
    def middle(index: int) -> float:
        """The geometric middle of bucket `index`, in seconds."""
        return HIST_FLOOR_S * HIST_RATIO ** (index + 0.5)

    def observe(self, seconds: float) -> None:
        seconds = _finite(seconds, "latency")
        if seconds < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {seconds!r}")
        i = self.index(seconds)
        self.buckets[i] = self.buckets.get(i, 0) + 1
        self.n += 1

    def merge(self, other: "LatencyHistogram") -> None:
        for i, count in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + count
        self.n += other.n

    def quantile(self, q: float) -> float | None:
        """Seconds: the middle of the bucket holding the q-quantile (the smallest value with at least q*n values
        at or below it, as numpy's method="inverted_cdf"); None when empty."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        if self.n == 0:
            return None
        rank = max(1, math.ceil(q * self.n - 1e-9))
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen >= rank:
                return self.middle(i)
        return self.middle(max(self.buckets))  # not reached: seen ends at n >= rank

    def to_dict(self) -> dict:
        return {"buckets": {str(i): c for i, c in sorted(self.buckets.items()) if c}}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyHistogram":
        return cls({int(i): int(c) for i, c in (d.get("buckets") or {}).items()})


@dataclass
class Moments:
    """Running sums of observed values; `binary` stays True while every value is 0 or 1."""

    n: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    min: float | None = None  # min == max: the variance is exactly 0 (sums alone leave rounding error)
    max: float | None = None
    binary: bool = True

    def observe(self, value: float) -> None:
        value = _finite(value, "outcome value")
        self.n += 1
        self.sum += value
        self.sumsq += value * value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        self.binary = self.binary and value in (0.0, 1.0)

    def merge(self, other: "Moments") -> None:
        if other.n == 0:
            return
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)
        self.binary = self.binary and other.binary

    @property
    def mean(self) -> float | None:
        return self.sum / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """The sample variance (ddof=1); None when n < 2."""
        if self.n < 2:
            return None
        if self.min == self.max:
            return 0.0
        return max(0.0, (self.sumsq - self.sum * self.sum / self.n) / (self.n - 1))

    def to_dict(self) -> dict:
        return {"n": self.n, "sum": self.sum, "sumsq": self.sumsq, "min": self.min, "max": self.max,
                "binary": self.binary}

    @classmethod
    def from_dict(cls, d: dict) -> "Moments":
        n = int(d.get("n", 0))
        lo, hi = d.get("min"), d.get("max")
        return cls(n, float(d.get("sum", 0.0)), float(d.get("sumsq", 0.0)),
                   None if lo is None or n == 0 else float(lo), None if hi is None or n == 0 else float(hi),
                   bool(d.get("binary", True)))


_COUNTS = ("requests", "anonymous_requests", "forced_requests", "errors",
           "shadow_run", "shadow_dropped", "shadow_failed", "shadow_late")


@dataclass
class ArmStats:
    """One arm's counts. A request whose arm was forced by a header counts only in forced_requests; every other
    request counts in requests (and, without a unit key, in anonymous_requests too), latency and, when it
    failed, errors and error_codes."""

    requests: int = 0
    anonymous_requests: int = 0
    forced_requests: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)  # str(code) -> count
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    outcomes: Moments = field(default_factory=Moments)
    units: set[int] = field(default_factory=set)  # each distinct unit's 64-bit hash (assign.unit)
    units_capped: bool = False  # some unit was left out by the cap: `units` undercounts
    shadow_run: int = 0
    shadow_dropped: int = 0
    shadow_failed: int = 0
    shadow_late: int = 0
    agreement: Moments = field(default_factory=Moments)  # per shadow comparison: a value in [0, 1] or a cosine

    def record_request(self, seconds: float, *, unit: int | None, error_code: str | int | None = None) -> None:
        """One routed (not forced) request: its latency, its unit (None: anonymous) and its error, if any."""
        self.requests += 1
        self.latency.observe(seconds)
        if unit is None:
            self.anonymous_requests += 1
        else:
            self.units.add(unit)
        if error_code is not None:
            self.errors += 1
            self.error_codes[str(error_code)] = self.error_codes.get(str(error_code), 0) + 1

    def merge(self, delta: "ArmStats", max_units: int | None = None) -> None:
        """Adds `delta`'s counts; unions the units without growing the set past max_units (None: no cap)."""
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(delta, name))
        for code, count in delta.error_codes.items():
            self.error_codes[str(code)] = self.error_codes.get(str(code), 0) + count
        self.latency.merge(delta.latency)
        self.outcomes.merge(delta.outcomes)
        self.agreement.merge(delta.agreement)
        self.units_capped = self.units_capped or delta.units_capped
        new = delta.units - self.units
        room = len(new) if max_units is None else max(0, max_units - len(self.units))
        if len(new) > room:
            new = set(sorted(new)[:room])
            self.units_capped = True
        self.units |= new

    def is_empty(self) -> bool:
        return (not any(getattr(self, name) for name in _COUNTS) and not self.error_codes and self.latency.n == 0
                and self.outcomes.n == 0 and self.agreement.n == 0 and not self.units)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in _COUNTS}
        out.update(error_codes=dict(self.error_codes), latency=self.latency.to_dict(),
                   outcomes=self.outcomes.to_dict(), units=sorted(self.units), units_capped=self.units_capped,
                   agreement=self.agreement.to_dict())
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ArmStats":
        out = cls(**{name: int(d.get(name, 0)) for name in _COUNTS})
        out.error_codes = {str(k): int(v) for k, v in (d.get("error_codes") or {}).items()}
        out.latency = LatencyHistogram.from_dict(d.get("latency") or {})
        out.outcomes = Moments.from_dict(d.get("outcomes") or {})
        out.agreement = Moments.from_dict(d.get("agreement") or {})
        out.units = {int(u) for u in d.get("units") or ()}
        out.units_capped = bool(d.get("units_capped", False))
        return out


@dataclass
class ExperimentStats:
    """ArmStats by arm name for one phase of one experiment (a new phase starts the counts over)."""

    phase: int
    arms: dict[str, ArmStats] = field(default_factory=dict)

    def arm(self, name: str) -> ArmStats:
        """The arm's stats, made empty on first use."""
        return self.arms.setdefault(name, ArmStats())

    def merge(self, delta: "dict | ExperimentStats", max_units: int | None = None) -> None:
        """Adds a delta (its to_dict() or itself) of the same phase; ValueError for another phase."""
        if isinstance(delta, dict):
            delta = ExperimentStats.from_dict(delta)
        if delta.phase != self.phase:
            raise ValueError(f"cannot merge stats of phase {delta.phase} into phase {self.phase}")
        for name, arm in delta.arms.items():
            self.arm(name).merge(arm, max_units)

    def is_empty(self) -> bool:
        return all(a.is_empty() for a in self.arms.values())

    def to_dict(self) -> dict:
        return {"phase": self.phase, "arms": {name: a.to_dict() for name, a in self.arms.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentStats":
        return cls(int(d["phase"]), {str(k): ArmStats.from_dict(v) for k, v in (d.get("arms") or {}).items()})
