"""The front gate: admission in Ray's HTTP proxy, before an overloaded server spends Ray work on a request.

Ray Serve's proxy wraps its ASGI app in the Starlette middlewares returned by the function that
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names, called when the proxy starts; `middlewares()` is that
function (`start_local_ray` sets the variable; deploy/ sets it in the cluster's pods). With direct ingress
(`start_local_ray(direct_ingress_ports=...)`, what `polyhead serve` runs) each ingress replica's own HTTP
server is wrapped in the same middlewares: the gate then sits in front of Serve's request handling in that
replica, and a "proxy" below means whichever HTTP server the gate wraps.

`Gate` counts, per route prefix, the inference requests (POST .../v1/classify, /v1/tag, /v1/embeddings)
this proxy has passed on and not yet answered. While as many are out as a polyhead app admits, a new one is
answered 429 at once, with the ingress's JSON error body and a Retry-After, and is never routed. Both follow
the ingress's rule (serving/app/admission.py) in requests instead of rows: the requests out are admitted while
the rate of 2xx answers the gate has measured works them off within the app's max_queue_wait_s (its
max_batch_size always), at most its limit (gate_max_requests), which is also the limit while no rate is known.

Why: a request that reaches the ingress has already cost Ray's proxy (~6 ms of CPU on the 2-core dev
machine) and the ingress replica's Ray machinery (~8 ms) before its handler can refuse it, and under
overload refusals queue behind that work (serve_load, 32 tokens, 4x overload: shed p99 1.4 s without the
gate, 0.2 s with it). Here a refusal costs the HTTP parse and one small response.

A burst of new connections is gated at once: while connections wait in the kernel's accept queue, an
admitted request waits before any of its work runs (serving/app/backlog.py: an event loop on libuv accepts
one connection per iteration, and admitted work would make those iterations long).

The gate learns each app from its own answers: the ingress puts ADMISSION_HEADER on every inference answer
to a request that came through a gate (marked with GATED_HEADER, which the gate sets and a client cannot:
the gate replaces it), with the app name, limit, Retry-After bounds and metrics push interval
(serving/app/http.py); the gate reads and removes it. Without a gate, clients never see it. So it gates
only polyhead apps, follows their config when they are redeployed, and passes everything on until an app
has answered once. The ingress's own row admission stays: it counts rows, and a request of many rows can
pass the gate and still be refused there, as can a burst through a gate with no rate measured yet (one of
several proxies that has served little lately) while the ingress has measured one. Each gate's expected wait
needs no share of the limit, unlike a fixed count: with k gates each sees about 1/k of the backlog and 1/k
of the rate.

Refusals are counted in the app's request, error and latency series (route, code 429; adapter "none", type
"overloaded"), pushed to the app's MetricsHub like a replica's (deployment "Gate", one source per proxy and
app), so GET /metrics counts them with everything else, and apart in `polyhead_gate_refusals{route}`. Ray's
per-node export (the cluster route) has only the latter, as `ray_polyhead_gate_refusals_total{application,
route}`: its `ray_polyhead_requests_total` counts what reached an ingress replica.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from urllib.parse import quote, unquote

from . import logs
from .admission import Admission, client_key
from .backlog import MAX_HOLD_S, AcceptHold

GATED = {"/v1/classify": "classify", "/v1/tag": "tag", "/v1/embeddings": "embeddings"}  # path -> metrics route
ADMISSION_HEADER = "x-polyhead-admission"
GATED_HEADER = "x-polyhead-gated"  # on requests the gate passes on: only those get ADMISSION_HEADER back
_ADMISSION, _GATED = ADMISSION_HEADER.encode(), GATED_HEADER.encode()  # as ASGI carries them
CALLBACK = "serving.app.gate:middlewares"  # the value of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
OVERLOADED = "the server is overloaded: the model's queue is full, retry later"
REFUSAL = {"message": OVERLOADED, "type": "rate_limit_error", "code": "overloaded"}  # as Ingress._overloaded answers
UNLIMITED = sys.maxsize
# A request counts as out only once its body has arrived (read here, at most this many bytes: a larger one is
# passed on as it streams, for the ingress to refuse): a client that sends its body slowly, or never, holds
# no place. A body that takes longer than this is answered 408. The app's own values replace these.
BODY_TIMEOUT_S = 30.0
BODY_BYTES = 1_000_000


def middlewares() -> list:
    """The proxy callback."""
    from starlette.middleware import Middleware

    return [Middleware(Gate)]


def admission_header(app: str, max_requests: int, min_retry_s: int, max_retry_s: int, push_s: float,
                     hold_s: float = MAX_HOLD_S, body_s: float = BODY_TIMEOUT_S, body_bytes: int = BODY_BYTES,
                     log_level: str = "INFO", wait_s: float = 0.0, floor: int = 1) -> str:
    """The value the ingress sends; max_requests 0 turns the gate off for that app, hold_s 0 its accept hold.
    wait_s, floor: Admission's max_wait_s and min_rows, in requests (0: a fixed limit of max_requests)."""
    return (f"app={quote(app, safe='')};max={max_requests};retry={min_retry_s}-{max_retry_s};push={push_s:g};"
            f"hold={hold_s:g};body={body_s:g};bytes={body_bytes};log={log_level};wait={wait_s:g};floor={floor}")


