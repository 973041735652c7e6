"""adapters_store/sources.py: URL sources are bounded (deadline, listing cap), allowed only by the policy, and
their errors never carry what the remote answered (issue 24: 2, 3, 8)."""
from __future__ import annotations

import tempfile
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterStore, BaseSchema
from tests.adapter_factory import make_lora
from tests.conftest import minilm_path
from tests.web_servers import SECRET, answer, folder_server, handler_server, huge_page, silent_url

PAGE = 50 * 1024**2


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


@pytest.fixture
def tmp(tmp_path, monkeypatch) -> Path:
    """The temporary folder downloads go to (checked empty afterwards)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


@pytest.mark.parametrize("content_length", [True, False], ids=["announced", "chunked"])
def test_a_huge_listing_page_is_refused_at_the_cap_without_reading_it_whole(tmp_path, tmp, schema, content_length):
    sent = [0]
    with handler_server(huge_page(PAGE, sent, content_length)) as (url, _):
        tracemalloc.start()
        try:
            with pytest.raises(AdapterError, match=r"over the 1048576-byte limit for the listing page") as caught:
                AdapterStore(tmp_path / "store").add("big", url + "/x/", schema=schema)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert url in str(caught.value)
    assert peak < 8 * 1024**2, f"{peak} bytes allocated for a {PAGE}-byte page refused at 1 MiB"
    assert sent[0] < PAGE // 2, f"the client took {sent[0]} of {PAGE} bytes"  # loopback buffers hold a few MiB
    assert list(tmp.iterdir()) == []


def test_a_url_that_never_answers_times_out_and_leaves_nothing(tmp_path, tmp, schema):
    from adapters_store.sources import SourcePolicy, SourceTimeout

    with silent_url() as url:
        start = time.monotonic()
        with pytest.raises(SourceTimeout, match=r"no complete answer within 1 s \(server config `source_timeout_s`\)"):
            AdapterStore(tmp_path / "store").add("slow", url, schema=schema, policy=SourcePolicy(timeout_s=1))
        assert time.monotonic() - start < 10
    assert list(tmp.iterdir()) == []


def test_any_filesystem_that_hangs_is_abandoned_at_the_deadline(tmp_path, tmp, schema, monkeypatch):
    """A filesystem call that never returns (no timeout of its own) keeps its thread, not the caller."""
    from fsspec.implementations.memory import MemoryFileSystem

    from adapters_store.sources import SourcePolicy, SourceTimeout

    release = threading.Event()
    monkeypatch.setattr(MemoryFileSystem, "isdir", lambda self, path: release.wait(60) and False)
    try:
        start = time.monotonic()
        with pytest.raises(SourceTimeout):
            AdapterStore(tmp_path / "store").add("hang", f"memory://hang-{uuid.uuid4().hex}/x", schema=schema,
                                                 policy=SourcePolicy(timeout_s=1))
        assert time.monotonic() - start < 10
        assert list(tmp.iterdir()) == []
    finally:
        release.set()


def test_the_servers_default_policy_allows_local_folders_only(tmp_path, schema):
    from adapters_store.sources import SourcePolicy, SourceRefused
    from serving.app.config import ServeConfig
    from serving.app.registrations import source_policy

    policy = source_policy(ServeConfig())
    assert policy == SourcePolicy(schemes=(), hosts=(), timeout_s=300, connect_timeout_s=10,
                                  max_listing_bytes=1024**2)
    store = AdapterStore(tmp_path / "store")
    src = make_lora(tmp_path / "src", schema, seed=1, layers=[0])
    assert store.add("a", src, schema=schema, policy=policy).version == 1
    assert store.add("a", f"file://{src}", schema=schema, policy=policy).version == 2
    for url in ("https://example.com/adapters/a/", "memory://bucket/a", "s3://bucket/a", "zip://x::http://h/a.zip"):
        with pytest.raises(SourceRefused, match=r"is not an allowed source \(server config `source_schemes`: none"):
            store.add("a", url, schema=schema, policy=policy)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "[::1]", "169.254.169.254", "10.1.2.3", "0.0.0.0"])
def test_hosts_that_are_not_public_are_refused_before_any_request(tmp_path, schema, host):
    from adapters_store.sources import SourcePolicy, SourceRefused

    policy = SourcePolicy(schemes=("http",), hosts=(), timeout_s=20)
    with handler_server(answer(200, b"")) as (url, hits):
        port = url.rsplit(":", 1)[1]
        with pytest.raises(SourceRefused, match=r"only public addresses are allowed unless the host is listed in the "
                                                 r"server config `source_hosts`"):
            AdapterStore(tmp_path / "store").add("a", f"http://{host}:{port}/x/", schema=schema, policy=policy)
    assert hits == []


def test_listed_hosts_only_and_redirects_are_checked_like_the_source(tmp_path, schema):
    from adapters_store.sources import SourcePolicy, SourceRefused

    src = make_lora(tmp_path / "src", schema, seed=2, layers=[0])
    policy = SourcePolicy(schemes=("http",), hosts=("127.0.0.1",), timeout_s=20)
    store = AdapterStore(tmp_path / "store")
    with folder_server(src.parent) as base:
        assert store.add("a", f"{base}/src", schema=schema, policy=policy).version == 1  # redirected to src/
        port = base.rsplit(":", 1)[1]
        with pytest.raises(SourceRefused, match=r"the host 'localhost' is not an allowed source \(server config "
                                                 r"`source_hosts`: 127.0.0.1\)"):
            store.add("a", f"http://localhost:{port}/src/", schema=schema, policy=policy)
        with handler_server(answer(302, b"", headers={"Location": f"http://localhost:{port}/src/"})) as (hop, hits):
            with pytest.raises(SourceRefused, match="'localhost' is not an allowed source"):
                store.add("a", hop + "/src/", schema=schema, policy=policy)
            assert hits == ["/src/"]
        public_only = SourcePolicy(schemes=("http",), hosts=(), timeout_s=20)
        with pytest.raises(SourceRefused, match="loopback address"):
            store.add("a", f"{base}/src/", schema=schema, policy=public_only)


@pytest.mark.parametrize("status", [200, 403, 404, 500])
def test_errors_never_carry_what_the_remote_answered(tmp_path, schema, status):
    page = f"<html>{SECRET} <a href='adapter_config.json'>x</a></html>".encode()
    with handler_server(answer(status, page, reason=f"Denied {SECRET}")) as (url, hits):
        with pytest.raises(AdapterError) as caught:
            AdapterStore(tmp_path / "store").add("a", url + "/x/", schema=schema)
    assert hits and SECRET not in str(caught.value)
    assert url in str(caught.value) and (status == 200 or f"HTTP {status}" in str(caught.value))


@pytest.mark.parametrize("field, value, message", [
    ("source_schemes", ["http://"], None), ("source_schemes", ["no scheme"], "is not a URL scheme"),
    ("source_hosts", ["http://models.example.com"], "is not a host name"),
    ("source_hosts", ["models.example.com:8080"], "is not a host name"),
])
def test_source_knobs_are_checked_where_the_config_is_read(field, value, message):
    from serving.app.config import ConfigError, load_config

    if message is None:
        assert load_config(None, **{field: value}).source_schemes == ["http"]
        return
    with pytest.raises(ConfigError, match=rf"(?s){field}.*{message}"):
        load_config(None, **{field: value})
    assert load_config(None, source_hosts=["Models.Example.com.", "[::1]", "*.corp"]).source_hosts == [
        "models.example.com", "::1", "*.corp"]
