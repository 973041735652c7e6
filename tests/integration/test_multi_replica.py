"""Two replicas of each deployment: GET /metrics, on whichever ingress replica answers, counts everything
sent to all of them, and so does Ray's per-node metrics export (ray.serve.metrics); a deleted adapter's
series leave /metrics whichever ingress replica recorded them."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from serving import Request

from .conftest import ADMIN_KEY, metrics, ray_node_metrics, sample, scrape, total, wait_for, wait_ready

APP, PREFIX = "polyhead-multi", "/multi"
KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXTS = ["the cat sat on the mat", "Ada Lovelace lived in London", "polyhead serves many adapters at once",
         "short", "a somewhat longer sentence, with punctuation; and more words than the others have"]
MODELS = ("cls-a", "cls-b", "ml")


@pytest.fixture(scope="module")
def multi(proxy, adapter_dirs, tmp_path_factory):
    """The app build_app makes, with num_replicas=2 for both deployments (what `deployments:` in a Serve
    config file sets), 8 ongoing rows per model replica so that concurrent rows must spread over both."""
    from ray import serve

    from serving.app.config import ServeConfig
    from serving.app.deployments import ModelServer
    from serving.app.http import Ingress

    store = tmp_path_factory.mktemp("multi-store")
    with pytest.MonkeyPatch.context() as env:  # no store_root: the user's default store, here $POLYHEAD_STORE
        env.setenv("POLYHEAD_STORE", str(store))
        cfg = ServeConfig(max_batch_size=8, batch_wait_timeout_s=0.05, max_ongoing_requests=8,
                          max_queued_requests=256, num_threads=1, num_cpus=0.5, max_slots=4, admin_api_key=ADMIN_KEY,
                          metrics_push_s=0.1, adapters={m: str(adapter_dirs[m]) for m in MODELS}, store_ttl_s=0.2,
                          max_queue_wait_s=0)  # a fixed admission limit (256 rows): these tests count all they send
    assert cfg.store_root == str(store)  # resolved here, where the app is built: both model replicas get it
    data = cfg.model_dump()
    model = ModelServer.options(num_replicas=2, ray_actor_options={"num_cpus": cfg.replica_cpus(), "num_gpus": 0},
                                max_ongoing_requests=cfg.max_ongoing_requests,
                                max_queued_requests=cfg.max_queued_requests).bind(data)
    app = Ingress.options(num_replicas=2, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=1000
                          ).bind(model, data)
    serve.run(app, name=APP, route_prefix=PREFIX)
    try:
        wait_ready(proxy + PREFIX)
        yield proxy + PREFIX
    finally:
        serve.delete(APP)


def _per_replica(m, name: str) -> dict[str, float]:
    out = {dict(labels)["replica"]: v for (n, labels), v in m.items() if n == name}
    assert all(len(labels) == 1 for (n, labels) in m if n == name), "a per-replica gauge has only replica"
    return out


async def _post_all(base_url, calls):
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=None)) as c:
        return await asyncio.gather(*[c.post(path, json=body) for path, body in calls])


def test_metrics_count_everything_sent_to_two_model_and_two_ingress_replicas(multi, proxy_client, engine):
    calls = [("/v1/classify", {"model": MODELS[i % 3], "input": [TEXTS[i % 5], TEXTS[(i + 2) % 5]]})
             for i in range(24)]  # 48 rows, 16 per adapter
    responses = asyncio.run(_post_all(multi, calls))
    for (_, body), r in zip(calls, responses):
        assert r.status_code == 200, r.text
        for item, text in zip(r.json()["data"], body["input"]):
            expected = engine.infer([Request(adapter=body["model"], text=text)])[0].logits
            torch.testing.assert_close(torch.tensor(item["logits"]), expected, atol=2e-4, rtol=1e-4)

    def app_metrics_count_it():  # what every replica pushed to the hub, summed (pushes every 0.1 s here)
        m = scrape(proxy_client, PREFIX)
        assert sample(m, "polyhead_metrics_sources", deployment="Ingress") == 2
        assert sample(m, "polyhead_metrics_sources", deployment="ModelServer") == 2
        assert sample(m, "polyhead_requests_total", route="classify", code="200") == 24
        assert sample(m, "polyhead_request_seconds_count", route="classify") == 24
        for name in MODELS:
            assert sample(m, "polyhead_rows_total", route="classify", adapter=name) == 16
        assert sample(m, "polyhead_queue_seconds_count", route="classify") == 48
        assert sample(m, "polyhead_batch_size_sum") == 48  # every row in exactly one batch, on either replica
        # a model replica's gauges: one series per replica, labelled replica, each what its replica has
        max_slots = _per_replica(m, "polyhead_max_slots")
        assert list(max_slots.values()) == [4, 4], max_slots  # max_slots of the config, in each engine
        loads = sample(m, "polyhead_adapter_loads_total")
        registered = _per_replica(m, "polyhead_registered_adapters")
        assert set(registered) == set(max_slots) and all(1 <= n <= 3 for n in registered.values()), registered
        assert 3 <= loads <= 6 and sum(registered.values()) == loads
        assert set(_per_replica(m, "polyhead_slot_bytes")) == set(max_slots)
        return m

    m = wait_for(app_metrics_count_it)
    assert metrics(proxy_client, PREFIX) == m  # and it stays so: nothing was counted twice

    def ray_route_counts_it_too():  # the cluster route: every replica's ray.serve.metrics, per node
        r = ray_node_metrics()
        assert total(r, "ray_polyhead_requests_total", application=APP, route="classify", code="200") == 24
        for name in MODELS:
            assert total(r, "ray_polyhead_rows_total", application=APP, route="classify", adapter=name) == 16
        assert total(r, "ray_polyhead_queue_seconds_count", application=APP, route="classify") == 48
        # the same batches (Ray estimates a histogram's _sum from its buckets' midpoints: counts only)
        assert total(r, "ray_polyhead_batch_size_count", application=APP) == sample(m, "polyhead_batch_size_count")
        per_replica = {dict(k[1])["replica"] for k, v in r.items()
                       if k[0] == "ray_polyhead_batch_size_count" and dict(k[1]).get("application") == APP and v > 0}
        assert len(per_replica) == 2, per_replica  # both model replicas ran batches
        return True

    wait_for(ray_route_counts_it_too, timeout=30)

    def ray_labels_the_gauges_the_same():  # Ray's export of a replica's gauges: the same replica label values
        r = ray_node_metrics()
        ray_slots = {dict(k[1])["replica"]: v for k, v in r.items()
                     if k[0] == "ray_polyhead_max_slots" and dict(k[1]).get("application") == APP}
        assert ray_slots == _per_replica(m, "polyhead_max_slots"), [k for k in r if "slots" in k[0]]
        return True

    wait_for(ray_labels_the_gauges_the_same, timeout=60)  # Ray drops a gauge that a late export left 2 s old


def test_a_deleted_adapter_leaves_metrics_of_every_ingress_replica(multi, proxy_client, adapter_dirs):
    r = proxy_client.post(PREFIX + "/v1/adapters", headers=KEY, json={"name": "extra", "source": str(adapter_dirs["late"])})
    assert r.status_code == 201, r.text
    # 24 rows, at most 8 ongoing per model replica: both serve the adapter one of them published
    calls = [("/v1/classify", {"model": ["extra", "cls-b"], "input": TEXTS[i % 5]}) for i in range(12)]
    assert [r.status_code for r in asyncio.run(_post_all(multi, calls))] == [200] * 12
    def counted():
        m = scrape(proxy_client, PREFIX)
        assert sample(m, "polyhead_rows_total", route="classify", adapter="extra") == 12
        return m

    before = wait_for(counted)
    assert proxy_client.delete(PREFIX + "/v1/adapters/extra", headers=KEY).status_code == 200
    after = metrics(proxy_client, PREFIX)
    assert not [k for k in after if ("adapter", "extra") in k[1]], [k for k in after if "extra" in str(k)]
    assert sample(after, "polyhead_rows_total", route="classify", adapter="cls-b") == \
           sample(before, "polyhead_rows_total", route="classify", adapter="cls-b") >= 12  # the others stay


# issue 24 items 1 and 4: what a registration or a delete leaves on EVERY replica ------------------------------

def _listings_answer(client, times: int = 6) -> list[dict]:
    """GET /v1/models and /v1/adapters, several times (two ingress and two model replicas answer in turn)."""
    out = []
    for _ in range(times):
        for path, headers in (("/v1/models", {}), ("/v1/adapters", KEY)):
            r = client.get(PREFIX + path, headers=headers)
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


def test_a_registration_with_800kb_of_labels_is_refused_and_publishes_nothing(multi, proxy_client, adapter_dirs):
    labels = ["l" * 400_000, "m" * 400_000]  # a 2-label classifier: the count is right, the size is not
    r = proxy_client.post(PREFIX + "/v1/adapters", headers=KEY,
                          json={"name": "wide-labels", "source": str(adapter_dirs["cls-b"]), "labels": labels})
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_invalid", r.text[:500]
    assert "labels[0] has 400000 characters" in r.json()["error"]["message"]
    for listing in _listings_answer(proxy_client):
        assert "wide-labels" not in str(listing["data"]) and listing["broken"] == []
    r = proxy_client.post(PREFIX + "/v1/classify", json={"model": "wide-labels", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _registered_and_resident(client) -> tuple[dict[str, float], dict[str, float]]:
    m = scrape(client, PREFIX)
    return _per_replica(m, "polyhead_registered_adapters"), _per_replica(m, "polyhead_resident_slots")


def test_a_delete_through_one_replica_unloads_the_version_from_both_and_frees_its_slots(multi, proxy_client,
                                                                                       adapter_dirs):
    def settled():  # every replica reported, and what it reports stays so
        first = _registered_and_resident(proxy_client)
        assert len(first[0]) == 2
        time.sleep(0.5)
        return first if _registered_and_resident(proxy_client) == first else None

    before, _ = wait_for(settled)
    r = proxy_client.post(PREFIX + "/v1/adapters", headers=KEY, json={"name": "spread", "source": str(adapter_dirs["late"])})
    assert r.status_code == 201, r.text

    def both_loaded():  # concurrent rows until each replica has loaded it (8 ongoing rows per replica)
        calls = [("/v1/classify", {"model": "spread", "input": TEXTS[i % 5]}) for i in range(12)]
        assert [r.status_code for r in asyncio.run(_post_all(multi, calls))] == [200] * 12
        registered, resident = _registered_and_resident(proxy_client)
        assert registered == {k: n + 1 for k, n in before.items()}, (before, registered)
        return registered, resident

    during, resident_during = wait_for(both_loaded, timeout=60, every=0.5)
    assert proxy_client.delete(PREFIX + "/v1/adapters/spread", headers=KEY).status_code == 200

    def both_unloaded():  # the replica the DELETE did not reach converges on the store within a few seconds
        registered, resident = _registered_and_resident(proxy_client)
        assert registered == before, (before, during, registered)
        assert {k: resident_during[k] - resident[k] for k in resident} == {k: 1 for k in resident}, resident
        return True

    wait_for(both_unloaded, timeout=10, every=0.2)
    for _ in range(6):
        r = proxy_client.post(PREFIX + "/v1/classify", json={"model": "spread", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_a_config_adapter_cannot_be_deleted_and_every_replica_keeps_serving_it(multi, proxy_client):
    r = proxy_client.delete(PREFIX + "/v1/adapters/cls-a", headers=KEY)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert (error["code"], error["type"]) == ("config_adapter", "invalid_request_error")
    assert "serve config" in error["message"] and "remove it there" in error["message"]
    calls = [("/v1/classify", {"model": "cls-a", "input": TEXTS[i % 5]}) for i in range(16)]
    assert [r.status_code for r in asyncio.run(_post_all(multi, calls))] == [200] * 16
    for listing in _listings_answer(proxy_client):
        assert "cls-a" in [e.get("name", e.get("id")) for e in listing["data"]]
