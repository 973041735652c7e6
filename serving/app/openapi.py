"""GET /openapi.json and the /docs page (Swagger UI), served offline; ServeConfig.openapi turns both off.

The ingress reads request bodies itself (serving/app/http.py: its own size limits and statuses), so FastAPI
sees no body model and no error answer. The schema here is FastAPI's generation over the app's real routes
(paths, parameters, summaries) completed from OPERATIONS: each operation's request body is the JSON schema of
the model http.py validates it with (ClassifyBody, ...), its answer one of the response models below, and
every error status it can answer, each with the error body {"error": {"message", "type", "code"}}.
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
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import polyhead_version

OPENAPI_PATH, DOCS_PATH, ASSETS_PATH = "/openapi.json", "/docs", "/docs/assets"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
REF = "#/components/schemas/{model}"


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
    data: list[ModelObject]
    broken: list[BrokenVersion] = Field([], description="store versions skipped because they cannot be read")


class ClassifyItem(BaseModel):
    index: int = Field(description="the input's index")
    model: str = Field(description="the model as named in the request")
    label: str = Field(description="the most probable label")
    probs: list[float] = Field(description="softmax (multi-label heads: sigmoid) of the logits")
    logits: list[float]
    labels: list[str] | None = Field(None, description="multi-label heads only: the labels above the threshold")


class ClassifyResponse(BaseModel):
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
    model: str
    entities: list[Entity]


class TagResponse(BaseModel):
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
    object: Literal["list"]
    data: list[Embedding]
    model: str
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


# operations ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    answer: type[BaseModel] | str  # a model, or a media type of a text answer
    errors: tuple[int, ...]
    body: str | None = None  # the name of http.py's body model
    status: int = 200
    auth: str = "api"  # "admin": the admin key; "api": one of api_keys where configured; "none": open


ERROR_WHY = {400: "malformed JSON or not Unicode text",
             401: "no valid key: an admin route without the admin key; with api_keys configured, any other "
                  "route but /health, /ready and /metrics without one of them",
             403: "admin route with a wrong key, or from a non-local client without a configured key",
             404: "unknown model or adapter (also names that are not valid names)",
             409: "a config adapter (the serve config's `adapters`): remove it from the config instead",
             408: "the request body did not arrive within body_timeout_s (front gate)",
             413: "body, items, models or tokens over a limit", 415: "a compressed body (Content-Encoding)",
             422: "an invalid field, or the wrong task for that adapter",
             429: "overloaded: retry after Retry-After seconds",
             503: "not ready, draining or unavailable: retry after Retry-After seconds"}
_INFER = (400, 401, 404, 408, 413, 415, 422, 429, 503)
OPERATIONS = {  # (method, path as FastAPI formats it) -> what it takes and answers
    ("get", "/health"): Operation(Status, (), auth="none"),
    ("get", "/ready"): Operation(Status, (503,), auth="none"),
    ("get", "/metrics"): Operation("text/plain", (503,), auth="none"),
    ("get", "/v1/models"): Operation(ModelList, (401, 503)),
    ("get", "/v1/models/{model}"): Operation(ModelObject, (401, 404, 503)),
    ("post", "/v1/classify"): Operation(ClassifyResponse, _INFER, "ClassifyBody"),
    ("post", "/v1/tag"): Operation(TagResponse, _INFER, "TagBody"),
    ("post", "/v1/embeddings"): Operation(EmbeddingsResponse, _INFER, "EmbeddingsBody"),
    ("get", "/v1/adapters"): Operation(AdapterList, (401, 403), auth="admin"),
    ("post", "/v1/adapters"): Operation(AdapterAdded, (400, 401, 403, 413, 415, 422, 429), "AdapterBody", 201,
                                        auth="admin"),
    ("delete", "/v1/adapters/{name}"): Operation(AdapterDeleted, (401, 403, 404, 409), auth="admin"),
}


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
            operation["responses"] = {str(op.status): {"description": "OK" if op.status == 200 else "Created",
                                                       "content": answer}}
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
