"""`raystore://<folder>`: an adapter store on the Ray head node's disk that every node reaches through Ray.

A Ray cluster's nodes may share nothing but Ray (KubeRay pods without a shared volume, machines without NFS
or an object store). With `store_root: raystore:///var/lib/polyhead/adapters`, one detached actor on the head
node (StoreHost, named `polyhead-store` in the `polyhead` namespace) owns that folder, and every process in
the cluster reads and writes the store through it: RayStoreFileSystem is an fsspec filesystem whose calls are
the actor's methods, so AdapterStore treats it as it treats `s3://` (adapters_store/store.py: versions
committed by a COMMITTED object, numbers claimed by exclusive create, each version downloaded once per machine
into a cache keyed by its sha256 and verified against it). A node's cache is its own
(`~/.cache/polyhead/raystore/<Ray node id>/`): nothing is shared by the filesystem, so a version registered
through an ingress on one node is served by a replica on another after one fetch of its files through Ray.

The actor writes atomically (a temporary file in the same folder, fsynced, then renamed or, for an exclusive
create, hard-linked: it fails if the name exists), serves files up to MAX_FILE_BYTES and only absolute paths
without `..`. It runs threaded (MAX_CONCURRENCY calls at once) and asks for no CPU. The head node holds no
model replica in a typical deployment, so losing a worker node loses no stored version; losing the head node
loses the cluster anyway.
"""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import fsspec
from fsspec.spec import AbstractFileSystem

PROTOCOL = "raystore"
ACTOR_NAME = "polyhead-store"
NAMESPACE = "polyhead"
MAX_FILE_BYTES = 2 * 1024**3  # the store's own files are far smaller (adapters_store/files.py's limits)
MAX_CONCURRENCY = 16
_OK, _MISSING, _EXISTS, _NOT_DIR = "ok", "missing", "exists", "not_dir"


def register() -> None:
    """Make `raystore://` known to fsspec (AdapterStore calls it before opening a URL)."""
    fsspec.register_implementation(PROTOCOL, RayStoreFileSystem, clobber=True)


def _checked(path: str) -> Path:
    """An absolute path without `..`, `.` or empty parts; ValueError otherwise."""
    parts = path.rstrip("/").split("/")
    if not path.startswith("/") or any(part in ("..", ".", "") for part in parts[1:]) or "\0" in path:
        raise ValueError(f"raystore: {path!r} is not an absolute path without '..'")
    return Path(path)


class StoreHost:
    """The actor's body: plain file operations on its node's disk, each answering (status, value)."""

    def find(self, prefix: str) -> tuple[str, list[str]]:
        root = _checked(prefix)
        if root.is_file():
            return _OK, [str(root)]
        found = []
        for folder, dirs, files in os.walk(root):  # no such folder: nothing
            dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]
            found += [f"{folder}/{f}" for f in files if not f.startswith(".tmp-")]
        return _OK, sorted(found)

    def ls(self, path: str) -> tuple[str, list[str] | None]:
        folder = _checked(path)
        try:
            return _OK, sorted(f"{folder}/{e}" for e in os.listdir(folder) if not e.startswith(".tmp-"))
        except FileNotFoundError:
            return _MISSING, None
        except NotADirectoryError:
            return _OK, [str(folder)]

    def exists(self, path: str) -> tuple[str, bool]:
        return _OK, _checked(path).exists()

    def cat(self, path: str) -> tuple[str, bytes | None]:
        target = _checked(path)
        try:
            with open(target, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return _MISSING, None
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"raystore: {path} is over {MAX_FILE_BYTES} bytes")
        return _OK, data

    def put(self, path: str, data: bytes, exclusive: bool) -> tuple[str, None]:
        """Write `path` atomically; with `exclusive`, only if it does not exist (else _EXISTS)."""
        target = _checked(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return _EXISTS, None
            else:
                os.replace(tmp, target)
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return _OK, None
        finally:
            tmp.unlink(missing_ok=True)

    def rm(self, path: str) -> tuple[str, None]:
        try:
            _checked(path).unlink()
        except FileNotFoundError:
            return _MISSING, None
        return _OK, None


def store_host():
    """The cluster's StoreHost actor handle, created on the head node on first use (a detached actor: it
    outlives the app that created it, as the store does). Needs a connected Ray (`ray.init`)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("a raystore:// adapter store is reached through Ray: connect to the cluster first "
                           "(inside polyhead serve's replicas it is)")
    actor = ray.remote(StoreHost).options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=MAX_CONCURRENCY, max_restarts=-1, max_task_retries=-1,
        resources={"node:__internal_head__": 0.001})
    return actor.remote()


class _Upload(io.BytesIO):
    """A file opened for writing: its bytes go to the actor when it is closed."""

    def __init__(self, fs: RayStoreFileSystem, path: str, exclusive: bool):
        super().__init__()
        self.fs, self.path, self.exclusive = fs, path, exclusive

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            status, _ = self.fs._call("put", self.path, data, self.exclusive)
            if status == _EXISTS:
                raise FileExistsError(self.path)


class RayStoreFileSystem(AbstractFileSystem):
    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._actor = None

    @property
    def cache_dir(self) -> Path:
        """This node's cache of downloaded versions (AdapterStore uses it for raystore:// stores)."""
        import ray

        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        return Path(base) / "polyhead" / "raystore" / node

    def _call(self, method: str, *args):
        import ray

        if self._actor is None:
            self._actor = store_host()
        return ray.get(getattr(self._actor, method).remote(*args))

    @classmethod
    def _strip_protocol(cls, path):
        path = super()._strip_protocol(path)
        return "/" + path.lstrip("/")

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        _, found = self._call("find", self._strip_protocol(path))
        return {p: {"name": p, "type": "file"} for p in found} if detail else found

    def ls(self, path, detail=False, **kwargs):
        path = self._strip_protocol(path)
        status, entries = self._call("ls", path)
        if status == _MISSING:
            raise FileNotFoundError(path)
        return [{"name": e, "type": "unknown"} for e in entries] if detail else entries

    def exists(self, path, **kwargs):
        return self._call("exists", self._strip_protocol(path))[1]

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        status, data = self._call("cat", path)
        if status == _MISSING:
            raise FileNotFoundError(path)
        return data[start:end]

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        status, _ = self._call("put", path, bytes(value), mode == "create")
        if status == _EXISTS:
            raise FileExistsError(path)

    def rm_file(self, path, **kwargs):
        path = self._strip_protocol(path)
        if self._call("rm", path)[0] == _MISSING:
            raise FileNotFoundError(path)

    def open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if mode == "rb":
            return io.BytesIO(self.cat_file(path))
        if mode in ("wb", "xb"):
            if mode == "xb" and self.exists(path):
                raise FileExistsError(path)
            return _Upload(self, path, exclusive=mode == "xb")
        raise ValueError(f"raystore: mode {mode!r} is not supported (rb, wb, xb)")
