"""PEFT IA3, PROMPT_TUNING, P_TUNING and PREFIX_TUNING folders parsed into AdapterSpec (adapters_store/formats/peft_kinds.py).

Checked three ways: every fixture case parses to the right kind, shapes and head; the parsed spec, applied by a few
lines of plain torch on the real base (forward hooks for IA3, inputs_embeds for prompts, an attention function that
prepends the prefix for prefix tuning), reproduces the logits PEFT computed; adapters built live by PEFT itself (IA3
with regex options, prefix tuning on grouped-query Llama and Conv1D GPT-2) give PEFT's own outputs. Then bad folders,
each a fixture copy with one thing broken, must raise AdapterError naming the problem.
"""
from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, BaseSchema, load_adapter_dir

from .conftest import base_path, fixtures_root

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CASES = {  # case: (base, kind, ia3 vectors (on input), n_virtual, head task, labels)
    "minilm_ia3_seqcls": ("minilm", "ia3", (24, 12), 0, "seq_cls", 3),
    "minilm_ia3_tokencls": ("minilm", "ia3", (18, 6), 0, "token_cls", 4),
    "tiny_llama_ia3": ("tiny-llama", "ia3", (6, 2), 0, None, 0),
    "tiny_gpt2_ia3": ("tiny-gpt2", "ia3", (4, 2), 0, None, 0),
    "minilm_prompt_seqcls": ("minilm", "prompt_tuning", (0, 0), 8, "seq_cls", 2),
    "minilm_prompt_tokencls": ("minilm", "prompt_tuning", (0, 0), 5, "token_cls", 5),
    "minilm_ptuning_seqcls": ("minilm", "p_tuning", (0, 0), 10, "seq_cls", 3),
    "minilm_prefix_seqcls": ("minilm", "prefix_tuning", (0, 0), 10, "seq_cls", 3),
    "minilm_prefix_tokencls": ("minilm", "prefix_tuning", (0, 0), 6, "token_cls", 5),
}


@lru_cache(maxsize=None)
def schema_for(base: str) -> BaseSchema:
    return BaseSchema.from_config_dir(base_path(base))


