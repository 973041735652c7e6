"""Request bodies: the pydantic models of every route's body (unknown fields ignored, no silent coercion), and
reading a body as JSON with its own status for each problem (size, encoding, syntax, Unicode)."""
from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from serving.experiments.spec import ExperimentBody  # noqa: F401 - PUT /v1/experiments/{name} (openapi.py)

from .errors import ApiError, unpaired_surrogate
from .tagging import STRATEGIES
from .truncate import TruncateFields


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ClassifyBody(_Body, TruncateFields):  # truncate, truncation_direction, truncate_prompt_tokens
    model: str | list[str]
    input: str | list[str]
    user: str | None = None  # OpenAI's end-user id: an experiment's unit key (else the X-Polyhead-User header)
    threshold: float = Field(0.5, ge=0, le=1)  # multi-label heads


class TagBody(_Body, TruncateFields):
    model: str | list[str]
    input: str | list[str]
    user: str | None = None
    aggregation_strategy: Literal[STRATEGIES] = "simple"  # as transformers' token-classification pipeline


class EmbeddingsBody(_Body, TruncateFields):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # unit-length vectors; None: as the base's sentence-transformers config says
    user: str | None = None


class FeedbackBody(_Body):
    id: str  # the `id` of an answer an experiment served
    value: bool | float  # an outcome: a 0/1 conversion (or true/false), or a number


class AdapterBody(_Body):
    name: str
    source: str
    labels: list[str] | None = None


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object body: at most `limit` bytes, uncompressed, UTF-8, Unicode text; ApiError
    (413, 415, 400, 422) otherwise. Read here, not by FastAPI, so that each problem gets its own status."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # read as it is, a compressed body would be "malformed JSON"
        raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the JSON body "
                       "uncompressed", "unsupported_encoding")
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
