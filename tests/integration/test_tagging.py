"""serving/app/tagging.py: /v1/tag's aggregation strategies, on hand-made tokens and against transformers' own
token-classification pipeline on the shipped NER adapter (merged into the base by PEFT)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import Engine, Request
from serving.app.tagging import STRATEGIES, Piece, pieces, tag_entities
from serving.app.tokens import TextEncoder
from tests.conftest import minilm_path

NER = Path(__file__).resolve().parents[2] / "deploy" / "demo_adapters" / "ner"
LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
TEXT = "Ada Lovelace in London"


def probs(**named) -> list[float]:
    """A probability row over LABELS: the named ones, the rest of the mass spread evenly."""
    row = [named.get(label.replace("-", "_"), 0.0) for label in LABELS]
    rest = [i for i, label in enumerate(LABELS) if label.replace("-", "_") not in named]
    for i in rest:
        row[i] = (1 - sum(row)) / len(rest)
    return row


# ada | love ##lace | in | london: "##lace" disagrees with "love", and is surer of itself
TOKENS = [
    Piece(1, probs(B_PER=0.9), 0, 3, False),
    Piece(2, probs(I_PER=0.6, O=0.3), 4, 8, False),
    Piece(3, probs(O=0.8, I_PER=0.15), 8, 12, True),
    Piece(4, probs(O=0.95), 13, 15, False),
    Piece(5, probs(B_LOC=0.97), 16, 22, False),
]


def spans(entities):
    return [(e["entity"], e["start"], e["end"], e["word"]) for e in entities]


@pytest.mark.parametrize("strategy, expected", [
    ("simple", [("PER", 0, 8, "Ada Love"), ("LOC", 16, 22, "London")]),  # tokens as they are
    ("first", [("PER", 0, 12, "Ada Lovelace"), ("LOC", 16, 22, "London")]),  # the word takes "love"'s label
    ("max", [("PER", 0, 3, "Ada"), ("LOC", 16, 22, "London")]),  # ... "##lace"'s (0.8 > 0.6): O
    ("average", [("PER", 0, 3, "Ada"), ("LOC", 16, 22, "London")]),  # mean: O 0.55, I-PER 0.375
])
def test_strategies_label_words_as_the_pipeline_defines_them(strategy, expected):
    assert spans(tag_entities(TOKENS, LABELS, TEXT, strategy)) == expected


def test_word_scores_and_the_none_strategy():
    first = tag_entities(TOKENS, LABELS, TEXT, "first")
    assert first[0]["score"] == pytest.approx((0.9 + 0.6) / 2)  # the words' scores: "Ada" 0.9, "Lovelace" 0.6
    average = tag_entities(TOKENS, LABELS, TEXT, "average")
    assert average[0]["score"] == pytest.approx(0.9)
    none = tag_entities(TOKENS, LABELS, TEXT, "none")
    assert [(e["entity"], e["index"], e["word"]) for e in none] == [
        ("B-PER", 1, "Ada"), ("I-PER", 2, "Love"), ("B-LOC", 5, "London")]
    with pytest.raises(ValueError, match="unknown aggregation strategy"):
        tag_entities(TOKENS, LABELS, TEXT, "longest")


def test_which_tokens_continue_a_word():
    enc = TextEncoder(minilm_path())
    text = "Ada Lovelace 🎉 visited Kuala-Lumpur"
    e = enc.encode(text, offsets=True)
    rows = [[1.0]] * len(e["input_ids"])
    found = pieces(rows, e["offset_mapping"], e["tokens"], e["input_ids"], text, enc.subword_prefix, enc.unk_id)
    got = [(text[p.start:p.end], p.subword) for p in found]
    assert ("##" == enc.subword_prefix) and ("lace", True) in got and ("Love", False) in got
    assert ("🎉", False) in got  # [UNK]: a word of its own
    assert ("-", False) in got  # punctuation is a word for WordPiece
    fallback = TextEncoder(minilm_path())
    fallback._use_transformers()  # the ingress's tokenizer when tokenizer.json differs from the model's
    f = fallback.encode(text, offsets=True)
    assert (f["tokens"], fallback.subword_prefix, fallback.unk_id) == (e["tokens"], "##", enc.unk_id)
    no_prefix = pieces(rows, e["offset_mapping"], e["tokens"], e["input_ids"], text, None, enc.unk_id)
    assert [(text[p.start:p.end], p.subword) for p in no_prefix if text[p.start:p.end] in ("lace", "-", "Lumpur")] \
        == [("lace", True), ("-", True), ("Lumpur", True)]  # without a prefix: no space before it, a subword


NER_TEXTS = [
    "Angela Merkel met Tim Cook at Apple headquarters in Cupertino.",
    "Jean-Luc Picard works for Starfleet in San Francisco.",
    "Ünsal Özdemir 🎉 met José Müller at Siemens in München.",
    "Schwarzenegger visited Kuala Lumpur and Wolfsburg with Volkswagen executives.",
    "Tchaikovskyesque melodies filled the Rijksmuseum in Amsterdam.",
]


@pytest.fixture(scope="module")
def ner_engine():
    engine = Engine.from_pretrained(str(minilm_path()), max_slots=1)
    engine.load_adapter("ner", NER)
    return engine


@pytest.fixture(scope="module")
def reference_pipeline(ner_engine):
    """transformers' token-classification pipeline on the NER adapter merged into the base by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    labels = list(ner_engine.adapters()["ner"].head.labels)
    base = AutoModelForTokenClassification.from_pretrained(
        str(minilm_path()), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)}, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(NER)).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer, device="cpu")
    return lambda text, strategy: ner(text, aggregation_strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_transformers_pipeline_on_the_demo_ner_adapter(reference_pipeline, ner_engine,
                                                                               strategy):
    engine = ner_engine
    enc = TextEncoder(minilm_path())
    differ = 0
    for text in NER_TEXTS:
        e = enc.encode(text, offsets=True)
        res = engine.infer([Request(adapter="ner", input_ids=e["input_ids"])])[0]
        rows = torch.softmax(res.logits.double(), -1).tolist()
        found = pieces(rows, e["offset_mapping"], e["tokens"], e["input_ids"], text, enc.subword_prefix, enc.unk_id)
        got = tag_entities(found, res.labels, text, strategy)
        want = reference_pipeline(text, strategy)
        group = "entity" if strategy == "none" else "entity_group"
        assert [(g["entity"], g["start"], g["end"]) for g in got] == \
            [(w[group], w["start"], w["end"]) for w in want], (strategy, text)
        assert [g["score"] for g in got] == pytest.approx([float(w["score"]) for w in want], abs=1e-4)
        if strategy == "none":
            assert [g["index"] for g in got] == [w["index"] for w in want]
        differ += spans(got) != spans(tag_entities(found, res.labels, text, "simple"))
    if strategy in ("first", "max", "average"):
        assert differ, f"{strategy} gave 'simple''s entities on every text (this checks little)"
