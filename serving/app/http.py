"""The HTTP ingress (FastAPI under @serve.ingress): validate, tokenize, fan rows out to ModelServer.

Every error is JSON {"error": {"message", "type", "code"}}; bad input is never a 500.
Bodies are read and parsed here (not by FastAPI) so that size limits, malformed JSON (400)
and invalid fields (422) each get their own status. Statuses come from exception types and
row error codes (ROW_CODES), never from the wording of a message.
Overload: a request arriving while this replica has max_pending_rows rows at the model, or refused by the
model deployment's queue limit (max_queued_requests, Ray's BackPressureError), is a 429 with Retry-After;
a model that is not ready, draining or unavailable is a 503 with Retry-After.
"""

import asyncio
import base64
import hmac
import json
import math
import time
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import AdapterError, check_name, parse_ref

from ..sentence import unit_length
from .admission import Admission, current_client, set_client
from .coalesce import Coalescer
from .config import ServeConfig
from .gate import ADMISSION_HEADER, GATED_HEADER, OVERLOADED, admission_header
from .hub import MetricsPusher
from .metrics import INGRESS_SERIES, Recorder, adapter_label
from .routing import UnknownModel, resolve_model
from .tagging import STRATEGIES, pieces, tag_entities
from .tokens import TextEncoder

ROW_CODES = {  # ModelServer row error code -> (HTTP status, error type)
    "model_not_found": (404, "not_found_error"),
    "wrong_task": (422, "invalid_request_error"),
    "adapter_invalid": (422, "invalid_request_error"),
    "invalid_input": (422, "invalid_request_error"),
    "too_many_tokens": (413, "invalid_request_error"),
    "non_finite_output": (422, "invalid_request_error"),  # the adapter's weights overflow on this input
}
UNAVAILABLE = (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)  # 503: the model is not there
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "overloaded_error"}
LOCAL_CLIENTS = ("127.0.0.1", "::1", "localhost")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None, adapter: str = "none"):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.adapter = status, message, code, headers, adapter


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": STATUS_TYPES.get(status, "server_error"), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# request bodies (unknown fields ignored, no silent coercion) ------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ClassifyBody(_Body):
    model: str | list[str]
    input: str | list[str]
    threshold: float = Field(0.5, ge=0, le=1)  # multi-label heads


class TagBody(_Body):
    model: str | list[str]
    input: str | list[str]
    aggregation_strategy: Literal[STRATEGIES] = "simple"  # as transformers' token-classification pipeline


