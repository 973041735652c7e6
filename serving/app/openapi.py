"""GET /openapi.json and the /docs page (Swagger UI), served offline; ServeConfig.openapi turns both off.

The ingress reads request bodies itself (serving/app/http.py: its own size limits and statuses), so FastAPI
sees no body model and no error answer. The schema here is FastAPI's generation over the app's real routes
(paths, parameters, summaries) completed from OPERATIONS: each operation's request body is the JSON schema of
the model http.py validates it with (ClassifyBody, ...), its answer one of the response models below, and
every error status it can answer, each with the error body {"error": {"message", "type", "code"}}; the
inference operations also list an experiment's request headers (X-Polyhead-User, X-Polyhead-Arm) and answer's.
tests/integration/test_openapi.py checks that every route has its entry and that real answers match.

Swagger UI's script, stylesheet and icon come from the `fastapi-offline` package (a wheel that ships
them) and are served by the app under /docs/assets/: FastAPI's default page loads them from a CDN, and on a
machine without internet it renders blank.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.experiments.spec import GuardrailsBody, ShadowBody

from .metrics import polyhead_version

OPENAPI_PATH, DOCS_PATH, ASSETS_PATH = "/openapi.json", "/docs", "/docs/assets"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
REF = "#/components/schemas/{model}"
SERVED_MODEL = "as named in the request; for an experiment, the adapter@N that served it"
ANSWER_ID = ("this answer's id: 'cls-', 'tag-' or 'emb-' and 24 hex digits; 'ab-...' (signed) when an experiment "
             "served it, the id POST /v1/feedback takes")


# answers (documentation of what http.py returns; the request bodies are http.py's own models) -----------

class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, for a person")
    type: str = Field(description="the class of error, as OpenAI names them (invalid_request_error, ...)")
    code: str = Field(description="the specific error, stable for programs (model_not_found, body_too_large, ...)")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: Literal["ok", "ready"]


class ModelObject(BaseModel):
    id: str = Field(description="the base model's name, an adapter's name, or name@N")
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="adapters: the base model")
    task: str | None = Field(None, description="adapters: the head's task, where known")
    labels: list[str] | None = None
    version: int | None = Field(None, description="adapters: the latest (or pinned) version; null: a static entry")
    versions: list[int] | None = None


class BrokenVersion(BaseModel):
    id: str = Field(description="name@N: a published version the store cannot read back (remove it: DELETE)")
    name: str
    version: int
    error: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject] = Field(description="at most `limit` models: the base first, then the adapters by "
                                                "name, then the experiments by name")
    first_id: str | None = Field(description="the id of the first model of data; null: data is empty")
    last_id: str | None = Field(description="the id of the last model of data: `after` of the next page")
    has_more: bool = Field(description="whether models follow this page")
    broken: list[BrokenVersion] = Field([], description="store versions skipped because they cannot be read")


class ClassifyItem(BaseModel):
    index: int = Field(description="the input's index")
    model: str = Field(description=SERVED_MODEL)
    label: str = Field(description="the most probable label")
    probs: list[float] = Field(description="softmax (multi-label heads: sigmoid) of the logits")
    logits: list[float]
    labels: list[str] | None = Field(None, description="multi-label heads only: the labels above the threshold")


class ClassifyResponse(BaseModel):
    id: str = Field(description=ANSWER_ID)
    object: Literal["list"]
    data: list[ClassifyItem] = Field(description="one item per input and model, inputs first")


class Entity(BaseModel):
    entity: str = Field(description="the entity group (PER from B-PER/I-PER), or the tag itself")
    score: float
    start: int = Field(description="character offset of the entity in the input")
    end: int
    word: str


class TagItem(BaseModel):
    index: int
    model: str = Field(description=SERVED_MODEL)
    entities: list[Entity]


class TagResponse(BaseModel):
    id: str = Field(description=ANSWER_ID)
    object: Literal["list"]
    data: list[TagItem]


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 (encoding_format)")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    id: str = Field(description=ANSWER_ID)
    object: Literal["list"]
    data: list[Embedding]
    model: str = Field(description=SERVED_MODEL)
    usage: Usage


class AdapterEntry(BaseModel):
    name: str
    version: int | None = Field(description="the latest version; null: a static entry of the config")
    versions: list[int]
    source: str
    labels: list[str] | None
    task: str | None
    created: float | None = Field(description="Unix time the latest version was published")
    loaded: bool = Field(description="whether the answering model replica holds it")


class AdapterList(BaseModel):
    object: Literal["list"]
    data: list[AdapterEntry]
    broken: list[BrokenVersion] = Field([], description="store versions skipped because they cannot be read")


class AdapterAdded(BaseModel):
    object: Literal["adapter"]
    name: str
    version: int
    ref: str = Field(description="name@version")
    source: str
    task: str | None
    labels: list[str] | None


class AdapterDeleted(BaseModel):
    object: Literal["adapter"]
    id: str
    deleted: Literal[True]


class ExperimentArm(BaseModel):
    name: str
    adapter: str = Field(description="name (its latest version when requested), name@N, or base: the base model")
    weight: float
    share: float = Field(description="weight / the sum of the weights")
    buckets: int = Field(description="the hash buckets (of the allocation) whose units this arm serves")
    rolled_back: dict | None = Field(description="what the guardrail saw when it set the weight to 0; null: not")


class ExperimentObject(BaseModel):
    object: Literal["experiment"]
    id: str = Field(description="the experiment's name: a `model` of classify, tag and embeddings requests")
    version: int = Field(description="the stored version (if_version of the next PUT)")
    uid: str = Field(description="the same across versions; new when the name is created again")
    phase: int = Field(description="statistics start over in a new phase (arms, weights or salt changed)")
    arms: list[ExperimentArm]
    control: str = Field(description="the arm the others are compared with")
    shadow: ShadowBody | None
    salt: str = Field(description="of the bucketing hash (default: the experiment's name)")
    guardrails: GuardrailsBody
    task: str | None = Field(description="the arms' shared head task; null: no head (embeddings)")
    base: str
    rolled_back: dict[str, dict] = Field(description="arm name -> what the guardrail saw when it rolled it back")
    origin: Literal["api", "config"] = Field(description="config: from the serve config's `experiments`")
    config_sha256: str | None = Field(description="the config definition this version descends from")
    created: float = Field(description="Unix time")
    updated: float


class ExperimentDefined(ExperimentObject):
    warnings: list[str] = Field(description="what is allowed but suspicious (arms whose heads answer other labels)")


class BrokenExperiment(BaseModel):
    id: str = Field(description="a stored experiment the server cannot read back")
    error: str


class ExperimentList(BaseModel):
    object: Literal["list"]
    data: list[ExperimentObject]
    broken: list[BrokenExperiment] = []


class ExperimentDeleted(BaseModel):
    object: Literal["experiment"]
    id: str
    deleted: Literal[True]


class ReportArm(BaseModel):  # serving/experiments/report.py experiment_report(): each number names its test
    model_config = ConfigDict(extra="allow")
    name: str
    adapter: str
    weight: float
    share: float | None
    units: int = Field(description="distinct unit keys (user) seen")
    requests: int = Field(description="counted requests (forced arms, X-Polyhead-Arm, are not)")
    errors: int
    error_rate: dict = Field(description="{value, ci95, method: wilson}")
    latency_ms: dict = Field(description="{n, p50, p99}")
    outcome: dict = Field(description="feedback values: {n, mean, ci95, method: wilson (0/1) or t}")
    vs_control: dict | None = Field(description="{difference (arm - control), ci95, p_value, test}; null: the "
                                                 "control, or under 2 outcomes a side")
    shadow: dict = Field(description="{rows, dropped, failed, late, agreement: {n, mean}}")


class ExperimentReport(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: Literal["experiment.report"]
    experiment: str
    version: int
    phase: int = Field(description="the statistics are this phase's")
    control: str
    arms: list[ReportArm]
    srm: dict | None = Field(description="sample-ratio mismatch: Pearson chi-square of units per arm against the "
                                         "weights; null: under two live arms or no unit yet")
    guardrails: dict
    shadow: dict | None
    rolled_back: dict[str, dict]
    previous_phase: dict | None = Field(description="the previous phase's final report, where one was kept")


class FeedbackEntry(BaseModel):
    experiment: str
    arm: str


class FeedbackAnswer(BaseModel):
    object: Literal["feedback"]
    id: str
    value: float
    counted: list[FeedbackEntry] = Field(description="the experiments and arms the outcome counts for")
    not_counted: list[FeedbackEntry] = Field(description="those deleted, or in a phase already over")


# operations ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    answer: type[BaseModel] | str  # a model, or a media type of a text answer
    errors: tuple[int, ...]
    body: str | None = None  # the name of http.py's body model
    status: int | tuple[int, ...] = 200  # (200, 201): an update or a creation
    auth: str = "api"  # "admin": the admin key; "api": one of api_keys where configured; "none": open
    experiments: bool = False  # `model` may name an experiment: its request and answer headers
    query: tuple[dict, ...] = ()  # its query parameters (read by http.py itself, as the bodies are)

    @property
    def statuses(self) -> tuple[int, ...]:
        return self.status if isinstance(self.status, tuple) else (self.status,)


ERROR_WHY = {400: "malformed JSON or not Unicode text",
             401: "no valid key: an admin route without the admin key; with api_keys configured, any other "
                  "route but /health, /ready and /metrics without one of them",
             403: "admin route with a wrong key, or from a non-local client without a configured key",
             404: "unknown model, adapter or experiment (also names that are not valid names); feedback: an id "
                  "that is not an experiment's answer's",
             409: "a config adapter or experiment (the serve config's `adapters`, `experiments`): change the config "
                  "instead; an experiment name already taken (the base model's, an adapter's); a version conflict "
                  "(if_version, or a change meanwhile: read it again); feedback already recorded for that id",
             410: "feedback for an id issued more than feedback_ttl_s ago: not counted",
             408: "the request body did not arrive within body_timeout_s (front gate)",
             413: "body, items, models or tokens over a limit", 415: "a compressed body (Content-Encoding)",
             422: "an invalid field or query parameter, or the wrong task for that adapter; experiments: an "
                  "invalid definition, an unknown adapter, arms of different tasks or bases, an unknown arm "
                  "(X-Polyhead-Arm)",
             429: "overloaded: retry after Retry-After seconds",
             503: "not ready, draining or unavailable: retry after Retry-After seconds"}
_INFER = (400, 401, 404, 408, 413, 415, 422, 429, 503)
MODELS_LIMIT = 1000  # the default and largest page of GET /v1/models (http.py pages with it)
MODEL_PAGE = (
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": MODELS_LIMIT, "default": MODELS_LIMIT},
     "description": "the most models in one page (OpenAI's cursor lists); without it, the first "
                    f"{MODELS_LIMIT}: every model of a server with fewer"},
    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "the id after which the page starts: the previous page's last_id (422 when no model has it)"})
_EXPERIMENT = "/v1/experiments/{name}"
OPERATIONS = {  # (method, path as FastAPI formats it) -> what it takes and answers
    ("get", "/health"): Operation(Status, (), auth="none"),
    ("get", "/ready"): Operation(Status, (503,), auth="none"),
    ("get", "/metrics"): Operation("text/plain", (503,), auth="none"),
    ("get", "/v1/models"): Operation(ModelList, (401, 422, 503), query=MODEL_PAGE),
    ("get", "/v1/models/{model}"): Operation(ModelObject, (401, 404, 503)),
    ("post", "/v1/classify"): Operation(ClassifyResponse, _INFER, "ClassifyBody", experiments=True),
    ("post", "/v1/tag"): Operation(TagResponse, _INFER, "TagBody", experiments=True),
    ("post", "/v1/embeddings"): Operation(EmbeddingsResponse, _INFER, "EmbeddingsBody", experiments=True),
    ("get", "/v1/adapters"): Operation(AdapterList, (401, 403), auth="admin"),
    ("post", "/v1/adapters"): Operation(AdapterAdded, (400, 401, 403, 413, 415, 422, 429), "AdapterBody", 201,
                                        auth="admin"),
    ("delete", "/v1/adapters/{name}"): Operation(AdapterDeleted, (401, 403, 404, 409), auth="admin"),
    ("get", "/v1/experiments"): Operation(ExperimentList, (401, 403, 503), auth="admin"),
    ("get", _EXPERIMENT): Operation(ExperimentObject, (401, 403, 404, 503), auth="admin"),
    ("put", _EXPERIMENT): Operation(ExperimentDefined, (400, 401, 403, 404, 409, 413, 415, 422, 503),
                                    "ExperimentBody", (200, 201), auth="admin"),
    ("delete", _EXPERIMENT): Operation(ExperimentDeleted, (401, 403, 404, 409, 503), auth="admin"),
    ("get", _EXPERIMENT + "/report"): Operation(ExperimentReport, (401, 403, 404, 503), auth="admin"),
    ("post", "/v1/feedback"): Operation(FeedbackAnswer, (400, 401, 404, 409, 410, 413, 415, 422, 503),
                                        "FeedbackBody"),
}
# an experiment's answer (`model` names an experiment): the request headers that pick its arm, the answer's
EXPERIMENT_PARAMETERS = [
    {"name": "X-Polyhead-User", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 256},
     "description": "the unit key of an experiment's sticky assignment where the body has no `user`"},
    {"name": "X-Polyhead-Arm", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "force an experiment's arm (testing): the request is left out of its statistics"}]
EXPERIMENT_HEADERS = {
    "X-Polyhead-Experiment": {"description": "the experiments that served the answer, comma-separated (only "
                              "when `model` names one)", "schema": {"type": "string"}},
    "X-Polyhead-Arm": {"description": "each one's arm, in the same order", "schema": {"type": "string"}}}


def api_routes(router):
    """Every APIRoute under `router`, in routers that FastAPI (>= 0.137) nests without flattening too."""
    for route in router.routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # fastapi.routing._IncludedRouter
            yield from api_routes(route.original_router)


def undocumented(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of the schema's routes without an OPERATIONS entry (a test keeps this empty)."""
    return sorted((m.lower(), r.path_format) for r in api_routes(app) if r.include_in_schema
                  for m in r.methods if (m.lower(), r.path_format) not in OPERATIONS)


