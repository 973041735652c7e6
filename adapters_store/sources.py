"""Where an adapter being added comes from: a local folder, or a folder at a URL.

A URL names a folder on any filesystem fsspec knows (`s3://bucket/adapters/mine`, `gs://...`,
`hf://user/repo` with huggingface_hub, `memory://...`; `file://` is a local path), or an
`http(s)://` folder whose page links its files (a web server's directory listing). Only the files an
adapter format stores are fetched, each into a fresh temporary folder with its size capped while it
streams; a pickle-based weight file in the folder refuses the whole source before a byte is read, as
for a local folder. The adapter is then validated from that copy.

Every fetch is bounded (`SourcePolicy`):
- which URLs: `schemes` (local paths are always sources) and, for http(s), `hosts`. A host that is not
  listed must resolve to public addresses only (no loopback, private, link-local, ...); polyhead checks
  each address its HTTP client connects to (so a DNS answer that changes between a check and the
  connection cannot slip through) and every redirect's target. Other schemes' hosts (an s3 bucket, an
  hf repo) are not addresses polyhead connects to: listing such a scheme grants every source the
  operator's credentials for it reach.
- how long: the connection within `connect_timeout_s`, the whole fetch (listing and every file) within
  `timeout_s`; a fetch past it is abandoned (its thread stops at its next chunk, its copy is removed)
  and the caller gets SourceTimeout at once.
- how much: an http(s) listing page is read up to `max_listing_bytes`, each file up to the FileLimits
  file size; nothing is read whole before its size is known to fit.
Error messages name the URL, the HTTP status or the exception's type: never what the remote answered.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from .errors import AdapterError
from .files import PICKLE_SUFFIXES, FileLimits

URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
HTTP_SCHEMES = ("http", "https")
LINK_RE = re.compile(rb"""<a\s+(?:[^>]*?\s+)?href\s*=\s*["']([^"']+)["']""", re.IGNORECASE)  # as fsspec's http
MAX_REDIRECTS = 5
_CHUNK_BYTES = 4 * 1024**2
_HTTP_CHUNK_BYTES = 256 * 1024


class SourceRefused(AdapterError):
    """A source URL the policy does not allow (its scheme, its host, or an address the host resolves to)."""


class SourceTimeout(AdapterError):
    """A source that did not connect, or did not answer in full, within the policy's deadlines."""


@dataclass(frozen=True)
class SourcePolicy:
    """Which source URLs may be fetched, for how long and how much of a listing is read.

    The default is the operator's (`polyhead adapters add`): any scheme and host, with the deadlines and
    caps. The server builds its own from its config (`source_schemes`, `source_hosts`, ...), where the
    default allows local paths only."""

    schemes: tuple[str, ...] | None = None  # allowed URL schemes (lower case); None: any
    hosts: tuple[str, ...] | None = None  # http(s): None: any; (): public addresses only; else only these
    timeout_s: float = 300.0  # the whole fetch: listing and every file
    connect_timeout_s: float = 10.0  # each connection to an http(s) source
    max_listing_bytes: int = 1024**2  # an http(s) folder's listing page

    def allows_host(self, host: str) -> bool | None:
        """True: listed (any address); False: refused; None: allowed if every address it resolves to is public."""
        if self.hosts is None:
            return True
        host = host.lower().rstrip(".")
        if not self.hosts:
            return None
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)


def is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and URL_RE.match(source) is not None and not source.startswith("file://")


def short(source: str | os.PathLike, limit: int = 200) -> str:
    text = os.fspath(source)
    return text if len(text) <= limit else text[:limit] + "..."


def check_source(source: str | os.PathLike, policy: SourcePolicy) -> None:
    """SourceRefused unless `source` is a local path or a URL whose scheme (and, for http(s) URLs, host)
    the policy allows. Host names that are not listed are checked again where they are connected to."""
    if not is_url(source):
        return
    scheme = source.split("://", 1)[0].lower()
    if policy.schemes is not None:
        if scheme not in policy.schemes:
            allowed = ", ".join(policy.schemes) or "none"
            raise SourceRefused(f"{short(source)}: the URL scheme {scheme!r} is not an allowed source (server config "
                                f"`source_schemes`: {allowed}; local folders are always allowed)")
        if "::" in source and scheme not in HTTP_SCHEMES:  # fsspec chains filesystems: inner URLs go unchecked
            raise SourceRefused(f"{short(source)}: chained URLs ('::') are not allowed as sources")
    if scheme in HTTP_SCHEMES:
        try:
            host = urlsplit(source).hostname
        except ValueError:
            host = None
        if not host:
            raise AdapterError(f"{short(source)}: not a valid URL (no host)")
        _check_host(source, host, policy)


