"""StoreWatch: every model replica converges on the adapter store's state, whichever replica a change went through.

A DELETE /v1/adapters reaches ONE model replica; `polyhead adapters rm` (or another app sharing the store)
reaches none. Each replica therefore watches the store itself: every `interval_s` (the config's store_ttl_s,
at least MIN_INTERVAL_S) it reads the store's change mark (adapters_store/listing.py: one small file, rewritten
after every publish and removal), and when the mark changed, or at least every `full_s` (a change the mark
missed, e.g. a version folder deleted by hand), it calls `converge`: ModelServer.converge compares the store
versions loaded here with the versions the store publishes and unloads the ones that are gone, freeing their
slots once the rows already admitted for them finish. A lookup that finds nothing (a 404) unloads at once too
(ModelServer._drop_gone): the watch bounds how long a version nobody asks for stays loaded.
"""
from __future__ import annotations

import asyncio
import logging
import time

from adapters_store import AdapterStore
from adapters_store.listing import change_token

MIN_INTERVAL_S = 0.1
FULL_CHECK_S = 30.0
WARN_EVERY_S = 60.0
log = logging.getLogger("ray.serve")

_NEVER = object()


class StoreWatch:
    def __init__(self, store: AdapterStore, interval_s: float, converge, lookup, full_s: float = FULL_CHECK_S):
        """`converge`: an async callable run on a change; `lookup(fn, *args)`: runs blocking store reads off the
        event loop (the replica's lookup threads)."""
        self.store, self.converge, self.lookup = store, converge, lookup
        self.interval_s = max(MIN_INTERVAL_S, interval_s)
        self.full_s = full_s
        self.checks = 0  # converge calls so far
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # started from the first async call
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        seen, last_full, warned = _NEVER, 0.0, -WARN_EVERY_S
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                token = await self.lookup(change_token, self.store)
                now = time.monotonic()
                if token != seen or now - last_full >= self.full_s:
                    await self.converge()
                    self.checks += 1
                    seen, last_full = token, now  # only once converged: a failed look is tried again
            except Exception as exc:  # noqa: BLE001 - an unreadable store never takes the replica down
                if time.monotonic() - warned >= WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning("polyhead: watching the adapter store %s failed (retrying every %s s): %s: %s",
                                self.store.url, self.interval_s, type(exc).__name__, exc)
