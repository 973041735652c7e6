"""serving/app/texts.py without Ray: the character limit, the cut of a long text before it is tokenized (the tokens
kept are exactly the whole text's, adversarial texts included) and tokenization off the event loop."""
from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path

import pytest

from serving.app.config import load_config
from serving.app.texts import TooManyChars, check_chars, encode_part, encode_rows, encode_texts
from serving.app.tokens import TextEncoder, cut_boundary
from serving.app.truncate import Truncation, fit

BASE = Path(load_config(None).resolved_base_dir())
SPEC = json.loads((BASE / "tokenizer.json").read_text())

# pieces a text is made of: what a tokenizer drops (control and zero-width characters, whitespace runs), maps to
# one token whatever its length (a word over 100 characters: [UNK]), changes in length (İ lower-cased, accents
# stripped), isolates (CJK, punctuation), or matches before normalizing (special tokens typed in the text)
PIECES = [" ", "  ", "\t", "\n", "\r\n", " \u00a0 ", "\u3000", "\u2028", "\x00", "\x07", "\x1b", "\u200b",
          "\ufeff", "\u200d", "e\u0301", "\u0301", " \u0301", "İ", "ß", "ﬁ", "Ünïcödé", "🙂", "👍🏽", "👩\u200d💻",
          "中文", "字", "日本語のテキスト", "한국어", "ไทย", "العربية", "\U0002b820", "\U0002b91f", "\U0002b920", "\uf900",
          "the", "cat", "Ada", "antidisestablishmentarianism", "x" * 100, "y" * 101, "z" * 5000, "...", "!?",
          "[SEP]", "[MASK]", "[CLS]x", "3.14", "a-b", "'s", "©®™", "\ud7ff"]
LIMITS = [2, 3, 5, 16, 64, 128]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    enc = TextEncoder(BASE)
    assert enc.backend == "tokenizers" and enc.boundary is not None
    return enc


class Counting:
    """An encoder that records the length of every text it is asked to encode."""

    def __init__(self, inner: TextEncoder):
        self.inner, self.lengths, self.threads = inner, [], set()
        self.boundary = inner.boundary

    def encode(self, text: str, offsets: bool = False) -> dict:
        self.lengths.append(len(text))
        self.threads.add(threading.current_thread().name)
        return self.inner.encode(text, offsets)

    def ends(self):
        return self.inner.ends()


def adversarial(rng: random.Random, n: int) -> str:
    out, size = [], 0
    while size < n:
        piece = rng.choice(PIECES)
        out.append(piece)
        size += len(piece)
    return "".join(out)


def texts() -> list[str]:
    rng = random.Random(24)
    out = [adversarial(rng, n) for n in (200, 2_000, 20_000) for _ in range(4)]
    out += ["the cat sat " * 3000, " " * 5000 + "the end", "the start" + " " * 5000, "中文字符" * 2000,
            "\x00 " * 4000 + "word", "z" * 30_000 + " the cat", "the cat " + "z" * 30_000]
    # no safe cut: characters that join their neighbours (dropped ones), or next to which a cut would split a
    # special token or a word (a CJK ideograph only BERT's Python tokenizer isolates)
    out += ["the\x00cat\u200b" * 2000, "[SEP]" * 4000, "x\U0002b820y." * 3000, "ab.cd" * 3000, "x\U0002b920y." * 3000]
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_cut_text_keeps_exactly_the_tokens_and_offsets_of_the_whole_text(encoder, side):
    ends, counting, tried = encoder.ends(), Counting(encoder), 0
    for text in texts():
        whole = encoder.encode(text, offsets=True)
        for limit in LIMITS:
            trunc = Truncation(limit, side, plain_ids=False, asked="truncate")
            want = fit(whole, 0, limit, trunc, ends, True)
            counting.lengths.clear()
            got = fit(encode_part(counting, text, trunc, offsets=True), 0, limit, trunc, ends, True)
            assert got == want, (side, limit, text[:80])
            tried += max(counting.lengths) < len(text)
    assert tried >= 40  # many of the cases were decided from a part of the text


