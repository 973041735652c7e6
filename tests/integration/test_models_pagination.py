"""GET /v1/models as OpenAI's cursor lists page (issue 26 item 6): `limit` (1-1,000, default 1,000) and `after` (the
previous page's last_id), answered with first_id, last_id and has_more; without parameters a server with fewer
models lists them all, as before. Bad parameters are a 422 in the API's JSON error shape. The ingress keeps the
adapters' entries while the adapter store's change token is unchanged: a registration or removal (through the API
or the store itself, as `polyhead adapters add` writes) is listed at once.

Also without Ray: the kept entries' rules (ModelEntriesCache), the page cut (model_page, page_params), and the
store's kept scan (adapters_store.listing.scan reads a version's polyhead.json again only when its stat changed),
which the model replica lists the adapters with."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.datastructures import QueryParams

from adapters_store import AdapterStore, BaseSchema, listing
from serving.app.errors import ApiError
from serving.app.model_list import ModelEntries, ModelEntriesCache, model_page, page_params
from serving.app.openapi import MODELS_LIMIT
from tests.adapter_factory import make_lora
from tests.conftest import minilm_path

from .conftest import ADMIN_KEY, wait_for

KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _walk(client, limit: int) -> list[dict]:
    """Every page of `limit` models, from the first, each checked against its cursor fields."""
    pages, after = [], None
    for _ in range(len(_ids(client)) + 2):  # a cursor that went back would loop: fail instead
        params = {"limit": limit} | ({"after": after} if after else {})
        r = client.get("/v1/models", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        ids = [m["id"] for m in page["data"]]
        assert 1 <= len(ids) <= limit and (page["first_id"], page["last_id"]) == (ids[0], ids[-1]), page
        pages.append(page)
        if not page["has_more"]:
            return pages
        assert len(ids) == limit
        after = page["last_id"]
    raise AssertionError(f"the pages of {limit} never ended: {[p['last_id'] for p in pages][:20]}")


def _ids(client) -> list[str]:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


@pytest.fixture(scope="module")
def listed(client, adapter_dirs):
    """A store adapter and an experiment beside the config's adapters, so that pages cross both boundaries."""
    source = str(adapter_dirs["ver-1"])
    r = client.post("/v1/adapters", headers=KEY, json={"name": "pg-store", "source": source})
    assert r.status_code == 201, r.text
    arms = [{"name": "a", "adapter": "pg-store", "weight": 1}]
    r = client.put("/v1/experiments/pg-exp", headers=KEY, json={"arms": arms})
    assert r.status_code in (200, 201), r.text
    try:
        yield
    finally:
        client.delete("/v1/experiments/pg-exp", headers=KEY)
        client.delete("/v1/adapters/pg-store", headers=KEY)


def test_without_parameters_every_model_is_one_page(client, listed):
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [m["id"] for m in body["data"]]
    assert body["object"] == "list" and body["has_more"] is False and len(ids) == len(set(ids)) < MODELS_LIMIT
    assert (body["first_id"], body["last_id"]) == (ids[0], ids[-1])
    assert ids[0] == "all-MiniLM-L6-v2" and {"cls-a", "ner", "emb", "pg-store", "pg-exp"} <= set(ids)
    assert ids.index("pg-store") < ids.index("pg-exp")  # the base, the adapters by name, then the experiments
    assert body["broken"] == []


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_pages_walk_the_whole_list_once_in_order(client, listed, limit):
    pages = _walk(client, limit)
    assert [m["id"] for page in pages for m in page["data"]] == _ids(client)
    assert [p["has_more"] for p in pages] == [True] * (len(pages) - 1) + [False]
    everything = {m["id"]: m for page in pages for m in page["data"]}
    assert everything["pg-store"]["version"] == 1 and everything["pg-store"]["task"] == "seq_cls"
    assert everything["pg-exp"]["experiment"]["arms"][0]["adapter"] == "pg-store"


def test_a_page_after_the_last_model_is_empty(client, listed):
    ids = _ids(client)
    r = client.get("/v1/models", params={"after": ids[-1]})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("data", "first_id", "last_id", "has_more")} == \
        {"data": [], "first_id": None, "last_id": None, "has_more": False}
    r = client.get("/v1/models", params={"after": ids[-2], "limit": 1})
    assert [m["id"] for m in r.json()["data"]] == [ids[-1]] and r.json()["has_more"] is False


