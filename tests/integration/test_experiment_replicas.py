"""Experiments across two ingress replicas and a restart: a config experiment is published once; a live change made
through one ingress replica is applied by the other within 2 s; a redeploy keeps the live change, and an edited
config definition replaces it."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import ADMIN_KEY, wait_ready

APP, PREFIX = "polyhead-ab2", "/ab2"
KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _deploy(adapter_dirs, store, experiments):
    from ray import serve

    from serving.app.config import ServeConfig
    from serving.app.deployments import ModelServer
    from serving.app.http import Ingress

    cfg = ServeConfig(max_batch_size=8, max_ongoing_requests=8, num_threads=1, num_cpus=0.5, max_slots=4,
                      admin_api_key=ADMIN_KEY, metrics_push_s=0.2, store_root=str(store), store_ttl_s=0.2,
                      max_queue_wait_s=0,  # a fixed admission limit: a loaded test machine measures a low rate
                      adapters={m: str(adapter_dirs[m]) for m in ("cls-a", "cls-b")}, experiments=experiments)
    data = cfg.model_dump()
    model = ModelServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
                                max_ongoing_requests=8).bind(data)
    app = Ingress.options(num_replicas=2, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=1000
                          ).bind(model, data)
    serve.run(app, name=APP, route_prefix=PREFIX)


def _config(a, b):
    return {"cfg-exp": {"arms": [{"name": "a", "adapter": "cls-a", "weight": a},
                                 {"name": "b", "adapter": "cls-b", "weight": b}], "salt": "cfg"}}


async def _sent(url, n=24) -> list[tuple[float, str]]:
    """(when each request was sent, the arm that answered it), for n concurrent requests of distinct users."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        async def one(i):
            sent = time.monotonic()
            r = await c.post("/v1/classify", json={"model": "cfg-exp", "input": "hello there", "user": f"u{i}"})
            assert r.status_code == 200, r.text
            return sent, r.headers["x-polyhead-arm"]

        return await asyncio.gather(*[one(i) for i in range(n)])


async def _arms(url, n=24) -> set[str]:
    return {arm for _, arm in await _sent(url, n)}


@pytest.fixture(scope="module")
def ab2(proxy, adapter_dirs, tmp_path_factory):
    from ray import serve

    store = tmp_path_factory.mktemp("ab2-store")
    _deploy(adapter_dirs, store, _config(50, 50))
    try:
        wait_ready(proxy + PREFIX)
        yield {"url": proxy + PREFIX, "store": store}
    finally:
        serve.delete(APP)


def test_a_change_through_one_ingress_replica_is_applied_by_the_other_within_2_s(ab2):
    url = ab2["url"]
    c = httpx.Client(base_url=url, timeout=30)
    exp = c.get("/v1/experiments/cfg-exp", headers=KEY).json()
    assert exp["origin"] == "config" and [a["weight"] for a in exp["arms"]] == [50, 50]
    assert asyncio.run(_arms(url)) == {"a", "b"}
    # the store holds one version although two ingress replicas started with the config
    assert exp["version"] == 1
    r = c.put("/v1/experiments/cfg-exp", headers=KEY, json={
        "arms": [{"name": "a", "adapter": "cls-a", "weight": 100}, {"name": "b", "adapter": "cls-b", "weight": 0}],
        "salt": "cfg", "if_version": 1})
    assert r.status_code == 200, r.text
    changed = time.monotonic()
    answers = []
    while not any(sent - changed > 2.5 for sent, _ in answers) and time.monotonic() - changed < 60:
        answers += asyncio.run(_sent(url))  # rounds until one starts well after the 2 s
    old = [sent - changed for sent, arm in answers if arm != "a"]  # requests the old split still answered
    assert not old or max(old) <= 2.0, max(old)
    assert any(sent - changed > 2.0 for sent, _ in answers)  # and later ones were all answered by the new one
    assert c.delete("/v1/experiments/cfg-exp", headers=KEY).status_code == 409  # from the config


def test_a_restart_keeps_the_live_change_and_an_edited_config_replaces_it(ab2, adapter_dirs, proxy):
    url, store = ab2["url"], ab2["store"]
    _deploy(adapter_dirs, store, _config(50, 50))  # the same config: a redeploy (new replicas)
    wait_ready(url)
    exp = httpx.get(url + "/v1/experiments/cfg-exp", headers=KEY, timeout=30).json()
    assert [a["weight"] for a in exp["arms"]] == [100, 0] and exp["version"] == 2
    assert asyncio.run(_arms(url)) == {"a"}
    _deploy(adapter_dirs, store, _config(0, 100))  # an edited definition
    wait_ready(url)
    exp = httpx.get(url + "/v1/experiments/cfg-exp", headers=KEY, timeout=30).json()
    assert [a["weight"] for a in exp["arms"]] == [0, 100] and exp["version"] == 3
    assert asyncio.run(_arms(url)) == {"b"}
