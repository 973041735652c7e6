"""ExperimentStore: experiments kept beside the adapter store, versioned and atomic, with a change mark.

Layout, under the adapter store's root (a folder or an fsspec URL; names never start with '.', so nothing here is
ever taken for an adapter):

    <root>/.experiments/<name>/<version>.json   one file per version, never rewritten; the highest is current
                                                ({"deleted": true}: removed; a later create starts at the next number)
    <root>/.experiments/.changes                a new random token after every write: replicas poll it
    <root>/.experiments/.secret                 the key that signs response ids (ids.py), made once

A version is written by creating its file exclusively (local disks: a fsynced temporary file hard-linked into place,
which fails if the name exists; object stores: an exclusive create where the backend has one), so two writers that
race for version N never both win: the loser gets `Conflict` and nothing it wrote is visible.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from adapters_store import AdapterStore
from adapters_store.store import _fsync_dir

from .spec import Experiment

DIR = ".experiments"
CHANGES = ".changes"
SECRET = ".secret"
MAX_RECORD_BYTES = 1024**2
VERSION_FILE = re.compile(r"([1-9][0-9]{0,17})\.json")


class Conflict(Exception):
    """Another writer took that version first, or the current version is not the one the change was made from."""


class ExperimentStore:
    def __init__(self, root: str):
        self.adapters = AdapterStore(root)  # only for where the root is (local folder or fsspec filesystem)
        self.url = root
        if self.adapters.is_local:
            self._dir = str(self.adapters.root / DIR)
            self._fs = None
        else:
            self._fs = self.adapters._fs
            self._dir = f"{self.adapters._base}/{DIR}"

    # reads ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(n for n in self._listdir(self._dir) if not n.startswith("."))

    def versions(self, name: str) -> list[int]:
        return sorted(int(m.group(1)) for f in self._listdir(f"{self._dir}/{name}")
                      if (m := VERSION_FILE.fullmatch(f)))

    def record(self, name: str, version: int) -> dict:
        data = self._read(f"{self._dir}/{name}/{version}.json")
        record = json.loads(data)
        if not isinstance(record, dict):
            raise ValueError(f"{name}@{version}: not a JSON object")
        return record

    def current(self, name: str) -> tuple[int, dict | None]:
        """(the highest version, its record; None when deleted); (0, None) when there is none."""
        versions = self.versions(name)
        if not versions:
            return 0, None
        record = self.record(name, versions[-1])
        return versions[-1], None if record.get("deleted") else record

    def latest(self, name: str) -> Experiment | None:
        _, record = self.current(name)
        return Experiment.from_record(record) if record is not None else None

    def all(self) -> tuple[dict[str, Experiment], dict[str, str]]:
        """Every live experiment, and the ones whose current version cannot be read (name -> why)."""
        out, broken = {}, {}
        for name in self.names():
            try:
                _, record = self.current(name)
                if record is not None:
                    out[name] = Experiment.from_record(record)
            except (OSError, ValueError) as exc:
                broken[name] = f"{type(exc).__name__}: {exc}"[:300]
        return out, broken

    def change_token(self) -> str | None:
        try:
            return self._read(f"{self._dir}/{CHANGES}").decode("ascii", "replace")
        except FileNotFoundError:
            return None

    def secret(self) -> bytes:
        """The id-signing key, made on first use (exclusively: every replica reads the same one)."""
        path = f"{self._dir}/{SECRET}"
        try:
            key = self._read(path)
        except FileNotFoundError:
            self._create(path, secrets.token_hex(32).encode())  # loses a race quietly: read the winner's
            key = self._read(path)
        if len(key) < 32:
            raise ValueError(f"{path}: the id-signing key is too short")
        return key

    # writes -----------------------------------------------------------------------------------

    def write(self, experiment: Experiment) -> Experiment:
        """Publish `experiment` as its version; Conflict when that version exists (someone wrote first)."""
        if experiment.version != self.current(experiment.name)[0] + 1:
            raise Conflict(f"experiment {experiment.name!r} changed meanwhile")
        self._publish(experiment.name, experiment.version, experiment.to_record())
        return experiment

    def delete(self, name: str, version: int) -> None:
        """Mark `name` deleted as `version` (the current one + 1); Conflict as write()."""
        self._publish(name, version, {"name": name, "version": version, "deleted": True})

    def _publish(self, name: str, version: int, record: dict) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"experiment {name!r}: record of {len(data)} bytes")
        if not self._create(f"{self._dir}/{name}/{version}.json", data):
            raise Conflict(f"experiment {name!r} version {version} was written by someone else first")
        self._put(f"{self._dir}/{CHANGES}", secrets.token_hex(16).encode())

    # files ------------------------------------------------------------------------------------

    def _listdir(self, path: str) -> list[str]:
        if self._fs is None:
            try:
                return os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def _read(self, path: str) -> bytes:
        if self._fs is None:
            with open(path, "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
        else:
            data = self._fs.cat_file(path)
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"{path}: over {MAX_RECORD_BYTES} bytes")
        return data

    def _create(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` unless it exists (atomic, exclusive); False when it existed."""
        if self._fs is not None:
            return self.adapters._claim(path, data)  # the store's exclusive create (best effort where none)
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(self._dir) / f".tmp-{secrets.token_hex(8)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if `path` exists: exclusive, and readers see all of it or nothing
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        _fsync_dir(folder)
        return True

    def _put(self, path: str, data: bytes) -> None:
        """Replace `path` atomically (the change mark)."""
        if self._fs is not None:
            self._fs.pipe_file(path, data)
            return
        tmp = Path(self._dir) / f".tmp-{secrets.token_hex(8)}"
        tmp.write_bytes(data)
        os.replace(tmp, path)

