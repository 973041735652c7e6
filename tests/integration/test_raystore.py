"""adapters_store/raystore.py on the test session's Ray: an AdapterStore whose files live in one folder that
only the StoreHost actor touches, reached through Ray (what nodes that share nothing but Ray use)."""
from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterStore, BaseSchema
from adapters_store import listing
from adapters_store.raystore import RayStoreFileSystem, StoreHost
from serving.experiments.persist import ExperimentStore
from tests.adapter_factory import make_lora
from tests.conftest import minilm_path


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


@pytest.fixture
def ray_store(urls, tmp_path):
    """(store, the actor's folder): a fresh raystore:// store on the session's Ray (urls: Ray is up)."""
    folder = tmp_path / f"held-{uuid.uuid4().hex[:8]}"
    return AdapterStore(f"raystore://{folder}", cache_dir=tmp_path / "cache"), folder


def lora(tmp_path: Path, schema: BaseSchema, seed: int) -> Path:
    return make_lora(tmp_path / f"src-{seed}-{uuid.uuid4().hex[:6]}", schema, seed=seed, layers=[0],
                     head="SEQ_CLS", num_labels=2)


def test_a_version_goes_through_the_actor_and_is_cached_by_its_hash(ray_store, tmp_path, schema):
    store, folder = ray_store
    src = lora(tmp_path, schema, 1)
    v1 = store.add("m", src, schema=schema, labels=["no", "yes"])
    assert (folder / "m" / "1" / "COMMITTED").read_text() == v1.sha256  # on the actor's disk, committed last
    assert sorted(p.name for p in (folder / "m" / "1").iterdir()) == sorted(
        ["COMMITTED", "polyhead.json", "adapter_config.json", "adapter_model.safetensors"])
    assert not (tmp_path / "cache").exists()  # nothing downloaded before it is resolved
    got = store.resolve("m")
    assert got == v1 and got.path == tmp_path / "cache" / v1.sha256 and got.labels == ("no", "yes")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert hashlib.sha256((got.path / name).read_bytes()).digest() == hashlib.sha256(
            (src / name).read_bytes()).digest()
    v2 = store.add("m", lora(tmp_path, schema, 2), schema=schema)
    assert [x.ref for x in store.list()] == ["m@1", "m@2"] and store.resolve("m") == v2
    before = listing.change_token(store)
    assert store.remove("m", 1) == [v1]
    assert listing.change_token(store) != before  # the change mark replicas converge on
    assert [x.ref for x in store.list()] == ["m@2"]
    with pytest.raises(AdapterError, match="unknown version m@1"):
        store.resolve("m@1")
    assert store.add("m", src, schema=schema).version == 3  # a removed number is never handed out again


def test_a_corrupted_file_on_the_actors_disk_is_refused_when_fetched(ray_store, tmp_path, schema):
    store, folder = ray_store
    v = store.add("c", lora(tmp_path, schema, 3), schema=schema)
    path = folder / "c" / "1" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(AdapterError, match="does not match its recorded sha256"):
        store.resolve("c")
    assert not (tmp_path / "cache" / v.sha256).exists()


def test_concurrent_registrations_claim_distinct_numbers_through_the_actor(ray_store, tmp_path, schema):
    store, _ = ray_store
    sources = [lora(tmp_path, schema, 10 + i) for i in range(4)]
    results, errors = [], []

    def add(src):
        try:
            results.append(store.add("race", src, schema=schema).version)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [1, 2, 3, 4]


def test_experiments_persist_in_a_raystore_store(ray_store):
    store, folder = ray_store
    experiments = ExperimentStore(store.url)
    assert experiments._create(f"{folder}/.experiments/x/1.json", b"{}")
    assert not experiments._create(f"{folder}/.experiments/x/1.json", b"{\"other\": 1}")  # exclusive
    assert (folder / ".experiments" / "x" / "1.json").read_bytes() == b"{}"
    assert experiments._listdir(f"{folder}/.experiments/x") == ["1.json"]


def test_the_actor_serves_absolute_paths_without_dot_dot_only(tmp_path):
    host = StoreHost()
    for bad in ("relative/x", f"{tmp_path}/../x", f"{tmp_path}/./x"):
        with pytest.raises(ValueError, match="not an absolute path"):
            host.cat(bad)
    assert host.cat(f"{tmp_path}/missing") == ("missing", None)
    assert host.put(f"{tmp_path}/a/b", b"1", True) == ("ok", None)
    assert host.put(f"{tmp_path}/a/b", b"2", True) == ("exists", None)
    assert host.put(f"{tmp_path}/a/b", b"3", False) == ("ok", None)
    assert host.cat(f"{tmp_path}/a/b") == ("ok", b"3") and host.find(f"{tmp_path}/a") == ("ok", [f"{tmp_path}/a/b"])
    assert list((tmp_path / "a").iterdir()) == [tmp_path / "a" / "b"]  # no temporary file left


def test_a_node_caches_under_its_own_ray_node_id(urls):
    import ray

    cache = RayStoreFileSystem().cache_dir
    assert cache.name == ray.get_runtime_context().get_node_id() and cache.parent.name == "raystore"
