"""Bad PEFT adapters are refused at the boundary: AdapterError naming the file, tensor and problem.

Every case copies the real PEFT LoRA fixture (cases/minilm_lora_seqcls/adapter: r=8 on query/value
of all 6 layers, a 3-label classifier) into tmp_path, breaks one thing, and loads it.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, BaseSchema, FileLimits, load_adapter_dir

from .conftest import fixtures_root, minilm_path

GOOD_CASE = "cases/minilm_lora_seqcls/adapter"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
Q0 = "bert.encoder.layer.0.attention.self.query"  # a module the good adapter adapts: d_in = d_out = 384
KEY_A = f"{PREFIX}{Q0}.lora_A.weight"  # [8, 384]
KEY_B = f"{PREFIX}{Q0}.lora_B.weight"  # [384, 8]
HEAD_W = f"{PREFIX}classifier.weight"  # [3, 384]
HEAD_B = f"{PREFIX}classifier.bias"  # [3]
DELETE = object()


def esc(text: str) -> str:
    return re.escape(text)


MOD_Q0 = f"module '{esc(Q0)}'"
TENSOR_A = f"tensor '{esc(KEY_A)}'"


# steps that break a copy of the good adapter ------------------------------------------------

def config(**changes):
    def step(folder: Path) -> None:
        path = folder / CONFIG
        cfg = json.loads(path.read_text())
        for key, value in changes.items():
            if value is DELETE:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        path.write_text(json.dumps(cfg))  # float('nan') is written as NaN, which Python's json reads back
    return step


def write(name: str, content: str | bytes):
    def step(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return step


def remove(name: str):
    return lambda folder: (folder / name).unlink()


def torch_save(name: str):
    """A pickle of the real (valid) state dict."""
    return lambda folder: torch.save(load_file(str(folder / WEIGHTS)), str(folder / name))


def tensors(change):
    def step(folder: Path) -> None:
        t = load_file(str(folder / WEIGHTS))
        change(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / WEIGHTS))
    return step


def put(key: str, make):
    """Set tensor `key` to make(tensors)."""
    return tensors(lambda t: t.__setitem__(key, make(t)))


def drop(*keys: str):
    return tensors(lambda t: [t.pop(k) for k in keys])


def rename(old: str, new: str):
    """Rename every tensor whose key contains `old`."""
    return tensors(lambda t: [t.__setitem__(k.replace(old, new), t.pop(k)) for k in [k for k in t if old in k]])


def with_value(key: str, value: float):
    def make(t):
        x = t[key].clone()
        x.view(-1)[5] = value
        return x
    return make


def raw(change):
    """Rewrite the weights file's bytes."""
    def step(folder: Path) -> None:
        path = folder / WEIGHTS
        path.write_bytes(change(path.read_bytes()))
    return step


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def header_text(change):
    """Rewrite the safetensors header's JSON text (the data section is kept as is)."""
    def rewrite(data: bytes) -> bytes:
        n = header_len(data)
        text = change(data[8 : 8 + n].decode()).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + n :]
    return raw(rewrite)


def header(change):
    """Change the parsed safetensors header in place."""
    def edit(text: str) -> str:
        head = json.loads(text)
        change(head)
        return json.dumps(head)
    return header_text(edit)


def set_entry(key: str, field: str, value):
    return header(lambda h: h[key].__setitem__(field, value) if value is not DELETE else h[key].pop(field))


def replace_header_bytes(filler: bytes):
    """The header's bytes overwritten with `filler` (repeated), length unchanged."""
    def rewrite(data: bytes) -> bytes:
        n = header_len(data)
        return data[:8] + (filler * n)[:n] + data[8 + n :]
    return raw(rewrite)


def duplicate_entry(text: str) -> str:
    entry = json.loads(text)[KEY_A]
    return "{" + json.dumps(KEY_A) + ": " + json.dumps(entry) + ", " + text[1:]


def config_json(**cfg):
    """A transformers config.json beside the adapter (labels come from it)."""
    return write("config.json", json.dumps({"model_type": "bert", **cfg}))


def randn(*shape):
    return lambda t: torch.randn(*shape)


def case(case_id: str, match: str, *steps, **load_kwargs):
    return pytest.param(steps, match, load_kwargs, id=case_id)


