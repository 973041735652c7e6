"""POST /v1/adapters from URLs (issue 24: 2, 8): a source that never answers stalls nothing else, registrations
beyond max_concurrent_registrations answer 429, and only allowed URLs are fetched, with errors that never carry
what the remote answered."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.web_servers import SECRET, answer, handler_server, silent_url

from .conftest import ADMIN_KEY, wait_ready

APP, PREFIX = "polyhead-sources", "/sources"
KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}
LIMIT, TIMEOUT_S, CALLS = 2, 3.0, 16


@pytest.fixture(scope="module")
def sources_app(proxy, tmp_path_factory):
    """An app beside the shared one: a 3 s source deadline, 2 registrations at a time, store lookups that
    miss the cache after 0.2 s (every few rows go to the store)."""
    from ray import serve

    from serving.app import build_app

    app = build_app({"num_threads": 1, "num_cpus": 0.5, "max_slots": 4, "admin_api_key": ADMIN_KEY,
                     "store_root": str(tmp_path_factory.mktemp("sources-store")), "store_ttl_s": 0.2,
                     "metrics_push_s": 0.5, "source_schemes": ["http"], "source_hosts": ["127.0.0.1"],
                     "source_timeout_s": TIMEOUT_S, "max_concurrent_registrations": LIMIT})
    serve.run(app, name=APP, route_prefix=PREFIX)
    try:
        wait_ready(proxy + PREFIX)
        yield proxy + PREFIX
    finally:
        serve.delete(APP)


def _error(r: httpx.Response) -> dict:
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "code"}, r.text
    return r.json()["error"]


def test_a_url_that_never_answers_stalls_no_published_adapter(sources_app, adapter_dirs):
    with httpx.Client(base_url=sources_app, timeout=60) as c:
        r = c.post("/v1/adapters", headers=KEY, json={"name": "steady", "source": str(adapter_dirs["cls-b"])})
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
        assert c.post("/v1/classify", json={"model": "steady@1", "input": "warm"}).status_code == 200

    async def scenario(url: str):
        async with httpx.AsyncClient(base_url=sources_app, timeout=60,
                                     limits=httpx.Limits(max_connections=None)) as c:
            posts = asyncio.gather(*[c.post("/v1/adapters", headers=KEY, json={"name": f"slow-{i}", "source": url})
                                     for i in range(CALLS)])
            posts = asyncio.ensure_future(posts)
            waits = []
            while not posts.done():
                start = time.monotonic()
                r = await c.post("/v1/classify", json={"model": "steady@1", "input": "still here"}, timeout=10)
                assert r.status_code == 200, r.text
                waits.append(time.monotonic() - start)
                await asyncio.sleep(0.25)
            return await posts, waits

    with silent_url() as url:
        start = time.monotonic()
        answers, waits = asyncio.run(scenario(url))
        elapsed = time.monotonic() - start
    codes = sorted(r.status_code for r in answers)
    busy = [r for r in answers if r.status_code == 429]
    assert len(busy) >= CALLS - 2 * LIMIT and set(codes) == {422, 429}, codes
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1
        assert _error(r)["code"] == "registrations_busy" and "max_concurrent_registrations" in _error(r)["message"]
    for r in answers:
        if r.status_code == 422:
            assert _error(r)["code"] == "source_timeout" and "`source_timeout_s`" in _error(r)["message"], r.text
    assert elapsed < 4 * TIMEOUT_S + 20, elapsed  # the timed-out fetches ended at their deadline
    assert len(waits) >= 4 and max(waits) < 10, waits  # classify kept answering throughout
    with httpx.Client(base_url=sources_app, timeout=60) as c:  # nothing was published, the slots are free again
        listed = c.get("/v1/adapters", headers=KEY).json()["data"]
        assert [a["name"] for a in listed] == ["steady"]
        r = c.post("/v1/adapters", headers=KEY, json={"name": "steady", "source": str(adapter_dirs["cls-a"])})
        assert r.status_code == 201 and r.json()["version"] == 2, r.text


def test_sources_outside_the_allow_list_are_refused_naming_the_knob(client, admin_headers):
    with handler_server(answer(200, b"<a href='adapter_config.json'>x</a>")) as (url, hits):
        port = url.rsplit(":", 1)[1]
        cases = {f"http://localhost:{port}/x/": "`source_hosts`", f"http://127.0.0.2:{port}/x/": "`source_hosts`",
                 f"https://127.0.0.1:{port}/x/": "`source_schemes`", "memory://bucket/x": "`source_schemes`",
                 "s3://bucket/x": "`source_schemes`"}
        for source, knob in cases.items():
            r = client.post("/v1/adapters", headers=admin_headers, json={"name": "probe", "source": source})
            assert r.status_code == 422 and _error(r)["code"] == "source_not_allowed", (source, r.text)
            assert knob in _error(r)["message"] and source[:30] in _error(r)["message"], r.text
        assert hits == []
        with handler_server(answer(302, b"", headers={"Location": f"http://localhost:{port}/x/"})) as (hop, hops):
            r = client.post("/v1/adapters", headers=admin_headers, json={"name": "probe", "source": hop + "/x/"})
        assert r.status_code == 422 and _error(r)["code"] == "source_not_allowed" and hops == ["/x/"], r.text
        assert hits == []  # the redirect's target was never asked


@pytest.mark.parametrize("status", [200, 401, 500])
def test_what_a_probed_service_answers_never_reaches_the_error(client, admin_headers, status):
    page = f"<html>{SECRET}: internal details <a href='adapter_config.json'>{SECRET}</a></html>".encode()
    with handler_server(answer(status, page, reason=f"Nope {SECRET}")) as (url, hits):
        r = client.post("/v1/adapters", headers=admin_headers, json={"name": "probe", "source": url + "/x/"})
    assert hits and r.status_code == 422 and _error(r)["code"] == "adapter_invalid", r.text
    assert SECRET not in r.text and url in _error(r)["message"]
