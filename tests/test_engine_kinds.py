"""Every adapter kind in one batch: LoRA, IA3, prompt, prefix, bottleneck and base rows together equal
each row run alone; multi-task rows share one body run."""
from __future__ import annotations

import pytest
import torch

from adapters_store import BaseSchema
from serving import Engine, Request

from .adapter_factory import make_bottleneck, make_ia3, make_lora, make_prefix, make_prompt
from .conftest import minilm_path
from .test_engine_mixed import SENTENCES as INPUTS
from .test_engine_mixed import alone, assert_same

@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    schema = BaseSchema.from_config_dir(minilm_path())
    root = tmp_path_factory.mktemp("kinds")
    return {
        "lora_seq": make_lora(root / "lora", schema, seed=1, r=8, head="SEQ_CLS", num_labels=3),
        "ia3_seq": make_ia3(root / "ia3", schema, seed=2, head="SEQ_CLS", num_labels=2),
        "ia3_tok": make_ia3(root / "ia3t", schema, seed=3, targets=("query", "value", "intermediate.dense"),
                            feedforward=("intermediate.dense",), head="TOKEN_CLS", num_labels=4),
        "prompt4_seq": make_prompt(root / "p4", schema, seed=4, n_virtual=4, head="SEQ_CLS", num_labels=3),
        "prompt10_tok": make_prompt(root / "p10", schema, seed=5, n_virtual=10, head="TOKEN_CLS", num_labels=5),
        "ptuning_emb": make_prompt(root / "pt", schema, seed=6, n_virtual=6, peft_type="P_TUNING"),
        "prefix3_seq": make_prefix(root / "x3", schema, seed=7, n_virtual=3, head="SEQ_CLS", num_labels=2),
        "prefix7_tok": make_prefix(root / "x7", schema, seed=8, n_virtual=7, head="TOKEN_CLS", num_labels=3),
        "bn_cls": make_bottleneck(root / "bn", schema, seed=9, arch="seq_bn", head="classification", num_labels=3),
        "bn_tag": make_bottleneck(root / "bnt", schema, seed=10, arch="double_seq_bn", reduction_factor=32,
                                  head="tagging", num_labels=5, head_layers=1),
        "bn_ml": make_bottleneck(root / "bnm", schema, seed=11, arch="seq_bn", reduction_factor=8,
                                 head="multilabel_classification", num_labels=4),
    }


@pytest.fixture(scope="module")
def engine(kinds):
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=16)
    for name, path in kinds.items():
        eng.load_adapter(name, path)
    return eng


def test_every_kind_changes_the_output(engine, kinds):
    base = alone(engine, None, INPUTS[1])
    for name in kinds:
        res = alone(engine, name, INPUTS[1])
        diff = (res.embedding - base.embedding).abs().max().item()
        assert diff > 1e-2, f"{name} leaves the body unchanged (max diff {diff})"


def test_outputs_have_the_contract_shapes(engine, kinds):
    ids = INPUTS[2]
    shapes = {
        "lora_seq": [3], "ia3_seq": [2], "ia3_tok": [len(ids), 4], "prompt4_seq": [3],
        "prompt10_tok": [len(ids), 5], "prefix3_seq": [2], "prefix7_tok": [len(ids), 3],
        "bn_cls": [3], "bn_tag": [len(ids), 5], "bn_ml": [4],
    }
    for name, shape in shapes.items():
        assert list(alone(engine, name, ids).logits.shape) == shape, name
    assert alone(engine, "ptuning_emb", ids).logits is None
    assert alone(engine, "bn_ml", ids).task == "multilabel"
    assert alone(engine, "bn_tag", ids).task == "token_cls"


def test_one_batch_of_every_kind_equals_each_row_alone(engine, kinds):
    names = [None, *kinds]
    requests = [Request(adapter=names[i % len(names)], input_ids=INPUTS[(i * 3) % len(INPUTS)])
                for i in range(2 * len(names) + 3)]
    want = [alone(engine, r.adapter, list(r.input_ids)) for r in requests]
    forwards = engine.forwards
    got = engine.infer(requests)
    assert engine.forwards == forwards + 1, "the mixed batch must run as one forward"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, f"row {i} ({requests[i].adapter})")


