"""GET /v1/models's pages (OpenAI's cursor lists: `limit`, `after`, `first_id`, `last_id`, `has_more`), and the
base's and adapters' entries the ingress keeps between requests (ModelEntriesCache), so that a page costs its own
size rather than a listing of every adapter (10,000 adapters: 1.8 s before, 12 ms; benchmarks/scale_adapters.py).
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from adapters_store import AdapterStore
from adapters_store.listing import change_token

from .errors import ApiError
from .openapi import MODELS_LIMIT

MODELS_MAX_AGE_S = 30.0  # the adapters' entries are read again at least this often (a change the store's mark missed)
_LIMIT_RE = re.compile(r"[+-]?[0-9]{1,12}")


@dataclass(frozen=True)
class ModelEntries:
    """The base's and the adapters' /v1/models entries as a model replica listed them, and where each id is."""

    data: list[dict]  # the base first, then the adapters by name
    index: dict[str, int]  # id -> position in data
    broken: list[dict]  # store versions that cannot be read (ModelServer.adapter_listing)


class ModelEntriesCache:
    """ModelEntries reused while the adapter store's change token (adapters_store/listing.py: rewritten by every
    publish and removal, `polyhead adapters add|rm` too) is the one read before they were listed, for at most
    `max_age_s` (files changed by hand leave the token as it was). Listing every adapter is O(adapters) on the
    model replica (a stat per version, more where files changed) and in Ray's transfer: at 10,000 adapters,
    seconds (benchmarks/scale_adapters.py); with the entries kept, a page costs its own size. One listing at a
    time per token: the requests that arrive meanwhile wait for it, never list again."""

    def __init__(self, token, fetch, max_age_s: float = MODELS_MAX_AGE_S):
        """`token`: async () -> the store's change token; `fetch`: async () -> ModelEntries (a fresh listing)."""
        self._token, self._fetch, self.max_age_s = token, fetch, max_age_s
        self._kept: tuple[object, float, ModelEntries] | None = None  # (token, read at, entries)
        self._listing: tuple[object, asyncio.Future] | None = None  # (token, the listing in progress)
        self.listings = 0

    async def get(self) -> ModelEntries:
        token, now = await self._token(), time.monotonic()
        kept = self._kept
        if kept is not None and kept[0] == token and now - kept[1] < self.max_age_s:
            return kept[2]
        if self._listing is None or self._listing[1].done() or self._listing[0] != token:
            task = asyncio.ensure_future(self._list(token, now))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, if every caller left
            self._listing = (token, task)
        return await asyncio.shield(self._listing[1])  # a caller that goes away leaves it to the others

    async def _list(self, token, read_at: float) -> ModelEntries:
        entries = await self._fetch()
        self.listings += 1
        if self._kept is None or self._kept[1] <= read_at:  # never replaced by an older listing
            self._kept = (token, read_at, entries)
        return entries


def page_params(query) -> tuple[int, str | None]:
    """GET /v1/models's `limit` (1-MODELS_LIMIT, default MODELS_LIMIT) and `after` (a model id) from the query
    string; ApiError 422 invalid_field for anything else."""
    for key in ("limit", "after"):
        if len(query.getlist(key)) > 1:
            raise ApiError(422, f"query parameter {key} given {len(query.getlist(key))} times: give it once",
                           "invalid_field")
    raw, after = query.get("limit"), query.get("after")
    limit = MODELS_LIMIT
    if raw is not None:
        if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= MODELS_LIMIT:
            raise ApiError(422, f"limit must be an integer from 1 to {MODELS_LIMIT}, got {raw[:40]!r}",
                           "invalid_field")
        limit = int(raw)
    if after is not None and not after:
        raise ApiError(422, "after must be a model id (the last_id of the page before), got ''", "invalid_field")
    return limit, after


def model_page(entries: ModelEntries, extra: list[dict], limit: int, after: str | None) -> dict:
    """OpenAI's cursor list over entries.data + extra (the experiments): the `limit` models after the one whose id
    is `after` (from the first without it), with first_id, last_id and has_more; 422 for an `after` not listed."""
    extra = [e for e in extra if e["id"] not in entries.index]  # ids are unique: a cursor names one place
    data = entries.data + extra
    start = 0
    if after is not None:
        at = entries.index.get(after)
        if at is None:
            at = next((len(entries.data) + i for i, e in enumerate(extra) if e["id"] == after), None)
        if at is None:
            raise ApiError(422, f"after: no model {after[:80]!r} is listed (removed since the page that named it?); "
                           "list again from the start, without after", "invalid_field")
        start = at + 1
    page = data[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(data),
            "broken": entries.broken}


def store_token(store: AdapterStore):
    """The store's change token; where it cannot be read, a value equal to no other (the entries are listed again)."""
    try:
        return change_token(store)
    except Exception:  # noqa: BLE001 - an unreadable mark must not fail the listing, only its reuse
        return object()
