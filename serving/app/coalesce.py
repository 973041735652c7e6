"""Coalescer: the rows of concurrent requests go to the model deployment in as few calls as possible.

Each call through a Ray Serve handle costs CPU on both sides (routing, serialization, the replica's request
handling) whatever it carries. The ingress therefore keeps at most `max_calls` ModelServer calls out at a
time; requests arriving while that many are out wait here and leave together, as one call of at most
`max_rows` rows (a request is never split: one with more rows goes alone), as soon as a call returns. A lone
request on an idle server leaves at once, so this adds no latency where there is no queue.

Results come back per request, in order; per-row errors stay in the rows. An exception of a call (refused
by the model's queue limit, the model unavailable) is raised to every request in it. A request cancelled
while it waits here never leaves; a call whose requests have all been cancelled is cancelled too.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class _Waiting:
    rows: list
    future: asyncio.Future = field(repr=False)


class Coalescer:
    def __init__(self, send: Callable[[list], Any], max_calls: int, max_rows: int,
                 cancel: Callable[[Any], None] | None = None):
        """send(rows) starts one call and returns what to await for its results (one per row, in order);
        cancel(call) gives up a started call."""
        if max_calls < 1 or max_rows < 1:
            raise ValueError(f"max_calls and max_rows must be >= 1, got {max_calls} and {max_rows}")
        self._send, self._cancel = send, cancel
        self.max_calls, self.max_rows = max_calls, max_rows
        self._queue: deque[_Waiting] = deque()
        self.out = 0  # calls started and not yet answered
        self.calls = 0  # calls started, ever (for tests and metrics)

    async def submit(self, rows: list) -> list:
        """The results of `rows` (one per row), from a call they share with other requests' rows."""
        waiting = _Waiting(rows, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._start_calls()
        return await waiting.future

    def _start_calls(self) -> None:
        while self.out < self.max_calls:
            group, n = [], 0
            while self._queue:
                head = self._queue[0]
                if head.future.done():  # cancelled while it waited
                    self._queue.popleft()
                    continue
                if group and n + len(head.rows) > self.max_rows:
                    break
                group.append(self._queue.popleft())
                n += len(head.rows)
            if not group:
                return
            self.out += 1
            self.calls += 1
            asyncio.get_running_loop().create_task(self._call(group))

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
            self._start_calls()

    async def _cancel_when_abandoned(self, group: list[_Waiting], call) -> None:
        """Cancel the call once every request in it has been cancelled (their clients went away)."""
        await asyncio.wait([w.future for w in group])
        if all(w.future.cancelled() for w in group):
            self._cancel(call)


def _fail(group: list[_Waiting], exc: Exception) -> None:
    for w in group:
        if not w.future.done():
            w.future.set_exception(exc)
