"""AdapterHub folders parse into the right AdapterSpec, and bad ones are refused with a clear AdapterError.

The fixtures are real `adapters` 1.3.0 outputs. The parse is checked numerically: a small pure-torch reference runs
the plain BertModel with each parsed Bottleneck applied exactly as its docstring says (and the LoRA deltas, and the
HeadSpec) and must reproduce the logits the library computed.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, BaseSchema, load_adapter_dir
from adapters_store.formats.adapterhub import head_linear_indices, load_adapterhub
from adapters_store.files import FileLimits
from adapters_store.spec import AdapterSpec, Bottleneck, HeadSpec

from .conftest import fixtures_root, minilm_path

CASES = {  # case -> (kind, task, labels, sub-layers or modules adapted, bottleneck size, head hidden layers)
    "minilm_ah_seqbn_cls": ("bottleneck", "seq_cls", 3, 6, 24, 1),
    "minilm_ah_houlsby_tag": ("bottleneck", "token_cls", 5, 12, 24, 0),
    "minilm_ah_seqbn_multilabel": ("bottleneck", "multilabel", 4, 6, 12, 1),
    "minilm_ah_lora_cls": ("lora", "seq_cls", 2, 12, None, 1),
}
CONFIG, WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS = ("adapter_config.json", "adapter.safetensors", "head_config.json",
                                              "model_head.safetensors")
DELETE = object()


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


@pytest.fixture(scope="module")
def bert():
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    return model


def source(case: str) -> Path:
    folder = fixtures_root() / "cases" / case / "adapter"
    if not (folder / CONFIG).is_file():
        pytest.fail(f"AdapterHub fixture not found: looked in {folder} (set POLYHEAD_FIXTURES)")
    return folder


def copy_case(case: str, dest: Path) -> Path:
    """A writable copy (the fixtures are read-only: plain copies, no modes)."""
    dest.mkdir(parents=True)
    for path in source(case).iterdir():
        shutil.copyfile(path, dest / path.name)
    return dest


# the pure-torch reference ---------------------------------------------------------------------------------------

def act(name: str | None):
    """adapters' Activation_Function_Class."""
    from transformers.activations import get_activation

    if name is None:
        return lambda x: x
    return F.leaky_relu if name == "leakyrelu" else get_activation(name)


def bottleneck_forward(bn: Bottleneck, h, r, layer_norm):
    """spec.Bottleneck's docstring, line by line."""
    residual = h if bn.residual_before_ln is True else None
    a = h
    if bn.original_ln_before:
        if bn.residual_before_ln == "post_add":
            residual = h + r
        a = layer_norm(h + r)
    if bn.residual_before_ln is False:
        residual = a
    z = F.layer_norm(a, a.shape[-1:], *bn.ln_before, eps=1e-5) if bn.ln_before else a
    y = (act(bn.activation)(z @ bn.down.T + bn.down_bias) @ bn.up.T + bn.up_bias) * bn.scaling
    if bn.adapter_residual_before_ln:
        y = y + residual
    if bn.ln_after:
        y = F.layer_norm(y, y.shape[-1:], *bn.ln_after, eps=1e-5)
    if not bn.adapter_residual_before_ln:
        y = y + residual
    return layer_norm(y + r) if bn.original_ln_after else y


def head_forward(head: HeadSpec, out):
    if head.task == "token_cls":
        x = out.last_hidden_state
    else:
        x = out.pooler_output if head.pooled else out.last_hidden_state[:, 0]
    for w, b in head.hidden_layers:
        x = act(head.activation)(x @ w.T + b)
    return x @ head.weight.T + head.bias


