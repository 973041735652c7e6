"""The plain, obviously-correct oracle: one row at a time, straight from the semantics.

Every other kernel path must match these functions; they are slow on purpose.
`tokens_per_row` is how many consecutive rows of `x`/`y` belong to one batch row
(the sequence length for token-level layers, 1 for pooled layers).
"""
from __future__ import annotations

import torch

from ..batch import BatchPlan


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             ranks: list[int], plan: BatchPlan, tokens_per_row: int) -> None:
    """Semantics: y[t] += (x[t] @ A[s].T) @ B[s].T * scale[s] for s = slot of t's row, skipping s = -1.

    y: [N, d_out], x: [N, d_in], A: [S, R, d_in], B: [S, d_out, R], scale: [S]; N = rows * tokens_per_row.
    """
    for row, slot in enumerate(plan.row_slots):
        if slot < 0:
            continue
        t0, t1 = row * tokens_per_row, (row + 1) * tokens_per_row
        y[t0:t1] += (x[t0:t1] @ A[slot].T) @ B[slot].T * scale[slot]


def rescale_output(y: torch.Tensor, bias: torch.Tensor | None, G: torch.Tensor, plan: BatchPlan,
                   tokens_per_row: int) -> None:
    """Semantics: y[t] = G[s] * (y[t] - bias) + bias for s = slot of t's row (DoRA), skipping s = -1.

    y: [N, d_out], bias: [d_out] or None, G: [S, d_out].
    """
    for row, slot in enumerate(plan.row_slots):
        if slot < 0:
            continue
        t0, t1 = row * tokens_per_row, (row + 1) * tokens_per_row
        b = bias if bias is not None else 0.0
        y[t0:t1] = G[slot] * (y[t0:t1] - b) + b

