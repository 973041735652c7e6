"""Registering adapters over HTTP (issue 23 items 1 and 9): the README's bring-your-own-adapter recipe
(deploy/examples/train_peft_classifier.py) run for real, its labels kept, and the `warnings` of the 201
answer; a pinned version's own task and labels; 404s that say why (config adapters have no versions, the
closest names); sources that are relative paths or files."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "deploy" / "examples" / "train_peft_classifier.py"
PROBE_RE = re.compile(r"^'(.+)': (\w+) \(logits (.+)\)$")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, list[float]]]]:
    """The recipe's adapter folder (a few steps: fast) and what PEFT itself answers for its probe inputs."""
    out = tmp_path_factory.mktemp("recipe") / "review-sentiment"
    proc = subprocess.run([sys.executable, str(RECIPE), "--out", str(out), "--steps", "5"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = {m.group(1): (m.group(2), [float(x) for x in m.group(3).split(", ")])
              for line in proc.stdout.splitlines() if (m := PROBE_RE.match(line))}
    assert len(probes) == 2 and {lab for lab, _ in probes.values()} <= {"negative", "positive"}, proc.stdout
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".md") == [
        "adapter_config.json", "adapter_model.safetensors", "config.json"]
    return out, probes


def _add(client, headers, **body):
    return client.post("/v1/adapters", headers=headers, json=body)


def test_the_recipes_adapter_keeps_its_label_names_and_answers_as_peft_does(client, admin_headers, recipe):
    folder, probes = recipe
    r = _add(client, admin_headers, name="recipe-sentiment", source=str(folder))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["task"], body["labels"], body["warnings"]) == ("seq_cls", ["negative", "positive"], [])
    texts = list(probes)
    r = client.post("/v1/classify", json={"model": "recipe-sentiment", "input": texts})
    assert r.status_code == 200, r.text
    for row, text in zip(r.json()["data"], texts):
        label, logits = probes[text]
        assert row["label"] == label
        torch.testing.assert_close(torch.tensor(row["logits"]), torch.tensor(logits), atol=1e-3, rtol=1e-3)


def test_registering_without_labels_warns_and_the_labels_field_keeps_them(client, admin_headers, recipe, tmp_path):
    folder, probes = recipe
    bare = tmp_path / "bare"  # what PEFT's save_pretrained alone leaves: no config.json
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(folder / name, bare / name)
    r = _add(client, admin_headers, name="recipe-bare", source=str(bare))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["labels"] == ["LABEL_0", "LABEL_1"] and len(body["warnings"]) == 1
    assert body["warnings"][0].startswith("labels missing: the seq_cls head's 2 outputs are answered as "
                                          "LABEL_0..LABEL_1 (no labels given, no config.json with id2label")
    r = _add(client, admin_headers, name="recipe-bare", source=str(bare), labels=["negative", "positive"])
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["labels"], r.json()["warnings"]) == (2, ["negative", "positive"], [])
    text = next(iter(probes))
    r = client.post("/v1/classify", json={"model": ["recipe-bare@1", "recipe-bare"], "input": text})
    assert r.status_code == 200, r.text
    first, latest = r.json()["data"]
    assert first["label"] == "LABEL_" + str(["negative", "positive"].index(probes[text][0]))
    assert latest["label"] == probes[text][0]
    # each version described with its own head, the pinned older one included
    pinned = client.get("/v1/models/recipe-bare@1").json()
    assert (pinned["id"], pinned["version"], pinned["task"], pinned["labels"]) == (
        "recipe-bare@1", 1, "seq_cls", ["LABEL_0", "LABEL_1"])
    assert client.get("/v1/models/recipe-bare").json()["labels"] == ["negative", "positive"]


def test_an_adapter_without_head_warns_which_routes_it_serves(client, admin_headers, adapter_dirs):
    r = _add(client, admin_headers, name="headless", source=str(adapter_dirs["emb"]))
    assert r.status_code == 201, r.text
    assert r.json()["task"] is None and r.json()["warnings"] == [
        "no task head: this adapter serves /v1/embeddings only (/v1/classify needs a sequence classification "
        "head, /v1/tag a token classification head)"]


def test_unknown_models_say_why_and_suggest_close_names(client):
    for path, data in (("/v1/models/cls-a@1", None), ("/v1/classify", {"model": "cls-a@1", "input": "hi"})):
        r = client.get(path) if data is None else client.post(path, json=data)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert r.json()["error"]["message"] == ("unknown model 'cls-a@1': 'cls-a' is a config adapter (the serve "
                                                "config's `adapters`), which has no versions: ask for 'cls-a'")
    r = client.post("/v1/classify", json={"model": "cls-aa", "input": "hi"})
    assert r.status_code == 404 and "(did you mean 'cls-a'" in r.json()["error"]["message"], r.text
    r = client.get("/v1/models/lazyy")
    assert r.status_code == 404 and r.json()["error"]["message"] == "unknown model 'lazyy' (did you mean 'lazy'?)"


def test_a_relative_or_file_source_says_what_is_expected(client, admin_headers, adapter_dirs):
    r = _add(client, admin_headers, name="rel", source="some/relative/folder")
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_invalid", r.text
    message = r.json()["error"]["message"]
    assert message.startswith("some/relative/folder: not an adapter folder (no such directory relative to /")
    assert message.endswith("give an absolute path)")
    r = _add(client, admin_headers, name="file", source=str(adapter_dirs["cls-b"] / "adapter_config.json"))
    assert r.status_code == 422 and "this is a file; give the folder that holds it" in r.json()["error"]["message"]