@torch.no_grad()
def reference_logits(bert, spec: AdapterSpec, input_ids, attention_mask, with_body: bool = True):
    handles, patched = [], []
    try:
        if with_body:
            for name, bn in spec.bottleneck.items():
                module = bert.get_submodule(name)

                def forward(hidden_states, input_tensor, m=module, bn=bn):
                    return bottleneck_forward(bn, m.dropout(m.dense(hidden_states)), input_tensor, m.LayerNorm)
                module.forward = forward
                patched.append(module)
            for name, d in spec.lora.items():
                hook = lambda m, args, out, d=d: out + d.scale * (args[0] @ d.A.T) @ d.B.T  # noqa: E731
                handles.append(bert.get_submodule(name).register_forward_hook(hook))
            for name, v in spec.ia3.items():
                assert not v.on_input
                handles.append(bert.get_submodule(name).register_forward_hook(lambda m, a, out, v=v: out * v.scale))
        out = bert(input_ids=input_ids, attention_mask=attention_mask)
        return head_forward(spec.head, out)
    finally:
        for h in handles:
            h.remove()
        for module in patched:
            del module.forward  # back to the class's forward


def assert_matches_expected(bert, spec: AdapterSpec, case: str) -> None:
    case_dir = fixtures_root() / "cases" / case
    info = json.loads((case_dir / "case.json").read_text())
    expected = load_file(str(case_dir / "expected.safetensors"))
    ids, mask, want = expected["input_ids"], expected["attention_mask"], expected["logits"]
    got = reference_logits(bert, spec, ids, mask)
    base = reference_logits(bert, spec, ids, mask, with_body=False)
    if want.dim() == 3:  # token-level: only real positions count
        real = mask.bool()
        got, want, base = got[real], want[real], base[real]
    torch.testing.assert_close(got, want, atol=info["atol"], rtol=info["rtol"])
    assert (base - want).abs().max() > 100 * info["atol"], "the adapter's body must change the logits"


# the fixtures ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_fixture_parses_and_reproduces_library_logits(schema, bert, case):
    kind, task, num_labels, adapted, size, hidden_layers = CASES[case]
    spec = load_adapter_dir(source(case), schema, name="x")
    assert (spec.format, spec.kind, spec.name) == ("adapterhub", kind, "x")
    assert spec.head.task == task and spec.head.num_labels == num_labels
    assert spec.head.labels == tuple(f"LABEL_{i}" for i in range(num_labels))
    assert spec.head.pooled is False and len(spec.head.hidden_layers) == hidden_layers
    assert spec.head.activation == "tanh"
    if kind == "bottleneck":
        assert len(spec.bottleneck) == adapted and not spec.lora
        for name, bn in spec.bottleneck.items():
            assert name in schema.sublayers
            assert bn.size == size and list(bn.up.shape) == [384, size] and list(bn.scaling.shape) == [384]
    else:
        assert len(spec.lora) == adapted and not spec.bottleneck
        assert {d.rank for d in spec.lora.values()} == {8} and {d.scale for d in spec.lora.values()} == {2.0}
        assert all(n.endswith((".query", ".value")) for n in spec.lora)
    assert_matches_expected(bert, spec, case)


def test_houlsby_places_adapters_after_attention_and_ffn(schema):
    spec = load_adapter_dir(source("minilm_ah_houlsby_tag"), schema, name="x")
    assert {schema.sublayers[n][1] for n in spec.bottleneck} == {"mh_adapter", "output_adapter"}
    bn = spec.bottleneck["encoder.layer.0.attention.output"]
    assert bn.activation == "swish" and not bn.original_ln_before and bn.original_ln_after
    assert spec.head.pooled is False and spec.head.task == "token_cls"


def edit_json(folder: Path, file: str, **changes) -> None:
    path = folder / file
    cfg = json.loads(path.read_text())
    inner = cfg["config"] if cfg.get("config") is not None else cfg
    for key, value in changes.items():
        if key.startswith("top_"):
            cfg[key[4:]] = value
        elif value is DELETE:
            inner.pop(key, None)
        else:
            inner[key] = value
    path.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, file: str, change) -> None:
    t = load_file(str(folder / file))
    change(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(folder / file))


