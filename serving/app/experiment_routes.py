"""The Ingress's A/B side (a mixin of serving/app/http.py's Ingress): an experiment's alias resolved per request,
shadow rows, what each answer says about what served it, the admin routes and POST /v1/feedback.

Per request: a `model` naming an experiment is assigned an arm (serving/experiments/catalog.py: sticky by the
`user` body field, else the X-Polyhead-User header, else at random; X-Polyhead-Arm forces one and is left out of
the statistics), and its rows go to that arm's adapter. For `shadow.percent` % of requests each such row gets a
twin for the shadow adapter in the same model call (the same batch); shadows are best-effort: none is added while
`shadow_max_pending_rows` rows of this replica are at the model (counted dropped), and the model replica answers the
call when the primaries are done, whatever the shadows do (serving/app/deployments.py). A shadow answer is compared
with its primary (serving/experiments/shadow.py) and never returned. Every inference answer has an `id`; an
experiment's answer also names the resolved `adapter@N` in `model`, and the experiment and arm in
X-Polyhead-Experiment / X-Polyhead-Arm. Counts go to the app's ExperimentLedger (serving/experiments/ledger.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from adapters_store import AdapterError, check_name
from serving.experiments import ids
from serving.experiments.catalog import Assignment, ExperimentCatalog, UnknownArm
from serving.experiments.ledger import ExperimentLedger, LedgerClient, ledger_handle
from serving.experiments.persist import Conflict, ExperimentStore
from serving.experiments.spec import (BASE_REFS, ExperimentBody, SpecError, check_body, config_sha256, next_version)

from . import logs
from .bodies import FeedbackBody, read_json
from .errors import ApiError, exact_path_param, validation_summary
from .routing import BASE_ALIASES
from .web import app

log = logging.getLogger("ray.serve")
USER_HEADER, ARM_HEADER = "x-polyhead-user", "x-polyhead-arm"
EXPERIMENT_HEADER = "X-Polyhead-Experiment"
MAX_UNIT_KEY_CHARS = 256
# row error codes that are the arm's doing (its adapter): counted as the arm's errors (guardrails). Others (the
# client's input, overload) are not the arm's: such requests are not counted for it at all
ARM_ERRORS = frozenset({"non_finite_output", "adapter_invalid", "model_not_found", "internal_error"})


@dataclasses.dataclass
class Routed:
    """A request's experiments: what each `model` entry resolved to (None: not an experiment)."""

    assignments: list[Assignment | None]
    shadows: dict[int, str] = dataclasses.field(default_factory=dict)  # entry -> shadow adapter, where drawn


