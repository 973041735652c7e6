"""ExperimentLedger: the one place that sees every ingress replica's experiment counts (a named Ray actor per app).

Each ingress replica buffers what its requests did per (experiment, arm) (stats.py: requests, errors, latency,
units, shadow comparisons) and pushes the buffer every `push_s` (LedgerClient); reports, outcomes and guardrails
are computed here, on the sum. Counts are kept per experiment *phase*: a change of arms, weights or salt starts a
new phase (the split changed, so counts from before are not comparable); the last phase's final report is kept
beside the current one.

Outcomes (POST /v1/feedback): the id says what served the answer (ids.py); the ledger counts each id once. It
remembers counted ids for `feedback_ttl_s` and at most `max_feedback_ids` of them: an id issued before what it still
remembers (older than the TTL, or evicted by the cap) is refused as expired, so no id is ever counted twice.

Guardrails: after each push, an arm whose error rate (or outcome difference) breaches its experiment's limits
(report.guardrail_breaches) gets weight 0 in a new version written to the ExperimentStore (every ingress replica
applies it within its catalog's poll), logged, and recorded in the version (`rolled_back`) and in the report.

The ledger lives in memory: counts start over if its actor restarts (it is detached from the replicas, so an
ingress replica's restart does not lose them).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from .persist import Conflict, ExperimentStore
from .report import experiment_report, guardrail_breaches
from .spec import Experiment, rolled_back
from .stats import ArmStats, ExperimentStats  # noqa: F401 - ArmStats: what LedgerClient.arm returns

log = logging.getLogger("ray.serve")
WARN_EVERY_S = 60.0
LEDGER_NAMESPACE = "polyhead"


class ExperimentLedger:
    def __init__(self, store_root: str, max_units: int = 1_000_000, feedback_ttl_s: float = 86_400.0,
                 max_feedback_ids: int = 1_000_000):
        self.store = ExperimentStore(store_root)
        self.max_units, self.feedback_ttl_s, self.max_feedback_ids = max_units, feedback_ttl_s, max_feedback_ids
        self.definitions: dict[str, Experiment] = {}  # name -> the newest version seen
        self.phases: dict[tuple[str, str, int], ExperimentStats] = {}  # (name, uid, phase) -> counts
        self.previous: dict[tuple[str, str], dict] = {}  # (name, uid) -> the last phase's final report
        self.counted: OrderedDict[str, float] = OrderedDict()  # feedback id -> issued (oldest first)
        self.horizon = 0.0  # ids issued at or before this are refused (evicted by the cap)
        self.rollbacks = 0

    # counts -----------------------------------------------------------------------------------

    def push(self, deltas: list[dict]) -> int:
        """[{"definition": Experiment record, "arms": {arm: ArmStats dict}}]; returns rollbacks made."""
        touched = set()
        for delta in deltas:
            experiment = self._see(Experiment.from_record(delta["definition"]))
            key = (experiment.name, experiment.uid, delta["definition"]["phase"])
            stats = self.phases.get(key)
            if stats is None:
                if not self._kept(key):
                    continue  # a phase already summarised: late counts of an old split
                stats = self.phases[key] = ExperimentStats(key[2])
            stats.merge({"phase": key[2], "arms": delta["arms"]}, self.max_units)
            touched.add(experiment.name)
        made = 0
        for name in touched:
            made += self._guard(name)
        return made

    def _see(self, experiment: Experiment) -> Experiment:
        """Remember the newest version of an experiment; a new phase keeps the last one's final report."""
        known = self.definitions.get(experiment.name)
        if known is not None and known.uid == experiment.uid and known.version >= experiment.version:
            return known
        if known is not None and (known.uid != experiment.uid or known.phase != experiment.phase):
            old = (known.name, known.uid, known.phase)
            if old in self.phases and known.uid == experiment.uid:
                self.previous[(known.name, known.uid)] = self._report(known, self.phases[old])
            for key in [k for k in self.phases if k[0] == known.name and k != old]:
                del self.phases[key]  # older than the last phase
            if known.uid != experiment.uid:
                self.forget(known.name)
        self.definitions[experiment.name] = experiment
        return experiment

    def _learn(self, name: str) -> None:
        try:
            found = self.store.latest(name)
        except (OSError, ValueError):
            return
        if found is not None:
            self._see(found)

    def _kept(self, key: tuple[str, str, int]) -> bool:
        known = self.definitions.get(key[0])
        return known is not None and known.uid == key[1] and key[2] == known.phase

    def forget(self, name: str) -> None:
        """The experiment was deleted: its counts go."""
        self.definitions.pop(name, None)
        for key in [k for k in self.phases if k[0] == name]:
            del self.phases[key]
        for key in [k for k in self.previous if k[0] == name]:
            del self.previous[key]

    # guardrails -------------------------------------------------------------------------------

    def _guard(self, name: str) -> int:
        experiment = self.definitions[name]
        rails = experiment.guardrails
        if rails.max_error_rate is None and rails.min_outcome_difference is None:
            return 0
        stats = self.phases.get((name, experiment.uid, experiment.phase))
        if stats is None:
            return 0
        breaches = guardrail_breaches(_arms(experiment), stats.arms, experiment.control, rails.model_dump())
        if not breaches:
            return 0
        current = self.store.latest(name)
        if current is None or current.uid != experiment.uid or current.phase != experiment.phase:
            return 0  # changed meanwhile: judged again on the new version's counts
        evidence = {b["arm"]: dict(b, at=time.time(), version=current.version) for b in breaches}
        current = rolled_back(current, evidence)  # every breaching arm in one new version
        try:
            self.store.write(current)
        except Conflict:
            return 0  # someone changed it first: the next push judges the new version
        self.rollbacks += len(breaches)
        for breach in breaches:
            log.warning("polyhead experiment %s: guardrail rolled arm %r back to weight 0 (%s)", name, breach["arm"],
                        {k: v for k, v in breach.items() if k != "arm"})
        self._see(current)
        return len(breaches)

    # reports ----------------------------------------------------------------------------------

    def report(self, record: dict) -> dict:
        experiment = self._see(Experiment.from_record(record))
        stats = (self.phases.get((experiment.name, experiment.uid, experiment.phase))
                 or ExperimentStats(experiment.phase))
        out = self._report(experiment, stats)
        out["previous_phase"] = self.previous.get((experiment.name, experiment.uid))
        return out

    @staticmethod
    def _report(experiment: Experiment, stats: ExperimentStats) -> dict:
        out = experiment_report(experiment.name, experiment.version, experiment.phase, _arms(experiment),
                                experiment.control, stats.arms, experiment.guardrails.model_dump(),
                                experiment.shadow.model_dump() if experiment.shadow else None)
        out["rolled_back"] = experiment.rolled_back
        return out

    # outcomes ---------------------------------------------------------------------------------

    def feedback(self, response_id: str, issued: float, served: list[tuple[str, str, int, str]], value: float,
                 now: float | None = None) -> dict:
        """Count `value` for each (experiment, uid, phase, arm) that served the answer `response_id`, once.
        {"status": "counted" | "duplicate" | "expired", "counted": [{"experiment", "arm"}], "not_counted": [...]}"""
        now = time.time() if now is None else now
        self._expire(now)
        if response_id in self.counted:
            return {"status": "duplicate", "counted": [], "not_counted": []}
        if issued <= max(self.horizon, now - self.feedback_ttl_s):
            return {"status": "expired", "counted": [], "not_counted": []}
        counted, missed = [], []
        for name, uid, phase, arm in served:
            stats = self.phases.get((name, uid, phase))
            if stats is None and not self._kept((name, uid, phase)):
                self._learn(name)  # answered before any count reached the ledger: the store knows it
            if stats is None and self._kept((name, uid, phase)):
                stats = self.phases[(name, uid, phase)] = ExperimentStats(phase)
            entry = {"experiment": name, "arm": arm}
            if stats is None:  # deleted, or a phase already summarised
                missed.append(entry)
                continue
            stats.arm(arm).outcomes.observe(float(value))
            counted.append(entry)
        self.counted[response_id] = issued
        while len(self.counted) > self.max_feedback_ids:
            _, oldest = self.counted.popitem(last=False)
            self.horizon = max(self.horizon, oldest)
        return {"status": "counted", "counted": counted, "not_counted": missed}

    def _expire(self, now: float) -> None:
        limit = now - self.feedback_ttl_s
        while self.counted:
            rid, issued = next(iter(self.counted.items()))
            if issued > limit:
                break
            del self.counted[rid]

    def ping(self) -> bool:
        return True