def test_equivalent_rewrites_give_the_same_logits(schema, bert, tmp_path):
    """Options whose value here changes nothing (learned scaling 1, a per-layer reduction factor mapping, the
    identity of a rank-preserving rewrite) take other code paths and must still reproduce the library."""
    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "learned")
    edit_json(folder, CONFIG, scaling="learned", reduction_factor={"0": 16, "default": 16.0})
    edit_tensors(folder, WEIGHTS, lambda t: t.update({
        k.replace("adapter_up.bias", "scaling"): torch.ones(1) for k in list(t) if k.endswith("adapter_up.bias")}))
    spec = load_adapter_dir(folder, schema, name="x")
    assert_matches_expected(bert, spec, "minilm_ah_seqbn_cls")

    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "channel")
    edit_json(folder, CONFIG, scaling="channel")
    edit_tensors(folder, WEIGHTS, lambda t: t.update({
        k.replace("adapter_up.bias", "scaling"): torch.ones(384) for k in list(t) if k.endswith("adapter_up.bias")}))
    assert_matches_expected(bert, load_adapter_dir(folder, schema, name="x"), "minilm_ah_seqbn_cls")

    folder = copy_case("minilm_ah_lora_cls", tmp_path / "old-lora")  # before adapters 1.1.0 LoRA ran with scale 1
    edit_json(folder, CONFIG, top_version="adapters.1.0.1")
    assert {d.scale for d in load_adapter_dir(folder, schema, name="x").lora.values()} == {1.0}


def test_ln_before_reads_either_alias_of_the_adapter_layernorm(schema, tmp_path):
    """ln_before registers one LayerNorm as adapter_norm_before and adapter_down.0 (the Linear moves to index 1)."""
    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "a")
    edit_json(folder, CONFIG, ln_before=True, ln_after=True)

    def add_norms(t, aliases=("adapter_norm_before", "adapter_down.0")):
        for key in [k for k in t if k.endswith("adapter_down.0.weight")]:
            base = key[: -len("adapter_down.0.weight")]
            t[base + "adapter_down.1.weight"] = t.pop(key)
            t[base + "adapter_down.1.bias"] = t.pop(base + "adapter_down.0.bias")
            for alias in aliases:
                t[f"{base}{alias}.weight"], t[f"{base}{alias}.bias"] = torch.full((384,), 2.0), torch.full((384,), 0.5)
            t[base + "adapter_norm_after.weight"] = torch.ones(384)
            t[base + "adapter_norm_after.bias"] = torch.zeros(384)
    edit_tensors(folder, WEIGHTS, add_norms)
    bn = load_adapter_dir(folder, schema, name="x").bottleneck["encoder.layer.0.output"]
    assert bn.size == 24 and float(bn.ln_before[0][0]) == 2.0 and float(bn.ln_before[1][0]) == 0.5
    assert bn.ln_after is not None

    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "b")
    edit_json(folder, CONFIG, ln_before=True)
    edit_tensors(folder, WEIGHTS, lambda t: add_norms(t, ("adapter_norm_before",)))
    with pytest.raises(AdapterError, match=r"unexpected tensor 'adapter_norm_after\.bias'"):
        load_adapter_dir(folder, schema, name="x")
    edit_tensors(folder, WEIGHTS, lambda t: [t.pop(k) for k in [k for k in t if "adapter_norm_after" in k]])
    bn = load_adapter_dir(folder, schema, name="x").bottleneck["encoder.layer.0.output"]
    assert float(bn.ln_before[0][0]) == 2.0 and bn.ln_after is None


def test_ia3_composition_scale_is_output_scaling(schema, tmp_path):
    """LoRAConfig composition_mode "scale" ((IA)^3): y = (W x + b) * (lora_B * alpha), lora_B [out, 1], no lora_A."""
    folder = copy_case("minilm_ah_lora_cls", tmp_path / "ia3")
    edit_json(folder, CONFIG, composition_mode="scale", r=1, alpha=2, attn_matrices=["k", "v"], intermediate_lora=True,
              init_weights="ia3")
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(6):
        for module, out in (("attention.self.key", 384), ("attention.self.value", 384), ("intermediate.dense", 1536)):
            tensors[f"bert.encoder.layer.{i}.{module}.loras.lora_cls.lora_B"] = torch.rand(out, 1, generator=gen) + 0.5
    save_file(tensors, str(folder / WEIGHTS))
    spec = load_adapter_dir(folder, schema, name="x")
    assert spec.kind == "ia3" and not spec.lora and len(spec.ia3) == 18
    v = spec.ia3["encoder.layer.2.intermediate.dense"]
    assert not v.on_input
    lora_B = tensors["bert.encoder.layer.2.intermediate.dense.loras.lora_cls.lora_B"]  # [1536, 1]
    torch.testing.assert_close(v.scale, lora_B[:, 0] * 2)


