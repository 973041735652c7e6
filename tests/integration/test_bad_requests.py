"""Bad requests: each gets its status and a JSON error body, and the server serves on afterwards."""
from __future__ import annotations

import gzip
import json

import pytest

from .conftest import ADMIN_KEY

KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}
OK = {"model": "cls-a", "input": "hello"}


def _with(**fields):
    return {**OK, **fields}


# (id, method, path, json body or raw bytes, headers, status, error code or None)
CASES = [
    ("malformed-json", "POST", "/v1/classify", b'{"model": "cls-a", "input":', {}, 400, "invalid_json"),
    ("not-json", "POST", "/v1/classify", b"hello there", {}, 400, "invalid_json"),
    ("invalid-utf8", "POST", "/v1/classify", b'{"model": "\xff\xfe"}', {}, 400, "invalid_json"),
    ("deep-nesting", "POST", "/v1/classify", b'{"model": "cls-a", "input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     {}, 400, "invalid_json"),
    ("empty-body", "POST", "/v1/classify", b"", {}, 400, "invalid_json"),
    ("top-level-array", "POST", "/v1/classify", [OK], {}, 422, "invalid_field"),
    ("top-level-null", "POST", "/v1/classify", b"null", {}, 422, "invalid_field"),
    ("model-int", "POST", "/v1/classify", _with(model=5), {}, 422, "invalid_field"),
    ("model-null", "POST", "/v1/classify", _with(model=None), {}, 422, "invalid_field"),
    ("model-missing", "POST", "/v1/classify", {"input": "hi"}, {}, 422, "invalid_field"),
    ("input-missing", "POST", "/v1/classify", {"model": "cls-a"}, {}, 422, "invalid_field"),
    ("input-int", "POST", "/v1/classify", _with(input=7), {}, 422, "invalid_field"),
    ("input-object", "POST", "/v1/classify", _with(input={"text": "hi"}), {}, 422, "invalid_field"),
    ("input-ints-on-classify", "POST", "/v1/classify", _with(input=[1, 2, 3]), {}, 422, "invalid_field"),
    ("input-empty-list", "POST", "/v1/classify", _with(input=[]), {}, 422, "empty_input"),
    ("input-empty-string", "POST", "/v1/classify", _with(input=""), {}, 422, "empty_input"),
    ("input-list-with-empty-string", "POST", "/v1/classify", _with(input=["ok", ""]), {}, 422, "empty_input"),
    ("model-empty-list", "POST", "/v1/classify", _with(model=[]), {}, 422, "invalid_field"),
    ("threshold-out-of-range", "POST", "/v1/classify", _with(threshold=2), {}, 422, "invalid_field"),
    ("threshold-string", "POST", "/v1/classify", _with(threshold="0.5"), {}, 422, "invalid_field"),
    ("unknown-adapter", "POST", "/v1/classify", _with(model="nope"), {}, 404, "model_not_found"),
    ("one-unknown-among-models", "POST", "/v1/classify", _with(model=["cls-a", "nope"]), {}, 404, "model_not_found"),
    ("name-traversal", "POST", "/v1/classify", _with(model="../x"), {}, 404, "model_not_found"),
    ("name-encoded-traversal", "POST", "/v1/classify", _with(model="%2e%2e"), {}, 404, "model_not_found"),
    ("name-absolute-path", "POST", "/v1/classify", _with(model="/etc/passwd"), {}, 404, "model_not_found"),
    ("name-nul", "POST", "/v1/classify", _with(model="cls-a\x00"), {}, 404, "model_not_found"),
    ("name-10kb", "POST", "/v1/classify", _with(model="a" * 10_000), {}, 404, "model_not_found"),
    ("name-reserved", "POST", "/v1/classify", _with(model="none"), {}, 404, "model_not_found"),
    ("too-many-items", "POST", "/v1/classify", _with(input=["x"] * 65), {}, 413, "too_many_items"),
    ("too-many-rows-models-x-inputs", "POST", "/v1/classify",
     _with(model=["cls-a", "cls-b", "ml", "lazy"], input=["x"] * 17), {}, 413, "too_many_items"),
    ("too-many-tokens", "POST", "/v1/classify", _with(input="word " * 600), {}, 413, "too_many_tokens"),
    ("oversized-body", "POST", "/v1/classify", _with(input="x" * 300_000), {}, 413, "body_too_large"),
    # several models in one request (multi-task): the same checks as one name, plus the list's own
    ("models-duplicate", "POST", "/v1/classify", _with(model=["cls-a", "cls-b", "cls-a"]), {}, 422,
     "duplicate_model"),
    ("models-duplicate-base-aliases", "POST", "/v1/classify", _with(model=["base", "all-MiniLM-L6-v2"]), {}, 422,
     "duplicate_model"),
    ("models-over-max-models", "POST", "/v1/classify", _with(model=[f"m{i}" for i in range(9)]), {}, 413,
     "too_many_models"),
    ("models-not-all-strings", "POST", "/v1/classify", _with(model=["cls-a", 5]), {}, 422, "invalid_field"),
    ("models-nested-list", "POST", "/v1/classify", _with(model=[["cls-a"]]), {}, 422, "invalid_field"),
    ("models-traversal-in-list", "POST", "/v1/classify", _with(model=["cls-a", "../x"]), {}, 404,
     "model_not_found"),
    ("models-tagger-among-classifiers", "POST", "/v1/classify", _with(model=["cls-a", "ml", "ner"]), {}, 422,
     "wrong_task"),
    ("models-classifier-among-taggers", "POST", "/v1/tag", _with(model=["ner", "cls-a"]), {}, 422, "wrong_task"),
    ("models-unknown-among-taggers", "POST", "/v1/tag", _with(model=["ner", "nope"]), {}, 404, "model_not_found"),
    ("models-empty-list-on-tag", "POST", "/v1/tag", _with(model=[]), {}, 422, "invalid_field"),
    ("models-x-inputs-on-tag", "POST", "/v1/tag", _with(model=["ner", "ner-b"], input=["x"] * 33), {}, 413,
     "too_many_items"),
    ("wrong-task-tagger-on-classify", "POST", "/v1/classify", _with(model="ner"), {}, 422, "wrong_task"),
    ("wrong-task-classifier-on-tag", "POST", "/v1/tag", _with(model="cls-a"), {}, 422, "wrong_task"),
    ("wrong-task-base-on-classify", "POST", "/v1/classify", _with(model="all-MiniLM-L6-v2"), {}, 422, "wrong_task"),
    ("wrong-task-no-head-on-tag", "POST", "/v1/tag", _with(model="emb"), {}, 422, "wrong_task"),
    ("tag-unknown-aggregation", "POST", "/v1/tag", {"model": "ner", "input": "x", "aggregation_strategy": "longest"},
     {}, 422, "invalid_field"),
    ("embeddings-bad-format", "POST", "/v1/embeddings", {"model": "emb", "input": "x", "encoding_format": "int8"},
     {}, 422, "invalid_field"),
    ("embeddings-dimensions", "POST", "/v1/embeddings", {"model": "emb", "input": "x", "dimensions": 10}, {},
     422, "invalid_field"),
    ("embeddings-token-outside-vocab", "POST", "/v1/embeddings", {"model": "emb", "input": [999_999]}, {},
     422, "invalid_input"),
    ("embeddings-empty-token-list", "POST", "/v1/embeddings", {"model": "emb", "input": [[]]}, {}, 422, "empty_input"),
    ("embeddings-unknown-model", "POST", "/v1/embeddings", {"model": "gpt-4", "input": "x"}, {}, 404,
     "model_not_found"),
    ("admin-list-without-key", "GET", "/v1/adapters", None, {}, 401, "missing_api_key"),
    ("admin-list-wrong-key", "GET", "/v1/adapters", None, {"Authorization": "Bearer nope"}, 403, "invalid_api_key"),
    ("admin-basic-auth", "GET", "/v1/adapters", None, {"Authorization": "Basic dXNlcjpwYXNz"}, 401,
     "missing_api_key"),
    ("name-pinned-version-of-static", "POST", "/v1/classify", _with(model="cls-a@1"), {}, 404, "model_not_found"),
    ("name-version-zero", "POST", "/v1/classify", _with(model="cls-a@0"), {}, 404, "model_not_found"),
    ("name-version-not-a-number", "POST", "/v1/classify", _with(model="cls-a@latest"), {}, 404, "model_not_found"),
    ("admin-add-without-key", "POST", "/v1/adapters", {"name": "x", "source": "/tmp"}, {}, 401, "missing_api_key"),
    ("admin-add-invalid-name", "POST", "/v1/adapters", {"name": "../x", "source": "/tmp"}, KEY, 422, "invalid_name"),
    ("admin-add-source-not-a-folder", "POST", "/v1/adapters", {"name": "x1", "source": "/nonexistent/x"}, KEY,
     422, "adapter_invalid"),
    ("admin-add-static-name", "POST", "/v1/adapters", {"name": "cls-a", "source": "/tmp"}, KEY, 422,
     "adapter_invalid"),
    ("admin-add-pinned-name", "POST", "/v1/adapters", {"name": "x1@2", "source": "/tmp"}, KEY, 422, "invalid_name"),
    ("admin-add-missing-source", "POST", "/v1/adapters", {"name": "x1"}, KEY, 422, "invalid_field"),
    ("admin-delete-without-key", "DELETE", "/v1/adapters/cls-a", None, {}, 401, "missing_api_key"),
    ("admin-delete-wrong-key", "DELETE", "/v1/adapters/cls-a", None, {"Authorization": "Bearer no"}, 403,
     "invalid_api_key"),
    ("admin-delete-unknown", "DELETE", "/v1/adapters/nope", None, KEY, 404, "model_not_found"),
    ("admin-delete-unknown-version", "DELETE", "/v1/adapters/cls-a@3", None, KEY, 404, "model_not_found"),
    ("admin-delete-encoded-traversal", "DELETE", "/v1/adapters/%2e%2e%2fx", None, KEY, 404, None),
    ("admin-delete-encoded-nul", "DELETE", "/v1/adapters/a%00b", None, KEY, 404, "model_not_found"),
    ("admin-add-source-name-too-long", "POST", "/v1/adapters", {"name": "x1", "source": "/tmp/" + "a" * 5000}, KEY,
     422, "adapter_invalid"),
    # JSON's \ud800 escapes parse to unpaired surrogates: no tokenizer takes them, no UTF-8 response holds them
    ("input-unpaired-surrogate", "POST", "/v1/classify", _with(input="ab\ud800cd"), {}, 400, "invalid_unicode"),
    ("input-unpaired-low-surrogate-in-list", "POST", "/v1/tag", {"model": "ner", "input": ["ok", "x\udfff"]}, {},
     400, "invalid_unicode"),
    ("input-surrogate-as-utf8-bytes", "POST", "/v1/embeddings", b'{"model": "emb", "input": "a\xed\xa0\x80"}', {},
     400, "invalid_json"),  # not UTF-8
    ("utf16-body-with-surrogate-escape", "POST", "/v1/embeddings",
     json.dumps({"model": "emb", "input": "a\ud800"}).encode("utf-16"), {}, 400, "invalid_json"),  # UTF-8 only
    ("utf16-body", "POST", "/v1/classify", json.dumps(OK).encode("utf-16"), {}, 400, "invalid_json"),
    ("unknown-field-name-unpaired-surrogate", "POST", "/v1/classify", {**OK, "k\ud83d": 1}, {}, 400,
     "invalid_unicode"),
    ("admin-add-labels-unpaired-surrogate", "POST", "/v1/adapters", {"name": "x1", "source": "/tmp",
                                                                     "labels": ["a", "\ud800"]}, KEY, 400,
     "invalid_unicode"),
    ("gzip-body", "POST", "/v1/classify", gzip.compress(json.dumps(OK).encode()),
     {"Content-Encoding": "gzip"}, 415, "unsupported_encoding"),
    ("unknown-route", "GET", "/v1/nothing", None, {}, 404, "route_not_found"),
    ("wrong-method", "GET", "/v1/classify", None, {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_status_and_json_error(client, case):
    _, method, path, body, headers, status, code = case
    if isinstance(body, (bytes, type(None))):
        r = client.request(method, path, content=body, headers={"content-type": "application/json", **headers})
    else:
        r = client.request(method, path, content=json.dumps(body), headers={"content-type": "application/json",
                                                                            **headers})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error


def test_admin_add_broken_adapter_is_refused_and_not_registered(client, adapter_dirs):
    r = client.post("/v1/adapters", headers=KEY, json={"name": "broken", "source": str(adapter_dirs["broken"])})
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_invalid", r.text
    assert client.post("/v1/classify", json=_with(model="broken")).status_code == 404


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/classify", json=_with(user="u1", temperature=0.3, extra={"deep": [1, 2]}))
    assert r.status_code == 200, r.text
    r = client.post("/v1/embeddings", json={"model": "emb", "input": "x", "user": "u1", "foo": None})
    assert r.status_code == 200, r.text


def test_server_still_serves_after_the_bad_requests(client):
    for case in CASES[:5]:
        client.request(case[1], case[2], content=case[3])
    assert client.get("/ready").status_code == 200
    assert client.post("/v1/classify", json=OK).status_code == 200


def test_an_adapter_whose_weights_overflow_answers_422_not_nan(client, tmp_path):
    """Its weights are finite (they pass validation) but overflow in the forward: a 422 naming it, never NaN in
    a response (not JSON) nor a 500; the server answers other requests as usual."""
    from adapters_store import BaseSchema
    from tests.adapter_factory import make_overflowing_lora
    from tests.conftest import minilm_path

    folder = make_overflowing_lora(tmp_path / "huge", BaseSchema.from_config_dir(minilm_path()))
    assert client.post("/v1/adapters", headers=KEY, json={"name": "huge", "source": str(folder)}).status_code == 201
    for path, body in (("/v1/classify", {"model": "huge", "input": ["hello", "world"]}),
                       ("/v1/embeddings", {"model": "huge", "input": "hello"}),
                       ("/v1/classify", {"model": ["cls-a", "huge"], "input": "hello"})):
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "non_finite_output" and "'huge'" in error["message"], error
    assert client.post("/v1/classify", json=OK).status_code == 200
    assert client.delete("/v1/adapters/huge", headers=KEY).status_code == 200


def test_a_utf8_body_with_a_byte_order_mark_is_read(client):
    r = client.post("/v1/classify", content="\ufeff".encode() + json.dumps(OK).encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
