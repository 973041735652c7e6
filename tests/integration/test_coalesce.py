"""Coalescer (serving/app/coalesce.py) on plain asyncio, with a fake model whose calls the test answers."""
from __future__ import annotations

import asyncio

import pytest

from serving.app.coalesce import Coalescer


class FakeModel:
    """send(rows) -> an awaitable the test resolves; answers each row r with ("done", r)."""

    def __init__(self):
        self.calls: list[list] = []
        self.pending: list[asyncio.Future] = []
        self.cancelled: list[list] = []
        self.most_out = 0

    def send(self, rows):
        self.calls.append(list(rows))
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.most_out = max(self.most_out, sum(not f.done() for f in self.pending))
        return fut

    def cancel(self, call):
        self.cancelled.append(self.calls[self.pending.index(call)])
        call.cancel()

    def answer(self, i, results=None, error=None):
        fut = self.pending[i]
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(results if results is not None else [("done", r) for r in self.calls[i]])


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


async def two_sharing_the_second_call(co, model):
    """Requests a and b submitted while a first call is out (max_calls=1); returns them once that first call
    has been answered and theirs (call 1) is out."""
    first = asyncio.create_task(co.submit(["x"]))
    await settle()
    a, b = asyncio.create_task(co.submit(["a"])), asyncio.create_task(co.submit(["b"]))
    await settle()
    model.answer(0)
    assert await first == [("done", "x")]
    await settle()
    assert model.calls[1] == ["a", "b"]
    return a, b


def test_a_lone_request_leaves_at_once_with_its_rows():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=2, max_rows=8)
        task = asyncio.create_task(co.submit(["a", "b"]))
        await settle()
        assert model.calls == [["a", "b"]]
        model.answer(0)
        assert await task == [("done", "a"), ("done", "b")]
        assert co.out == 0
    run(main())


def test_requests_arriving_while_calls_are_out_leave_together_and_get_their_own_rows():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=8)
        first = asyncio.create_task(co.submit(["r0"]))
        await settle()
        later = [asyncio.create_task(co.submit([f"r{i}a", f"r{i}b"] if i == 2 else [f"r{i}"])) for i in (1, 2, 3)]
        await settle()
        assert model.calls == [["r0"]]  # max_calls=1: the others wait for it
        model.answer(0)
        assert await first == [("done", "r0")]
        await settle()
        assert model.calls[1] == ["r1", "r2a", "r2b", "r3"]  # one call, in arrival order
        model.answer(1)
        assert [await t for t in later] == [[("done", "r1")], [("done", "r2a"), ("done", "r2b")], [("done", "r3")]]
        assert co.calls == 2 and model.most_out == 1
    run(main())


def test_never_more_than_max_calls_out_and_never_a_request_split():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=2, max_rows=4)
        tasks = [asyncio.create_task(co.submit([f"{i}.{j}" for j in range(n)]))
                 for i, n in enumerate([1, 1, 3, 2, 6, 1])]
        await settle()
        assert model.calls == [["0.0"], ["1.0"]]
        model.answer(0)
        await settle()
        assert model.calls[2] == ["2.0", "2.1", "2.2"]  # 3 + the next 2 rows would pass max_rows=4
        model.answer(1)
        await settle()
        assert model.calls[3] == ["3.0", "3.1"]
        model.answer(2)
        await settle()
        assert model.calls[4] == [f"4.{j}" for j in range(6)]  # over max_rows alone: sent whole, by itself
        model.answer(3)
        await settle()
        assert model.calls[5] == ["5.0"]
        model.answer(4)
        model.answer(5)
        results = [await t for t in tasks]
        assert [len(r) for r in results] == [1, 1, 3, 2, 6, 1]
        assert model.most_out == 2
    run(main())


def test_a_failed_call_fails_every_request_in_it_and_later_calls_still_run():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=8)
        a, b = await two_sharing_the_second_call(co, model)
        model.answer(1, error=LookupError("queue full"))
        for t in (a, b):
            with pytest.raises(LookupError, match="queue full"):
                await t
        c = asyncio.create_task(co.submit(["c"]))
        await settle()
        model.answer(2)
        assert await c == [("done", "c")]
    run(main())


def test_a_wrong_number_of_results_is_an_error_not_a_shifted_answer():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=8)
        task = asyncio.create_task(co.submit(["a", "b"]))
        await settle()
        model.answer(0, results=[("done", "a")])
        with pytest.raises(RuntimeError, match="1 rows for 2"):
            await task
    run(main())


def test_a_request_cancelled_while_waiting_never_leaves():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=8, cancel=model.cancel)
        first = asyncio.create_task(co.submit(["x"]))
        await settle()
        gone, kept = asyncio.create_task(co.submit(["gone"])), asyncio.create_task(co.submit(["kept"]))
        await settle()
        gone.cancel()
        await settle()
        model.answer(0)
        await first
        await settle()
        assert model.calls[1] == ["kept"]
        model.answer(1)
        assert await kept == [("done", "kept")]
        assert gone.cancelled() and model.cancelled == []
    run(main())


