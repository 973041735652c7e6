"""Response ids: every inference answer has an `id`; an experiment's answer carries, signed, what served it.

    plain:       "<route>-<24 hex>"                           (e.g. "cls-3f2a...")
    experiment:  "ab-<payload>.<signature>"
                 payload   = base64url(JSON [issued unix seconds, nonce, [[experiment, uid, phase, arm], ...]])
                 signature = base64url(HMAC-SHA256(key, payload)[:16]); key: ExperimentStore.secret()

POST /v1/feedback reads the experiment and arm back from the id itself, on whichever ingress replica it reaches,
with no lookup; the signature means a client cannot make up an id for an arm. The ledger remembers the ids it
counted for `feedback_ttl_s` (ledger.py), so each id counts once, and refuses older ones.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

PREFIX = "ab-"
MAX_ID_CHARS = 2048
ROUTE_PREFIXES = {"classify": "cls", "tag": "tag", "embeddings": "emb"}


class BadId(ValueError):
    """Not an id this server made for an experiment's answer."""


@dataclass(frozen=True)
class Served:
    experiment: str
    uid: str  # the experiment's uid: a name deleted and created again is another experiment
    phase: int
    arm: str


def plain_id(route: str) -> str:
    return f"{ROUTE_PREFIXES.get(route, route)}-{secrets.token_hex(12)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def experiment_id(key: bytes, served: list[Served], now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    payload = _b64(json.dumps([issued, secrets.token_hex(8), [[s.experiment, s.uid, s.phase, s.arm] for s in served]],
                              separators=(",", ":")).encode())
    return f"{PREFIX}{payload}.{_b64(hmac.new(key, payload.encode(), hashlib.sha256).digest()[:16])}"


def parse(key: bytes, value) -> tuple[int, list[Served]]:
    """(issued unix seconds, what served it) of an experiment id; BadId otherwise."""
    if not isinstance(value, str) or not value.startswith(PREFIX) or len(value) > MAX_ID_CHARS:
        raise BadId("not the id of an answer served by an experiment")
    payload, _, signature = value[len(PREFIX):].partition(".")
    want = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest()[:16])
    if not hmac.compare_digest(signature.encode(), want.encode()):
        raise BadId("unknown id: its signature does not match (not issued by this server)")
    try:
        issued, _, served = json.loads(_unb64(payload))
        return int(issued), [Served(str(e), str(u), int(p), str(a)) for e, u, p, a in served]
    except (ValueError, TypeError) as exc:
        raise BadId(f"malformed id ({type(exc).__name__})") from None
