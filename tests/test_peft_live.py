"""Against the real PEFT library, live: adapters the fixtures do not cover (pooler targets, regex targets,
rank/alpha patterns, DoRA with rsLoRA, token heads with labels), built, saved and run by PEFT itself."""
from __future__ import annotations

import json

import pytest
import torch

from serving import Engine, Request

from .conftest import minilm_path

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi!", "Refunds take five business days to process."]


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.normal_(0, p.shape[-1] ** -0.5, generator=g)
            elif "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.normal_(0, 0.3, generator=g)


CONFIGS = {
    "pooler_and_dense_regex": dict(task="SEQ_CLS", labels=3, lora=dict(
        r=4, lora_alpha=8, target_modules=r".*(dense|query)$")),
    "patterns_rslora_dora": dict(task="SEQ_CLS", labels=2, lora=dict(
        r=8, lora_alpha=16, target_modules=["query", "value", "intermediate.dense"], use_rslora=True, use_dora=True,
        rank_pattern={"layer.3.attention.self.query": 2}, alpha_pattern={r"layer\.[0-2]\.attention\.self\.value": 3})),
    "token_head_with_labels": dict(task="TOKEN_CLS", labels=4, lora=dict(
        r=6, lora_alpha=12, target_modules=["key", "output.dense"], layers_to_transform=[0, 5])),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_matches_peft(name, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    spec = CONFIGS[name]
    auto = AutoModelForSequenceClassification if spec["task"] == "SEQ_CLS" else AutoModelForTokenClassification
    labels = [f"tag{i}" for i in range(spec["labels"])]
    base = auto.from_pretrained(str(minilm_path()), num_labels=spec["labels"],
                                id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = get_peft_model(base, LoraConfig(task_type=spec["task"], **spec["lora"]))
    randomize(model, seed=len(name))
    model.save_pretrained(str(tmp_path))
    base.config.save_pretrained(str(tmp_path))  # config.json beside the adapter: the labels
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=2)
    eng.load_adapter(name, tmp_path)
    results = eng.infer([Request(adapter=name, text=t) for t in TEXTS] + [Request(text=TEXTS[0])])
    with torch.no_grad():
        for text, res in zip(TEXTS, results):
            enc = tok(text, return_tensors="pt")
            want = model(**enc).logits[0]
            assert res.error is None, res.error
            torch.testing.assert_close(res.logits, want, atol=1e-4, rtol=1e-4)
            assert res.labels == tuple(labels)
    assert results[-1].logits is None and results[-1].error is None
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"


@pytest.mark.parametrize("base, targets", [("tiny-gpt2", ["c_attn", "mlp.c_proj"]), ("tiny-llama", ["q_proj", "down_proj", "lm_head"])])
def test_causal_dora_matches_peft(base, targets, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .conftest import base_path

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_path(base))),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                      fan_in_fan_out=base == "tiny-gpt2"))
    randomize(model, seed=3)
    model.save_pretrained(str(tmp_path))
    model.eval()
    eng = Engine.from_pretrained(str(base_path(base)), max_slots=2)
    eng.load_adapter("dora", tmp_path)
    prompts = [[5, 17, 99, 3], [200, 7, 41]]
    results = eng.infer([Request(adapter="dora", input_ids=p) for p in prompts] + [Request(input_ids=prompts[0])])
    with torch.no_grad():
        for p, res in zip(prompts, results):
            want = model(input_ids=torch.tensor([p])).logits[0]
            torch.testing.assert_close(res.logits, want, atol=1e-4, rtol=1e-4)
        with model.disable_adapter():
            torch.testing.assert_close(results[2].logits, model(input_ids=torch.tensor([prompts[0]])).logits[0],
                                       atol=1e-4, rtol=1e-4)
    assert (results[0].logits - results[2].logits).abs().max() > 1e-2
    if "lm_head" in targets:  # PEFT saved lm_head.base_layer.weight: a changed copy must be refused
        from safetensors.torch import load_file, save_file

        from adapters_store import AdapterError

        path = tmp_path / "adapter_model.safetensors"
        tensors = load_file(str(path))
        key = next(k for k in tensors if k.endswith("lm_head.base_layer.weight"))
        tensors[key] = tensors[key] + 0.01
        save_file(tensors, str(path))
        with pytest.raises(AdapterError, match="changed copy of base layer 'lm_head'"):
            eng.load_adapter("tampered", tmp_path)
