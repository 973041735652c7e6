"""The fast path for CPUs (and any torch device): one batched matmul per bucket of equal-size segments.

Rows are sorted by slot (see BatchPlan), so each adapter's tokens are one contiguous block.
A bucket of n segments x L tokens becomes x viewed as [n, L, d_in] and one bmm against the
n adapters' weights, gathered once per bucket (one copy per distinct adapter, never per row).
Modules that read the same input share one shrink: their gathered A's are concatenated and
x is read once. Cost follows the adapter weights the batch reads: base rows are skipped,
and each bucket runs at its own largest rank per module rather than the slot capacity.

`u` here is a list over buckets of [n, L, r_b] views (None where the bucket's rank is 0).
"""
from __future__ import annotations

import torch

from ..batch import BatchPlan


def shrink(x: torch.Tensor, As: list[torch.Tensor], scales: list[torch.Tensor], ranks: list[list[int]],
           plan: BatchPlan, tpr: int) -> list[list[torch.Tensor | None]]:
    d_in = x.shape[-1]
    out: list[list[torch.Tensor | None]] = [[] for _ in As]
    for bucket in plan.buckets:
        n, L = bucket.n_seg, bucket.rows_per_seg * tpr
        widths = [max(r[s] for s in bucket.slots) for r in ranks]
        parts = [A[:, :w].index_select(0, bucket.slot_index) for A, w in zip(As, widths) if w]  # [n, w, d_in]
        if not parts:
            for u in out:
                u.append(None)
            continue
        a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [n, sum w, d_in]
        t0 = bucket.row0 * tpr
        u_all = torch.bmm(x[t0:t0 + n * L].view(n, L, d_in), a.transpose(1, 2))  # [n, L, sum w]
        off = 0
        for i, w in enumerate(widths):
            if w == 0:
                out[i].append(None)
                continue
            u = u_all[:, :, off:off + w]
            u.mul_(scales[i].index_select(0, bucket.slot_index).view(n, 1, 1))
            out[i].append(u)
            off += w
    return out


def expand(y: torch.Tensor, u: list[torch.Tensor | None], B: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    d_out = y.shape[-1]
    for bucket, ub in zip(plan.buckets, u):
        if ub is None:
            continue
        n, L, w = ub.shape
        t0 = bucket.row0 * tpr
        b = B[:, :, :w].index_select(0, bucket.slot_index)  # [n, d_out, w]
        y[t0:t0 + n * L].view(n, L, d_out).baddbmm_(ub, b.transpose(1, 2))


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             ranks: list[int], plan: BatchPlan, tpr: int) -> None:
    """Same semantics as reference.add_lora."""
    [u] = shrink(x, [A], [scale], [ranks], plan, tpr)
    expand(y, u, B, plan, tpr)


def rescale_output(y: torch.Tensor, bias: torch.Tensor | None, G: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    """Same semantics as reference.rescale_output: y[t] = G[s] * (y[t] - bias) + bias."""
    d_out = y.shape[-1]
    for bucket in plan.buckets:
        n, L = bucket.n_seg, bucket.rows_per_seg * tpr
        t0 = bucket.row0 * tpr
        ys = y[t0:t0 + n * L].view(n, L, d_out)
        g = G.index_select(0, bucket.slot_index).unsqueeze(1)  # [n, 1, d_out]
        if bias is None:
            ys.mul_(g)
        else:
            ys.sub_(bias).mul_(g).add_(bias)
