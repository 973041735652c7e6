"""From a request's "model" field to what serves it: the base model, a static adapter, or a store version.

`Registry` is where adapters' files are: the config's `adapters` (static entries, name -> folder,
resolved directly, this replica only) and an `adapters_store.AdapterStore` (versioned; every
replica that opens the same store root sees the same registrations). A request names `name`
(a static entry, else the store's latest version) or `name@N` (a pinned store version).
Store lookups are cached for `ttl_s` seconds, so a version published by another replica or by
`polyhead adapters add` is picked up within that time.
A/B routes (one name -> weighted adapters) are a later issue.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapters_store import AdapterError, AdapterStore, AdapterVersion, parse_ref
from adapters_store.listing import Broken, scan

BASE_ALIASES = ("base",)
RESOLVE_TRIES = 3  # store lookups of one ref when a failed one races a new version of the name
MAX_KEY_CHARS = 128  # adapters_store.check_name's limit: the engine's keys are checked names


class UnknownModel(LookupError):
    """A "model" that names neither the base nor a valid adapter reference (never a path)."""


class UnknownAdapter(LookupError):
    """A valid reference that nothing is registered under (any more)."""


@dataclass(frozen=True)
class Source:
    """A static adapter from the config: name -> folder (+ labels overriding the adapter's own)."""

    name: str
    path: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to, and the key it is loaded under in the engine."""

    ref: str  # as asked: "name" or "name@N"
    name: str
    version: int | None  # None: a static config entry
    path: str
    labels: tuple[str, ...] | None
    key: str
    warnings: tuple[str, ...] = ()  # Registry.add only: what validating the new version found (AdapterSpec.warnings)

    @property
    def full_ref(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def engine_key(name: str, version: int | None) -> str:
    """The engine's key for one adapter version: `<name>.v<N>` (static entries: `.v0`, a number the
    store never hands out). Injective: the version has no '.v', so the last '.v' splits it off.
    Not `name@N` itself: Engine.load_adapter checks its key as a plain adapter name, which has no '@'.
    Names too long for the suffix keep a prefix plus a hash of the whole name."""
    suffix = f".v{0 if version is None else version}"
    if len(name) + len(suffix) <= MAX_KEY_CHARS:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[:MAX_KEY_CHARS - len(suffix) - 17]}.{digest}{suffix}"


def _published_list(store: AdapterStore, name: str) -> list[int]:
    try:
        return store.published_versions(name)
    except (AdapterError, OSError):
        return []


def _published(store: AdapterStore, name: str, version: int | None) -> bool:
    """Whether `name` (any version) or `name@version` is published in the store now.

    AdapterStore raises one AdapterError type for every problem; after one, this looks at the store
    (its own list of a name's published versions, the test its resolve/remove make before saying
    "unknown") to tell a missing adapter (404) from a broken one, never at the message's wording.
    """
    try:
        versions = store.published_versions(name)
    except AdapterError:  # not a valid name: nothing can be published under it
        return False
    except OSError:  # the store cannot be read: not known to be missing
        return True
    return bool(versions) if version is None else version in versions


class Registry:
    """Static entries + an AdapterStore, with a short TTL cache of store lookups; thread-safe.

    Blocking (the store reads disks or object stores): call it off the event loop.
    """

    def __init__(self, store: AdapterStore, static: dict[str, Source] | None = None, ttl_s: float = 1.0):
        self.store = store
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._static: dict[str, Source] = dict(static or {})
        self._cache: dict[str, tuple[Resolved, float]] = {}  # ref -> (resolved, expires at)
        self._names: tuple[list[str], float] = ([], 0.0)  # the store's names, expires at (unknown_message)

    def cached(self, ref: str) -> Resolved | None:
        """`ref` resolved without touching the store (static, or a fresh cache entry), else None.

        The hot path: a replica resolves every row, and a thread hop per row costs more than the lookup.
        """
        with self._lock:
            static = self._static.get(ref)
            if static is not None:
                return Resolved(ref, ref, None, static.path, static.labels, engine_key(ref, None))
            hit = self._cache.get(ref)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def resolve(self, ref: str, *, fresh: bool = False) -> Resolved:
        """UnknownAdapter if nothing is registered under `ref`; AdapterError if the store entry is unusable."""
        try:
            name, version = parse_ref(ref)
        except AdapterError as exc:
            raise UnknownAdapter(str(exc)) from None
        if version is None:
            with self._lock:
                static = self._static.get(name)
            if static is not None:
                return Resolved(ref, name, None, static.path, static.labels, engine_key(name, None))
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ref)
        if hit is not None and hit[1] > now and not fresh:
            return hit[0]
        for attempt in range(RESOLVE_TRIES):
            try:
                found = self.store.resolve(ref)
                break
            except AdapterError as exc:
                with self._lock:
                    self._cache.pop(ref, None)
                if not _published(self.store, name, version):
                    raise UnknownAdapter(str(exc)) from None
                if attempt == RESOLVE_TRIES - 1:
                    raise
                # published now: removed and published again between the two looks, or really broken: look again
        resolved = self._from_store(ref, found)
        with self._lock:
            self._cache[ref] = (resolved, now + self.ttl_s)
        return resolved

    def add(self, name: str, source: str | Path, *, schema, labels: list[str] | None = None,
            max_rank: int = 64, policy=None) -> Resolved:
        """Validate and publish `source` as the next version of `name`; later lookups of `name` see it at once.
        `policy`: an adapters_store.sources.SourcePolicy for URL sources (None: the operator's, any URL)."""
        with self._lock:
            if name in self._static:
                raise AdapterError(f"adapter {name!r} is configured statically (config `adapters`); "
                                   "publish store adapters under another name")
        found = self.store.add(name, source, schema=schema, labels=labels, max_rank=max_rank, policy=policy)
        if not self.store.is_local:  # loaded from this node's cache, fetched back from the store (hashes checked)
            found = dataclasses.replace(self.store.resolve(found.ref), warnings=found.warnings)
        resolved = self._from_store(name, found)
        with self._lock:
            self._cache[name] = (resolved, time.monotonic() + self.ttl_s)
            self._cache[found.ref] = (self._from_store(found.ref, found), time.monotonic() + self.ttl_s)
        return dataclasses.replace(resolved, warnings=found.warnings)

    def unknown_message(self, ref: str) -> str:
        """Why nothing answers to the valid reference `ref`, for its 404: a config adapter asked for with a
        version (config adapters have none), a version the name does not have, else the closest names."""
        name, _, version = ref.partition("@")
        with self._lock:
            static = name in self._static
        if static and version:
            return (f"unknown model {ref!r}: {name!r} is a config adapter (the serve config's `adapters`), "
                    f"which has no versions: ask for {name!r}")
        have = _published_list(self.store, name) if version else []
        if have:
            return f"unknown model {ref!r}: {name!r} has versions {', '.join(str(v) for v in have[-10:])}"
        close = [c for c in difflib.get_close_matches(name, self._known_names(), n=3, cutoff=0.6)
                 if c in self._static or _published_list(self.store, c)]
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        return f"unknown model {ref!r}{hint}"

    def _known_names(self) -> list[str]:
        """Config adapters' names and the store's (cached for ttl_s: 404s must not list the store each time)."""
        now = time.monotonic()
        with self._lock:
            names, expires = self._names
            static = list(self._static)
        if expires <= now:
            try:
                names = self.store.names()
            except (AdapterError, OSError):
                names = []
            with self._lock:
                self._names = (names, now + self.ttl_s)
        return sorted(set(names) | set(static))

    def is_static(self, name: str) -> bool:
        with self._lock:
            return name in self._static

    def remove(self, name: str, version: int | None = None) -> list[Resolved]:
        """Remove store versions (every version when `version` is None); [] if none. Static entries stay: they
        come from every replica's config, and removing one here would leave the other replicas serving it."""
        removed: list[Resolved] = []
        self.forget(name)
        try:
            gone = self.store.remove(name, version)
        except AdapterError:
            if _published(self.store, name, version):
                raise
            gone = []
        removed += [self._from_store(v.ref, v) for v in gone]
        return removed

    def forget(self, name: str) -> None:
        """Drop cached lookups of `name` (any version)."""
        with self._lock:
            for ref in [r for r in self._cache if r == name or r.startswith(name + "@")]:
                del self._cache[ref]

    def list(self) -> list[dict]:
        """One entry per name: static entries, then the store's names with their latest version (its head's task
        and labels as recorded when it was added; a static entry's are not known here: None)."""
        return self.listing()[0]

    def listing(self) -> tuple[list[dict], list[Broken]]:
        """list()'s entries, and the store's versions that cannot be read (skipped: adapters_store/listing.py)."""
        with self._lock:
            statics = sorted(self._static.values(), key=lambda s: s.name)
        out = {s.name: {"name": s.name, "version": None, "versions": [], "source": s.path,
                        "labels": list(s.labels) if s.labels else None, "task": None, "created": None,
                        "key": engine_key(s.name, None)}
               for s in statics}
        by_name: dict[str, list[AdapterVersion]] = {}
        found = scan(self.store)
        for v in found.versions:
            by_name.setdefault(v.name, []).append(v)
        for name, versions in sorted(by_name.items()):
            latest = max(versions, key=lambda v: v.version)
            labels = latest.labels or latest.head_labels
            entry = out.setdefault(name, {"name": name, "version": latest.version, "source": str(latest.path),
                                          "labels": list(labels) if labels else None, "task": latest.task,
                                          "created": latest.created, "key": engine_key(name, latest.version)})
            entry["versions"] = [v.version for v in versions]
        return [out[k] for k in sorted(out)], found.broken

    def listing_entry(self, name: str) -> dict | None:
        """listing()'s entry of one name (its readable versions only), None when nothing answers to it: reads that
        name's versions, not the whole store (GET /v1/models/{name} on 10,000 adapters: 1.6 s listing all)."""
        with self._lock:
            static = self._static.get(name)
        if static is not None:
            return {"name": name, "version": None, "versions": [], "source": static.path,
                    "labels": list(static.labels) if static.labels else None, "task": None, "created": None,
                    "key": engine_key(name, None)}
        try:
            numbers = self.store.published_versions(name)
        except (AdapterError, FileNotFoundError):
            return None
        versions = []
        for number in numbers:
            try:
                versions.append(self.store.entry(name, number))
            except (AdapterError, OSError, ValueError, KeyError, TypeError):  # broken or removed: listing skips it
                continue
        if not versions:
            return None
        latest = versions[-1]
        labels = latest.labels or latest.head_labels
        return {"name": name, "version": latest.version, "versions": [v.version for v in versions],
                "source": str(latest.path), "labels": list(labels) if labels else None, "task": latest.task,
                "created": latest.created, "key": engine_key(name, latest.version)}

    @staticmethod
    def _from_store(ref: str, v: AdapterVersion) -> Resolved:
        return Resolved(ref, v.name, v.version, str(v.path), v.labels, engine_key(v.name, v.version))


def resolve_model(model, base_name: str, max_chars: int = 128) -> str | None:
    """The adapter reference ("name" or "name@N") a "model" value asks for, None for the base model;
    UnknownModel if it is not a valid reference."""
    if not isinstance(model, str):
        raise UnknownModel("model must be a string")
    if model == base_name or model in BASE_ALIASES:
        return None
    if len(model) > max_chars:
        raise UnknownModel(f"unknown model {model[:40]!r}... ({len(model)} characters)")
    try:
        parse_ref(model)
    except AdapterError:
        raise UnknownModel(f"unknown model {model[:80]!r}") from None
    return model
