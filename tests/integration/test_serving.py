"""The served app against the in-process Engine: batching across adapters, every route, metrics, admin."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import statistics
import threading
import time

import httpx
import pytest
import torch

from serving import Request
from serving.app.tagging import pieces, tag_entities

from .conftest import metrics, ray_node_metrics, sample, total, wait_for

TEXTS = ["the cat sat on the mat", "Ada Lovelace lived in London", "polyhead serves many adapters at once",
         "short", "a somewhat longer sentence, with punctuation; and more words than the others have"]


def alone(engine, adapter, text):
    """The engine's result for one row run by itself."""
    return engine.infer([Request(adapter=adapter, text=text)])[0]


def sentence_vector(engine, adapter, text):
    """What /v1/embeddings gives by default for the bundled MiniLM: the engine's mean-pooled embedding of the row
    alone, then unit length (its sentence-transformers pipeline ends with Normalize)."""
    return torch.nn.functional.normalize(alone(engine, adapter, text).embedding, dim=0)


def close(served, expected, atol=2e-4):
    torch.testing.assert_close(torch.tensor(served, dtype=torch.float32), expected, atol=atol, rtol=1e-4)


def expected_entities(engine, adapter, text, strategy="simple"):
    """The entities /v1/tag should give: the engine's row alone, its tokens' label probabilities aggregated with
    the tokenizer's offsets."""
    res = alone(engine, adapter, text)
    probs = torch.softmax(res.logits, -1).tolist()
    enc = engine.tokenizer(text, return_offsets_mapping=True)
    tokens = engine.tokenizer.convert_ids_to_tokens(enc["input_ids"])
    prefix = engine.tokenizer._tokenizer.model.continuing_subword_prefix  # as transformers' pipeline reads it
    found = pieces(probs, enc["offset_mapping"], tokens, enc["input_ids"], text, prefix, engine.tokenizer.unk_token_id)
    return tag_entities(found, res.labels, text, strategy)


def spans(entities):
    return [(e["entity"], e["start"], e["end"], e["word"]) for e in entities]


async def _post_all(base_url, calls):
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=None)) as c:
        return await asyncio.gather(*[c.post(path, json=body) for path, body in calls])


def test_ready_health_and_models_list(client, engine, adapter_dirs):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    body = client.get("/v1/models").json()
    ids = [m["id"] for m in body["data"]]
    assert body["object"] == "list" and ids[0] == "all-MiniLM-L6-v2"
    assert {"cls-a", "cls-b", "ml", "ner", "emb"} <= set(ids)
    # every adapter's task and labels, whether a request has loaded it yet or not
    listed = {m["id"]: (m["task"], m["labels"]) for m in body["data"][1:]}
    assert {"cls-b", "ner-b"} <= set(listed)
    for name in ("cls-a", "cls-b", "ml", "ner", "ner-b", "emb"):
        head = engine.validate_adapter(name, adapter_dirs[name]).head
        assert listed[name] == ((head.task, list(head.labels)) if head else (None, None)), name
    assert listed["ner-b"][0] == "token_cls" and listed["ml"][0] == "multilabel" and listed["emb"] == (None, None)


def test_concurrent_rows_for_different_adapters_share_a_batch_and_equal_the_engine_alone(server, client, engine):
    adapters = ["cls-a", "cls-b", "ml", "cls-a", "cls-b", "ml", "cls-a", "cls-b"]
    for name in set(adapters):  # load on demand first, so that loads do not spread the rows over batches
        assert client.post("/v1/classify", json={"model": name, "input": "warm"}).status_code == 200
    before = metrics(client)
    calls = [("/v1/classify", {"model": a, "input": TEXTS[i % len(TEXTS)]}) for i, a in enumerate(adapters)]
    responses = asyncio.run(_post_all(server, calls))
    for (_, body), r in zip(calls, responses):
        assert r.status_code == 200, r.text
        item = r.json()["data"][0]
        expected = alone(engine, body["model"], body["input"])
        close(item["logits"], expected.logits)
        assert item["model"] == body["model"] and item["index"] == 0
    assert max(int(r.headers["x-polyhead-batch-adapters"]) for r in responses) >= 2
    assert max(int(r.headers["x-polyhead-batch-size"]) for r in responses) >= 2
    after = metrics(client)
    assert sample(after, "polyhead_batch_adapters_count") > sample(before, "polyhead_batch_adapters_count")
    assert sample(after, "polyhead_batch_adapters_sum") - sample(before, "polyhead_batch_adapters_sum") >= 2
    # the ingress keeps max_model_calls=2 calls out: the requests arriving meanwhile shared the next call
    calls = sample(after, "polyhead_model_call_rows_count") - sample(before, "polyhead_model_call_rows_count")
    rows = sample(after, "polyhead_model_call_rows_sum") - sample(before, "polyhead_model_call_rows_sum")
    assert rows == len(adapters) and 1 <= calls < len(adapters), (calls, rows)