WEIGHTS_RE = esc(WEIGHTS)
CONFIG_RE = esc(CONFIG)
ID2LABEL_2 = {"0": "neg", "1": "pos"}
ID2LABEL_3 = {"0": "neg", "1": "neu", "2": "pos"}

CASES = [
    # files: pickles, missing and damaged safetensors, size limits
    case("pickle-bin-beside-safetensors", r"adapter_model\.bin: pickle-based weight files \(\.bin\) are refused",
         torch_save("adapter_model.bin")),
    case("pickle-bin-instead-of-safetensors", r"adapter_model\.bin: pickle-based weight files \(\.bin\) are refused",
         torch_save("adapter_model.bin"), remove(WEIGHTS)),
    case("pickle-pt", r"adapter\.pt: pickle-based weight files \(\.pt\) are refused", torch_save("adapter.pt")),
    case("pickle-uppercase-suffix", r"ADAPTER_MODEL\.BIN: pickle-based", torch_save("ADAPTER_MODEL.BIN")),
    case("pickle-renamed-to-safetensors", rf"{WEIGHTS_RE}: safetensors header of \d+ bytes, over the \d+-byte limit",
         torch_save("x.pickle"), remove(WEIGHTS), lambda f: (f / "x.pickle").rename(f / WEIGHTS)),
    case("safetensors-missing", rf"{WEIGHTS_RE}: missing", remove(WEIGHTS)),
    case("safetensors-truncated", rf"{WEIGHTS_RE}: truncated or padded safetensors file: tensors cover \d+ bytes",
         raw(lambda d: d[:-1000])),
    case("safetensors-cut-inside-header", rf"{WEIGHTS_RE}: truncated safetensors file \(header says \d+ bytes, file has 92\)",
         raw(lambda d: d[:100])),
    case("safetensors-shorter-than-length-field", rf"{WEIGHTS_RE}: truncated safetensors file \(5 bytes, no header\)",
         raw(lambda d: d[:5])),
    case("safetensors-padded", rf"{WEIGHTS_RE}: truncated or padded safetensors file", raw(lambda d: d + b"\0" * 16)),
    case("header-length-larger-than-file", rf"{WEIGHTS_RE}: truncated safetensors file \(header says \d+ bytes",
         raw(lambda d: struct.pack("<Q", len(d)) + d[8:])),
    case("header-not-json", rf"{WEIGHTS_RE}: safetensors header is not valid JSON", replace_header_bytes(b"{not json ")),
    case("header-not-utf8", rf"{WEIGHTS_RE}: safetensors header is not valid JSON", replace_header_bytes(b"\xff")),
    case("header-not-object", rf"{WEIGHTS_RE}: safetensors header is not a JSON object", header_text(lambda t: "[]")),
    case("header-duplicate-tensor-name", rf"{WEIGHTS_RE}: safetensors header repeats the key '{esc(KEY_A)}'",
         header_text(duplicate_entry)),
    case("header-entry-without-dtype", rf"{WEIGHTS_RE}: {TENSOR_A} has a malformed header entry",
         set_entry(KEY_A, "dtype", DELETE)),
    case("header-shape-disagrees-with-bytes", rf"{TENSOR_A} shape \[4, 384\] \(F32\) does not match its 12288 data bytes",
         set_entry(KEY_A, "shape", [4, 384])),
    case("header-negative-dim", rf"{TENSOR_A} has an invalid shape \[-8, 384\]", set_entry(KEY_A, "shape", [-8, 384])),
    case("header-overlapping-tensors", rf"{WEIGHTS_RE}: tensor '[^']+' data does not follow the previous tensor",
         header(lambda h: h[KEY_B].__setitem__("data_offsets", h[KEY_A]["data_offsets"]))),
    case("file-over-size-limit", rf"{WEIGHTS_RE}: \d+ bytes, over the 100000-byte limit for an adapter file",
         limits=FileLimits(max_file_bytes=100_000)),
    case("header-over-size-limit", rf"{WEIGHTS_RE}: safetensors header of \d+ bytes, over the 256-byte limit",
         limits=FileLimits(max_header_bytes=256)),
    case("config-over-size-limit", rf"{CONFIG_RE}: \d+ bytes, over the 100-byte limit for a config file",
         limits=FileLimits(max_json_bytes=100)),
    case("too-many-tensors", rf"{WEIGHTS_RE}: 26 tensors, over the 10-tensor limit", limits=FileLimits(max_tensors=10)),
    # tensor values and dtypes
    case("dtype-int32", rf"{WEIGHTS_RE}: {TENSOR_A} has dtype I32; allowed: F32, F16, BF16",
         put(KEY_A, lambda t: t[KEY_A].to(torch.int32))),
    case("dtype-float64", rf"{TENSOR_A} has dtype F64", put(KEY_A, lambda t: t[KEY_A].to(torch.float64))),
    case("nan-in-lora_A", rf"{WEIGHTS_RE}: {TENSOR_A} contains NaN or Inf values", put(KEY_A, with_value(KEY_A, float("nan")))),
    case("inf-in-lora_B", rf"tensor '{esc(KEY_B)}' contains NaN or Inf values", put(KEY_B, with_value(KEY_B, float("inf")))),
    case("neg-inf-in-float16-classifier", rf"tensor '{esc(HEAD_W)}' contains NaN or Inf values",
         put(HEAD_W, lambda t: with_value(HEAD_W, float("-inf"))(t).half())),
    # LoRA shapes and ranks
    case("lora_A-d_in-mismatch", rf"{MOD_Q0}: lora_A \[8, 100\] / lora_B \[384, 8\] do not fit the base layer \(in 384, out 384\)",
         put(KEY_A, randn(8, 100))),
    case("lora_B-d_out-mismatch", rf"{MOD_Q0}: lora_A \[8, 384\] / lora_B \[383, 8\] do not fit the base layer",
         put(KEY_B, randn(383, 8))),
    case("lora_B-rank-differs-from-lora_A", rf"{MOD_Q0}: lora_A \[8, 384\] / lora_B \[384, 4\] do not fit",
         put(KEY_B, randn(384, 4))),
    case("lora_A-not-a-matrix", rf"{MOD_Q0}: lora_A \[3072\] and lora_B \[384, 8\] must be matrices",
         put(KEY_A, lambda t: t[KEY_A].flatten())),
    case("rank-0-in-config", rf"{CONFIG_RE}: rank 'r' must be a positive integer, got 0", config(r=0)),
    case("rank-0-tensors", rf"{MOD_Q0}: rank 0", put(KEY_A, randn(0, 384)), put(KEY_B, randn(384, 0)),
         config(rank_pattern={Q0: 0})),
    case("rank-0-tensors-config-says-8", rf"{MOD_Q0}: lora_A has rank 0 but the config says r=8",
         put(KEY_A, randn(0, 384)), put(KEY_B, randn(384, 0))),
    case("rank-over-max_rank", r"module 'bert\.encoder\.layer\.\d\.attention\.self\.\w+': rank 8 exceeds max_rank 4",
         max_rank=4),
    case("rank_pattern-disagrees-with-file", rf"{MOD_Q0}: lora_A has rank 8 but the config says r=4",
         config(rank_pattern={"query": 4})),
    # keys and modules
    case("unknown-module", r"module 'bert\.encoder\.layer\.0\.attention\.self\.qery': no such linear module in the base model",
         rename(f"{Q0}.", "bert.encoder.layer.0.attention.self.qery.")),
    case("layer-index-out-of-range",
         r"module 'bert\.encoder\.layer\.6\.attention\.self\.query': no such linear module in the base model \(bert, 6 layers\)",
         rename(f"{Q0}.", "bert.encoder.layer.6.attention.self.query.")),
    case("lora-on-embedding-module", r"module 'bert\.embeddings\.word_embeddings': no such linear module",
         rename(f"{Q0}.", "bert.embeddings.word_embeddings.")),
    case("missing-lora_B", rf"{WEIGHTS_RE}: {MOD_Q0}: missing lora_B", drop(KEY_B)),
    case("missing-lora_A", rf"{WEIGHTS_RE}: {MOD_Q0}: missing lora_A", drop(KEY_A)),
    case("key-without-base_model-prefix", rf"tensor '{esc(KEY_A[len(PREFIX):])}' does not start with 'base_model\.model\.'",
         rename(KEY_A, KEY_A[len(PREFIX):])),
    case("full-weight-not-lora", rf"tensor '{esc(PREFIX + Q0)}\.weight' is not a LoRA weight",
         put(f"{PREFIX}{Q0}.weight", randn(384, 384))),
    case("unstripped-adapter-name-in-key", rf"tensor '{esc(PREFIX + Q0)}\.lora_A\.default\.weight' is not a LoRA weight",
         rename(KEY_A, f"{PREFIX}{Q0}.lora_A.default.weight")),
    case("lora_embedding-tensor", r"lora_embedding_A': LoRA on embedding layers is not supported",
         put(f"{PREFIX}bert.embeddings.word_embeddings.lora_embedding_A", randn(8, 30522))),
    case("lora_A-twice-for-one-module", rf"{MOD_Q0} has lora_A twice \(tensor '{esc(PREFIX + Q0)}\.lora_A(\.weight)?'\)",
         put(f"{PREFIX}{Q0}.lora_A", lambda t: t[KEY_A] * 2)),
    case("two-keys-for-one-base-module",
         r"modules 'bert\.encoder\.layer\.0\.attention\.self\.query' and 'encoder\.layer\.0\.attention\.self\.query' "
         r"both adapt base module 'encoder\.layer\.0\.attention\.self\.query'",
         put(KEY_A.replace("bert.", ""), lambda t: t[KEY_A] * 2), put(KEY_B.replace("bert.", ""), lambda t: t[KEY_B].clone())),
    case("lora_E-in-plain-lora", rf"{MOD_Q0}: lora_E found in a plain LoRA adapter",
         put(f"{PREFIX}{Q0}.lora_E", randn(8, 1))),
    # adapter_config.json
    case("config-missing", rf"no {CONFIG_RE}: not a PEFT or AdapterHub adapter folder", remove(CONFIG)),
    case("config-invalid-json", rf"{CONFIG_RE}: not valid JSON", write(CONFIG, '{"peft_type": "LORA", "r": 8,')),
    case("config-not-object", rf"{CONFIG_RE}: expected a JSON object, got list", write(CONFIG, '["LORA", 8]')),
    case("config-duplicate-key", rf"{CONFIG_RE}: repeats the key 'r'",
         write(CONFIG, '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "r": 4, "task_type": "SEQ_CLS"}')),
    case("config-without-peft_type", rf"{CONFIG_RE}: neither a PEFT config", config(peft_type=DELETE)),
    case("peft_type-LOHA", rf"{CONFIG_RE}: PEFT type 'LOHA' is not supported", config(peft_type="LOHA")),
    case("r-is-string", rf"{CONFIG_RE}: 'r' must be a number, got '8'", config(r="8")),
    case("r-is-bool", rf"{CONFIG_RE}: 'r' must be a number, got True", config(r=True)),
    case("r-negative", rf"{CONFIG_RE}: rank 'r' must be a positive integer, got -8", config(r=-8)),
    case("r-fractional", rf"{CONFIG_RE}: rank 'r' must be a positive integer, got 8\.5", config(r=8.5)),
    case("lora_alpha-is-string", rf"{CONFIG_RE}: 'lora_alpha' must be a number, got '16'", config(lora_alpha="16")),
    case("lora_alpha-is-NaN", rf"{CONFIG_RE}: 'lora_alpha' must be a number, got nan", config(lora_alpha=float("nan"))),
    case("lora_alpha-over-float32", rf"{WEIGHTS_RE}: module .*: its scale \(lora_alpha / r\) 1.25e\+307 does not "
         "fit a float32", config(lora_alpha=1e308)),
    case("bias-all", rf"{CONFIG_RE}: bias='all' is not supported", config(bias="all")),
    case("lora_bias-true", rf"{CONFIG_RE}: lora_bias=true is not supported", config(lora_bias=True)),
    case("use_dora-is-string", rf"{CONFIG_RE}: 'use_dora' must be true or false, got 'yes'", config(use_dora="yes")),
    case("use_dora-without-magnitude", rf"{MOD_Q0}: use_dora is true but lora_magnitude_vector is missing",
         config(use_dora=True)),
    case("magnitude-without-use_dora", rf"{MOD_Q0}: lora_magnitude_vector found but use_dora is false",
         put(f"{PREFIX}{Q0}.lora_magnitude_vector", lambda t: torch.ones(384))),
    case("rank_pattern-not-object", rf"{CONFIG_RE}: 'rank_pattern' must be an object, got list",
         config(rank_pattern=["query"])),
    case("rank_pattern-value-string", rf"{CONFIG_RE}: rank_pattern\['query'\] must be a number, got '4'",
         config(rank_pattern={"query": "4"})),
    case("alpha_pattern-bad-regex", rf"{CONFIG_RE}: alpha_pattern key '\(' is not a valid pattern",
         config(alpha_pattern={"(": 4})),
    case("layer_replication", rf"{CONFIG_RE}: 'layer_replication' is not supported", config(layer_replication=[[0, 6]])),
    case("task_type-unsupported", rf"{CONFIG_RE}: task_type 'SEQ_2_SEQ_LM' is not supported",
         config(task_type="SEQ_2_SEQ_LM")),
    case("task_type-a-list", rf"{CONFIG_RE}: 'task_type' must be a string, got \[\]", config(task_type=[])),
    case("task_type-an-object", rf"{CONFIG_RE}: 'task_type' must be a string", config(task_type={"a": 1})),
    case("modules_to_save-a-number", rf"{CONFIG_RE}: 'modules_to_save' must be a list of module names, got 1",
         config(modules_to_save=1)),
    case("modules_to_save-a-string", rf"{CONFIG_RE}: 'modules_to_save' must be a list", config(modules_to_save="x")),
    # classifier head
    case("classifier-weight-wrong-hidden-size",
         rf"{WEIGHTS_RE}: classifier\.weight \[3, 383\] does not fit hidden size 384 \(expected \[num_labels, 384\]\)",
         put(HEAD_W, randn(3, 383))),
    case("classifier-bias-mismatch", rf"{WEIGHTS_RE}: classifier\.bias \[2\] does not match 3 labels in classifier\.weight",
         put(HEAD_B, randn(2))),
    case("head-with-FEATURE_EXTRACTION", rf"{WEIGHTS_RE}: head weights found but task_type is 'FEATURE_EXTRACTION'",
         config(task_type="FEATURE_EXTRACTION")),
    case("head-without-task_type", rf"{WEIGHTS_RE}: head weights found but task_type is None", config(task_type=DELETE)),
    case("SEQ_CLS-without-classifier",
         rf"{WEIGHTS_RE}: a SEQ_CLS adapter needs exactly classifier\.weight and classifier\.bias .*found none",
         drop(HEAD_W, HEAD_B)),
    case("SEQ_CLS-without-classifier-bias", r"needs exactly classifier\.weight and classifier\.bias .*found \['weight'\]",
         drop(HEAD_B)),
    case("two-layer-head", r"needs exactly classifier\.weight and classifier\.bias \(a single linear head\)",
         put(f"{PREFIX}classifier.dense.weight", randn(384, 384))),
    case("head-split-over-classifier-and-score", rf"{WEIGHTS_RE}: head weights under both 'classifier' and 'score'",
         rename(HEAD_B, f"{PREFIX}score.bias")),
    case("head-in-classifier-and-score", r"head weights under both 'classifier' and 'score'",
         put(f"{PREFIX}score.weight", randn(2, 384)), put(f"{PREFIX}score.bias", randn(2))),
    case("empty-adapter", rf"{WEIGHTS_RE}: no LoRA weights and no head",
         tensors(lambda t: t.clear()), config(task_type="FEATURE_EXTRACTION")),
    # labels
    case("config.json-num_labels-mismatch", r"config\.json: num_labels=2 but the classifier has 3 outputs",
         config_json(num_labels=2)),
    case("config.json-id2label-too-short", r"config\.json: id2label has 2 entries but the classifier has 3 outputs",
         config_json(id2label=ID2LABEL_2)),
    case("config.json-id2label-disagrees-with-num_labels", r"config\.json: id2label has 2 entries but the classifier has 3",
         config_json(num_labels=3, id2label=ID2LABEL_2)),
    case("config.json-id2label-keys-gap", r"config\.json: id2label keys must be 0\.\.2",
         config_json(id2label={"0": "neg", "1": "neu", "5": "pos"})),
    case("config.json-id2label-keys-not-int", r"config\.json: id2label keys must be integers",
         config_json(id2label={"0": "neg", "one": "neu", "2": "pos"})),
    case("config.json-id2label-is-list", r"config\.json: id2label must be an object, got list",
         config_json(id2label=["neg", "neu", "pos"])),
    case("config.json-invalid-json", r"config\.json: not valid JSON", write("config.json", "{")),
    case("labels-wrong-count", r"2 labels given for a head with 3 outputs", labels=["neg", "pos"]),
    case("labels-is-a-string", r"labels must be a list of strings, got 'abc'", labels="abc"),
    case("labels-not-strings", r"labels must be a list of strings, got \[0, 1, 2\]", labels=[0, 1, 2]),
    # adapter names (never paths)
    case("name-parent-path", r"invalid adapter name '\.\./x'", name="../x"),
    case("name-empty", r"invalid adapter name ''", name=""),
    case("name-with-slash", r"invalid adapter name 'a/b'", name="a/b"),
    case("name-with-NUL", r"invalid adapter name 'a\\x00b'", name="a\x00b"),
    case("name-reserved", r"invalid adapter name 'base': reserved", name="base"),
    case("name-not-a-string", r"adapter name must be a string, got NoneType", name=None),
    # the folder itself
    case("folder-missing", r"not an adapter folder \(no such directory\)", lambda f: shutil.rmtree(f)),
]


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


