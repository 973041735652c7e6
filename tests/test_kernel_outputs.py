"""Layer outputs from buffers kept across forwards (kernels.cpu.output_buffer): a kept output is never
overwritten, a dropped one's buffer is reused, and linear_expand still equals the reference with them."""
import torch

from serving.batch import BatchPlan
from serving.kernels import cpu, reference

from .test_kernels import random_slots


def test_a_buffer_is_handed_out_again_only_when_nothing_holds_it(monkeypatch):
    monkeypatch.setattr(cpu, "POOLED_MIN_NUMEL", 1)
    ws, like = {}, torch.empty(1)
    a = cpu.output_buffer(ws, 4, 6, like)
    b = cpu.output_buffer(ws, 4, 6, like)
    assert a.data_ptr() != b.data_ptr(), "a held output is not handed out twice"
    ptr, view = a.data_ptr(), a.view(-1)
    del a
    held = cpu.output_buffer(ws, 4, 6, like)
    assert held.data_ptr() != ptr, "a view still holds the buffer"
    del view
    assert cpu.output_buffer(ws, 2, 3, like).data_ptr() == ptr, "a dropped output's buffer is reused"
    c = cpu.output_buffer(ws, 10, 6, like)  # larger than every free buffer: a new one
    assert c.shape == (10, 6) and c.data_ptr() not in (ptr, b.data_ptr(), held.data_ptr())
    assert cpu.output_buffer(ws, 2, 2, like.to(torch.float64)).dtype == torch.float64


def test_linear_expand_keeps_earlier_outputs_and_matches_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "POOLED_MIN_NUMEL", 1)
    g = torch.Generator().manual_seed(7)
    S, R, d_in, d_out, T, ranks = 4, 8, 21, 13, 3, [8, 3, 0, 5]
    A, B, scale = random_slots(S, R, d_in, d_out, ranks, torch.float32, g)
    W, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    Bb = torch.cat([b.view(1, d_out, 1).expand(S, d_out, 1), B], dim=2)
    # buckets in row order: slot 0 (1 row), slot 2 (2 rows, rank 0: no delta), slot 3 (3 rows), after a base row
    plan = BatchPlan.build([3, 0, 2, -1, 3, 2, 3])
    outs, wants = [], []
    for _ in range(3):
        x = torch.randn(7 * T, d_in, generator=g)
        want = x @ W.T + b
        reference.add_lora(want, x, A, B, scale, ranks, plan, T)
        [u] = cpu.shrink(x, A, [(0, R)], [scale], [ranks], plan, T)
        outs.append(cpu.linear_expand(x, W, False, u, Bb, plan, T))
        wants.append(want)
    for got, want in zip(outs, wants):  # each kept output still holds its own forward's values
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ptr = outs[0].data_ptr()
    outs.clear()
    [u] = cpu.shrink(x, A, [(0, R)], [scale], [ranks], plan, T)
    assert cpu.linear_expand(x, W, False, u, Bb, plan, T).data_ptr() == ptr
