"""Incremental detokenization and stop strings for one generated sequence.

A sequence's text is `tokenizer.decode(ids, skip_special_tokens=True)`. Decoding it whole at every token costs
O(n) per token, so `TextStream` keeps the text decoded so far and re-decodes only a window, the last few ids:
    window = decode(ids[start:])      # start: CONTEXT ids back, moved up when the window holds over WINDOW ids
A new id changes only the end of the text, so what the window's old and new texts share stays and the rest of the
old is replaced by the rest of the new: usually an append; a byte-level id that completes a character replaces its
U+FFFD; with transformers' clean_up_tokenization_spaces, " ' s" becomes "'s". The window's first id is context
only: a decoder renders a first id on its own terms (WordPiece keeps its "##", SentencePiece drops its space), so
a window starts at an id that gives text (not inside a byte-fallback run), where the text past that id is the end
of the text decoded so far; a change that reaches its first id is decoded whole.

What push() returns never changes afterwards, so the end that can still change is held back: a trailing run of
U+FFFD (a character whose bytes have not all come), with clean-up the last SETTLE characters, with a byte-fallback
tokenizer (<0xNN> ids: Llama, Mistral) an open run of byte ids (the decoder turns a whole run into U+FFFD when
any of it is not UTF-8), and with stop strings the end that can still begin one. finish() decodes the whole
sequence once and returns the rest of it (and takes its text over, should a window ever have disagreed).

Verified (tests/test_generation_detok.py) on byte-level BPE (SmolLM2), WordPiece (MiniLM, with and without
clean_up_tokenization_spaces) and a SentencePiece-style byte-fallback tokenizer, on real text and random ids.
"""
from __future__ import annotations

import os

WINDOW = 12  # ids in the window before it moves up
CONTEXT = 4  # ids it keeps when it does
SETTLE = 4  # characters a later id can still rewrite under clean_up_tokenization_spaces (" n ' t" -> "n't")
PARTIAL = "\ufffd"  # what a character whose bytes have not all come decodes to


