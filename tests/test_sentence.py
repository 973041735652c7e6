"""serving/sentence.py: a base model's sentence-transformers pipeline, read as the library writes it."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from serving.sentence import MAX_CONFIG_BYTES, POOLING_MODES, SentencePipeline, read_sentence_pipeline, unit_length

from .conftest import minilm_path

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def pooling(idx: int = 1, path: str = "1_Pooling") -> dict:
    return {"idx": idx, "name": str(idx), "path": path, "type": "sentence_transformers.models.Pooling"}


def model_dir(tmp_path, modules, pooling_config: dict | None = None):
    """A folder with the sentence-transformers files only (the pipeline is read from these alone)."""
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling_config is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    return tmp_path


MEAN_CONFIG = {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}


def test_the_bundled_minilm_is_mean_pooled_and_normalised():
    assert read_sentence_pipeline(minilm_path()) == SentencePipeline(normalize=True, unsupported=None,
                                                                      source="sentence-transformers", max_tokens=256)


def test_the_longest_input_is_the_max_seq_length_sentence_transformers_loads():
    """all-MiniLM-L6-v2's BERT takes 512 positions; its sentence_bert_config.json says 256, and the library,
    loading the folder, cuts at 256 (an embedding of a longer input is not the base's)."""
    from sentence_transformers import SentenceTransformer

    from serving import Engine

    assert SentenceTransformer(str(minilm_path()), device="cpu").max_seq_length == 256
    engine = Engine.from_pretrained(str(minilm_path()), max_slots=1)
    assert (engine.max_tokens, engine.embedding_max_tokens) == (512, 256)


@pytest.mark.parametrize("files, want", [
    ({}, None),  # no Transformer config: the model's own limit
    ({"sentence_bert_config.json": {"do_lower_case": False}}, None),
    ({"sentence_bert_config.json": {"max_seq_length": 128}}, 128),
    ({"sentence_roberta_config.json": {"max_seq_length": 200}}, 200),  # the library's other names, in order
    ({"sentence_bert_config.json": {"max_seq_length": 64}, "sentence_xlnet_config.json": {"max_seq_length": 9}}, 64),
])
def test_max_seq_length_is_read_from_the_transformer_modules_config(tmp_path, files, want):
    for name, config in files.items():
        (tmp_path / name).write_text(json.dumps(config))
    got = read_sentence_pipeline(model_dir(tmp_path, [TRANSFORMER, pooling(), NORMALIZE], MEAN_CONFIG))
    assert (got.max_tokens, got.unsupported) == (want, None)


@pytest.mark.parametrize("value", [0, -5, "256", 2.5, True])
def test_a_max_seq_length_that_is_not_a_positive_count_is_refused(tmp_path, value):
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": value}))
    got = read_sentence_pipeline(model_dir(tmp_path, [TRANSFORMER, pooling(), NORMALIZE], MEAN_CONFIG))
    assert "max_seq_length" in got.unsupported, got


def test_the_bundled_pipeline_without_its_normalize_module_is_not_normalised(tmp_path):
    modules = json.loads((minilm_path() / "modules.json").read_text())
    shutil.copytree(minilm_path() / "1_Pooling", tmp_path / "1_Pooling")
    (tmp_path / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    got = read_sentence_pipeline(tmp_path)
    assert got.normalize is False and got.unsupported is None


def test_a_plain_transformers_folder_gets_mean_pooling_normalised(tmp_path):
    assert read_sentence_pipeline(tmp_path) == SentencePipeline(normalize=True, unsupported=None, source="default")


@pytest.mark.parametrize("key, mode", list(POOLING_MODES.items()))
def test_every_single_pooling_mode_is_read(tmp_path, key, mode):
    config = dict(MEAN_CONFIG, **{k: k == key for k in POOLING_MODES})
    got = read_sentence_pipeline(model_dir(tmp_path, [TRANSFORMER, pooling(), NORMALIZE], config))
    assert (got.pooling, got.normalize, got.unsupported) == (mode, True, None)


def test_several_pooling_modes_at_once_are_refused(tmp_path):
    config = dict(MEAN_CONFIG, pooling_mode_cls_token=True)  # sentence-transformers concatenates them: 768 dims
    got = read_sentence_pipeline(model_dir(tmp_path, [TRANSFORMER, pooling(), NORMALIZE], config))
    assert "cls_token, mean_tokens" in got.unsupported


def test_a_dense_layer_after_pooling_is_refused(tmp_path):
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    got = read_sentence_pipeline(model_dir(tmp_path, [TRANSFORMER, pooling(), dense, dict(NORMALIZE, idx=3)],
                                           MEAN_CONFIG))
    assert "Dense" in got.unsupported


@pytest.mark.parametrize("modules,config,says", [
    ("{not json", None, "cannot be read"),
    ({"0": TRANSFORMER}, None, "not a list"),
    ([TRANSFORMER, pooling(path="../../etc")], MEAN_CONFIG, "outside the model folder"),
    ([TRANSFORMER, pooling()], None, "cannot be read"),  # the Pooling folder is missing
    ([TRANSFORMER, pooling()], ["not", "an", "object"], "not an object"),
    ([TRANSFORMER, NORMALIZE], None, "not Transformer -> Pooling"),
    ([TRANSFORMER, dict(NORMALIZE, idx=1), pooling(idx=2)], MEAN_CONFIG, "not Transformer -> Pooling"),
    ([], None, "empty"),
])
def test_configs_it_cannot_follow_are_refused_with_the_reason(tmp_path, modules, config, says):
    if isinstance(modules, str):
        (tmp_path / "modules.json").write_text(modules)
    else:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    if config is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    got = read_sentence_pipeline(tmp_path)
    assert got.unsupported is not None and says in got.unsupported, got
    assert got.unsupported.startswith("this base model's embedding cannot be served")


def test_an_oversized_config_is_not_read(tmp_path):
    (tmp_path / "modules.json").write_text(" " * (MAX_CONFIG_BYTES + 1) + "[]")
    assert "over" in read_sentence_pipeline(tmp_path).unsupported


def test_unit_length():
    v = unit_length([3.0, 4.0])
    assert v == [0.6, 0.8]
    assert math.isclose(math.fsum(x * x for x in unit_length([1e-3, -2.5, 7.0] * 128)), 1.0)
    assert unit_length([0.0, 0.0]) == [0.0, 0.0]


def sentence_transformers_pool(hidden, mask, mode):
    """sentence-transformers' Pooling module's definitions, written out on [B, T, H] and a right-padded mask."""
    m = mask.unsqueeze(-1).float()
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    if mode == "mean_sqrt_len":
        return (hidden * m).sum(1) / m.sum(1).sqrt()
    if mode == "weightedmean":
        w = torch.arange(1, hidden.shape[1] + 1).view(1, -1, 1).float() * m
        return (hidden * w).sum(1) / w.sum(1)
    last = mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0]), last]


