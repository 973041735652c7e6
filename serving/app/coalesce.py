"""Coalescer: the rows of concurrent requests go to the model deployment in as few calls as possible.

Each call through a Ray Serve handle costs CPU on both sides (routing, serialization, the replica's request
handling) whatever it carries. The ingress therefore keeps at most `max_calls` ModelServer calls out at a
time; requests arriving while that many are out wait here and leave together, as one call of at most
`max_rows` rows (a request is never split: one with more rows goes alone), as soon as a call returns. A lone
request on an idle server leaves at once, so this adds no latency where there is no queue.

With `key` (request_router affinity: the adapter a call is routed by, serving/app/affinity.py request_key), a
call carries only requests of one key: a call mixing two adapters has no home replica and would be spread by load,
so coalescing would undo the affinity. The oldest waiting request picks the key; later requests of that key join it
ahead of older ones of other keys, which leave in the next call.

Results come back per request, in order; per-row errors stay in the rows. An exception of a call (refused
by the model's queue limit, the model unavailable) is raised to every request in it. A request cancelled
while it waits here never leaves; a call whose requests have all been cancelled is cancelled too.
"""
from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class _Waiting:
    rows: list
    future: asyncio.Future = field(repr=False)
    key: Any = None


class Coalescer:
    def __init__(self, send: Callable[[list], Any], max_calls: int, max_rows: int,
                 cancel: Callable[[Any], None] | None = None, window_s: float = 0.0, busy_calls: int = 1,
                 key: Callable[[list], Any] | None = None):
        """send(rows) starts one call and returns what to await for its results (one per row, in order);
        cancel(call) gives up a started call. max_calls 0: no limit on calls out. window_s > 0: while at least
        busy_calls calls are out (the model's replicas are all busy), a request waits up to window_s for others
        to share its call (max_rows of them leave at once). key(rows): requests of different keys never share a
        call."""
        if max_calls < 0 or max_rows < 1 or window_s < 0 or busy_calls < 1 or not (max_calls or window_s):
            raise ValueError(f"need max_calls >= 0, max_rows >= 1, window_s >= 0, busy_calls >= 1 and max_calls or "
                             f"window_s set, got {max_calls}, {max_rows}, {window_s} and {busy_calls}")
        self._send, self._cancel, self._key = send, cancel, key
        self.max_calls, self.max_rows, self.window_s, self.busy_calls = max_calls, max_rows, window_s, busy_calls
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self.out = 0  # calls started and not yet answered
        self.calls = 0  # calls started, ever (for tests and metrics)

    async def submit(self, rows: list) -> list:
        """The results of `rows` (one per row), from a call they share with other requests' rows."""
        waiting = _Waiting(rows, asyncio.get_running_loop().create_future(),
                           self._key(rows) if self._key is not None else None)
        self._queue.append(waiting)
        self._queued_rows += len(rows)
        self._schedule()
        return await waiting.future

    def _schedule(self) -> None:
        """Start calls now, or once the window has passed (while busy_calls calls are out and fewer than max_rows
        rows wait)."""
        if not self._queue or (self.max_calls and self.out >= self.max_calls):
            return  # a returning call starts the next ones
        if self.window_s and self.out >= self.busy_calls and self._queued_rows < self.max_rows:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.window_s, self._window_ends)
            return
        self._start_calls()

    def _window_ends(self) -> None:
        self._timer = None
        if not (self.max_calls and self.out >= self.max_calls):
            self._start_calls()

    def _start_calls(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while not self.max_calls or self.out < self.max_calls:
            group = self._next_group()
            if not group:
                return
            self.out += 1
            self.calls += 1
            # a context of its own: the task would inherit the Serve request context of whichever request started
            # it, and every call it starts would carry that request's internal id; Serve's router matches a chosen
            # replica to its request by that id, so calls sharing one were lost (the affinity router, which has no
            # FIFO fallback, left them waiting forever)
            asyncio.get_running_loop().create_task(self._call(group), context=contextvars.Context())

    def _next_group(self) -> list[_Waiting]:
        """The next call's requests, oldest first: at most max_rows rows (a larger request alone), all of the oldest
        waiting request's key; taken off the queue."""
        queue = self._queue
        while queue and queue[0].future.done():  # cancelled while it waited
            self._queued_rows -= len(queue.popleft().rows)
        if not queue:
            return []
        key = queue[0].key
        group, n, left = [], 0, deque()
        while queue:
            w = queue.popleft()
            if w.future.done():
                self._queued_rows -= len(w.rows)
            elif w.key != key:
                left.append(w)
            elif group and n + len(w.rows) > self.max_rows:
                left.append(w)
                break
            else:
                group.append(w)
                n += len(w.rows)
        left.extend(queue)
        self._queue = left
        self._queued_rows -= n
        return group

    async def _call(self, group: list[_Waiting]) -> None:
        rows = [row for w in group for row in w.rows]
        watch = None
        try:
            call = self._send(rows)
            if self._cancel is not None:
                watch = asyncio.get_running_loop().create_task(self._cancel_when_abandoned(group, call))
            results = await call
        except asyncio.CancelledError:  # this task itself (the loop stops)
            for w in group:
                w.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - each request gets the call's outcome
            _fail(group, exc)
            return
        else:
            if len(results) != len(rows):
                _fail(group, RuntimeError(f"the model answered {len(results)} rows for {len(rows)}"))
                return
            i = 0
            for w in group:
                if not w.future.done():
                    w.future.set_result(results[i:i + len(w.rows)])
                i += len(w.rows)
        finally:
            if watch is not None:
                watch.cancel()
            self.out -= 1
            self._schedule()

    async def _cancel_when_abandoned(self, group: list[_Waiting], call) -> None:
        """Cancel the call once every request in it has been cancelled (their clients went away)."""
        await asyncio.wait([w.future for w in group])
        if all(w.future.cancelled() for w in group):
            self._cancel(call)


def _fail(group: list[_Waiting], exc: Exception) -> None:
    for w in group:
        if not w.future.done():
            w.future.set_exception(exc)
