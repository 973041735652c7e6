"""Which tokens of which sequences the next step computes (continuous batching).

Each step, in this order, within `max_step_tokens` new tokens:
1. every running sequence, oldest first: one token when decoding, else the next chunk of its
   prefill (chunked prefill: a long prompt takes several steps and never stalls the decoders);
   a sequence that needs a new block and finds none preempts the newest running sequence
   (its blocks freed, recomputed later from its prompt and what it produced so far);
2. waiting sequences, first come first served, while the budget, `max_running` and the KV
   cache allow: a sequence is admitted with blocks for its whole current stream, so only
   decoding ever asks for more.
Decode and prefill tokens share the step: one forward of the base over all of them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from .kvcache import KVCache
from .sequence import RUNNING, WAITING, Sequence


@dataclass(frozen=True)
class Work:
    """Positions [start, stop) of `seq` computed this step; `samples`: the step picks its next token
    (it reaches the end of the sequence's stream)."""

    seq: Sequence
    start: int
    stop: int
    samples: bool


def _work(seq: Sequence, n: int) -> Work:
    return Work(seq, seq.computed, seq.computed + n, seq.computed + n == seq.length)


class Scheduler:
    def __init__(self, cache: KVCache, *, max_step_tokens: int, max_running: int,
                 admit: Callable[[Sequence], bool], release: Callable[[Sequence], None]):
        """admit(seq): pin what the sequence needs besides blocks (its adapter's slot) and fill its prefix;
        False when it cannot run yet. release(seq): unpin it."""
        self.cache = cache
        self.max_step_tokens, self.max_running = max_step_tokens, max_running
        self._admit, self._release = admit, release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._admissions = 0
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): its blocks and pins are freed at once."""
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> list[Work]:
        budget = self.max_step_tokens
        works: list[Work] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = seq.length - seq.computed
            n = 1 if need == 1 else min(need, budget)
            if n <= 0:
                i += 1
                continue
            if not self._grow(seq, seq.computed + n):
                continue  # seq itself was preempted (it was the newest): running[i] is the next one
            works.append(_work(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            blocks = self.cache.allocate(self.cache.blocks_for(seq.length))
            if blocks is None:
                break  # waits for blocks (first come, first served: nothing overtakes it)
            seq.blocks = blocks
            if not self._admit(seq):
                self.cache.free(seq.blocks)
                break
            self.waiting.popleft()
            seq.status, seq.admitted = RUNNING, self._admissions
            self._admissions += 1
            self.running.append(seq)
            n = min(seq.length - seq.computed, budget)
            works.append(_work(seq, n))
            budget -= n
        return works

    def _grow(self, seq: Sequence, positions: int) -> bool:
        """Blocks for `positions` positions of seq, preempting the newest running sequences for them.
        False when seq itself had to be preempted."""
        while self.cache.blocks_for(positions) > len(seq.blocks):
            got = self.cache.allocate(1)
            if got is not None:
                seq.blocks.extend(got)
                continue
            victim = max(self.running, key=lambda s: s.admitted)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status, seq.computed = WAITING, 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        self.cache.free(seq.blocks)
        self._release(seq)
