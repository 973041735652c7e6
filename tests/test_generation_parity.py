"""Greedy generation against the real PEFT library, token for token, on the fixtures' tiny causal bases.

PEFT builds every adapter kind (LoRA, rsLoRA, DoRA, AdaLoRA, IA3, prompt tuning, P-tuning, prefix tuning),
every adapter parameter set to seeded random values, and saves it; the reference is a greedy loop of FULL
forwards of the PEFT model (no KV cache: PEFT 0.21+'s generate() on transformers 5 drops prefix-tuning keys/values,
so it is not a reference for prefix rows). polyhead runs all kinds and base rows in one `generate` call, and
through the incremental interface with sequences joining at different steps.

Ties: a generated token may differ from the reference only where the reference's top-2 logit gap at that step is
under TIE (a numerical tie, where float rounding may pick either); the sequence is compared up to that step only
(after it the two continuations legitimately part). At most one such tie is allowed per test.
"""
from __future__ import annotations

import pytest
import torch
from peft import (AdaLoraConfig, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                  PromptTuningConfig)
from transformers import AutoModelForCausalLM

from serving import Engine, Request, SamplingParams

from .conftest import base_path, fixtures_root
from .test_kinds_live import IA3_CONFIGS, build, causal

TIE = 1e-3
PROMPTS = [[5], [17, 99, 3, 250], [200, 7, 41, 8, 9, 10, 11, 12, 13], [300 + i for i in range(23)], [42, 43]]
NEW = 10


@torch.no_grad()
def reference(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of a full forward per step, and the top-2 logit gap at each step."""
    out, gaps = [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + out]), attention_mask=torch.ones(1, len(ids) + len(out),
                                                                                      dtype=torch.long)).logits[0, -1]
        top = logits.float().topk(2).values
        gaps.append(float(top[0] - top[1]))
        out.append(int(logits.argmax()))
    return out, gaps


def compare(got: list[int], want: tuple[list[int], list[float]], what: str) -> int:
    """Assert got == want up to a numerical tie; returns the number of ties met (0 or 1)."""
    tokens, gaps = want
    assert len(got) == len(tokens), f"{what}: {len(got)} tokens, want {len(tokens)}"
    for k, (a, b) in enumerate(zip(got, tokens)):
        if a != b:
            assert gaps[k] < TIE, f"{what}: token {k} is {a}, PEFT's greedy {b} (top-2 gap {gaps[k]:.3g}): {got} vs {tokens}"
            return 1
    return 0


def kinds(base: str) -> dict:
    attn = ["c_attn"] if base == "tiny-gpt2" else ["q_proj", "v_proj"]
    mlp = ["c_attn", "mlp.c_proj"] if base == "tiny-gpt2" else ["q_proj", "k_proj", "o_proj", "down_proj"]
    ff = dict(fan_in_fan_out=base == "tiny-gpt2")
    return {
        "lora": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=mlp, **ff),
        "rslora": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=4, target_modules=attn, use_rslora=True, **ff),
        "dora": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=attn, use_dora=True, **ff),
        "adalora": AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=4, lora_alpha=8, target_modules=attn,
                                 total_step=10, **ff),
        "ia3": IA3Config(task_type="CAUSAL_LM", **IA3_CONFIGS[base]),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=24),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True,
                                     encoder_hidden_size=24),
    }


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def adapters(request, tmp_path_factory):
    """base name, PEFT models by adapter name (None: the plain base), their saved folders."""
    base = request.param
    root = tmp_path_factory.mktemp(f"gen-{base}")
    models, folders = {None: causal(base)}, {}
    for seed, (name, config) in enumerate(kinds(base).items()):
        models[name] = build(causal(base), config, seed=70 + seed, folder=root / name)
        folders[name] = root / name
    return base, models, folders


def engine_with(base: str, folders: dict, **limits) -> Engine:
    eng = Engine.from_pretrained(str(base_path(base)), **limits)
    for name, folder in folders.items():
        eng.load_adapter(name, folder)
    return eng


def test_every_kind_and_base_rows_in_one_generate_call_match_peft(adapters):
    base, models, folders = adapters
    eng = engine_with(base, folders, max_slots=16, max_step_tokens=24)  # prefill in chunks beside decodes
    names = [None, *folders]
    rows = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(2 * len(names))]
    results = eng.generate([Request(adapter=n, input_ids=p, max_new_tokens=NEW) for n, p in rows])
    ties = 0
    for (name, ids), res in zip(rows, results):
        assert res.error is None, res.error
        assert res.finish_reason == "length"
        ties += compare(res.token_ids, reference(models[name], ids, NEW), f"{base} {name} prompt {len(ids)}")
    assert ties <= 1
    # every adapter changes what is generated (a test of nothing would pass with zero weights)
    plain = {tuple(ids): res.token_ids for (name, ids), res in zip(rows, results) if name is None}
    for (name, ids), res in zip(rows, results):
        if name is not None and tuple(ids) in plain:
            assert res.token_ids != plain[tuple(ids)] or name in ("ia3",), f"{base} {name}: same tokens as the base"


def test_sequences_joining_at_different_steps_match_peft(adapters):
    base, models, folders = adapters
    eng = engine_with(base, folders, max_slots=16, max_step_tokens=16)
    gen = eng.generator()
    names = [None, *folders]
    plan = [(step, names[(step * 5 + k) % len(names)], PROMPTS[(step + k) % len(PROMPTS)])
            for step in (0, 1, 3, 6) for k in range(3)]  # 3 sequences join at steps 0, 1, 3 and 6
    seqs, step = [], 0
    while step < 6 or gen.has_work():
        for s, name, ids in plan:
            if s == step:
                seqs.append((name, ids, gen.add(Request(adapter=name, input_ids=ids, max_new_tokens=NEW))))
        gen.step()
        step += 1
    ties = 0
    for name, ids, seq in seqs:
        assert seq.finished and seq.error is None
        ties += compare(seq.output, reference(models[name], ids, NEW), f"{base} {name} joined, prompt {len(ids)}")
    assert ties <= 1


@pytest.mark.parametrize("case", ["tiny_llama_lora_qv", "tiny_llama_lora_all", "tiny_llama_ia3", "tiny_gpt2_lora",
                                  "tiny_gpt2_lora_attn", "tiny_gpt2_ia3"])
def test_fixture_adapters_generate_as_peft(case):
    """The shared fixtures' causal adapters (made by the real PEFT), loaded live by PEFT for the reference."""
    folder = fixtures_root() / "cases" / case / "adapter"
    base = "tiny-llama" if case.startswith("tiny_llama") else "tiny-gpt2"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_path(base))), str(folder)).eval()
    eng = engine_with(base, {case: folder}, max_slots=2)
    logprobs = SamplingParams(logprobs=0)  # still greedy; the chosen tokens' logprobs show the adapter's effect
    plain = eng.generate([Request(input_ids=PROMPTS[2], max_new_tokens=NEW, sampling=logprobs)])[0]
    results = eng.generate([Request(adapter=case, input_ids=p, max_new_tokens=NEW, sampling=logprobs)
                            for p in PROMPTS[1:4]])
    ties = sum(compare(r.token_ids, reference(model, p, NEW), f"{case} prompt {len(p)}")
               for p, r in zip(PROMPTS[1:4], results))
    assert ties <= 1
    first = abs(results[1].logprobs[0].logprob - plain.logprobs[0].logprob)
    assert results[1].token_ids != plain.token_ids or first > 1e-3, f"{case}: the adapter changes nothing"
