"""Texts to token ids at the ingress without holding up its event loop: one client's huge texts must not slow the
others' requests (issue 24; before, a 1 MB text was tokenized on the event loop before its length was checked).

1. Without truncation, a text of more characters than the route's character limit is refused before it is
   tokenized: 413 `input_too_long`. The limit is the configured `max_input_chars`, else CHARS_PER_TOKEN
   characters per token of the route's limit (32768 for 512 tokens; 16384 on /v1/embeddings, 256). Characters
   cannot bound tokens from below (a WordPiece word of over 100 characters is one [UNK], whitespace and control
   characters are no tokens), so this is a limit of its own, not a token count: prose has 3 to 6 characters per
   token. A text over it with `"truncate": true` is tokenized whatever its length (3.), and answered as any text.
2. A request whose texts have more than OFF_LOOP_CHARS characters in all is tokenized in a worker thread (POOL,
   at most POOL_THREADS texts at once per ingress replica), with the tokenizers library's `encode_batch`,
   which releases the GIL while it works (its `encode` holds it for the whole call, so a thread alone would not
   free the event loop); smaller requests are tokenized on the loop (a thread costs more than they do).
3. With truncation, where the tokenizer allows it (`TextEncoder.boundary`), a long text is tokenized only as far
   as the cut needs. The tokenizer must be word-local: cut at a boundary character (ASCII whitespace; a CJK
   ideograph where the normalizer isolates them), the text's tokens are the part before's followed by the part
   after's, with the same character offsets (the second part's shifted by where it starts). Then a prefix
   (a cut from the right keeps the first tokens) or a suffix (from the left) that has more tokens than the cut
   keeps gives the very tokens the whole text gives: the part tried first is FIRST_CHARS_PER_TOKEN characters per
   kept token long (at the nearest boundary beyond), then four times as long, up to the whole text (a text
   without boundaries, such as one long word, is tokenized whole, in the worker thread).
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from .truncate import HINT, Truncation, fit

CHARS_PER_TOKEN = 64  # the default character limit per token of a route's limit
FIRST_CHARS_PER_TOKEN = 8  # the first part a truncated text is tokenized from, per token kept
OFF_LOOP_CHARS = 4096  # a request's texts with more characters in all are tokenized in POOL
POOL_THREADS = 2
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class TooManyChars(Exception):
    """A text over the character limit, and no truncation asked (413 input_too_long)."""


def char_limit(configured: int | None, token_limit: int) -> int:
    return configured if configured is not None else CHARS_PER_TOKEN * token_limit


def check_chars(texts: list[str], indexes: list[int], token_limit: int, trunc: Truncation | None,
                configured: int | None, why: str = "") -> None:
    """TooManyChars for the first text over the character limit, where no truncation is asked (rule 1)."""
    if trunc is not None:
        return
    limit = char_limit(configured, token_limit)
    for i, text in zip(indexes, texts):
        if len(text) > limit:
            derived = "" if configured is not None else \
                f" ({CHARS_PER_TOKEN} per token of the limit of {token_limit} tokens{why})"
            raise TooManyChars(f"input {i} has {len(text)} characters, over the limit of {limit} characters{derived} "
                               f"of a text sent without truncation; {HINT}")


def encode_part(encoder, text: str, trunc: Truncation, offsets: bool = False) -> dict:
    """`text`'s encoding, or a prefix's or suffix's whose cut to `trunc` keeps the same tokens (rule 3)."""
    boundary, n, keep = encoder.boundary, len(text), trunc.limit
    size, reversed_text = FIRST_CHARS_PER_TOKEN * keep, None
    while boundary is not None and size < n:
        if trunc.side == "right":  # text[:at] where text[at] is a boundary, at >= size
            match = boundary.search(text, size)
            at = match.start() if match else n
            start, end = 0, at
        else:  # text[at:] where text[at] is a boundary, at <= n - size
            reversed_text = text[::-1] if reversed_text is None else reversed_text
            match = boundary.search(reversed_text, size - 1)
            at = n - 1 - match.start() if match else 0
            start, end = at, n
        if start == 0 and end == n:
            break
        enc = encoder.encode(text[start:end], offsets)
        if len(enc["input_ids"]) > keep:
            return _shifted(enc, start, encoder.ends().kept(enc["input_ids"])) if start and offsets else enc
        size *= 4
    return encoder.encode(text, offsets)


def _shifted(enc: dict, start: int, ends: tuple[int, int]) -> dict:
    """A suffix's encoding with its text's offsets made the whole text's (the template's special tokens keep
    theirs, as in the whole text's encoding)."""
    head, tail = ends
    spans = enc["offset_mapping"]
    last = len(spans) - tail
    return dict(enc, offset_mapping=[(s + start, e + start) if head <= j < last else (s, e)
                                     for j, (s, e) in enumerate(spans)])


def encode_rows(encoder, texts: list[str], indexes: list[int], token_limit: int, trunc: Truncation | None,
                offsets: bool = False, why: str = "") -> list[dict]:
    """Each text's encoding within the route's limit (serving/app/truncate.py's fit; TooLong, BadTruncation)."""
    ends = encoder.ends()
    out = []
    for i, text in zip(indexes, texts):
        enc = encoder.encode(text, offsets) if trunc is None else encode_part(encoder, text, trunc, offsets)
        out.append(fit(enc, i, token_limit, trunc, ends, True, why))
    return out


async def encode_texts(encoder, texts: list[str], indexes: list[int], token_limit: int, trunc: Truncation | None,
                       offsets: bool = False, why: str = "", max_chars: int | None = None) -> list[dict]:
    """encode_rows after the character limit, in POOL where the texts are large (rules 1 and 2)."""
    check_chars(texts, indexes, token_limit, trunc, max_chars, why)
    work = partial(encode_rows, encoder, texts, indexes, token_limit, trunc, offsets, why)
    if sum(map(len, texts)) <= OFF_LOOP_CHARS:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_tokenize_pool(), work)


def _tokenize_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="polyhead-tokenize")
        return _pool
