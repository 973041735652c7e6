"""One Ray instance and one served app for the whole integration suite (Ray is heavy on 2 cores).

Ray runs as `polyhead serve` runs it, with Serve's direct ingress: `server` is the URL where the app's
ingress replica answers HTTP itself (what clients of `make serve` reach); `proxy` is Ray Serve's proxy,
which serves the same app one hop further and every app the tests deploy beside it (at their prefixes).

One app, "polyhead" at /, with an admin key, several static adapters, an AdapterStore root for
admin registrations (`store_root`, looked up with a short TTL) and small limits (64 rows per
request, 8 models, 200 KB bodies, 32 ongoing + 64 queued rows at the model) so that limits are cheap
to hit. Replicas push their metrics every 0.1 s; Ray's per-node metrics agent reports every 0.5 s.
test_multi_replica.py deploys a second app with two replicas of each deployment beside it.
"""
from __future__ import annotations

import json
import time
from typing import Callable
from pathlib import Path

import httpx
import pytest

from tests.adapter_factory import make_lora
from tests.conftest import minilm_path

ADMIN_KEY = "test-admin-key"
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _with_labels(folder: Path, labels: list[str], problem_type: str | None = None) -> Path:
    cfg = {"num_labels": len(labels), "id2label": {str(i): lab for i, lab in enumerate(labels)}}
    if problem_type:
        cfg["problem_type"] = problem_type
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    from serving import Engine

    schema = Engine.from_pretrained(str(minilm_path()), max_slots=1).schema
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        "cls-a": _with_labels(make_lora(root / "cls-a", schema, seed=1, head="SEQ_CLS", num_labels=3),
                              ["neg", "neu", "pos"]),
        "cls-b": make_lora(root / "cls-b", schema, seed=2, head="SEQ_CLS", num_labels=2),
        "ml": _with_labels(make_lora(root / "ml", schema, seed=3, head="SEQ_CLS", num_labels=4),
                           ["a", "b", "c", "d"], "multi_label_classification"),
        "ner": _with_labels(make_lora(root / "ner", schema, seed=4, head="TOKEN_CLS", num_labels=5), NER_LABELS),
        "ner-b": _with_labels(make_lora(root / "ner-b", schema, seed=9, head="TOKEN_CLS", num_labels=5), NER_LABELS),
        "emb": make_lora(root / "emb", schema, seed=5),
        "lazy": make_lora(root / "lazy", schema, seed=6, head="SEQ_CLS", num_labels=2),
        "victim": make_lora(root / "victim", schema, seed=7, head="SEQ_CLS", num_labels=2),
        "late": make_lora(root / "late", schema, seed=8, head="SEQ_CLS", num_labels=3),  # admin-added
        # versions of one name, published through the admin route / the store
        "ver-1": make_lora(root / "ver-1", schema, seed=11, head="SEQ_CLS", num_labels=2),
        "ver-2": make_lora(root / "ver-2", schema, seed=12, head="SEQ_CLS", num_labels=2),
        "ver-3": make_lora(root / "ver-3", schema, seed=13, head="SEQ_CLS", num_labels=2),
    }
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    dirs["broken"] = broken
    return dirs


@pytest.fixture(scope="session")
def engine(adapter_dirs):
    """The in-process oracle: every served row must equal this engine's row run alone."""
    from serving import Engine

    eng = Engine.from_pretrained(str(minilm_path()), max_slots=16)
    for name in ("cls-a", "cls-b", "ml", "ner", "ner-b", "emb", "late", "ver-1", "ver-2", "ver-3"):
        eng.load_adapter(name, adapter_dirs[name])
    return eng


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    """The served app's AdapterStore root (what several replicas or `polyhead adapters add` would share)."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def urls(adapter_dirs, store_root):
    """{"direct": the app's ingress replica, "proxy": Ray Serve's proxy}."""
    import ray
    from ray import serve

    from serving.app import build_app, direct_ingress_url, free_port, free_ports, start_local_ray

    port = free_port()
    ports = free_ports(8)
    start_local_ray(4, direct_ingress_ports=ports, log_to_driver=False,
                    _system_config={"metrics_report_interval_ms": 500})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        static = ("cls-a", "cls-b", "ml", "ner", "ner-b", "emb", "lazy", "victim")
        served = {k: str(v) for k, v in adapter_dirs.items() if k in static}
        main = build_app({"max_batch_size": 16, "batch_wait_timeout_s": 0.15, "max_ongoing_requests": 32,
                          "max_queued_requests": 64, "max_pending_rows": 64, "max_model_calls": 2, "num_threads": 2, "num_cpus": 1, "max_slots": 8,
                          "admin_api_key": ADMIN_KEY, "adapters": served, "max_items": 64, "max_models": 8,
                          "max_body_bytes": 200_000, "store_root": str(store_root), "store_ttl_s": 0.2,
                          "metrics_push_s": 0.1,
                          # a fixed admission limit of 64 rows (64 requests at each gate): the flood and gate tests
                          # count refusals against it; admission by expected wait: test_admission, test_burst
                          "max_queue_wait_s": 0,
                          # URL sources from the tests' own web servers on 127.0.0.1 (default: local folders only)
                          "source_schemes": ["http"], "source_hosts": ["127.0.0.1"]})
        serve.run(main, name="polyhead", route_prefix="/")
        direct = direct_ingress_url("polyhead", ports)
        wait_ready(direct)
        yield {"direct": direct, "proxy": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def server(urls) -> str:
    """The app's own ingress replica (direct ingress): where `make serve` clients send requests."""
    return urls["direct"]


@pytest.fixture(scope="session")
def proxy(urls) -> str:
    """Ray Serve's HTTP proxy: the same app at /, and the apps tests deploy beside it at their prefixes."""
    return urls["proxy"]


def wait_ready(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}/ready did not answer 200 within {timeout} s")


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def proxy_client(proxy):
    with httpx.Client(base_url=proxy, timeout=60) as c:
        yield c


@pytest.fixture
def admin_headers():
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


# /metrics ---------------------------------------------------------------------------------------

Samples = dict[tuple, float]


def parse_metrics(text: str) -> Samples:
    """(sample name, sorted label items) -> value, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(m: Samples, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def ray_node_metrics() -> Samples:
    """What Ray's metrics agent exports on this (one-node) cluster's metrics port."""
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text
    return parse_metrics(text)


def total(m: Samples, name: str, **labels) -> float:
    """The sum of `name` over every label combination that has `labels` (e.g. over replicas)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def scrape(client, prefix: str = "") -> Samples:
    r = client.get(prefix + "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def metrics(client, prefix: str = "", settle_s: float = 0.35, timeout: float = 30) -> Samples:
    """GET /metrics once every replica's latest values reached the hub: two answers settle_s apart agree
    (replicas push every 0.1 s here; /metrics itself changes no series). While the hub starts, /metrics
    answers 503: retried."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            now = scrape(client, prefix)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            now = None
        if now is not None and (now == last or time.monotonic() > deadline):
            return now
        last = now
        time.sleep(settle_s)


def wait_for(check: Callable[[], object], timeout: float = 20, every: float = 0.3):
    """check() until it returns something truthy (or raises no AssertionError); its last failure after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = check()
            if out:
                return out
            failure = AssertionError(f"{check} returned {out!r}")
        except AssertionError as exc:
            failure = exc
        if time.monotonic() > deadline:
            raise failure
        time.sleep(every)