def good_adapter_source() -> Path:
    src = fixtures_root() / GOOD_CASE
    if not (src / WEIGHTS).is_file():
        pytest.fail(f"good PEFT adapter not found: looked in {src} (set POLYHEAD_FIXTURES to the fixtures root)")
    return src


def good_copy(dest: Path) -> Path:
    """A writable copy of the good adapter (the fixture is read-only: plain copies, no modes)."""
    dest.mkdir(parents=True)
    for path in good_adapter_source().iterdir():
        shutil.copyfile(path, dest / path.name)
    return dest


def make_bad(dest: Path, steps) -> Path:
    folder = good_copy(dest)
    for step in steps:
        step(folder)
    return folder


def test_good_copy_loads(schema, tmp_path):
    spec = load_adapter_dir(good_copy(tmp_path / "good"), schema, name="good")
    assert len(spec.lora) == 12 and spec.max_rank == 8
    assert spec.head is not None and spec.head.num_labels == 3


@pytest.mark.parametrize("steps, match, load_kwargs", CASES)
def test_bad_adapter_is_refused(schema, tmp_path, steps, match, load_kwargs):
    folder = make_bad(tmp_path / "adapter", steps)
    kwargs = {"name": "bad", **load_kwargs}
    with pytest.raises(AdapterError, match=match):
        load_adapter_dir(folder, schema, **kwargs)