def test_a_call_is_cancelled_once_all_its_requests_are_and_not_before():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=8, cancel=model.cancel)
        a, b = await two_sharing_the_second_call(co, model)
        a.cancel()
        await settle()
        assert model.cancelled == []  # b still wants the call
        b.cancel()
        await settle()
        assert model.cancelled == [["a", "b"]]
        c = asyncio.create_task(co.submit(["c"]))  # the cancelled call freed its place
        await settle()
        assert model.calls[2] == ["c"]
        model.answer(2)
        assert await c == [("done", "c")]
    run(main())


@pytest.mark.parametrize("calls,rows,window_s", [(0, 8, 0.0), (1, 0, 0.0), (-1, 8, 0.01), (1, 8, -0.01)])
def test_bad_limits_are_refused(calls, rows, window_s):
    with pytest.raises(ValueError, match="need max_calls >= 0"):
        Coalescer(lambda rows: None, calls, rows, window_s=window_s)


def test_window_holds_requests_while_a_call_is_out_and_sends_them_together():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=0, max_rows=3, window_s=0.05)
        first = asyncio.create_task(co.submit(["x"]))  # nothing out: leaves at once
        await settle()
        assert model.calls == [["x"]]
        a, b = asyncio.create_task(co.submit(["a"])), asyncio.create_task(co.submit(["b"]))
        await settle()
        assert len(model.calls) == 1  # a call is out: they wait for the window
        await asyncio.sleep(0.08)
        assert model.calls[1] == ["a", "b"]  # no limit on calls out: they left while the first is still out
        c, d = asyncio.create_task(co.submit(["c", "d"])), asyncio.create_task(co.submit(["e"]))
        await settle()
        assert model.calls[2] == ["c", "d", "e"]  # max_rows reached: no need to wait for the window
        for i in (1, 0, 2):
            model.answer(i)
        assert (await a, await b, await first) == ([("done", "a")], [("done", "b")], [("done", "x")])
        assert (await c, await d) == ([("done", "c"), ("done", "d")], [("done", "e")])
        assert co.out == 0 and co._timer is None
    run(main())


def test_window_ends_early_when_the_last_call_returns():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=0, max_rows=8, window_s=10.0)
        first = asyncio.create_task(co.submit(["x"]))
        await settle()
        a = asyncio.create_task(co.submit(["a"]))
        await settle()
        model.answer(0)  # nothing out any more: the waiting request leaves now, not after 10 s
        await first
        await settle()
        assert model.calls[1] == ["a"]
        model.answer(1)
        assert await a == [("done", "a")]
    run(main())


def test_window_waits_only_while_busy_calls_are_out():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=0, max_rows=8, window_s=10.0, busy_calls=2)
        first = asyncio.create_task(co.submit(["x"]))
        await settle()
        second = asyncio.create_task(co.submit(["y"]))  # one call out, two replicas: one is idle, no wait
        await settle()
        assert model.calls == [["x"], ["y"]]
        third = asyncio.create_task(co.submit(["z"]))  # two out: it waits
        await settle()
        assert len(model.calls) == 2
        model.answer(0)  # one out again: it leaves now
        await settle()
        assert model.calls[2] == ["z"]
        model.answer(1)
        model.answer(2)
        assert (await first, await second, await third) == ([("done", "x")], [("done", "y")], [("done", "z")])
    run(main())


def test_with_a_key_a_call_carries_one_key_and_the_oldest_request_picks_it():
    """request_router affinity: requests for adapters a and b wait while a call is out; the next call carries the
    oldest one's key (a) with every later a, then b's leave together; rows come back to their requests."""
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=8, key=lambda rows: rows[0][0])
        first = asyncio.create_task(co.submit(["x0"]))
        await settle()
        later = [asyncio.create_task(co.submit([name])) for name in ("a1", "b1", "a2", "b2", "b3", "a3")]
        await settle()
        model.answer(0)
        assert await first == [("done", "x0")]
        await settle()
        assert model.calls[1] == ["a1", "a2", "a3"]
        model.answer(1)
        await settle()
        assert model.calls[2] == ["b1", "b2", "b3"]
        model.answer(2)
        assert [await t for t in later] == [[("done", n)] for n in ("a1", "b1", "a2", "b2", "b3", "a3")]
        assert co.calls == 3
    run(main())


def test_with_a_key_max_rows_still_bounds_a_call_and_order_is_kept_within_a_key():
    async def main():
        model = FakeModel()
        co = Coalescer(model.send, max_calls=1, max_rows=2, key=lambda rows: rows[0][0])
        first = asyncio.create_task(co.submit(["x"]))
        await settle()
        later = [asyncio.create_task(co.submit([name])) for name in ("a1", "b1", "a2", "a3", "b2")]
        await settle()
        for i, want in enumerate((["a1", "a2"], ["b1", "b2"], ["a3"]), start=1):
            model.answer(i - 1)
            await settle()
            assert model.calls[i] == want
        model.answer(3)
        assert [await t for t in later] == [[("done", n)] for n in ("a1", "b1", "a2", "a3", "b2")]
    run(main())