@lru_cache(maxsize=None)
def model_for(base: str):
    """The real base, float32, eager attention (the prefix check swaps BERT's eager attention function)."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if base == "minilm" else AutoModelForCausalLM
    return cls.from_pretrained(str(base_path(base)), local_files_only=True, attn_implementation="eager").eval()


def case_dir(case: str) -> Path:
    folder = fixtures_root() / "cases" / case
    if not (folder / "adapter" / WEIGHTS).is_file():
        pytest.fail(f"fixture case {case} not found: looked in {folder} (set POLYHEAD_FIXTURES to the fixtures root)")
    return folder


def load_case(case: str, **kwargs):
    base = CASES[case][0]
    return load_adapter_dir(case_dir(case) / "adapter", schema_for(base), name=case.replace("_", "-"), **kwargs)


def expected(case: str) -> tuple[dict, dict]:
    folder = case_dir(case)
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "expected.safetensors"))


# ---- every fixture case parses ----

@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_case_parses(case):
    base, kind, (n_ia3, n_input), n_virtual, task, n_labels = CASES[case]
    spec = load_case(case)
    schema = schema_for(base)
    assert (spec.format, spec.kind, spec.num_virtual_tokens) == ("peft", kind, n_virtual)
    assert len(spec.ia3) == n_ia3 and sum(v.on_input for v in spec.ia3.values()) == n_input
    for module, vector in spec.ia3.items():
        shape = schema.linears[module]
        assert vector.scale.shape == ((shape.d_in,) if vector.on_input else (shape.d_out,))
    if kind in ("prompt_tuning", "p_tuning"):
        assert spec.prompt.shape == (n_virtual, schema.hidden_size) and spec.prefix is None
    elif kind == "prefix_tuning":
        assert spec.prefix.shape == (schema.num_layers, 2, schema.num_key_value_heads, n_virtual, schema.head_dim)
        assert spec.prompt is None
    else:
        assert spec.prompt is None and spec.prefix is None
    if task is None:
        assert spec.head is None
    else:
        assert (spec.head.task, spec.head.num_labels, spec.head.pooled) == (task, n_labels, task == "seq_cls")
        assert spec.head.labels == tuple(f"LABEL_{i}" for i in range(n_labels))
        assert spec.head.weight.shape == (n_labels, schema.hidden_size)
    assert spec.has_body


def test_ia3_modules_follow_feedforward_modules():
    """minilm_ia3_seqcls: feedforward_modules ["output.dense"] matches BOTH dense layers by plain suffix (as PEFT)."""
    spec = load_case("minilm_ia3_seqcls")
    for i in range(6):
        assert spec.ia3[f"encoder.layer.{i}.attention.output.dense"].on_input
        assert spec.ia3[f"encoder.layer.{i}.output.dense"].on_input
        assert spec.ia3[f"encoder.layer.{i}.output.dense"].scale.shape == (1536,)
        assert not spec.ia3[f"encoder.layer.{i}.attention.self.key"].on_input
    gpt2 = load_case("tiny_gpt2_ia3")  # Conv1D, fan_in_fan_out: the same [d_out, 1] / [1, d_in] vectors
    assert gpt2.ia3["transformer.h.0.attn.c_attn"].scale.shape == (192,)
    assert gpt2.ia3["transformer.h.0.mlp.c_proj"].on_input and gpt2.ia3["transformer.h.0.mlp.c_proj"].scale.shape == (256,)


def test_labels_come_from_argument_or_config_json(tmp_path):
    folder = copy_case("minilm_prompt_seqcls", tmp_path / "a")
    (folder / "config.json").write_text(json.dumps({"num_labels": 2, "id2label": {"0": "neg", "1": "pos"}}))
    spec = load_adapter_dir(folder, schema_for("minilm"), name="a")
    assert spec.head.labels == ("neg", "pos")
    spec = load_adapter_dir(folder, schema_for("minilm"), name="a", labels=["no", "yes"])
    assert spec.head.labels == ("no", "yes")
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"},
                                                     "problem_type": "multi_label_classification"}))
    assert load_adapter_dir(folder, schema_for("minilm"), name="a").head.task == "multilabel"


# ---- the parse, applied in plain torch, gives PEFT's numbers ----

def ia3_hooks(model, ia3) -> list:
    """y = W (x * v) + b for on_input vectors, y = (W x + b) * v otherwise, on the named modules."""
    modules = dict(model.named_modules())
    handles = []
    for name, vector in ia3.items():
        if vector.on_input:
            hook = (lambda v: lambda mod, args: (args[0] * v, *args[1:]))(vector.scale)
            handles.append(modules[name].register_forward_pre_hook(hook))
        else:
            hook = (lambda v: lambda mod, args, out: out * v)(vector.scale)
            handles.append(modules[name].register_forward_hook(hook))
    return handles


def head_logits(spec, out, n_virtual: int = 0) -> torch.Tensor:
    head = spec.head
    if head.task == "token_cls":
        return out.last_hidden_state[:, n_virtual:] @ head.weight.T + head.bias
    return out.pooler_output @ head.weight.T + head.bias


def assert_matches(got: torch.Tensor, info: dict, exp: dict) -> None:
    want, mask = exp["logits"], exp["attention_mask"].bool()
    if want.dim() == 3:  # token level: compare real tokens only
        got, want = got[mask], want[mask]
    torch.testing.assert_close(got, want, atol=info["atol"], rtol=info["rtol"])


@pytest.mark.parametrize("case", ["minilm_ia3_seqcls", "minilm_ia3_tokencls", "tiny_llama_ia3", "tiny_gpt2_ia3"])
def test_ia3_parse_reproduces_peft_logits(case):
    info, exp = expected(case)
    spec = load_case(case)
    model = model_for(info["base"])
    handles = ia3_hooks(model, spec.ia3)
    try:
        with torch.no_grad():
            out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    got = head_logits(spec, out) if spec.head is not None else out.logits
    assert_matches(got, info, exp)
    with torch.no_grad():
        base_out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"])
    plain = head_logits(spec, base_out) if spec.head is not None else base_out.logits
    assert (plain - exp["logits"]).abs().max() > 0.05, "the adapter must change the output"


@pytest.mark.parametrize("case", ["minilm_prompt_seqcls", "minilm_prompt_tokencls", "minilm_ptuning_seqcls"])
def test_prompt_parse_reproduces_peft_logits(case):
    """inputs_embeds = [prompt; word embeddings], mask with n ones prepended, positions 0..n+T-1 (as PEFT)."""
    info, exp = expected(case)
    spec = load_case(case)
    model = model_for("minilm")
    ids, mask = exp["input_ids"], exp["attention_mask"]
    n, batch = spec.num_virtual_tokens, ids.shape[0]
    with torch.no_grad():
        embeds = torch.cat([spec.prompt.expand(batch, -1, -1), model.embeddings.word_embeddings(ids)], dim=1)
        out = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(batch, n, dtype=mask.dtype), mask], 1))
    assert_matches(head_logits(spec, out, n_virtual=n), info, exp)


@pytest.mark.parametrize("case", ["minilm_prefix_seqcls", "minilm_prefix_tokencls"])
def test_prefix_parse_reproduces_peft_logits(case, monkeypatch):
    """Every layer's keys/values get spec.prefix[layer, 0 / 1] prepended; real tokens at positions n..n+T-1."""
    from transformers.models.bert import modeling_bert

    info, exp = expected(case)
    spec = load_case(case)
    model = model_for("minilm")
    ids, mask = exp["input_ids"], exp["attention_mask"]
    n, (batch, t) = spec.num_virtual_tokens, ids.shape
    full_mask = torch.cat([torch.ones(batch, n), mask.float()], dim=1)  # [B, n + T]
    additive = (1.0 - full_mask)[:, None, None, :] * torch.finfo(torch.float32).min
    eager = modeling_bert.eager_attention_forward

    def with_prefix(module, query, key, value, attention_mask, **kwargs):
        k, v = (spec.prefix[module.layer_idx, i].expand(batch, -1, -1, -1) for i in (0, 1))  # [B, H, n, D]
        return eager(module, query, torch.cat([k, key], 2), torch.cat([v, value], 2), additive, **kwargs)

    monkeypatch.setattr(modeling_bert, "eager_attention_forward", with_prefix)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(n, n + t).expand(batch, -1))
    assert_matches(head_logits(spec, out), info, exp)


