"""The shipped demo adapters (deploy/demo_adapters/) load through the engine and give sensible answers.

No training here: the adapters were trained by deploy/demo_adapters/train.py on the real MiniLM base.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from serving import Engine, Request

from .conftest import minilm_path

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo_adapters"
SENTIMENT, NER = DEMO / "sentiment", DEMO / "ner"
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")

POSITIVE = [
    "I absolutely loved this movie, the acting was wonderful.",
    "The staff were friendly and the room was spotless.",
    "Great value and fast shipping, highly recommended!",
    "What a fantastic concert, we had the best time.",
]
NEGATIVE = [
    "The service was slow and the food was cold.",
    "This was the worst purchase I have ever made.",
    "The plot made no sense and the dialogue was awful.",
    "I regret buying this laptop, it broke after a week.",
]
NER_CASES = [
    ("Angela Merkel met Tim Cook at Apple headquarters in Cupertino.",
     {("angela merkel", "PER"), ("tim cook", "PER"), ("apple", "ORG"), ("cupertino", "LOC")}),
    ("Sundar Pichai announced that Google will open a new office in Nairobi.",
     {("sundar pichai", "PER"), ("google", "ORG"), ("nairobi", "LOC")}),
    ("John Smith flew from Paris to Chicago to meet executives of Boeing.",
     {("john smith", "PER"), ("paris", "LOC"), ("chicago", "LOC"), ("boeing", "ORG")}),
    ("Emily Watson works for Amazon in Seattle.",
     {("emily watson", "PER"), ("amazon", "ORG"), ("seattle", "LOC")}),
]


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=4)
    eng.load_adapter("sentiment", SENTIMENT)
    eng.load_adapter("ner", NER)
    return eng


@pytest.mark.parametrize("folder", [SENTIMENT, NER], ids=["sentiment", "ner"])
def test_folders_hold_only_safetensors_and_json(folder):
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "config.json"], names
    assert (folder / "adapter_model.safetensors").stat().st_size < 1024**2
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8


def test_labels_come_from_config_json(engine):
    for name, folder, task in (("sentiment", SENTIMENT, "seq_cls"), ("ner", NER, "token_cls")):
        cfg = json.loads((folder / "config.json").read_text())
        want = tuple(cfg["id2label"][str(i)] for i in range(cfg["num_labels"]))
        assert {label: i for i, label in enumerate(want)} == cfg["label2id"]
        spec = engine.adapters()[name]
        assert spec.head.task == task and spec.head.labels == want
    assert engine.adapters()["sentiment"].head.labels == ("negative", "positive")
    assert engine.adapters()["ner"].head.labels == NER_LABELS


def test_sentiment_argmax(engine):
    texts = POSITIVE + NEGATIVE
    res = engine.infer([Request(adapter="sentiment", text=t) for t in texts])
    for text, r in zip(texts, res):
        assert r.error is None and r.task == "seq_cls" and r.logits.shape == (2,)
        got = r.labels[int(r.logits.argmax())]
        assert got == ("positive" if text in POSITIVE else "negative"), (text, got, r.logits)


def _entities(tokenizer, text: str, logits: torch.Tensor, labels) -> set[tuple[str, str]]:
    """Merge per-token BIO argmax into (lowercased surface text, type) using the tokenizer's offsets."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    assert len(enc["input_ids"]) == logits.shape[0]  # logits for every token, [CLS]/[SEP] included
    tags = [labels[i] for i in logits.argmax(-1).tolist()]
    ents, cur = [], None
    for (s, e), tag in zip(enc["offset_mapping"], tags):
        if s == e or tag == "O":  # special tokens have empty offsets
            cur = None
            continue
        kind = tag[2:]
        if tag.startswith("B-") or cur is None or cur[2] != kind:
            cur = [s, e, kind]
            ents.append(cur)
        else:
            cur[1] = e
    return {(text[s:e].lower(), kind) for s, e, kind in ents}


def test_ner_entities(engine):
    texts = [t for t, _ in NER_CASES]
    res = engine.infer([Request(adapter="ner", text=t) for t in texts])
    for (text, want), r in zip(NER_CASES, res):
        assert r.error is None and r.task == "token_cls" and r.logits.shape[1] == len(NER_LABELS)
        assert _entities(engine.tokenizer, text, r.logits, r.labels) == want, text


def test_mixed_batch_matches_single_adapter_batches(engine):
    """Both adapters and a base row in one forward give the same logits as separate calls."""
    reqs = [Request(adapter="ner", text=NER_CASES[0][0]), Request(adapter="sentiment", text=POSITIVE[0]),
            Request(adapter=None, text=NEGATIVE[0]), Request(adapter="sentiment", text=NEGATIVE[1])]
    mixed = engine.infer(reqs)
    for req, m in zip(reqs, mixed):
        alone = engine.infer([req])[0]
        if req.adapter is None:
            assert m.logits is None and alone.logits is None
        else:
            torch.testing.assert_close(m.logits, alone.logits, rtol=1e-4, atol=1e-4)