def parse_admission(value: str) -> dict | None:
    """admission_header's fields, None if malformed."""
    try:
        fields = dict(part.split("=", 1) for part in value.split(";"))
        low, high = fields["retry"].split("-")
        out = {"app": unquote(fields["app"]), "max": int(fields["max"]), "min_retry_s": int(low),
               "max_retry_s": int(high), "push_s": float(fields["push"]),
               "hold_s": float(fields.get("hold", MAX_HOLD_S)),  # absent: an ingress of an older version
               "body_s": float(fields.get("body", BODY_TIMEOUT_S)), "body_bytes": int(fields.get("bytes", BODY_BYTES)),
               "log_level": fields.get("log", "INFO"),
               "wait_s": float(fields.get("wait", 0)), "floor": int(fields.get("floor", 1))}  # 0: a fixed limit
    except (KeyError, ValueError):
        return None
    if out["log_level"] not in logs.LEVELS:
        return None
    if (out["max"] < 0 or out["min_retry_s"] < 0 or out["max_retry_s"] < out["min_retry_s"] or out["push_s"] <= 0
            or not 0 <= out["hold_s"] <= 1 or not 0 < out["body_s"] <= 3600 or out["body_bytes"] < 0
            or not 0 <= out["wait_s"] <= 3600 or out["floor"] < 1):
        return None
    return out


def gated_route(scope: dict) -> tuple[str, str] | None:
    """(route prefix, metrics route) of an inference request; None for anything else."""
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return None
    path = scope.get("path", "")
    for suffix, route in GATED.items():
        if path.endswith(suffix):
            return path[: -len(suffix)], route
    return None


class AppGate:
    """One route prefix: its requests out, and once its app has answered, its limit and metrics."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.admission = Admission(UNLIMITED, 1, 1)
        self.config: dict | None = None
        self.raw: bytes | None = None  # the header value `config` was parsed from
        self.recorder = None
        self.pusher = None
        self.ray_refusals = None  # ray.util.metrics.Counter, in a Ray process

    def configure(self, config: dict) -> None:
        adm = self.admission
        adm.max_pending_rows = config["max"] or UNLIMITED
        adm.max_wait_s = config["wait_s"] if config["max"] else 0.0  # max 0: no gate at all
        adm.min_rows = config["floor"]
        adm.min_retry_s, adm.max_retry_s = config["min_retry_s"], config["max_retry_s"]
        if self.config is None or config["app"] != self.config["app"]:
            self.recorder, self.pusher, self.ray_refusals = _app_metrics(config["app"], self.prefix, config["push_s"])
        self.config = config
        logs.configure(config["log_level"])  # the gate's own answers are logged too (serving/app/logs.py)
        if self.pusher is not None:
            self.pusher.ensure_started()  # from here on the app's GET /metrics counts this source

    def count_refusal(self, route: str, seconds: float) -> None:
        if self.recorder is None:
            return
        self.count_answer(route, 429, "overloaded", seconds)
        self.recorder.refusals.labels(route).inc()
        if self.ray_refusals is not None:
            self.ray_refusals.inc(1, tags={"application": self.config["app"], "route": route})

    def count_answer(self, route: str, status: int, error: str, seconds: float) -> None:
        """An answer the gate gave itself, in the app's request, error and latency series."""
        if self.recorder is None:
            return
        self.recorder.requests.labels(route, status).inc()
        self.recorder.errors.labels(route, "none", error).inc()
        self.recorder.latency.labels(route).observe(seconds)


def _app_metrics(app: str, prefix: str, push_s: float):
    """A Recorder of the ingress's request series (not exported to Ray under those names: Ray's export there
    carries the replica's tags), its pusher to the app's hub, and the Ray counter of refusals (both None
    outside Ray)."""
    from .metrics import GATE_SERIES, INGRESS_SERIES, Recorder

    series = {k: INGRESS_SERIES[k] for k in ("requests", "errors", "latency")} | GATE_SERIES
    recorder = Recorder(series, ray_export=False)
    pusher = ray_refusals = None
    try:
        import ray

        if ray.is_initialized():
            from ray.util.metrics import Counter

            from .hub import MetricsPusher

            source = f"gate:{ray.get_runtime_context().get_node_id()}:{os.getpid()}:{prefix or '/'}"
            pusher = MetricsPusher(recorder, app, "Gate", source, push_s)
            refusals = GATE_SERIES["refusals"]
            ray_refusals = Counter(refusals.name, refusals.help, tag_keys=("application", "route"))
    except Exception:  # noqa: BLE001 - metrics never stop the gate
        pusher = ray_refusals = None
    return recorder, pusher, ray_refusals