def _check_host(source: str, host: str, policy: SourcePolicy) -> None:
    allowed = policy.allows_host(host)
    if allowed is False:
        raise SourceRefused(f"{short(source)}: the host {host[:100]!r} is not an allowed source (server config "
                            f"`source_hosts`: {', '.join(policy.hosts)})")
    if allowed is None:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: its addresses are checked where it is resolved (_CheckedResolver)
        _check_address(source, host, str(address))


def _check_address(source: str, host: str, address: str) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global or ip.is_multicast:
        raise SourceRefused(f"{short(source)}: the host {host[:100]!r} is a {_kind(ip)} address ({ip}); only public "
                            "addresses are allowed unless the host is listed in the server config `source_hosts`")


def _kind(ip) -> str:
    for attr in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{attr}"):
            return attr.replace("_", "-")
    return "non-public"


@contextmanager
def source_folder(source: str | os.PathLike, names: frozenset[str], limits: FileLimits = FileLimits(),
                  policy: SourcePolicy = SourcePolicy()) -> Iterator[Path]:
    """A local folder holding `source`'s adapter files: the folder itself, or a temporary copy of the files
    in `names` found at a URL (removed on exit). SourceRefused / SourceTimeout per `policy`."""
    check_source(source, policy)
    if not is_url(source):
        yield Path(os.fspath(source).removeprefix("file://"))
        return
    scheme = source.split("://", 1)[0].lower()
    # an abandoned fetch may still be writing while the copy is removed: its own errors are its business
    with tempfile.TemporaryDirectory(prefix="polyhead-source-", ignore_cleanup_errors=True) as tmp:
        abandoned = threading.Event()
        if scheme in HTTP_SCHEMES:
            def fetch():
                asyncio.run(_fetch_http(source, names, Path(tmp), limits, policy, abandoned))
        else:
            def fetch():
                _fetch_fsspec(source, names, Path(tmp), limits, abandoned)
        _run_with_deadline(fetch, source, policy, abandoned)
        yield Path(tmp)


def _run_with_deadline(fetch, source: str, policy: SourcePolicy, abandoned: threading.Event) -> None:
    """fetch() on a thread of its own, waited for at most policy.timeout_s: a filesystem call that never
    returns leaves its thread behind (it stops at its next chunk), never the caller."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            fetch()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append(exc)

    thread = threading.Thread(target=run, name="polyhead-source-fetch", daemon=True)
    thread.start()
    thread.join(policy.timeout_s + 1.0)  # the http fetch keeps its own deadline; this one is for any filesystem
    if not outcome:
        abandoned.set()
        raise _timeout(source, policy)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]


def _timeout(source: str, policy: SourcePolicy) -> SourceTimeout:
    return SourceTimeout(f"{short(source)}: no complete answer within {policy.timeout_s:g} s (server config "
                         "`source_timeout_s`): abandoned")


# ---- fsspec filesystems --------------------------------------------------------------------------


def _fetch_fsspec(source: str, names: frozenset[str], dest: Path, limits: FileLimits,
                  abandoned: threading.Event) -> None:
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
    wanted = _wanted(source, files, names)
    for fname in wanted:
        size = files[fname].get("size")
        if size is not None and size > limits.max_file_bytes:
            raise AdapterError(f"{short(source)}/{fname}: {size} bytes, over the {limits.max_file_bytes}-byte "
                               "limit for an adapter file")
        _download(fs, files[fname]["name"], dest / fname, limits.max_file_bytes, f"{short(source)}/{fname}",
                  abandoned)


def _wanted(source: str, files, names: frozenset[str]) -> list[str]:
    """The adapter files among a folder's file names; AdapterError for a pickle file or none at all."""
    for fname in sorted(files):
        if Path(fname).suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(f"{short(source)}/{fname[:100]}: pickle-based weight files ({Path(fname).suffix}) are "
                               "refused; polyhead reads safetensors only (convert it and remove this file)")
    wanted = sorted(set(files) & names)
    if not wanted:
        raise AdapterError(f"{short(source)}: no adapter files there (looked for {', '.join(sorted(names))})")
    return wanted