def test_prefix_layout_is_pefts_reshape():
    """Raw [n, L*2*token_dim]: slot s = raw[:, s*token_dim:(s+1)*token_dim] viewed [n, H, D]; layer i keys = slot 2i."""
    spec = load_case("minilm_prefix_seqcls")
    raw = load_file(str(case_dir("minilm_prefix_seqcls") / "adapter" / WEIGHTS))["prompt_embeddings"]
    layers, _, heads, n, head_dim = spec.prefix.shape
    token_dim = heads * head_dim
    assert raw.shape == (n, layers * 2 * token_dim)

    def slot(s):
        return raw[:, s * token_dim:(s + 1) * token_dim].reshape(n, heads, head_dim).permute(1, 0, 2)

    torch.testing.assert_close(spec.prefix[0, 0], slot(0), rtol=0, atol=0)
    torch.testing.assert_close(spec.prefix[0, 1], slot(1), rtol=0, atol=0)
    torch.testing.assert_close(spec.prefix[3, 0], slot(6), rtol=0, atol=0)
    torch.testing.assert_close(spec.prefix[layers - 1, 1], slot(2 * layers - 1), rtol=0, atol=0)
    torch.testing.assert_close(spec.prefix[0, 0, 2, 4], raw[4, 2 * head_dim:3 * head_dim], rtol=0, atol=0)


# ---- live: adapters built and run by PEFT itself ----

def randomize_ia3(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5, generator=g)
            elif "modules_to_save" in name:
                p.normal_(0, 0.3, generator=g)


