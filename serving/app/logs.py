"""Request logs: one JSON line per request, written to the process's real stdout.

Every request an Ingress replica serves through Ingress._serve (the inference, model-listing and admin
routes), every unknown route, and every answer the front gate gives itself (429, 408) is one line:

    {"time":"2026-01-02T03:04:05.678Z","level":"info","event":"request","request_id":"...","method":"POST",
     "path":"/v1/embeddings","route":"embeddings","model":"emb","resolved":["emb@3"],"status":200,
     "code":null,"rows":2,"tokens":17,"latency_ms":12.3,"client":"127.0.0.1"}

- `model` is the "model" field as the client sent it (a name, or the list of /v1/classify and /v1/tag, each
  cut to MAX_CHARS); `resolved` what each adapter resolved to in the model replica (`name@N` of the store,
  `name` of a static config entry, the base model's id for base rows), once the rows ran. `rows` and `tokens`
  count the rows sent to the model and their tokens. `code` is the error code of an error answer.
- Admin routes add `action` ("adapter.add", "adapter.remove"), `adapter`, and for an add its `source`
  (without user, password, query or fragment: a presigned URL carries its credentials there) and the
  `version` published: who (client), what and the result (status, code, version) in one line.
- Never in a line: an API key (inference or admin), an Authorization header, an input text or token ids,
  a request or response body. The client's X-Request-Id is cut to MAX_CHARS.
- Levels: 5xx "error", 401/403 "warning", everything else "info"; ServeConfig.log_level drops lower ones
  (warning: failed authentications and server errors only).

Where the lines go: file descriptor 1 of the process (Ray Serve replaces sys.stdout in its replicas with a
logger of its own files). A Ray worker's stdout is forwarded to the driver's stdout when the driver logs to
it (`ray.init(log_to_driver=True)`, the default); `polyhead serve` starts Ray with a job LoggingConfig
(serving/app/__init__.py run), which makes the driver print those lines as they are, without Ray's
"(ServeReplica:... pid=...)" prefix. A line holds no space (compact JSON, and a space inside a string is
written \\u0020): Ray's driver folds lines that look alike from several processes into "[repeated Nx across
cluster]" after dropping every space-separated word with a digit in it, and a line that is one word with
digits (its time) leaves nothing to compare. In a cluster the lines are in each worker's `worker-*.out` file
under Ray's log folder (and on the driver of `serve run`, prefixed); Serve's own access log of the Ingress is
off (build_app), so these lines are the only per-request ones.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextvars import ContextVar
from urllib.parse import urlsplit, urlunsplit

MAX_CHARS = 128  # of a model name or request id as the client sent it
MAX_MODELS = 32
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_CURRENT: ContextVar[dict | None] = ContextVar("polyhead_request_log", default=None)
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=str).encode  # built once: C encoder
_level: int | None = None  # the lowest level written; None: not configured (INFO)
_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def configure(level: str | None = None) -> None:
    """This process's request log level (None: INFO unless a level was set before). The last level given holds
    for the whole process (the ingress and a gate in front of it share one)."""
    global _level
    if level is not None or _level is None:
        _level = logging.getLevelName((level or "INFO").upper())


def write(line: str) -> None:
    """Where lines go: file descriptor 1 of this process, one write per line (Ray Serve replaces sys.stdout in
    its replicas with a logger of its own files; descriptor 1 is still the worker's stdout). A log line never
    fails a request: a closed stdout drops it."""
    data = (line + "\n").encode("ascii")
    try:
        while data:
            data = data[os.write(1, data):]
    except OSError:
        pass


sink = write  # tests read the lines by replacing it


def level_of(status: int) -> int:
    if status >= 500:
        return logging.ERROR
    if status in (401, 403):
        return logging.WARNING
    return logging.INFO


def utc_now() -> str:
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def emit(fields: dict) -> None:
    """One line of `fields` (which holds "status") with time, level and event first."""
    level = level_of(fields.get("status") or 0)
    if level < (logging.INFO if _level is None else _level):
        return
    line = _ENCODE({"time": utc_now(), "level": _NAMES[level], "event": "request", **fields})
    sink(line.replace(" ", "\\u0020"))  # no space: never folded by Ray's driver (the module's docstring)


_NAMES = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}


def request_id(headers) -> str:
    """The request's X-Request-Id (Ray Serve's HTTP servers set one where the client sent none, and echo it);
    one made here where there is none (outside Serve, or before Serve's middleware: the front gate)."""
    given = headers.get("x-request-id") if headers is not None else None
    return given[:MAX_CHARS] if given else str(uuid.uuid4())


def cut(value):
    """A client's "model" value as the log shows it: strings cut to MAX_CHARS, lists to MAX_MODELS."""
    if isinstance(value, str):
        return value[:MAX_CHARS]
    if isinstance(value, list):
        return [cut(v) for v in value[:MAX_MODELS]]
    return None if value is None else type(value).__name__


def safe_source(source: str) -> str:
    """An adapter source without user, password, query or fragment (presigned URLs carry credentials)."""
    try:
        parts = urlsplit(source)
    except ValueError:
        return "(unparsable)"
    if not parts.scheme or not parts.netloc:
        return source.split("?", 1)[0].split("#", 1)[0][:500]
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))[:500]


def start(request) -> dict:
    """The log record of the request the calling task serves (note() adds to it, finish() writes it)."""
    scope = request.scope  # what is read here: the headers, the client and the ASGI scope
    record = {"request_id": request_id(request.headers), "method": scope.get("method"),
              "path": scope.get("path", "")[:500], "route": None, "model": None, "resolved": None, "status": None,
              "code": None, "rows": None, "tokens": None, "latency_ms": None,
              "client": request.client.host if request.client else None, "_start": time.perf_counter()}
    _CURRENT.set(record)
    return record


def note(**fields) -> None:
    """Add fields to the current request's record (nothing outside a request)."""
    record = _CURRENT.get()
    if record is not None:
        record.update(fields)


def note_rows(rows: list[dict], results: list[dict] | None, base_name: str) -> None:
    """Rows and tokens sent to the model, and what each distinct adapter resolved to there."""
    record = _CURRENT.get()
    if record is None:
        return
    record["rows"] = (record["rows"] or 0) + len(rows)
    record["tokens"] = (record["tokens"] or 0) + sum(len(r["input_ids"]) for r in rows)
    if results:
        resolved = record["resolved"] or []
        for row, res in zip(rows, results):
            name = res.get("resolved") if row.get("adapter") is not None else base_name  # none: a row error
            if name and name not in resolved:
                resolved.append(name)
        record["resolved"] = resolved[:MAX_MODELS]


def finish(record: dict, route: str, status: int, code: str | None = None) -> None:
    record.update(route=route, status=status, code=code,
                  latency_ms=round((time.perf_counter() - record.pop("_start")) * 1000, 2))
    _CURRENT.set(None)
    emit(record)


def finish_raised(record: dict, route: str, exc: BaseException) -> None:
    """The line of a request whose handler raised: a bug (500), or the client went away (499, as nginx logs it)."""
    if isinstance(exc, asyncio.CancelledError):
        finish(record, route, 499, "client_closed")
    else:
        finish(record, route, 500, "internal_error")
