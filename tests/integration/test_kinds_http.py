"""Every adapter kind over HTTP: registered through the admin route, served together in multi-task calls."""
from __future__ import annotations

import pytest
import torch

from adapters_store import BaseSchema
from serving import Engine

from ..adapter_factory import make_bottleneck, make_ia3, make_prefix, make_prompt
from ..conftest import minilm_path
from .conftest import ADMIN_KEY
from .test_serving import TEXTS, alone, close, expected_entities


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, client):
    """Adapters of the new kinds, published through POST /v1/adapters; the same folders in a local engine."""
    schema = BaseSchema.from_config_dir(minilm_path())
    root = tmp_path_factory.mktemp("http-kinds")
    folders = {
        "k-ia3": make_ia3(root / "ia3", schema, seed=41, head="SEQ_CLS", num_labels=3),
        "k-prompt": make_prompt(root / "prompt", schema, seed=42, n_virtual=12, head="SEQ_CLS", num_labels=2),
        "k-prefix": make_prefix(root / "prefix", schema, seed=43, n_virtual=5, head="TOKEN_CLS", num_labels=5),
        "k-bn-ml": make_bottleneck(root / "bn", schema, seed=44, head="multilabel_classification", num_labels=4),
        "k-bn-tag": make_bottleneck(root / "bnt", schema, seed=45, arch="double_seq_bn", head="tagging",
                                    num_labels=5, head_layers=1),
    }
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=8)
    for name, folder in folders.items():
        r = client.post("/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={"name": name, "source": str(folder)})
        assert r.status_code == 201, r.text
        eng.load_adapter(name, folder)
    return eng


def test_classify_with_every_sequence_kind_in_one_call(client, kinds):
    models = ["k-ia3", "k-prompt", "k-bn-ml"]
    r = client.post("/v1/classify", json={"model": models, "input": TEXTS[:3]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert sorted((d["index"], d["model"]) for d in data) == sorted((i, m) for i in range(3) for m in models)
    for d in data:
        res = alone(kinds, d["model"], TEXTS[d["index"]])
        close(d["logits"], res.logits)
        if d["model"] == "k-bn-ml":  # AdapterHub multi-label head: sigmoid probs
            close(d["probs"], torch.sigmoid(res.logits))
        else:
            close(d["probs"], torch.softmax(res.logits, -1))


def test_tag_with_prefix_and_bottleneck_taggers(client, kinds):
    r = client.post("/v1/tag", json={"model": ["k-prefix", "k-bn-tag"], "input": TEXTS[1]})
    assert r.status_code == 200, r.text
    for d in r.json()["data"]:
        want = expected_entities(kinds, d["model"], TEXTS[1])
        assert [{**e, "score": 0} for e in d["entities"]] == [{**e, "score": 0} for e in want], d["model"]
        assert [e["score"] for e in d["entities"]] == pytest.approx([e["score"] for e in want], abs=1e-4)


def test_input_too_long_for_a_prompt_adapter_is_413(client, kinds):
    """512 positions, 12 virtual tokens: an input of 505 tokens fits the base alone but not with the prompt."""
    text = " ".join(["word"] * 503)  # + [CLS] and [SEP]: 505 tokens
    assert client.post("/v1/classify", json={"model": "k-ia3", "input": text}).status_code == 200
    r = client.post("/v1/classify", json={"model": "k-prompt", "input": text})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_many_tokens"
    assert "virtual" in r.json()["error"]["message"]