def test_live_peft_ia3_on_tiny_llama(tmp_path):
    from peft import IA3Config, get_peft_model

    path = base_path("tiny-llama")
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval(),
        IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj", "up_proj", "down_proj", "lm_head"],
                  feedforward_modules=["up_proj", "down_proj"]))
    randomize_ia3(peft_model, 7)
    peft_model.save_pretrained(str(tmp_path / "ia3"))
    spec = load_adapter_dir(tmp_path / "ia3", schema_for("tiny-llama"), name="live")
    assert len(spec.ia3) == 9 and spec.ia3["model.layers.1.mlp.up_proj"].on_input
    assert spec.ia3["lm_head"].scale.shape == (512,) and not spec.ia3["lm_head"].on_input
    assert list(spec.base_copies) == ["lm_head"]  # PEFT saves lm_head's base weight when it is a target

    ids = torch.randint(3, 512, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        base = model_for("tiny-llama")
        handles = ia3_hooks(base, spec.ia3)
        try:
            got = base(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (plain - want).abs().max() > 0.05


def test_live_peft_ia3_bert_seqcls_with_regex_options(tmp_path):
    """Regex target/feedforward_modules, exclude_modules, modules_to_save head, labels from config.json beside it."""
    from peft import IA3Config, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3,
                        id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    BertForSequenceClassification(config).save_pretrained(str(tmp_path / "base"))
    model = BertForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()
    peft_model = get_peft_model(model, IA3Config(
        task_type="SEQ_CLS", target_modules=r".*\.(key|value|dense)", feedforward_modules=r".*\.\d\.output\.dense",
        exclude_modules=["pooler.dense", "layer.1.attention.output.dense"]))
    randomize_ia3(peft_model, 3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    config.save_pretrained(str(tmp_path / "adapter"))  # the task model's config.json: labels a, b, c

    schema = BaseSchema.from_config_dir(tmp_path / "base")
    spec = load_adapter_dir(tmp_path / "adapter", schema, name="live")
    assert spec.head.labels == ("a", "b", "c") and spec.head.task == "seq_cls"
    assert "pooler.dense" not in spec.ia3 and "encoder.layer.1.attention.output.dense" not in spec.ia3
    assert spec.ia3["encoder.layer.0.output.dense"].on_input
    assert not spec.ia3["encoder.layer.0.attention.output.dense"].on_input  # the regex: only `<i>.output.dense`
    assert not spec.ia3["encoder.layer.0.intermediate.dense"].on_input
    assert len(spec.ia3) == 2 * 5 - 1

    ids = torch.randint(1, 120, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    bert = BertModel.from_pretrained(str(tmp_path / "base")).eval()
    handles = ia3_hooks(bert, spec.ia3)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = head_logits(spec, bert(input_ids=ids, attention_mask=mask))
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-gpt2"])
def test_live_peft_prefix_on_causal_bases(base, tmp_path):
    """PEFT sizes prefixes by key/value heads (tiny-llama: 2 of 4 heads, token_dim 32); GPT-2 Conv1D: 4 heads."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_path(base)), local_files_only=True).eval(),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in peft_model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(0, 1.0, generator=g)
    peft_model.save_pretrained(str(tmp_path / "prefix"))
    schema = schema_for(base)
    spec = load_adapter_dir(tmp_path / "prefix", schema, name="live")
    assert spec.kind == "prefix_tuning"
    assert spec.prefix.shape == (2, 2, schema.num_key_value_heads, 3, schema.head_dim)

    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    n = 3
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        cache = DynamicCache(tuple((spec.prefix[i, 0].expand(2, -1, -1, -1), spec.prefix[i, 1].expand(2, -1, -1, -1))
                                   for i in range(2)))
        got = model_for(base)(input_ids=ids, past_key_values=cache,
                              attention_mask=torch.ones(2, n + 6, dtype=torch.long)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    if base == "tiny-llama":  # a config sized by query heads does not fit the grouped-query base
        cfg = json.loads((tmp_path / "prefix" / CONFIG).read_text())
        (tmp_path / "prefix" / CONFIG).write_text(json.dumps({**cfg, "num_attention_heads": 4, "token_dim": 64}))
        with pytest.raises(AdapterError, match=r"num_attention_heads=4 but the base has 2 key/value heads"):
            load_adapter_dir(tmp_path / "prefix", schema, name="live")


# ---- bad folders ----

DELETE = object()
IA3_K0 = "base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"  # [384, 1], output scaling
IA3_FF0 = "base_model.model.bert.encoder.layer.0.output.dense.ia3_l"  # [1, 1536], input scaling
PROMPT_W, PROMPT_B = "base_model.classifier.weight", "base_model.classifier.bias"


def esc(text: str) -> str:
    return re.escape(text)


def copy_case(case: str, dest: Path) -> Path:
    """A writable copy of a fixture adapter (the fixture is read-only: plain copies, no modes)."""
    dest.mkdir(parents=True)
    for path in (case_dir(case) / "adapter").iterdir():
        shutil.copyfile(path, dest / path.name)
    return dest


def config(**changes):
    def step(folder: Path):
        cfg = json.loads((folder / CONFIG).read_text())
        for key, value in changes.items():
            if value is DELETE:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / CONFIG).write_text(json.dumps(cfg))
    return step


def tensors(change):
    def step(folder: Path):
        data = load_file(str(folder / WEIGHTS))
        change(data)
        save_file({k: v.contiguous() for k, v in data.items()}, str(folder / WEIGHTS))
    return step


def put(key: str, make):
    return tensors(lambda t: t.__setitem__(key, make(t)))


def drop(*keys: str):
    return tensors(lambda t: [t.pop(k) for k in keys])


def randn(*shape):
    return lambda t: torch.randn(*shape)


def config_json(**cfg):
    """A transformers config.json beside the adapter (labels come from it)."""
    return lambda folder: (folder / "config.json").write_text(json.dumps({"model_type": "bert", **cfg}))


def bad(case_id: str, source: str, match: str, *steps, **load_kwargs):
    return pytest.param(source, steps, match, load_kwargs, id=case_id)


IA3, PROMPT, PTUNING, PREFIX = "minilm_ia3_seqcls", "minilm_prompt_seqcls", "minilm_ptuning_seqcls", "minilm_prefix_seqcls"
CFG, WTS = esc(CONFIG), esc(WEIGHTS)
K0 = "module 'bert\\.encoder\\.layer\\.0\\.attention\\.self\\.key'"

BAD = [
    # the PEFT type
    bad("peft_type-LOHA", IA3, rf"{CFG}: PEFT type 'LOHA' is not supported \(supported: LORA, ADALORA, IA3, "
        r"PROMPT_TUNING, P_TUNING, PREFIX_TUNING\)", config(peft_type="LOHA")),
    bad("peft_type-MULTITASK_PROMPT_TUNING", PROMPT, r"PEFT type 'MULTITASK_PROMPT_TUNING' is not supported",
        config(peft_type="MULTITASK_PROMPT_TUNING")),
    # IA3 vectors
    bad("ia3-vector-wrong-d_out", IA3, rf"{K0}: ia3_l \[383, 1\] does not fit: the module is not in feedforward_modules: "
        r"it scales its output, expected \[d_out, 1\] = \[384, 1\]", put(IA3_K0, randn(383, 1))),
    bad("ia3-input-scaling-on-non-feedforward-module", IA3, rf"{K0}: ia3_l \[1, 384\] does not fit: the module is not in "
        r"feedforward_modules", put(IA3_K0, lambda t: t[IA3_K0].T)),
    bad("ia3-output-scaling-on-feedforward-module", IA3, r"module 'bert\.encoder\.layer\.0\.output\.dense': ia3_l "
        r"\[384, 1\] does not fit: the module is in feedforward_modules: it scales its input, expected \[1, d_in\] = "
        r"\[1, 1536\]", put(IA3_FF0, randn(384, 1))),
    bad("ia3-feedforward_modules-emptied", IA3, r"output\.dense': ia3_l \[1, \d+\] does not fit: the module is not in "
        r"feedforward_modules", config(feedforward_modules=[])),
    bad("ia3-feedforward_modules-missing", IA3, rf"{CFG}: 'feedforward_modules' is missing",
        config(feedforward_modules=DELETE)),
    bad("ia3-feedforward-not-subset-of-targets", IA3, r"feedforward_modules \['intermediate\.dense'\] are not in "
        r"target_modules", config(feedforward_modules=["output.dense", "intermediate.dense"])),
    bad("ia3-unknown-module", IA3, r"module 'bert\.encoder\.layer\.0\.attention\.self\.kye': no such linear module in "
        r"the base model \(bert, 6 layers\)", put(IA3_K0.replace(".key.", ".kye."), lambda t: t.pop(IA3_K0))),
    bad("ia3-on-embedding", IA3, r"module 'bert\.embeddings\.word_embeddings': no such linear module .*IA3 is "
        r"supported on linear and Conv1D layers only",
        put("base_model.model.bert.embeddings.word_embeddings.ia3_l", randn(384, 1))),
    bad("ia3-conv-vector", IA3, rf"{K0}: ia3_l \[1, 384, 1, 1\] is a convolution-layer vector",
        put(IA3_K0, randn(1, 384, 1, 1))),
    bad("ia3-module-not-targeted", IA3, r"module 'bert\.encoder\.layer\.0\.attention\.self\.query': not matched by "
        r"target_modules", put(IA3_K0.replace(".key.", ".query."), randn(384, 1))),
    bad("ia3-module-excluded", IA3, rf"{K0}: not matched by target_modules .*\(or excluded\)",
        config(exclude_modules=["layer.0.attention.self.key"])),
    bad("ia3-extra-unknown-tensor", IA3, rf"tensor '{esc(IA3_K0)}\.default' is not an IA3 vector",
        put(IA3_K0 + ".default", randn(384, 1))),
    bad("ia3-full-weight-tensor", IA3, r"tensor 'base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.key\."
        r"weight' is not an IA3 vector", put(IA3_K0.replace("ia3_l", "weight"), randn(384, 384))),
    bad("ia3-key-without-prefix", IA3, r"tensor 'bert\.encoder\.layer\.0\.attention\.self\.key\.ia3_l' does not start "
        r"with 'base_model\.model\.'", put(IA3_K0[len("base_model.model."):], lambda t: t.pop(IA3_K0))),
    bad("ia3-two-keys-one-module", IA3, r"modules 'bert\.encoder\.layer\.0\.attention\.self\.key' and "
        r"'encoder\.layer\.0\.attention\.self\.key' both adapt",
        put(IA3_K0.replace(".bert.", "."), lambda t: t[IA3_K0].clone())),
    bad("ia3-no-vectors", IA3, rf"{WTS}: no IA3 vectors \(ia3_l\)",
        tensors(lambda t: [t.pop(k) for k in list(t) if k.endswith("ia3_l")])),
    bad("ia3-nan", IA3, rf"tensor '{esc(IA3_K0)}' contains NaN or Inf values",
        put(IA3_K0, lambda t: t[IA3_K0].index_fill(0, torch.tensor([3]), float("nan")))),
    bad("ia3-head-num_labels-vs-config.json", IA3, r"config\.json: num_labels=2 but the classifier has 3 outputs",
        config_json(num_labels=2)),
    bad("ia3-head-missing", IA3, r"a SEQ_CLS adapter needs exactly classifier\.weight and classifier\.bias",
        drop("base_model.model.classifier.weight", "base_model.model.classifier.bias")),
    bad("ia3-target_modules-bad-regex", IA3, rf"{CFG}: 'target_modules' '\(' is not a valid pattern",
        config(target_modules="(")),
    # prompt tuning / P-tuning
    bad("prompt-width-mismatch", PROMPT, rf"{WTS}: prompt_embeddings \[8, 383\] does not fit token_dim=384",
        put("prompt_embeddings", randn(8, 383))),
    bad("prompt-token_dim-vs-base", PROMPT, rf"{CFG}: token_dim=768 but the base's hidden size is 384",
        config(token_dim=768)),
    bad("prompt-num_virtual_tokens-over-limit", PROMPT, rf"{CFG}: num_virtual_tokens=8 exceeds max_virtual_tokens 4",
        max_virtual_tokens=4),
    bad("prompt-num_virtual_tokens-over-positions", PROMPT, r"num_virtual_tokens=512 leaves no position for an input "
        r"token: the base has 512 positions", config(num_virtual_tokens=512), put("prompt_embeddings", randn(512, 384)),
        max_virtual_tokens=1000),
    bad("prompt-num_virtual_tokens-vs-tensor", PROMPT, rf"{WTS}: prompt_embeddings has 8 rows but num_virtual_tokens=7",
        config(num_virtual_tokens=7)),
    bad("prompt-num_virtual_tokens-not-int", PROMPT, r"'num_virtual_tokens' must be a positive integer, got '8'",
        config(num_virtual_tokens="8")),
    bad("prompt-two-transformer-submodules", PROMPT, r"num_transformer_submodules=2: only 1 is supported \(2 means an "
        r"encoder-decoder", config(num_transformer_submodules=2), put("prompt_embeddings", randn(16, 384))),
    bad("prompt-seq2seq", PROMPT, r"task_type 'SEQ_2_SEQ_LM': encoder-decoder models are not supported",
        config(task_type="SEQ_2_SEQ_LM")),
    bad("prompt-without-task_type", PROMPT, r"PROMPT_TUNING needs a task_type", config(task_type=DELETE)),
    bad("prompt-missing-prompt_embeddings", PROMPT, rf"{WTS}: missing tensor 'prompt_embeddings'",
        drop("prompt_embeddings")),
    bad("prompt-embeddings-not-matrix", PROMPT, r"prompt_embeddings \[8, 384, 1\] must be a matrix",
        put("prompt_embeddings", lambda t: t["prompt_embeddings"][..., None])),
    bad("prompt-extra-unknown-tensor", PROMPT, r"tensor 'prompt_embeddings\.weight' is neither 'prompt_embeddings' nor "
        r"a classifier head", put("prompt_embeddings.weight", randn(8, 384))),
    bad("prompt-head-with-lora-prefix", PROMPT, r"tensor 'base_model\.model\.classifier\.weight' is neither",
        put("base_model.model.classifier.weight", lambda t: t.pop(PROMPT_W))),
    bad("prompt-head-num_labels-vs-config.json", PROMPT, r"config\.json: num_labels=3 but the classifier has 2 outputs",
        config_json(num_labels=3)),
    bad("prompt-head-missing", PROMPT, r"a SEQ_CLS adapter needs exactly classifier\.weight and classifier\.bias .*found "
        r"none", drop(PROMPT_W, PROMPT_B)),
    bad("prompt-head-with-FEATURE_EXTRACTION", PROMPT, r"head weights found but task_type is 'FEATURE_EXTRACTION'",
        config(task_type="FEATURE_EXTRACTION")),
    bad("ptuning-width-mismatch", PTUNING, r"prompt_embeddings \[10, 64\] does not fit token_dim=384",
        put("prompt_embeddings", randn(10, 64))),
    # prefix tuning
    bad("prefix-num_layers-vs-base", PREFIX, rf"{CFG}: num_layers=5 but the base has 6 layers", config(num_layers=5),
        put("prompt_embeddings", randn(10, 5 * 2 * 384))),
    bad("prefix-width-not-layers-x2-x-token_dim", PREFIX, rf"{WTS}: prompt_embeddings \[10, 4600\] is not "
        r"\[num_virtual_tokens, num_layers \* 2 \* token_dim\] = \[10, 4608\]", put("prompt_embeddings", randn(10, 4600))),
    bad("prefix-rows-vs-num_virtual_tokens", PREFIX, r"prompt_embeddings has 10 rows but num_virtual_tokens=12",
        config(num_virtual_tokens=12)),
    bad("prefix-num_attention_heads-vs-base", PREFIX, r"num_attention_heads=6 but the base has 12 key/value heads",
        config(num_attention_heads=6)),
    bad("prefix-token_dim-vs-heads", PREFIX, r"token_dim=192 does not fit 12 key/value heads of size 32 \(expected 384\)",
        config(token_dim=192)),
    bad("prefix-over-limit", PREFIX, r"num_virtual_tokens=10 exceeds max_virtual_tokens 8", max_virtual_tokens=8),
    bad("prefix-missing-num_layers", PREFIX, r"'num_layers' must be a positive integer, got None",
        config(num_layers=DELETE)),
    bad("prefix-two-transformer-submodules", PREFIX, r"num_transformer_submodules=2: only 1 is supported",
        config(num_transformer_submodules=2)),
    bad("prefix-head-num_labels-vs-config.json", PREFIX, r"config\.json: id2label has 2 entries but the classifier has 3",
        config_json(id2label={"0": "neg", "1": "pos"})),
]


@pytest.mark.parametrize("source, steps, match, load_kwargs", BAD)
def test_bad_adapter_is_refused(source, steps, match, load_kwargs, tmp_path):
    folder = copy_case(source, tmp_path / "adapter")
    for step in steps:
        step(folder)
    with pytest.raises(AdapterError, match=match):
        load_adapter_dir(folder, schema_for("minilm"), name="bad", **load_kwargs)


@pytest.mark.parametrize("source", [IA3, PROMPT, PTUNING, PREFIX])
def test_untouched_copies_load(source, tmp_path):
    """The bad cases start from copies that load: each failure above is the one change it makes."""
    spec = load_adapter_dir(copy_case(source, tmp_path / "adapter"), schema_for("minilm"), name="good")
    assert spec.kind == CASES[source][1]


def test_ia3_adapter_for_another_base_is_refused():
    schema = schema_for("tiny-llama")
    with pytest.raises(AdapterError, match=r"no such linear module in the base model \(llama, 2 layers\)"):
        load_adapter_dir(case_dir(IA3) / "adapter", schema, name="x")
