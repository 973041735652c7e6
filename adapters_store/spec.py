"""AdapterSpec: the one normalized in-memory form every adapter format converts into.

The engine knows only these dataclasses. Tensors are float32 on the CPU; the engine
casts and copies them into its slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

HEAD_TASKS = ("seq_cls", "token_cls", "multilabel")


@dataclass(frozen=True)
class LoraDelta:
    """One adapted linear module: y += scale * (x @ A.T) @ B.T, optionally DoRA-rescaled."""

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [d_out], DoRA only: y = m/||W + scale*B@A||_row * (...)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class HeadSpec:
    """A linear task head on the base's hidden states.

    task: seq_cls (softmax over one row), multilabel (sigmoid), token_cls (per token).
    pooled: the head reads the base model's own pooler output (PEFT SEQ_CLS on BERT)
    instead of the raw hidden state at position 0.
    """

    task: str
    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor  # [num_labels]
    labels: tuple[str, ...]
    pooled: bool = True

    @property
    def num_labels(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    format: str  # "peft" | "adapterhub"
    kind: str  # "lora" | "rslora" | "dora" | "adalora" | ...
    lora: Mapping[str, LoraDelta] = field(default_factory=dict)  # base module name -> delta
    head: HeadSpec | None = None
    source: str = ""
    # full copies of base weights a format saved beside the adapter (PEFT with an adapted lm_head):
    # they must equal the served base's, which the engine checks at load
    base_copies: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.lora.values()), default=0)