def test_the_documented_limits_are_the_served_ones(client, listed):
    spec = client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/v1/models"]["get"]["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": MODELS_LIMIT,
                                         "default": MODELS_LIMIT}
    assert params["after"]["schema"] == {"type": "string"}
    assert {"first_id", "last_id", "has_more"} <= set(spec["components"]["schemas"]["ModelList"]["properties"])
    r = client.get("/v1/models", params={"limit": MODELS_LIMIT})
    assert r.status_code == 200 and r.json()["data"] == client.get("/v1/models").json()["data"]
    assert client.get("/v1/models", params={"limit": MODELS_LIMIT + 1}).status_code == 422


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=-1", "limit"), ("limit=abc", "limit"), ("limit=1.5", "limit"), ("limit=1e3", "limit"),
    ("limit=", "limit"), ("limit=%205", "limit"), ("limit=1001", "limit"), ("limit=99999999999999999999999", "limit"),
    ("limit=1&limit=2", "limit"), ("after=", "after"), ("after=no-such-model", "after"),
    ("after=cls-a%401", "after"),  # a pinned version is no entry of the list
    ("after=" + "x" * 300, "after"),
])
def test_bad_parameters_are_a_422_in_the_error_format(client, listed, query, field):
    r = client.get(f"/v1/models?{query}")
    assert r.status_code == 422, (query, r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == "invalid_field" and error["type"] == "invalid_request_error", error
    assert field in error["message"] and len(error["message"]) < 300, error


def test_a_registration_and_a_removal_are_listed_at_once(client, admin_headers, adapter_dirs):
    assert "pg-new" not in _ids(client)  # the entries are kept from here on
    new = {"name": "pg-new", "source": str(adapter_dirs["ver-2"])}
    r = client.post("/v1/adapters", headers=admin_headers, json=new)
    assert r.status_code == 201, r.text
    try:
        assert "pg-new" in _ids(client)
        assert client.get("/v1/models/pg-new").json()["version"] == 1
        r = client.post("/v1/adapters", headers=admin_headers, json=dict(new, source=str(adapter_dirs["ver-3"])))
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        latest = client.get("/v1/models/pg-new").json()
        assert (latest["version"], latest["versions"]) == (2, [1, 2])
        assert client.get("/v1/models/pg-new@2").json() == dict(latest, id="pg-new@2")
        pinned = client.get("/v1/models/pg-new@1").json()  # an older version: its own entry (the model replica's)
        assert (pinned["id"], pinned["version"], pinned["versions"]) == ("pg-new@1", 1, [1, 2])
        assert client.get("/v1/models/pg-new@3").status_code == 404
    finally:
        assert client.delete("/v1/adapters/pg-new", headers=admin_headers).status_code == 200
    assert "pg-new" not in _ids(client)
    r = client.get("/v1/models/pg-new")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_an_adapter_the_store_publishes_itself_is_listed_at_once(client, admin_headers, store_root, adapter_dirs):
    """What `polyhead adapters add` (or another app on the same store) publishes rewrites the change token."""
    assert "pg-cli" not in _ids(client)
    store = AdapterStore(store_root)
    store.add("pg-cli", adapter_dirs["ver-1"], schema=BaseSchema.from_config_dir(minilm_path()))
    try:
        assert "pg-cli" in _ids(client)
        assert client.get("/v1/models/pg-cli").json()["version"] == 1
    finally:
        store.remove("pg-cli")
    assert "pg-cli" not in _ids(client)
    wait_for(lambda: client.get("/v1/models/pg-cli").status_code == 404)


# without Ray: the kept entries, the page cut, the parameters ------------------------------------------------

def _entries(*ids: str) -> ModelEntries:
    data = [{"id": i} for i in ids]
    return ModelEntries(data, {m["id"]: k for k, m in enumerate(data)}, [])


@pytest.mark.parametrize("ids, extra, limit, after, page, has_more", [
    ((), (), 5, None, [], False),
    (("base",), (), 5, None, ["base"], False),
    (("base", "a", "b"), (), 2, None, ["base", "a"], True),
    (("base", "a", "b"), (), 2, "a", ["b"], False),
    (("base", "a", "b"), (), 3, None, ["base", "a", "b"], False),
    (("base", "a"), ("e1", "e2"), 2, "base", ["a", "e1"], True),  # across the experiments' boundary
    (("base", "a"), ("e1", "e2"), 2, "e1", ["e2"], False),  # after an experiment
    (("base", "a"), ("e1",), 1, "e1", [], False),
])
def test_model_page_cuts_the_list_after_the_cursor(ids, extra, limit, after, page, has_more):
    out = model_page(_entries(*ids), [{"id": e} for e in extra], limit, after)
    assert [m["id"] for m in out["data"]] == page and out["has_more"] is has_more
    assert (out["first_id"], out["last_id"]) == ((page[0], page[-1]) if page else (None, None))


def test_model_page_refuses_a_cursor_it_does_not_list():
    with pytest.raises(ApiError) as err:
        model_page(_entries("base", "a"), [], 5, "gone")
    assert err.value.status == 422 and err.value.code == "invalid_field" and "'gone'" in err.value.message


@pytest.mark.parametrize("query, expected", [
    ("", (MODELS_LIMIT, None)), ("limit=1", (1, None)), ("limit=007&after=a", (7, "a")), ("limit=%2B3", (3, None)),
    (f"limit={MODELS_LIMIT}", (MODELS_LIMIT, None)), ("after=a%40b&other=1", (MODELS_LIMIT, "a@b")),
])
def test_page_params_read_limit_and_after(query, expected):
    assert page_params(QueryParams(query)) == expected


def test_kept_entries_are_listed_again_only_when_the_token_changes_or_they_age():
    async def scenario():
        token, fetched, gate = ["t1"], [], asyncio.Event()

        async def read_token():
            return token[0]

        async def fetch():
            fetched.append(token[0])
            await gate.wait()
            return _entries("base", f"listing-{len(fetched)}")

        cache = ModelEntriesCache(read_token, fetch, max_age_s=3600)
        first = [asyncio.ensure_future(cache.get()) for _ in range(3)]  # concurrent requests: one listing
        await asyncio.sleep(0)
        gate.set()
        got = await asyncio.gather(*first)
        assert fetched == ["t1"] and all(g is got[0] for g in got)
        assert await cache.get() is got[0] and fetched == ["t1"]  # the token is unchanged: kept
        token[0] = "t2"
        assert (await cache.get()).data[1]["id"] == "listing-2" and fetched == ["t1", "t2"]
        cache.max_age_s = 0  # too old: listed again though the token is the same
        assert (await cache.get()).data[1]["id"] == "listing-3" and cache.listings == 3

    asyncio.run(scenario())


def test_a_failed_listing_is_not_kept():
    async def scenario():
        calls = []

        async def read_token():
            return None  # a store no change was ever marked in

        async def fetch():
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("the model replica went away")
            return _entries("base")

        cache = ModelEntriesCache(read_token, fetch)
        with pytest.raises(ConnectionError):
            await cache.get()
        assert (await cache.get()).data == [{"id": "base"}] and len(calls) == 2
        assert (await cache.get()).data == [{"id": "base"}] and len(calls) == 2

    asyncio.run(scenario())


# without Ray: the store's kept scan ------------------------------------------------------------------------

def test_a_scan_reads_again_only_the_versions_whose_file_changed(tmp_path, monkeypatch):
    schema = BaseSchema.from_config_dir(minilm_path())
    store = AdapterStore(tmp_path / "store")
    for i, name in enumerate(("a", "b", "c")):
        store.add(name, make_lora(tmp_path / name, schema, seed=i, layers=[0], head="SEQ_CLS", num_labels=2),
                  schema=schema)
    reads, entry = [], store.entry

    def counted(name, version):
        reads.append(f"{name}@{version}")
        return entry(name, version)

    monkeypatch.setattr(store, "entry", counted)
    monkeypatch.setattr(listing, "RACY_NS", 10**18)  # every file changed "just now": read again, whatever its stat
    first = listing.scan(store)
    assert reads == ["a@1", "b@1", "c@1"]
    assert listing.scan(store) == first and len(reads) == 6
    monkeypatch.setattr(listing, "RACY_NS", 0)  # as if they were written long ago
    listing.scan(store)
    reads.clear()
    assert listing.scan(store) == first and reads == []  # one listdir per name, one stat per version
    meta = store.root / "b" / "1" / "polyhead.json"
    changed = json.loads(meta.read_text()) | {"labels": ["neg", "pos"]}
    meta.write_text(json.dumps(changed))
    again = listing.scan(store)
    assert reads == ["b@1"] and again.versions[1].labels == ("neg", "pos")
    meta.write_bytes(b"{cut short")  # corrupted in place: broken at once
    found = listing.scan(store)
    assert [v.ref for v in found.versions] == ["a@1", "c@1"] and [b.ref for b in found.broken] == ["b@1"]
    store.remove("c")
    assert [v.ref for v in listing.scan(store).versions] == ["a@1"]
    assert listing.scan(AdapterStore(store.root)) == listing.scan(store)  # the same as a scan reading every file
