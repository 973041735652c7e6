"""Inference API keys (serving/app/access.py) and request logs (serving/app/logs.py).

`polyhead serve` is started as `make serve` starts it, with inference keys from $POLYHEAD_API_KEY and an admin
key in its config: its stdout must hold one JSON line per request (no Ray prefix, no key, no input text), its
inference routes must answer 401 in OpenAI's shape without a right key and serve the official openai client
with one, and the admin and inference keys must not open each other's routes. The shared app (no inference
keys) checks that X-Request-Id is echoed on every kind of answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from serving.app import free_port
from serving.app.access import InferenceKeys, bearer_token
from serving.app.config import ServeConfig, load_config

from .test_ray_loopback import ROOT, _stop, _wait_ready

INFER_KEYS = ("sk-infer-one-5f1c", "sk-infer-two-9a7e")
ADMIN = "sk-admin-only-3d2b"
SECRET = "Ada Lovelace wrote the secret note on Tuesday"  # an input text: never in a log line


# config and key checks, without Ray -------------------------------------------------------------

def test_api_keys_come_from_the_config_or_the_comma_separated_env_and_are_checked(monkeypatch):
    monkeypatch.delenv("POLYHEAD_API_KEY", raising=False)
    assert ServeConfig().api_keys is None and ServeConfig().log_level == "INFO"
    monkeypatch.setenv("POLYHEAD_API_KEY", " k1, k2 ,")
    assert ServeConfig().api_keys == ["k1", "k2"]
    assert ServeConfig(api_keys=["own"]).api_keys == ["own"]  # the config wins
    assert ServeConfig(api_keys=[]).api_keys == []  # explicitly none: the env is not read
    assert ServeConfig(log_level="warning").log_level == "WARNING"


@pytest.mark.parametrize("fields,where", [
    ({"api_keys": ["has space"]}, "api_keys"),
    ({"api_keys": [""]}, "api_keys"),
    ({"api_keys": ["a,b"]}, "api_keys"),
    ({"api_keys": ["same"], "admin_api_key": "same"}, "admin key"),
    ({"log_level": "verbose"}, "log_level"),
])
def test_bad_key_and_log_settings_are_refused_without_echoing_the_keys(fields, where, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(fields))
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert where in str(err.value)
    for key in fields.get("api_keys", []):
        if len(key) > 1:
            assert key not in str(err.value)


def test_inference_keys_accept_any_configured_key_and_nothing_else():
    keys = InferenceKeys(["alpha-1", "beta-2"])
    assert keys.refusal("Bearer alpha-1") is None and keys.refusal("bearer  beta-2 ") is None
    assert keys.refusal(None)[0] == keys.refusal("Bearer ")[0] == keys.refusal("Basic YWxwaGEtMQ==")[0] \
        == "missing_api_key"
    for wrong in ("Bearer alpha", "Bearer alpha-1x", "Bearer ALPHA-1", "Bearer beta-2 alpha-1"):
        assert keys.refusal(wrong)[0] == "invalid_api_key", wrong
    assert InferenceKeys(None).refusal(None) is None and InferenceKeys([]).refusal("Bearer x") is None
    assert bearer_token("Bearer  tok ") == "tok" and bearer_token("Token tok") is None


def test_adapter_sources_are_logged_without_credentials_and_levels_filter_lines(monkeypatch):
    from serving.app import logs

    assert logs.safe_source("s3://AKIA:secret@bucket/a/b?X-Amz-Signature=abc#x") == "s3://bucket/a/b"
    assert logs.safe_source("https://user:pw@host:8443/p?token=t") == "https://host:8443/p"
    assert logs.safe_source("/data/adapters/mine?x") == "/data/adapters/mine"
    raw = []
    monkeypatch.setattr(logs, "sink", raw.append)
    monkeypatch.setattr(logs, "_level", None)
    logs.configure("WARNING")
    for status in (200, 404, 401, 403, 503):
        logs.emit({"status": status, "model": "a name with spaces"})
    lines = [json.loads(line) for line in raw]
    assert [line["status"] for line in lines] == [401, 403, 503]
    assert [line["level"] for line in lines] == ["warning", "warning", "error"]
    # one word to Ray's driver, which folds alike lines of several processes after dropping words with digits
    assert all(" " not in line for line in raw) and lines[0]["model"] == "a name with spaces"


# X-Request-Id on the shared app --------------------------------------------------------------------

@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/health", None, 200),
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/embeddings", {"model": "emb", "input": "hello"}, 200),
    ("POST", "/v1/embeddings", {"model": "emb", "input": ""}, 422),
    ("POST", "/v1/classify", {"model": "no-such-adapter", "input": "x"}, 404),
    ("GET", "/v1/nothing-here", None, 404),
    ("GET", "/v1/adapters", None, 401),
])
def test_every_answer_echoes_the_request_id_given_or_one_of_its_own(client, method, path, body, status):
    given = client.request(method, path, json=body, headers={"X-Request-Id": "given-id-42"})
    assert given.status_code == status, given.text
    assert given.headers.get_list("x-request-id") == ["given-id-42"]
    first, second = (client.request(method, path, json=body) for _ in range(2))
    assert first.status_code == second.status_code == status
    ids = [r.headers["x-request-id"] for r in (first, second)]
    assert all(len(i) >= 16 for i in ids) and ids[0] != ids[1]


def test_without_inference_keys_the_inference_routes_stay_open(client):
    r = client.post("/v1/embeddings", json={"model": "emb", "input": "open"})
    assert r.status_code == 200, r.text


# polyhead serve with keys: stdout, 401s, the openai client ---------------------------------------

@pytest.fixture(scope="module")
def keyed(tmp_path_factory, adapter_dirs):
    """`polyhead serve` with inference keys ($POLYHEAD_API_KEY, two) and an admin key; its stdout and stderr
    apart."""
    tmp = tmp_path_factory.mktemp("keyed")
    port = free_port()
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "port": port, "num_threads": 1, "num_cpus": 1, "max_slots": 4, "admin_api_key": ADMIN,
        "store_root": str(tmp / "store"), "adapters": {"emb": str(adapter_dirs["emb"])}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "POLYHEAD_ADMIN_API_KEY")}
    env["POLYHEAD_API_KEY"] = ",".join(INFER_KEYS)
    # on a loaded machine Ray's agents start slowly and the raylet gives up after its default waits
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    env.setdefault("RAY_agent_register_timeout_ms", "120000")
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        _wait_ready(proc, port, err, 300)
        yield {"url": f"http://127.0.0.1:{port}", "stdout": out, "stderr": err, "late": adapter_dirs["late"]}
    finally:
        _stop(proc)


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _log_lines(path: Path) -> list[dict]:
    """stdout's request lines: every line that is not polyhead's own banner must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("polyhead: ")]
    return [json.loads(line) for line in lines if line not in own]


