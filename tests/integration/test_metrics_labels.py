"""/metrics series that mean what they say (the session's app, real Ray Serve, real Prometheus text): requests
no route answers are counted under route "unknown" (never their path), build_info names the version, and each
adapter an answered request named gets its latency observed. The per-replica gauges of two model replicas are
checked in test_multi_replica.py."""
from __future__ import annotations

from importlib.metadata import version

from .conftest import metrics, sample


def test_requests_no_route_answers_are_counted_under_route_unknown(client):
    before = metrics(client)
    paths = ["/no/such/route", "/v1/classify/", "/v1/nothing-" + "x" * 50]
    assert [client.get(p).status_code for p in paths] == [404, 404, 404]
    assert client.post("/health").status_code == 405
    assert client.post("/v1/classify/", json={"model": "cls-a", "input": "hi"}).status_code == 404
    r = client.get("/metrics")
    after = metrics(client)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("polyhead_requests_total", route="unknown", code="404") == 4
    assert delta("polyhead_requests_total", route="unknown", code="405") == 1
    assert delta("polyhead_errors_total", route="unknown", adapter="none", type="route_not_found") == 4
    assert delta("polyhead_errors_total", route="unknown", adapter="none", type="method_not_allowed") == 1
    assert "/no/such" not in r.text and "nothing-x" not in r.text  # the path is never a label value


def test_build_info_names_the_running_version(client):
    m = metrics(client)
    series = [(k, v) for k, v in m.items() if k[0] == "polyhead_build_info"]
    assert series == [(("polyhead_build_info", (("version", version("polyhead")),)), 1.0)], series


def test_each_adapter_an_answered_request_named_gets_its_latency(client):
    before = metrics(client)
    for _ in range(2):
        r = client.post("/v1/classify", json={"model": ["cls-a", "ml"], "input": ["one", "two"]})
        assert r.status_code == 200, r.text
    assert client.post("/v1/classify", json={"model": "cls-b", "input": "three"}).status_code == 200
    assert client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "four"}).status_code == 200
    assert client.post("/v1/classify", json={"model": ["cls-a", "no-such-adapter"], "input": "x"}).status_code == 404
    after = metrics(client)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    name = "polyhead_adapter_request_seconds_count"
    assert delta(name, route="classify", adapter="cls-a") == 2  # one per request, not per row; the 404 is not
    assert delta(name, route="classify", adapter="ml") == 2
    assert delta(name, route="classify", adapter="cls-b") == 1
    assert delta(name, route="embeddings", adapter="base") == 1
    assert not [k for k in after if ("adapter", "no-such-adapter") in k[1]]
    slowest = delta("polyhead_adapter_request_seconds_sum", route="classify", adapter="cls-a")
    assert 0 < slowest <= delta("polyhead_request_seconds_sum", route="classify")
    # the buckets add up to the count (a real histogram)
    assert delta("polyhead_adapter_request_seconds_bucket", route="classify", adapter="cls-b", le="+Inf") == 1


def test_gauges_are_written_to_rays_export_again_each_push_interval():
    """Ray's per-node export keeps a gauge's value only for a TTL after it was set: an idle model replica's
    slot gauges (set by batches and loads) vanished from it. MetricsPusher refreshes them every interval."""
    from serving.app.metrics import MODEL_SERIES, Recorder

    class RayGauge:
        def __init__(self):
            self.sets = []

        def set(self, value, tags):
            self.sets.append((value, tags))

        def inc(self, value, tags):
            raise AssertionError("a counter is never written again")

    rec = Recorder(MODEL_SERIES, ray_export=False)
    gauge, counter = rec.max_slots.labels(), rec.slot_loads.labels()
    counter.inc(2)
    gauge.ray, counter.ray = RayGauge(), RayGauge()
    gauge.set(4)
    rec.refresh_gauges()
    rec.refresh_gauges()
    assert gauge.ray.sets == [(4, {})] * 3
