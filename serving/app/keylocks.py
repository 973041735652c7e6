"""KeyLocks: one asyncio lock per key, held only while someone holds or waits for it.

The model replica loads and unloads each adapter version under a lock of its engine key. A dict of
locks that never forgets a key grows by one lock per registered version for the replica's lifetime
(issue 24's soak: a registration every few seconds). Here an entry lives while a coroutine holds or
waits for its lock: everyone who asks for the key meanwhile gets the same lock, and the last one out
removes it. Event-loop only (no thread safety needed: no await between a count and its check).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable


class KeyLocks:
    def __init__(self):
        self._entries: dict[Hashable, list] = {}  # key -> [lock, holders and waiters]

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        entry = self._entries.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._entries[key]

    def __len__(self) -> int:
        """Keys with a holder or a waiter now."""
        return len(self._entries)
