"""The fast path for CPUs (and any torch device): one batched matmul per bucket of equal-size segments.

Rows are sorted by slot (see BatchPlan), so each adapter's tokens are one contiguous block.
A bucket of n segments x L tokens becomes x viewed as [n, L, d_in] and one bmm against the
n adapters' weights, gathered once per bucket (one copy per distinct adapter, never per row).
Cost follows the adapter weights the batch reads: base rows are skipped, and each bucket
runs at its own largest rank rather than the slot capacity.
"""
from __future__ import annotations

import torch

from ..batch import BatchPlan


def _bucket_rank(ranks: list[int], slots: tuple[int, ...]) -> int:
    return max(ranks[s] for s in slots)


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             ranks: list[int], plan: BatchPlan, tokens_per_row: int) -> None:
    """Same semantics as reference.add_lora: y[t] += (x[t] @ A[s].T) @ B[s].T * scale[s]."""
    d_in, d_out = x.shape[-1], y.shape[-1]
    for bucket in plan.buckets:
        r = _bucket_rank(ranks, bucket.slots)
        if r == 0:
            continue
        n, L = bucket.n_seg, bucket.rows_per_seg * tokens_per_row
        t0, t1 = bucket.row0 * tokens_per_row, bucket.row1 * tokens_per_row
        xs = x[t0:t1].view(n, L, d_in)
        a = A[:, :r].index_select(0, bucket.slot_index)  # [n, r, d_in]
        b = B[:, :, :r].index_select(0, bucket.slot_index)  # [n, d_out, r]
        u = torch.bmm(xs, a.transpose(1, 2))  # [n, L, r]
        u.mul_(scale.index_select(0, bucket.slot_index).view(n, 1, 1))
        y[t0:t1].view(n, L, d_out).baddbmm_(u, b.transpose(1, 2))


def rescale_output(y: torch.Tensor, bias: torch.Tensor | None, G: torch.Tensor, plan: BatchPlan,
                   tokens_per_row: int) -> None:
    """Same semantics as reference.rescale_output: y[t] = G[s] * (y[t] - bias) + bias."""
    d_out = y.shape[-1]
    for bucket in plan.buckets:
        n, L = bucket.n_seg, bucket.rows_per_seg * tokens_per_row
        t0, t1 = bucket.row0 * tokens_per_row, bucket.row1 * tokens_per_row
        ys = y[t0:t1].view(n, L, d_out)
        g = G.index_select(0, bucket.slot_index).unsqueeze(1)  # [n, 1, d_out]
        if bias is None:
            ys.mul_(g)
        else:
            ys.sub_(bias).mul_(g).add_(bias)

