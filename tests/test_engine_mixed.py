"""Mixed batches equal separate runs; eviction, unload/reload, replacement; the base is never modified."""
from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from adapters_store import AdapterError
from serving import Engine, Request

from .adapter_factory import make_lora, make_overflowing_lora
from .conftest import base_path, minilm_path

SENTENCES = [
    [101, 7592, 2088, 102],
    [101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102],
    [101, 2023, 2003, 1037, 2936, 6251, 2008, 2038, 2062, 19204, 2015, 1999, 2009, 1012, 102],
    [101, 2748, 102],
    [101, 2204, 2851, 2000, 2017, 2035, 102],
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Five random LoRA-family adapters on MiniLM with different ranks, targets and heads."""
    from adapters_store import BaseSchema

    schema = BaseSchema.from_config_dir(minilm_path())
    root = tmp_path_factory.mktemp("adapters")
    return {
        "seq_qv": make_lora(root / "a", schema, seed=1, r=8, head="SEQ_CLS", num_labels=3),
        "tok_all": make_lora(root / "b", schema, seed=2, r=4, head="TOKEN_CLS", num_labels=5,
                             targets=("query", "key", "value", "dense")),
        "emb_rs": make_lora(root / "c", schema, seed=3, r=16, rslora=True, targets=("key", "output.dense")),
        "seq_dora": make_lora(root / "d", schema, seed=4, r=6, dora=True, head="SEQ_CLS", num_labels=2),
        "seq_layers": make_lora(root / "e", schema, seed=5, r=2, head="SEQ_CLS", num_labels=4,
                                targets=("intermediate.dense",), layers=[1, 4]),
    }


def make_engine(adapters, max_slots=8, names=None):
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=max_slots)
    for name in names or adapters:
        eng.load_adapter(name, adapters[name])
    return eng


def alone(eng, name, ids):
    [res] = eng.infer([Request(adapter=name, input_ids=ids)])
    assert res.error is None, res.error
    return res


def assert_same(got, want, what):
    assert got.error is None, f"{what}: {got.error}"
    torch.testing.assert_close(got.embedding, want.embedding, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")
    if want.logits is None:
        assert got.logits is None, what
    else:
        torch.testing.assert_close(got.logits, want.logits, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def interleaved_rows(names):
    """[base, a0, a1, ...][i % k] over rows of different lengths, adapters repeated and non-adjacent."""
    cycle = [None] + list(names)
    return [(cycle[i % len(cycle)], SENTENCES[i % len(SENTENCES)]) for i in range(3 * len(cycle) + 1)]


def test_every_adapter_changes_the_output(adapters):
    eng = make_engine(adapters)
    base = alone(eng, None, SENTENCES[2])
    for name in adapters:
        res = alone(eng, name, SENTENCES[2])
        assert (res.embedding - base.embedding).abs().max() > 1e-2, name


def test_mixed_batch_equals_separate_runs(adapters):
    eng = make_engine(adapters)
    rows = interleaved_rows(adapters)
    separate = [alone(eng, name, ids) for name, ids in rows]
    forwards = eng.forwards
    mixed = eng.infer([Request(adapter=name, input_ids=ids) for name, ids in rows])
    assert eng.forwards == forwards + 1
    for (name, ids), got, want in zip(rows, mixed, separate):
        assert_same(got, want, f"{name} on {len(ids)} tokens")
        if name is None:
            assert got.logits is None
        elif name == "tok_all":
            assert got.logits.shape == (len(ids), 5)
        elif name != "emb_rs":
            assert got.logits.dim() == 1


def test_last_slot_is_used_and_correct(adapters):
    eng = make_engine(adapters, max_slots=len(adapters))
    assert max(eng.pool.slot_of(n) for n in adapters) == len(adapters) - 1
    rows = interleaved_rows(adapters)
    want = [alone(make_engine(adapters, names=[n]) if n else eng, n, ids) for n, ids in rows[:6]]
    got = eng.infer([Request(adapter=n, input_ids=ids) for n, ids in rows[:6]])
    for (n, _), g, w in zip(rows, got, want):
        assert_same(g, w, str(n))


def test_more_adapters_than_slots_in_one_batch(adapters):
    small = make_engine(adapters, max_slots=2)
    big = make_engine(adapters, max_slots=8)
    rows = interleaved_rows(adapters)
    forwards = small.forwards
    got = small.infer([Request(adapter=n, input_ids=ids) for n, ids in rows])
    assert small.forwards - forwards >= 3, "five adapters in two slots need at least three forwards"
    want = big.infer([Request(adapter=n, input_ids=ids) for n, ids in rows])
    for (n, _), g, w in zip(rows, got, want):
        assert_same(g, w, str(n))
    assert small.stats()["evictions"] > 0


def test_eviction_across_batches_reloads_correct_weights(adapters):
    eng = make_engine(adapters, max_slots=2)
    ref = make_engine(adapters, max_slots=8)
    for round_ in range(2):
        for name in adapters:
            assert_same(alone(eng, name, SENTENCES[1]), alone(ref, name, SENTENCES[1]), f"{name} round {round_}")
    assert len(eng.pool.resident()) == 2


def test_unload_then_reload_and_replace(adapters):
    eng = make_engine(adapters, names=["seq_qv", "emb_rs"])
    before = alone(eng, "seq_qv", SENTENCES[0])
    eng.unload_adapter("seq_qv")
    [res] = eng.infer([Request(adapter="seq_qv", input_ids=SENTENCES[0])])
    assert res.error is not None and "unknown adapter" in res.error
    with pytest.raises(AdapterError, match="unknown adapter"):
        eng.unload_adapter("seq_qv")
    eng.load_adapter("seq_qv", adapters["seq_qv"])
    assert_same(alone(eng, "seq_qv", SENTENCES[0]), before, "reloaded")
    eng.load_adapter("seq_qv", adapters["seq_dora"])  # the same name with new weights
    want = alone(make_engine(adapters, names=["seq_dora"]), "seq_dora", SENTENCES[0])
    assert_same(alone(eng, "seq_qv", SENTENCES[0]), want, "replaced")


def test_bad_rows_get_errors_and_others_still_run(adapters):
    eng = make_engine(adapters, names=["seq_qv"])
    good = alone(eng, "seq_qv", SENTENCES[1])
    requests = [
        Request(adapter="nope", input_ids=SENTENCES[1]),
        Request(adapter="seq_qv", input_ids=[]),
        Request(adapter="seq_qv", input_ids=[101] * 600),
        Request(adapter="seq_qv", input_ids=[101, 40000, 102]),
        Request(adapter="seq_qv", input_ids=[101, -1, 102]),
        Request(adapter="seq_qv"),
        Request(adapter="../etc/passwd", input_ids=SENTENCES[1]),
        Request(adapter="seq_qv", input_ids=SENTENCES[1]),
        Request(adapter="seq_qv", text="hello world"),
    ]
    results = eng.infer(requests)
    errors = [r.error for r in results]
    for pattern, err in zip(["unknown adapter", "empty", "over the limit", "outside the vocabulary",
                             "outside the vocabulary", "exactly one of", "unknown adapter"], errors):
        assert err is not None and pattern in err, (pattern, err)
    assert_same(results[7], good, "good row beside bad ones")
    assert results[8].error is None and results[8].logits.shape == (3,)
    assert results[8].labels == ("LABEL_0", "LABEL_1", "LABEL_2") and results[8].task == "seq_cls"


def test_text_is_tokenized_with_special_tokens(adapters):
    eng = make_engine(adapters, names=["tok_all"])
    ids = eng.tokenizer("hello world")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102
    [by_text] = eng.infer([Request(adapter="tok_all", text="hello world")])
    assert_same(by_text, alone(eng, "tok_all", ids), "text vs ids")
    too_long = eng.infer([Request(adapter="tok_all", text="word " * 600)])[0]
    assert too_long.error and "over the limit" in too_long.error


def base_fingerprint(model):
    digest = hashlib.sha256()
    ptrs = {}
    for name, p in model.state_dict().items():
        ptrs[name] = p.data_ptr()
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return ptrs, digest.hexdigest()


def test_base_weights_never_change(adapters):
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=2)
    before = base_fingerprint(eng.model)
    for name in adapters:
        eng.load_adapter(name, adapters[name])
    eng.infer([Request(adapter=n, input_ids=ids) for n, ids in interleaved_rows(adapters)])
    eng.unload_adapter("seq_dora")
    eng.load_adapter("seq_qv", adapters["tok_all"])
    eng.infer([Request(adapter="seq_qv", input_ids=SENTENCES[2])])
    assert base_fingerprint(eng.model) == before


def test_threads_load_unload_and_infer_without_corruption(adapters):
    eng = make_engine(adapters, max_slots=3)
    ref = make_engine(adapters, max_slots=8)
    want = {n: alone(ref, n, SENTENCES[2]) for n in adapters}
    failures = []

    def infer_loop():
        for i in range(6):
            names = list(adapters)
            results = eng.infer([Request(adapter=n, input_ids=SENTENCES[2]) for n in names])
            for n, res in zip(names, results):
                if res.error is None:
                    try:
                        assert_same(res, want[n], n)
                    except AssertionError as exc:
                        failures.append(str(exc))
                elif "unknown adapter" not in res.error and "unloaded" not in res.error:
                    failures.append(res.error)

    def churn():
        for i in range(4):
            eng.unload_adapter("emb_rs")
            eng.load_adapter("emb_rs", adapters["emb_rs"])
            eng.load_adapter("seq_qv", adapters["seq_qv"])

    threads = [threading.Thread(target=infer_loop) for _ in range(2)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-gpt2"])
def test_causal_bases_mixed_batch(base, tmp_path):
    from adapters_store import BaseSchema

    schema = BaseSchema.from_config_dir(base_path(base))
    targets = ("q_proj", "v_proj", "down_proj") if base == "tiny-llama" else ("c_attn", "c_fc")
    a = make_lora(tmp_path / "a", schema, seed=7, r=4, targets=targets)
    b = make_lora(tmp_path / "b", schema, seed=8, r=8, targets=targets[:1], dora=base == "tiny-llama")
    eng = Engine.from_pretrained(str(base_path(base)), max_slots=4)
    eng.load_adapter("a", a)
    eng.load_adapter("b", b)
    rows = [(None, [5, 6, 7, 8]), ("a", [9, 10, 11]), ("b", [12, 13, 14, 15, 16]), ("a", [5, 6, 7, 8])]
    separate = [alone(eng, n, ids) for n, ids in rows]
    mixed = eng.infer([Request(adapter=n, input_ids=ids) for n, ids in rows])
    for (n, ids), got, want in zip(rows, mixed, separate):
        assert got.logits.shape == (len(ids), schema.vocab_size)
        assert_same(got, want, f"{base} {n}")
    assert (mixed[3].logits - mixed[0].logits).abs().max() > 1e-2


def test_reference_kernels_give_the_same_engine_results(adapters):
    fast = make_engine(adapters)
    oracle = Engine.from_pretrained(str(minilm_path()), max_slots=8, kernel="reference")
    for name in adapters:
        oracle.load_adapter(name, adapters[name])
    rows = interleaved_rows(adapters)
    for (n, _), g, w in zip(rows, fast.infer([Request(adapter=n, input_ids=i) for n, i in rows]),
                            oracle.infer([Request(adapter=n, input_ids=i) for n, i in rows])):
        assert_same(g, w, str(n))


def test_shared_input_groups_fuse_and_survive_rank_growth(tmp_path):
    from adapters_store import BaseSchema

    schema = BaseSchema.from_config_dir(minilm_path())
    small = make_lora(tmp_path / "small", schema, seed=21, r=4, targets=("query", "key", "value"))
    big = make_lora(tmp_path / "big", schema, seed=22, r=24, targets=("query", "value", "intermediate.dense"))
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=4)
    eng.load_adapter("small", small)
    first = alone(eng, "small", SENTENCES[2])  # learns which modules share an input
    alone(eng, "small", SENTENCES[2])
    group = eng._state.groups["encoder.layer.0.attention.self.query"]
    assert group.names == tuple(f"encoder.layer.0.attention.self.{m}" for m in ("query", "key", "value"))
    assert_same(alone(eng, "small", SENTENCES[2]), first, "fused")
    eng.load_adapter("big", big)  # grows the rank capacity: storage is regrouped
    rows = [("big", SENTENCES[1]), ("small", SENTENCES[2]), (None, SENTENCES[0]), ("big", SENTENCES[2])]
    for _ in range(2):  # learning forward, then fused forward
        got = eng.infer([Request(adapter=n, input_ids=ids) for n, ids in rows])
        for (n, ids), g in zip(rows, got):
            fresh = Engine.from_pretrained(str(minilm_path()), max_slots=1)
            if n:
                fresh.load_adapter(n, big if n == "big" else small)
            assert_same(g, alone(fresh, n, ids), f"{n}")


def test_an_adapter_whose_weights_overflow_gets_a_row_error_and_the_other_rows_are_unharmed(adapters, tmp_path):
    """A finite weight of 1e30 passes validation but turns the hidden states into NaN: that row answers an error
    (error_code "non_finite"), never NaN logits or embeddings; the rows beside it in the batch are as alone."""
    from adapters_store import BaseSchema

    folder = make_overflowing_lora(tmp_path / "huge", BaseSchema.from_config_dir(minilm_path()))
    eng = make_engine(adapters, names=["seq_qv", "tok_all"])
    eng.load_adapter("huge", folder)
    rows = [("seq_qv", SENTENCES[1]), ("huge", SENTENCES[1]), (None, SENTENCES[2]), ("huge", SENTENCES[4]),
            ("tok_all", SENTENCES[0])]
    results = eng.infer([Request(adapter=name, input_ids=ids) for name, ids in rows])
    for (name, ids), res in zip(rows, results):
        if name == "huge":
            assert (res.error_code, res.logits, res.embedding) == ("non_finite", None, None)
            assert "adapter 'huge' gave non-finite values" in res.error
        else:
            assert_same(res, alone(eng, name, ids), name)
    assert results[0].error_code is None and eng.infer([Request(adapter="nope", input_ids=[101])])[0].error_code \
        == "invalid_input"


def test_a_load_that_fails_while_writing_its_slot_leaves_no_trace(adapters, monkeypatch):
    """An error while the slot tensors are written (not a validation error) is an AdapterError, the name is not
    registered, the slot it took is free again, and every other adapter serves as before."""
    eng = make_engine(adapters, max_slots=3, names=["seq_qv", "tok_all"])
    before = {name: alone(eng, name, SENTENCES[2]) for name in ("seq_qv", "tok_all", None)}
    free = len(eng.pool._free)
    real = eng.pool._write

    def breaks_for_boom(slot, spec):
        if spec.name == "boom":
            raise RuntimeError("device out of memory")
        real(slot, spec)

    monkeypatch.setattr(eng.pool, "_write", breaks_for_boom)
    for _ in range(3):  # three failures take no slot (there are three)
        with pytest.raises(AdapterError, match=r"'boom' could not be made resident: RuntimeError: device out of"):
            eng.load_adapter("boom", adapters["seq_dora"])
    assert "boom" not in eng.adapters() and len(eng.pool._free) == free
    assert eng.infer([Request(adapter="boom", input_ids=SENTENCES[0])])[0].error_code == "invalid_input"
    for name, want in before.items():
        assert_same(alone(eng, name, SENTENCES[2]), want, name)
    eng.load_adapter("late", adapters["seq_dora"])  # the free slot takes the next adapter
    assert_same(alone(eng, "late", SENTENCES[2]), alone(make_engine(adapters, names=["seq_dora"]), "seq_dora",
                                                        SENTENCES[2]), "late")
