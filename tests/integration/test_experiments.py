"""A/B experiments through real HTTP on the session's app: definitions and their refusals, sticky assignment that
matches the documented spec, what an answer says about what served it, outcomes, shadow rows, guardrails, report."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from serving import Request
from serving.experiments.assign import Allocation, bucket

from .conftest import ADMIN_KEY, metrics, sample, wait_for

KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXTS = ["the cat sat on the mat", "Ada Lovelace lived in London", "polyhead serves many adapters at once",
         "a short one", "a somewhat longer sentence, with punctuation; and more words than the others have",
         "rain again today", "the market fell sharply", "what a wonderful concert"]


@pytest.fixture(scope="module")
def versions(client, adapter_dirs, tmp_path_factory):
    """`abx@1`, `abx@2` (two classifiers of one task), `abbad@1` (NaN on every input), `abtag@1` (NER)."""
    from serving import Engine
    from tests.adapter_factory import make_overflowing_lora
    from tests.conftest import minilm_path

    schema = Engine.from_pretrained(str(minilm_path()), max_slots=1).schema
    bad = make_overflowing_lora(tmp_path_factory.mktemp("abbad") / "bad", schema)
    out = {}
    for name, source in (("abx", adapter_dirs["ver-1"]), ("abx", adapter_dirs["ver-2"]), ("abbad", bad),
                         ("abtag", adapter_dirs["ner"]), ("abemb", adapter_dirs["emb"])):
        r = client.post("/v1/adapters", json={"name": name, "source": str(source)}, headers=KEY)
        assert r.status_code == 201, r.text
        out.setdefault(name, []).append(r.json()["ref"])
    return out


def put(client, name, body, status=(200, 201)):
    r = client.put(f"/v1/experiments/{name}", json=body, headers=KEY)
    assert r.status_code in ((status,) if isinstance(status, int) else status), r.text
    return r.json()


def arms(*spec):
    return [{"name": n, "adapter": a, "weight": w} for n, a, w in spec]


def classify(client, model, text, user=None, headers=None):
    body = {"model": model, "input": text}
    if user is not None:
        body["user"] = user
    return client.post("/v1/classify", json=body, headers=headers or {})


def test_sticky_split_matches_the_spec_and_answers_name_what_served_them(client, versions, engine, adapter_dirs):
    v1, v2 = versions["abx"]
    exp = put(client, "ab-split", {"arms": arms(("control", v1, 70), ("candidate", v2, 30)), "salt": "s1"}, 201)
    assert exp["version"] >= 1 and [a["buckets"] for a in exp["arms"]] == [7000, 3000]
    table = Allocation.initial([70, 30])
    seen = {}
    for u in range(40):
        user = f"user-{u}"
        want = ("control", v1) if table.arm_of(bucket("s1", user)) == 0 else ("candidate", v2)
        for rep in range(2):
            r = classify(client, "ab-split", TEXTS[(u + rep) % len(TEXTS)], user=user)
            assert r.status_code == 200, r.text
            assert r.headers["x-polyhead-experiment"] == "ab-split"
            assert r.headers["x-polyhead-arm"] == want[0]  # the documented hash, sticky
            item = r.json()["data"][0]
            assert item["model"] == want[1]  # the resolved adapter@N
            assert r.json()["id"].startswith("ab-")
            seen.setdefault(want[0], 0)
            seen[want[0]] += 1
            # the arm's answer is the adapter's own answer
            direct = engine.infer([Request(adapter="ver-1" if want[1] == v1 else "ver-2",
                                           text=TEXTS[(u + rep) % len(TEXTS)])])[0].logits
            torch.testing.assert_close(torch.tensor(item["logits"]), direct, atol=2e-4, rtol=1e-4)
    assert set(seen) == {"control", "candidate"}
    # the header names the unit too; `user` wins over it
    r = client.post("/v1/classify", json={"model": "ab-split", "input": "x"}, headers={"X-Polyhead-User": "user-3"})
    assert r.headers["x-polyhead-arm"] == ("control" if table.arm_of(bucket("s1", "user-3")) == 0 else "candidate")
    # a plain answer has an id too, and names the model as asked
    r = classify(client, v1, "hello")
    assert r.json()["id"].startswith("cls-") and r.json()["data"][0]["model"] == v1
    assert "x-polyhead-experiment" not in r.headers


def test_forced_arm_is_honoured_and_left_out_of_the_statistics(client, versions):
    v1, v2 = versions["abx"]
    put(client, "ab-forced", {"arms": arms(("a", v1, 100), ("b", v2, 0))})
    for _ in range(5):
        r = classify(client, "ab-forced", "hi", user="u1", headers={"X-Polyhead-Arm": "b"})
        assert r.status_code == 200 and r.headers["x-polyhead-arm"] == "b"
        assert r.json()["data"][0]["model"] == v2
    r = classify(client, "ab-forced", "hi", user="u1", headers={"X-Polyhead-Arm": "nope"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_arm"
    classify(client, "ab-forced", "hi", user="u2")
    report = client.get("/v1/experiments/ab-forced/report", headers=KEY).json()
    by = {a["name"]: a for a in report["arms"]}
    assert by["b"]["forced_requests"] == 5 and by["b"]["requests"] == 0
    assert by["a"]["requests"] == 1 and by["a"]["units"] == 1


def test_feedback_counts_each_answer_once_for_the_arm_that_served_it(client, versions):
    v1, v2 = versions["abx"]
    put(client, "ab-outcome", {"arms": arms(("a", v1, 50), ("b", v2, 50)), "salt": "o"})
    served = {"a": 0, "b": 0}
    values = {"a": [], "b": []}
    for u in range(30):
        r = classify(client, "ab-outcome", "buy now?", user=f"buyer-{u}")
        arm = r.headers["x-polyhead-arm"]
        value = 1 if (arm == "b" or u % 3 == 0) else 0
        f = client.post("/v1/feedback", json={"id": r.json()["id"], "value": value})
        assert f.status_code == 200, f.text
        assert f.json()["counted"] == [{"experiment": "ab-outcome", "arm": arm}]
        served[arm] += 1
        values[arm].append(value)
        if u == 0:
            again = client.post("/v1/feedback", json={"id": r.json()["id"], "value": 1})
            assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_feedback"
    assert client.post("/v1/feedback", json={"id": "ab-eyJ4IjoxfQ.forged", "value": 1}).status_code == 404
    plain = classify(client, v1, "hello").json()["id"]
    assert client.post("/v1/feedback", json={"id": plain, "value": 1}).status_code == 404
    assert client.post("/v1/feedback", json={"id": plain}).status_code == 422
    report = client.get("/v1/experiments/ab-outcome/report", headers=KEY).json()
    by = {a["name"]: a for a in report["arms"]}
    for arm in ("a", "b"):
        assert by[arm]["outcome"]["n"] == served[arm]
        if values[arm]:
            assert by[arm]["outcome"]["mean"] == pytest.approx(sum(values[arm]) / len(values[arm]))
    assert by["b"]["vs_control"]["test"] == "two-proportion z"


def test_shadow_rows_ride_the_primary_batch_and_are_never_returned(client, versions, engine):
    v1, v2 = versions["abx"]
    put(client, "ab-same", {"arms": arms(("a", v1, 1)), "shadow": {"adapter": v1, "percent": 100}})
    put(client, "ab-diff", {"arms": arms(("a", v1, 1)), "shadow": {"adapter": v2, "percent": 100}})
    put(client, "ab-nan", {"arms": arms(("a", v1, 1)), "shadow": {"adapter": versions["abbad"][0], "percent": 100}})
    for name in ("ab-same", "ab-diff", "ab-nan"):
        for text in TEXTS:
            r = classify(client, name, text, user=text)
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert len(data) == 1 and data[0]["model"] == v1  # never the shadow's answer
            direct = engine.infer([Request(adapter="ver-1", text=text)])[0].logits
            torch.testing.assert_close(torch.tensor(data[0]["logits"]), direct, atol=2e-4, rtol=1e-4)
            assert int(r.headers["x-polyhead-batch-size"]) >= 2  # its shadow row was in the same batch

    def shadow(name):
        report = client.get(f"/v1/experiments/{name}/report", headers=KEY).json()
        return report["arms"][0]["shadow"]

    same = wait_for(lambda: shadow("ab-same")["agreement"]["n"] >= len(TEXTS) - 1 and shadow("ab-same"))
    assert same["agreement"]["mean"] == 1.0
    diff = wait_for(lambda: shadow("ab-diff")["agreement"]["n"] >= len(TEXTS) - 1 and shadow("ab-diff"))
    assert diff["agreement"]["mean"] < 1.0
    nan = shadow("ab-nan")
    assert nan["failed"] + nan["late"] >= len(TEXTS) - 1 and nan["agreement"]["n"] == 0


def test_tag_and_embedding_experiments_compare_shadows_by_entity_f1_and_cosine(client, versions):
    put(client, "ab-ner", {"arms": arms(("a", versions["abtag"][0], 1)),
                           "shadow": {"adapter": versions["abtag"][0], "percent": 100}})
    put(client, "ab-emb", {"arms": arms(("a", versions["abemb"][0], 1), ("b", "base", 1)),
                           "shadow": {"adapter": versions["abemb"][0], "percent": 100}})
    for text in TEXTS[:4]:
        r = client.post("/v1/tag", json={"model": "ab-ner", "input": text, "user": text})
        assert r.status_code == 200 and r.json()["data"][0]["model"] == versions["abtag"][0]
        r = client.post("/v1/embeddings", json={"model": "ab-emb", "input": text, "user": text})
        assert r.status_code == 200, r.text
        assert r.json()["model"] in (versions["abemb"][0], "all-MiniLM-L6-v2")
    ner = client.get("/v1/experiments/ab-ner/report", headers=KEY).json()["arms"][0]["shadow"]
    assert ner["agreement"]["n"] >= 3 and ner["agreement"]["mean"] == 1.0
    emb = client.get("/v1/experiments/ab-emb/report", headers=KEY).json()["arms"]
    means = [a["shadow"]["agreement"]["mean"] for a in emb if a["shadow"]["agreement"]["n"]]
    assert means and all(-1 <= m <= 1 for m in means)
    assert any(m == pytest.approx(1.0, abs=1e-6) for m in means)  # the arm whose adapter is the shadow's


def test_guardrail_rolls_a_failing_arm_back_and_traffic_moves(client, versions):
    v1 = versions["abx"][0]
    put(client, "ab-guard", {"arms": arms(("good", v1, 50), ("bad", versions["abbad"][0], 50)),
                             "guardrails": {"max_error_rate": 0.2, "min_requests": 15}})

    async def burst(start):
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"model": "ab-guard", "input": "x",
                                                                       "user": f"g{start + i}"})
                                          for i in range(20)])

    codes = []
    for round_ in range(10):
        codes += [r.status_code for r in asyncio.run(burst(round_ * 20))]
        exp = client.get("/v1/experiments/ab-guard", headers=KEY).json()
        if exp["arms"][1]["weight"] == 0:
            break
    assert 422 in codes  # the bad arm failed (non_finite_output) before the rollback
    bad = exp["arms"][1]
    assert bad["weight"] == 0 and bad["rolled_back"]["reason"] == "error_rate"

    def all_good():
        rs = asyncio.run(burst(1000))
        return all(r.status_code == 200 and r.headers["x-polyhead-arm"] == "good" for r in rs)

    wait_for(all_good, timeout=10, every=0.3)
    report = client.get("/v1/experiments/ab-guard/report", headers=KEY).json()
    assert report["rolled_back"]["bad"]["reason"] == "error_rate"
    m = metrics(client)
    assert sample(m, "polyhead_experiment_rolled_back", experiment="ab-guard", arm="bad") == 1
    assert sample(m, "polyhead_experiment_arm_weight", experiment="ab-guard", arm="good") == 50


BAD = [
    ({"arms": []}, 422),
    ({"arms": arms(("a", "abx@1", -1))}, 422),
    ({"arms": arms(("a", "abx@1", 0), ("b", "abx@2", 0))}, 422),
    ({"arms": arms(("a", "abx@1", 1), ("a", "abx@2", 1))}, 422),
    ({"arms": arms(("a", "nope-adapter", 1))}, 422),
    ({"arms": arms(("a", "abx@99", 1))}, 422),
    ({"arms": arms(("a", "abx@1", 1), ("b", "abtag@1", 1))}, 422),  # another task
    ({"arms": arms(("a", "abx@1", 1), ("b", "base", 1))}, 422),  # the base has no head
    ({"arms": arms(("a", "abx@1", 1)), "shadow": {"adapter": "abx@2", "percent": 101}}, 422),
    ({"arms": arms(("a", "abx@1", 1)), "shadow": {"adapter": "abx@2", "percent": -1}}, 422),
    ({"arms": arms(("a", "abx@1", 1)), "shadow": {"adapter": "abtag@1", "percent": 10}}, 422),
    ({"arms": arms(("a", "abx@1", 1)), "control": "zz"}, 422),
    ({"arms": arms(("a", "abx@1", "1"))}, 422),  # a string weight
    ({"arms": arms(("bad name!", "abx@1", 1))}, 422),
    ({"arms": arms(("a", "../etc", 1))}, 422),
    ({"arms": arms(("a", "ab-split", 1))}, 422),  # an experiment, not an adapter
    ({"arms": arms(("a", "abx@1", 1)), "guardrails": {"max_error_rate": 2}}, 422),
    ({"arms": arms(("a", "abx@1", 1)), "salt": ""}, 422),
    ({"arms": arms(("a", "abx@1", 1)), "unknown_field": 1}, 422),
    ({"arms": arms(("a", "abx@1", 1)), "if_version": 7}, 409),
]


@pytest.mark.parametrize("body,status", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_definitions_are_refused_and_change_nothing(client, versions, body, status):
    put(client, "ab-keep", {"arms": arms(("a", "abx@1", 1))})
    before = client.get("/v1/experiments/ab-keep", headers=KEY).json()
    r = client.put("/v1/experiments/ab-keep", json=body, headers=KEY)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert client.get("/v1/experiments/ab-keep", headers=KEY).json() == before


@pytest.mark.parametrize("name,status", [("abx", 409), ("cls-a", 409), ("all-MiniLM-L6-v2", 409), ("base", 422),
                                         ("bad name", 422)])
def test_an_experiment_name_never_shadows_an_adapter_or_the_base(client, versions, name, status):
    r = client.put(f"/v1/experiments/{name}", json={"arms": arms(("a", "abx@1", 1))}, headers=KEY)
    assert r.status_code == status, r.text
    assert client.get(f"/v1/experiments/{name}", headers=KEY).status_code == 404


def test_admin_routes_need_the_admin_key_and_delete_forgets(client, versions):
    assert client.get("/v1/experiments").status_code == 401
    assert client.put("/v1/experiments/ab-x", json={"arms": arms(("a", "abx@1", 1))}).status_code == 401
    put(client, "ab-del", {"arms": arms(("a", "abx@1", 1))})
    assert any(e["id"] == "ab-del" for e in client.get("/v1/experiments", headers=KEY).json()["data"])
    r = client.delete("/v1/experiments/ab-del", headers=KEY)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert client.delete("/v1/experiments/ab-del", headers=KEY).status_code == 404
    assert classify(client, "ab-del", "hi").status_code == 404  # no longer an alias
    created = put(client, "ab-del", {"arms": arms(("a", "abx@2", 1))}, 201)  # a new experiment under the old name
    assert created["phase"] == 1


def test_an_adapter_is_never_registered_under_an_experiments_name(client, versions, adapter_dirs):
    put(client, "ab-name", {"arms": arms(("a", "abx@1", 1))})
    r = client.post("/v1/adapters", json={"name": "ab-name", "source": str(adapter_dirs["ver-1"])}, headers=KEY)
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    r = classify(client, "ab-name@1", "hi")  # experiments have no versions
    assert r.status_code == 404


def test_experiment_metrics_count_requests_and_shadow_rows(client, versions):
    put(client, "ab-metrics", {"arms": arms(("a", "abx@1", 1)), "shadow": {"adapter": "abx@2", "percent": 100}})
    for i in range(6):
        assert classify(client, "ab-metrics", TEXTS[i], user=f"m{i}").status_code == 200

    def counted():
        m = metrics(client)
        assert sample(m, "polyhead_experiment_requests_total", experiment="ab-metrics", arm="a", code="200") == 6
        run = sample(m, "polyhead_experiment_shadow_rows_total", experiment="ab-metrics", outcome="run")
        late = sample(m, "polyhead_experiment_shadow_rows_total", experiment="ab-metrics", outcome="late")
        assert run + late == 6 and run >= 5
        assert sample(m, "polyhead_experiment_shadow_agreement_count", experiment="ab-metrics", arm="a") == run
        return True

    wait_for(counted)


def test_models_lists_experiments_beside_adapters(client, versions):
    put(client, "ab-listed", {"arms": arms(("a", "abx@1", 3), ("b", "abx@2", 1))})
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    entry = models["ab-listed"]
    assert entry["task"] == "seq_cls" and entry["parent"] == "all-MiniLM-L6-v2"
    assert [(a["adapter"], a["share"]) for a in entry["experiment"]["arms"]] == [("abx@1", 0.75), ("abx@2", 0.25)]
    assert client.get("/v1/models/ab-listed").json() == entry
