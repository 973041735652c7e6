"""Long inputs over HTTP (serving/app/truncate.py): /v1/embeddings keeps to the base's sentence-transformers
max_seq_length (256 for the bundled MiniLM, whose BERT takes 512) and equals the library itself; over a route's
limit an input is a 413 naming `truncate`, or is cut as the tokenizer cuts when the request asks."""
from __future__ import annotations

import pytest
import torch

from adapters_store import BaseSchema

from ..adapter_factory import make_prefix, make_prompt
from ..conftest import minilm_path
from .conftest import ADMIN_KEY
from .test_kinds_http import close

BASE = "all-MiniLM-L6-v2"
# words the bundled tokenizer keeps whole (one token each): a text of n words is n + 2 tokens, and the first k
# words of it are exactly what a cut at k + 2 tokens keeps
WORDS = "the cat sat on mat while ada lived in london with her friend charles paris and john visited berlin".split()
PROSE = ("Ada Lovelace worked with Charles Babbage on the Analytical Engine, and her notes describe an algorithm "
         "for computing Bernoulli numbers; she is often regarded as the first computer programmer. ")


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


def st_encode(st, texts, max_seq_length=256, side="right") -> torch.Tensor:
    """SentenceTransformer.encode with the library's own truncation (its tokenizer's side and max_length)."""
    st.max_seq_length, st.tokenizer.truncation_side = max_seq_length, side
    try:
        return st.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    finally:
        st.max_seq_length, st.tokenizer.truncation_side = 256, "right"


def embed(client, inputs, **fields) -> tuple[torch.Tensor, dict]:
    r = client.post("/v1/embeddings", json={"model": BASE, "input": inputs, **fields})
    assert r.status_code == 200, r.text
    return torch.tensor([d["embedding"] for d in r.json()["data"]]), r.json()["usage"]


