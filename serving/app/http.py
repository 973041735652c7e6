"""The HTTP ingress (FastAPI under @serve.ingress): validate, tokenize, fan rows out to ModelServer.

Every error is JSON {"error": {"message", "type", "code"}} (serving/app/errors.py); bad input is never a 500.
Bodies are read and parsed by polyhead (serving/app/bodies.py), not by FastAPI, so that size limits, malformed
JSON (400) and invalid fields (422) each get their own status.
Overload: a request arriving while the rows this replica has at the model need more than max_queue_wait_s
(serving/app/admission.py), or refused by the model deployment's queue limit (max_queued_requests, Ray's
BackPressureError), is a 429 with Retry-After;
a model that is not ready, draining or unavailable is a 503 with Retry-After.
"""

import asyncio
import base64
import math
import time

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import AdapterStore
from serving.experiments.shadow import cosine, entity_f1, label_agreement

from ..sentence import unit_length
from . import logs
from .access import ADMIN_ROUTES, InferenceKeys
from .admission import Admission, current_client, set_client
from .bodies import ClassifyBody, EmbeddingsBody, TagBody, read_json
from .coalesce import Coalescer
from .config import ServeConfig
from .errors import (ROW_CODES, STATUS_TYPES, UNAVAILABLE, ApiError, error_response, exact_path_param,
                     unpaired_surrogate, validation_summary)
from .adapter_routes import AdapterRoutes
from .experiment_routes import ExperimentRoutes
from .gate import ADMISSION_HEADER, GATED_HEADER, OVERLOADED, admission_header
from .heaptrim import HeapTrim
from .hub import MetricsPusher
from .metrics import INGRESS_SERIES, Recorder, adapter_label, polyhead_version
from .model_list import ModelEntries, ModelEntriesCache, model_page, page_params, store_token
from .openapi import unknown_route_message
from .router import RouterMetrics, routing_key
from .routing import UnknownModel, resolve_model
from .tagging import pieces, tag_entities
from .tokens import TextEncoder
from .web import app
from .texts import TooManyChars, encode_texts
from .truncate import BadTruncation, TooLong, embedding_limit, fit, keep, truncation

__all__ = ["ROW_CODES", "STATUS_TYPES", "ApiError", "Ingress", "app", "error_response", "unpaired_surrogate"]




@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.code, exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    logs.finish(logs.start(request), "unknown", exc.status_code, code)  # routes Ingress._serve never sees
    ingress = _this_ingress()
    if ingress is not None:  # under route "unknown", never the path: a bounded label set
        ingress.metrics.requests.labels("unknown", exc.status_code).inc()
        ingress.metrics.errors.labels("unknown", "none", code).inc()
    message = unknown_route_message(request) if exc.detail == "Not Found" else str(exc.detail)
    return error_response(exc.status_code, message, code, getattr(exc, "headers", None))


