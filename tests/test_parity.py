"""Parity with outputs computed by the real PEFT and AdapterHub libraries (../shared/fixtures), alone and mixed."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file

from serving import Engine, Request

from .conftest import base_path, fixtures_root

@lru_cache(maxsize=None)
def case_info(name: str) -> dict:
    root = fixtures_root() / "cases" / name
    info = json.loads((root / "case.json").read_text())
    info["expected"] = load_file(str(root / "expected.safetensors"))
    info["adapter_dir"] = root / "adapter"
    return info


def all_cases() -> list[str]:
    return sorted(p.name for p in (fixtures_root() / "cases").iterdir())


def row_ids(info: dict, row: int) -> list[int]:
    n = int(info["expected"]["attention_mask"][row].sum())
    return info["expected"]["input_ids"][row, :n].tolist()


@lru_cache(maxsize=None)
def engine_for(base: str) -> Engine:
    return Engine.from_pretrained(str(base_path(base)), device="cpu", dtype="float32", max_slots=16)


def ensure_loaded(eng: Engine, case: str) -> None:
    if case not in eng.adapters():
        eng.load_adapter(case, case_info(case)["adapter_dir"])


def check_row(result, info: dict, row: int, what: str) -> None:
    """Compare one result row with the case's expected row within the case's tolerance."""
    assert result.error is None, f"{what}: {result.error}"
    exp = info["expected"]
    n = int(exp["attention_mask"][row].sum())
    tol = dict(atol=info["atol"], rtol=info["rtol"])
    if info["format"] == "none" and info["base"] == "minilm":
        assert result.logits is None, f"{what}: a base row on an encoder has no logits"
        torch.testing.assert_close(result.embedding, exp["embedding"][row], **tol, msg=lambda m: f"{what}: {m}")
        return
    expected = exp["logits"][row]
    expected = expected[:n] if expected.dim() == 2 else expected
    torch.testing.assert_close(result.logits, expected, **tol, msg=lambda m: f"{what}: {m}")


def test_fixture_set_has_every_kind():
    kinds = {(case_info(c)["format"], case_info(c)["kind"]) for c in all_cases()}
    want = {("peft", k) for k in ("lora", "rslora", "dora", "adalora", "ia3", "prompt_tuning", "p_tuning",
                                  "prefix_tuning")} | {("adapterhub", "bottleneck"), ("adapterhub", "lora")}
    assert want <= kinds, want - kinds


@pytest.mark.parametrize("case", all_cases())
def test_case_matches_reference(case):
    info = case_info(case)
    eng = engine_for(info["base"])
    name = None if info["format"] == "none" else case
    if name:
        ensure_loaded(eng, case)
    B = info["expected"]["input_ids"].shape[0]
    results = eng.infer([Request(adapter=name, input_ids=row_ids(info, i)) for i in range(B)])
    for i, res in enumerate(results):
        check_row(res, info, i, f"{case}[{i}]")
    if name and "max_abs_diff_vs_base" in info:
        assert info["max_abs_diff_vs_base"] > 10 * info["atol"], "the adapter must change the output"


@pytest.mark.parametrize("case", ["minilm_lora_tokencls", "tiny_gpt2_lora_attn"])
def test_case_matches_reference_with_triton_kernels(case):
    """The Triton kernels (in the interpreter on CPUs) give the reference outputs too."""
    info = case_info(case)
    eng = Engine.from_pretrained(str(base_path(info["base"])), max_slots=2, kernel="triton")
    eng.load_adapter(case, info["adapter_dir"])
    rows = [0, 1]
    results = eng.infer([Request(adapter=case, input_ids=row_ids(info, i)) for i in rows])
    for i, res in zip(rows, results):
        check_row(res, info, i, f"{case}[{i}] triton")


def mixed_scenarios():
    scenarios = json.loads((fixtures_root() / "mixed.json").read_text())
    out = []
    for i, rows in enumerate(scenarios):
        out.append(pytest.param(rows, id=f"scenario{i}-{len(rows)}rows"))
    return out


@pytest.mark.parametrize("rows", mixed_scenarios())
def test_mixed_scenario_in_one_batch(rows):
    base = case_info(rows[0]["case"] or rows[0]["base_case"])["base"]
    eng = engine_for(base)
    for r in rows:
        if r["case"]:
            ensure_loaded(eng, r["case"])
    forwards = eng.forwards
    requests = [Request(adapter=r["case"], input_ids=row_ids(case_info(r["case"] or r["base_case"]), r["row"]))
                for r in rows]
    results = eng.infer(requests)
    assert eng.forwards == forwards + 1, "a mixed scenario must run as one forward"
    for r, res in zip(rows, results):
        info = case_info(r["case"] or r["base_case"])
        check_row(res, info, r["row"], f"{r['case'] or r['base_case']}[{r['row']}]")
