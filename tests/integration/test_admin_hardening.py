"""The admin and store path: nothing one registration, one URL or one client does may break the server for
others (issue 24): who counts as a local admin behind a proxy, names that must match exactly."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.app.access import is_local_client
from serving.app.config import ServeConfig


def _request(peer: str, headers: dict | None = None):
    return SimpleNamespace(client=SimpleNamespace(host=peer, port=40000), headers=headers or {},
                           scope={"type": "http", "client": (peer, 40000)})


def _ingress(**cfg):
    from serving.app.http import Ingress

    obj = object.__new__(Ingress.func_or_class)
    obj.cfg = ServeConfig(admin_api_key=None, **cfg)
    return obj


@pytest.mark.parametrize("peer, headers, trusted, local", [
    ("127.0.0.1", {}, (), True),
    ("::1", {}, (), True),
    ("10.0.0.5", {}, (), False),
    # a same-host proxy that passes the client's own header on (or adds none) relays someone else's request
    ("127.0.0.1", {"x-forwarded-for": "127.0.0.1"}, (), False),
    ("127.0.0.1", {"forwarded": "for=127.0.0.1"}, (), False),
    ("127.0.0.1", {"x-real-ip": "203.0.113.7"}, (), False),
    # a configured proxy: the address it appended last is the client
    ("10.0.0.2", {"x-forwarded-for": "127.0.0.1, 203.0.113.7"}, ("10.0.0.2",), False),
    ("10.0.0.2", {"x-forwarded-for": "203.0.113.7, 127.0.0.1"}, ("10.0.0.2",), True),
    ("10.0.0.3", {"x-forwarded-for": "127.0.0.1"}, ("10.0.0.2",), False),
])
def test_a_local_admin_is_decided_from_the_socket_peer_and_configured_proxies_only(peer, headers, trusted, local):
    assert is_local_client(_request(peer, headers).scope, headers, trusted) is local


def test_without_an_admin_key_a_relayed_request_is_refused():
    from serving.app.http import ApiError

    ingress = _ingress()
    ingress._check_admin(_request("127.0.0.1"))
    with pytest.raises(ApiError) as err:
        ingress._check_admin(_request("127.0.0.1", {"x-forwarded-for": "127.0.0.1"}))
    assert err.value.status == 403 and "proxy" in err.value.message
    _ingress(forwarded_allow_ips=["127.0.0.1"])._check_admin(_request("127.0.0.1", {"x-forwarded-for": "::1"}))


def test_ray_workers_make_uvicorn_trust_no_forwarded_header(urls):
    """Serve's proxy and direct ingress run uvicorn, which rewrites a request's client from X-Forwarded-For when
    the peer is in FORWARDED_ALLOW_IPS (its default: 127.0.0.1): start_local_ray sets it for every worker."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def trusted() -> str | None:
        return os.environ.get("FORWARDED_ALLOW_IPS")

    assert ray.get(trusted.remote(), timeout=60) == ""


def test_a_name_with_a_trailing_newline_deletes_nothing(client, admin_headers, adapter_dirs):
    """Starlette matches `{name:path}` with `$`, which also matches before a final newline: DELETE
    /v1/adapters/name%0a deleted `name`."""
    r = client.post("/v1/adapters", json={"name": "nl-victim", "source": str(adapter_dirs["ver-1"])},
                    headers=admin_headers)
    assert r.status_code == 201, r.text
    try:
        r = client.delete("/v1/adapters/nl-victim%0a", headers=admin_headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert client.get("/v1/models/nl-victim%0a").status_code == 404
        r = client.post("/v1/classify", json={"model": "nl-victim", "input": "still here"})
        assert r.status_code == 200, r.text
    finally:
        client.delete("/v1/adapters/nl-victim", headers=admin_headers)
