"""AdapterStore (issue 24 item 1): a registration that fails leaves nothing behind (labels checked for size,
characters and count before anything is published); one unreadable version never breaks a listing (skipped and
reported), and `remove` / `polyhead adapters rm` remove it; the change mark replicas poll."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterStore, BaseSchema
from adapters_store.listing import MAX_LABEL_CHARS, change_token, scan
from tests.adapter_factory import make_lora
from tests.conftest import minilm_path


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


def classifier(tmp_path: Path, schema: BaseSchema, num_labels: int = 2, seed: int = 1) -> Path:
    return make_lora(tmp_path / f"src-{uuid.uuid4().hex[:6]}", schema, seed=seed, layers=[0], head="SEQ_CLS",
                     num_labels=num_labels)


def published(root: Path) -> list[str]:
    """Version folders a reader could see."""
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir() and p.parts[-2][0] != ".")


@pytest.mark.parametrize("labels, message", [
    (["l" * 400_000, "m" * 400_000], "labels[0] has 400000 characters"),  # the 800 KB registration
    (["ok", "x" * (MAX_LABEL_CHARS + 1)], f"a label has 1 to {MAX_LABEL_CHARS}"),
    (["", "pos"], "labels[0] has 0 characters"),
    (["neg", "p\nos"], "U+000A is not allowed"),
    (["neg", "p\ud800"], "U+D800 is not allowed"),
    (["pos", "pos"], "appears more than once"),
    (["a", "b", "c"], "3 labels given for a head with 2 outputs"),
])
def test_labels_are_checked_before_anything_is_published(tmp_path, schema, labels, message):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterError, match=re.escape(message)):
        store.add("x", classifier(tmp_path, schema), schema=schema, labels=labels)
    assert published(tmp_path / "store") == [] and store.list() == [] and scan(store).broken == []
    assert store.add("x", classifier(tmp_path, schema), schema=schema, labels=["neg", "pos"]).version == 1


def test_metadata_readers_would_refuse_is_never_published(tmp_path, schema):
    """Each label within the limit, but together more than polyhead.json may hold (MAX_META_BYTES)."""
    store = AdapterStore(tmp_path / "store")
    labels = [f"{i:05d}" + "x" * (MAX_LABEL_CHARS - 5) for i in range(4200)]  # about 1.1 MB
    with pytest.raises(AdapterError, match="labels are too large to record"):
        store.add("big", classifier(tmp_path, schema, num_labels=4200), schema=schema, labels=labels)
    assert published(tmp_path / "store") == [] and store.list() == []


def _plant_broken(store: AdapterStore, name: str, version: int, meta: bytes) -> Path:
    folder = store.root / name / str(version)
    folder.mkdir(parents=True)
    (folder / "polyhead.json").write_bytes(meta)
    return folder


@pytest.mark.parametrize("meta", [b"{not json", b"x" * (1024**2 + 10), b'{"files": {}}'])
def test_one_unreadable_version_is_skipped_and_reported_and_can_be_removed(tmp_path, schema, meta):
    store = AdapterStore(tmp_path / "store")
    good = store.add("good", classifier(tmp_path, schema), schema=schema)
    other = store.add("x", classifier(tmp_path, schema), schema=schema)  # x@1 readable, x@2 broken
    _plant_broken(store, "x", 2, meta)
    assert store.list() == [good, other]
    found = scan(store)
    assert found.versions == [good, other] and [b.ref for b in found.broken] == ["x@2"]
    assert "polyhead.json" in found.broken[0].error
    with pytest.raises(AdapterError):
        store.resolve("x")  # the latest is the broken one: an error, never a wrong version
    assert [v.ref for v in store.remove("x", 2)] == ["x@2"]
    assert scan(store).broken == [] and store.resolve("x") == other
    assert store.add("x", classifier(tmp_path, schema), schema=schema).version == 3  # 2 is never handed out again


def test_the_cli_lists_a_broken_version_and_rm_removes_it(tmp_path, schema, capsys):
    from serving.cli import main

    store = AdapterStore(tmp_path / "store")
    store.add("good", classifier(tmp_path, schema), schema=schema)
    _plant_broken(store, "bad", 1, b"{not json")
    assert main(["adapters", "list", "--store", str(store.root)]) == 0
    out = capsys.readouterr()
    rows = [line.split()[:2] for line in out.out.splitlines()[1:]]
    assert rows == [["good@1", store.resolve("good").sha256[:12]], ["bad@1", "BROKEN"]]
    assert "bad@1 cannot be read" in out.err and "polyhead adapters rm bad@1" in out.err
    assert main(["adapters", "rm", "bad", "--store", str(store.root)]) == 0
    assert capsys.readouterr().out == "removed bad@1\n"
    assert published(store.root) == ["good/1"] and scan(store).broken == []


def test_every_publish_and_removal_changes_the_mark(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    assert change_token(store) is None
    store.add("a", classifier(tmp_path, schema), schema=schema)
    first = change_token(store)
    with pytest.raises(AdapterError):
        store.add("a", classifier(tmp_path, schema), schema=schema, labels=["only-one"])
    assert change_token(store) == first  # a refused add changed nothing
    store.remove("a")
    assert change_token(store) not in (None, first)
    assert store.names() == [] and json.loads("[]") == []  # the mark is never taken for an adapter name
