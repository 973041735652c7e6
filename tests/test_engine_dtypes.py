"""dtype="auto" and 16-bit engines: every adapter kind in one bfloat16 batch equals its separate bfloat16 run
and stays close to the float32 engine's answer."""
from __future__ import annotations

import pytest
import torch

from adapters_store import BaseSchema
from serving import Engine, Request
from serving.engine import auto_dtype

from .adapter_factory import make_bottleneck, make_ia3, make_lora, make_prefix, make_prompt
from .conftest import minilm_path

SENTENCES = [
    [101, 7592, 2088, 102],
    [101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102],
    [101, 2023, 2003, 1037, 2936, 6251, 2008, 2038, 2062, 19204, 2015, 1999, 2009, 1012, 102],
    [101, 2204, 2851, 2000, 2017, 2035, 102],
]


@pytest.mark.parametrize("amx,avx512_bf16,want", [(True, True, "bfloat16"), (True, False, "bfloat16"),
                                                  (False, True, "bfloat16"), (False, False, "float32")])
def test_auto_is_bfloat16_on_cpus_that_multiply_it_natively_else_float32(monkeypatch, amx, avx512_bf16, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert auto_dtype("cpu") == want
    assert auto_dtype(torch.device("cpu")) == want


@pytest.mark.parametrize("bf16,want", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_cuda_is_bfloat16_where_supported_else_float16(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_dtype("cuda") == want
    assert auto_dtype("meta") == "float32"


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    schema = BaseSchema.from_config_dir(minilm_path())
    root = tmp_path_factory.mktemp("kinds16")
    return {
        "lora": make_lora(root / "lora", schema, seed=11, r=16, head="SEQ_CLS", num_labels=3,
                          targets=("query", "key", "value", "dense")),
        "dora": make_lora(root / "dora", schema, seed=12, r=4, dora=True, head="SEQ_CLS", num_labels=2),
        "tagger": make_lora(root / "tagger", schema, seed=13, r=8, head="TOKEN_CLS", num_labels=5),
        "ia3": make_ia3(root / "ia3", schema, seed=14, head="SEQ_CLS", num_labels=2),
        "bottleneck": make_bottleneck(root / "bn", schema, seed=15, head="classification", num_labels=2),
        "prompt": make_prompt(root / "prompt", schema, seed=16, n_virtual=6, head="SEQ_CLS", num_labels=2),
        "prefix": make_prefix(root / "prefix", schema, seed=17, n_virtual=5),
    }


def engine(kinds, dtype):
    eng = Engine.from_pretrained(str(minilm_path()), dtype=dtype, max_slots=len(kinds))
    for name, path in kinds.items():
        eng.load_adapter(name, path)
    return eng


def test_a_bfloat16_mixed_batch_of_every_kind_equals_separate_runs_and_float32(kinds):
    bf16, fp32 = engine(kinds, "bfloat16"), engine(kinds, "float32")
    assert bf16.dtype == torch.bfloat16
    cycle = [None, *kinds]
    rows = [Request(adapter=cycle[i % len(cycle)], input_ids=SENTENCES[i % len(SENTENCES)])
            for i in range(2 * len(cycle) + 1)]
    mixed = bf16.infer(rows)
    for req, got in zip(rows, mixed):
        what = f"row {req.adapter} {req.input_ids[:3]}"
        assert got.error is None, f"{what}: {got.error}"
        [alone] = bf16.infer([req])
        [exact] = fp32.infer([req])
        assert got.embedding.dtype == torch.float32 and got.embedding.shape == exact.embedding.shape
        # the same bfloat16 model batched or alone: only padding and summation order differ
        torch.testing.assert_close(got.embedding, alone.embedding, atol=4e-2, rtol=4e-2, msg=lambda m: f"{what}: {m}")
        cos = torch.nn.functional.cosine_similarity(got.embedding, exact.embedding, dim=0).item()
        assert cos > 0.999, f"{what}: cosine {cos} to the float32 engine"
        if exact.logits is None:
            assert got.logits is None, what
            continue
        assert got.logits.dtype == torch.float32 and got.logits.shape == exact.logits.shape, what
        # CPUs without native bfloat16 (no AMX/AVX512-BF16) round differently: a token logit moved 0.12 there
        torch.testing.assert_close(got.logits, alone.logits, atol=1.5e-1, rtol=5e-2, msg=lambda m: f"{what}: {m}")
        probs, want = got.logits.softmax(-1), exact.logits.softmax(-1)
        assert (probs - want).abs().max().item() < 0.03, f"{what}: probabilities {probs} vs float32 {want}"
    # the adapters change the answer by much more than bfloat16 rounding does
    base = bf16.infer([Request(adapter=None, input_ids=SENTENCES[2])])[0].embedding
    for name in kinds:
        emb = bf16.infer([Request(adapter=name, input_ids=SENTENCES[2])])[0].embedding
        assert (emb - base).abs().max().item() > 0.1, name


def test_from_pretrained_auto_picks_the_dtype_auto_dtype_names(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert Engine.from_pretrained(str(minilm_path()), dtype="auto", max_slots=1).dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert Engine.from_pretrained(str(minilm_path()), dtype="auto", max_slots=1).dtype == torch.bfloat16
