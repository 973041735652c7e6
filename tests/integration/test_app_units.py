"""Pieces of serving/app checked without Ray: BIO merging, config, the Serve config file, admin access."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from serving.app.config import ConfigError, ServeConfig, load_config
from serving.app.tagging import merge_entities, split_tag

ROOT = Path(__file__).resolve().parents[2]


# tagging --------------------------------------------------------------------------------------

def ents(tags, text, offsets, scores=None):
    scores = scores or [1.0] * len(tags)
    return [(e["entity"], e["start"], e["end"], e["word"]) for e in merge_entities(tags, scores, offsets, text)]


TEXT = "Ada Lovelace in London"
OFFSETS = [(0, 0), (0, 3), (4, 8), (8, 12), (13, 15), (16, 22), (0, 0)]  # [CLS] ada love ##lace in london [SEP]


@pytest.mark.parametrize("tags, expected", [
    (["O"] * 7, []),
    (["O", "B-PER", "I-PER", "I-PER", "O", "B-LOC", "O"], [("PER", 0, 12, "Ada Lovelace"), ("LOC", 16, 22, "London")]),
    (["O", "B-PER", "B-PER", "I-PER", "O", "O", "O"], [("PER", 0, 3, "Ada"), ("PER", 4, 12, "Lovelace")]),
    (["O", "I-PER", "I-PER", "O", "O", "I-LOC", "O"], [("PER", 0, 8, "Ada Love"), ("LOC", 16, 22, "London")]),
    (["O", "B-PER", "I-LOC", "O", "O", "O", "O"], [("PER", 0, 3, "Ada"), ("LOC", 4, 8, "Love")]),
    (["B-PER", "B-PER", "I-PER", "I-PER", "O", "O", "I-PER"], [("PER", 0, 12, "Ada Lovelace")]),  # specials
    (["O", "PER", "PER", "O", "O", "O", "O"], [("PER", 0, 8, "Ada Love")]),  # bare tags continue
])
def test_bio_tags_merge_into_entities_with_offsets(tags, expected):
    assert ents(tags, TEXT, OFFSETS) == expected


def test_entity_score_is_the_mean_of_its_tokens():
    (e,) = merge_entities(["O", "B-PER", "I-PER", "O"], [1, 0.5, 1.0, 1], [(0, 0), (0, 3), (4, 8), (0, 0)], TEXT)
    assert e["score"] == pytest.approx(0.75)


def test_merge_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        merge_entities(["O"], [1.0, 1.0], [(0, 1)], "x")


def test_split_tag():
    assert split_tag("B-PER") == ("B", "PER") and split_tag("i_loc") == ("I", "loc")
    assert split_tag("O") == ("O", None) and split_tag("MISC") == ("I", "MISC")


# config ---------------------------------------------------------------------------------------

def test_config_defaults_and_derived_values():
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.admin_api_key is None
    assert cfg.resolved_model_name() == "all-MiniLM-L6-v2" and Path(cfg.resolved_base_dir()).is_dir()
    assert cfg.replica_cpus() == cfg.num_threads
    assert ServeConfig(adapters={"a": "/x"}).adapters["a"].path == "/x"


@pytest.mark.parametrize("fields, message", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_size": 64, "max_ongoing_requests": 8}, "must be >= max_batch_size"),
    ({"dtype": "float8"}, "dtype"),
    ({"port": 70000}, "port"),
    ({"adapters": {"../x": "/tmp"}}, "invalid adapter name"),
    ({"max_batch_sise": 4}, "max_batch_sise"),
])
def test_invalid_config_says_which_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **fields)


def test_serve_config_file_is_a_valid_ray_serve_config_and_a_valid_app_config():
    from ray.serve.schema import ServeDeploySchema

    path = ROOT / "deploy" / "serve_config.yaml"
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app" and app.route_prefix == "/"
    assert schema.http_options.host == "127.0.0.1"
    cfg = load_config(path)
    assert cfg.port == raw["http_options"]["port"] and cfg.max_ongoing_requests >= cfg.max_batch_size


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("max_slots: -1\n")
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*max_slots"):
        load_config(bad)


# admin access without a key -------------------------------------------------------------------

def _ingress(key):
    from serving.app.http import Ingress

    obj = object.__new__(Ingress.func_or_class)
    obj.cfg = ServeConfig(admin_api_key=key)
    return obj


def _request(host, headers=None):
    return SimpleNamespace(client=SimpleNamespace(host=host), headers=headers or {})


def test_without_admin_key_only_local_clients_are_admins():
    from serving.app.http import ApiError

    ingress = _ingress(None)
    ingress._check_admin(_request("127.0.0.1"))
    with pytest.raises(ApiError) as err:
        ingress._check_admin(_request("10.0.0.5"))
    assert err.value.status == 403


def test_with_admin_key_the_client_address_does_not_matter():
    from serving.app.http import ApiError

    ingress = _ingress("k")
    with pytest.raises(ApiError) as err:
        ingress._check_admin(_request("127.0.0.1"))
    assert err.value.status == 401
    ingress._check_admin(_request("10.0.0.5", {"authorization": "Bearer k"}))


# the adapter registry: static entries + AdapterStore, without Ray ------------------------------

def test_engine_keys_are_valid_names_and_distinct_per_version():
    from adapters_store import check_name
    from serving.app.routing import engine_key

    keys = [engine_key("a", None), engine_key("a", 1), engine_key("a.v1", None), engine_key("a.v1", 2),
            engine_key("a", 12), engine_key("x" * 128, 3), engine_key("x" * 128, 4), engine_key("x" * 127 + "y", 3)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        check_name(key)


def test_registry_resolves_static_latest_and_pinned_and_picks_up_new_versions(tmp_path):
    import time

    from adapters_store import AdapterError, AdapterStore, BaseSchema
    from serving.app.routing import Registry, Source, UnknownAdapter
    from tests.adapter_factory import make_lora
    from tests.conftest import minilm_path

    schema = BaseSchema.from_config_dir(minilm_path())
    one = make_lora(tmp_path / "one", schema, seed=1, head="SEQ_CLS", num_labels=2)
    two = make_lora(tmp_path / "two", schema, seed=2, head="SEQ_CLS", num_labels=2)
    store = AdapterStore(tmp_path / "store")
    reg = Registry(store, {"st": Source("st", str(one))}, ttl_s=0.05)
    assert reg.resolve("st").version is None and reg.resolve("st").path == str(one)
    with pytest.raises(UnknownAdapter):
        reg.resolve("st@1")
    with pytest.raises(AdapterError, match="statically"):
        reg.add("st", two, schema=schema)
    assert reg.add("x", one, schema=schema).version == 1
    assert reg.resolve("x").version == 1
    store.add("x", two, schema=schema, labels=["n", "y"])  # published elsewhere (another replica, the CLI)
    time.sleep(0.06)
    latest, pinned = reg.resolve("x"), reg.resolve("x@1")
    assert (latest.version, latest.labels, pinned.version) == (2, ("n", "y"), 1)
    assert len({latest.key, pinned.key, reg.resolve("st").key}) == 3
    listed = {e["name"]: e for e in reg.list()}
    assert listed["x"]["version"] == 2 and listed["x"]["versions"] == [1, 2] and listed["st"]["versions"] == []
    assert [r.version for r in reg.remove("x", 1)] == [1]
    with pytest.raises(UnknownAdapter):
        reg.resolve("x@1")
    assert [r.version for r in reg.remove("x")] == [2] and reg.remove("x") == []
    with pytest.raises(UnknownAdapter):
        reg.resolve("x")
    assert [r.version for r in reg.remove("st")] == [None]


# deploy/ ----------------------------------------------------------------------------------------

DEPLOY = ROOT / "deploy"


def _deploy_files(*suffixes):
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def test_every_yaml_and_json_file_in_deploy_parses():
    import json

    files = _deploy_files(".yaml", ".yml", ".json")
    assert {"rayservice.yaml", "prometheus.yml", "polyhead-dashboard.json", "serve_config.yaml"} <= {p.name for p in files}
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None], path


def _rayservice() -> dict:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    (svc,) = [d for d in docs if d and d.get("kind") == "RayService"]
    return svc


def test_rayservice_serve_config_is_a_valid_ray_serve_config_and_app_config():
    from ray.serve.schema import ServeDeploySchema

    from serving.app.config import from_serve_file

    svc = _rayservice()
    assert svc["apiVersion"] == "ray.io/v1"
    raw = yaml.safe_load(svc["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    assert {d.name for d in app.deployments} <= {"ModelServer", "Ingress"}  # the deployments build_app makes
    cfg = ServeConfig(**from_serve_file(raw))
    assert cfg.device == "cuda" and cfg.replica_gpus() == 1 and cfg.store_root
    cluster = svc["spec"]["rayClusterConfig"]
    (worker,) = cluster["workerGroupSpecs"]
    (container,) = worker["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(cfg.store_root.startswith(m) for m in mounts)  # the store is on the shared volume


def test_grafana_dashboard_shows_every_app_metric_and_prometheus_scrapes_app_and_nodes():
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from serving.app.metrics import AppMetrics

    dash = json.loads((DEPLOY / "grafana" / "polyhead-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    families = {f.name for f in text_string_to_metric_families(AppMetrics().exposition().decode())
                if not f.name.endswith("_created")}  # prometheus_client's creation-time gauges
    assert len(families) >= 12
    missing = [f for f in families if f not in exprs]
    assert not missing, f"metrics without a dashboard panel: {missing}"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["polyhead-app"]["metrics_path"] == "/metrics"
    assert "kubernetes_sd_configs" in jobs["ray-nodes-k8s"]