class EmbeddingsBody(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # unit-length vectors; None: as the base's sentence-transformers config says


class AdapterBody(_Body):
    name: str
    source: str
    labels: list[str] | None = None


app = FastAPI(title="polyhead", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.code, exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), code, getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(422, _summary(exc.errors()), "invalid_field")


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def unpaired_surrogate(data) -> str | None:
    """Where a JSON value holds a string with an unpaired UTF-16 surrogate (JSON's \\ud800 escapes parse to one,
    and no tokenizer or UTF-8 response can take it), e.g. "input[2] has \\ud800 at character 5"; else None."""
    stack = [("body", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():  # keys too: messages may echo them
                field = f"{path}.{key[:40].encode('utf-8', 'backslashreplace').decode('ascii', 'backslashreplace')}"
                stack.extend(((field, key), (field, item)))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"{path.removeprefix('body.')} has an unpaired surrogate \\u{ord(value[exc.start]):04x} "
                        f"at character {exc.start}")
    return None


def _summary(errors) -> str:
    parts = [f"{'.'.join(map(str, e.get('loc', ()))) or 'body'}: {e.get('msg', '')}" for e in errors[:3]]
    return "; ".join(parts)[:500]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _sigmoid(x: list[float]) -> list[float]:
    return [1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in x]


async def _result(response):
    return await response


def _cancel(response) -> None:
    """Best-effort DeploymentResponse.cancel(). With Ray's router on its own thread, cancel() reads a result
    that just arrived and re-raises its error (e.g. the BackPressureError of a call already refused)."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - that call's outcome no longer matters
        pass


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, model, config: dict):
        self.cfg = ServeConfig(**config)
        self.model = model
        self.encoder = TextEncoder(self.cfg.resolved_base_dir())  # checked against the model's on its first info()
        self.base_name = self.cfg.resolved_model_name()
        self._info: dict | None = None  # ModelServer.info(), once it answered
        self._encoder_check: asyncio.Future | None = None  # the encoder's check, off the event loop, once
        self.shutting_down = False  # Serve stops this replica (__del__)
        self.drain_requested = False  # an operator asked (user_config {"draining": true}, see reconfigure)
        self.metrics = Recorder(INGRESS_SERIES)
        self.pusher = MetricsPusher.in_replica(self.metrics, self.cfg.metrics_push_s)
        self.admission = Admission(self.cfg.pending_rows_limit(), self.cfg.retry_after_s, self.cfg.max_retry_after_s)
        self.gate_config = self._gate_config()
        calls, window_s = self.cfg.max_model_calls, self.cfg.coalesce_window_ms / 1000
        self.coalescer = (Coalescer(self._send_rows, calls, self.cfg.max_batch_size, _cancel, window_s,
                                    busy_calls=self.cfg.num_replicas) if calls or window_s else None)

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config of this deployment, given to every Ingress replica (and again on each change):
        {"draining": true} makes /ready answer 503 while requests are still served, so that load balancers
        stop sending traffic before the app is stopped or moved; {"draining": false} undoes it."""
        unknown = set(user_config or {}) - {"draining"}
        if unknown:
            raise ValueError(f"Ingress user_config: unknown keys {sorted(unknown)}; known: draining")
        draining = (user_config or {}).get("draining", False)
        if not isinstance(draining, bool):
            raise ValueError(f"Ingress user_config: draining must be true or false, got {draining!r}")
        self.drain_requested = draining

    def __del__(self):  # Serve's graceful shutdown: /ready answers 503 from here on
        self.shutting_down = True

    # plumbing -----------------------------------------------------------------------------

    def _gate_config(self) -> str | None:
        """ADMISSION_HEADER's value for the front gate (serving/app/gate.py); None outside Serve."""
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - not in a Serve replica: no proxy in front
            return None
        limit = self.cfg.gate_max_requests
        return admission_header(app_name, self.cfg.pending_rows_limit() if limit is None else limit,
                                self.cfg.retry_after_s, self.cfg.max_retry_after_s, self.cfg.metrics_push_s,
                                self.cfg.accept_hold_ms / 1000, self.cfg.body_timeout_s, self.cfg.max_body_bytes)

    def _retry(self) -> dict:
        return {"Retry-After": str(self.cfg.retry_after_s)}

    async def _serve(self, route: str, request: Request, handler, rows: bool = False) -> Response:
        """One request of `route`; `rows`: an inference route, refused before its body is read while the
        admission limit is reached (a refusal then costs little of the CPU the model needs)."""
        if self.pusher is not None:
            self.pusher.ensure_started()
        start = time.perf_counter()
        set_client(request.scope)  # for a refusal anywhere in this request's task (_overloaded)
        try:
            if rows and self.admission.full:
                raise self._overloaded()
            response = await handler(request)
        except ApiError as exc:
            self.metrics.errors.labels(route, exc.adapter, exc.code).inc()
            response = error_response(exc.status, exc.message, exc.code, exc.headers)
        if rows and self.gate_config is not None and GATED_HEADER in request.headers:
            response.headers[ADMISSION_HEADER] = self.gate_config  # the gate reads and removes it
        self.metrics.requests.labels(route, response.status_code).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def _json(self, request: Request) -> dict:
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):  # read as it is, a compressed body would be "malformed JSON"
            raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the JSON body "
                           "uncompressed", "unsupported_encoding")
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", "body_too_large")
        try:  # UTF-8 only (RFC 8259; json.loads would guess UTF-16/32 from bytes), a leading BOM ignored
            text = bytes(body).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"malformed JSON: the body is not UTF-8 ({str(exc)[:150]})", "invalid_json") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"malformed JSON: {str(exc)[:200]}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"the body must be a JSON object, got {type(data).__name__}", "invalid_field")
        if "\\u" in text:  # a \ud800 escape: the only way left for a surrogate to get into a parsed string
            where = unpaired_surrogate(data)
            if where:
                raise ApiError(400, f"malformed JSON: {where}: not Unicode text", "invalid_unicode")
        return data

    @staticmethod
    def _parse(body_type, data: dict):
        try:
            return body_type.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, _summary(exc.errors(include_input=False)), "invalid_field") from None

    def _overloaded(self) -> ApiError:
        return ApiError(429, OVERLOADED, "overloaded",
                        {"Retry-After": str(self.admission.refuse(current_client()))})

    def _unavailable(self, exc: BaseException) -> ApiError:
        return ApiError(503, f"the model is unavailable, retry later ({type(exc).__name__})", "unavailable",
                        self._retry())

    async def _ask_model(self, timeout_s: float | None = None) -> dict:
        """ModelServer.info() from one model replica; ApiError 429/503 when it cannot answer."""
        response = self.model.info.remote()
        try:
            info = await asyncio.wait_for(_result(response), timeout_s)
        except asyncio.TimeoutError:
            _cancel(response)
            raise ApiError(503, f"warming up: the model deployment has not answered within {timeout_s} s",
                           "not_ready", self._retry()) from None
        except BackPressureError:
            raise self._overloaded() from None
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        if self._encoder_check is None:
            self._encoder_check = asyncio.ensure_future(self._check_encoder(info.get("probes")))
        if not self._encoder_check.done():
            await asyncio.shield(self._encoder_check)  # every first request waits: none is encoded before it
        self._info = info
        return info

    async def _check_encoder(self, probes: list[dict] | None) -> None:
        """The encoder's check against the model's probe encodings, in a thread: a difference loads transformers'
        tokenizer (seconds), which must not stop this replica's event loop (health checks, refusals)."""
        why = await asyncio.to_thread(self.encoder.check, probes)
        if why is not None:
            print(f"polyhead ingress: tokenizing with transformers, as the model does: {why}", flush=True)

    async def _model_replicas(self) -> tuple[int, int] | None:
        """(running, all) replicas of the model deployment as Serve's controller reports them; None where it
        cannot tell (outside Serve)."""
        try:
            app = serve.get_replica_context().app_name
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), self.cfg.ready_timeout_s)
            deployment = status.applications[app].deployments[self.model.deployment_name]
        except Exception:  # noqa: BLE001 - not in Serve, or the controller is slow: ask the model instead
            return None
        states = deployment.replica_states
        return states.get("RUNNING", 0), sum(states.values())

    async def _model_info(self) -> dict:
        return self._info if self._info is not None else await self._ask_model()

    def _adapters(self, models: list) -> list[tuple[str, str | None]]:
        """(model as given, adapter reference or None for the base); 404 for names that cannot be adapters."""
        out = []
        for m in models:
            try:
                out.append((m, resolve_model(m, self.base_name, self.cfg.max_name_chars)))
            except UnknownModel as exc:
                raise ApiError(404, str(exc), "model_not_found", adapter="unknown") from None
        return out

    def _checked_models(self, models: list) -> list[tuple[str, str | None]]:
        """The checked `model` list of /v1/classify and /v1/tag: non-empty, at most max_models, each a valid
        name, each adapter (or the base) once."""
        if not models:
            raise ApiError(422, "model is an empty list", "invalid_field")
        if len(models) > self.cfg.max_models:
            raise ApiError(413, f"{len(models)} models in one request, over the limit of {self.cfg.max_models}",
                           "too_many_models")
        pairs = self._adapters(models)
        first: dict[str | None, str] = {}
        for model, ref in pairs:
            if ref in first:
                raise ApiError(422, f"model {model!r} names the same adapter as {first[ref]!r}: name each once",
                               "duplicate_model")
            first[ref] = model
        return pairs

    def _check_counts(self, n_inputs: int, n_models: int) -> None:
        if n_inputs == 0:
            raise ApiError(422, "input is empty", "empty_input")
        if n_inputs * n_models > self.cfg.max_items:
            raise ApiError(413, f"{n_inputs} inputs x {n_models} models is over the limit of {self.cfg.max_items} "
                           "rows per request", "too_many_items")

    def _check_tokens(self, ids: list[int], index: int, max_tokens: int) -> None:
        if len(ids) > max_tokens:
            raise ApiError(413, f"input {index} has {len(ids)} tokens, over the limit of {max_tokens}", "too_many_tokens")

    def _encode(self, texts: list, max_tokens: int, offsets: bool = False) -> list:
        out = []
        for i, text in enumerate(texts):
            if not text:
                raise ApiError(422, f"input {i} is an empty string", "empty_input")
            enc = self.encoder.encode(text, offsets)
            self._check_tokens(enc["input_ids"], i, max_tokens)
            out.append(enc)
        return out

    async def _run_rows(self, route: str, rows: list[dict], names: list[str | None]) -> list[dict]:
        """The request's rows in ONE ModelServer call (they join the same batch there), shared with concurrent
        requests' rows (serving/app/coalesce.py) where max_model_calls is set.

        Admission (serving/app/admission.py): while this ingress replica has `max_pending_rows` rows at the
        model, a new request is refused at once (429, Retry-After) without reaching the model, so an overloaded
        server sheds in milliseconds and keeps the latency of what it accepted; the inference routes check it
        before reading the body too (_serve). Under the limit a request is admitted whole, however many
        rows it has. The model deployment's own queue limit (Ray's BackPressureError) is a 429 too."""
        if self.admission.full:
            raise self._overloaded()
        self.admission.admit(len(rows))
        start = time.perf_counter()
        call = self.coalescer.submit(rows) if self.coalescer is not None else self._send_rows(rows)
        results = None
        try:
            results = await call
        except BackPressureError:
            raise self._overloaded() from None
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        except asyncio.CancelledError:  # the client went away: so do its rows (a shared call: once all its are gone)
            if self.coalescer is None:
                _cancel(call)
            raise
        finally:
            self.admission.done(len(rows), answered=results is not None)
        waited = time.perf_counter() - start
        for res in results:
            if res.get("compute_s") is not None:  # it ran in a batch
                self.metrics.queue.labels(route).observe(max(0.0, waited - res["compute_s"]))
        for res, name in zip(results, names):
            if res.get("error"):
                status, _ = ROW_CODES.get(res["code"], (422, ""))
                adapter = "unknown" if res["code"] == "model_not_found" else adapter_label(name)
                raise ApiError(status, res["error"], res["code"], adapter=adapter)
        return results

    def _send_rows(self, rows: list[dict]):
        """One ModelServer call with these rows (one request's, or several requests' coalesced)."""
        self.metrics.model_call_rows.observe(len(rows))
        return self.model.infer_rows.remote(rows)

    def _respond(self, route: str, body: dict, rows: list[dict], names: list[str | None]) -> JSONResponse:
        for name in names:
            self.metrics.rows.labels(route, adapter_label(name)).inc()
        headers = {"x-polyhead-batch-size": str(max(r["batch_size"] for r in rows)),
                   "x-polyhead-batch-adapters": str(max(r["batch_adapters"] for r in rows))}
        return JSONResponse(body, headers=headers)

    # routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        """200 once a model replica runs and has answered; 503 while the base loads (Serve reports no model
        replica running, e.g. at start or while one restarts), while draining (this replica stopping, an
        operator's user_config, or the model replica that answered stopping), or while the model deployment
        is unavailable. A running model too busy to answer within ready_timeout_s is ready."""
        if self.shutting_down or self.drain_requested:
            why = "this ingress replica is shutting down" if self.shutting_down else "asked by an operator"
            return error_response(503, f"draining: {why}", "draining", self._retry())
        replicas = await self._model_replicas()
        if replicas is not None and replicas[0] == 0:
            return error_response(503, f"warming up: none of the {replicas[1]} model replicas runs yet (the base "
                                  "model loads)", "not_ready", self._retry())
        try:
            info = await self._ask_model(self.cfg.ready_timeout_s)
        except ApiError as exc:
            busy = exc.code in ("overloaded", "not_ready")  # a full queue, or no answer in ready_timeout_s
            if busy and self._info is not None:  # a model replica answered before: up and busy (excess: 429s)
                return {"status": "ready"}
            if busy:
                return error_response(503, "warming up: no model replica has answered yet", "not_ready",
                                      self._retry())
            return error_response(503, exc.message, exc.code, self._retry())
        if info.get("draining"):
            return error_response(503, "draining: the model replica is shutting down", "draining", self._retry())
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics(self):
        """Every replica's series, summed by the app's MetricsHub (serving/app/hub.py); outside Serve (no
        hub), this process's own."""
        if self.pusher is None:
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
        try:
            text = await self.pusher.exposition()
        except Exception as exc:  # noqa: BLE001 - never a partial answer: Prometheus records the failed scrape
            return error_response(503, f"metrics are unavailable: {type(exc).__name__}: {str(exc)[:200]}",
                                  "metrics_unavailable", self._retry())
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(self, request: Request):
        return await self._serve("models", request, self._list_models)

    async def _list_models(self, request: Request):
        return JSONResponse({"object": "list", "data": await self._model_objects()})

    async def _model_objects(self) -> list[dict]:
        adapters = await self.model.list_adapters.remote()
        data = [{"id": self.base_name, "object": "model", "created": 0, "owned_by": "polyhead"}]
        data += [{"id": a["name"], "object": "model", "created": int(a["created"] or 0), "owned_by": "polyhead",
                  "parent": self.base_name,
                  "task": a["task"], "labels": a["labels"], "version": a["version"], "versions": a["versions"]}
                 for a in adapters]
        return data

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request):
        async def handler(request: Request):  # OpenAI's "retrieve model": one entry of the list, or 404
            try:
                ref = resolve_model(model, self.base_name)
            except UnknownModel as exc:
                raise ApiError(404, str(exc), "model_not_found", adapter="unknown") from None
            objects = await self._model_objects()
            if ref is None:
                return JSONResponse(objects[0])
            name, _, version = ref.partition("@")
            for entry in objects[1:]:
                if entry["id"] != name:
                    continue
                if not version:
                    return JSONResponse(entry)
                if entry["versions"] and int(version) in entry["versions"]:
                    pinned = dict(entry, id=ref, version=int(version))
                    if int(version) != entry["version"]:  # the listing describes the latest version's head only
                        pinned.update(task=None, labels=None)
                    return JSONResponse(pinned)
            raise ApiError(404, f"unknown model {ref!r}", "model_not_found", adapter="unknown")

        return await self._serve("models", request, handler)

    @app.post("/v1/classify")
    async def classify(self, request: Request):
        return await self._serve("classify", request, self._classify, rows=True)

    async def _classify(self, request: Request):
        body = self._parse(ClassifyBody, await self._json(request))
        texts = _as_list(body.input)
        pairs = self._checked_models(_as_list(body.model))
        self._check_counts(len(texts), len(pairs))
        info = await self._model_info()
        encs = self._encode(texts, info["max_tokens"])
        rows, names, meta = [], [], []
        for i, enc in enumerate(encs):
            for model, name in pairs:
                rows.append({"adapter": name, "input_ids": enc["input_ids"], "need": "seq"})
                names.append(name)
                meta.append((i, model))
        results = await self._run_rows("classify", rows, names)
        data = []
        for (i, model), res in zip(meta, results):
            logits = res["logits"]
            labels = res["labels"] or [f"LABEL_{j}" for j in range(len(logits))]
            if res["task"] == "multilabel":
                probs = _sigmoid(logits)
                above = [lab for lab, p in zip(labels, probs) if p > body.threshold]
            else:
                probs, above = _softmax(logits), None
            item = {"index": i, "model": model, "label": labels[max(range(len(probs)), key=probs.__getitem__)],
                    "probs": probs, "logits": logits}
            if above is not None:
                item["labels"] = above
            data.append(item)
        return self._respond("classify", {"object": "list", "data": data}, results, names)

    @app.post("/v1/tag")
    async def tag(self, request: Request):
        return await self._serve("tag", request, self._tag, rows=True)

    async def _tag(self, request: Request):
        body = self._parse(TagBody, await self._json(request))
        texts = _as_list(body.input)
        pairs = self._checked_models(_as_list(body.model))
        self._check_counts(len(texts), len(pairs))
        info = await self._model_info()
        encs = self._encode(texts, info["max_tokens"], offsets=True)
        rows, names, meta = [], [], []
        for i, enc in enumerate(encs):
            for model, name in pairs:
                rows.append({"adapter": name, "input_ids": enc["input_ids"], "need": "token"})
                names.append(name)
                meta.append((i, model, enc))
        results = await self._run_rows("tag", rows, names)
        data = []
        prefix, unk = self.encoder.subword_prefix, self.encoder.unk_id
        for (i, model, enc), res in zip(meta, results):
            probs = [_softmax(token_logits) for token_logits in res["logits"]]
            labels = res["labels"] or [f"LABEL_{j}" for j in range(len(probs[0]) if probs else 0)]
            found = pieces(probs, [tuple(o) for o in enc["offset_mapping"]], enc["tokens"], enc["input_ids"],
                           texts[i], prefix, unk)
            entities = tag_entities(found, labels, texts[i], body.aggregation_strategy)
            data.append({"index": i, "model": model, "entities": entities})
        return self._respond("tag", {"object": "list", "data": data}, results, names)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._serve("embeddings", request, self._embeddings, rows=True)

    async def _embeddings(self, request: Request):
        body = self._parse(EmbeddingsBody, await self._json(request))
        inputs = body.input
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # one text or one list of token ids
        self._check_counts(len(inputs), 1)
        (_, name), = self._adapters([body.model])
        info = await self._model_info()
        if info.get("embedding_unsupported"):
            raise ApiError(422, info["embedding_unsupported"], "unsupported_embedding")
        normalize = info.get("embedding_normalize", True) if body.normalize is None else body.normalize
        if body.dimensions is not None and body.dimensions != info["hidden_size"]:
            raise ApiError(422, f"dimensions={body.dimensions}: this model gives {info['hidden_size']} dimensions",
                           "invalid_field")
        rows = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                ids = self._encode([item], info["max_tokens"])[0]["input_ids"]
            else:
                if not item:
                    raise ApiError(422, f"input {i} is an empty list of token ids", "empty_input")
                self._check_tokens(item, i, info["max_tokens"])
                bad = next((t for t in item if not 0 <= t < info["vocab_size"]), None)
                if bad is not None:
                    raise ApiError(422, f"input {i}: token id {bad} is outside the vocabulary "
                                   f"[0, {info['vocab_size']})", "invalid_input")
                ids = item
            rows.append({"adapter": name, "input_ids": ids, "need": "embedding"})
        results = await self._run_rows("embeddings", rows, [name] * len(rows))
        data = []
        for i, res in enumerate(results):
            emb = res["embedding"]
            if normalize:
                emb = unit_length(emb)
            if body.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(emb, dtype="<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(r["input_ids"]) for r in rows)
        out = {"object": "list", "data": data, "model": body.model,
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return self._respond("embeddings", out, results, [name] * len(rows))

    # admin --------------------------------------------------------------------------------

    def _check_admin(self, request: Request) -> None:
        key = self.cfg.admin_api_key
        if key is None:
            host = request.client.host if request.client else None
            if host not in LOCAL_CLIENTS:
                raise ApiError(403, "admin routes answer only local clients when no admin_api_key is configured",
                               "forbidden")
            return
        auth = request.headers.get("authorization")
        if not auth:
            raise ApiError(401, "admin route: send Authorization: Bearer <admin key>", "missing_api_key",
                           {"WWW-Authenticate": "Bearer"})
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "admin route: Authorization must be 'Bearer <admin key>'", "missing_api_key",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(403, "admin route: wrong API key", "invalid_api_key")

    async def _forget_adapter(self, name: str) -> None:
        if self.pusher is None:
            self.metrics.forget_adapter(name)
            return
        try:
            await self.pusher.forget_adapter(name)
        except Exception:  # noqa: BLE001 - the delete itself succeeded; only its series linger
            self.metrics.forget_adapter(name)

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        return await self._serve("adapters", request, self._list_adapters)

    async def _list_adapters(self, request: Request):
        self._check_admin(request)
        adapters = await self.model.list_adapters.remote()
        return JSONResponse({"object": "list", "data": adapters})

    @app.post("/v1/adapters")
    async def add_adapter(self, request: Request):
        return await self._serve("adapters", request, self._add_adapter)

    async def _add_adapter(self, request: Request):
        self._check_admin(request)
        body = self._parse(AdapterBody, await self._json(request))
        try:
            check_name(body.name)
        except AdapterError as exc:
            raise ApiError(422, str(exc), "invalid_name") from None
        out = await self.model.add_adapter.remote(body.name, body.source, body.labels)
        if out.get("error"):
            raise ApiError(422, out["error"], out["code"])
        out.pop("load_s", None)  # recorded by the model replica (polyhead_adapter_load_seconds)
        return JSONResponse(dict(out, object="adapter"), status_code=201)

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(self, name: str, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            try:
                parse_ref(name)  # `name` (every version) or `name@N`
            except AdapterError:
                raise ApiError(404, f"unknown adapter {name[:80]!r}", "model_not_found", adapter="unknown") from None
            if not await self.model.remove_adapter.remote(name):
                raise ApiError(404, f"unknown adapter {name!r}", "model_not_found", adapter="unknown")
            if "@" not in name:  # every version is gone: so are its series (one version: the name stays)
                await self._forget_adapter(name)
            return JSONResponse({"id": name, "object": "adapter", "deleted": True})

        return await self._serve("adapters", request, handler)
