"""serving/sentence.py: a base model's sentence-transformers pipeline, read as the library writes it."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from serving.sentence import MAX_CONFIG_BYTES, SentencePipeline, read_sentence_pipeline, unit_length

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
                                                                      source="sentence-transformers")


def test_the_bundled_pipeline_without_its_normalize_module_is_not_normalised(tmp_path):
    modules = json.loads((minilm_path() / "modules.json").read_text())
    shutil.copytree(minilm_path() / "1_Pooling", tmp_path / "1_Pooling")
    (tmp_path / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    got = read_sentence_pipeline(tmp_path)
    assert got.normalize is False and got.unsupported is None


def test_a_plain_transformers_folder_gets_mean_pooling_normalised(tmp_path):
    assert read_sentence_pipeline(tmp_path) == SentencePipeline(normalize=True, unsupported=None, source="default")


@pytest.mark.parametrize("mode", ["pooling_mode_cls_token", "pooling_mode_max_tokens",
                                  "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_lasttoken",
                                  "pooling_mode_weightedmean_tokens"])
def test_other_pooling_modes_are_refused_by_name(tmp_path, mode):
    config = dict(MEAN_CONFIG, pooling_mode_mean_tokens=False, **{mode: True})
    got = read_sentence_pipeline(model_dir(tmp_path, [TRANSFORMER, pooling(), NORMALIZE], config))
    assert got.unsupported is not None and mode.removeprefix("pooling_mode_") in got.unsupported


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


def test_engine_reads_its_bases_pipeline(tmp_path):
    """Engine.from_pretrained keeps what /v1/embeddings serves: the bundled MiniLM normalises; a copy of it whose
    Pooling config says CLS is refused by name."""
    from serving import Engine

    assert Engine.from_pretrained(str(minilm_path()), max_slots=1).sentence.normalize is True
    copy = tmp_path / "minilm-cls"
    shutil.copytree(minilm_path(), copy)
    config = json.loads((copy / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(config))
    assert "cls_token" in Engine.from_pretrained(str(copy), max_slots=1).sentence.unsupported