def build_schema(app: FastAPI) -> dict:
    """The OpenAPI document of `app`'s routes, completed from OPERATIONS (the module docstring)."""
    from . import bodies  # the body models http.py validates with

    spec = get_openapi(title="polyhead", version=polyhead_version(), routes=app.routes,
                       description="One frozen base model, many adapters, one batched forward. Every error "
                                   "answers the JSON body ErrorBody.")
    body_names = sorted({op.body for op in OPERATIONS.values() if op.body})
    answers = sorted({op.answer for op in OPERATIONS.values() if not isinstance(op.answer, str)},
                     key=lambda m: m.__name__)
    keyed = [(getattr(bodies, name), "validation") for name in body_names]
    keyed += [(model, "serialization") for model in (*answers, ErrorBody)]
    refs, defs = models_json_schema(keyed, ref_template=REF)
    schemas = dict(defs.get("$defs", {}))
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            op = OPERATIONS.get((method, path))
            if op is None:
                continue
            if op.body:
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": refs[(getattr(bodies, op.body), "validation")]}}}
            answer = ({"text/plain": {"schema": {"type": "string"}}} if isinstance(op.answer, str) else
                      {"application/json": {"schema": refs[(op.answer, "serialization")]}})
            error = {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}
            operation["responses"] = {str(s): {"description": "OK" if s == 200 else "Created", "content": answer}
                                      for s in op.statuses}
            if op.query:
                operation["parameters"] = operation.get("parameters", []) + list(op.query)
            if op.experiments:
                operation["parameters"] = operation.get("parameters", []) + EXPERIMENT_PARAMETERS
                operation["responses"]["200"]["headers"] = EXPERIMENT_HEADERS
            operation["responses"].update({str(s): {"description": ERROR_WHY[s], "content": error}
                                           for s in op.errors})
            # {}: no key (the open routes; the others where no api_keys are configured)
            operation["security"] = {"admin": [{"adminKey": []}], "api": [{"apiKey": []}, {}], "none": []}[op.auth]
    used = json.dumps(spec["paths"])  # FastAPI's own (HTTPValidationError...) only where a route still uses them
    fastapis = spec.get("components", {}).get("schemas", {})
    schemas.update({k: v for k, v in fastapis.items() if REF.format(model=k) in used})
    spec["components"] = {"schemas": dict(sorted(schemas.items())), "securitySchemes": {
        "adminKey": {"type": "http", "scheme": "bearer", "description": "admin_api_key (or "
                     "$POLYHEAD_ADMIN_API_KEY); without one, admin routes answer local clients only"},
        "apiKey": {"type": "http", "scheme": "bearer", "description": "one of api_keys (or $POLYHEAD_API_KEY), "
                   "where configured"}}}
    return spec


