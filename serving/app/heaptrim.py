"""HeapTrim: a replica (model and ingress) gives the heap memory it freed back to the OS, every TRIM_INTERVAL_S.

glibc's malloc keeps freed memory in its heaps (an arena per thread that allocates) and returns only
what lies at a heap's top, so a process whose allocations change size (batches of every shape,
adapters of every rank loaded, validated on registration threads and unloaded) keeps growing in RSS
while its live memory stays flat. In issue 24's 6-minute soak the model replicas grew 3.5-62 MiB/min
(benchmarks/soak.py, 30 minutes: 0.9-1.5 MiB/min after the first 5, in steps of a few MiB); the same
work in one process (engine loads, unloads and batches of varied shapes, validation on two other
threads) grew 208 MiB in 800 registrations, of which `malloc_trim(0)` gave back 124 MiB: free memory,
not a leak (the engine held the same adapters throughout). malloc_trim also releases the free pages
inside a heap (glibc >= 2.8), which the heap's own trimming never does.

The ingress's malloc held 83 MB free of 145 MB after 24 minutes of that soak. In a model replica the
trim runs where its torch work runs (its engine thread), between batches; its time grows
with what it gives back (30-100 ms for 73 MiB on the 2-core development machine; every TRIM_INTERVAL_S
little has accumulated). A no-op where the C library has no malloc_trim (musl, macOS).
"""
from __future__ import annotations

import asyncio
import ctypes
import logging

TRIM_INTERVAL_S = 30.0
log = logging.getLogger("ray.serve")


def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> bool | None:
    """Give the C heap's free memory back to the OS: True if some was, False if none, None where unavailable."""
    if _TRIM is None:
        return None
    return bool(_TRIM(0))


class HeapTrim:
    """Calls release_free_memory through `run` (the replica's engine thread) every `interval_s`."""

    def __init__(self, run, interval_s: float = TRIM_INTERVAL_S):
        self.run, self.interval_s = run, interval_s
        self.trims = 0
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        if self._task is not None or _TRIM is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # started from the first async call
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.run(release_free_memory)
                self.trims += 1
            except Exception as exc:  # noqa: BLE001 - never takes the replica down
                log.warning("polyhead: malloc_trim failed: %s: %s", type(exc).__name__, exc)
