"""The CPU kernels match the reference oracle: batch x adapters x rank x odd sizes x dtype, -1 rows, last slot."""
import pytest
import torch

from serving.batch import BatchPlan
from serving.kernels import cpu, reference, select

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def random_slots(S, R, d_in, d_out, ranks, dtype, g):
    A = torch.zeros(S, R, d_in, dtype=dtype)
    B = torch.zeros(S, d_out, R, dtype=dtype)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, d_in, generator=g).to(dtype)
        B[s, :, :r] = (torch.randn(d_out, r, generator=g) * 0.1).to(dtype)
    scale = (torch.rand(S, generator=g) + 0.5).to(dtype)
    return A, B, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, S, R, d_in, d_out, T", [
    (1, 1, 8, 16, 24, 3),
    (7, 4, 8, 33, 17, 5),
    (16, 9, 16, 64, 96, 1),
    (12, 3, 4, 7, 130, 2),
])
def test_add_lora_matches_reference(dtype, rows, S, R, d_in, d_out, T):
    g = torch.Generator().manual_seed(rows * 100 + S)
    ranks = [max(1, (s * 5) % (R + 1)) for s in range(S)]
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, dtype, g)
    slots = [(-1 if i % 4 == 0 else (S - 1 if i % 3 == 0 else i % S)) for i in range(rows)]
    plan = BatchPlan.build(slots)
    x = torch.randn(rows * T, d_in, generator=g).to(dtype)
    y0 = torch.randn(rows * T, d_out, generator=g).to(dtype)
    want, got = y0.clone(), y0.clone()
    reference.add_lora(want, x, A, B, scale, ranks, plan, T)
    cpu.add_lora(got, x, A, B, scale, ranks, plan, T)
    torch.testing.assert_close(got, want, **TOL[dtype])
    base_rows = [i for i, s in enumerate(plan.row_slots) if s < 0]
    for i in base_rows:  # -1 rows untouched, bit for bit
        assert torch.equal(got[i * T:(i + 1) * T], y0[i * T:(i + 1) * T])
    if any(s >= 0 for s in slots):
        assert not torch.allclose(want, y0), "the adapters must change the output"


def test_rescale_output_matches_reference():
    g = torch.Generator().manual_seed(3)
    S, d_out, T = 5, 19, 4
    slots = [2, -1, 4, 2, 0, 4, 4]
    plan = BatchPlan.build(slots)
    G = torch.rand(S, d_out, generator=g) + 0.5
    bias = torch.randn(d_out, generator=g)
    y0 = torch.randn(len(slots) * T, d_out, generator=g)
    for b in (bias, None):
        want, got = y0.clone(), y0.clone()
        reference.rescale_output(want, b, G, plan, T)
        cpu.rescale_output(got, b, G, plan, T)
        torch.testing.assert_close(got, want)
        assert torch.equal(got[:T], y0[:T])


def test_kernel_selection(monkeypatch):
    assert select("cpu") is cpu
    assert select("cpu", "reference") is reference
    monkeypatch.setenv("POLYHEAD_KERNEL", "reference")
    assert select("cpu") is reference
    monkeypatch.setenv("POLYHEAD_KERNEL", "bogus")
    with pytest.raises(ValueError, match="POLYHEAD_KERNEL"):
        select("cpu")


@pytest.mark.parametrize("kernels", [cpu, reference], ids=["cpu", "reference"])
def test_fused_shrink_of_modules_sharing_an_input(kernels):
    """q/k/v-style groups: one shrink for several modules equals each module's own add_lora."""
    g = torch.Generator().manual_seed(11)
    S, T, d_in = 6, 3, 20
    outs, ranks = [40, 20, 8], [[3, 0, 8, 5, 1, 8], [2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0]]
    mods = [random_slots(S, 8, d_in, d, r, torch.float32, g) for d, r in zip(outs, ranks)]
    slots = [5, -1, 0, 1, 5, 0, 3, 4, 1]  # buckets of consecutive (3, 4) and scattered slots (0, 1, 5)
    plan = BatchPlan.build(slots)
    x = torch.randn(len(slots) * T, d_in, generator=g)
    block = torch.cat([m[0] for m in mods], dim=1)  # the members' A side by side
    parts = [(8 * i, 8) for i in range(len(mods))]
    us = kernels.shrink(x, block, parts, [m[2] for m in mods], ranks, plan, T)
    for (A, B, scale), r, u, d in zip(mods, ranks, us, outs):
        y0 = torch.randn(len(slots) * T, d, generator=g)
        got, want = y0.clone(), y0.clone()
        kernels.expand(got, u, B, plan, T)
        reference.add_lora(want, x, A, B, scale, r, plan, T)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias, conv1d", [(True, False), (False, False), (True, True)])
def test_linear_expand_matches_base_plus_reference_delta(bias, conv1d):
    g = torch.Generator().manual_seed(5)
    S, R, d_in, d_out, T, ranks = 4, 8, 21, 13, 3, [8, 3, 0, 5]
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, torch.float32, g)
    W = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else torch.zeros(d_out)
    Bb = torch.cat([b.view(1, d_out, 1).expand(S, d_out, 1), B], dim=2)  # [S, d_out, 1 + R]: bias in column 0
    plan = BatchPlan.build([1, -1, 3, 1, 2, 0, -1, 3, 2])
    x = torch.randn(9 * T, d_in, generator=g)
    want = x @ W.T + b
    reference.add_lora(want, x, A, B, scale, ranks, plan, T)
    weight = W.T.contiguous() if conv1d else W
    for kernels in (cpu, reference):
        [u] = kernels.shrink(x, A, [(0, R)], [scale], [ranks], plan, T)
        got = kernels.linear_expand(x, weight, conv1d, u, Bb, plan, T)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
