"""Per-row task heads and pooled outputs, read from the head slots.

PEFT SEQ_CLS heads read the base's own pooler output; AdapterHub classification heads read the
hidden state at position 0 through their own layers; token heads read every real token's last
hidden state. Logits are raw (softmax/sigmoid belong to the HTTP layer).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers.activations import get_activation

from .slots import HeadSlots


@lru_cache(maxsize=None)
def activation(name: str):
    """An activation by the name AdapterHub configs use (transformers' names, plus "leakyrelu").

    Cached: transformers builds a new module per lookup, and layers ask for it on every forward."""
    return F.leaky_relu if name == "leakyrelu" else get_activation(name)


def head_logits(heads: HeadSlots, wanted: list[tuple[int, int]], hidden: torch.Tensor,
                pooled: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Logits for wanted[i] = (body row, head slot): the head in that slot on that row of the forward.

    Returns i -> logits ([C] for sequence heads, [T, C] for token heads over all T positions);
    entries whose slot has no head are absent. Rows sharing a head run as one matmul per layer.
    hidden: [B, T, H] last hidden state; pooled: [B, H] the base pooler's output (or None).
    """
    by_slot: dict[int, list[int]] = {}
    for i, (_, slot) in enumerate(wanted):
        if slot >= 0 and heads.specs[slot] is not None:
            by_slot.setdefault(slot, []).append(i)
    out = {}
    for slot, items in by_slot.items():
        spec = heads.specs[slot]
        layers, W, b = heads.tensors[slot]
        rows = torch.tensor([wanted[i][0] for i in items], device=hidden.device)
        if spec.task == "token_cls":
            x = hidden.index_select(0, rows)  # [k, T, H]
        elif spec.pooled:
            x = pooled.index_select(0, rows)  # [k, H]
        else:
            x = hidden[:, 0].index_select(0, rows)  # [k, H]
        act = activation(spec.activation) if spec.activation else None
        for W1, b1 in layers:
            x = torch.nn.functional.linear(x, W1, b1)
            if act is not None:
                x = act(x)
        logits = torch.nn.functional.linear(x, W, b)
        for j, i in enumerate(items):
            out[i] = logits[j]
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H], [B, T] -> [B, H]: mean over each row's real tokens, in float32 (no [B, T, H] temporary)."""
    m = mask.to(hidden.dtype).unsqueeze(1)  # [B, 1, T]
    summed = torch.bmm(m, hidden).squeeze(1).to(torch.float32)  # [B, H]
    return summed / mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)


POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """[B, T, H], [B, T] (1 on each row's real tokens, one contiguous run) -> [B, H] in float32, as
    sentence-transformers' Pooling module defines each mode: the mean of the real tokens; the first one ([CLS]);
    their element-wise max; their sum over sqrt(count); their mean weighted by position (1 for the first); the
    last one."""
    if mode == "mean":
        return mean_pool(hidden, mask)
    counts = mask.sum(1).clamp(min=1)  # [B]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    first = mask.to(torch.int64).argmax(1)  # [B]: the first real token
    if mode == "cls":
        return hidden[rows, first].to(torch.float32)
    if mode == "lasttoken":
        return hidden[rows, first + counts - 1].to(torch.float32)
    if mode == "max":
        masked = hidden.to(torch.float32).masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        return masked.max(1).values
    if mode == "mean_sqrt_len":
        return mean_pool(hidden, mask) * counts.to(torch.float32).sqrt().unsqueeze(1)
    if mode == "weightedmean":
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) - first.unsqueeze(1) + 1
        weights = (positions * mask).to(torch.float32)  # [B, T]: 1, 2, ... on the real tokens, 0 elsewhere
        summed = torch.bmm(weights.unsqueeze(1), hidden.to(torch.float32)).squeeze(1)
        return summed / weights.sum(1, keepdim=True)
    raise ValueError(f"unknown pooling {mode!r}: one of {', '.join(POOLINGS)}")
