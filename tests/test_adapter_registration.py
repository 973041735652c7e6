"""What registering an adapter tells the user (issue 23 items 1 and 9): warnings for missing labels, a missing
head, a PEFT config without task_type; messages for sources that are relative paths or files; `adapters rm`
leaving nothing behind but one hidden tombstone; `adapters list` showing a config's adapters; and the 404 text
for config adapters asked with a version and for names close to registered ones."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from adapters_store import AdapterStore, BaseSchema, load_adapter_dir
from serving.app.routing import Registry, Source
from tests.adapter_factory import make_lora
from tests.conftest import minilm_path

LABELS_MISSING = "labels missing: the seq_cls head's 2 outputs are answered as LABEL_0..LABEL_1"
NO_HEAD = "no task head: this adapter serves /v1/embeddings only"
NO_TASK_TYPE = "adapter_config.json has no task_type"


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


def classifier(folder: Path, schema: BaseSchema, id2label: dict | None = None) -> Path:
    make_lora(folder, schema, seed=1, head="SEQ_CLS", num_labels=2, layers=[0])
    if id2label is not None:
        (folder / "config.json").write_text(json.dumps({"num_labels": 2, "id2label": id2label}))
    return folder


def test_a_peft_classifier_saved_without_labels_warns_and_given_labels_silence_it(tmp_path, schema):
    bare = classifier(tmp_path / "bare", schema)
    spec = load_adapter_dir(bare, schema)
    assert spec.head.labels == ("LABEL_0", "LABEL_1")
    assert len(spec.warnings) == 1 and spec.warnings[0].startswith(LABELS_MISSING), spec.warnings
    assert "no config.json with id2label beside the adapter" in spec.warnings[0]
    given = load_adapter_dir(bare, schema, labels=["neg", "pos"])
    assert (given.head.labels, given.warnings) == (("neg", "pos"), ())
    beside = load_adapter_dir(classifier(tmp_path / "beside", schema, {"0": "neg", "1": "pos"}), schema)
    assert (beside.head.labels, beside.warnings) == (("neg", "pos"), ())
    # transformers' own default id2label names nothing either
    default = load_adapter_dir(classifier(tmp_path / "default", schema, {"0": "LABEL_0", "1": "LABEL_1"}), schema)
    assert default.warnings[0].startswith(LABELS_MISSING)


def test_an_adapter_without_head_says_which_routes_it_serves(tmp_path, schema):
    spec = load_adapter_dir(make_lora(tmp_path / "emb", schema, seed=2, layers=[0]), schema)
    assert spec.head is None and len(spec.warnings) == 1 and spec.warnings[0].startswith(NO_HEAD)
    assert "/v1/classify needs a sequence classification head" in spec.warnings[0]


def test_a_peft_config_without_task_type_warns(tmp_path, schema):
    folder = make_lora(tmp_path / "untyped", schema, seed=3, layers=[0])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["task_type"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    warnings = load_adapter_dir(folder, schema).warnings
    assert [w.split(":")[0] for w in warnings] == [NO_TASK_TYPE, "no task head"], warnings
    assert 'task_type="SEQ_CLS"' in warnings[0]


def test_store_add_returns_the_warnings(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    found = store.add("bare", classifier(tmp_path / "bare", schema), schema=schema)
    assert found.warnings and found.warnings[0].startswith(LABELS_MISSING)
    assert store.add("bare", tmp_path / "bare", schema=schema, labels=["neg", "pos"]).warnings == ()
    assert store.resolve("bare@1").warnings == ()  # not recorded: what add said, once


def test_a_relative_source_says_relative_to_what_and_a_file_says_a_folder_is_expected(tmp_path, schema, monkeypatch):
    from adapters_store import AdapterError

    folder = classifier(tmp_path / "cls", schema)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterError, match=rf"^nope: not an adapter folder \(no such directory relative to "
                                           rf"{tmp_path}, the working directory .*give an absolute path\)"):
        load_adapter_dir("nope", schema)
    assert load_adapter_dir("cls", schema).head is not None  # relative paths work where they exist
    with pytest.raises(AdapterError, match=rf"adapter_config.json: not an adapter folder: this is a file; give the "
                                           rf"folder that holds it \({folder}\)"):
        load_adapter_dir(folder / "adapter_config.json", schema)


def test_rm_leaves_one_hidden_tombstone_and_numbers_are_still_never_reused(tmp_path, schema):
    root = tmp_path / "store"
    store = AdapterStore(root)
    for seed in range(3):
        store.add("a", make_lora(tmp_path / f"src{seed}", schema, seed=seed, layers=[0]), schema=schema)
    store.add("keep", tmp_path / "src0", schema=schema)

    def tree() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.relative_to(root).parts[0] not in (".tmp", ".changes") and p.name != "polyhead.json"
                      and not p.name.startswith("adapter_"))

    store.remove("a", 1)  # below the highest: nothing needs recording
    assert tree() == [".removed", "a", "a/2", "a/3", "keep", "keep/1"]
    store.remove("a", 3)
    assert tree() == [".removed", ".removed/a@3", "a", "a/2", "keep", "keep/1"]
    store.remove("a")
    assert tree() == [".removed", ".removed/a@3", "keep", "keep/1"]  # no folder, no N.removed files
    assert [v.ref for v in store.list()] == ["keep@1"] and store.published_versions("a") == []
    assert store.add("a", tmp_path / "src0", schema=schema).version == 4  # a pin never changes content
    assert tree() == [".removed", ".removed/a@3", "a", "a/4", "keep", "keep/1"]  # pruned by the next rm


def test_rm_tidies_the_markers_of_older_stores(tmp_path, schema):
    root = tmp_path / "store"
    store = AdapterStore(root)
    for seed in range(2):
        store.add("old", make_lora(tmp_path / f"src{seed}", schema, seed=seed, layers=[0]), schema=schema)
    for n in (3, 4, 5):  # what stores wrote before .removed/: one marker per removed version
        (root / "old" / f"{n}.removed").touch()
    store.remove("old", 1)
    assert sorted(os.listdir(root / "old")) == ["2"] and os.listdir(root / ".removed") == ["old@5"]
    store.remove("old")
    assert not (root / "old").exists() and store.add("old", tmp_path / "src0", schema=schema).version == 6


@pytest.fixture
def cli(schema, monkeypatch):
    from serving.cli import main

    monkeypatch.setattr(BaseSchema, "from_config_dir", staticmethod(lambda base: schema))
    return main


def test_cli_add_prints_warnings_on_stderr(tmp_path, schema, cli, capsys):
    store = str(tmp_path / "store")
    bare = classifier(tmp_path / "bare", schema)
    assert cli(["adapters", "add", "bare", str(bare), "--store", store]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("added bare@1 ")
    warnings = [ln for ln in out.err.splitlines() if "warning" in ln]  # beside the progress bar's lines
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {LABELS_MISSING}"), out.err
    assert cli(["adapters", "add", "bare", str(bare), "--store", store, "--labels", "neg,pos"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_list_shows_a_configs_adapters(tmp_path, schema, cli, capsys, monkeypatch):
    store = tmp_path / "store"
    AdapterStore(store).add("pub", classifier(tmp_path / "pub", schema), schema=schema, labels=["n", "p"])
    (tmp_path / "deploy").mkdir()
    config = {"adapters": {"sentiment": {"path": "sent", "labels": ["neg", "pos"]}, "ner": "ner"},
              "store_root": str(store)}
    (tmp_path / "deploy" / "serve_config.yaml").write_text(json.dumps(config))  # YAML is a superset of JSON
    monkeypatch.chdir(tmp_path)
    assert cli(["adapters", "list"]) == 0  # the config in the current folder, and its store
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [r[:2] for r in rows] == [["ADAPTER", "SHA256"], ["ner", "config"], ["sentiment", "config"],
                                     ["pub@1", rows[3][1]]]
    assert rows[2][-1] == "neg,pos" and rows[3][-2:] == ["seq_cls", "n,p"]
    assert cli(["adapters", "list", "--store", str(store)]) == 0  # a store named: that store only
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == ["ADAPTER", "pub@1"]
    shutil.move(tmp_path / "deploy" / "serve_config.yaml", tmp_path / "other.yaml")
    assert cli(["adapters", "list", "--config", "other.yaml", "--store", str(tmp_path / "empty")]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == ["ADAPTER", "ner", "sentiment"]
    (tmp_path / "bad.yaml").write_text("adapters: 3\n")
    assert cli(["adapters", "list", "--config", "bad.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("polyhead adapters list: error: bad.yaml: invalid config:") and len(err.splitlines()) == 1


def test_unknown_model_messages_name_versions_config_adapters_and_close_names(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    store.add("review-sentiment", classifier(tmp_path / "cls", schema), schema=schema)
    registry = Registry(store, {"sentiment": Source("sentiment", str(tmp_path / "cls"))}, ttl_s=60)
    assert registry.unknown_message("sentiment@1") == (
        "unknown model 'sentiment@1': 'sentiment' is a config adapter (the serve config's `adapters`), which has "
        "no versions: ask for 'sentiment'")
    assert registry.unknown_message("review-sentiment@7") == (
        "unknown model 'review-sentiment@7': 'review-sentiment' has versions 1")
    assert registry.unknown_message("sentimnt") == (
        "unknown model 'sentimnt' (did you mean 'sentiment' or 'review-sentiment'?)")
    assert registry.unknown_message("review-sentimen") == (
        "unknown model 'review-sentimen' (did you mean 'review-sentiment' or 'sentiment'?)")
    assert registry.unknown_message("zzz") == "unknown model 'zzz'"
    store.remove("review-sentiment")
    assert registry.unknown_message("review-sentimen") == (  # removed: no longer suggested
        "unknown model 'review-sentimen' (did you mean 'sentiment'?)")
