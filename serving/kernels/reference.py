"""The plain, obviously-correct oracle: one row at a time, straight from the semantics.

Every other kernel path must match these functions; they are slow on purpose.
`tokens_per_row` (tpr) is how many consecutive rows of `x`/`y` belong to one batch row
(the sequence length for token-level layers, 1 for pooled layers).

The LoRA op is split in two so modules that read the same input can share one shrink:
    u = shrink(x, A, [(off_i, cap_i)...], [scale_i...], [ranks_i...])   # u_i[t] = x[t] @ A_i[s].T * scale_i[s]
    expand(y, u_i, B_i)                                                  # y[t] += u_i[t] @ B_i[s].T
with A_i = A[:, off_i:off_i + cap_i] (the members' A's stored side by side).
where s is the slot of t's row and rows with s = -1 are skipped. `u` is opaque to callers.
"""
from __future__ import annotations

import torch

from ..batch import BatchPlan


def shrink(x: torch.Tensor, A: torch.Tensor, parts: list[tuple[int, int]], scales: list[torch.Tensor],
           ranks: list[list[int]], plan: BatchPlan, tpr: int) -> list[torch.Tensor]:
    """One shrink for modules that read the same input x.

    x: [N, d_in]; A: [S, W, d_in], member i's rows are A[:, off_i:off_i + cap_i] for parts[i] = (off_i, cap_i);
    scales[i]: [S]. Returns u_i: [N, cap_i] with u_i[t] = x[t] @ A[s, off_i:off_i + cap_i].T * scales[i][s]
    (zero on base rows).
    """
    out = []
    for (off, cap), scale in zip(parts, scales):
        u = x.new_zeros(x.shape[0], cap)
        for row, slot in enumerate(plan.row_slots):
            if slot >= 0:
                t0, t1 = row * tpr, (row + 1) * tpr
                u[t0:t1] = x[t0:t1] @ A[slot, off:off + cap].T * scale[slot]
        out.append(u)
    return out


def expand(y: torch.Tensor, u: torch.Tensor, B: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    """y: [N, d_out] += u: [N, R] @ B[s].T with B: [S, d_out, R], skipping base rows."""
    for row, slot in enumerate(plan.row_slots):
        if slot >= 0:
            t0, t1 = row * tpr, (row + 1) * tpr
            y[t0:t1] += u[t0:t1] @ B[slot].T


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             ranks: list[int], plan: BatchPlan, tpr: int) -> None:
    """Semantics: y[t] += (x[t] @ A[s].T) @ B[s].T * scale[s] for s = slot of t's row, skipping s = -1."""
    [u] = shrink(x, A, [(0, A.shape[1])], [scale], [ranks], plan, tpr)
    expand(y, u, B, plan, tpr)


def rescale_output(y: torch.Tensor, bias: torch.Tensor | None, G: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    """Semantics: y[t] = G[s] * (y[t] - bias) + bias for s = slot of t's row (DoRA), skipping s = -1.

    y: [N, d_out], bias: [d_out] or None, G: [S, d_out].
    """
    for row, slot in enumerate(plan.row_slots):
        if slot < 0:
            continue
        t0, t1 = row * tpr, (row + 1) * tpr
        b = bias if bias is not None else 0.0
        y[t0:t1] = G[slot] * (y[t0:t1] - b) + b


def linear_expand(x: torch.Tensor, weight: torch.Tensor, conv1d: bool, u: torch.Tensor, Bb: torch.Tensor,
                  plan: BatchPlan, tpr: int) -> torch.Tensor:
    """Semantics: the base layer plus expand: y = x @ W.T + bias, then y[t] += u[t] @ B[s].T,
    where Bb[s] = [bias | B[s]]: column 0 of every slot holds the base layer's bias (zeros if none).

    weight: [d_out, d_in] (nn.Linear) or [d_in, d_out] (GPT-2 Conv1D, conv1d=True); Bb: [S, d_out, 1 + R].
    Returns y: [N, d_out].
    """
    y = x @ (weight if conv1d else weight.T) + Bb[0, :, 0]
    expand(y, u, Bb[:, :, 1:], plan, tpr)
    return y
