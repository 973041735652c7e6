"""GET /openapi.json and /docs under real Ray Serve (direct ingress and Serve's proxy, at / and at a route
prefix): the schema is a valid OpenAPI document of every route with its body, answer and error statuses, real
answers match it, the Swagger UI page renders in a real headless Chromium with no request leaving the
machine, `openapi: false` turns both off; a trailing slash answers a JSON 404 naming the route, never an
empty 307."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from ray import serve

from serving.app.config import ServeConfig
from serving.app.http import Ingress, app
from serving.app.openapi import OPERATIONS, api_routes, undocumented

from .conftest import ADMIN_KEY, wait_for

KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}
ON, OFF = ("polyhead-docs", "/docs-prefix"), ("polyhead-nodocs", "/nodocs")
EXPECTED = {("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("get", "/v1/models"),
            ("get", "/v1/models/{model}"), ("post", "/v1/classify"), ("post", "/v1/tag"), ("post", "/v1/embeddings"),
            ("get", "/v1/adapters"), ("post", "/v1/adapters"), ("delete", "/v1/adapters/{name}"),
            ("get", "/v1/experiments"), ("get", "/v1/experiments/{name}"), ("put", "/v1/experiments/{name}"),
            ("delete", "/v1/experiments/{name}"), ("get", "/v1/experiments/{name}/report"), ("post", "/v1/feedback")}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StubModel:
    """Enough of ModelServer for an ingress whose docs are looked at (no base model is loaded)."""

    def info(self) -> dict:
        return {"model_name": "stub", "max_tokens": 512, "hidden_size": 384, "vocab_size": 30522, "causal": False,
                "draining": False}

    async def list_adapters(self) -> list:
        return []


@pytest.fixture(scope="module")
def prefixed(proxy):
    """Two more apps on Serve's proxy, the real Ingress on a stub model: docs on at ON's prefix, off at OFF's."""
    for (name, prefix), on in ((ON, True), (OFF, False)):
        data = ServeConfig(openapi=on).model_dump()
        serve.run(Ingress.options(ray_actor_options={"num_cpus": 0.05}).bind(StubModel.bind(), data), name=name,
                  route_prefix=prefix)
    try:
        for _, prefix in (ON, OFF):
            wait_for(lambda: httpx.get(proxy + prefix + "/health", timeout=30).status_code == 200, timeout=60)
        yield {"on": proxy + ON[1], "off": proxy + OFF[1]}
    finally:
        for name, _ in (ON, OFF):
            serve.delete(name)


def _spec(base: str) -> dict:
    r = httpx.get(base + "/openapi.json", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text[:300]
    return r.json()


def _check_answer(spec: dict, method: str, path: str, response: httpx.Response) -> None:
    """`response` is one the schema lists for that operation, and its body matches the schema given there."""
    answers = spec["paths"][path][method]["responses"]
    assert str(response.status_code) in answers, (method, path, response.status_code, sorted(answers))
    content = answers[str(response.status_code)]["content"]
    if "text/plain" in content:
        assert response.headers["content-type"].startswith("text/plain")
        return
    schema = {**content["application/json"]["schema"], "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(response.json())


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_openapi_json_is_a_valid_schema_of_every_route(urls, via):
    spec = _spec(urls[via])
    validate(spec)  # openapi-spec-validator: a valid OpenAPI 3.1 document
    served = {(m.lower(), r.path_format) for r in api_routes(app) if r.include_in_schema for m in r.methods}
    listed = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert served == listed == EXPECTED, (served ^ EXPECTED, listed ^ EXPECTED)
    assert undocumented(app) == [] and set(OPERATIONS) == EXPECTED
    for (method, path), op in OPERATIONS.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == {*map(str, op.statuses), *map(str, op.errors)}, (method, path)
        for status in op.errors:
            ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorBody"
    assert spec["components"]["schemas"]["ErrorDetail"]["required"] == ["message", "type", "code"]
    # the request bodies are http.py's own models, fields and constraints included
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    classify = spec["components"]["schemas"][body.rsplit("/", 1)[1]]
    assert {"model", "input", "threshold"} <= set(classify["properties"]) and classify["required"] == ["model", "input"]
    assert classify["properties"]["threshold"]["maximum"] == 1
    tag = spec["components"]["schemas"]["TagBody"]["properties"]["aggregation_strategy"]
    assert set(tag["enum"]) == {"none", "simple", "first", "average", "max"}
    assert spec["paths"]["/v1/adapters"]["post"]["security"] == [{"adminKey": []}]
    assert spec["paths"]["/v1/experiments/{name}"]["put"]["security"] == [{"adminKey": []}]
    assert spec["paths"]["/v1/feedback"]["post"]["security"] == [{"apiKey": []}, {}]
    assert {"200", "201", "409", "422"} <= set(spec["paths"]["/v1/experiments/{name}"]["put"]["responses"])
    classify_ok = spec["paths"]["/v1/classify"]["post"]["responses"]["200"]
    assert set(classify_ok["headers"]) == {"X-Polyhead-Experiment", "X-Polyhead-Arm"}
    assert {"400", "404", "413", "422", "429", "503"} <= set(spec["paths"]["/v1/embeddings"]["post"]["responses"])
    assert "servers" not in spec  # the app at /: paths are absolute


def test_real_answers_match_the_schema(urls):
    spec = _spec(urls["direct"])
    with httpx.Client(base_url=urls["direct"], timeout=60) as c:
        calls = [("get", "/health", c.get("/health")), ("get", "/ready", c.get("/ready")),
                 ("get", "/metrics", c.get("/metrics")), ("get", "/v1/models", c.get("/v1/models")),
                 ("get", "/v1/models/{model}", c.get("/v1/models/cls-a")),
                 ("get", "/v1/models/{model}", c.get("/v1/models/no-such-adapter")),
                 ("post", "/v1/classify", c.post("/v1/classify", json={"model": ["cls-a", "ml"], "input": "hi"})),
                 ("post", "/v1/classify", c.post("/v1/classify", json={"model": "cls-a", "input": 3})),
                 ("post", "/v1/classify", c.post("/v1/classify", content=b"{", headers={"content-type": "x"})),
                 ("post", "/v1/tag", c.post("/v1/tag", json={"model": "ner", "input": "Ada lived in London"})),
                 ("post", "/v1/embeddings", c.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]})),
                 ("post", "/v1/embeddings", c.post("/v1/embeddings", json={"model": "emb", "input": "a",
                                                                           "encoding_format": "base64"})),
                 ("get", "/v1/adapters", c.get("/v1/adapters", headers=KEY)),
                 ("get", "/v1/adapters", c.get("/v1/adapters", headers={"Authorization": "Bearer wrong"})),
                 ("delete", "/v1/adapters/{name}", c.delete("/v1/adapters/no-such-adapter", headers=KEY))]
    statuses = [r.status_code for *_, r in calls]
    assert statuses == [200, 200, 200, 200, 200, 404, 200, 422, 400, 200, 200, 200, 200, 403, 404], statuses
    for method, path, response in calls:
        _check_answer(spec, method, path, response)
    labels = calls[6][2].json()["data"][1]
    assert "labels" in labels  # a multi-label answer's own field is in the schema (not only allowed)
    assert "labels" in spec["components"]["schemas"]["ClassifyItem"]["properties"]


