"""From a request's "model" field to what serves it: the base model or a registered adapter.

`AdapterSources` is the registry of where each adapter's files are (config `adapters` plus
names registered through the admin route). It is kept small so that it can be swapped for
`adapters_store.AdapterStore` (resolve / add / list / remove) when that lands.
A/B routes (one name -> weighted adapters) are a later issue.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from adapters_store import AdapterError, check_name

BASE_ALIASES = ("base",)


class UnknownModel(LookupError):
    """A "model" that names neither the base nor a valid adapter name (never a path)."""


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    labels: tuple[str, ...] | None = None


class AdapterSources:
    """name -> Source, thread-safe; the in-memory registry (config + admin)."""

    def __init__(self, initial: dict[str, Source] | None = None):
        self._lock = threading.Lock()
        self._by_name: dict[str, Source] = dict(initial or {})

    def resolve(self, name: str) -> Source | None:
        with self._lock:
            return self._by_name.get(name)

    def add(self, name: str, path: str | Path, labels=None) -> Source:
        check_name(name)
        folder = Path(path)
        if not folder.is_dir():
            raise AdapterError(f"adapter source {str(path)[:200]!r} is not a folder on the server")
        source = Source(name, str(folder.resolve()), tuple(labels) if labels is not None else None)
        with self._lock:
            self._by_name[name] = source
        return source

    def remove(self, name: str) -> bool:
        with self._lock:
            return self._by_name.pop(name, None) is not None

    def list(self) -> list[Source]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda s: s.name)


def resolve_model(model, base_name: str, max_chars: int = 128) -> str | None:
    """The adapter name a "model" value asks for, None for the base model; UnknownModel if not a valid name."""
    if not isinstance(model, str):
        raise UnknownModel("model must be a string")
    if model == base_name or model in BASE_ALIASES:
        return None
    if len(model) > max_chars:
        raise UnknownModel(f"unknown model {model[:40]!r}... ({len(model)} characters)")
    try:
        return check_name(model)
    except AdapterError:
        raise UnknownModel(f"unknown model {model[:80]!r}") from None
