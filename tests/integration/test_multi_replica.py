"""Two replicas of each deployment: GET /metrics, on whichever ingress replica answers, counts everything
sent to all of them, and so does Ray's per-node metrics export (ray.serve.metrics); a deleted adapter's
series leave /metrics whichever ingress replica recorded them."""
from __future__ import annotations

import asyncio

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
                          metrics_push_s=0.1, adapters={m: str(adapter_dirs[m]) for m in MODELS}, store_ttl_s=0.2)
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
        assert sample(m, "polyhead_max_slots") == 8  # 4 slots in each of the two engines
        loads = sample(m, "polyhead_adapter_loads_total")
        assert 3 <= loads <= 6 and sample(m, "polyhead_registered_adapters") == loads
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
