"""Bottleneck adapters (AdapterHub seq_bn / double_seq_bn) on BERT-style residual sub-layers.

A sub-layer (`BertSelfOutput`, `BertOutput`) computes out = LN(dropout(dense(x)) + r). Its
patched forward computes that for every row, then recomputes the rows of each bottleneck
configuration present in the batch (one contiguous range per configuration, see
BatchPlan groups) with the arithmetic in `adapters_store.Bottleneck`:
a constant number of tensor ops per configuration, one batched matmul per bucket.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapters_store import Bottleneck

from .batch import BatchPlan
from .heads import activation
from .kernels.cpu import _matmul_slots
from .layers import GROUP_BOTTLENECK
from .slots import BottleneckSlots

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the adapters' own LayerNorms use


@dataclass(frozen=True)
class Config:
    """What decides a bottleneck row's arithmetic; rows with equal configs are computed together."""

    activation: str
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool | str
    adapter_residual_before_ln: bool
    ln_before: bool
    ln_after: bool

    @classmethod
    def of(cls, bn: Bottleneck) -> "Config":
        return cls(bn.activation, bn.original_ln_before, bn.original_ln_after, bn.residual_before_ln,
                   bn.adapter_residual_before_ln, bn.ln_before is not None, bn.ln_after is not None)


class Configs:
    """Config <-> BatchPlan group id (GROUP_BOTTLENECK + k), stable for the engine's lifetime."""

    def __init__(self):
        self._ids: dict[Config, int] = {}
        self.by_group: dict[int, Config] = {}

    def group(self, bn: Bottleneck) -> int:
        config = Config.of(bn)
        if config not in self._ids:
            self._ids[config] = GROUP_BOTTLENECK + len(self._ids)
            self.by_group[self._ids[config]] = config
        return self._ids[config]


def attach_bottleneck(module: nn.Module, slots: BottleneckSlots, state, configs: Configs) -> None:
    """Shadow the sub-layer's forward(hidden_states, input_tensor) with the per-row bottleneck version."""
    base_forward = module.forward

    def forward(hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        plan: BatchPlan | None = state.plan
        ranges = [] if plan is None else [(g, r) for g, r in plan.ranges.items() if g in configs.by_group]
        if not ranges:
            return base_forward(hidden_states, input_tensor)
        h = module.dropout(module.dense(hidden_states))  # [B, T, H]
        out = module.LayerNorm(h + input_tensor)
        for group, (row0, row1) in ranges:
            present = [slots.specs[s] is not None for s in plan.row_slots[row0:row1]]
            if not any(present):
                continue  # this configuration's adapters leave this layer out
            y = _rows(h[row0:row1], input_tensor[row0:row1], out[row0:row1], module.LayerNorm, slots,
                      configs.by_group[group], plan, row0, row1)
            if not all(present):
                keep = torch.tensor(present, device=y.device).view(-1, 1, 1)
                y = torch.where(keep, y, out[row0:row1])
            out[row0:row1] = y
        return out

    module.forward = forward


def _rows(h, r, base, layer_norm, slots: BottleneckSlots, cfg: Config, plan: BatchPlan, row0: int, row1: int):
    """The Bottleneck arithmetic for sorted rows [row0, row1) sharing one Config. h, r, base: [n, T, H]."""
    idx = plan.token_slots[row0:row1]  # [n]
    a = base if cfg.original_ln_before else h
    if cfg.residual_before_ln == "post_add":
        residual = h + r
    else:
        residual = h if cfg.residual_before_ln else a
    z = a
    ln = slots.ln.index_select(0, idx) if (cfg.ln_before or cfg.ln_after) else None  # [n, 4, H]
    if cfg.ln_before:
        z = _affine_norm(a, ln[:, 0], ln[:, 1])
    u = _segment_matmul(z, slots.down, plan, row0, row1, "bn_down")  # [n, T, M]
    u = activation(cfg.activation)(u + slots.down_b.index_select(0, idx).unsqueeze(1))
    y = _segment_matmul(u, slots.up, plan, row0, row1, "bn_up")  # [n, T, H]
    y = (y + slots.up_b.index_select(0, idx).unsqueeze(1)) * slots.scaling.index_select(0, idx).unsqueeze(1)
    if cfg.adapter_residual_before_ln:
        y = y + residual
    if cfg.ln_after:
        y = _affine_norm(y, ln[:, 2], ln[:, 3])
    if not cfg.adapter_residual_before_ln:
        y = y + residual
    return layer_norm(y + r) if cfg.original_ln_after else y


def _affine_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis with per-row affine parameters. x: [n, T, H], weight/bias: [n, H]."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * weight.unsqueeze(1) + bias.unsqueeze(1)


def _segment_matmul(x: torch.Tensor, W: torch.Tensor, plan: BatchPlan, row0: int, row1: int, role: str):
    """out[row] = x[row] @ W[slot of row].T for sorted rows [row0, row1); one matmul per bucket.

    x: [n, T, K], W: [S, N, K] -> [n, T, N].
    """
    n, T, K = x.shape
    out = x.new_empty(n, T, W.shape[1])
    for bucket in plan.buckets_in(row0, row1):
        a, b = bucket.row0 - row0, bucket.row1 - row0
        L = bucket.rows_per_seg * T
        lhs = x[a:b].reshape(bucket.n_seg, L, K)
        _matmul_slots(lhs, W, bucket, plan.workspace, role, out=out[a:b].view(bucket.n_seg, L, W.shape[1]))
    return out
