"""Issue 24 items 1 and 8 on the session app: a store version that cannot be read never breaks a listing (it is
reported, counted in a metric, and DELETE or `polyhead adapters rm` removes it); no adapter under the base
model's name; a deleted adapter's series stay gone when rows admitted before the delete finish after it.
The cross-replica items (a delete reaching every model replica, config adapters) are in test_multi_replica.py."""
from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import metrics, sample

BROKEN_META = b'{"name": "cracked", "version": 1, "files": {'  # cut short, as a full disk or a bad copy leaves it


def _plant(store_root: Path, name: str, version: int, meta: bytes) -> Path:
    folder = store_root / name / str(version)
    folder.mkdir(parents=True)
    (folder / "polyhead.json").write_bytes(meta)
    return folder


def _listed(client, admin_headers) -> tuple[dict, dict]:
    models, adapters = client.get("/v1/models"), client.get("/v1/adapters", headers=admin_headers)
    assert models.status_code == 200 and adapters.status_code == 200, (models.text, adapters.text)
    return models.json(), adapters.json()


def test_an_unreadable_version_is_reported_not_a_500_and_delete_removes_it(client, admin_headers, store_root,
                                                                          adapter_dirs):
    r = client.post("/v1/adapters", headers=admin_headers, json={"name": "cracked", "source": str(adapter_dirs["ver-1"])})
    assert r.status_code == 201 and r.json()["version"] == 1, r.text
    folder = store_root / "cracked" / "1"
    (folder / "polyhead.json").write_bytes(BROKEN_META)
    try:
        models, adapters = _listed(client, admin_headers)
        for listing in (models, adapters):
            assert [(b["id"], b["name"], b["version"]) for b in listing["broken"]] == [("cracked@1", "cracked", 1)]
            assert "polyhead.json" in listing["broken"][0]["error"]
            assert "cracked" not in [e.get("name") or e.get("id") for e in listing["data"]]
        assert {"cls-a", "emb"} <= {e["id"] for e in models["data"]}  # the others are still listed
        assert sample(metrics(client), "polyhead_broken_adapter_versions") == 1
        r = client.post("/v1/classify", json={"model": "cracked", "input": "x"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_invalid", r.text  # never a 500
        r = client.delete("/v1/adapters/cracked", headers=admin_headers)
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert not folder.exists()
        models, adapters = _listed(client, admin_headers)
        assert models["broken"] == adapters["broken"] == []
        assert sample(metrics(client), "polyhead_broken_adapter_versions") == 0
        assert client.delete("/v1/adapters/cracked", headers=admin_headers).status_code == 404
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # never left for the other tests' listings


def test_polyhead_adapters_rm_removes_an_unreadable_version(client, admin_headers, store_root, capsys):
    from serving.cli import main

    folder = _plant(store_root, "cracked-cli", 1, b"\xff\xfe not json")
    try:
        assert [b["id"] for b in _listed(client, admin_headers)[1]["broken"]] == ["cracked-cli@1"]
        assert main(["adapters", "rm", "cracked-cli", "--store", str(store_root)]) == 0
        assert capsys.readouterr().out == "removed cracked-cli@1\n"
        assert not folder.exists() and _listed(client, admin_headers)[1]["broken"] == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # never left for the other tests' listings


def test_no_adapter_is_registered_under_the_base_models_name(client, admin_headers, adapter_dirs):
    base = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/adapters", headers=admin_headers, json={"name": base, "source": str(adapter_dirs["ver-1"])})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_name" and "base model" in r.json()["error"]["message"]
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids.count(base) == 1
    assert base not in [a["name"] for a in client.get("/v1/adapters", headers=admin_headers).json()["data"]]


def test_a_deleted_adapters_series_are_not_recreated_by_rows_answered_after_the_delete():
    """The hub (in-process): an ingress replica that already dropped the adapter's series (it learnt of the
    delete) records a row admitted before the delete; that push never brings the series back, and the replica
    is told to drop it again. Registered again, the name counts at once."""
    from serving.app.hub import MetricsHub
    from serving.app.metrics import INGRESS_SERIES, Recorder

    hub, ingress = MetricsHub(), Recorder(INGRESS_SERIES, ray_export=False)
    ingress.rows.labels("classify", "gone").inc()
    ingress.rows.labels("classify", "kept").inc()
    epoch, ok, _, _ = hub.push("i1", "Ingress", None, 1, ingress.values(), True, 15.0, 0)
    hub.forget_adapter("gone")
    _, ok, news, late = hub.push("i1", "Ingress", epoch, 2, ingress.values(), False, 15.0, 0)
    assert ok and news == ["gone"] and late == []
    ingress.forget_adapter("gone")  # what the pusher does with `news`: forgotten_seen is 1 from here on
    ingress.rows.labels("classify", "gone").inc()  # a row admitted before the delete, answered after it
    _, ok, news, late = hub.push("i1", "Ingress", epoch, 3, ingress.values(), False, 15.0, 1)
    assert ok and news == [] and late == ["gone"]
    text = hub.exposition().decode()
    assert 'adapter="gone"' not in text and 'adapter="kept"' in text
    hub.remember_adapter("gone")  # registered again: its new rows count
    _, ok, _, late = hub.push("i1", "Ingress", epoch, 4, ingress.values(), True, 15.0, 1)
    assert ok and late == [] and 'adapter="gone",route="classify"} 1.0' in hub.exposition().decode()
