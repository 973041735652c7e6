"""AdapterStore: a versioned, content-hashed store of validated adapters, published atomically.

Layout, the same on a local disk and on an fsspec object store:

    <root>/<name>/<version>/<the format's files (FORMAT_FILES)>, polyhead.json
    <root>/<name>/<version>.removed     object stores: a removed version, its number never handed out again
    <root>/.removed/<name>@<version>    local disks: the same, at most one per name (adapters_store/tombstones.py)
    <root>/.tmp/                        local disks: staging and deletion area, ignored by readers

Local disks publish a version by writing it into `<root>/.tmp/<random>`, fsyncing, then renaming the
folder to `<root>/<name>/<version>`: readers see all of it or nothing. Object stores have no atomic
rename: a version's files go under its prefix and a `COMMITTED` object (holding the overall sha256) is
written last; readers ignore versions without it. Versions of an fsspec store resolve to a local
copy, downloaded once into a cache keyed by sha256 and verified against it.

`polyhead.json` records name, version, format, kind, labels (given when added), its head (task and the labels
it answers, null without one; versions added before this field have none), created time, each file's size and
sha256, and the overall sha256: the sha256 of the lines "<file sha256>  <file name>\\n" sorted by file name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import listing, raystore, tombstones
from .errors import AdapterError
from .names import check_name
from .tombstones import listdir

if TYPE_CHECKING:
    from .base import BaseSchema
    from .sources import SourcePolicy

META_FILE = "polyhead.json"
COMMIT_FILE = "COMMITTED"
TMP_DIR = ".tmp"
REMOVED_SUFFIX = ".removed"
# files each format uses: (required, optional); nothing else is ever stored or downloaded
# per format: (files every adapter has, files stored when present)
FORMAT_FILES = {
    "peft": (("adapter_config.json", "adapter_model.safetensors"), ("config.json",)),
    "adapterhub": ((), ("adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors")),
}
STORED_FILES = frozenset(f for req, opt in FORMAT_FILES.values() for f in req + opt)
VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
ENTRY_RE = re.compile(r"([1-9][0-9]{0,17})(\.removed)?")
SHA_RE = re.compile(r"[0-9a-f]{64}")
MAX_META_BYTES = 1024**2
STALE_TMP_SECONDS = 24 * 3600  # staging folders older than this are left over from a crash
_CHUNK_BYTES = 4 * 1024**2
_PUBLISH_TRIES = 1000


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    path: Path  # a local folder holding the adapter's files (a verified cached copy for fsspec stores)
    sha256: str  # over all files, see the module docstring
    labels: tuple[str, ...] | None  # given when added (overriding the adapter's own)
    created: float  # Unix time of publishing
    task: str | None = None  # its head's task (seq_cls, multilabel, token_cls); None: no head, or not recorded
    head_labels: tuple[str, ...] | None = None  # the labels its head answers (the given ones, else its own)
    # from validating it when it was added (AdapterSpec.warnings): what `add` says, not recorded, not compared
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def default_root() -> str:
    if os.environ.get("POLYHEAD_STORE"):
        return os.environ["POLYHEAD_STORE"]
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "polyhead" / "adapters")


def parse_ref(ref) -> tuple[str, int | None]:
    """`name` -> (name, None); `name@N` -> (name, N). Raises AdapterError for anything else."""
    if not isinstance(ref, str):
        raise AdapterError(f"adapter reference must be a string, got {type(ref).__name__}")
    name, at, version = ref.partition("@")
    check_name(name)
    if not at:
        return name, None
    if not VERSION_RE.fullmatch(version):
        raise AdapterError(f"invalid adapter reference {ref[:200]!r}: the part after '@' must be a positive "
                           "integer version (e.g. name@3)")
    return name, int(version)


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1 or version >= 10**18:
        raise AdapterError(f"invalid adapter version {version!r}: must be a positive integer")
    return version


def combined_sha256(file_hashes: dict[str, str]) -> str:
    lines = "".join(f"{sha}  {fname}\n" for fname, sha in sorted(file_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _copy_stream(src, dst, hasher, bar) -> int:
    """Copy file object `src` into `dst` in chunks, feeding `hasher` and the progress bar; bytes copied."""
    total = 0
    while chunk := src.read(_CHUNK_BYTES):
        dst.write(chunk)
        hasher.update(chunk)
        bar.update(len(chunk))
        total += len(chunk)
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Versioned adapters under `root`: a local folder or an fsspec URL (`memory://...`, `s3://...`)."""

    def __init__(self, root: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None):
        root = default_root() if root is None else os.fspath(root)
        self.url = root
        self._fs = None
        if "://" in root and not root.startswith("file://"):
            import fsspec

            if root.startswith(raystore.PROTOCOL + "://"):
                raystore.register()
            try:
                self._fs, path = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as exc:
                raise AdapterError(f"adapter store {root}: cannot open it: {exc}") from exc
            self._base = path.rstrip("/")
            cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            default = getattr(self._fs, "cache_dir", None) or Path(cache) / "polyhead" / "remote-adapters"
            self.cache_dir = Path(cache_dir) if cache_dir else default
        else:
            self.root = Path(root.removeprefix("file://")).expanduser().absolute()
            self.cache_dir = None

    def __repr__(self) -> str:
        return f"AdapterStore({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self._fs is None

    # ---- public API --------------------------------------------------------------------------

    def add(self, name: str, source: str | os.PathLike, *, schema: BaseSchema, labels: list[str] | None = None,
            max_rank: int = 64, progress: bool = False, policy: SourcePolicy | None = None) -> AdapterVersion:
        """Validate the adapter folder `source` (a path, or a URL: adapters_store/sources.py) fully, then publish it
        as the next version of `name`. `policy`: which URLs, how long, how much (default: the operator's)."""
        check_name(name)
        listing.check_labels(labels)  # count (against the head), size and characters: all before publishing
        from .sources import SourcePolicy, is_url, short, source_folder  # torch (file limits): where one is added

        with source_folder(source, STORED_FILES, policy=policy or SourcePolicy()) as folder:
            try:
                return self._add(name, folder, schema, labels, max_rank, progress)
            except AdapterError as exc:
                if is_url(source):  # name the URL, not the temporary copy
                    raise AdapterError(str(exc).replace(str(folder), short(source))) from None
                raise
            except OSError as exc:  # the source cannot be read (a name too long, a loop of links, ...)
                if exc.filename is None or not str(exc.filename).startswith(str(folder)):
                    raise  # the store's own files: not the caller's mistake
                raise AdapterError(f"{short(source)}: cannot read the adapter folder: "
                                   f"{exc.strerror or type(exc).__name__}") from None

    def _add(self, name: str, folder: Path, schema: BaseSchema, labels: list[str] | None, max_rank: int,
             progress: bool) -> AdapterVersion:
        from .loader import load_adapter_dir  # torch: loaded where an adapter is validated

        spec = load_adapter_dir(folder, schema, name=name, max_rank=max_rank,
                                labels=list(labels) if labels is not None else None)
        if labels is not None and spec.head is None:
            raise AdapterError(f"{folder}: labels given but the adapter has no classification head")
        if spec.format not in FORMAT_FILES:
            raise AdapterError(f"{folder}: storing {spec.format} adapters is not supported yet")
        required, optional = FORMAT_FILES[spec.format]
        files = [f for f in required + optional if f in required or (folder / f).is_file()]
        stats = {f: os.stat(folder / f) for f in files}
        meta = {
            "name": name, "version": None, "format": spec.format, "kind": spec.kind,
            "labels": list(labels) if labels is not None else None, "created": None, "files": {}, "sha256": None,
            "head": None if spec.head is None else {"task": spec.head.task, "labels": list(spec.head.labels or ())},
        }
        listing.check_meta_size(len(_json_bytes(meta)), MAX_META_BYTES)  # what readers refuse is never published
        total = sum(s.st_size for s in stats.values())
        with _progress_bar(total, f"adding {name}", progress) as bar:
            if self.is_local:
                found = self._add_local(folder, files, stats, meta, bar)
            else:
                found = self._add_remote(folder, files, stats, meta, bar)
        listing.mark_changed(self)
        return dataclasses.replace(found, warnings=spec.warnings)

    def resolve(self, ref: str, *, verify: bool = False) -> AdapterVersion:
        """`name` -> its latest published version; `name@N` -> version N. `verify` re-hashes local files."""
        name, version = parse_ref(ref)
        versions = self._versions(name)
        if not versions:
            raise AdapterError(f"unknown adapter {name!r} (not in the store {self.url})")
        if version is None:
            version = max(versions)
        elif version not in versions:
            have = ", ".join(str(v) for v in sorted(versions)[-10:])
            raise AdapterError(f"unknown version {name}@{version} (published versions: {have})")
        try:
            if self.is_local:
                found = self._read_local(name, version)
                if verify:
                    _verify_files(found.path, self._meta_of(found.path), f"{found.ref} in {self.url}")
                return found
            return self._fetch_remote(name, version, verify)
        except FileNotFoundError as exc:
            raise AdapterError(f"adapter {name}@{version} was removed while being resolved") from exc

    def names(self) -> list[str]:
        """The names the store holds (a name whose versions are all removed may still appear on object stores)."""
        return self._names()

    def published_versions(self, name: str) -> list[int]:
        """The published versions of `name`, ascending ([] for none); AdapterError for an invalid name."""
        check_name(name)
        return sorted(self._versions(name))

    def list(self) -> list[AdapterVersion]:
        """All readable published versions, sorted by name then version (broken ones: listing.scan)."""
        return listing.scan(self).versions

    def entry(self, name: str, version: int) -> AdapterVersion:
        """A published version's record, without downloading it; AdapterError if it cannot be read."""
        return self._read_local(name, version) if self.is_local else self._remote_entry(name, version)

    def remove(self, name: str, version: int | None = None) -> list[AdapterVersion]:
        """Remove one version, or every version of `name`; returns what was removed.

        Removed numbers are never handed out again. A local version is first renamed into the
        staging area (so it vanishes at once), then deleted.
        """
        check_name(name)
        if version is not None:
            _check_version(version)
        versions = self._versions(name)
        targets = sorted(versions) if version is None else [version]
        if not versions or (version is not None and version not in versions):
            what = name if version is None else f"{name}@{version}"
            raise AdapterError(f"unknown adapter {what!r} (not in the store {self.url})")
        removed = []
        try:
            for v in targets:
                try:
                    entry = listing.entry_or_placeholder(self, name, v)  # a broken version is removed all the same
                    self._remove_local(name, v) if self.is_local else self._remove_remote(name, v)
                except FileNotFoundError as exc:
                    raise AdapterError(f"adapter {name}@{v} was removed meanwhile") from exc
                removed.append(entry)
        finally:
            if removed:
                listing.mark_changed(self)
        return removed

    # ---- local disk --------------------------------------------------------------------------

    def _add_local(self, folder: Path, files: list[str], stats: dict, meta: dict, bar) -> AdapterVersion:
        name = meta["name"]
        tmp_root = self.root / TMP_DIR
        tmp_root.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp(tmp_root)
        staging = tmp_root / f"add-{secrets.token_hex(8)}"
        staging.mkdir()
        try:
            for fname in files:
                with open(folder / fname, "rb") as src, open(staging / fname, "wb") as dst:
                    meta["files"][fname] = _copy_checked(folder / fname, src, dst, stats[fname], bar)
                    dst.flush()
                    os.fsync(dst.fileno())
            meta["sha256"] = combined_sha256({f: m["sha256"] for f, m in meta["files"].items()})
            name_dir = self.root / name
            for _ in range(_PUBLISH_TRIES):
                version = self._next_version(name)
                meta["version"], meta["created"] = version, time.time()
                _write_json(staging / META_FILE, meta)
                _fsync_dir(staging)
                name_dir.mkdir(exist_ok=True)
                try:
                    os.rename(staging, name_dir / str(version))
                except FileNotFoundError:  # the name folder was removed meanwhile
                    continue
                except OSError:  # ENOTEMPTY/EEXIST: another add took this number first
                    if (name_dir / str(version)).exists() or (name_dir / f"{version}{REMOVED_SUFFIX}").exists():
                        continue
                    raise
                _fsync_dir(name_dir)
                _fsync_dir(self.root)
                return self._read_local(name, version)
            raise AdapterError(f"adapter {name!r}: could not claim a version number after {_PUBLISH_TRIES} tries")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _sweep_tmp(self, tmp_root: Path) -> None:
        """Delete staging folders a crashed add or remove left behind long ago."""
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in tmp_root.iterdir():
            try:
                if entry.lstat().st_mtime < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except OSError:
                pass

    def _next_version(self, name: str) -> int:
        return 1 + max(self._all_numbers(name), default=0)

    def _all_numbers(self, name: str) -> set[int]:
        """Every number used by `name`: published, removed, or (object stores) claimed."""
        if not self.is_local:
            return {v for v, _ in self._remote_scan(name)}
        entries = listdir(self.root / name)  # published versions, and `N.removed` markers of older stores
        return {int(m.group(1)) for e in entries if (m := ENTRY_RE.fullmatch(e))} | tombstones.numbers(self.root, name)

    def _read_local(self, name: str, version: int) -> AdapterVersion:
        path = self.root / name / str(version)
        return _entry(path, self._meta_of(path), name, version)

    def _meta_of(self, folder: Path) -> dict:
        meta_path = folder / META_FILE
        with open(meta_path, "rb") as f:
            data = f.read(MAX_META_BYTES + 1)
        return _parse_meta(data, str(meta_path))

    def _remove_local(self, name: str, version: int) -> None:
        tmp_root = self.root / TMP_DIR
        tmp_root.mkdir(exist_ok=True)
        name_dir = self.root / name
        tombstones.bury(self.root, name, version)  # the number stays used
        trash = tmp_root / f"rm-{secrets.token_hex(8)}"
        os.rename(name_dir / str(version), trash)
        _fsync_dir(name_dir)
        shutil.rmtree(trash, ignore_errors=True)
        tombstones.tidy(self.root, name, max(self._all_numbers(name), default=0))

    # ---- listing, both kinds -----------------------------------------------------------------

    def _names(self) -> list[str]:
        if self.is_local:
            try:
                entries = sorted(os.listdir(self.root))
            except FileNotFoundError:
                return []
        else:
            entries = sorted({p.split("/", 1)[0] for p in self._remote_rel_paths(self._base)})
        return [e for e in entries if _is_name(e)]

    def _versions(self, name: str) -> set[int]:
        """Published versions of a checked name."""
        if not self.is_local:
            return {v for v, committed in self._remote_scan(name) if committed}
        name_dir = self.root / name
        try:
            entries = os.listdir(name_dir)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        return {int(e) for e in entries if VERSION_RE.fullmatch(e) and (name_dir / e / META_FILE).is_file()}

    # ---- fsspec object stores ----------------------------------------------------------------

    def _remote_rel_paths(self, prefix: str) -> list[str]:
        """Object paths under `prefix`, relative to the store's base."""
        try:
            found = self._fs.find(prefix)
        except FileNotFoundError:
            return []
        base = self._base + "/"
        return [p[len(base):] for p in found if p.startswith(base)]

    def _remote_scan(self, name: str) -> set[tuple[int, bool]]:
        """(number, committed) for every number `name` uses; removed numbers count as uncommitted."""
        numbers, committed = set(), set()
        for rel in self._remote_rel_paths(f"{self._base}/{name}"):
            parts = rel.split("/")
            if len(parts) >= 2 and parts[0] == name and (m := ENTRY_RE.fullmatch(parts[1])):
                numbers.add(int(m.group(1)))
                if len(parts) == 3 and parts[2] == COMMIT_FILE and not m.group(2):
                    committed.add(int(m.group(1)))
        return {(v, v in committed) for v in numbers}

    def _remote_path(self, name: str, version: int | str, fname: str | None = None) -> str:
        path = f"{self._base}/{name}/{version}"
        return path if fname is None else f"{path}/{fname}"

    def _add_remote(self, folder: Path, files: list[str], stats: dict, meta: dict, bar) -> AdapterVersion:
        name = meta["name"]
        # hash first (so the metadata can claim the version number), then upload and check again
        for fname in files:
            with open(folder / fname, "rb") as src:
                meta["files"][fname] = _copy_checked(folder / fname, src, _Discard(), stats[fname], _NoBar())
        meta["sha256"] = combined_sha256({f: m["sha256"] for f, m in meta["files"].items()})
        for _ in range(_PUBLISH_TRIES):
            version = self._next_version(name)
            meta["version"], meta["created"] = version, time.time()
            if self._claim(self._remote_path(name, version, META_FILE), _json_bytes(meta)):
                break
        else:
            raise AdapterError(f"adapter {name!r}: could not claim a version number after {_PUBLISH_TRIES} tries")
        for fname in files:
            with open(folder / fname, "rb") as src, self._fs.open(self._remote_path(name, version, fname), "wb") as dst:
                uploaded = _copy_checked(folder / fname, src, dst, stats[fname], bar)
            if uploaded != meta["files"][fname]:
                raise AdapterError(f"{folder / fname}: changed while being added; add it again")
        self._fs.pipe_file(self._remote_path(name, version, COMMIT_FILE), meta["sha256"].encode())
        return self._remote_entry(name, version)

    def _claim(self, path: str, data: bytes) -> bool:
        """Create `path` only if it does not exist (exclusive where the backend supports it)."""
        try:
            with self._fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):  # no exclusive create on this backend: best effort
            if self._fs.exists(path):
                return False
            self._fs.pipe_file(path, data)
            return True

    def _remote_meta(self, name: str, version: int) -> dict:
        path = self._remote_path(name, version, META_FILE)
        meta = _parse_meta(self._fs.cat_file(path), f"{self.url}/{name}/{version}/{META_FILE}")
        marker = self._fs.cat_file(self._remote_path(name, version, COMMIT_FILE)).decode(errors="replace").strip()
        if marker != meta["sha256"]:
            raise AdapterError(f"{self.url}/{name}/{version}: {COMMIT_FILE} names sha256 {marker[:64]!r} but "
                               f"{META_FILE} says {meta['sha256']}")
        return meta

    def _remote_entry(self, name: str, version: int) -> AdapterVersion:
        """The version's record; its path is the local cache folder (which may not be downloaded yet)."""
        meta = self._remote_meta(name, version)
        return _entry(self.cache_dir / meta["sha256"], meta, name, version)

    def _fetch_remote(self, name: str, version: int, verify: bool) -> AdapterVersion:
        """Download the version into the local cache once (keyed by sha256), verifying every hash."""
        meta = self._remote_meta(name, version)
        found = _entry(self.cache_dir / meta["sha256"], meta, name, version)
        if found.path.is_dir():
            if verify:
                _verify_files(found.path, meta, f"{found.ref} (cached in {found.path})")
            return found
        tmp_root = self.cache_dir / TMP_DIR
        tmp_root.mkdir(parents=True, exist_ok=True)
        staging = tmp_root / f"get-{secrets.token_hex(8)}"
        staging.mkdir()
        try:
            where = f"{found.ref} in {self.url}"
            for fname, want in meta["files"].items():
                hasher = hashlib.sha256()
                with self._fs.open(self._remote_path(name, version, fname), "rb") as src, open(staging / fname, "wb") as dst:
                    size = _copy_stream(src, dst, hasher, _NoBar())
                    dst.flush()
                    os.fsync(dst.fileno())
                if size != want["size"] or hasher.hexdigest() != want["sha256"]:
                    raise AdapterError(f"{where}: {fname} does not match its recorded sha256 (corrupted or changed)")
            (staging / META_FILE).write_bytes(_json_bytes(meta))
            _fsync_dir(staging)
            try:
                os.rename(staging, found.path)
            except OSError:
                if not found.path.is_dir():  # not another download of the same content winning the race
                    raise
            return found
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _remove_remote(self, name: str, version: int) -> None:
        self._fs.pipe_file(f"{self._base}/{name}/{version}{REMOVED_SUFFIX}", b"")  # the number stays used
        self._fs.rm_file(self._remote_path(name, version, COMMIT_FILE))  # invisible from here on
        for fname in sorted(STORED_FILES | {META_FILE}):
            path = self._remote_path(name, version, fname)
            if self._fs.exists(path):
                self._fs.rm_file(path)


