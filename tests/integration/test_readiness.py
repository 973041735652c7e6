"""/ready under a real serve.run while the base model loads: a model replica restarts (its process died),
and until Serve runs it again /ready answers 503 not_ready (JSON, with Retry-After), then 200 again.
(A new app gets its route on Serve's proxies only once all its deployments run, so the first load is
seen through a restart.) The model is a stand-in whose constructor takes a few seconds, as loading a
base does, so that the window is certain; the ingress is the real one."""
from __future__ import annotations

import os
import time

import httpx
import pytest
from ray import serve

from serving.app.config import ServeConfig
from serving.app.http import Ingress

APP, PREFIX = "polyhead-slow", "/slow"
LOAD_S = 3.0


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=1)
class SlowModel:
    def __init__(self):
        time.sleep(LOAD_S)  # the base model loading

    def info(self) -> dict:
        return {"model_name": "slow", "max_tokens": 512, "hidden_size": 384, "vocab_size": 30522, "causal": False,
                "draining": False}

    def crash(self) -> None:
        os._exit(1)

    async def list_adapters(self) -> list:
        return []

    async def infer_rows(self, rows: list[dict]) -> list[dict]:  # dies while a request waits for it
        os._exit(1)


@pytest.fixture(scope="module")
def slow_app(proxy):
    data = ServeConfig(ready_timeout_s=0.3).model_dump()
    serve.run(Ingress.options(ray_actor_options={"num_cpus": 0.05}).bind(SlowModel.bind(), data), name=APP,
              route_prefix=PREFIX)
    try:
        yield proxy + PREFIX
    finally:
        serve.delete(APP)


def test_ready_is_503_not_ready_while_the_model_replica_loads_then_200(slow_app):
    assert httpx.get(slow_app + "/ready", timeout=60).status_code == 200
    with pytest.raises(Exception):
        serve.get_deployment_handle("SlowModel", app_name=APP).crash.remote().result()
    answers = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = httpx.get(slow_app + "/ready", timeout=60)
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded_error", r.text
        answers.append((r.status_code, r.json().get("error", {}).get("code")))
        if r.status_code == 200 and (503, "not_ready") in answers:
            break
        time.sleep(0.2)
    assert (503, "not_ready") in answers and answers[-1] == (200, None), answers
    assert set(answers) <= {(200, None), (503, "not_ready"), (503, "unavailable")}, answers


def test_a_model_replica_dying_under_a_request_answers_503_json_then_serves_again(slow_app):
    """The replica's process dies while the ingress waits for its answer (Ray Serve's gRPC transport between
    deployments, RAY_SERVE_THROUGHPUT_OPTIMIZED): a 503 with the JSON error body and Retry-After, never a 500;
    Serve restarts the replica and /ready answers 200 again."""
    deadline = time.monotonic() + 90
    while httpx.get(slow_app + "/ready", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.2)
    r = httpx.post(slow_app + "/v1/embeddings", json={"model": "slow", "input": "hello"}, timeout=60)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "unavailable", r.text
    while httpx.get(slow_app + "/ready", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the restart"
        time.sleep(0.2)