def test_head_options(schema, tmp_path):
    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "a")
    edit_json(folder, HEAD_CONFIG, use_pooler=True, bias=False, label2id={"neg": 0, "neu": 1, "pos": 2})
    edit_tensors(folder, HEAD_WEIGHTS, lambda t: t.pop("heads.seqbn_cls.4.bias"))
    head = load_adapter_dir(folder, schema, name="x").head
    assert head.pooled and head.labels == ("neg", "neu", "pos") and torch.equal(head.bias, torch.zeros(3))
    assert load_adapter_dir(folder, schema, name="x", labels=["a", "b", "c"]).head.labels == ("a", "b", "c")

    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "b")  # no activation: the second Linear moves to index 3
    edit_json(folder, HEAD_CONFIG, activation_function=None, label2id=DELETE, id2label={"0": "x", "1": "y", "2": "z"})
    edit_tensors(folder, HEAD_WEIGHTS,
                 lambda t: t.update({k.replace(".4.", ".3."): t.pop(k) for k in list(t) if ".4." in k}))
    head = load_adapter_dir(folder, schema, name="x").head
    assert head.activation is None and len(head.hidden_layers) == 1 and head.labels == ("x", "y", "z")
    assert head_linear_indices(3, True) == [1, 4, 7] and head_linear_indices(3, False) == [1, 3, 5]


def test_head_only_folders(schema, tmp_path):
    """save_head writes head_config.json + model_head.safetensors and no adapter config: a head-only adapter."""
    folder = tmp_path / "head"
    folder.mkdir()
    for file in (HEAD_CONFIG, HEAD_WEIGHTS):
        shutil.copyfile(source("minilm_ah_seqbn_cls") / file, folder / file)
    spec = load_adapterhub(folder, "h", schema, max_rank=64, labels=None, limits=FileLimits())
    assert spec.kind == "head" and not spec.has_body and spec.head.num_labels == 3

    folder = copy_case("minilm_ah_seqbn_cls", tmp_path / "placed-nowhere")  # a config that adds no modules
    edit_json(folder, CONFIG, output_adapter=False)
    save_file({}, str(folder / WEIGHTS))
    spec = load_adapter_dir(folder, schema, name="x")
    assert spec.kind == "bottleneck" and not spec.has_body and spec.head is not None
    (folder / HEAD_CONFIG).unlink()
    (folder / HEAD_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=r"places no adapter modules and there is no head"):
        load_adapter_dir(folder, schema, name="x")


# bad folders ----------------------------------------------------------------------------------------------------

BN = "minilm_ah_seqbn_cls"  # seq_bn at every layer's output, rf 16 (size 24), relu; 2-layer head, 3 labels
LORA = "minilm_ah_lora_cls"  # LoRA r=8 alpha=16 on q/v of every layer; 2-layer head, 2 labels
TAG = "minilm_ah_houlsby_tag"
OUT0 = "bert.encoder.layer.0.output.adapters.seqbn_cls."
Q0 = "bert.encoder.layer.0.attention.self.query.loras.lora_cls."


def config(**changes):
    return lambda f: edit_json(f, CONFIG, **changes)


def head_config(**changes):
    return lambda f: edit_json(f, HEAD_CONFIG, **changes)


def tensors(change, file=WEIGHTS):
    return lambda f: edit_tensors(f, file, change)


def put(key, value, file=WEIGHTS):
    return tensors(lambda t: t.__setitem__(key, value), file)


