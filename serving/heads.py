"""Per-row task heads and pooled outputs, read from the head slots.

PEFT SEQ_CLS heads read the base's own pooler output; token heads read every real
token's last hidden state. Logits are raw (softmax/sigmoid belong to the HTTP layer).
"""
from __future__ import annotations

import torch

from .batch import BatchPlan
from .slots import HeadSlots


def head_logits(heads: HeadSlots, plan: BatchPlan, hidden: torch.Tensor,
                pooled: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Sorted row -> logits ([C] for sequence heads, [T, C] for token heads); rows without a head are absent.

    hidden: [B, T, H] last hidden state; pooled: [B, H] the base pooler's output (or None).
    """
    out = {}
    for seg in plan.segments:
        spec = heads.specs[seg.slot]
        if spec is None:
            continue
        C = spec.num_labels
        W, b = heads.W[seg.slot, :C], heads.b[seg.slot, :C]  # [C, H], [C]
        if spec.task == "token_cls":
            x = hidden[seg.row0:seg.row1]  # [k, T, H]
        elif spec.pooled:
            x = pooled[seg.row0:seg.row1]  # [k, H]
        else:
            x = hidden[seg.row0:seg.row1, 0]  # [k, H]
        logits = torch.matmul(x, W.T) + b
        for i in range(seg.row1 - seg.row0):
            out[seg.row0 + i] = logits[i]
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H], [B, T] -> [B, H]: mean over each row's real tokens, in float32 (no [B, T, H] temporary)."""
    m = mask.to(hidden.dtype).unsqueeze(1)  # [B, 1, T]
    summed = torch.bmm(m, hidden).squeeze(1).to(torch.float32)  # [B, H]
    return summed / mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
