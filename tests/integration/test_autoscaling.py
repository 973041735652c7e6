"""ServeConfig.autoscaling under a real Ray Serve: model replicas grow from 1 to 2 on the rows queued at them, and go
back to 1 once the load stops (serving/app/autoscale.py, ModelServer.record_autoscaling_stats).

The load is 3 clients with 16 rows per request: 3 requests in flight never call for a second replica by requests
(target 8 per replica), their 48 rows do."""
from __future__ import annotations

import threading

import httpx
import pytest

from .conftest import wait_for, wait_ready

APP, PREFIX = "polyhead-autoscale", "/autoscale"
CLIENTS, ROWS = 3, 16
TEXTS = ["the cat sat on the mat", "Ada Lovelace lived in London", "polyhead serves many adapters at once", "short"]


@pytest.fixture(scope="module")
def autoscaled(proxy, adapter_dirs, tmp_path_factory):
    from ray import serve

    from serving.app import build_app
    from serving.app.config import ServeConfig

    cfg = ServeConfig(autoscaling={"min_replicas": 1, "max_replicas": 2, "target_queued_rows": 8,
                                   "upscale_delay_s": 0.5, "downscale_delay_s": 1.0, "look_back_period_s": 1.5},
                      max_batch_size=16, batch_wait_timeout_s=0.0, num_threads=1, num_cpus=0.5, ingress_num_cpus=0.05,
                      metrics_push_s=1.0, store_root=str(tmp_path_factory.mktemp("autoscale-store")),
                      adapters={"cls-a": str(adapter_dirs["cls-a"])}, max_queue_wait_s=0, coalesce_window_ms=0)
    serve.run(build_app(cfg), name=APP, route_prefix=PREFIX)
    try:
        wait_ready(proxy + PREFIX)
        yield proxy + PREFIX
    finally:
        serve.delete(APP)


def model_replicas() -> dict[str, int]:
    """ModelServer's replicas by state (RUNNING, STARTING, STOPPING, ...), as Serve reports them."""
    from ray import serve

    deployment = serve.status().applications[APP].deployments["ModelServer"]
    return {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items() if n}


def reported_queued_rows() -> float:
    """The most queued rows any ModelServer replica reported to Serve's controller within the look-back window."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    metrics = ray.get(controller._get_metrics_for_deployment_for_testing.remote(
        DeploymentID(name="ModelServer", app_name=APP)), timeout=30)
    return max((point.value for series in metrics.get("queued_rows", []) for point in series), default=0.0)


class Load:
    """CLIENTS threads, each posting ROWS rows to /v1/classify again as soon as it is answered, until stopped."""

    def __init__(self, url: str):
        self.url, self.stop, self.statuses = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        body = {"model": "cls-a", "input": [TEXTS[i % len(TEXTS)] for i in range(ROWS)]}
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    self.statuses.append(c.post("/v1/classify", json=body).status_code)
                except httpx.HTTPError as exc:  # counted, never a silently dead client
                    self.statuses.append(type(exc).__name__)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a load client did not finish within 60 s"


def test_model_replicas_grow_on_queued_rows_and_shrink_when_idle(autoscaled):
    assert model_replicas() == {"RUNNING": 1}
    with Load(autoscaled) as load:
        try:
            wait_for(lambda: model_replicas() == {"RUNNING": 2}, timeout=60, every=0.5)
        except AssertionError:
            raise AssertionError(f"{CLIENTS} clients x {ROWS} rows did not bring ModelServer to 2 running replicas "
                                 f"within 60 s: {model_replicas()}") from None
        rows = wait_for(reported_queued_rows, timeout=30)  # what the policy scaled on, still in the window
        assert rows >= ROWS, f"replicas reported at most {rows} queued rows under {CLIENTS} x {ROWS}-row requests"
    assert load.statuses and set(load.statuses) == {200}, sorted(set(map(str, load.statuses)))
    try:
        wait_for(lambda: model_replicas() == {"RUNNING": 1}, timeout=60, every=0.5)
    except AssertionError:
        raise AssertionError(f"ModelServer did not go back to 1 replica within 60 s of idleness: "
                             f"{model_replicas()}") from None
    with httpx.Client(base_url=autoscaled, timeout=60) as c:  # the remaining replica still answers
        r = c.post("/v1/classify", json={"model": "cls-a", "input": TEXTS})
        assert r.status_code == 200, r.text