def test_experiment_and_feedback_answers_match_the_schema(urls, adapter_dirs):
    spec = _spec(urls["direct"])
    exp, report = "/v1/experiments/{name}", "/v1/experiments/{name}/report"
    arms = {"arms": [{"name": "a", "adapter": "oapi-x", "weight": 1.0},
                     {"name": "b", "adapter": "oapi-x@1", "weight": 1.0}]}
    with httpx.Client(base_url=urls["direct"], timeout=60) as c:
        added = c.post("/v1/adapters", json={"name": "oapi-x", "source": str(adapter_dirs["ver-1"])}, headers=KEY)
        assert added.status_code == 201, added.text
        try:
            calls = [("put", exp, c.put("/v1/experiments/oapi-exp", json=arms, headers=KEY)),
                     ("put", exp, c.put("/v1/experiments/oapi-exp", json={**arms, "if_version": 1}, headers=KEY)),
                     ("put", exp, c.put("/v1/experiments/oapi-exp", json={**arms, "if_version": 7}, headers=KEY)),
                     ("put", exp, c.put("/v1/experiments/oapi-exp", json={"arms": []}, headers=KEY)),
                     ("get", "/v1/experiments", c.get("/v1/experiments", headers=KEY)),
                     ("get", exp, c.get("/v1/experiments/oapi-exp", headers=KEY)),
                     ("get", exp, c.get("/v1/experiments/no-such-exp", headers=KEY)),
                     ("post", "/v1/classify", c.post("/v1/classify", json={"model": "oapi-exp", "input": "hi",
                                                                           "user": "u1"}))]
            served = calls[-1][2]
            assert served.status_code == 200, served.text
            assert served.headers["X-Polyhead-Experiment"] == "oapi-exp" and served.headers["X-Polyhead-Arm"] in "ab"
            assert served.json()["data"][0]["model"] == "oapi-x@1", served.json()
            answer_id = served.json()["id"]
            calls += [("post", "/v1/feedback", c.post("/v1/feedback", json={"id": answer_id, "value": 1})),
                      ("post", "/v1/feedback", c.post("/v1/feedback", json={"id": answer_id, "value": 0.5})),
                      ("post", "/v1/feedback", c.post("/v1/feedback", json={"id": "cls-00", "value": True})),
                      ("post", "/v1/feedback", c.post("/v1/feedback", json={"id": answer_id})),
                      ("get", report, c.get("/v1/experiments/oapi-exp/report", headers=KEY)),
                      ("get", report, c.get("/v1/experiments/no-such-exp/report", headers=KEY)),
                      ("delete", exp, c.delete("/v1/experiments/oapi-exp", headers=KEY)),
                      ("delete", exp, c.delete("/v1/experiments/oapi-exp", headers=KEY))]
        finally:
            c.delete("/v1/experiments/oapi-exp", headers=KEY)
            c.delete("/v1/adapters/oapi-x", headers=KEY)
    statuses = [r.status_code for *_, r in calls]
    assert statuses == [201, 200, 409, 422, 200, 200, 404, 200, 200, 409, 404, 422, 200, 404, 200, 404], \
        [(r.status_code, r.text[:200]) for *_, r in calls]
    for method, path, response in calls:
        _check_answer(spec, method, path, response)
    assert calls[8][2].json()["counted"] == [{"experiment": "oapi-exp", "arm": served.headers["X-Polyhead-Arm"]}]
    assert [a["name"] for a in calls[12][2].json()["arms"]] == ["a", "b"]