ENGINE_CASES = ("pickle-bin-beside-safetensors", "safetensors-truncated", "nan-in-lora_A", "lora_A-d_in-mismatch",
                "layer-index-out-of-range", "r-is-string", "classifier-weight-wrong-hidden-size",
                "config.json-num_labels-mismatch", "head-split-over-classifier-and-score")


def case_by_id(case_id: str):
    (param,) = [p for p in CASES if p.id == case_id]
    steps, match, load_kwargs = param.values
    assert not load_kwargs, f"{case_id}: engine cases load with the engine's own limits"
    return steps, match


def test_engine_refuses_bad_adapters_and_keeps_serving(tmp_path):
    from serving import Engine, Request

    eng = Engine.from_pretrained(str(minilm_path()), max_slots=4)
    good = eng.load_adapter("good", good_copy(tmp_path / "good"))
    request = [Request(adapter="good", input_ids=[101, 7592, 2088, 102])]
    eng.infer(request)  # the first forward fuses modules that share an input: the outputs compared come after it
    (before,) = eng.infer(request)
    assert before.error is None and before.logits is not None and before.logits.shape == (3,)

    for i, case_id in enumerate(ENGINE_CASES):
        steps, match = case_by_id(case_id)
        folder = make_bad(tmp_path / case_id, steps)
        with pytest.raises(AdapterError, match=match):
            eng.load_adapter(f"bad{i}", folder)
        assert f"bad{i}" not in eng.adapters()
    with pytest.raises(AdapterError, match=r"invalid adapter name '\.\./x'"):
        eng.load_adapter("../x", tmp_path / "good")

    steps, match = case_by_id("lora_B-d_out-mismatch")
    with pytest.raises(AdapterError, match=match):
        eng.load_adapter("good", make_bad(tmp_path / "bad-under-good-name", steps))
    assert eng.adapters()["good"] is good
    assert set(eng.adapters()) == {"good"}

    (after,) = eng.infer(request)
    assert after.error is None
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
