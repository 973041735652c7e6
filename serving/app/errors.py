"""HTTP errors: one JSON shape for every error, statuses from error kinds and row error codes.

Every error is JSON {"error": {"message", "type", "code"}} (OpenAI's shape); bad input is never a 500.
Statuses come from exception types and row error codes (ROW_CODES), never from the wording of a message.
"""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

ROW_CODES = {  # ModelServer row error code -> (HTTP status, error type)
    "model_not_found": (404, "not_found_error"),
    "wrong_task": (422, "invalid_request_error"),
    "adapter_invalid": (422, "invalid_request_error"),
    "invalid_input": (422, "invalid_request_error"),
    "too_many_tokens": (413, "invalid_request_error"),
    "non_finite_output": (422, "invalid_request_error"),  # the adapter's weights overflow on this input
    "source_not_allowed": (422, "invalid_request_error"),  # POST /v1/adapters: source_schemes / source_hosts
    "source_timeout": (422, "invalid_request_error"),  # POST /v1/adapters: source_timeout_s
    "registrations_busy": (429, "rate_limit_error"),  # POST /v1/adapters: max_concurrent_registrations
}
UNAVAILABLE = (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)  # 503: the model is not there
STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",  # 401: as OpenAI
                404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error", 410: "invalid_request_error",
                413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "overloaded_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None, adapter: str = "none"):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.adapter = status, message, code, headers, adapter


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": STATUS_TYPES.get(status, "server_error"), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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


def validation_summary(errors) -> str:
    parts = [f"{'.'.join(map(str, e.get('loc', ()))) or 'body'}: {e.get('msg', '')}" for e in errors[:3]]
    return "; ".join(parts)[:500]


def exact_path_param(request: Request, value: str) -> None:
    """404 unless the request's path really ends with the `{...:path}` parameter Starlette gave: it matches a
    route with `^...$`, whose `$` also matches before a final newline, so `DELETE /v1/adapters/name%0a` reached
    the route as `name` (and deleted it)."""
    if not request.scope.get("path", "").endswith(value):
        raise ApiError(404, "unknown model: the name in the path holds a character no name has",
                       "model_not_found", adapter="unknown")
