"""serving/app/keylocks.py: a lock per key that is forgotten once nobody holds or waits for it (issue 24 soak)."""
from __future__ import annotations

import asyncio

import pytest

from serving.app.keylocks import KeyLocks


def test_keys_are_forgotten_once_released_so_churned_keys_leave_nothing_behind():
    async def main():
        locks = KeyLocks()
        for i in range(1000):  # a registration and an unload per version, as the model replica does
            async with locks.hold(f"adapter-{i}.v1"):
                assert len(locks) == 1
            async with locks.hold(f"adapter-{i}.v1"):
                pass
        return len(locks)

    assert asyncio.run(main()) == 0


def test_one_key_is_held_by_one_coroutine_at_a_time_waiters_included():
    async def main():
        locks, inside, most, order = KeyLocks(), 0, 0, []

        async def worker(i: int):
            nonlocal inside, most
            async with locks.hold("k"):
                inside += 1
                most = max(most, inside)
                order.append(i)
                await asyncio.sleep(0.01)  # the others queue on the same lock meanwhile
                inside -= 1

        await asyncio.gather(*(worker(i) for i in range(5)))
        return most, order, len(locks)

    most, order, left = asyncio.run(main())
    assert most == 1
    assert sorted(order) == list(range(5))
    assert left == 0


def test_a_waiter_keeps_the_key_so_a_newcomer_gets_the_same_lock():
    async def main():
        locks = KeyLocks()
        first_in, release = asyncio.Event(), asyncio.Event()
        inside = []

        async def first():
            async with locks.hold("k"):
                first_in.set()
                await release.wait()
                inside.append("first out")

        async def later(name: str):
            async with locks.hold("k"):
                inside.append(name)

        t1 = asyncio.create_task(first())
        await first_in.wait()
        t2 = asyncio.create_task(later("second"))
        await asyncio.sleep(0)  # second waits on the lock
        release.set()
        await asyncio.sleep(0)  # first leaves; second is woken but has not run yet
        t3 = asyncio.create_task(later("third"))  # must queue behind second, not take a fresh lock
        await asyncio.gather(t1, t2, t3)
        return inside, len(locks)

    inside, left = asyncio.run(main())
    assert inside == ["first out", "second", "third"]
    assert left == 0


def test_different_keys_do_not_wait_for_each_other():
    async def main():
        locks = KeyLocks()
        async with locks.hold("a"):
            async with locks.hold("b"):  # would deadlock if keys shared a lock
                return len(locks)

    assert asyncio.run(asyncio.wait_for(main(), 5)) == 2


def test_an_error_inside_releases_and_forgets_the_key():
    async def main():
        locks = KeyLocks()
        with pytest.raises(RuntimeError):
            async with locks.hold("k"):
                raise RuntimeError("load failed")
        async with locks.hold("k"):  # not left locked
            pass
        return len(locks)

    assert asyncio.run(asyncio.wait_for(main(), 5)) == 0