class ExperimentRoutes:
    """Mixin of Ingress (needs its cfg, model, metrics, base_name, _serve, _parse, _check_admin)."""

    def _init_experiments(self) -> None:
        self.experiment_store = ExperimentStore(self.cfg.store_root)
        self.catalog = ExperimentCatalog(self.experiment_store, self.cfg.experiments_poll_s)
        self.catalog.on_change(self._experiment_gauges)
        self.ledger: LedgerClient | None = None
        self._experiments_ready: asyncio.Future | None = None
        self._id_key: bytes | None = None

    async def _ensure_experiments(self) -> None:
        """Once: the config's experiments published, the catalog read, the ledger found; then kept in step."""
        if self._experiments_ready is None:
            self._experiments_ready = asyncio.ensure_future(self._start_experiments())
        if not self._experiments_ready.done():
            await asyncio.shield(self._experiments_ready)
        exc = self._experiments_ready.exception()
        if exc is not None:
            self._experiments_ready = None  # tried again by the next request
            raise ApiError(503, f"experiments are unavailable: {type(exc).__name__}: {str(exc)[:200]}",
                           "unavailable", {"Retry-After": str(self.cfg.retry_after_s)})

    async def _start_experiments(self) -> None:
        self._id_key = await asyncio.to_thread(self.experiment_store.secret)
        await asyncio.to_thread(self._publish_config_experiments)
        await self.catalog.refresh()
        self.ledger = LedgerClient(await asyncio.to_thread(self._ledger), self.cfg.experiment_push_s)
        self.catalog.ensure_started()
        self.ledger.ensure_started()
        if self.cfg.experiments:
            self._config_check = asyncio.ensure_future(self._check_config_experiments())

    async def _check_config_experiments(self) -> None:
        """The config's experiments were published without the model's checks (it may not run yet): make them
        now, and log what fails (their requests would answer the arm's error, e.g. 404 for a missing adapter)."""
        for name, data in self.cfg.experiments.items():
            try:
                await self._arm_task(ExperimentBody.model_validate(data))
            except ApiError as exc:
                log.warning("polyhead: experiment %r of the serve config: %s", name, exc.message)
            except Exception as exc:  # noqa: BLE001 - the model is not there (yet): nothing to report
                log.info("polyhead: experiment %r of the serve config not checked: %s", name, type(exc).__name__)

    def _ledger(self):
        kwargs = dict(max_units=self.cfg.max_experiment_units, feedback_ttl_s=self.cfg.feedback_ttl_s,
                      max_feedback_ids=self.cfg.max_feedback_ids)
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - outside Serve: this process's own
            return ExperimentLedger(self.cfg.store_root, **kwargs)
        return ledger_handle(app_name, self.cfg.store_root, **kwargs)

    def _publish_config_experiments(self) -> None:
        """The config's `experiments` as versions of the store, each unless the store's current version already
        descends from that same definition (a restart keeps live changes; an edited definition replaces them)."""
        for name, data in self.cfg.experiments.items():
            body = ExperimentBody.model_validate(data)
            digest = config_sha256(body)
            for _ in range(5):
                highest, record = self.experiment_store.current(name)
                previous = self.experiment_store.latest(name) if record is not None else None
                if previous is not None and previous.config_sha256 == digest:
                    break
                new = next_version(name, body, previous, task=previous.task if previous else None,
                                   base=self.base_name, origin="config", config_hash=digest)
                try:
                    self.experiment_store.write(dataclasses.replace(new, version=highest + 1))
                    break
                except Conflict:
                    continue  # another replica published it at the same time: look again

    # per request ------------------------------------------------------------------------------

    async def _route_experiments(self, request: Request, body, pairs: list[tuple[str, str | None]]) -> list:
        """`pairs` (model as given, reference) with each experiment's alias replaced by its arm's adapter; the
        assignments go on request.state.routed for _serve and the answer."""
        if not any(ref is not None and "@" not in ref for _, ref in pairs):
            return pairs
        await self._ensure_experiments()
        if not any(ref in self.catalog for _, ref in pairs):
            return pairs
        key = getattr(body, "user", None)
        if key is None:
            key = request.headers.get(USER_HEADER)
        if key is not None and not 0 < len(key) <= MAX_UNIT_KEY_CHARS:
            raise ApiError(422, f"the unit key (user, X-Polyhead-User) must have 1-{MAX_UNIT_KEY_CHARS} characters",
                           "invalid_field")
        forced = request.headers.get(ARM_HEADER)
        out, assignments, shadows = [], [], {}
        for i, (model, ref) in enumerate(pairs):
            experiment = self.catalog.get(ref) if ref is not None else None
            if experiment is None:
                out.append((model, ref))
                assignments.append(None)
                continue
            try:
                assignment = self.catalog.assign(experiment, key, forced)
            except UnknownArm as exc:
                raise ApiError(422, str(exc), "unknown_arm") from None
            adapter = assignment.arm.adapter
            out.append((model, None if adapter in BASE_REFS else adapter))
            assignments.append(assignment)
            shadow = experiment.shadow
            if shadow is not None and shadow.percent > 0 and random.random() * 100 < shadow.percent:
                shadows[i] = None if shadow.adapter in BASE_REFS else shadow.adapter
        request.state.routed = Routed(assignments, shadows)
        logs.note(experiment=[a.experiment.name + "/" + a.arm.name for a in assignments if a])
        return out

    def _shadow_rows(self, request: Request, rows: list[dict], entry_of: list[int]) -> tuple[list[dict], list[int]]:
        """Twins of `rows` (entry_of: each row's `model` entry) for the entries that drew a shadow: (rows, the
        primary row of each), none while this replica has shadow_max_pending_rows rows at the model."""
        routed: Routed | None = getattr(request.state, "routed", None)
        if routed is None or not routed.shadows:
            return [], []
        twins = [(j, routed.shadows[e]) for j, e in enumerate(entry_of) if e in routed.shadows]
        limit = self.cfg.shadow_max_pending_rows
        limit = self.cfg.max_batch_size if limit is None else limit
        if self.admission.pending_rows + len(rows) + len(twins) > limit:
            for j, _ in twins:  # each shadow row counted dropped
                a = routed.assignments[entry_of[j]]
                self.metrics.ab_shadow_rows.labels(a.experiment.name, "dropped").inc()
                self.ledger.arm(a.experiment, a.arm.name).shadow_dropped += 1
            routed.shadows = {}
            return [], []
        return [dict(rows[j], adapter=ref, shadow=True) for j, ref in twins], [j for j, _ in twins]

    def _compare_shadows(self, request: Request, entry_of: list[int], primary_of: list[int], shadow_results: list,
                         agreement) -> None:
        """Record each shadow row: its agreement with its primary (agreement(primary row, shadow result) -> float),
        or its failure (an error, or not done when its primary was)."""
        routed: Routed | None = getattr(request.state, "routed", None)
        for j, res in zip(primary_of, shadow_results):
            a = routed.assignments[entry_of[j]]
            name, arm = a.experiment.name, a.arm.name
            stats = self.ledger.arm(a.experiment, arm)
            if res.get("code") == "shadow_late":
                outcome = "late"
                stats.shadow_late += 1
            elif res.get("error"):
                outcome = "failed"
                stats.shadow_failed += 1
            else:
                outcome = "run"
                stats.shadow_run += 1
                value = agreement(j, res)
                if value is not None and math.isfinite(value):
                    stats.agreement.observe(value)
                    self.metrics.ab_agreement.labels(name, arm).observe(value)
            self.metrics.ab_shadow_rows.labels(name, outcome).inc()

    def _served_model(self, request: Request, entry: int, model: str, res: dict) -> str:
        """The `model` an answer names: an experiment's entries name the resolved adapter@N."""
        routed: Routed | None = getattr(request.state, "routed", None)
        if routed is None or routed.assignments[entry] is None:
            return model
        return res.get("resolved") or self.base_name

    def _answer_id(self, route: str, request: Request) -> str:
        routed: Routed | None = getattr(request.state, "routed", None)
        served = [ids.Served(a.experiment.name, a.experiment.uid, a.experiment.phase, a.arm.name)
                  for a in (routed.assignments if routed else ()) if a is not None and not a.forced]
        if not served or self._id_key is None:
            return ids.plain_id(route)
        return ids.experiment_id(self._id_key, served)

    def _finish_experiments(self, request: Request, response, code: str | None, elapsed: float) -> None:
        """After _serve: the experiment headers, and the request's counts for its arms."""
        routed: Routed | None = getattr(getattr(request, "state", None), "routed", None)
        if routed is None:
            return
        chosen = [a for a in routed.assignments if a is not None]
        response.headers[EXPERIMENT_HEADER] = ",".join(a.experiment.name for a in chosen)
        response.headers["X-Polyhead-Arm"] = ",".join(a.arm.name for a in chosen)
        status = response.status_code
        counted = status < 400 or code in ARM_ERRORS or status >= 500 and code not in ("unavailable", "draining")
        for a in chosen:
            name, arm = a.experiment.name, a.arm.name
            self.metrics.ab_requests.labels(name, arm, status).inc()
            if a.forced or not counted or self.ledger is None:
                if a.forced and self.ledger is not None:
                    self.ledger.arm(a.experiment, arm).forced_requests += 1
                continue
            stats = self.ledger.arm(a.experiment, arm)
            stats.requests += 1
            if a.unit is None:
                stats.anonymous_requests += 1
            else:
                stats.units.add(a.unit)
            if status >= 400:
                stats.errors += 1
                stats.error_codes[code or str(status)] = stats.error_codes.get(code or str(status), 0) + 1
                self.metrics.ab_errors.labels(name, arm, code or str(status)).inc()
            else:
                stats.latency.observe(elapsed)
                self.metrics.ab_latency.labels(name, arm).observe(elapsed)

    def _experiment_gauges(self, old: dict, new: dict) -> None:
        """Each arm's weight and rollback state as gauges; a deleted experiment's series go."""
        for name in set(old) - set(new):
            for key in ("ab_weight", "ab_rolled_back"):
                getattr(self.metrics, key).remove("experiment", name)
        for name, experiment in new.items():
            if old.get(name) is experiment:
                continue
            for arm in experiment.arms:
                self.metrics.ab_weight.labels(name, arm.name).set(arm.weight)
                self.metrics.ab_rolled_back.labels(name, arm.name).set(1 if arm.name in experiment.rolled_back else 0)

    async def _experiment_models(self) -> list[dict]:
        """GET /v1/models's entries for the experiments (a client names them as `model` like adapters)."""
        try:
            await self._ensure_experiments()
        except ApiError:
            return []
        return [_model_entry(e) for _, e in sorted(self.catalog.experiments.items())]

    async def _experiment_model(self, name: str) -> dict | None:
        if "@" in name:
            return None
        await self._ensure_experiments()
        experiment = self.catalog.get(name)
        return _model_entry(experiment) if experiment is not None else None

    # admin routes -----------------------------------------------------------------------------

    @app.get("/v1/experiments")
    async def list_experiments(self, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            await self._ensure_experiments()
            await self.catalog.refresh()
            data = [e.public() for _, e in sorted(self.catalog.experiments.items())]
            broken = [{"id": k, "error": v} for k, v in sorted(self.catalog.broken.items())]
            return JSONResponse({"object": "list", "data": data, "broken": broken})

        return await self._serve("experiments", request, handler)

    @app.get("/v1/experiments/{name}")
    async def get_experiment(self, name: str, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            return JSONResponse((await self._current_experiment(request, name)).public())

        return await self._serve("experiments", request, handler)

    @app.get("/v1/experiments/{name}/report")
    async def experiment_report(self, name: str, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            experiment = await self._current_experiment(request, name, "/report")
            return JSONResponse(await self.ledger.report(experiment))

        return await self._serve("experiments", request, handler)

    async def _current_experiment(self, request: Request, name: str, suffix: str = ""):
        if not request.scope.get("path", "").endswith(name + suffix):  # as exact_path_param: no name%0a
            raise ApiError(404, "unknown experiment: the name in the path holds a character no name has",
                           "experiment_not_found")
        await self._ensure_experiments()
        experiment = await asyncio.to_thread(self._read_experiment, name)
        if experiment is None:
            raise ApiError(404, f"unknown experiment {name[:80]!r}", "experiment_not_found")
        return experiment

    def _read_experiment(self, name: str):
        try:
            return self.experiment_store.latest(name)
        except (OSError, ValueError):
            return None

    @app.put("/v1/experiments/{name}")
    async def put_experiment(self, name: str, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            exact_path_param(request, name)
            logs.note(action="experiment.put", adapter=name[:logs.MAX_CHARS])
            data = await read_json(request, self.cfg.max_body_bytes)
            try:
                body = ExperimentBody.model_validate(data)
            except ValidationError as exc:
                raise ApiError(422, validation_summary(exc.errors(include_input=False)), "invalid_experiment") from None
            await self._ensure_experiments()
            experiment, created, warnings = await self._define(name, body)
            logs.note(version=experiment.version)
            return JSONResponse(dict(experiment.public(), warnings=warnings), status_code=201 if created else 200)

        return await self._serve("experiments", request, handler)

    async def _define(self, name: str, body: ExperimentBody):
        """Check `body` fully, then publish it as `name`'s next version: (experiment, created, warnings)."""
        try:
            check_name(name)
        except AdapterError as exc:
            raise ApiError(422, str(exc).replace("adapter name", "experiment name"), "invalid_name") from None
        if name == self.base_name or name in BASE_ALIASES:
            raise ApiError(409, f"experiment name {name!r} is the base model's name", "name_taken")
        if name in self.cfg.adapters:
            raise ApiError(409, f"experiment name {name!r} is a config adapter's name (`adapters`): an experiment's "
                           "name must not be an adapter's", "name_taken")
        named = await self.model.describe_adapter.remote(name)
        if not named.get("error"):
            raise ApiError(409, f"experiment name {name!r} is a registered adapter's name: an experiment's name must "
                           "not be an adapter's", "name_taken")
        try:
            check_body(name, body, set(self.catalog.experiments) - {name})
        except SpecError as exc:
            raise ApiError(exc.status, str(exc), exc.code) from None
        task, warnings = await self._arm_task(body)
        highest, record = await asyncio.to_thread(self.experiment_store.current, name)
        previous = await asyncio.to_thread(self.experiment_store.latest, name) if record is not None else None
        have = previous.version if previous is not None else 0
        if body.if_version is not None and body.if_version != have:
            what = f"is at version {have}" if have else "does not exist"
            raise ApiError(409, f"experiment {name!r} {what}, not {body.if_version} (if_version): read it again",
                           "version_conflict")
        new = next_version(name, body, previous, task=task, base=self.base_name)
        new = dataclasses.replace(new, version=highest + 1)
        try:
            await asyncio.to_thread(self.experiment_store.write, new)
        except Conflict:
            raise ApiError(409, f"experiment {name!r} was changed by someone else meanwhile: read it again",
                           "version_conflict") from None
        self.catalog.put(new, name)
        return new, previous is None, warnings

    async def _arm_task(self, body: ExperimentBody) -> tuple[str | None, list[str]]:
        """The task every arm (and the shadow) shares; ApiError for a missing adapter or a mix of tasks or bases."""
        fields = [(f"arms[{i}].adapter", a.adapter) for i, a in enumerate(body.arms)]
        if body.shadow is not None:
            fields.append(("shadow.adapter", body.shadow.adapter))
        described = {}
        for ref in {ref for _, ref in fields if ref not in BASE_REFS}:
            described[ref] = await self.model.describe_adapter.remote(ref)
        tasks, labels = {}, {}
        for field, ref in fields:
            if ref in BASE_REFS:
                tasks[field], labels[field] = None, None
                continue
            entry = described[ref]
            if entry.get("error"):
                raise ApiError(422, f"{field}: {entry['error']}", "unknown_adapter")
            if entry.get("base", self.base_name) != self.base_name:  # several bases: every arm on one
                raise ApiError(422, f"{field} {ref!r} is an adapter of base {entry['base']!r}, not of "
                               f"{self.base_name!r}: all arms share a base", "base_mismatch")
            tasks[field], labels[field] = entry.get("task"), entry.get("labels")
        if len(set(tasks.values())) > 1:
            listed = ", ".join(f"{f} {t or 'no head'}" for f, t in tasks.items())
            raise ApiError(422, f"the arms must share a task: {listed}", "task_mismatch")
        warnings = []
        if len({json.dumps(v) for v in labels.values()}) > 1:
            warnings.append("the arms' heads answer different labels: " +
                            "; ".join(f"{f}: {v}" for f, v in labels.items()))
        return next(iter(tasks.values())), warnings

    @app.delete("/v1/experiments/{name}")
    async def delete_experiment(self, name: str, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            exact_path_param(request, name)
            logs.note(action="experiment.delete", adapter=name[:logs.MAX_CHARS])
            if name in self.cfg.experiments:
                raise ApiError(409, f"experiment {name!r} comes from the serve config (`experiments`); remove it "
                               "there and redeploy (ramp it to a single arm to stop it live)", "config_experiment")
            await self._ensure_experiments()
            highest, record = await asyncio.to_thread(self.experiment_store.current, name)
            if record is None:
                raise ApiError(404, f"unknown experiment {name[:80]!r}", "experiment_not_found")
            try:
                await asyncio.to_thread(self.experiment_store.delete, name, highest + 1)
            except Conflict:
                raise ApiError(409, f"experiment {name!r} was changed meanwhile: try again", "version_conflict") from None
            self.catalog.put(None, name)
            await self.ledger.forget(name)
            return JSONResponse({"id": name, "object": "experiment", "deleted": True})

        return await self._serve("experiments", request, handler)

    # outcomes ---------------------------------------------------------------------------------

    @app.post("/v1/feedback")
    async def feedback(self, request: Request):
        return await self._serve("feedback", request, self._feedback)

    async def _feedback(self, request: Request):
        body = self._parse(FeedbackBody, await read_json(request, self.cfg.max_body_bytes))
        value = float(body.value)
        await self._ensure_experiments()
        try:
            issued, served = ids.parse(self._id_key, body.id)
        except ids.BadId as exc:
            raise ApiError(404, f"id {body.id[:80]!r}: {exc}", "unknown_id") from None
        out = await self.ledger.feedback(body.id, issued, [(s.experiment, s.uid, s.phase, s.arm) for s in served],
                                         value)
        if out["status"] == "duplicate":
            raise ApiError(409, "an outcome was already recorded for this id", "duplicate_feedback")
        if out["status"] == "expired":
            raise ApiError(410, f"id issued more than {self.cfg.feedback_ttl_s:g} s ago (feedback_ttl_s), or before "
                           "the outcomes the server remembers: not counted", "feedback_expired")
        for entry in out["counted"]:
            self.metrics.ab_outcomes.labels(entry["experiment"], entry["arm"]).inc()
            self.metrics.ab_outcome_sum.labels(entry["experiment"], entry["arm"]).inc(value)
        return JSONResponse({"object": "feedback", "id": body.id, "value": value, "counted": out["counted"],
                             "not_counted": out["not_counted"]})


def _model_entry(experiment) -> dict:
    total = sum(a.weight for a in experiment.arms)
    return {"id": experiment.name, "object": "model", "created": int(experiment.created), "owned_by": "polyhead",
            "parent": experiment.base, "task": experiment.task, "labels": None,
            "experiment": {"version": experiment.version, "arms": [
                {"name": a.name, "adapter": a.adapter, "share": a.weight / total} for a in experiment.arms]}}