def test_the_engine_pools_as_its_bases_pipeline_says(tmp_path):
    """Copies of the bundled MiniLM whose Pooling config names each mode: the engine's embedding of rows of
    different lengths, batched together, is transformers' BertModel output pooled as sentence-transformers
    defines the mode."""
    from transformers import AutoModel, AutoTokenizer

    from serving import Engine, Request

    texts = ["a short one", "polyhead serves many adapters at once on one frozen base model", "hello"]
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)(**enc).last_hidden_state
    base = json.loads((minilm_path() / "1_Pooling" / "config.json").read_text())
    for key, mode in POOLING_MODES.items():
        copy = tmp_path / mode
        shutil.copytree(minilm_path(), copy)
        config = dict(base, **{k: k == key for k in POOLING_MODES})
        (copy / "1_Pooling" / "config.json").write_text(json.dumps(config))
        engine = Engine.from_pretrained(str(copy), max_slots=1)
        assert engine.sentence.pooling == mode
        got = torch.stack([r.embedding for r in engine.infer([Request(adapter=None, text=t) for t in texts])])
        want = sentence_transformers_pool(hidden, enc["attention_mask"], mode)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=mode)
    several = dict(base, pooling_mode_cls_token=True)  # sentence-transformers would concatenate: refused
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(several))
    assert "cls_token, mean_tokens" in read_sentence_pipeline(copy).unsupported