def test_rows_of_very_different_lengths_run_in_separate_forwards(engine):
    """Padding 200 short rows to one long prompt row's length would cost more than a second forward."""
    short = [Request(adapter="lora_seq", input_ids=INPUTS[3]) for _ in range(100)]
    long = [Request(adapter="prompt10_tok", input_ids=INPUTS[2])]
    forwards = engine.forwards
    got = engine.infer(long + short)
    assert engine.forwards == forwards + 2
    assert_same(got[0], alone(engine, "prompt10_tok", INPUTS[2]), "long row")
    assert_same(got[1], alone(engine, "lora_seq", INPUTS[3]), "short row")


def test_a_prefix_row_at_its_limit_beside_a_row_of_every_position_equals_each_alone(engine):
    """512 positions: a prefix row of 505 tokens (7 virtual) fills them; padded to a 512-token row's length in
    one forward, its padding would take positions 512-518 (BERT's position embeddings end at 511)."""
    full = [101] + [2000 + i % 300 for i in range(510)] + [102]
    limit = [101] + [3000 + i % 300 for i in range(503)] + [102]
    requests = [Request(adapter="prefix7_tok", input_ids=limit), Request(adapter="lora_seq", input_ids=full),
                Request(adapter="prefix3_seq", input_ids=full[:509])]
    want = [alone(engine, r.adapter, list(r.input_ids)) for r in requests]
    forwards = engine.forwards
    got = engine.infer(requests)
    assert engine.forwards == forwards + 1
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.error is None, g.error
        assert_same(g, w, f"row {i} ({requests[i].adapter})")


@pytest.fixture(scope="module")
def multitask(tmp_path_factory):
    """Head-only adapters (no body weights) and one LoRA body under two different heads."""
    schema = BaseSchema.from_config_dir(minilm_path())
    root = tmp_path_factory.mktemp("multitask")
    eng = Engine.from_pretrained(str(minilm_path()), max_slots=8)
    for i, (labels, head) in enumerate([(3, "SEQ_CLS"), (2, "SEQ_CLS"), (5, "TOKEN_CLS")]):
        eng.load_adapter(f"head{i}", make_lora(root / f"h{i}", schema, seed=20 + i, targets=(), head=head,
                                               num_labels=labels))
    # same seed: the same LoRA body (drawn first), then different heads
    eng.load_adapter("body_a", make_lora(root / "ba", schema, seed=30, r=4, head="SEQ_CLS", num_labels=3))
    eng.load_adapter("body_b", make_lora(root / "bb", schema, seed=30, r=4, head="TOKEN_CLS", num_labels=4))
    return eng


def test_head_only_adapters_on_one_input_run_the_body_once(multitask):
    eng = multitask
    ids = INPUTS[1]
    want = [alone(eng, f"head{i}", ids) for i in range(3)]
    rows_before, forwards = eng.body_rows, eng.forwards
    got = eng.infer([Request(adapter=f"head{i}", input_ids=ids) for i in range(3)])
    assert eng.forwards == forwards + 1 and eng.body_rows == rows_before + 1, "one body row for three heads"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, f"head{i}")
    assert len({tuple(g.logits.shape) for g in got}) == 3


def test_one_body_under_two_heads_runs_once_and_other_inputs_do_not_merge(multitask):
    eng = multitask
    want = {(n, i): alone(eng, n, INPUTS[i]) for n in ("body_a", "body_b", None) for i in (0, 1)}
    assert not torch.allclose(want[("body_a", 0)].embedding, want[(None, 0)].embedding)
    torch.testing.assert_close(want[("body_a", 0)].embedding, want[("body_b", 0)].embedding)
    requests = [Request(adapter=n, input_ids=INPUTS[i]) for i in (0, 1) for n in ("body_a", "body_b", None)]
    rows_before = eng.body_rows
    got = eng.infer(requests)
    assert eng.body_rows == rows_before + 4, "2 inputs x (one shared LoRA body + the base)"
    for r, g in zip(requests, got):
        assert_same(g, want[(r.adapter, INPUTS.index(list(r.input_ids)))], f"{r.adapter}")
