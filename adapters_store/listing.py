"""What an AdapterStore holds, read so that one unreadable version cannot hide the others; the checks that keep
a version readable before it is published; and the store's change mark, which replicas poll.

A version that is published but cannot be read back (its polyhead.json corrupted, truncated, too large, naming
another version; on object stores a COMMITTED marker that disagrees) is *broken*: `scan` skips it and reports it
(`Broken`), lookups of it fail with AdapterError, and AdapterStore.remove removes it like any other version.

The change mark is one small object at the store's root, `.changes`, rewritten with a new random token after
every publish and every removal (by `polyhead adapters add|rm` too). A reader that saw token T, then lists, has
seen every change made before T was written; when the token differs from the last one it saw, something
changed since its last look. Names never start with '.', so the mark is never taken for an adapter.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import time
import unicodedata
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import AdapterError

if TYPE_CHECKING:
    from .store import AdapterStore, AdapterVersion

CHANGES_FILE = ".changes"
MAX_LABEL_CHARS = 256
META_HEADROOM = 16 * 1024  # what polyhead.json gains after the check: version, created, files, hashes


@dataclass(frozen=True)
class Broken:
    """A published version that cannot be read back, and why."""

    name: str
    version: int
    error: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Listing:
    versions: list[AdapterVersion]  # readable versions, sorted by name then version
    broken: list[Broken]  # the unreadable ones, in the same order


def scan(store: AdapterStore) -> Listing:
    """Every published version of `store`: the readable ones, and the broken ones with the reason.

    On a local disk a version's polyhead.json is read again only where its stat (inode, device, size, mtime,
    ctime) differs from the last scan's through the same AdapterStore object, or changed in the last RACY_NS:
    a scan is then one listdir per name and one stat per version (10,000 versions on a busy 2-core machine:
    2.0 s reading every file, 0.3 s kept; benchmarks/results/scale_adapters.md)."""
    versions, broken = [], []
    kept = _kept.get(store, {})
    settled = time.time_ns() - RACY_NS  # a polyhead.json changed after this is read again, whatever its stat
    seen: dict[tuple[str, int], tuple[tuple, AdapterVersion]] = {}
    for name in store.names():
        try:
            numbers = (_local_versions(store, name) if store.is_local
                       else [(v, None) for v in store.published_versions(name)])
        except FileNotFoundError:  # removed while listing
            continue
        for version, signature in numbers:
            hit = kept.get((name, version))
            if hit is not None and hit[0] == signature:
                versions.append(hit[1])
                seen[(name, version)] = hit
                continue
            try:
                entry = store.entry(name, version)
            except FileNotFoundError:  # removed while listing
                continue
            except (AdapterError, OSError, ValueError, KeyError, TypeError) as exc:
                broken.append(Broken(name, version, f"{type(exc).__name__}: {str(exc)[:300]}"
                                     if not isinstance(exc, AdapterError) else str(exc)[:300]))
                continue
            versions.append(entry)
            if signature is not None and signature[-1] < settled:
                seen[(name, version)] = (signature, entry)
    if store.is_local:
        _kept[store] = seen  # what this scan read: the versions removed since are dropped
    return Listing(versions, broken)


_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # AdapterStore -> (name, version) -> (stat, entry)
_STAT_IGNORED = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)  # Path.is_file answers False for these
# a file rewritten within the file system's timestamp tick (a few ms) keeps its times: kept only once older than this
RACY_NS = 2 * 10**9


def _local_versions(store: AdapterStore, name: str) -> list[tuple[int, tuple]]:
    """AdapterStore.published_versions of a local store (a version: a folder with a regular polyhead.json), each
    with its polyhead.json's (inode, device, size, mtime, ctime), ascending."""
    from .store import META_FILE, VERSION_RE

    folder = os.path.join(store.root, name)
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        if not VERSION_RE.fullmatch(entry):
            continue
        try:
            st = os.stat(os.path.join(folder, entry, META_FILE))
        except OSError as exc:
            if exc.errno in _STAT_IGNORED:
                continue
            raise
        if stat.S_ISREG(st.st_mode):
            out.append((int(entry), (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    return sorted(out)


def check_labels(labels) -> None:
    """Labels given when adding: a list of strings, each 1-MAX_LABEL_CHARS printable characters (no control
    characters, no unpaired surrogates), no two alike. Their count is checked against the head by the loader."""
    if labels is None:
        return
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise AdapterError(f"labels must be a list of strings, got {labels!r:.80}")
    for i, label in enumerate(labels):
        if not label or len(label) > MAX_LABEL_CHARS:
            raise AdapterError(f"labels[{i}] has {len(label)} characters: a label has 1 to {MAX_LABEL_CHARS}")
        bad = next((c for c in label if unicodedata.category(c) in ("Cc", "Cs")), None)
        if bad is not None:
            raise AdapterError(f"labels[{i}] {label[:40]!r}: character U+{ord(bad):04X} is not allowed "
                               "(no control characters or unpaired surrogates)")
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise AdapterError(f"labels: {dup[:40]!r} appears more than once (each output needs its own label)")


def check_meta_size(meta_bytes: int, max_bytes: int) -> None:
    """Refuse, before publishing, metadata that readers would refuse (polyhead.json is read up to max_bytes)."""
    if meta_bytes + META_HEADROOM > max_bytes:
        raise AdapterError(f"the adapter's labels are too large to record: its metadata would take about "
                           f"{meta_bytes} bytes, the store keeps at most {max_bytes - META_HEADROOM}")


def mark_changed(store: AdapterStore) -> None:
    """Write a new change token (best effort: a reader that misses it still looks at the store now and then)."""
    token = secrets.token_hex(16).encode()
    try:
        if store.is_local:
            tmp = store.root / ".tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            staging = tmp / f"changes-{secrets.token_hex(8)}"
            staging.write_bytes(token)
            os.replace(staging, store.root / CHANGES_FILE)
        else:
            store._fs.pipe_file(f"{store._base}/{CHANGES_FILE}", token)
    except OSError:
        pass


def change_token(store: AdapterStore) -> str | None:
    """The store's current change token; None when it has none (nothing changed since stores had one)."""
    try:
        if store.is_local:
            return (store.root / CHANGES_FILE).read_bytes()[:64].decode(errors="replace")
        return store._fs.cat_file(f"{store._base}/{CHANGES_FILE}")[:64].decode(errors="replace")
    except FileNotFoundError:
        return None


def entry_or_placeholder(store: AdapterStore, name: str, version: int) -> AdapterVersion:
    """The version's record; for a broken one (FileNotFoundError aside), a placeholder: no sha256, no labels."""
    from .store import AdapterVersion

    try:
        return store.entry(name, version)
    except FileNotFoundError:
        raise
    except (AdapterError, OSError, ValueError, KeyError, TypeError):
        path = store.root / name / str(version) if store.is_local else store.cache_dir / f"broken-{name}@{version}"
        return AdapterVersion(name, version, path, "", None, 0.0)