_schemas: dict[int, dict] = {}


def _enabled() -> bool:
    """ServeConfig.openapi of the ingress replica this runs in (True outside Serve)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        ingress = serve.get_replica_context().servable_object
    except RayServeException:
        return True
    cfg = getattr(ingress, "cfg", None)
    return getattr(cfg, "openapi", True)


def unknown_route_message(request: Request) -> str:
    """The 404 message of a request no route answers; it names the route a trailing slash hid."""
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    route = path[len(root):] if root and path.startswith(root) else path
    message = f"no route {request.method} {path[:200]}"
    bare = route.rstrip("/")
    if bare and bare != route and any(r.path_regex.match(bare) for r in api_routes(request.app)):
        message += f": without the trailing slash, {(root + bare)[:200]}"
    return message


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")  # the app's route prefix in Serve's proxy


def _check_enabled(request: Request) -> None:
    if not _enabled():  # answered as any unknown route (http.py's handler: JSON, counted under "unknown")
        raise StarletteHTTPException(404, f"no route {request.method} {request.url.path[:200]} (openapi: false)")


def install(app: FastAPI) -> None:
    """Add GET /openapi.json, /docs and /docs/assets/{name} to `app` (before @serve.ingress freezes it)."""

    @app.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi_json(request: Request):
        _check_enabled(request)
        spec = _schemas.get(id(request.app))
        if spec is None:
            spec = _schemas[id(request.app)] = build_schema(request.app)
        root = _root(request)
        return JSONResponse(dict(spec, servers=[{"url": root}]) if root else spec)

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request):
        _check_enabled(request)
        root = _root(request)
        page = get_swagger_ui_html(openapi_url=root + OPENAPI_PATH, title="polyhead API",
                                   swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png")
        return HTMLResponse(page.body, headers={"Cache-Control": "no-cache"})

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str, request: Request):
        _check_enabled(request)
        if name not in ASSETS:
            raise StarletteHTTPException(404, f"no route GET {request.url.path[:200]}")
        path = files("fastapi_offline") / "static" / name
        return FileResponse(str(path), media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"})