# ---- helpers -------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass


class _Discard:
    def write(self, data: bytes) -> None:
        pass


@contextmanager
def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over bytes when asked for, else a no-op."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    # only on a terminal, and gone once done: a log or a pipe gets the result line alone
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False) as bar:
        yield bar


def _copy_checked(path: Path, src, dst, before: os.stat_result, bar) -> dict:
    """Copy one source file, refusing it if it changed since it was validated; its size and sha256."""
    hasher = hashlib.sha256()
    size = _copy_stream(src, dst, hasher, bar)
    after = os.fstat(src.fileno())
    if (size, after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_size,
                                                                  before.st_mtime_ns, before.st_ino):
        raise AdapterError(f"{path}: changed while being added; add it again")
    return {"size": size, "sha256": hasher.hexdigest()}


def _verify_files(folder: Path, meta: dict, where: str) -> None:
    for fname, want in meta["files"].items():
        hasher = hashlib.sha256()
        try:
            with open(folder / fname, "rb") as f:
                size = _copy_stream(f, _Discard(), hasher, _NoBar())
        except FileNotFoundError as exc:
            raise AdapterError(f"{where}: {fname} is missing") from exc
        if size != want["size"] or hasher.hexdigest() != want["sha256"]:
            raise AdapterError(f"{where}: {fname} does not match its recorded sha256 (corrupted or changed)")