def _download(fs, remote: str, local: Path, limit: int, what: str, abandoned: threading.Event | None = None) -> None:
    """remote -> local, refusing more than `limit` bytes whatever the listing said."""
    copied = 0
    try:
        with fs.open(remote, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                if abandoned is not None and abandoned.is_set():
                    raise AdapterError(f"{what}: abandoned (past the source deadline)")
                copied += len(chunk)
                if copied > limit:
                    raise AdapterError(f"{what}: over the {limit}-byte limit for an adapter file")
                dst.write(chunk)
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"{what}: cannot download it: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """What went wrong, without what the remote said: the exception's type, and the OS's words for an OSError."""
    strerror = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
    return f"{type(exc).__name__}: {strerror}" if isinstance(strerror, str) and strerror else type(exc).__name__


# ---- http(s) ---------------------------------------------------------------------------------------


async def _fetch_http(source: str, names: frozenset[str], dest: Path, limits: FileLimits, policy: SourcePolicy,
                      abandoned: threading.Event) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, connect=policy.connect_timeout_s,
                                    sock_connect=policy.connect_timeout_s)
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(source, policy), limit=4)
    # no proxies from the environment, no compressed bodies (a small gzip can inflate to gigabytes)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False, auto_decompress=False,
                                     headers={"Accept-Encoding": "identity"}) as session:
        try:
            await asyncio.wait_for(_fetch_files(session, source, names, dest, limits, policy, abandoned),
                                   policy.timeout_s)
        except asyncio.TimeoutError:
            raise _timeout(source, policy) from None


async def _fetch_files(session, source: str, names: frozenset[str], dest: Path, limits: FileLimits,
                       policy: SourcePolicy, abandoned: threading.Event) -> None:
    listing = bytearray()
    final = await _get(session, source, source, policy, policy.max_listing_bytes, "the listing page", listing.extend,
                       abandoned, missing="not an adapter folder (no such folder at this URL)")
    links = _links(final, bytes(listing))
    del listing
    for fname in _wanted(source, links, names):
        with open(dest / fname, "wb") as f:
            await _get(session, source, links[fname], policy, limits.max_file_bytes, "an adapter file", f.write,
                       abandoned, what=f"{short(source)}/{fname}")


async def _get(session, source: str, url: str, policy: SourcePolicy, limit: int, kind: str, sink, abandoned,
               what: str | None = None, missing: str = "not found") -> str:
    """GET `url` (following checked redirects), its body streamed into `sink`, at most `limit` bytes; the
    final URL."""
    import aiohttp

    what = what or short(source)
    verb = "list this folder" if kind == "the listing page" else "download it"
    for _ in range(MAX_REDIRECTS + 1):
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    check_source(url, policy)  # the target's scheme and host, as the source's own
                    continue
                if resp.status == 404:
                    raise AdapterError(f"{what}: {missing} (HTTP 404)")
                if resp.status != 200:
                    raise AdapterError(f"{what}: cannot {verb}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise AdapterError(f"{what}: {resp.content_length} bytes, over the {limit}-byte limit for {kind}")
                read = 0
                async for chunk in resp.content.iter_chunked(_HTTP_CHUNK_BYTES):
                    if abandoned.is_set():
                        raise AdapterError(f"{what}: abandoned (past the source deadline)")
                    read += len(chunk)
                    if read > limit:
                        raise AdapterError(f"{what}: over the {limit}-byte limit for {kind} (read stopped there)")
                    sink(chunk)
                return str(resp.url)
        except aiohttp.ServerTimeoutError:  # the connect timeout
            raise SourceTimeout(f"{what}: no connection within {policy.connect_timeout_s:g} s (server config "
                                "`source_connect_timeout_s`)") from None
        except AdapterError:
            raise  # SourceRefused from the resolver or a redirect
        except Exception as exc:  # aiohttp's own errors, a refused connection, a bad URL: the source failing
            raise AdapterError(f"{what}: cannot {verb}: {_reason(exc)}") from None
    raise AdapterError(f"{what}: more than {MAX_REDIRECTS} redirects")


def _links(page_url: str, page: bytes) -> dict[str, str]:
    """file name -> URL of every link on the listing page to a file directly inside the page's folder."""
    folder = page_url.split("?", 1)[0].split("#", 1)[0]
    folder = folder if folder.endswith("/") else folder + "/"
    out = {}
    for match in LINK_RE.finditer(page):
        href = match.group(1).decode("utf-8", errors="replace")
        url = urldefrag(urljoin(folder, href)).url.split("?", 1)[0]
        if url.startswith(folder):
            rest = unquote(url[len(folder):])
            if rest and "/" not in rest:
                out[rest] = url
    return out


class _CheckedResolver:
    """aiohttp's resolver, refusing a host whose addresses are not all public unless the policy lists it.
    aiohttp connects to the addresses it returns: the check holds for the connection itself."""

    def __init__(self, source: str, policy: SourcePolicy):
        import aiohttp

        self._inner = aiohttp.ThreadedResolver()
        self._source, self._policy = source, policy

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        allowed = self._policy.allows_host(host)
        if allowed is False:
            _check_host(self._source, host, self._policy)
        found = await self._inner.resolve(host, port, family)
        if allowed is None:
            for entry in found:
                _check_address(self._source, host, entry["host"])
        return found

    async def close(self) -> None:
        await self._inner.close()