def _assets(html: str) -> list[str]:
    return re.findall(r'(?:href|src)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


@pytest.mark.parametrize("via", ["direct", "proxy-prefix"])
def test_docs_page_and_its_assets_come_from_the_app(urls, prefixed, via):
    base = urls["direct"] if via == "direct" else prefixed["on"]
    r = httpx.get(base + "/docs", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:300]
    refs = _assets(r.text)
    prefix = urlsplit(base).path
    assets = [f"{prefix}/docs/assets/{n}" for n in ("swagger-ui.css", "favicon.png", "swagger-ui-bundle.js")]
    assert sorted(refs) == sorted([*assets, f"{prefix}/openapi.json"]), refs
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(base))
    for ref in refs:
        got = httpx.get(origin + ref, timeout=30)
        assert got.status_code == 200 and len(got.content) > 1000, (ref, got.status_code)
    if via == "proxy-prefix":  # Swagger UI's "try it out" must call the app at its prefix
        assert _spec(base)["servers"] == [{"url": prefix}]
    missing = httpx.get(base + "/docs/assets/redoc.standalone.js", timeout=30)  # in the package, not served
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "route_not_found"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:  # a failure, not a skip: .ci/run installs it (apt-get install chromium)
        pytest.fail("headless Chromium is needed to check the /docs page: apt-get install -y --no-install-recommends "
                    "chromium (.ci/run does it)")
    return found


@pytest.mark.parametrize("via", ["direct", "proxy-prefix"])
def test_docs_page_renders_every_operation_offline_in_headless_chromium(urls, prefixed, via, tmp_path):
    base = urls["direct"] if via == "direct" else prefixed["on"]
    netlog = tmp_path / "net.json"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
           f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={netlog}",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves: any CDN fails
           "--virtual-time-budget=15000", "--dump-dom", base + "/docs"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    blocks = re.findall(r'class="opblock opblock-(\w+)[^"]*".*?data-path="([^"]+)"', dom, re.S)
    assert {(m, p) for m, p in blocks} == EXPECTED, (sorted(blocks), dom[:2000])
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(base))
    asked = _page_requests(netlog.read_text(), origin)  # Chromium's own traffic (updates...) is not the page's
    prefix = urlsplit(base).path
    assert {f"{origin}{prefix}/docs/assets/swagger-ui-bundle.js", f"{origin}{prefix}/docs/assets/swagger-ui.css",
            f"{origin}{prefix}/openapi.json"} <= asked, asked
    outside = {u for u in asked if not u.startswith(origin + "/")}
    assert not outside, f"the docs page asked for resources off the server: {sorted(outside)}"


def _page_requests(netlog: str, origin: str) -> set[str]:
    """The URLs of the requests a page of `origin` made (initiator: that origin), from Chromium's NetLog."""
    log = json.loads(netlog)
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return {e["params"]["url"] for e in log["events"]
            if e["type"] == start and e.get("params", {}).get("initiator") == origin}


def test_openapi_false_turns_the_schema_and_the_docs_off(prefixed):
    for path in ("/openapi.json", "/docs", "/docs/assets/swagger-ui-bundle.js"):
        r = httpx.get(prefixed["off"] + path, timeout=30)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "route_not_found", r.text
    assert httpx.get(prefixed["on"] + "/openapi.json", timeout=30).status_code == 200


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_a_trailing_slash_is_a_json_404_naming_the_route_never_an_empty_307(urls, via):
    with httpx.Client(base_url=urls[via], timeout=60, follow_redirects=False) as c:
        for method, path, bare in (("POST", "/v1/classify/", "/v1/classify"), ("GET", "/health/", "/health"),
                                   ("POST", "/v1/tag/", "/v1/tag")):
            r = c.request(method, path, json={"model": "cls-a", "input": "hi"}, headers=KEY)
            assert r.status_code == 404, (path, r.status_code, r.headers, r.text)
            error = r.json()["error"]
            assert error["code"] == "route_not_found" and error["message"].endswith(f"without the trailing "
                                                                                    f"slash, {bare}"), error
        r = c.get("/v1/nothing/")
        assert r.status_code == 404 and "trailing slash" not in r.json()["error"]["message"], r.text
