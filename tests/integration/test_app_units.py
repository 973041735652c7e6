"""Pieces of serving/app checked without Ray: BIO merging, config, the Serve config file, admin access."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from serving.app.admission import Admission
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
    # admission's hard limit (and its limit before a rate is measured) follows the model replicas unless set
    assert cfg.max_pending_rows is None and cfg.pending_rows_limit() == 256 and cfg.max_queue_wait_s == 0.5
    assert ServeConfig(num_replicas=4, max_batch_size=32).pending_rows_limit() == 4 * 32 * 4
    assert ServeConfig(num_replicas=2, max_batch_size=8).pending_rows_limit() == 256  # never below 256
    assert ServeConfig(num_replicas=4, max_pending_rows=10).pending_rows_limit() == 10


def test_the_default_store_is_the_users_one_resolved_where_the_config_is_built(monkeypatch, tmp_path):
    """One folder for every model replica (it was a temporary store per replica: an adapter added through the
    admin route was served by one of make serve's two replicas and 404 on the other)."""
    monkeypatch.delenv("POLYHEAD_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ServeConfig().store_root == str(tmp_path / "cache" / "polyhead" / "adapters")
    monkeypatch.setenv("POLYHEAD_STORE", str(tmp_path / "mine"))
    cfg = ServeConfig(store_root=None)
    assert cfg.store_root == str(tmp_path / "mine")
    monkeypatch.setenv("POLYHEAD_STORE", str(tmp_path / "elsewhere"))  # a replica's own environment
    assert ServeConfig(**cfg.model_dump()).store_root == str(tmp_path / "mine")  # what every replica is given
    assert ServeConfig(store_root="s3://b/p").store_root == "s3://b/p"


def test_build_app_gives_the_model_deployment_its_replicas_and_resources():
    from serving.app import build_app

    app = build_app({"num_replicas": 3, "num_threads": 1, "adapters": {}})
    ingress = app._bound_deployment  # Ray's Application: Ingress bound to (ModelServer app, config)
    model = ingress.init_args[0]._bound_deployment
    assert (ingress.name, model.name) == ("Ingress", "ModelServer")
    assert model.num_replicas == 3 and model.ray_actor_options == {"num_cpus": 1, "num_gpus": 0, "resources": {}}
    pinned = build_app({"num_threads": 1, "adapters": {}, "ingress_resources": {"node:__internal_head__": 0.01},
                        "replica_resources": {"polyhead_model": 1}})._bound_deployment
    assert pinned.ray_actor_options["resources"] == {"node:__internal_head__": 0.01}
    assert pinned.init_args[0]._bound_deployment.ray_actor_options["resources"] == {"polyhead_model": 1}


@pytest.mark.parametrize("fields, message", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"num_replicas": 0}, "num_replicas"),
    ({"retry_after_s": 5, "max_retry_after_s": 2}, "max_retry_after_s"),
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
    assert set(app.args) == set(ServeConfig.model_fields)  # every knob, none unknown


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


def _request(host, headers=None, port=40000):
    """What the ingress reads of a Starlette request: its client, headers and ASGI scope."""
    return SimpleNamespace(client=SimpleNamespace(host=host, port=port), headers=headers or {},
                           scope={"type": "http", "client": (host, port)})


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
    # the store's versions carry their head as recorded when added; a static entry's is read by the replica
    assert (listed["x"]["task"], listed["x"]["labels"], listed["st"]["task"]) == ("seq_cls", ["n", "y"], None)
    assert [r.version for r in reg.remove("x", 1)] == [1]
    with pytest.raises(UnknownAdapter):
        reg.resolve("x@1")
    assert [r.version for r in reg.remove("x")] == [2] and reg.remove("x") == []
    with pytest.raises(UnknownAdapter):
        reg.resolve("x")
    assert reg.remove("st") == [] and reg.resolve("st").version is None  # config adapters stay (issue 24 item 4)


def test_registry_tells_missing_from_broken_by_looking_not_by_the_message(tmp_path):
    """Whatever the store's error says, a name it does not publish is UnknownAdapter (404) and one it
    publishes but cannot read stays an AdapterError (422): a reworded message cannot change a status."""
    from adapters_store import AdapterError, AdapterStore, BaseSchema
    from serving.app.routing import Registry, UnknownAdapter
    from tests.adapter_factory import make_lora
    from tests.conftest import minilm_path

    schema = BaseSchema.from_config_dir(minilm_path())
    store = AdapterStore(tmp_path / "store")
    store.add("there", make_lora(tmp_path / "one", schema, seed=1, head="SEQ_CLS", num_labels=2), schema=schema)

    def reworded(ref, **_):
        raise AdapterError("something went wrong (reworded)")

    store.resolve = reworded
    reg = Registry(store, ttl_s=0)
    for ref in ("missing", "missing@1", "there@2"):
        with pytest.raises(UnknownAdapter):
            reg.resolve(ref)
    for ref in ("there", "there@1"):
        with pytest.raises(AdapterError) as err:
            reg.resolve(ref)
        assert not isinstance(err.value, UnknownAdapter)
    store.remove = lambda name, version=None: reworded(name)
    assert reg.remove("missing") == []
    with pytest.raises(AdapterError):
        reg.remove("there")


def test_registry_looks_again_when_a_name_is_published_again_between_its_two_looks(tmp_path):
    """A lookup that fails because the name was just removed, while the check after it finds the name published
    again (an admin removing and adding it under load), resolves the new version (it was a 422)."""
    from adapters_store import AdapterError, AdapterStore, BaseSchema
    from serving.app.routing import Registry
    from tests.adapter_factory import make_lora
    from tests.conftest import minilm_path

    schema = BaseSchema.from_config_dir(minilm_path())
    store = AdapterStore(tmp_path / "store")
    store.add("a", make_lora(tmp_path / "one", schema, seed=1, head="SEQ_CLS", num_labels=2), schema=schema)
    real, calls = store.resolve, []

    def removed_then_back(ref, **kw):
        calls.append(ref)
        if len(calls) == 1:
            raise AdapterError("unknown adapter 'a' (not in the store)")
        return real(ref, **kw)

    store.resolve = removed_then_back
    assert Registry(store, ttl_s=0).resolve("a").version == 1 and calls == ["a", "a"]


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
    # the store is on the head pod's volume, reached by the workers through Ray (adapters_store/raystore.py)
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cfg.store_root.startswith("raystore://")
    path = cfg.store_root.removeprefix("raystore://")
    assert any(path.startswith(m["mountPath"]) for m in head["volumeMounts"])
    assert not any(path.startswith(m["mountPath"]) for m in container["volumeMounts"])
    # model replicas autoscaled (no fixed num_replicas beside it), routed by affinity; the ingress on the head
    assert cfg.autoscaling is not None and cfg.request_router == "affinity"
    assert "ModelServer" not in {d.name for d in app.deployments}
    assert "node:__internal_head__" in cfg.ingress_resources and cluster["enableInTreeAutoscaling"] is True


def test_grafana_dashboard_shows_every_app_metric_from_either_source_and_prometheus_scrapes_app_and_nodes():
    import json

    from serving.app.metrics import ALL_SERIES

    dash = json.loads((DEPLOY / "grafana" / "polyhead-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert len(ALL_SERIES) >= 12
    # ${prefix} is `polyhead` (the app's /metrics) or `ray_polyhead` (Ray's per-node export)
    missing = [name for name in ALL_SERIES if "${prefix}" + name.removeprefix("polyhead") not in exprs]
    assert not missing, f"metrics without a dashboard panel: {missing}"
    (prefix,) = [v for v in dash["templating"]["list"] if v["name"] == "prefix"]
    assert {o["value"] for o in prefix["options"]} == {"polyhead", "ray_polyhead"}
    assert "polyhead_" not in exprs.replace("${prefix}", ""), "a series named without ${prefix}"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["polyhead-app"]["metrics_path"] == "/metrics"
    assert "kubernetes_sd_configs" in jobs["ray-nodes-k8s"]


# metrics: one recorder, two destinations; the hub's sum over replicas ------------------------------

def _recorders():
    from serving.app.metrics import INGRESS_SERIES, MODEL_SERIES, Recorder

    return Recorder(INGRESS_SERIES, ray_export=False), Recorder(MODEL_SERIES, ray_export=False)


def test_recorder_writes_prometheus_client_and_forgets_a_deleted_adapter():
    from prometheus_client.parser import text_string_to_metric_families

    ingress, _ = _recorders()
    ingress.rows.labels("classify", "a").inc()
    ingress.rows.labels("tag", "a").inc(2)
    ingress.rows.labels("classify", "b").inc()
    ingress.errors.labels("classify", "a", "wrong_task").inc()
    ingress.latency.labels("classify").observe(0.2)
    text = ingress.exposition().decode()
    rows = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "polyhead_rows_total"}
    assert rows == {(("adapter", "a"), ("route", "classify")): 1, (("adapter", "a"), ("route", "tag")): 2,
                    (("adapter", "b"), ("route", "classify")): 1}
    assert ingress.forget_adapter("a") == 3
    assert "\"a\"" not in ingress.exposition().decode() and 'adapter="b"' in ingress.exposition().decode()
    assert not [k for k in ingress.values() if k[1].endswith("_created")]


def test_recorder_writes_ray_serve_metrics_too():
    from serving.app.metrics import INGRESS_SERIES, Recorder

    calls = []

    class FakeRay:
        def inc(self, value, tags):
            calls.append(("inc", value, tags))

        def observe(self, value, tags):
            calls.append(("observe", value, tags))

    rec = Recorder(INGRESS_SERIES, ray_export=False)
    for instrument in rec.instruments.values():
        instrument._ray = FakeRay()
    rec.requests.labels("classify", 200).inc()
    rec.latency.labels("classify").observe(0.5)
    rec.rows.labels("tag", "ner").inc(0)  # nothing: Ray refuses 0, a counter never goes down
    assert calls == [("inc", 1.0, {"route": "classify", "code": "200"}), ("observe", 0.5, {"route": "classify"})]


def test_hub_sums_every_replica_and_drops_the_gauges_of_silent_ones():
    from prometheus_client.parser import text_string_to_metric_families

    from serving.app.hub import merge, render

    (in1, m1), (in2, m2) = _recorders(), _recorders()
    for rec, n in ((in1, 2), (in2, 3)):
        rec.requests.labels("classify", "200").inc(n)
        rec.rows.labels("classify", "a").inc(n)
    for rec, sizes in ((m1, (4, 8)), (m2, (16,))):
        for size in sizes:
            rec.batch_size.observe(size)
    m1.max_slots.set(8)
    m2.max_slots.set(6)
    in1.build_info.labels("1.0").set(1)
    in2.build_info.labels("1.0").set(1)
    merged = render(merge([("i1", "Ingress", in1.values(), True), ("i2", "Ingress", in2.values(), True),
                           ("m1", "ModelServer", m1.values(), True), ("m2", "ModelServer", m2.values(), False)]))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(merged.decode()) for s in f.samples}
    assert samples[("polyhead_requests_total", (("code", "200"), ("route", "classify")))] == 5
    assert samples[("polyhead_rows_total", (("adapter", "a"), ("route", "classify")))] == 5
    assert samples[("polyhead_batch_size_count", ())] == 3 and samples[("polyhead_batch_size_sum", ())] == 28
    assert samples[("polyhead_batch_size_bucket", (("le", "8.0"),))] == 2
    # a replica's gauge: one series per replica (never a sum of them); the silent replica's is left out
    assert [(k, v) for k, v in samples.items() if k[0] == "polyhead_max_slots"] == \
        [(("polyhead_max_slots", (("replica", "m1"),)), 8)]
    assert samples[("polyhead_build_info", (("version", "1.0"),))] == 1  # the maximum: 1 per version
    assert samples[("polyhead_metrics_sources", (("deployment", "Ingress"),))] == 2
    assert samples[("polyhead_metrics_sources", (("deployment", "ModelServer"),))] == 1


def test_hub_protocol_epochs_late_pushes_and_deleted_adapters():
    from serving.app.hub import MetricsHub

    hub = MetricsHub()  # what the actor runs, in-process
    ingress, _ = _recorders()
    ingress.rows.labels("classify", "a").inc()
    ingress.rows.labels("classify", "b").inc()
    stale = ingress.values()
    ingress.rows.labels("classify", "b").inc()
    epoch, ok, news, _ = hub.push("i1", "Ingress", None, 2, ingress.values(), True, 15.0, 0)
    assert ok and news == []
    assert hub.push("i1", "Ingress", None, 1, stale, True, 15.0, 0)[1]  # a late push (timed out): ignored
    assert 'adapter="b",route="classify"} 2.0' in hub.exposition().decode()
    assert hub.push("i1", "Ingress", "stale", 3, {}, False, 15.0, 0)[1] is False  # a new hub: resend everything
    hub.forget_adapter("a")  # deleted through another replica
    text = hub.exposition().decode()
    assert 'adapter="a"' not in text and 'adapter="b"' in text
    # i1 still has "a": its values for it are ignored, and it learns to drop them
    ingress.rows.labels("classify", "a").inc()
    _, ok, news, _ = hub.push("i1", "Ingress", epoch, 4, ingress.values(), False, 15.0, 0)
    assert ok and news == ["a"] and 'adapter="a"' not in hub.exposition().decode()


# readiness, without Ray -----------------------------------------------------------------------

class _Response:
    """A DeploymentResponse stand-in: awaitable, cancellable."""

    def __init__(self, value=None, hang=False):
        self.value, self.hang, self.cancelled = value, hang, False

    def __await__(self):
        if self.hang:
            yield from asyncio_sleep_forever().__await__()
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def cancel(self):
        self.cancelled = True


async def asyncio_sleep_forever():
    import asyncio

    await asyncio.sleep(3600)


def _ready_ingress(answer):
    ingress = _ingress(None)
    ingress.cfg = ServeConfig(ready_timeout_s=0.2)
    ingress.admission = Admission(ingress.cfg.pending_rows_limit(), ingress.cfg.retry_after_s,
                                  ingress.cfg.max_retry_after_s)
    ingress._info, ingress.shutting_down, ingress.drain_requested = None, False, False
    ingress.encoder, ingress._encoder_check = SimpleNamespace(check=lambda probes: None), None  # test_tokens has it
    ingress.model = SimpleNamespace(info=SimpleNamespace(remote=lambda: answer))
    return ingress


def _ready(ingress):
    import asyncio
    import json

    out = asyncio.run(ingress.ready())
    if isinstance(out, dict):
        return 200, out
    return out.status_code, json.loads(out.body)["error"]["code"]


def test_ready_is_503_while_the_base_loads_or_anything_drains():
    import asyncio

    info = {"max_tokens": 512, "draining": False}
    assert _ready(_ready_ingress(_Response(info))) == (200, {"status": "ready"})
    loading = _Response(hang=True)
    assert _ready(_ready_ingress(loading)) == (503, "not_ready") and loading.cancelled
    busy = _ready_ingress(_Response(hang=True))
    busy._info = info  # it answered before: now only too busy to answer within ready_timeout_s
    assert _ready(busy)[0] == 200
    assert _ready(_ready_ingress(_Response(dict(info, draining=True)))) == (503, "draining")  # model replica stops
    ingress = _ready_ingress(_Response(info))
    asyncio.run(ingress.__del__())  # Serve stops this ingress replica (@serve.ingress's __del__ calls ours)
    assert _ready(ingress) == (503, "draining")
    ingress = _ready_ingress(_Response(info))
    ingress.reconfigure({"draining": True})
    assert _ready(ingress) == (503, "draining")
    ingress.reconfigure({"draining": False})
    assert _ready(ingress)[0] == 200
    for bad in ({"draining": "yes"}, {"drain": True}):
        with pytest.raises(ValueError):
            ingress.reconfigure(bad)


def test_ready_maps_a_full_queue_and_an_unavailable_model():
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    full = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    assert _ready(_ready_ingress(_Response(full))) == (503, "not_ready")  # never answered yet: warming up
    busy = _ready_ingress(_Response(full))
    busy._info = {"max_tokens": 512}
    assert _ready(busy)[0] == 200  # up and busy: the excess gets 429s
    from ray.serve._private.common import DeploymentID

    gone = DeploymentUnavailableError(DeploymentID(name="ModelServer", app_name="polyhead"))
    assert _ready(_ready_ingress(_Response(gone))) == (503, "unavailable")


# embeddings, without Ray -----------------------------------------------------------------------

def _post(path: str, body: dict):
    """A Starlette request carrying a JSON body."""
    import json

    from starlette.requests import Request

    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": path, "client": ("127.0.0.1", 40000),
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]},
                   receive)


