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
