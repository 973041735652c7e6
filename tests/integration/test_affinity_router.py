"""request_router="affinity" (serving/app/router.py) on two model replicas with 2 slots each and 4 adapters: each
adapter's rows go to the replica that holds it, so each adapter is loaded about once in all; Ray's default router
(power_of_two, run beside it as the baseline) loads every adapter on both replicas."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import ADMIN_KEY, metrics, total, wait_ready

APPS = {"affinity": ("polyhead-affine", "/affine"), "power_of_two": ("polyhead-affine-p2c", "/affine-p2c")}
MODELS = ("cls-a", "cls-b", "ml", "lazy")
TEXTS = ["the cat sat on the mat", "Ada Lovelace lived in London", "polyhead serves many adapters at once", "short"]
ROUNDS = 16


@pytest.fixture(scope="module", params=list(APPS))
def affine(request, proxy, adapter_dirs, tmp_path_factory):
    """(router, URL): build_app's app with num_replicas=2 model replicas, routed by adapter affinity (one home per
    adapter) or by Ray's default router."""
    from ray import serve

    from serving.app import build_app
    from serving.app.config import ServeConfig

    store = tmp_path_factory.mktemp("affine-store")
    cfg = ServeConfig(num_replicas=2, request_router=request.param, affinity_homes=1, max_slots=2, max_batch_size=16,
                      batch_wait_timeout_s=0.02, max_ongoing_requests=64, max_queued_requests=256, num_threads=1,
                      num_cpus=0.5, ingress_num_cpus=0.05, admin_api_key=ADMIN_KEY, metrics_push_s=0.1,
                      store_root=str(store), adapters={m: str(adapter_dirs[m]) for m in MODELS}, max_queue_wait_s=0)
    # (with affinity, the ingress coalesces concurrent requests into calls of one adapter each: serving/app/coalesce.py)
    app, prefix = APPS[request.param]
    serve.run(build_app(cfg), name=app, route_prefix=prefix)
    try:
        wait_ready(proxy + prefix)
        yield request.param, proxy + prefix
    finally:
        serve.delete(app)


async def _post_all(base_url, bodies):
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=None)) as c:
        return await asyncio.gather(*[c.post("/v1/classify", json=b) for b in bodies])


def test_adapter_loads_by_router(affine, proxy_client):
    router, affine = affine
    bodies = [{"model": MODELS[i % len(MODELS)], "input": [TEXTS[i % len(TEXTS)]]} for i in range(ROUNDS)]
    with httpx.Client(base_url=affine, timeout=60) as c:
        for body in bodies:  # sequential
            r = c.post("/v1/classify", json=body)
            assert r.status_code == 200, r.text
    for _ in range(2):  # concurrent
        for r in asyncio.run(_post_all(affine, bodies)):
            assert r.status_code == 200, r.text

    m = metrics(proxy_client, APPS[router][1])
    loads = total(m, "polyhead_adapter_loads_total")  # summed over the model replicas
    if router == "affinity":  # each adapter on its home replica; at most a couple of spills
        assert len(MODELS) <= loads <= len(MODELS) + 2, f"{loads} adapter loads"
    else:  # 12 requests per adapter, each to either replica at random: every adapter on both, but by a 2^-11 chance
        assert loads > len(MODELS) + 2, f"{loads} adapter loads"