def test_embeddings_of_a_base_whose_pipeline_polyhead_cannot_follow_are_refused_before_any_model_work():
    """A base whose sentence-transformers pooling is not the mean (here CLS): /v1/embeddings answers 422 with the
    reason the model replica gave, and sends nothing to the model."""
    import asyncio

    from serving.app.http import ApiError

    ingress = _ingress(None)
    ingress.base_name = "base"
    why = "this base model's embedding cannot be served: its sentence-transformers pooling is cls_token; ..."
    ingress._info = {"max_tokens": 512, "hidden_size": 384, "vocab_size": 30522, "embedding_normalize": True,
                     "embedding_unsupported": why}

    async def no_model_work(*args, **kwargs):
        raise AssertionError("the model was asked")

    ingress._run_rows = no_model_work
    with pytest.raises(ApiError) as err:
        asyncio.run(ingress._embeddings(_post("/v1/embeddings", {"model": "base", "input": "hello"})))
    assert (err.value.status, err.value.code, err.value.message) == (422, "unsupported_embedding", why)


# engine thread priority -----------------------------------------------------------------------

def test_lower_thread_priority_changes_the_calling_thread_only_and_is_inherited():
    import os
    import threading

    from serving.app.deployments import lower_thread_priority

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def engine_thread():
        seen["set"] = lower_thread_priority(3)
        seen["own"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = threading.Thread(target=lambda: seen.setdefault("child", os.getpriority(
            os.PRIO_PROCESS, threading.get_native_id())))
        child.start()
        child.join()

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen["set"] == seen["own"] == seen["child"] == min(19, main_nice + 3)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice
    assert lower_thread_priority(0) == main_nice


def test_the_metrics_hub_module_does_not_import_torch():
    """The hub actor only merges metrics: its worker must not pay torch's import (memory, start-up)."""
    import subprocess
    import sys

    code = "import sys, serving.app.hub; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_admission_header_goes_only_to_requests_the_front_gate_passed_on():
    """The gate in Ray's proxy learns an app's limit from this header (serving/app/gate.py); a client that
    reaches the ingress without a gate never sees it."""
    import asyncio

    from fastapi.responses import JSONResponse

    from serving.app.gate import parse_admission
    from serving.app.metrics import INGRESS_SERIES, Recorder

    ingress = _ready_ingress(None)
    ingress.pusher, ingress.metrics = None, Recorder(INGRESS_SERIES, ray_export=False)
    ingress.gate_config = "app=polyhead;max=64;retry=1-60;push=1"

    async def handler(request):
        return JSONResponse({"ok": True})

    def serve(headers, rows=True):
        return asyncio.run(ingress._serve("classify", _request("10.0.0.9", headers), handler, rows=rows)).headers

    assert parse_admission(serve({"x-polyhead-gated": "1"})["x-polyhead-admission"])["max"] == 64
    assert "x-polyhead-admission" not in serve({})
    assert "x-polyhead-admission" not in serve({"x-polyhead-gated": "1"}, rows=False)  # not an inference route


def test_the_admission_header_carries_the_apps_gate_settings(monkeypatch):
    from serving.app import http
    from serving.app.gate import parse_admission

    ingress = _ready_ingress(None)
    monkeypatch.setattr(http.serve, "get_replica_context", lambda: SimpleNamespace(app_name="my app"))
    ingress.cfg = ServeConfig(gate_max_requests=7, accept_hold_ms=25, retry_after_s=2, max_retry_after_s=30,
                              body_timeout_s=12.5, max_body_bytes=5000)
    assert parse_admission(ingress._gate_config()) == {"app": "my app", "max": 7, "min_retry_s": 2,
                                                       "max_retry_s": 30, "push_s": ingress.cfg.metrics_push_s,
                                                       "hold_s": 0.025, "body_s": 12.5, "body_bytes": 5000,
                                                       "log_level": "INFO", "wait_s": 0.5, "floor": 32}
    ingress.cfg = ServeConfig(accept_hold_ms=0)
    assert parse_admission(ingress._gate_config())["hold_s"] == 0
