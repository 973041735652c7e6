"""Inference API keys: who may call the inference routes (everything but the admin routes and the probes).

Keys come from ServeConfig.api_keys (`$POLYHEAD_API_KEY`, comma-separated, where the config leaves it null).
A client sends one as OpenAI's clients do, `Authorization: Bearer <key>` (the openai client's `api_key`).
With no keys configured, the inference routes are open (the default, as before).

- Missing or wrong key: 401 in OpenAI's shape, type "invalid_request_error", code "missing_api_key" or
  "invalid_api_key", checked before the body is read and before admission (a 401 never costs a model call).
  The front gate (serving/app/gate.py) knows no keys: an unauthenticated request counts there for the
  microseconds the ingress takes to refuse it, and under overload it may be answered 429 first.
- Constant time: the token's SHA-256 is compared with every key's SHA-256 (hmac.compare_digest, all of them,
  no early exit), so neither the time nor the length of a comparison tells a key's characters or which key
  matched.
- Separate from the admin key (ServeConfig.admin_api_key, Ingress._check_admin): an inference key does not
  open the admin routes and the admin key does not open the inference routes; a config that makes the admin
  key an inference key too is refused.
- /health, /ready and /metrics stay open (probes and Prometheus carry no key); keep the port behind a network
  boundary that admits only those who may read the metrics.
"""
from __future__ import annotations

import hashlib
import hmac

# routes (Ingress._serve's route names) that check the admin key instead of an inference key
ADMIN_ROUTES = frozenset({"adapters", "experiments"})
MISSING = ("missing_api_key", "You didn't provide an API key: send it in an Authorization header using Bearer "
           "auth (Authorization: Bearer YOUR_KEY)")
WRONG = ("invalid_api_key", "Incorrect API key provided")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None where there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class InferenceKeys:
    def __init__(self, keys: list[str] | None):
        self._digests = tuple(_digest(k) for k in keys or ())

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def matches(self, token: str) -> bool:
        digest = _digest(token)
        found = False
        for key in self._digests:  # every key, whichever matches
            found |= hmac.compare_digest(digest, key)
        return found

    def refusal(self, authorization: str | None) -> tuple[str, str] | None:
        """(error code, message) of a request that may not infer, None if it may."""
        if not self._digests:
            return None
        token = bearer_token(authorization)
        if token is None:
            return MISSING
        return None if self.matches(token) else WRONG


def parse_env_keys(value: str | None) -> list[str] | None:
    """$POLYHEAD_API_KEY: one key, or several separated by commas (spaces around them ignored)."""
    if not value or not value.strip():
        return None
    return [k.strip() for k in value.split(",") if k.strip()]


def check_key(key: str) -> None:
    """ValueError for a key no client can send in an Authorization header."""
    if not key:
        raise ValueError("an API key is empty")
    if any(c.isspace() or c == "," or not c.isprintable() or not c.isascii() for c in key):
        raise ValueError("an API key must be printable ASCII without spaces or commas")


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
RELAY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def is_local_client(scope: dict, headers, trusted_proxies=()) -> bool:
    """Whether a request comes from this machine, for the admin routes when no admin key is configured.

    Decided from the socket peer (`polyhead serve` makes uvicorn trust no forwarded header:
    FORWARDED_ALLOW_IPS, start_local_ray): a loopback peer is local unless it relays someone else's request.
    A request that carries a forwarding header (X-Forwarded-For, Forwarded, X-Real-IP) came through a proxy:
    from a peer in `trusted_proxies` (ServeConfig.forwarded_allow_ips) the client is the last address that
    proxy appended to X-Forwarded-For; from any other peer it is not local (a same-host proxy that passes a
    client's own `X-Forwarded-For: 127.0.0.1` through, or adds nothing, must not make every client local).
    """
    client = scope.get("client")
    peer = client[0] if client else None
    relayed = any(headers.get(name) for name in RELAY_HEADERS)
    if not relayed:
        return peer in LOOPBACK
    if peer not in trusted_proxies:
        return False
    forwarded = [part.strip() for part in (headers.get("x-forwarded-for") or "").split(",") if part.strip()]
    return bool(forwarded) and forwarded[-1] in LOOPBACK
