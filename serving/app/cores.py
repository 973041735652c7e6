"""CoreShare: the model replicas on one node lend each other their CPU cores while they are idle.

On CPU, each model replica computes on its own core(s) (`num_threads` torch threads): at load that is the
fastest layout, since one forward's threads scale badly and every replica has a batch to run. At low load it
leaves cores idle: a lone request's forward runs on one core while the next replica's core waits. CoreShare
lets a small batch (at most `max_tokens` padded tokens) also take the cores of the replicas on the same node
that are idle at that moment, so a single request is computed as fast as the whole machine allows.

Cross-process, node-local, with advisory file locks (flock) in a directory named after the group:
  member-<i>  held (exclusively) by replica i for its lifetime: who is in the group;
  busy-<i>    held by whoever computes on replica i's cores: replica i itself for each batch (it waits
              while a neighbour has borrowed them, at most one small batch), or a neighbour, which only
              ever takes it without waiting.
No deadlock: a replica waits only for its own busy lock, and holds nothing while it does. A replica that dies
releases its locks with its file descriptors; the files themselves stay (empty, harmless).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

MAX_MEMBERS = 64  # replicas of one deployment on one node that can share
MEMBERS_TTL_S = 1.0  # how long a look at who is in the group is trusted


class CoreShare:
    def __init__(self, group: str, threads: int, max_tokens: int, directory: str | os.PathLike | None = None):
        """Join `group` (one name for the replicas of one deployment on one node) with `threads` own threads."""
        if threads < 1 or max_tokens < 0:
            raise ValueError(f"need threads >= 1 and max_tokens >= 0, got {threads} and {max_tokens}")
        self.threads, self.max_tokens = threads, max_tokens
        digest = hashlib.sha256(group.encode()).hexdigest()[:24]
        self.dir = Path(directory or tempfile.gettempdir()) / "polyhead-cores" / digest
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.index, self._member = None, None
        for i in range(MAX_MEMBERS):
            fd = self._open(f"member-{i}")
            if _try_lock(fd, fcntl.LOCK_EX):
                self.index, self._member = i, fd
                break
            os.close(fd)
        self._busy = self._open(f"busy-{self.index}") if self.index is not None else None
        self._others: list[tuple[int, int]] = []  # (index, busy fd) of the other members, refreshed by _neighbours
        self._looked = float("-inf")

    def _open(self, name: str) -> int:
        return os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def lease(self, tokens: int):
        """Compute on this replica's cores (waiting while a neighbour has borrowed them), and, for a batch of at
        most max_tokens tokens, on every neighbour's that is idle now. Yields the number of threads to use."""
        if self._busy is None:  # no place in the group: own threads only
            yield self.threads
            return
        fcntl.flock(self._busy, fcntl.LOCK_EX)
        borrowed = []
        try:
            if tokens <= self.max_tokens:
                borrowed = [fd for _, fd in self._neighbours() if _try_lock(fd, fcntl.LOCK_EX)]
            yield self.threads * (1 + len(borrowed))
        finally:
            for fd in borrowed:
                fcntl.flock(fd, fcntl.LOCK_UN)
            fcntl.flock(self._busy, fcntl.LOCK_UN)

    def _neighbours(self) -> list[tuple[int, int]]:
        """The other members (a member lock that cannot be shared is held by its replica), looked up at most
        once per MEMBERS_TTL_S."""
        now = time.monotonic()
        if now - self._looked < MEMBERS_TTL_S:
            return self._others
        self._looked = now
        current = {i: fd for i, fd in self._others}
        others = []
        for i in range(MAX_MEMBERS):
            if i == self.index or not (self.dir / f"member-{i}").exists():
                continue
            probe = self._open(f"member-{i}")
            try:
                if _try_lock(probe, fcntl.LOCK_SH):  # nobody holds it: no replica there
                    continue
            finally:
                os.close(probe)  # also drops the probe's shared lock
            others.append((i, current.pop(i) if i in current else self._open(f"busy-{i}")))
        for fd in current.values():
            os.close(fd)
        self._others = others
        return others

    def close(self) -> None:
        for _, fd in self._others:
            os.close(fd)
        self._others = []
        for fd in (self._busy, self._member):
            if fd is not None:
                os.close(fd)
        self._busy = self._member = self.index = None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
