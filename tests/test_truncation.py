"""serving/truncation.py: cutting an encoding equals the tokenizer's own truncation (transformers, live)."""
from __future__ import annotations

import json

import pytest

from serving.truncation import Ends, cut, kept_positions

from .conftest import minilm_path

TEXTS = ["Ada Lovelace worked with Charles Babbage on the Analytical Engine in London. " * 12,
         "antidisestablishmentarianism " * 40, "a [SEP] literal special token in the text [CLS] " * 20,
         "short one"]
LIMITS = [2, 3, 4, 17, 64, 128, 129, 255, 256]


def tokenizer(template: str, side: str):
    """The bundled MiniLM tokenizer with a post-processor for `template`: "bert" ([CLS] text [SEP], its own),
    "bos" ([CLS] text: a Llama-like BOS only) or "none" (GPT-2-like: no special tokens)."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((minilm_path() / "tokenizer.json").read_text())
    spec["truncation"] = spec["padding"] = None
    if template == "bos":
        spec["post_processor"] = {"type": "TemplateProcessing",
                                  "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                                             {"Sequence": {"id": "A", "type_id": 0}}],
                                  "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                                  "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [101], "tokens": ["[CLS]"]}}}
    elif template == "none":
        spec["post_processor"] = None
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), truncation_side=side,
                                   cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")


def ends_of(tok) -> Ends:
    return Ends.of(tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("template, head, tail", [("bert", 1, 1), ("bos", 1, 0), ("none", 0, 0)])
def test_cutting_an_encoding_equals_the_tokenizers_truncation(template, head, tail, side):
    tok = tokenizer(template, side)
    ends = ends_of(tok)
    assert (len(ends.head), len(ends.tail)) == (head, tail)
    checked = 0
    for text in TEXTS:
        full = tok(text)["input_ids"]
        assert ends.kept(full) == (head, tail)
        for limit in LIMITS:
            if limit < head + tail + 1:
                continue  # transformers then warns and answers the whole input
            want = tok(text, truncation=True, max_length=limit)["input_ids"]
            assert cut(full, limit, head, tail, side) == want, (template, side, limit, text[:30])
            checked += len(full) > limit
    assert checked > 20  # most cases did cut


def test_the_bundled_tokenizer_keeps_cls_and_sep_and_sentence_transformers_cuts_the_same():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    text = TEXTS[0] * 2
    tok = model.tokenizer
    full = tok(text)["input_ids"]
    ends = ends_of(tok)
    assert ends == Ends((101,), (102,)) and model.max_seq_length == 256 and len(full) > 300
    features = model.preprocess([text])  # what encode() feeds the model
    assert features["input_ids"][0].tolist() == cut(full, 256, 1, 1, "right")


def test_ids_without_the_templates_ends_are_cut_plainly():
    ends = Ends((101,), (102,))
    assert ends.kept([101, 5, 6, 102]) == (1, 1)
    assert ends.kept([5, 6, 7, 8]) == (0, 0) and ends.kept([101, 5, 6]) == (0, 0) and ends.kept([102]) == (0, 0)
    assert cut([5, 6, 7, 8], 2, *ends.kept([5, 6, 7, 8])) == [5, 6]
    assert cut([5, 6, 7, 8], 2, 0, 0, "left") == [7, 8]  # vLLM's truncate_prompt_tokens on token ids


def test_a_limit_without_room_for_the_ends_cannot_cut_and_a_fitting_input_stays():
    assert cut([101, 5, 6, 102], 1, 1, 1) is None
    assert cut([101, 5, 6, 102], 2, 1, 1) == [101, 102]  # as transformers with max_length=2
    assert cut([101, 5, 102], 3, 1, 1) == [101, 5, 102]
    assert kept_positions(6, 4, 1, 1, "left") == [0, 3, 4, 5]
    with pytest.raises(ValueError, match="side"):
        cut([1, 2, 3], 2, side="middle")