class Gate:
    """Pure ASGI middleware. A request counts as out from the end of its body (read here first, with a deadline)
    until its answer's last part is handed on (a closed-loop client's next request can arrive before the app's
    call returns: it must not find its previous one still counted); a 2xx answer counts towards the rate
    Retry-After is computed from."""

    def __init__(self, app):
        self.app = app
        self.gates: dict[str, AppGate] = {}
        logs.configure()  # INFO until an app's answer gives its log_level

    async def __call__(self, scope, receive, send):
        gated = gated_route(scope)
        if gated is None:
            return await self.app(scope, receive, send)
        prefix, route = gated
        gate = self.gates.get(prefix)
        if gate is None:  # kept once its app answers with its settings (below): the path prefixes no app answers,
            gate = AppGate(prefix)  # any number a client makes up (POST /<anything>/v1/classify), leave nothing
        adm = gate.admission
        if gate.config is None or gate.config["max"]:  # gating (or not known yet): the body first
            arrived = await _read_body(receive, gate.config)
            if arrived is None:  # the client went away before its body arrived: nobody to answer
                return
            if arrived is TIMEOUT:
                seconds = gate.config["body_s"] if gate.config else BODY_TIMEOUT_S
                await _answer(send, 408, {"message": f"the request body did not arrive within {seconds:g} s",
                                          "type": "invalid_request_error", "code": "body_timeout"},
                              [(b"connection", b"close"), (b"x-request-id", _log(scope, route, 408, seconds))])
                gate.count_answer(route, 408, "body_timeout", seconds)
                return
            receive = arrived
        if adm.full:
            start = time.perf_counter()
            await _refuse(send, adm.refuse(client_key(scope)), _log(scope, route, 429, start=start))
            gate.count_refusal(route, time.perf_counter() - start)
            return
        status, out = 0, True

        def release() -> None:
            nonlocal out
            if out:
                out = False
                adm.done(1, answered=200 <= status < 300)

        async def send_reading_admission(message):
            nonlocal status
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()  # before the last bytes leave: a client's next request must not find this one still out
            elif message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or []
                values = [v for k, v in headers if k.lower() == _ADMISSION]
                if values:
                    if values[-1] != gate.raw:  # the same app config answer after answer: parsed once
                        config = parse_admission(values[-1].decode("latin-1"))
                        kept = self.gates.setdefault(prefix, gate) if config is not None else None  # the first
                        if kept is not None and values[-1] != kept.raw:  # of concurrent first requests' gates
                            kept.configure(config)
                            kept.raw = values[-1]
                    message = {**message, "headers": [(k, v) for k, v in headers if k.lower() != _ADMISSION]}
            await send(message)

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != _GATED]
        scope = {**scope, "headers": headers + [(_GATED, b"1")]}
        adm.admit(1)
        try:
            if gate.config is not None and gate.config["max"] and gate.config["hold_s"]:
                hold = AcceptHold.for_server(scope.get("server"))  # refusals possible: let a burst reach the gate
                if hold is not None:
                    await hold.wait(gate.config["hold_s"])
            await self.app(scope, receive, send_reading_admission)
        finally:
            release()


TIMEOUT = object()
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


async def _read_body(receive, config: dict | None):
    """Read the request's body (up to the app's body limit) within the app's body deadline. Returns a receive
    callable that hands the messages read on first, then reads on; TIMEOUT; or None if the client went away."""
    limit = config["body_bytes"] if config else BODY_BYTES
    messages: list[dict] = []

    async def read() -> bool:
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return False  # http.disconnect
            size += len(message.get("body", b""))
            if not message.get("more_body", False) or size > limit:  # whole, or too large: the ingress says 413
                return True

    seconds = config["body_s"] if config else BODY_TIMEOUT_S
    try:
        if _timeout is not None:  # a timer on this task: no new task per request, as wait_for makes
            async with _timeout(seconds):
                whole = await read()
        else:
            whole = await asyncio.wait_for(read(), seconds)
    except (asyncio.TimeoutError, TimeoutError):
        return TIMEOUT
    if not whole:
        return None

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay


async def _refuse(send, retry_after: int, request_id: bytes) -> None:
    await _answer(send, 429, REFUSAL, [(b"retry-after", str(retry_after).encode()), (b"x-request-id", request_id)])


def _log(scope: dict, route: str, status: int, seconds: float | None = None, start: float | None = None) -> bytes:
    """The request log line of an answer the gate gives itself; its X-Request-Id (the client's, else a new
    one: Serve's RequestIdMiddleware, which sets it on every other answer, is behind the gate)."""
    given = next((v for k, v in scope.get("headers", ()) if k.lower() == b"x-request-id" and v), None)
    request_id = given.decode("latin-1") if given else None
    fields = {"request_id": logs.request_id({"x-request-id": request_id}), "method": scope.get("method"),
              "path": scope.get("path", "")[:500], "route": route, "status": status,
              "code": "overloaded" if status == 429 else "body_timeout",
              "latency_ms": round((time.perf_counter() - start) * 1000 if start else seconds * 1000, 2),
              "client": scope["client"][0] if scope.get("client") else None, "by": "gate"}
    logs.emit(fields)
    return given if given else fields["request_id"].encode()


async def _answer(send, status: int, error: dict, headers: list) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
