"""Prefix tuning through the transformers attention interface: per-row prefix keys/values in every layer.

The model runs with attention implementation "polyhead": SDPA for every row, except that the
rows of prefix-tuned adapters (one contiguous range at the end of the sorted batch, see
BatchPlan groups) see their own prefix keys/values before the input's, with the mask extended
per row (a row with a shorter prefix masks the rest). A mask function is registered too
(transformers' sdpa_mask): an attention function registered alone would get mask=None on BERT.
During a generation step (serving/generation/paged.py) every layer attends over the paged KV
cache instead, and no mask is built (the step's own index tensors say who sees what).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .generation import paged

NAME = "polyhead"
_registered = False


def install(model: nn.Module, state) -> None:
    """Switch `model` to the polyhead attention; its attention modules read prefixes from `state`."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True
    for module in model.modules():
        if hasattr(module, "layer_idx") and "Attention" in type(module).__name__:
            module._polyhead_state = state
    model.set_attn_implementation(NAME)


def _mask(*args, **kwargs):
    """sdpa_mask, except in a generation step: its attention needs no [N, N] mask over the flat tokens."""
    return None if paged.current() is not None else sdpa_mask(*args, **kwargs)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs):
    """query: [B, heads, T, d]; key/value: [B, kv_heads, T, d]; mask: bool [B, 1, T, T] or None."""
    step = paged.current()
    if step is not None:
        return paged.attend(module, query, key, value, step, kwargs.get("scaling")), None
    state = getattr(module, "_polyhead_state", None)
    rows = state.prefix_rows if state is not None else None
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    row0, slots, lengths = rows  # prefix rows are sorted rows [row0, B)
    prefix = state.prefix_slots.data  # [S, layers, 2, kv_heads, P, d]
    P = int(lengths.max())
    kv = prefix[:, module.layer_idx, :, :, :P].index_select(0, slots)  # [n, 2, kv_heads, P, d]
    B, T = query.shape[0], query.shape[2]
    n = B - row0
    if attention_mask is None:
        real = torch.ones(T, key.shape[2], dtype=torch.bool, device=query.device)
        if getattr(module, "is_causal", False):
            real = real.tril()
        real = real.expand(n, 1, T, key.shape[2])
    else:
        attention_mask = attention_mask.expand(B, *attention_mask.shape[1:])
        real = attention_mask[row0:]
        if real.dtype != torch.bool:
            raise TypeError("the polyhead attention expects boolean masks (sdpa_mask)")
    seen = (torch.arange(P, device=query.device) < lengths.unsqueeze(1)).view(n, 1, 1, P)  # [n, 1, 1, P]
    mask = torch.cat([seen.expand(n, 1, T, P), real], dim=3)  # [n, 1, T, P + T_kv]
    k = torch.cat([kv[:, 0].to(key.dtype), key[row0:]], dim=2)
    v = torch.cat([kv[:, 1].to(value.dtype), value[row0:]], dim=2)
    kwargs.pop("is_causal", None)
    out_prefix, _ = sdpa_attention_forward(module, query[row0:], k, v, mask, is_causal=False, **kwargs)
    if row0 == 0:
        return out_prefix, None
    head_mask = None if attention_mask is None else attention_mask[:row0]
    out_rest, _ = sdpa_attention_forward(module, query[:row0], key[:row0], value[:row0], head_mask, **kwargs)
    return torch.cat([out_rest, out_prefix], dim=0), None