def test_one_request_with_several_models_and_inputs(client, engine):
    """Multi-task: one result per input and named adapter (softmax and multi-label heads side by side),
    each what the engine gives for that row alone."""
    models = ("cls-a", "ml", "cls-b")
    body = {"model": list(models), "input": TEXTS[:3], "threshold": 0.5}
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [(d["index"], d["model"]) for d in data] == [(i, m) for i in range(3) for m in models]
    for d in data:
        res = alone(engine, d["model"], TEXTS[d["index"]])
        close(d["logits"], res.logits)
        if d["model"] == "ml":  # multi-label: sigmoid probs, every label above the threshold
            probs = torch.sigmoid(res.logits)
            close(d["probs"], probs)
            assert d["labels"] == [lab for lab, p in zip(res.labels, probs.tolist()) if p > 0.5]
        else:
            close(d["probs"], torch.softmax(res.logits, -1))
            assert d["label"] == res.labels[int(res.logits.argmax())]
            assert "labels" not in d


def test_tag_merges_bio_tags_with_character_offsets(client, engine):
    text = "Ada Lovelace met Charles Babbage in London."
    r = client.post("/v1/tag", json={"model": "ner", "input": [text]})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    expected = expected_entities(engine, "ner", text)
    assert spans(item["entities"]) == spans(expected)
    assert expected, "the random NER adapter should tag something (else this test checks little)"
    for e in item["entities"]:
        assert e["entity"] in {"PER", "LOC"} and text[e["start"]:e["end"]] == e["word"]
        assert 0 < e["score"] <= 1


def test_tag_aggregation_strategies_are_the_engines_rows_aggregated_so(client, engine):
    texts = ["Ada Lovelace met Charles Babbage in London.", "Schwarzenegger visited Kuala Lumpur with Volkswagen."]
    answers = {}
    for strategy in ("none", "simple", "first", "average", "max"):
        r = client.post("/v1/tag", json={"model": "ner", "input": texts, "aggregation_strategy": strategy})
        assert r.status_code == 200, r.text
        answers[strategy] = [item["entities"] for item in r.json()["data"]]
        for got, text in zip(answers[strategy], texts):
            want = expected_entities(engine, "ner", text, strategy)
            assert [{k: v for k, v in e.items() if k != "score"} for e in got] == \
                [{k: v for k, v in e.items() if k != "score"} for e in want], (strategy, text)
            assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-4)
    assert answers["none"] != answers["simple"] and any(answers[s] != answers["simple"] for s in ("first", "max"))