def assert_same_vectors(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9999


def too_long(r, limit: int) -> str:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_tokens" and error["type"] == "invalid_request_error"
    assert '"truncate": true' in error["message"] and f"limit of {limit}" in error["message"], error
    return error["message"]


# /v1/embeddings ---------------------------------------------------------------------------------

def test_long_texts_with_truncate_are_the_sentence_transformers_embeddings(client, st):
    texts = [words(298), PROSE * 12, words(598, start=3), "a short one"]
    lengths = [len(st.tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[0] == 300 and lengths[1] > 400 and lengths[2] == 600 and lengths[3] < 256
    got, usage = embed(client, texts, truncate=True)
    want = st_encode(st, texts)
    assert_same_vectors(got, want)
    assert usage["prompt_tokens"] == 3 * 256 + lengths[3]
    # the cut matters: 512 positions (what polyhead embedded before) give another vector
    assert not torch.allclose(got[1:2], st_encode(st, [texts[1]], max_seq_length=512), atol=1e-2)


@pytest.mark.parametrize("n_tokens", [257, 300, 402, 512, 600])
def test_without_truncate_inputs_over_max_seq_length_are_413_naming_truncate(client, n_tokens):
    r = client.post("/v1/embeddings", json={"model": BASE, "input": words(n_tokens - 2)})
    message = too_long(r, 256)
    assert f"has {n_tokens} tokens" in message and "max_seq_length" in message
    ids = [101] + [2000 + i % 50 for i in range(n_tokens - 2)] + [102]
    too_long(client.post("/v1/embeddings", json={"model": BASE, "input": ids}), 256)
    too_long(client.post("/v1/embeddings", json={"model": BASE, "input": words(n_tokens - 2), "truncate": False}),
             256)


def test_an_input_of_exactly_max_seq_length_tokens_is_embedded_as_the_library_does(client, st):
    text = words(254)
    got, usage = embed(client, text)
    assert usage["prompt_tokens"] == 256
    assert_same_vectors(got, st_encode(st, [text]))


def test_token_ids_are_cut_keeping_the_special_tokens_they_carry_else_plainly(client, st):
    text = PROSE * 12
    ids = st.tokenizer(text)["input_ids"]  # [CLS] ... [SEP], over 400 ids
    got, usage = embed(client, [ids], truncate=True)
    assert usage["prompt_tokens"] == 256
    assert_same_vectors(got, st_encode(st, [text]))
    plain = ids[1:-1]  # no special tokens: nothing to keep, the first 256 ids stay
    got, usage = embed(client, [plain], truncate=True)
    assert usage["prompt_tokens"] == 256
    assert_same_vectors(got, embed(client, [plain[:256]])[0])


def test_truncation_direction_left_keeps_the_last_tokens_as_the_library_with_that_side(client, st):
    text = words(400)
    got, _ = embed(client, text, truncate=True, truncation_direction="Left")  # TEI spells it so
    assert_same_vectors(got, st_encode(st, [text], side="left"))
    assert not torch.allclose(got, embed(client, text, truncate=True)[0], atol=1e-2)


def test_truncate_prompt_tokens_keeps_the_last_k_tokens_as_vllm(client, st):
    """vLLM: "if set to an integer k, will use only the last k tokens from the prompt"; a text is encoded by a
    tokenizer with truncation_side left and max_length k (its special tokens kept), token ids keep their last k;
    -1 is the limit."""
    text = PROSE * 12
    got, usage = embed(client, text, truncate_prompt_tokens=100)
    assert usage["prompt_tokens"] == 100
    assert_same_vectors(got, st_encode(st, [text], max_seq_length=100, side="left"))
    short = words(20)  # shorter than k: cut too, to its last k tokens
    got, usage = embed(client, short, truncate_prompt_tokens=10)
    assert usage["prompt_tokens"] == 10
    assert_same_vectors(got, st_encode(st, [short], max_seq_length=10, side="left"))
    got, usage = embed(client, text, truncate_prompt_tokens=-1)
    assert usage["prompt_tokens"] == 256
    assert_same_vectors(got, st_encode(st, [text], side="left"))
    ids = st.tokenizer(text)["input_ids"]
    got, usage = embed(client, [ids], truncate_prompt_tokens=50)
    assert usage["prompt_tokens"] == 50
    assert_same_vectors(got, embed(client, [ids[-50:]])[0])


@pytest.mark.parametrize("fields, says", [
    ({"truncate_prompt_tokens": 257}, "over the limit of 256"),
    ({"truncate_prompt_tokens": 0}, "-1 (the limit) or a positive count"),
    ({"truncate_prompt_tokens": -2}, "-1 (the limit) or a positive count"),
    ({"truncate_prompt_tokens": 1}, "no room"),  # [CLS] and [SEP] are kept
    ({"truncate_prompt_tokens": 100, "truncate": True}, "not both"),
    ({"truncate_prompt_tokens": 100, "truncation_direction": "left"}, "not both"),
    ({"truncate": "yes"}, "truncate"),
    ({"truncation_direction": "middle"}, "truncation_direction"),
])
def test_truncations_that_cannot_be_done_are_422(client, fields, says):
    r = client.post("/v1/embeddings", json={"model": BASE, "input": words(300), **fields})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_field" and says in r.json()["error"]["message"], r.text


# /v1/classify and /v1/tag -----------------------------------------------------------------------

def classify(client, model, text, **fields):
    r = client.post("/v1/classify", json={"model": model, "input": text, **fields})
    assert r.status_code == 200, r.text
    return {d["model"]: d for d in r.json()["data"]}


def tag(client, model, text, **fields):
    r = client.post("/v1/tag", json={"model": model, "input": text, **fields})
    assert r.status_code == 200, r.text
    return {d["model"]: d["entities"] for d in r.json()["data"]}


def same_entities(got, want):
    assert [{**e, "score": 0} for e in got] == [{**e, "score": 0} for e in want]
    assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-4)


def test_classify_with_truncate_equals_the_truncated_text_alone(client):
    text = words(700)
    too_long(client.post("/v1/classify", json={"model": "cls-a", "input": text}), 512)
    got = classify(client, ["cls-a", "ml"], text, truncate=True)
    want = classify(client, ["cls-a", "ml"], words(510))  # [CLS] + 510 words + [SEP]: 512
    for model in ("cls-a", "ml"):
        close(got[model]["logits"], torch.tensor(want[model]["logits"]))
    left = classify(client, "cls-a", text, truncate=True, truncation_direction="left")["cls-a"]
    close(left["logits"], torch.tensor(classify(client, "cls-a", words(510, start=190))["cls-a"]["logits"]))


def test_tag_with_truncate_equals_the_truncated_text_alone_with_its_offsets(client):
    text = words(700)
    too_long(client.post("/v1/tag", json={"model": "ner", "input": text}), 512)
    got = tag(client, ["ner", "ner-b"], text, truncate=True)
    want = tag(client, ["ner", "ner-b"], words(510))
    kept = len(words(510))
    for model in ("ner", "ner-b"):
        assert got[model] and max(e["end"] for e in got[model]) <= kept  # offsets into the kept part of the text
        same_entities(got[model], want[model])
    # left: the kept tokens' offsets are where those words stand in the whole text
    got = tag(client, "ner", text, truncate_prompt_tokens=-1)["ner"]
    start = len(text) - len(words(510, start=190))
    alone = tag(client, "ner", words(510, start=190))["ner"]
    same_entities(got, [{**e, "start": e["start"] + start, "end": e["end"] + start} for e in alone])
    assert all(text[e["start"]:e["end"]] == e["word"] for e in got)


@pytest.fixture(scope="module")
def virtual(tmp_path_factory, client):
    """A prompt-tuning classifier (12 virtual tokens) and a prefix-tuning tagger (5), registered over HTTP."""
    schema = BaseSchema.from_config_dir(minilm_path())
    root = tmp_path_factory.mktemp("long-virtual")
    folders = {"long-prompt": make_prompt(root / "p", schema, seed=61, n_virtual=12, head="SEQ_CLS", num_labels=2),
               "long-prefix": make_prefix(root / "x", schema, seed=62, n_virtual=5, head="TOKEN_CLS", num_labels=5)}
    for name, folder in folders.items():
        r = client.post("/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        json={"name": name, "source": str(folder)})
        assert r.status_code == 201, r.text
    return folders


def test_truncate_cuts_an_adapters_rows_so_that_its_virtual_tokens_fit(client, virtual):
    """512 positions: a prompt adapter's row keeps 500 tokens, a prefix adapter's 507, beside a LoRA row of the
    same text that keeps 512; each equals its truncated text run alone."""
    text = words(700)
    r = client.post("/v1/classify", json={"model": "long-prompt", "input": words(505)})
    assert "virtual tokens" in too_long(r, 500)
    got = classify(client, ["cls-a", "long-prompt"], text, truncate=True)
    close(got["cls-a"]["logits"], torch.tensor(classify(client, "cls-a", words(510))["cls-a"]["logits"]))
    close(got["long-prompt"]["logits"],
          torch.tensor(classify(client, "long-prompt", words(498))["long-prompt"]["logits"]))
    got = tag(client, ["ner", "long-prefix"], text, truncate=True)
    same_entities(got["ner"], tag(client, "ner", words(510))["ner"])
    same_entities(got["long-prefix"], tag(client, "long-prefix", words(505))["long-prefix"])
    assert max(e["end"] for e in got["long-prefix"]) <= len(words(505))
    got = tag(client, "long-prefix", text, truncate_prompt_tokens=-1)["long-prefix"]  # left: the last 505 words
    start = len(text) - len(words(505, start=195))
    alone = tag(client, "long-prefix", words(505, start=195))["long-prefix"]
    same_entities(got, [{**e, "start": e["start"] + start, "end": e["end"] + start} for e in alone])