def _is_name(entry: str) -> bool:
    try:
        check_name(entry)
        return True
    except AdapterError:
        return False


def _json_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _write_json(path: Path, meta: dict) -> None:
    with open(path, "wb") as f:
        f.write(_json_bytes(meta))
        f.flush()
        os.fsync(f.fileno())


def _parse_meta(data: bytes, where: str) -> dict:
    """A checked polyhead.json: file names limited to STORED_FILES, so they are safe to use as paths."""
    if len(data) > MAX_META_BYTES:
        raise AdapterError(f"{where}: over {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{where}: not valid JSON: {exc}") from exc
    files = meta.get("files") if isinstance(meta, dict) else None
    ok = (
        isinstance(files, dict) and files and set(files) <= STORED_FILES
        and all(isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
                and SHA_RE.fullmatch(m["sha256"]) for m in files.values())
        and isinstance(meta.get("sha256"), str) and SHA_RE.fullmatch(meta["sha256"])
        and meta["sha256"] == combined_sha256({f: m["sha256"] for f, m in files.items()})
        and isinstance(meta.get("created"), (int, float))
        and _strings_or_none(meta.get("labels"))
        and (meta.get("head") is None
             or (isinstance(meta["head"], dict) and isinstance(meta["head"].get("task"), str)
                 and _strings_or_none(meta["head"].get("labels"))))
    )
    if not ok:
        raise AdapterError(f"{where}: malformed store metadata")
    return meta


def _strings_or_none(value) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(x, str) for x in value))


def _entry(path: Path, meta: dict, name: str, version: int) -> AdapterVersion:
    if meta.get("name") != name or meta.get("version") != version:
        raise AdapterError(f"{path}: metadata names {meta.get('name')!r}@{meta.get('version')!r}, "
                           f"stored as {name}@{version}")
    labels = tuple(meta["labels"]) if meta.get("labels") is not None else None
    head = meta.get("head") or {}
    return AdapterVersion(name=name, version=version, path=path, sha256=meta["sha256"], labels=labels,
                          created=float(meta["created"]), task=head.get("task"),
                          head_labels=tuple(head["labels"]) if head.get("labels") else None)