class TextStream:
    """Incremental detokenization + stop strings for one sequence.
    push() returns only complete UTF-8 text (never a dangling U+FFFD of a partial multi-byte char), and the
    concatenation of everything returned (push + finish) equals tokenizer.decode(all pushed ids,
    skip_special_tokens=True) exactly, truncated before the first occurrence of a stop string when one matched.
    While stop strings are set, the last (longest stop - 1) characters are held back until they cannot start a stop
    string any more (so a stop string split across tokens is found and never emitted)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {stop!r}")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.stopped = False  # a stop string matched
        self.finished = False  # finish() was called
        self._longest = max(map(len, self.stop), default=0)
        self._firsts = frozenset(s[0] for s in self.stop)
        self._settle = SETTLE if getattr(tokenizer, "clean_up_tokenization_spaces", False) else 0
        self._decoded = ""  # the text of ids as far as known; its end may still change
        self._sent = 0  # characters of _decoded returned so far
        self._start = 0  # the window is ids[_start:]
        self._window = ""  # decode(ids[_start:])
        self._lead = 0  # characters of _window its first id gave (context); 0 while _start is 0
        # byte-fallback tokenizers render a run of <0xNN> ids as one: a run's text waits for an id that ends it
        unk = getattr(tokenizer, "unk_token_id", None)
        self._fallback = tokenizer is not None and tokenizer.convert_tokens_to_ids("<0x00>") not in (None, unk)
        self._specials = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._run: int | None = None  # where the open run of byte ids begins in _decoded

    @property
    def text(self) -> str:
        """All text returned so far (after finish() or a stop: the final text)."""
        return self._decoded[:self._sent]

    def push(self, token: int) -> tuple[str, bool]:
        """(new text safe to emit, stopped: a stop string matched now). Ids pushed after a stop or finish() are
        ignored."""
        if self.stopped or self.finished:
            return "", self.stopped
        token = int(token)
        self.ids.append(token)
        if self.tokenizer is None:
            return "", False
        if self._fallback:
            if self._byte(token):
                self._run = len(self._decoded) if self._run is None else self._run
            elif token not in self._specials:  # a skipped special id does not end a run
                self._run = None
        old, new = self._window, self._decode(self.ids[self._start:])
        keep = len(old) if new.startswith(old) else len(os.path.commonprefix([old, new]))
        cut = len(self._decoded) - (len(old) - keep)  # where the change begins in _decoded
        if keep < self._lead or cut < self._sent:
            self._decoded = self._window = self._decode(self.ids)  # decoded whole: the change reaches the context
            self._start = self._lead = 0
        else:
            self._decoded = self._decoded[:cut] + new[keep:]
            self._window = new
        if len(self.ids) - self._start > WINDOW:
            self._slide()
        return self._emit()

    def finish(self) -> str:
        """The held-back remainder at the end (the sequence finished for another reason than a stop string)."""
        if self.stopped or self.finished:
            return ""
        self.finished = True
        if self.tokenizer is None:
            return ""
        full = self._decode(self.ids)
        if full.startswith(self.text):  # always, unless a window disagreed with the whole decode on sent text
            self._decoded = full
        at = self._find_stop(self._decoded, self._sent, len(self._decoded))
        end = len(self._decoded) if at is None else at
        piece, self._sent = self._decoded[self._sent:end], end
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _byte(self, token: int) -> bool:
        """A byte-fallback id (<0xNN>)."""
        name = self.tokenizer.convert_ids_to_tokens(token)
        return isinstance(name, str) and len(name) == 6 and name.startswith("<0x") and name.endswith(">")

    def _slide(self) -> None:
        """Moves the window up to CONTEXT ids from the end (or a few further back), to a first id that gives text
        (not a skipped special id, after which the next id would be rendered as the first), is not a byte of a
        byte-fallback run, is whole characters while one is still arriving (else the window would see the rest of
        that character without its beginning), and past which the window's text is the end of the decoded text;
        else it stays until the next id."""
        n = len(self.ids)
        pending = self._decoded.endswith(PARTIAL)  # a character may have begun before the start and end after it
        for start in range(n - CONTEXT, max(self._start, n - CONTEXT - 3), -1):
            first = self._decode(self.ids[start:start + 1])
            if not first or (pending and PARTIAL in first) or (self._fallback and self._byte(self.ids[start])):
                continue
            lead, window = len(first), self._decode(self.ids[start:])
            if len(window) > lead and self._decoded.endswith(window[lead:]):
                self._start, self._window, self._lead = start, window, lead
                return

    def _find_stop(self, text: str, begin: int, end: int) -> int | None:
        """Where the earliest stop string in text[begin:end] begins, or None."""
        found = [i for i in (text.find(s, begin, end) for s in self.stop) if i >= 0]
        return min(found, default=None)

    def _emit(self) -> tuple[str, bool]:
        text = self._decoded
        end = len(text)
        while end > self._sent and text[end - 1] == PARTIAL:
            end -= 1  # a character still arriving
        if self.stop:
            # no stop string begins before _sent: the text there could not begin one any more
            at = self._find_stop(text, self._sent, end)
            if at is not None:
                piece = text[self._sent:at]
                self._decoded, self._sent, self.stopped = text[:at], at, True
                return piece, True
        end = max(self._sent, end - self._settle)
        if self._run is not None:
            end = max(self._sent, min(end, self._run))  # a byte run still open
        if self.stop:
            hold = max(self._sent, end - self._longest + 1)
            while hold < end and (text[hold] not in self._firsts
                                  or not any(s.startswith(text[hold:end]) for s in self.stop)):
                hold += 1  # text[hold:end] can no longer begin a stop string
            end = hold
        piece, self._sent = text[self._sent:end], end
        return piece, False