def _wait_lines(path: Path, ids: set[str], timeout: float = 30) -> dict[str, list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        by_id: dict[str, list[dict]] = {}
        for line in _log_lines(path):
            by_id.setdefault(line.get("request_id"), []).append(line)
        if ids <= set(by_id) or time.monotonic() > deadline:
            missing = ids - set(by_id)
            assert not missing, f"no log line for {missing} in:\n{path.read_text()[-3000:]}"
            return by_id
        time.sleep(0.5)


def test_inference_needs_a_key_in_openais_shape_and_the_probes_stay_open(keyed):
    url = keyed["url"]
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + path, timeout=30).status_code == 200, path
    body = {"model": "emb", "input": SECRET}
    for headers, code in [({}, "missing_api_key"), (_bearer("sk-wrong"), "invalid_api_key"),
                          (_bearer(ADMIN), "invalid_api_key"),  # the admin key is not an inference key
                          ({"Authorization": f"Basic {INFER_KEYS[0]}"}, "missing_api_key")]:
        r = httpx.post(url + "/v1/embeddings", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                      "code": code}}
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(url + "/v1/models", headers=_bearer(INFER_KEYS[1]), timeout=30).status_code == 200


def test_the_openai_client_with_a_key_gets_embeddings_and_a_wrong_key_an_authentication_error(keyed):
    import openai

    good = openai.OpenAI(api_key=INFER_KEYS[0], base_url=keyed["url"] + "/v1", max_retries=0)
    out = good.embeddings.create(model="emb", input=[SECRET, "second"])
    assert len(out.data) == 2 and len(out.data[0].embedding) == 384 and out.usage.prompt_tokens > 2
    bad = openai.OpenAI(api_key="sk-not-a-key", base_url=keyed["url"] + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.embeddings.create(model="emb", input=[SECRET])
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_admin_and_inference_keys_do_not_open_each_others_routes(keyed):
    url = keyed["url"]
    assert httpx.get(url + "/v1/adapters", headers=_bearer(INFER_KEYS[0]), timeout=30).status_code == 403
    assert httpx.get(url + "/v1/adapters", headers=_bearer(ADMIN), timeout=30).status_code == 200
    r = httpx.post(url + "/v1/classify", json={"model": "emb", "input": "x"}, headers=_bearer(ADMIN), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_polyhead_serve_prints_one_json_line_per_request_without_keys_or_inputs(keyed):
    url, key = keyed["url"], _bearer(INFER_KEYS[1])
    added = httpx.post(url + "/v1/adapters", json={"name": "late", "source": str(keyed["late"])},
                       headers={**_bearer(ADMIN), "X-Request-Id": "log-admin-add"}, timeout=120)
    assert added.status_code == 201, added.text
    emb = httpx.post(url + "/v1/embeddings", json={"model": "emb", "input": [SECRET, "two"]},
                     headers={**key, "X-Request-Id": "log-embed"}, timeout=60)
    assert emb.status_code == 200 and emb.headers["x-request-id"] == "log-embed"
    cls = httpx.post(url + "/v1/classify", json={"model": ["late"], "input": SECRET}, headers=key,
                     timeout=60)
    assert cls.status_code == 200, cls.text
    generated = cls.headers["x-request-id"]
    denied = httpx.post(url + "/v1/classify", json={"model": "late", "input": SECRET},
                        headers={"Authorization": "Bearer sk-guess", "X-Request-Id": "log-denied"}, timeout=30)
    missing = httpx.get(url + "/v1/no-such-route", headers={**key, "X-Request-Id": "log-404"}, timeout=30)
    assert (denied.status_code, missing.status_code) == (401, 404)
    removed = httpx.delete(url + "/v1/adapters/late", headers={**_bearer(ADMIN), "X-Request-Id": "log-admin-rm"},
                           timeout=60)
    assert removed.status_code == 200, removed.text

    ids = {"log-admin-add", "log-embed", generated, "log-denied", "log-404", "log-admin-rm"}
    by_id = _wait_lines(keyed["stdout"], ids)
    assert all(len(by_id[i]) == 1 for i in ids), {i: by_id[i] for i in ids}  # one line per request
    line = by_id["log-embed"][0]
    assert set(line) >= {"time", "level", "request_id", "method", "path", "route", "model", "resolved", "status",
                         "code", "rows", "tokens", "latency_ms", "client"}
    assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).year >= 2024
    assert (line["method"], line["path"], line["route"], line["model"], line["resolved"], line["status"],
            line["code"], line["rows"], line["client"], line["level"]) == (
        "POST", "/v1/embeddings", "embeddings", "emb", ["emb"], 200, None, 2, "127.0.0.1", "info")
    assert line["tokens"] == emb.json()["usage"]["prompt_tokens"] and line["latency_ms"] > 0
    line = by_id[generated][0]  # a store adapter: the version it resolved to
    assert (line["route"], line["model"], line["resolved"], line["status"], line["rows"]) == (
        "classify", ["late"], ["late@1"], 200, 1)
    line = by_id["log-denied"][0]
    assert (line["status"], line["code"], line["level"], line["rows"]) == (401, "invalid_api_key", "warning", None)
    assert (by_id["log-404"][0]["status"], by_id["log-404"][0]["code"]) == (404, "route_not_found")
    add, rm = by_id["log-admin-add"][0], by_id["log-admin-rm"][0]
    assert (add["action"], add["adapter"], add["source"], add["version"], add["status"], add["client"]) == (
        "adapter.add", "late", str(keyed["late"]), 1, 201, "127.0.0.1")
    assert (rm["action"], rm["adapter"], rm["status"]) == ("adapter.remove", "late", 200)

    printed = keyed["stdout"].read_text() + keyed["stderr"].read_text()
    for secret in (*INFER_KEYS, ADMIN, "sk-guess", SECRET, "Bearer"):
        assert secret not in printed, secret
    assert "(ServeReplica" not in keyed["stdout"].read_text()  # Ray's prefix: lines are printed as written