def _this_ingress():
    """The Ingress of the Serve replica this runs in; None outside Serve."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not in a replica
        return None


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(422, validation_summary(exc.errors()), "invalid_field")


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _sigmoid(x: list[float]) -> list[float]:
    return [1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in x]


def _classify_item(index: int, model: str, res: dict, threshold: float) -> dict:
    logits = res["logits"]
    labels = res["labels"] or [f"LABEL_{j}" for j in range(len(logits))]
    if res["task"] == "multilabel":
        probs = _sigmoid(logits)
        above = [lab for lab, p in zip(labels, probs) if p > threshold]
    else:
        probs, above = _softmax(logits), None
    item = {"index": index, "model": model, "label": labels[max(range(len(probs)), key=probs.__getitem__)],
            "probs": probs, "logits": logits}
    if above is not None:
        item["labels"] = above
    return item


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
class Ingress(AdapterRoutes, ExperimentRoutes):  # + admin routes: adapter_routes.py, experiment_routes.py
    keys = InferenceKeys(None)  # none needed; __init__ sets the config's
    stopping = False  # `polyhead serve` stops (stop_accepting): requests answer 503 draining
    in_flight = 0  # requests in _serve's handlers now
    heap_trim = None  # freed heap memory back to the OS now and then (serving/app/heaptrim.py)
    model_entries: ModelEntriesCache | None = None  # GET /v1/models's adapter entries (_model_entries)

    def __init__(self, model, config: dict):
        self.cfg = ServeConfig(**config)
        self.model = model
        self.keys = InferenceKeys(self.cfg.api_keys)
        logs.configure(self.cfg.log_level)
        self.encoder = TextEncoder(self.cfg.resolved_base_dir())  # checked against the model's on its first info()
        self.base_name = self.cfg.resolved_model_name()
        self._info: dict | None = None  # ModelServer.info(), once it answered
        self._encoder_check: asyncio.Future | None = None  # the encoder's check, off the event loop, once
        self.shutting_down = False  # Serve stops this replica (__del__)
        self.drain_requested = False  # an operator asked (user_config {"draining": true}, see reconfigure)
        self.metrics = Recorder(INGRESS_SERIES)
        self.metrics.collectors.append(RouterMetrics())  # request_router affinity: routed outcomes, homes
        self.metrics.build_info.labels(polyhead_version()).set(1)
        self.pusher = MetricsPusher.in_replica(self.metrics, self.cfg.metrics_push_s)
        self.heap_trim = HeapTrim(asyncio.to_thread)
        self.heap_trim.ensure_started()
        self.admission = Admission.of(self.cfg)
        self.gate_config = self._gate_config()
        calls, window_s = self.cfg.max_model_calls, self.cfg.coalesce_window_ms / 1000
        key = routing_key if self.cfg.request_router == "affinity" else None  # one adapter per call: its home
        self.coalescer = (Coalescer(self._send_rows, calls, self.cfg.max_batch_size, _cancel, window_s,
                                    busy_calls=self.cfg.num_replicas, key=key) if calls or window_s else None)
        self._init_experiments()

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

    def stop_accepting(self) -> int:
        """`polyhead serve` is stopping (serving/app/stopping.py): from now on requests answer 503 draining
        and /ready 503; returns the requests still in flight (called again until none are left)."""
        self.stopping = True
        return self.in_flight

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
                                self.cfg.accept_hold_ms / 1000, self.cfg.body_timeout_s, self.cfg.max_body_bytes,
                                self.cfg.log_level, self.cfg.max_queue_wait_s, self.cfg.admission_floor())

    def _retry(self) -> dict:
        return {"Retry-After": str(self.cfg.retry_after_s)}

    async def _serve(self, route: str, request: Request, handler, rows: bool = False) -> Response:
        """One request of `route`; `rows`: an inference route, refused before its body is read while the
        admission limit is reached (a refusal then costs little of the CPU the model needs)."""
        if self.pusher is not None:
            self.pusher.ensure_started()
        if self.heap_trim is not None:
            self.heap_trim.ensure_started()
        start = time.perf_counter()
        set_client(request.scope)  # for a refusal anywhere in this request's task (_overloaded)
        record, code = logs.start(request), None  # its log line (serving/app/logs.py)
        try:
            denied = None if route in ADMIN_ROUTES else self.keys.refusal(request.headers.get("authorization"))
            if denied:  # before admission and the body: a 401 costs no model call (serving/app/access.py)
                raise ApiError(401, denied[1], denied[0], {"WWW-Authenticate": "Bearer"})
            if self.stopping:
                raise ApiError(503, "draining: the server is stopping, retry later", "draining",
                               {**self._retry(), "Connection": "close"})  # the client reconnects: not to us
            if rows and self.admission.full:
                raise self._overloaded()
            self.in_flight += 1
            try:
                response = await handler(request)
            finally:
                self.in_flight -= 1
        except ApiError as exc:
            self.metrics.errors.labels(route, exc.adapter, exc.code).inc()
            response, code = error_response(exc.status, exc.message, exc.code, exc.headers), exc.code
        except BaseException as exc:
            logs.finish_raised(record, route, exc)
            raise
        logs.finish(record, route, response.status_code, code)
        if rows and self.gate_config is not None and GATED_HEADER in request.headers:
            response.headers[ADMISSION_HEADER] = self.gate_config  # the gate reads and removes it
        self.metrics.requests.labels(route, response.status_code).inc()
        elapsed = time.perf_counter() - start
        self._finish_experiments(request, response, code, elapsed)  # headers, the arms' counts
        self.metrics.latency.labels(route).observe(elapsed)
        for adapter in getattr(response, "adapters", ()):  # set by _respond: the adapters an answer used
            self.metrics.adapter_latency.labels(route, adapter).observe(elapsed)
        return response

    @staticmethod
    def _parse(body_type, data: dict):
        logs.note(model=logs.cut(data.get("model")))  # as the client sent it, before any check
        try:
            return body_type.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, validation_summary(exc.errors(include_input=False)), "invalid_field") from None

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

    def _fit(self, enc: dict, index: int, limit: int, body, text: bool = True, why: str = "") -> dict:
        """`enc` within the route's limit, cut where `body` asks (serving/app/truncate.py); its "truncate" goes
        with the row to the model replica, which may cut it further for an adapter's virtual tokens."""
        try:
            trunc = truncation(body, limit, (self._info or {}).get("truncation_side", "right"), why)
            return fit(enc, index, limit, trunc, self.encoder.ends(), text, why)
        except TooLong as exc:
            raise ApiError(413, str(exc), "too_many_tokens") from None
        except BadTruncation as exc:
            raise ApiError(422, str(exc), "invalid_field") from None

    async def _encode(self, texts: list, max_tokens: int, body, offsets: bool = False, why: str = "",
                      indexes: list[int] | None = None) -> list:
        """The texts' encodings within the route's limit (`indexes`: theirs in the request): huge ones refused by
        characters, large ones tokenized off the event loop, cut ones tokenized as far as needed (texts.py)."""
        indexes = list(range(len(texts))) if indexes is None else indexes
        for i, text in zip(indexes, texts):
            if not text:
                raise ApiError(422, f"input {i} is an empty string", "empty_input")
        try:
            trunc = truncation(body, max_tokens, (self._info or {}).get("truncation_side", "right"), why)
            return await encode_texts(self.encoder, texts, indexes, max_tokens, trunc, offsets, why,
                                      self.cfg.max_input_chars)
        except TooManyChars as exc:
            raise ApiError(413, str(exc), "input_too_long") from None
        except TooLong as exc:
            raise ApiError(413, str(exc), "too_many_tokens") from None
        except BadTruncation as exc:
            raise ApiError(422, str(exc), "invalid_field") from None

    async def _run_rows(self, route: str, rows: list[dict], names: list[str | None]) -> list[dict]:
        """The request's rows in ONE ModelServer call (they join the same batch there), shared with concurrent
        requests' rows (serving/app/coalesce.py) where max_model_calls is set.

        Admission (serving/app/admission.py): while the rows this ingress replica has at the model need more
        than max_queue_wait_s, a new request is refused at once (429, Retry-After) without reaching the model,
        so an overloaded server sheds in milliseconds and keeps the latency of what it accepted; the inference
        routes check it before reading the body too (_serve). Under the limit a request is admitted whole,
        however many rows it has. The model deployment's own queue limit (Ray's BackPressureError) is a 429 too."""
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
        logs.note_rows(rows, results, self.base_name)
        for res in results:
            if res.get("compute_s") is not None:  # it ran in a batch
                self.metrics.queue.labels(route).observe(max(0.0, waited - res["compute_s"]))
        for row, res, name in zip(rows, results, names):
            if res.get("error") and not row.get("shadow"):  # a shadow's failure is only counted (_compare_shadows)
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
        response = JSONResponse(body, headers=headers)
        response.adapters = sorted({adapter_label(name) for name in names})  # per-adapter latency (_serve)
        return response

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
        if self.shutting_down or self.drain_requested or self.stopping:
            why = "asked by an operator" if self.drain_requested else "this ingress replica is shutting down"
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
        limit, after = page_params(request.query_params)  # before any work: a bad one is a 422
        entries = await self._model_entries().get()
        return JSONResponse(model_page(entries, await self._experiment_models(), limit, after))

    def _model_entries(self) -> ModelEntriesCache:
        if self.model_entries is None:
            store = AdapterStore(self.cfg.store_root)  # the model replicas' (ServeConfig resolves the default)
            self.model_entries = ModelEntriesCache(lambda: asyncio.to_thread(store_token, store),
                                                   self._list_model_entries)
        return self.model_entries

    async def _list_model_entries(self) -> ModelEntries:
        listing = await self.model.adapter_listing.remote()  # "broken": store versions that cannot be read
        data = self._model_objects(listing["data"])
        return ModelEntries(data, {e["id"]: i for i, e in enumerate(data)}, listing["broken"])

    async def _listed_entry(self, ref: str) -> dict | None:
        """`ref`'s entry in the kept listing (`name`, or `name@N` of its latest version); None where it has none."""
        name, _, version = ref.partition("@")
        entries = await self._model_entries().get()
        at = entries.index.get(name)
        if at is None:
            return None
        entry = entries.data[at]
        if not version:
            return entry
        return dict(entry, id=ref) if str(entry.get("version")) == version else None

    def _model_objects(self, adapters: list[dict]) -> list[dict]:
        data = [{"id": self.base_name, "object": "model", "created": 0, "owned_by": "polyhead"}]
        return data + [self._model_object(a["name"], a) for a in adapters if a["name"] != self.base_name]

    def _model_object(self, model_id: str, a: dict) -> dict:
        return {"id": model_id, "object": "model", "created": int(a["created"] or 0), "owned_by": "polyhead",
                "parent": self.base_name,
                "task": a["task"], "labels": a["labels"], "version": a["version"], "versions": a["versions"]}

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request):
        async def handler(request: Request):  # OpenAI's "retrieve model": one entry of the list, or 404
            exact_path_param(request, model)
            try:
                ref = resolve_model(model, self.base_name)
            except UnknownModel as exc:
                raise ApiError(404, str(exc), "model_not_found", adapter="unknown") from None
            if ref is None:
                return JSONResponse({"id": self.base_name, "object": "model", "created": 0, "owned_by": "polyhead"})
            experiment = await self._experiment_model(ref)
            if experiment is not None:
                return JSONResponse(experiment)
            listed = await self._listed_entry(ref)  # O(1) while the store is unchanged; describe_adapter lists all
            if listed is not None:
                return JSONResponse(listed)
            entry = await self.model.describe_adapter.remote(ref)  # a pinned version's own task and labels
            if entry.get("error"):
                raise ApiError(404, entry["error"], "model_not_found", adapter="unknown")
            return JSONResponse(self._model_object(ref, entry))

        return await self._serve("models", request, handler)

    @app.post("/v1/classify")
    async def classify(self, request: Request):
        return await self._serve("classify", request, self._classify, rows=True)

    async def _classify(self, request: Request):
        body = self._parse(ClassifyBody, await read_json(request, self.cfg.max_body_bytes))
        texts = _as_list(body.input)
        pairs = self._checked_models(_as_list(body.model))
        self._check_counts(len(texts), len(pairs))
        pairs = await self._route_experiments(request, body, pairs)  # an experiment's alias -> its arm's adapter
        info = await self._model_info()
        encs = await self._encode(texts, info["max_tokens"], body)
        rows, names, meta, entry_of = [], [], [], []
        for i, enc in enumerate(encs):
            for e, (model, name) in enumerate(pairs):
                rows.append({"adapter": name, "input_ids": enc["input_ids"], "need": "seq",
                             "truncate": enc["truncate"]})
                names.append(name)
                meta.append((i, model))
                entry_of.append(e)
        twins, primary_of = self._shadow_rows(request, rows, entry_of)
        results = await self._run_rows("classify", rows + twins, names + [t["adapter"] for t in twins])
        results, shadows = results[:len(rows)], results[len(rows):]
        data = [_classify_item(i, self._served_model(request, e, model, res), res, body.threshold)
                for (i, model), e, res in zip(meta, entry_of, results)]
        if twins:
            self._compare_shadows(request, entry_of, primary_of, shadows, lambda j, res: label_agreement(
                data[j], _classify_item(0, "", res, body.threshold)))
        out = {"id": self._answer_id("classify", request), "object": "list", "data": data}
        return self._respond("classify", out, results, names)

    @app.post("/v1/tag")
    async def tag(self, request: Request):
        return await self._serve("tag", request, self._tag, rows=True)

    async def _tag(self, request: Request):
        body = self._parse(TagBody, await read_json(request, self.cfg.max_body_bytes))
        texts = _as_list(body.input)
        pairs = self._checked_models(_as_list(body.model))
        self._check_counts(len(texts), len(pairs))
        pairs = await self._route_experiments(request, body, pairs)  # an experiment's alias -> its arm's adapter
        info = await self._model_info()
        encs = await self._encode(texts, info["max_tokens"], body, offsets=True)
        rows, names, meta, entry_of = [], [], [], []
        for i, enc in enumerate(encs):
            for e, (model, name) in enumerate(pairs):
                rows.append({"adapter": name, "input_ids": enc["input_ids"], "need": "token",
                             "truncate": enc["truncate"]})
                names.append(name)
                meta.append((i, model, enc))
                entry_of.append(e)
        twins, primary_of = self._shadow_rows(request, rows, entry_of)
        results = await self._run_rows("tag", rows + twins, names + [t["adapter"] for t in twins])
        results, shadows = results[:len(rows)], results[len(rows):]
        data = [{"index": i, "model": self._served_model(request, e, model, res),
                 "entities": self._entities(res, enc, texts[i], body.aggregation_strategy)}
                for (i, model, enc), e, res in zip(meta, entry_of, results)]
        if twins:
            self._compare_shadows(request, entry_of, primary_of, shadows, lambda j, res: entity_f1(
                data[j]["entities"], self._entities(res, meta[j][2], texts[meta[j][0]], body.aggregation_strategy)))
        out = {"id": self._answer_id("tag", request), "object": "list", "data": data}
        return self._respond("tag", out, results, names)

    def _entities(self, res: dict, enc: dict, text: str, strategy: str) -> list[dict]:
        if res.get("truncated_to"):  # cut further by the model replica (an adapter's virtual tokens)
            enc = keep(enc, res["truncated_to"], enc["truncate"])
        probs = [_softmax(token_logits) for token_logits in res["logits"]]
        labels = res["labels"] or [f"LABEL_{j}" for j in range(len(probs[0]) if probs else 0)]
        found = pieces(probs, [tuple(o) for o in enc["offset_mapping"]], enc["tokens"], enc["input_ids"], text,
                       self.encoder.subword_prefix, self.encoder.unk_id)
        return tag_entities(found, labels, text, strategy)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._serve("embeddings", request, self._embeddings, rows=True)

    async def _embeddings(self, request: Request):
        body = self._parse(EmbeddingsBody, await read_json(request, self.cfg.max_body_bytes))
        inputs = body.input
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # one text or one list of token ids
        self._check_counts(len(inputs), 1)
        (_, name), = await self._route_experiments(request, body, self._adapters([body.model]))
        info = await self._model_info()
        if info.get("embedding_unsupported"):
            raise ApiError(422, info["embedding_unsupported"], "unsupported_embedding")
        normalize = info.get("embedding_normalize", True) if body.normalize is None else body.normalize
        if body.dimensions is not None and body.dimensions != info["hidden_size"]:
            raise ApiError(422, f"dimensions={body.dimensions}: this model gives {info['hidden_size']} dimensions",
                           "invalid_field")
        rows = []
        limit, why = embedding_limit(info)  # the base's sentence-transformers max_seq_length
        texts = [i for i, item in enumerate(inputs) if isinstance(item, str)]  # encoded together (texts.py)
        encoded = dict(zip(texts, await self._encode([inputs[i] for i in texts], limit, body, why=why, indexes=texts)))
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                enc = encoded[i]
            else:
                if not item:
                    raise ApiError(422, f"input {i} is an empty list of token ids", "empty_input")
                bad = next((t for t in item if not 0 <= t < info["vocab_size"]), None)
                if bad is not None:
                    raise ApiError(422, f"input {i}: token id {bad} is outside the vocabulary "
                                   f"[0, {info['vocab_size']})", "invalid_input")
                enc = self._fit({"input_ids": item}, i, limit, body, text=False, why=why)
            rows.append({"adapter": name, "input_ids": enc["input_ids"], "need": "embedding",
                         "truncate": enc["truncate"]})
        twins, primary_of = self._shadow_rows(request, rows, [0] * len(rows))
        results = await self._run_rows("embeddings", rows + twins, [name] * len(rows) + [t["adapter"] for t in twins])
        results, shadows = results[:len(rows)], results[len(rows):]
        if twins:
            self._compare_shadows(request, [0] * len(rows), primary_of, shadows,
                                  lambda j, res: cosine(results[j]["embedding"], res["embedding"]))
        data = []
        for i, res in enumerate(results):
            emb = res["embedding"]
            if normalize:
                emb = unit_length(emb)
            if body.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(emb, dtype="<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(res.get("truncated_to") or len(r["input_ids"]) for r, res in zip(rows, results))
        out = {"id": self._answer_id("embeddings", request), "object": "list", "data": data,
               "model": self._served_model(request, 0, body.model, results[0]),
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return self._respond("embeddings", out, results, [name] * len(rows))
