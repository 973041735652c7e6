"""Registrations (POST /v1/adapters) and store lookups, each on threads of their own.

A registration validates an adapter and may fetch it from a URL (adapters_store/sources.py): seconds to
minutes of blocking work. Lookups of published versions (Registry.resolve) are on the serving path of
every row that misses the registry's cache. Sharing one thread pool (asyncio.to_thread's), 16
registrations from a URL that never answered held every thread and stalled every store-backed adapter
(issue 24). Here registrations run on `max_concurrent_registrations` threads, one each: when they are all
taken, another registration is refused at once (`try_start` -> False: the ingress answers 429 with
Retry-After), never queued; lookups run on a pool that registrations never use.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from adapters_store.sources import SourcePolicy

from .config import ServeConfig

LOOKUP_THREADS = 4


def source_policy(cfg: ServeConfig) -> SourcePolicy:
    """The server's rules for registration sources (the config's source_* knobs)."""
    return SourcePolicy(schemes=tuple(cfg.source_schemes), hosts=tuple(cfg.source_hosts),
                        timeout_s=cfg.source_timeout_s, connect_timeout_s=cfg.source_connect_timeout_s,
                        max_listing_bytes=cfg.source_max_listing_bytes)


class Registrations:
    """At most `limit` registrations at a time, each on a thread of its own; store lookups on another pool.

    try_start/finish are called on the replica's event loop only (no await between the check and the count)."""

    def __init__(self, limit: int, lookup_threads: int = LOOKUP_THREADS):
        self.limit = limit
        self.running = 0
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="polyhead-register")
        self._lookups = ThreadPoolExecutor(max_workers=lookup_threads, thread_name_prefix="polyhead-lookup")

    def try_start(self) -> bool:
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def finish(self) -> None:
        self.running -= 1

    async def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on a registration thread (after try_start)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def lookup(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on a lookup thread: never behind a registration."""
        return await asyncio.get_running_loop().run_in_executor(self._lookups, functools.partial(fn, *args, **kwargs))

    def busy_message(self) -> str:
        return (f"{self.running} adapter registrations are in progress on this replica, the most it runs at once "
                "(server config `max_concurrent_registrations`); try again later")