def _arms(experiment: Experiment) -> list[dict]:
    return [{"name": a.name, "adapter": a.adapter, "weight": a.weight,
             "rolled_back": experiment.rolled_back.get(a.name)} for a in experiment.arms]


def ledger_name(app_name: str) -> str:
    return f"polyhead-experiments:{app_name}"


class LedgerClient:
    """An ingress replica's side: buffers counts per (experiment, phase) and pushes them every push_s.

    `ledger`: a Ray actor handle (calls are `.remote`), or an ExperimentLedger object (outside Serve)."""

    def __init__(self, ledger, push_s: float = 0.5):
        self.ledger, self.push_s = ledger, push_s
        self._remote = not isinstance(ledger, ExperimentLedger)
        self._buffer: dict[tuple[str, str, int], tuple[dict, ExperimentStats]] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.warned = -WARN_EVERY_S

    def arm(self, experiment: Experiment, arm: str) -> ArmStats:
        """The buffered counts of one arm of the experiment's current phase (record into it)."""
        key = (experiment.name, experiment.uid, experiment.phase)
        entry = self._buffer.get(key)
        if entry is None or entry[0]["version"] < experiment.version:
            stats = entry[1] if entry is not None else ExperimentStats(experiment.phase)
            entry = self._buffer[key] = (experiment.to_record(), stats)
        return entry[1].arm(arm)

    async def _call(self, method: str, *args):
        if self._remote:
            return await getattr(self.ledger, method).remote(*args)
        return getattr(self.ledger, method)(*args)

    async def flush(self) -> None:
        async with self._lock:
            if not self._buffer:
                return
            buffer, self._buffer = self._buffer, {}
            deltas = [{"definition": record, "arms": {a: s.to_dict() for a, s in stats.arms.items()}}
                      for record, stats in buffer.values() if not stats.is_empty()]
            if deltas:
                await self._call("push", deltas)

    async def report(self, experiment: Experiment) -> dict:
        await self.flush()
        return await self._call("report", experiment.to_record())

    async def feedback(self, response_id: str, issued: float, served: list, value: float) -> dict:
        await self.flush()
        return await self._call("feedback", response_id, issued, served, value)

    async def forget(self, name: str) -> None:
        self._buffer = {k: v for k, v in self._buffer.items() if k[0] != name}
        await self._call("forget", name)

    def ensure_started(self) -> None:
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.push_s)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - counts of this push are lost; serving goes on
                if time.monotonic() - self.warned >= WARN_EVERY_S:
                    self.warned = time.monotonic()
                    log.warning("polyhead: pushing experiment counts failed: %s: %s", type(exc).__name__, exc)


def ledger_handle(app_name: str, store_root: str, **kwargs):
    """The app's ExperimentLedger actor, created by the first replica that asks (detached: it outlives replicas), in
    a namespace of its own (a detached actor in a replica's anonymous namespace makes Ray print a warning on the
    driver's stdout, which carries the request log)."""
    import ray

    actor = ray.remote(ExperimentLedger)
    return actor.options(name=ledger_name(app_name), namespace=LEDGER_NAMESPACE, get_if_exists=True,
                         lifetime="detached", num_cpus=0, max_concurrency=1).remote(store_root, **kwargs)
