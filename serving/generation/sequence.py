"""One sequence being generated: its prompt, its adapter, what it produced, where its KV cache is.

Its token stream, position by position (a position is also its index in the sequence's cache):
  [prefix keys/values: `prefix` positions, copied from its prefix-tuned adapter, never computed]
  [virtual tokens: `virtual` positions, its prompt-tuned adapter's embeddings]
  [prompt ids] [generated ids]
`computed` positions are in the cache. A step computes positions [computed, length); when it
reaches `length`, the last position's logits pick the next token (prefill, decode and the
recompute after a preemption are the same rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from adapters_store import AdapterSpec

from .detok import TextStream
from .sampling import Pick, Sampler, SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    id: int
    adapter: str | None
    spec: AdapterSpec | None
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    sampler: Sampler
    text: TextStream
    stop_ids: frozenset[int]
    virtual: int = 0
    prefix: int = 0
    output: list[int] = field(default_factory=list)
    picks: list[Pick] = field(default_factory=list)  # one per output token (logprobs when asked)
    status: str = WAITING
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    slot: int = -1  # the pinned slot of its adapter while running; -1 = base model
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    admitted: int = -1  # admission order among running sequences (preemption takes the newest)
    preemptions: int = 0

    @property
    def length(self) -> int:
        return self.prefix + self.virtual + len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def token_at(self, position: int) -> int | None:
        """The token id at a position, None for a virtual token (or a prefix position)."""
        i = position - self.prefix - self.virtual
        if i < 0:
            return None
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]