def test_tag_with_several_taggers_gives_one_result_per_input_and_adapter(client, engine):
    texts = ["Ada Lovelace met Charles Babbage in London.", "Grace Hopper lived in Arlington, Virginia."]
    r = client.post("/v1/tag", json={"model": ["ner", "ner-b"], "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [(d["index"], d["model"]) for d in data] == [(i, m) for i in range(2) for m in ("ner", "ner-b")]
    found = [spans(d["entities"]) for d in data]
    assert found == [spans(expected_entities(engine, d["model"], texts[d["index"]])) for d in data]
    assert found[0] != found[1], "two different taggers on one text should differ (else this checks little)"


def test_openai_client_gets_the_engines_embeddings(server, engine):
    from openai import OpenAI

    oa = OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    for model, adapter in (("emb", "emb"), ("all-MiniLM-L6-v2", None)):
        out = oa.embeddings.create(model=model, input=TEXTS[:3])  # base64 on the wire (the client's default)
        assert [d.index for d in out.data] == [0, 1, 2]
        for d, text in zip(out.data, TEXTS):
            close(d.embedding, sentence_vector(engine, adapter, text))
        assert out.usage.prompt_tokens > 0
    assert oa.models.retrieve("emb").id == "emb" and oa.models.retrieve("all-MiniLM-L6-v2").owned_by == "polyhead"
    assert {m.id for m in oa.models.list()} >= {"emb", "all-MiniLM-L6-v2"}


def test_embeddings_float_format_and_token_ids(client, engine):
    ids = engine.tokenizer(TEXTS[0])["input_ids"]
    r = client.post("/v1/embeddings", json={"model": "emb", "input": [TEXTS[0]], "encoding_format": "float"})
    r2 = client.post("/v1/embeddings", json={"model": "emb", "input": ids})
    assert r.status_code == 200 and r2.status_code == 200, (r.text, r2.text)
    expected = sentence_vector(engine, "emb", TEXTS[0])
    close(r.json()["data"][0]["embedding"], expected)
    close(r2.json()["data"][0]["embedding"], expected)
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "embedding"


def test_embeddings_are_the_sentence_transformers_vectors_unless_normalize_is_false(client, fixtures):
    """The reference: the minilm base case's mean-pooled last hidden state (transformers' BertModel, computed by
    the fixtures' script), then unit length as sentence-transformers' Normalize module makes it. With
    "normalize": false the route gives the mean-pooled vector itself."""
    from safetensors.torch import load_file

    expected = load_file(str(fixtures / "cases" / "minilm_none" / "expected.safetensors"))
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(expected["input_ids"], expected["attention_mask"])]
    for normalize, want in ((None, torch.nn.functional.normalize(expected["embedding"], dim=1)),
                            (True, torch.nn.functional.normalize(expected["embedding"], dim=1)),
                            (False, expected["embedding"])):
        body = {"model": "all-MiniLM-L6-v2", "input": rows}
        if normalize is not None:
            body["normalize"] = normalize
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        norms = got.norm(dim=1)
        if normalize is False:
            assert norms.min() > 2, norms  # the raw means are far from unit length (else this checks little)
        else:
            assert (norms - 1).abs().max() < 1e-5, norms


def test_metrics_count_what_was_sent(client):
    before = metrics(client)
    for text in TEXTS[:3]:
        assert client.post("/v1/classify", json={"model": "cls-b", "input": text}).status_code == 200
    assert client.post("/v1/classify", json={"model": "no-such-adapter", "input": "x"}).status_code == 404
    after = metrics(client)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("polyhead_requests_total", route="classify", code="200") == 3
    assert delta("polyhead_requests_total", route="classify", code="404") == 1
    assert delta("polyhead_rows_total", route="classify", adapter="cls-b") == 3
    assert delta("polyhead_errors_total", route="classify", adapter="unknown", type="model_not_found") == 1
    assert delta("polyhead_request_seconds_count", route="classify") == 4
    assert delta("polyhead_queue_seconds_count", route="classify") == 3  # the rows that ran in a batch
    assert delta("polyhead_batch_size_sum") == 3  # the model replica's batches held exactly these rows
    assert delta("polyhead_batch_size_count") >= 1 and delta("polyhead_batch_compute_seconds_count") >= 1
    assert delta("polyhead_forwards_total") >= 1
    assert total(after, "polyhead_resident_slots") >= 1
    (slots,) = [(dict(k[1]), v) for k, v in after.items() if k[0] == "polyhead_max_slots"]  # one model replica
    assert slots[1] == 8 and list(slots[0]) == ["replica"], slots
    assert sample(after, "polyhead_metrics_sources", deployment="Ingress") == 1
    assert sample(after, "polyhead_metrics_sources", deployment="ModelServer") == 1
    assert not [k for k in after if ("adapter", "no-such-adapter") in k[1]]  # unknown names make no series


def test_concurrent_first_requests_load_an_adapter_once(server, client):
    before = metrics(client)
    responses = asyncio.run(_post_all(server, [("/v1/classify", {"model": "lazy", "input": t}) for t in TEXTS]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    after = metrics(client)
    assert sample(after, "polyhead_adapter_loads_total") - sample(before, "polyhead_adapter_loads_total") == 1
    assert sample(after, "polyhead_adapter_load_seconds_count") > sample(before, "polyhead_adapter_load_seconds_count")


def test_adapter_added_through_admin_is_served_without_restart(client, engine, adapter_dirs, admin_headers):
    assert client.post("/v1/classify", json={"model": "late", "input": "x"}).status_code == 404
    r = client.post("/v1/adapters", headers=admin_headers, json={"name": "late", "source": str(adapter_dirs["late"])})
    assert r.status_code == 201, r.text
    assert r.json()["task"] == "seq_cls" and r.json()["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    r = client.post("/v1/classify", json={"model": "late", "input": TEXTS[1]})
    assert r.status_code == 200, r.text
    close(r.json()["data"][0]["logits"], alone(engine, "late", TEXTS[1]).logits)
    listed = client.get("/v1/adapters", headers=admin_headers).json()["data"]
    assert any(a["name"] == "late" and a["loaded"] for a in listed)
    assert "late" in [m["id"] for m in client.get("/v1/models").json()["data"]]


@contextlib.contextmanager
def _http_folder(folder):
    """folder served over HTTP on 127.0.0.1 (Python's http.server, with its HTML directory listings)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_adapter_added_from_a_url_is_served(client, engine, adapter_dirs, admin_headers):
    folder = adapter_dirs["late"]
    with _http_folder(folder.parent) as base:
        r = client.post("/v1/adapters", headers=admin_headers,
                        json={"name": "late-url", "source": f"{base}/{folder.name}/"})
        assert r.status_code == 201, r.text
        missing = client.post("/v1/adapters", headers=admin_headers,
                              json={"name": "late-url", "source": f"{base}/nowhere/"})
    assert missing.status_code == 422 and f"{base}/nowhere" in missing.json()["error"]["message"], missing.text
    assert r.json()["task"] == "seq_cls" and r.json()["version"] == 1
    r = client.post("/v1/classify", json={"model": "late-url", "input": TEXTS[2]})
    assert r.status_code == 200, r.text
    close(r.json()["data"][0]["logits"], alone(engine, "late", TEXTS[2]).logits)  # the same files as "late"


def test_deleting_an_adapter_in_use_does_not_break_running_requests(server, client, admin_headers, adapter_dirs):
    # a store adapter: config adapters cannot be deleted (409, test_multi_replica.py)
    r = client.post("/v1/adapters", headers=admin_headers, json={"name": "doomed", "source": str(adapter_dirs["victim"])})
    assert r.status_code == 201, r.text
    assert client.post("/v1/classify", json={"model": "doomed", "input": "warm"}).status_code == 200
    assert sample(metrics(client), "polyhead_rows_total", route="classify", adapter="doomed") >= 1

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            running = [asyncio.create_task(c.post("/v1/classify", json={"model": "doomed", "input": TEXTS[i % 5]}))
                       for i in range(12)]
            await asyncio.sleep(0.3)  # the rows reach the replica (and wait for their batch)
            deleted = await c.delete("/v1/adapters/doomed", headers=admin_headers)
            return deleted, await asyncio.gather(*running)

    deleted, responses = asyncio.run(scenario())
    assert deleted.status_code == 200, deleted.text
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 404}, [r.text for r in responses]
    assert 200 in codes  # the rows admitted before the delete were served
    for r in responses:
        if r.status_code == 404:
            assert r.json()["error"]["code"] == "model_not_found"
    gone = client.post("/v1/classify", json={"model": "doomed", "input": "x"})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert client.delete("/v1/adapters/doomed", headers=admin_headers).status_code == 404
    assert client.post("/v1/classify", json={"model": "cls-a", "input": "still serving"}).status_code == 200
    after = metrics(client)  # a deleted adapter is no longer reported (prometheus-client's remove())
    assert not [k for k in after if ("adapter", "doomed") in k[1]], [k for k in after if "doomed" in str(k)]
    assert sample(after, "polyhead_adapter_unloads_total") >= 1


def test_a_flood_beyond_the_queue_is_shed_with_429_json_quickly_while_accepted_requests_succeed(server, client,
                                                                                             engine):
    """40 requests of 8 rows (320 rows) against the ingress's admission limit of 64 pending rows: requests
    arriving beyond it answer 429 at once, without reaching the model; the others are served correctly."""
    texts = [f"flood {i}: " + TEXTS[i % len(TEXTS)] for i in range(8)]
    expected = [alone(engine, "cls-a", t).logits for t in texts]
    assert client.post("/v1/classify", json={"model": "cls-a", "input": "warm"}).status_code == 200
    before = metrics(client)

    async def flood():
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=httpx.Limits(max_connections=None)) as c:
            async def one():
                start = time.perf_counter()
                r = await c.post("/v1/classify", json={"model": "cls-a", "input": texts})
                return r, time.perf_counter() - start
            return await asyncio.gather(*[one() for _ in range(40)])

    results = asyncio.run(flood())
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, \
        [(r.status_code, r.text[:300]) for r, _ in results if r.status_code != 200]
    shed = [s for r, s in results if r.status_code == 429]
    served = [s for r, s in results if r.status_code == 200]
    for r, _ in results:
        if r.status_code == 429:
            # the time the model needs for the rows admitted and the clients refused (serving/app/admission.py)
            assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers
            assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                         "code": "overloaded"}
        else:
            for item, logits in zip(r.json()["data"], expected):
                close(item["logits"], logits)
    print(f"flood: {len(shed)} shed (median {statistics.median(shed):.3f} s, max {max(shed):.3f} s), "
          f"{len(served)} served (median {statistics.median(served):.3f} s, max {max(served):.3f} s)")
    # shed without waiting for the model: refusals come back sooner than accepted requests are served
    assert statistics.median(shed) < statistics.median(served) and max(shed) < max(served)
    after = metrics(client)
    assert sample(after, "polyhead_requests_total", route="classify", code="429") - \
           sample(before, "polyhead_requests_total", route="classify", code="429") == len(shed)
    assert sample(after, "polyhead_errors_total", route="classify", adapter="none", type="overloaded") - \
           sample(before, "polyhead_errors_total", route="classify", adapter="none", type="overloaded") == len(shed)
    assert client.post("/v1/classify", json={"model": "cls-a", "input": "after the storm"}).status_code == 200


@pytest.mark.parametrize("path", ["server", "proxy"])
def test_the_front_gate_refuses_requests_beyond_its_limit_before_the_ingress(path, request, client, engine):
    """120 one-row requests at once against the gate's limit of max_pending_rows (64) requests out: the gate
    (serving/app/gate.py) in front of the ingress replica's own HTTP server (direct ingress: `server`) and in
    Serve's proxy (`proxy`) answers the excess 429 with the ingress's JSON body; what it lets through is
    served correctly; it counts its refusals in the app's metrics (its own source) and removes the admission
    header the ingress sends it."""
    server = request.getfixturevalue(path)
    text = f"the gate ({path}): " + TEXTS[0]
    expected = alone(engine, "cls-a", text).logits
    first = httpx.post(server + "/v1/classify", json={"model": "cls-a", "input": text}, timeout=60)  # the gate
    assert first.status_code == 200 and "x-polyhead-admission" not in first.headers
    before = metrics(client)

    def ray_refusals() -> float:
        return total(ray_node_metrics(), "ray_polyhead_gate_refusals_total", application="polyhead",
                     route="classify")

    def settled():  # Ray's export of what earlier tests refused, once two reads a report interval apart agree
        first = ray_refusals()
        time.sleep(0.6)
        return first == ray_refusals() and (first,)
    (ray_before,) = wait_for(settled)

    async def flood():
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=httpx.Limits(max_connections=None)) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"model": "cls-a", "input": text})
                                          for _ in range(120)])

    results = asyncio.run(flood())
    codes = [r.status_code for r in results]
    assert codes.count(429) >= 120 - 64 and 200 in codes and set(codes) <= {200, 429}, codes
    for r in results:
        assert "x-polyhead-admission" not in r.headers
        assert len(r.headers.get_list("x-request-id")) == 1  # the gate's own 429s too (serving/app/logs.py)
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "overloaded"
        else:
            close(r.json()["data"][0]["logits"], expected)
    after = metrics(client)
    assert sample(after, "polyhead_metrics_sources", deployment="Gate") >= 1  # one per gate that served the app
    assert sample(after, "polyhead_requests_total", route="classify", code="429") - \
           sample(before, "polyhead_requests_total", route="classify", code="429") == codes.count(429)
    assert sample(after, "polyhead_requests_total", route="classify", code="200") - \
           sample(before, "polyhead_requests_total", route="classify", code="200") == codes.count(200)
    assert sample(after, "polyhead_gate_refusals_total", route="classify") - \
           sample(before, "polyhead_gate_refusals_total", route="classify") == codes.count(429)  # all the gate's

    def rays_export_counts_them():  # the cluster route counts the same refusals
        refused = ray_refusals() - ray_before
        assert refused == codes.count(429), refused
        return True

    wait_for(rays_export_counts_them)


def test_rays_proxy_serves_the_same_app_one_hop_further(proxy, engine):
    """Ray Serve's proxy (the cluster's entry, and the fallback beside direct ingress) answers every inference
    route exactly as the engine does alone."""
    with httpx.Client(base_url=proxy, timeout=60) as c:
        r = c.post("/v1/classify", json={"model": ["cls-a", "ml"], "input": TEXTS[:2]})
        assert r.status_code == 200, r.text
        for item in r.json()["data"]:
            close(item["logits"], alone(engine, item["model"], TEXTS[item["index"]]).logits)
        r = c.post("/v1/embeddings", json={"model": "emb", "input": TEXTS[2]})
        assert r.status_code == 200, r.text
        close(r.json()["data"][0]["embedding"], sentence_vector(engine, "emb", TEXTS[2]))
        r = c.post("/v1/tag", json={"model": "ner", "input": TEXTS[1]})
        assert r.status_code == 200, r.text
        assert spans(r.json()["data"][0]["entities"]) == spans(expected_entities(engine, "ner", TEXTS[1]))
        r = c.post("/v1/classify", json={"model": "nope", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_an_operator_drain_makes_ready_503_while_requests_are_still_served(client):
    """What `user_config: {draining: true}` on the Ingress deployment does (Serve calls reconfigure on every
    replica); here called through a handle on this app's one Ingress replica."""
    from ray import serve

    ingress = serve.get_deployment_handle("Ingress", app_name="polyhead")
    ingress.reconfigure.remote({"draining": True}).result()
    try:
        r = client.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "draining" and r.json()["error"]["type"] == "overloaded_error"
        assert client.get("/health").status_code == 200
        assert client.post("/v1/classify", json={"model": "cls-a", "input": "still served"}).status_code == 200
    finally:
        ingress.reconfigure.remote({"draining": False}).result()
    assert client.get("/ready").status_code == 200
    with pytest.raises(Exception, match="unknown keys"):
        ingress.reconfigure.remote({"drain": True}).result()
    assert client.get("/ready").status_code == 200


def _logits(client, model, text):
    r = client.post("/v1/classify", json={"model": model, "input": text})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["logits"]


def test_versions_latest_and_pinned_are_served_side_by_side_then_deleted(client, engine, adapter_dirs,
                                                                         admin_headers):
    text = TEXTS[2]
    v1, v2 = alone(engine, "ver-1", text).logits, alone(engine, "ver-2", text).logits
    assert not torch.allclose(v1, v2)
    r = client.post("/v1/adapters", headers=admin_headers, json={"name": "ver", "source": str(adapter_dirs["ver-1"])})
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["ref"]) == (1, "ver@1")
    close(_logits(client, "ver", text), v1)
    r = client.post("/v1/adapters", headers=admin_headers, json={"name": "ver", "source": str(adapter_dirs["ver-2"]),
                                                                 "labels": ["no", "yes"]})
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["labels"]) == (2, ["no", "yes"])
    close(_logits(client, "ver", text), v2)  # the latest version, at once on the replica that published it
    close(_logits(client, "ver@1", text), v1)
    close(_logits(client, "ver@2", text), v2)
    # both versions resident together, in one request
    r = client.post("/v1/classify", json={"model": ["ver@1", "ver@2", "ver"], "input": text})
    assert r.status_code == 200, r.text
    (a, b, c) = r.json()["data"]
    close(a["logits"], v1), close(b["logits"], v2), close(c["logits"], v2)
    assert (a["model"], b["label"] in ("no", "yes"), a["label"].startswith("LABEL_")) == ("ver@1", True, True)
    listed = {a["name"]: a for a in client.get("/v1/adapters", headers=admin_headers).json()["data"]}
    assert listed["ver"]["version"] == 2 and listed["ver"]["versions"] == [1, 2] and listed["ver"]["loaded"]
    assert listed["cls-a"]["version"] is None  # static entries have no versions
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["ver"]["versions"] == [1, 2]
    assert client.get("/v1/models/ver").json() == models["ver"]  # OpenAI's retrieve: the listed entry
    assert client.get("/v1/models/ver@2").json() == dict(models["ver"], id="ver@2")
    pinned = client.get("/v1/models/ver@1").json()
    assert (pinned["id"], pinned["version"], pinned["task"], pinned["labels"]) == (  # its own head, not the latest's
        "ver@1", 1, "seq_cls", ["LABEL_0", "LABEL_1"])
    for missing in ("ver@3", "nope", "%2e%2e%2fx", "ver@0"):
        r = client.get(f"/v1/models/{missing}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (missing, r.text)
    # removing one version
    assert client.delete("/v1/adapters/ver@1", headers=admin_headers).status_code == 200
    assert client.post("/v1/classify", json={"model": "ver@1", "input": text}).status_code == 404
    close(_logits(client, "ver", text), v2)
    # removing the name removes every version
    r = client.delete("/v1/adapters/ver", headers=admin_headers)
    assert r.status_code == 200, r.text
    for model in ("ver", "ver@1", "ver@2"):
        r = client.post("/v1/classify", json={"model": model, "input": text})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert client.delete("/v1/adapters/ver", headers=admin_headers).status_code == 404
    assert "ver" not in [a["name"] for a in client.get("/v1/adapters", headers=admin_headers).json()["data"]]


def test_a_version_published_into_the_store_elsewhere_is_picked_up(client, engine, adapter_dirs, store_root,
                                                                   admin_headers):
    """What another replica or `polyhead adapters add` publishes into the shared store root is served
    within the lookup TTL (0.2 s here), with no call to this replica."""
    import time

    from adapters_store import AdapterStore

    text = TEXTS[1]
    store = AdapterStore(store_root)
    schema = engine.schema
    assert store.add("shared", adapter_dirs["ver-1"], schema=schema).version == 1
    close(_logits(client, "shared", text), alone(engine, "ver-1", text).logits)
    assert store.add("shared", adapter_dirs["ver-3"], schema=schema).version == 2
    deadline = time.monotonic() + 10
    expected = alone(engine, "ver-3", text).logits
    while not torch.allclose(torch.tensor(_logits(client, "shared", text)), expected, atol=2e-4, rtol=1e-4):
        assert time.monotonic() < deadline, "the new version was not picked up"
        time.sleep(0.1)
    close(_logits(client, "shared@1", text), alone(engine, "ver-1", text).logits)
    store.remove("shared")  # removed elsewhere: 404 once the cached lookup expires, never a 500 or 422
    time.sleep(0.3)
    for model in ("shared", "shared@1"):
        r = client.post("/v1/classify", json={"model": model, "input": text})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_serve_replicas_run_throughput_optimized_and_this_process_does_not(server, client):
    """start_local_ray gives Ray's workers RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (user code and routing on the
    replica's own event loop, gRPC between deployments), not the driver: its synchronous handle calls need
    the router's own loop."""
    import os
    from pathlib import Path

    from ray import serve

    from serving.app import THROUGHPUT_OPTIMIZED

    assert os.environ.get(THROUGHPUT_OPTIMIZED) is None  # start_local_ray put it in the workers' env only
    assert serve.get_deployment_handle("ModelServer", "polyhead").info.remote().result()["model_name"]
    replicas = [p for p in Path("/proc").iterdir() if p.name.isdigit() and
                "ServeReplica:polyhead:" in _read(p / "cmdline")]
    assert len(replicas) >= 2, "no Ingress and ModelServer replica processes found"
    for proc in replicas:
        env = (proc / "environ").read_bytes().split(b"\0")
        assert f"{THROUGHPUT_OPTIMIZED}=1".encode() in env, _read(proc / "cmdline")


def test_ray_workers_run_at_nice_0_and_the_engine_thread_below_them(server, client):
    """start_local_ray keeps Ray's workers at nice 0 (Ray's own default is 15); the model replica's engine
    thread lowers itself by engine_nice (10), so the HTTP side wins the CPU over a forward."""
    import os
    from pathlib import Path

    import ray

    assert ray.get(ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote()) == 0
    assert client.post("/v1/classify", json={"model": "cls-a", "input": "a forward"}).status_code == 200
    replicas = [p for p in Path("/proc").iterdir() if p.name.isdigit() and
                "ServeReplica:polyhead:ModelServer" in _read(p / "cmdline")]
    assert replicas, "no ModelServer replica process found"
    for proc in replicas:
        nice = {int(_read(t / "stat").rsplit(")", 1)[1].split()[16]) for t in (proc / "task").iterdir()}
        assert int(_read(proc / "stat").rsplit(")", 1)[1].split()[16]) == 0
        assert 10 in nice and nice <= {0, 10}, nice


def _read(path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