def test_a_prose_text_is_tokenized_only_as_far_as_the_cut_needs(encoder):
    text = "Ada Lovelace worked with Charles Babbage on the Analytical Engine. " * 15_000  # 1 MB
    counting = Counting(encoder)
    for side in ("right", "left"):
        counting.lengths.clear()
        enc = encode_part(counting, text, Truncation(512, side, False, "truncate"))
        assert len(enc["input_ids"]) > 512 and counting.lengths == [counting.lengths[0]]
        assert counting.lengths[0] < 8 * 512 + 100  # 8 characters per kept token, to the next space


def test_no_cut_where_the_tokenizer_is_not_word_local():
    boundary = cut_boundary(SPEC)
    assert all(boundary.match(c) for c in " \t\n\r中\U0002b920")
    assert not any(boundary.match(c) for c in "a.\x00\u200b\u00a0\u3000\U0002b820の")
    assert not cut_boundary(dict(SPEC, normalizer=dict(SPEC["normalizer"], handle_chinese_chars=False))).match("中")
    bpe = dict(SPEC, model={"type": "BPE"}, pre_tokenizer={"type": "ByteLevel"})
    metaspace = dict(SPEC, pre_tokenizer={"type": "Metaspace"})
    nfc = dict(SPEC, normalizer={"type": "NFC"})
    stripping = dict(SPEC, added_tokens=SPEC["added_tokens"] + [{"content": "<mask>", "lstrip": True}])
    spaced = dict(SPEC, added_tokens=SPEC["added_tokens"] + [{"content": "new york"}])
    for spec in (bpe, metaspace, nfc, stripping, spaced):
        assert cut_boundary(spec) is None


def test_without_a_boundary_the_whole_text_is_tokenized(encoder):
    counting = Counting(encoder)
    counting.boundary = None  # as for a tokenizer that is not word-local, or transformers' tokenizer
    text = "the cat sat " * 1000
    enc = encode_part(counting, text, Truncation(16, "right", False, "truncate"))
    assert counting.lengths == [len(text)] and enc == encoder.encode(text)


def test_the_character_limit_applies_without_truncation_only():
    check_chars(["a" * 32768], [0], 512, None, None)  # at the limit: tokenized
    with pytest.raises(TooManyChars) as info:
        check_chars(["short", "a" * 32769], [0, 1], 512, None, None)
    message = str(info.value)
    assert message.startswith("input 1 has 32769 characters, over the limit of 32768 characters (64 per token")
    assert '"truncate": true' in message
    check_chars(["a" * 10 ** 6], [0], 512, Truncation(512, "right", False, "truncate"), None)
    with pytest.raises(TooManyChars, match="over the limit of 100 characters of"):
        check_chars(["a" * 101], [0], 512, None, 100)


def test_large_texts_are_tokenized_off_the_event_loop(encoder):
    counting = Counting(encoder)

    async def encode(batch):
        counting.threads.clear()
        out = await encode_texts(counting, batch, list(range(len(batch))), 512, None)
        return out, set(counting.threads)

    small, on_loop = asyncio.run(encode(["a small text", "another"]))
    assert on_loop == {threading.current_thread().name} and len(small) == 2
    many = ["the cat sat on the mat " * 10] * 30  # 6900 characters in all, each text small
    large, off_loop = asyncio.run(encode(many))
    assert len(off_loop) == 1 and off_loop.pop().startswith("polyhead-tokenize")
    assert large == encode_rows(encoder, many, list(range(30)), 512, None)
    counting.lengths.clear()
    with pytest.raises(TooManyChars):  # refused before any text is tokenized
        asyncio.run(encode(["the cat"] + ["x" * 40_000]))
    assert counting.lengths == []


def test_the_cjk_boundaries_are_the_ideographs_the_tokenizer_isolates(encoder):
    def isolated(c: str) -> bool:  # "y" after it begins a word (not "##y", not inside one [UNK])
        return encoder.encode("x" + c + "y", offsets=True)["tokens"][-2] == "y"

    from serving.app.tokens import CJK

    for low, high in CJK:
        for c in (chr(low), chr((low + high) // 2), chr(high)):
            assert encoder.boundary.match(c) and isolated(c), hex(ord(c))
    for c in ("\U0002b820", "\U0002b91f", "\u3041", "\uac00", "\u0e01"):  # Python BERT's range only, kana, Hangul, Thai
        assert not encoder.boundary.match(c) and not isolated(c), hex(ord(c))
