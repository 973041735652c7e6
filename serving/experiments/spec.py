"""An experiment's definition: the body of PUT /v1/experiments/{name} and of the serve config's `experiments:`,
its static checks, and the versioned record that is stored and served.

Static checks (here): valid arm names, each once; weights finite, >= 0, with a positive sum; the control one of
the arms; every adapter a valid reference and never an experiment; shadow percent in [0, 100]. The checks that
need the model (every adapter exists, all share a base and a task) are the ingress's (serving/app/experiment_routes.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from adapters_store import AdapterError, check_name, parse_ref

from .assign import Allocation

MAX_ARMS = 16
MAX_SALT_CHARS = 128
BASE_REFS = ("base",)  # an arm may serve the base model itself (e.g. embeddings without an adapter)


class SpecError(ValueError):
    """A definition that cannot be used; the message names the field. `status`: 409 for a name already taken."""

    def __init__(self, message: str, code: str = "invalid_experiment", status: int = 422):
        super().__init__(message)
        self.code, self.status = code, status


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ArmBody(_Strict):
    name: str
    adapter: str  # "name" (its latest version when requested) or "name@N"; "base": the base model
    weight: float = Field(ge=0)


class ShadowBody(_Strict):
    adapter: str
    percent: float = Field(ge=0, le=100)


class GuardrailsBody(_Strict):
    max_error_rate: float | None = Field(None, ge=0, le=1)  # an arm whose error-rate 95 % CI lies above: weight 0
    min_requests: int = Field(100, ge=1)  # requests an arm has before its error rate is judged
    min_outcome_difference: float | None = None  # (arm - control) outcome means: CI entirely below -> weight 0
    min_outcomes: int = Field(100, ge=2)  # outcomes each side has before the difference is judged


class ExperimentBody(_Strict):
    arms: list[ArmBody] = Field(min_length=1, max_length=MAX_ARMS)
    control: str | None = None  # the arm others are compared with; None: the first
    shadow: ShadowBody | None = None
    salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)  # None: the experiment's name
    guardrails: GuardrailsBody = GuardrailsBody()
    # optimistic concurrency: the version this change was made from (0: the experiment must not exist yet);
    # another version is a 409, nothing changed
    if_version: int | None = Field(None, ge=0)


@dataclass(frozen=True)
class Arm:
    name: str
    adapter: str  # as defined: "name", "name@N" or "base"
    weight: float


@dataclass(frozen=True)
class Experiment:
    """One stored version of an experiment (the record's runtime form)."""

    name: str
    version: int
    uid: str  # the same across updates; new when the name is created again
    phase: int  # a new phase (statistics start over) when arms, their adapters, weights or salt change
    arms: tuple[Arm, ...]
    control: str
    shadow: ShadowBody | None
    salt: str
    guardrails: GuardrailsBody
    allocation: Allocation
    task: str | None  # the arms' shared head task (None: no head, embeddings)
    base: str
    rolled_back: dict  # arm name -> what the guardrail saw when it set the weight to 0
    origin: str  # "api" | "config"
    config_sha256: str | None  # the config definition this version descends from (origin config)
    created: float
    updated: float

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def adapters(self) -> list[str]:
        out = [a.adapter for a in self.arms]
        return out + [self.shadow.adapter] if self.shadow is not None else out

    def to_record(self) -> dict:
        return {"name": self.name, "version": self.version, "uid": self.uid, "phase": self.phase,
                "arms": [{"name": a.name, "adapter": a.adapter, "weight": a.weight} for a in self.arms],
                "control": self.control, "shadow": self.shadow.model_dump() if self.shadow else None,
                "salt": self.salt, "guardrails": self.guardrails.model_dump(), "allocation": self.allocation.runs(),
                "task": self.task, "base": self.base, "rolled_back": self.rolled_back, "origin": self.origin,
                "config_sha256": self.config_sha256, "created": self.created, "updated": self.updated}

    def public(self) -> dict:
        """The experiment as the admin routes answer it."""
        total = sum(a.weight for a in self.arms)
        counts = self.allocation.counts(len(self.arms))
        arms = [{"name": a.name, "adapter": a.adapter, "weight": a.weight, "share": a.weight / total,
                 "buckets": counts[i], "rolled_back": self.rolled_back.get(a.name)} for i, a in enumerate(self.arms)]
        record = self.to_record()
        del record["allocation"], record["name"]
        return {"object": "experiment", "id": self.name, **record, "arms": arms}

    @classmethod
    def from_record(cls, record: dict) -> "Experiment":
        """ValueError when the stored record is not a valid experiment."""
        try:
            arms = tuple(Arm(a["name"], a["adapter"], float(a["weight"])) for a in record["arms"])
            shadow = ShadowBody(**record["shadow"]) if record.get("shadow") else None
            return cls(str(record["name"]), int(record["version"]), str(record["uid"]), int(record["phase"]), arms,
                       str(record["control"]), shadow, str(record["salt"]), GuardrailsBody(**record["guardrails"]),
                       Allocation.from_runs(record["allocation"], len(arms)), record.get("task"), str(record["base"]),
                       dict(record.get("rolled_back") or {}), str(record.get("origin", "api")),
                       record.get("config_sha256"), float(record["created"]), float(record["updated"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid experiment record: {type(exc).__name__}: {exc}") from None


def check_body(name: str, body: ExperimentBody, experiment_names=()) -> None:
    """The static checks (module docstring); SpecError naming the problem."""
    try:
        check_name(name)
    except AdapterError as exc:
        raise SpecError(str(exc).replace("adapter name", "experiment name"), "invalid_name") from None
    seen = set()
    for i, arm in enumerate(body.arms):
        try:
            check_name(arm.name)
        except AdapterError:
            raise SpecError(f"arms[{i}].name {arm.name[:80]!r}: use 1-128 letters, digits, '.', '_' or '-'",
                            "invalid_experiment") from None
        if arm.name in seen:
            raise SpecError(f"arms[{i}].name {arm.name!r} is used twice: arm names must be unique")
        seen.add(arm.name)
        _check_ref(f"arms[{i}].adapter", arm.adapter, name, experiment_names)
    if sum(a.weight for a in body.arms) <= 0:
        raise SpecError("arms: the weights sum to 0; at least one arm needs a positive weight")
    if body.control is not None and body.control not in seen:
        raise SpecError(f"control {body.control!r} is not one of the arms ({', '.join(sorted(seen))})")
    if body.shadow is not None:
        _check_ref("shadow.adapter", body.shadow.adapter, name, experiment_names)


def _check_ref(field: str, ref: str, name: str, experiment_names) -> None:
    if ref in BASE_REFS:
        return
    try:
        adapter, _ = parse_ref(ref)
    except AdapterError as exc:
        raise SpecError(f"{field}: {exc}") from None
    if adapter == name or adapter in experiment_names:
        raise SpecError(f"{field} {ref!r} is an experiment: an arm serves an adapter, not another experiment")


def config_sha256(body: ExperimentBody) -> str:
    data = body.model_dump(exclude={"if_version"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def next_version(name: str, body: ExperimentBody, previous: Experiment | None, *, task: str | None, base: str,
                 origin: str = "api", config_hash: str | None = None, now: float | None = None) -> Experiment:
    """The experiment `body` defines, as the version after `previous` (None: a new experiment). The allocation
    moves as few units as assign.py allows; a change of arms, their adapters, weights or salt starts a new phase."""
    now = time.time() if now is None else now
    arms = tuple(Arm(a.name, a.adapter, float(a.weight)) for a in body.arms)
    salt = body.salt or name
    weights = [a.weight for a in arms]
    if previous is None or previous.salt != salt:
        allocation = Allocation.initial(weights)
    else:
        allocation = previous.allocation.rebalanced([a.name for a in previous.arms], [a.name for a in arms], weights)
    same_split = (previous is not None and previous.salt == salt  # the same arms serving the same adapters alike
                  and [(a.name, a.adapter, a.weight) for a in previous.arms] == [(a.name, a.adapter, a.weight)
                                                                                 for a in arms])
    phase = 1 if previous is None else previous.phase if same_split else previous.phase + 1
    rolled = {k: v for k, v in (previous.rolled_back if previous else {}).items()
              if (arm := next((a for a in arms if a.name == k), None)) is not None and arm.weight == 0}
    return Experiment(name, 1 if previous is None else previous.version + 1,
                      secrets.token_hex(8) if previous is None else previous.uid, phase, arms,
                      body.control or arms[0].name, body.shadow, salt, body.guardrails, allocation, task, base, rolled,
                      origin if previous is None or origin == "config" else previous.origin,
                      config_hash if config_hash is not None else (previous.config_sha256 if previous else None),
                      previous.created if previous else now, now)


def rolled_back(experiment: Experiment, evidence: dict[str, dict], now: float | None = None) -> Experiment:
    """The next version with each arm of `evidence` (arm name -> what the guardrail saw) at weight 0: a rollback."""
    body = ExperimentBody(arms=[ArmBody(name=a.name, adapter=a.adapter, weight=0.0 if a.name in evidence else a.weight)
                                for a in experiment.arms],
                          control=experiment.control, shadow=experiment.shadow, salt=experiment.salt,
                          guardrails=experiment.guardrails)
    out = next_version(experiment.name, body, experiment, task=experiment.task, base=experiment.base,
                       origin=experiment.origin, now=now)
    return dataclasses.replace(out, rolled_back={**out.rolled_back, **evidence})


def body_of(experiment: Experiment) -> ExperimentBody:
    return ExperimentBody(arms=[ArmBody(name=a.name, adapter=a.adapter, weight=a.weight) for a in experiment.arms],
                          control=experiment.control, shadow=experiment.shadow, salt=experiment.salt,
                          guardrails=experiment.guardrails)
