"""Cutting a too-long input to a limit the way a tokenizer's truncation does (pure Python, no torch).

transformers' `tokenizer(text, truncation=True, max_length=L)` (what sentence-transformers calls with
`max_length=max_seq_length`) cuts the text's own tokens and keeps the special tokens its template adds around
them: BERT keeps [CLS] and [SEP], a Llama tokenizer its BOS. `cut` does the same on an encoding already made:
the first `head` and last `tail` ids stay, the tokens between are cut from `side` ("right": the first ones are
kept, the tokenizer's default; "left": the last ones). For one text, `cut(encode(text), L, head, tail, side)`
equals the tokenizer's truncated encoding, because tokenizers truncate after the model split the text.

`Ends` is a tokenizer's template, found by encoding one word with and without special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SIDES = ("right", "left")


@dataclass(frozen=True)
class Ends:
    """The special ids a tokenizer puts before (`head`) and after (`tail`) a text's own tokens."""

    head: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()

    @classmethod
    def of(cls, with_specials: Sequence[int], without: Sequence[int]) -> "Ends":
        """The template, from one text's encoding with and without special tokens; no ends where the text's
        tokens are not one run inside the encoding (a template that interleaves them)."""
        with_specials, without = list(with_specials), list(without)
        for start in range(len(with_specials) - len(without) + 1):
            if without and with_specials[start:start + len(without)] == without:
                return cls(tuple(with_specials[:start]), tuple(with_specials[start + len(without):]))
        return cls()

    def kept(self, ids: Sequence[int]) -> tuple[int, int]:
        """(head, tail): how many ids at each end of `ids` a cut keeps: the template's, where `ids` begin and end
        with them (a text's encoding; token ids sent as such a one), else none (ids are cut plainly)."""
        h, t = len(self.head), len(self.tail)
        if len(ids) >= h + t and tuple(ids[:h]) == self.head and tuple(ids[len(ids) - t:]) == self.tail:
            return h, t
        return 0, 0


def cut(ids: Sequence, limit: int, head: int = 0, tail: int = 0, side: str = "right") -> list | None:
    """`ids` cut to at most `limit` items: the first `head` and the last `tail` kept, the ones between cut from
    `side`. None when `limit` leaves no room for the kept ends (nothing can be cut to fit)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    room = limit - head - tail  # for the input's own tokens
    if room < 0:
        return None
    middle = ids[head:len(ids) - tail]
    middle = middle[:room] if side == "right" else middle[len(middle) - room:]
    return ids[:head] + middle + ids[len(ids) - tail:]


def kept_positions(n: int, limit: int, head: int = 0, tail: int = 0, side: str = "right") -> list[int] | None:
    """Which positions of an n-long encoding `cut` keeps (to cut its offsets and token strings alike)."""
    return cut(range(n), limit, head, tail, side)
