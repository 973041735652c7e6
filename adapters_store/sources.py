"""Where an adapter being added comes from: a local folder, or a folder at a URL.

A URL names a folder on any filesystem fsspec knows (`s3://bucket/adapters/mine`, `gs://...`,
`hf://user/repo` with huggingface_hub, `memory://...`; `file://` is a local path). Only the
files an adapter format stores are fetched, each into a fresh temporary folder with its size
capped while it streams; a pickle-based weight file in the folder refuses the whole source before
a byte is read, as for a local folder. The adapter is then validated from that copy.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AdapterError
from .files import PICKLE_SUFFIXES, FileLimits

URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK_BYTES = 4 * 1024**2


def is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and URL_RE.match(source) is not None and not source.startswith("file://")


def short(source: str | os.PathLike, limit: int = 200) -> str:
    text = os.fspath(source)
    return text if len(text) <= limit else text[:limit] + "..."


@contextmanager
def source_folder(source: str | os.PathLike, names: frozenset[str],
                  limits: FileLimits = FileLimits()) -> Iterator[Path]:
    """A local folder holding `source`'s adapter files: the folder itself, or a temporary copy of the files
    in `names` found at a URL (removed on exit)."""
    if not is_url(source):
        yield Path(os.fspath(source).removeprefix("file://"))
        return
    import fsspec

    # Filesystems fail in their own ways (an unknown protocol, a package not installed, a refused connection,
    # a client library's own errors): whatever the URL does is the caller's source failing, never a crash.
    try:
        fs, path = fsspec.core.url_to_fs(source)
    except Exception as exc:
        raise AdapterError(f"{short(source)}: cannot open this URL: {_reason(exc)}") from None
    try:
        if not fs.isdir(path):
            raise AdapterError(f"{short(source)}: not an adapter folder (no such folder at this URL)")
        entries = fs.ls(path, detail=True)
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"{short(source)}: cannot list this folder: {_reason(exc)}") from None
    files = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries if entry.get("type") == "file"}
    for fname in sorted(files):
        if Path(fname).suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(f"{short(source)}/{fname}: pickle-based weight files ({Path(fname).suffix}) are "
                               "refused; polyhead reads safetensors only (convert it and remove this file)")
    wanted = sorted(set(files) & names)
    if not wanted:
        raise AdapterError(f"{short(source)}: no adapter files there (looked for {', '.join(sorted(names))})")
    with tempfile.TemporaryDirectory(prefix="polyhead-source-") as tmp:
        for fname in wanted:
            size = files[fname].get("size")
            if size is not None and size > limits.max_file_bytes:
                raise AdapterError(f"{short(source)}/{fname}: {size} bytes, over the {limits.max_file_bytes}-byte "
                                   "limit for an adapter file")
            _download(fs, files[fname]["name"], Path(tmp) / fname, limits.max_file_bytes, f"{short(source)}/{fname}")
        yield Path(tmp)


def _download(fs, remote: str, local: Path, limit: int, what: str) -> None:
    """remote -> local, refusing more than `limit` bytes whatever the listing said."""
    copied = 0
    try:
        with fs.open(remote, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                copied += len(chunk)
                if copied > limit:
                    raise AdapterError(f"{what}: over the {limit}-byte limit for an adapter file")
                dst.write(chunk)
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"{what}: cannot download it: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"
