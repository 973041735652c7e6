"""Paged attention for one generation step, through the transformers attention interface.

A step's new tokens of every sequence are one flat row [1, N] (sequence after sequence). The
polyhead attention function (serving/attention.py) hands each layer's queries/keys/values here
while a PagedStep is current: the new keys/values are written into the KV cache, then
- decode rows (one new token each) attend together: one SDPA over their cached keys/values,
  gathered by block table into [rows, kv_heads, L, d] with a length mask;
- each prefill chunk attends on its own: causally over its own keys when nothing is cached before
  it, else over its cached positions plus its own (a chunk after an earlier chunk, or after a
  prefix-tuned adapter's keys/values, which sit in the cache's first positions).
The per-step index tensors are built once (PagedStep.build) and read by every layer.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kvcache import KVCache

_current = threading.local()


def current() -> "PagedStep | None":
    return getattr(_current, "step", None)


class active:
    """`with active(step):` the model's attention layers read and write the paged cache."""

    def __init__(self, step: "PagedStep"):
        self.step = step

    def __enter__(self):
        _current.step = self.step

    def __exit__(self, *exc):
        _current.step = None


@dataclass(frozen=True)
class Chunk:
    """A run of new tokens of one sequence: flat tokens [t0, t1) at cache positions [start, start + t1 - t0)."""

    t0: int
    t1: int
    start: int
    blocks: tuple[int, ...]


@dataclass
class PagedStep:
    cache: KVCache
    write_rows: torch.Tensor  # [N] cache row of each new token
    decode_tokens: torch.Tensor | None  # [Bd] flat index of each decode row's token
    decode_rows: torch.Tensor | None  # [Bd * L] cache rows each decode row attends to (padded)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] which of them are real; None when all are
    decode_len: int
    prefills: list[tuple[Chunk, torch.Tensor | None, torch.Tensor | None]]  # chunk, context rows, mask

    @classmethod
    def build(cls, cache: KVCache, chunks: list[Chunk], device) -> "PagedStep":
        bs = cache.block_size
        write, decode, prefills = [], [], []
        for c in chunks:
            write.extend(cache.rows(list(c.blocks), c.start, c.start + c.t1 - c.t0))
            if c.t1 - c.t0 == 1 and c.start > 0:
                decode.append(c)
                continue
            if c.start == 0:
                prefills.append((c, None, None))  # causal over its own keys, nothing cached before
                continue
            total = c.start + c.t1 - c.t0
            rows = torch.tensor(cache.rows(list(c.blocks), 0, total), dtype=torch.long, device=device)
            q = torch.arange(c.start, total, device=device).unsqueeze(1)
            mask = (torch.arange(total, device=device).unsqueeze(0) <= q).view(1, 1, total - c.start, total)
            prefills.append((c, rows, mask))
        d_tokens = d_rows = d_mask = None
        length = 0
        if decode:
            seen = [c.start + 1 for c in decode]  # positions each decode row attends to
            length = max(seen)
            n_blocks = -(-length // bs)
            pad = [cache.pad_block] * n_blocks
            table = torch.tensor([list(c.blocks[:n_blocks]) + pad[len(c.blocks):] for c in decode],
                                 dtype=torch.long, device=device)  # [Bd, n_blocks]
            d_rows = ((table * bs).unsqueeze(2) + torch.arange(bs, device=device)).view(len(decode), -1)
            d_rows = d_rows[:, :length].reshape(-1)
            if min(seen) < length:  # rows of equal length need no mask (SDPA's faster path)
                lens = torch.tensor(seen, device=device).unsqueeze(1)
                d_mask = (torch.arange(length, device=device).unsqueeze(0) < lens).view(len(decode), 1, 1, length)
            d_tokens = torch.tensor([c.t0 for c in decode], dtype=torch.long, device=device)
        return cls(cache, torch.tensor(write, dtype=torch.long, device=device), d_tokens, d_rows, d_mask, length,
                   prefills)


def attend(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, step: PagedStep,
           scaling: float | None) -> torch.Tensor:
    """query [1, H, N, d], key/value [1, KV, N, d] -> attention output [1, N, H, d] (transformers' layout)."""
    layer = module.layer_idx
    keys, values = step.cache.keys[layer], step.cache.values[layer]  # [rows, KV, d]
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, KV, d]
    keys.index_copy_(0, step.write_rows, k_new.to(keys.dtype))
    values.index_copy_(0, step.write_rows, v_new.to(values.dtype))
    H, N, d = query.shape[1], query.shape[2], query.shape[3]
    KV = key.shape[1]
    gqa = H != KV
    out = query.new_empty(N, H, d)
    if step.decode_tokens is not None:
        Bd, L = step.decode_tokens.shape[0], step.decode_len
        q = query[0].index_select(1, step.decode_tokens).transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, d]
        k = keys.index_select(0, step.decode_rows).view(Bd, L, KV, d).transpose(1, 2)
        v = values.index_select(0, step.decode_rows).view(Bd, L, KV, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=step.decode_mask,
                                           scale=scaling, enable_gqa=gqa)  # [Bd, H, 1, d]
        out.index_copy_(0, step.decode_tokens, o.squeeze(2))
    for chunk, rows, mask in step.prefills:
        q = query[:, :, chunk.t0:chunk.t1]  # [1, H, n, d]
        if rows is None:
            k, v = key[:, :, chunk.t0:chunk.t1], value[:, :, chunk.t0:chunk.t1]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            k = keys.index_select(0, rows).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KV, total, d]
            v = values.index_select(0, rows).transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[chunk.t0:chunk.t1] = o[0].transpose(0, 1)
    return out.unsqueeze(0)