def drop(*keys, file=WEIGHTS):
    return tensors(lambda t: [t.pop(k) for k in keys], file)


def rename(old, new, file=WEIGHTS):
    return tensors(lambda t: [t.__setitem__(k.replace(old, new), t.pop(k)) for k in [k for k in t if old in k]], file)


def remove(file):
    return lambda f: (f / file).unlink()


def case(case_id, base, match, *steps, **kwargs):
    return pytest.param(base, steps, match, kwargs, id=case_id)


def esc(text):
    return re.escape(text)


BAD = [
    # files
    case("pickle-bin-present", BN, r"pytorch_adapter\.bin: pickle-based weight files \(\.bin\) are refused",
         lambda f: torch.save({}, str(f / "pytorch_adapter.bin"))),
    case("weights-missing", BN, r"adapter\.safetensors: missing \(the adapters library writes it with", remove(WEIGHTS)),
    case("head-config-without-head-weights", BN, r"head_config\.json: a head config without model_head\.safetensors",
         remove(HEAD_WEIGHTS)),
    case("head-weights-without-head-config", BN, r"model_head\.safetensors: head weights without head_config\.json",
         remove(HEAD_CONFIG)),
    case("made-for-another-model-type", BN, r"adapter_config\.json: made for model_type 'roberta', the base is 'bert'",
         config(top_model_type="roberta")),
    case("made-for-another-hidden-size", BN, r"made for hidden_size 768, the base has 384",
         config(top_hidden_size=768)),
    # adapter names inside the keys
    case("mixed-adapter-names", BN, rf"tensor '{esc(OUT0.replace('seqbn_cls', 'other'))}adapter_up\.weight' belongs to "
         r"adapter 'other', but adapter_config\.json names the adapter 'seqbn_cls'", rename(OUT0 + "adapter_up.weight",
         OUT0.replace("seqbn_cls", "other") + "adapter_up.weight")),
    case("config-names-another-adapter", BN, r"belongs to adapter 'seqbn_cls', but adapter_config\.json names the "
         r"adapter 'renamed'", config(top_name="renamed")),
    case("head-keys-use-another-name", BN, r"tensor 'heads\.other\.1\.weight' belongs to head 'other', but "
         r"head_config\.json names the head 'seqbn_cls'", rename("heads.seqbn_cls.1.weight", "heads.other.1.weight",
                                                                 file=HEAD_WEIGHTS)),
    case("key-is-not-an-adapter-weight", BN, r"tensor 'bert\.encoder\.layer\.0\.output\.dense\.weight' is not an "
         r"adapter weight", put("bert.encoder.layer.0.output.dense.weight", torch.zeros(384, 1536))),
    # bottleneck keys and shapes
    case("unexpected-extra-key", BN, r"'bert\.encoder\.layer\.0\.output': unexpected tensor 'adapter_mid\.weight'",
         put(OUT0 + "adapter_mid.weight", torch.zeros(24, 24))),
    case("missing-adapter_up", BN, r"'bert\.encoder\.layer\.0\.output': missing adapter_up\.weight",
         drop(OUT0 + "adapter_up.weight")),
    case("wrong-size-for-reduction-factor", BN, r"adapter_down\.0\.weight is \[24, 384\], expected \[12, 384\] "
         r"\(reduction_factor 32 gives a bottleneck of 12 = int\(384 // 32\)\)", config(reduction_factor=32)),
    case("per-layer-reduction-factor-disagrees", BN, r"'bert\.encoder\.layer\.3\.output' adapter_down\.0\.weight is "
         r"\[24, 384\], expected \[48, 384\]", config(reduction_factor={"3": 8, "default": 16})),
    case("reduction-factor-mapping-without-default", BN, r"reduction_factor mapping has no entry for layer 1 and no "
         r"'default'", config(reduction_factor={"0": 16})),
    case("reduction-factor-zero", BN, r"reduction_factor 'reduction_factor' must be a number > 0, got 0",
         config(reduction_factor=0)),
    case("reduction-factor-key-not-a-layer", BN, r"reduction_factor key '6' is neither 'default' nor a layer index "
         r"0\.\.5", config(reduction_factor={"6": 8, "default": 16})),
    case("adapter_up-wrong-shape", BN, r"adapter_up\.weight is \[384, 23\], expected \[384, 24\]",
         put(OUT0 + "adapter_up.weight", torch.zeros(384, 23))),
    case("leave_out-layer-has-weights", BN, r"'bert\.encoder\.layer\.3\.output' has adapter weights but the config "
         r"places no adapter there \(layer 3 is in leave_out\)", config(leave_out=[3])),
    case("mh_adapter-without-weights", BN, r"no adapter weights for sub-layer 'encoder\.layer\.0\.attention\.output' "
         r"\(the config places an adapter there: mh_adapter=true", config(mh_adapter=True)),
    case("weights-where-output_adapter-is-false", TAG, r"'bert\.encoder\.layer\.0\.output' has adapter weights but "
         r"the config places no adapter there \(output_adapter is false\)", config(output_adapter=False)),
    case("sub-layer-not-in-base", BN, r"'bert\.encoder\.layer\.6\.output' is not a residual sub-layer of the base",
         rename("layer.5.output", "layer.6.output")),
    case("lora-weights-in-a-bottleneck-adapter", BN, r"'bert\.encoder\.layer\.0\.attention\.self\.query' has 'loras' "
         r"weights \(lora_A\), which a bottleneck adapter does not have",
         put("bert.encoder.layer.0.attention.self.query.loras.seqbn_cls.lora_A", torch.zeros(8, 384))),
    case("scaling-learned-without-tensor", BN, r"'bert\.encoder\.layer\.0\.output': missing scaling",
         config(scaling="learned")),
    case("scaling-channel-wrong-shape", BN, r"'bert\.encoder\.layer\.0\.output' scaling is \[1\], expected \[384\]",
         config(scaling="channel"), tensors(lambda t: t.update({k.replace("adapter_up.bias", "scaling"): torch.ones(1)
                                                                for k in list(t) if k.endswith("adapter_up.bias")}))),
    case("ln_after-without-weights", BN, r"missing adapter_norm_after\.weight", config(ln_after=True)),
    case("ln_before-aliases-differ", BN, r"adapter_norm_before\.weight and adapter_down\.0\.weight name one parameter "
         r"but differ", config(ln_before=True), tensors(lambda t: t.update({
             OUT0 + "adapter_down.1.weight": t.pop(OUT0 + "adapter_down.0.weight"),
             OUT0 + "adapter_down.1.bias": t.pop(OUT0 + "adapter_down.0.bias"),
             OUT0 + "adapter_down.0.weight": torch.ones(384), OUT0 + "adapter_down.0.bias": torch.zeros(384),
             OUT0 + "adapter_norm_before.weight": torch.full((384,), 2.0),
             OUT0 + "adapter_norm_before.bias": torch.zeros(384)}))),
    # bottleneck options
    case("unknown-non_linearity", BN, r"unknown non_linearity 'swishy' \(known: leakyrelu, gelu",
         config(non_linearity="swishy")),
    case("non_linearity-with-parameters", BN, r"non_linearity 'prelu' has learned parameters",
         config(non_linearity="prelu")),
    case("is_parallel", BN, r"parallel adapters are not supported \(is_parallel=true\)", config(is_parallel=True)),
    case("use_gating", BN, r"gated adapters \(use_gating\) are not supported", config(use_gating=True)),
    case("phm_layer-compacter", BN, r"PHM layers \(Compacter\) are not supported", config(phm_layer=True)),
    case("inv_adapter", BN, r"invertible adapters \(inv_adapter='nice'\) are not supported",
         config(inv_adapter="nice")),
    case("post_add-without-original_ln_before", TAG, r"residual_before_ln='post_add' needs original_ln_before=true",
         config(residual_before_ln="post_add")),
    case("residual_before_ln-invalid", BN, r"residual_before_ln must be true, false or 'post_add', got 'pre'",
         config(residual_before_ln="pre")),
    case("scaling-int", BN, r"scaling must be a float32 number \(e\.g\. 1\.0\), 'learned' or 'channel', got 2",
         config(scaling=2)),
    case("scaling-over-float32", BN, r"scaling must be a float32 number .* got 1e\+300", config(scaling=1e300)),
    case("mh_adapter-not-bool", BN, r"'mh_adapter' must be true or false, got 'no'", config(mh_adapter="no")),
    case("leave_out-not-a-list", BN, r"'leave_out' must be a list of layer indices, got 3", config(leave_out=3)),
    case("unknown-option", BN, r"unknown option\(s\) 'adapter_depth' in 'config'", config(adapter_depth=2)),
    case("required-option-missing", BN, r"bottleneck config lacks required option\(s\) 'non_linearity'",
         config(non_linearity=DELETE)),
    # other architectures
    case("prefix_tuning", BN, r"architecture 'prefix_tuning' \(prefix tuning \(the adapters library cannot save it",
         config(architecture="prefix_tuning")),
    case("prompt_tuning", BN, r"architecture 'prompt_tuning' \(prompt tuning\) is not supported",
         config(architecture="prompt_tuning")),
    case("union", BN, r"architecture 'union' \(a ConfigUnion", lambda f: (f / CONFIG).write_text(json.dumps(
        {"name": "seqbn_cls", "config": {"architecture": "union", "configs": []}}))),
    case("reft", BN, r"architecture 'reft' \(ReFT interventions\)", config(architecture="reft")),
    case("unknown-architecture", BN, r"unknown AdapterHub architecture 'hyper'", config(architecture="hyper")),
    # LoRA
    case("lora-rank-differs-from-r", LORA, r"'bert\.encoder\.layer\.0\.attention\.self\.query': lora_A has rank 8 but "
         r"the config says r=4", config(r=4)),
    case("attn_matrices-without-weights", LORA, r"no LoRA weights for 'encoder\.layer\.0\.attention\.self\.key' \(the "
         r"config adapts it: attn_matrices 'k'\)", config(attn_matrices=["q", "k", "v"])),
    case("lora-weights-not-in-attn_matrices", LORA, r"'bert\.encoder\.layer\.0\.attention\.self\.value' has LoRA "
         r"weights but the config does not adapt it", config(attn_matrices=["q"])),
    case("attn_matrices-unknown", LORA, r"attn_matrices must be a list of 'q', 'k', 'v', got \['q', 'o'\]",
         config(attn_matrices=["q", "o"])),
    case("intermediate_lora-without-weights", LORA, r"no LoRA weights for 'encoder\.layer\.0\.intermediate\.dense' "
         r"\(the config adapts it: intermediate_lora\)", config(intermediate_lora=True)),
    case("lora-leave_out-layer-has-weights", LORA, r"'bert\.encoder\.layer\.2\.attention\.self\.query' has LoRA "
         r"weights but the config does not adapt it", config(leave_out=[2])),
    case("lora-rank-over-max_rank", LORA, r"rank 8 exceeds max_rank 4", max_rank=4),
    case("lora-missing-lora_B", LORA, r"'bert\.encoder\.layer\.0\.attention\.self\.query': missing lora_B",
         drop(Q0 + "lora_B")),
    case("lora_A-wrong-in-features", LORA, r"lora_A \[8, 100\] / lora_B \[384, 8\] do not fit the base layer",
         put(Q0 + "lora_A", torch.zeros(8, 100))),
    case("lora-gating", LORA, r"gated LoRA \(use_gating=true\) is not supported", config(use_gating=True)),
    case("lora-dora", LORA, r"AdapterHub DoRA \(use_dora=true\) is not supported", config(use_dora=True)),
    case("lora-vera", LORA, r"VeRA \(vera_d/vera_b set\) is not supported", config(vera_d=0.1)),
    case("ia3-with-rank-8", LORA, r"composition_mode 'scale' \(\(IA\)\^3\) needs r=1",
         config(composition_mode="scale")),
    case("composition-mode-unknown", LORA, r"composition_mode must be 'add' or 'scale', got 'mul'",
         config(composition_mode="mul")),
    case("lora-alpha-string", LORA, r"'alpha' must be a number, got '16'", config(alpha="16")),
    case("mtl_lora", LORA, r"architecture 'mtl_lora' \(multi-task LoRA", config(architecture="mtl_lora")),
    # heads
    case("unknown-head_type", BN, r"head_type 'question_answering' is not supported \(supported: classification, "
         r"multilabel_classification, tagging\)", head_config(head_type="question_answering")),
    case("num_labels-mismatch", BN, r"'heads\.seqbn_cls\.4\.weight' is \[3, 384\], expected \[4, 384\] "
         r"\(head_config\.json says num_labels=4\)", head_config(num_labels=4)),
    case("head-layers-disagree-with-weights", BN, r"unexpected tensor 'heads\.seqbn_cls\.4\.bias' \(a 1-layer head "
         r"with activation 'tanh' has Linear modules at \[1\]\)", head_config(layers=1)),
    case("head-without-activation-shifts-indices", BN, r"unexpected tensor 'heads\.seqbn_cls\.4\.bias' \(a 2-layer "
         r"head "
         r"with activation None has Linear modules at \[1, 3\]\)", head_config(activation_function=None)),
    case("head-bias-false-but-saved", BN, r"unexpected tensor 'heads\.seqbn_cls\.4\.bias'", head_config(bias=False)),
    case("head-missing-final-layer", BN, r"missing 'heads\.seqbn_cls\.4\.weight'",
         drop("heads.seqbn_cls.4.weight", file=HEAD_WEIGHTS)),
    case("head-unknown-activation", BN, r"unknown activation_function 'tahn'", head_config(activation_function="tahn")),
    case("head-layers-zero", BN, r"'layers' must be an integer >= 1, got 0", head_config(layers=0)),
    case("head-use_pooler-not-bool", BN, r"'use_pooler' must be true or false, got 'yes'",
         head_config(use_pooler="yes")),
    case("tagging-head-with-use_pooler", TAG, r"unknown option\(s\) 'use_pooler' in 'config' \(a tagging head config",
         head_config(use_pooler=True)),
    case("static-head", BN, r"'config' is None: only AdapterHub flex heads", lambda f: (f / HEAD_CONFIG).write_text(
        json.dumps({"name": "seqbn_cls", "config": None, "model_class": "BertForSequenceClassification"}))),
    case("label2id-repeats-an-id", BN, r"label2id gives id 0 to both 'a' and 'b'",
         head_config(label2id={"a": 0, "b": 0, "c": 2})),
    case("label2id-wrong-count", BN, r"label2id has ids \[0, 1\], the head has 3 outputs",
         head_config(label2id={"a": 0, "b": 1})),
    case("id2label-not-ints", BN, r"id2label must map labels \(strings\) to integer ids, got 'x': 'a'",
         head_config(label2id=DELETE, id2label={"x": "a", "1": "b", "2": "c"})),
    case("labels-given-wrong-count", BN, r"2 labels given for a head with 3 outputs", labels=["a", "b"]),
]


@pytest.mark.parametrize("base, steps, match, kwargs", BAD)
def test_bad_adapterhub_folder_is_refused(schema, tmp_path, base, steps, match, kwargs):
    folder = copy_case(base, tmp_path / "adapter")
    for step in steps:
        step(folder)
    with pytest.raises(AdapterError, match=match):
        load_adapter_dir(folder, schema, name="bad", **kwargs)


def test_bottleneck_needs_a_bert_style_base(tmp_path):
    tiny = BaseSchema.from_config_dir(fixtures_root() / "bases" / "tiny-llama")
    folder = copy_case(BN, tmp_path / "a")
    edit_json(folder, CONFIG, top_model_type=None, top_hidden_size=None)
    with pytest.raises(AdapterError, match=r"bottleneck adapters need a BERT-style base .*llama has none"):
        load_adapter_dir(folder, tiny, name="x")
