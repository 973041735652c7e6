"""serving/app/heaptrim.py: a model replica gives freed heap memory back to the OS (issue 24's soak)."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from serving.app import heaptrim
from serving.app.heaptrim import HeapTrim, release_free_memory

glibc = pytest.mark.skipif(heaptrim._TRIM is None or not Path("/proc/self/status").exists(),
                           reason="needs glibc's malloc_trim and Linux /proc")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@glibc
def test_memory_freed_on_another_thread_between_kept_blocks_goes_back_to_the_os():
    kept = []

    def work():  # 80 MB in 4 kB blocks (malloc's, not pymalloc's) from this thread's arena; 1 in 50 stays
        blocks = [bytearray(4000) for _ in range(20000)]
        kept.extend(blocks[::50])
        blocks.clear()

    release_free_memory()
    before = rss_mib()
    t = threading.Thread(target=work)
    t.start()
    t.join()
    grown = rss_mib() - before
    assert grown > 40  # the free blocks stay in the heap: the kept ones pin it
    assert release_free_memory() is True
    assert rss_mib() - before < grown / 2
    assert len(kept) == 400


def test_the_trim_runs_periodically_through_the_given_runner():
    calls = []

    async def run(fn):  # the replica's _on_engine
        calls.append(fn)
        return fn()

    async def main():
        trim = HeapTrim(run, interval_s=0.01)
        trim.ensure_started()
        trim.ensure_started()  # once
        await asyncio.sleep(0.2)
        trim._task.cancel()
        return trim.trims

    if heaptrim._TRIM is None:
        assert asyncio.run(main()) == 0  # nothing to call: never started
        return
    trims = asyncio.run(main())
    assert trims >= 3
    assert set(calls) == {release_free_memory}


def test_a_failing_trim_never_stops_the_loop():
    async def run(fn):
        raise RuntimeError("engine thread gone")

    async def main():
        trim = HeapTrim(run, interval_s=0.01)
        trim.ensure_started()
        await asyncio.sleep(0.1)
        alive = trim._task is not None and not trim._task.done()
        if trim._task is not None:
            trim._task.cancel()
        return alive

    assert asyncio.run(main()) is (heaptrim._TRIM is not None)
