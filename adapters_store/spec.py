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
class Ia3Vector:
    """IA3 on one linear module: y = W (x * v) + b when on_input (PEFT feedforward_modules), else y = (W x + b) * v."""

    scale: torch.Tensor  # [d_in] when on_input, else [d_out]
    on_input: bool


@dataclass(frozen=True)
class Bottleneck:
    """An AdapterHub bottleneck adapter at one residual sub-layer (BERT's attention.output or output).

    With h = dense(x) of the sub-layer, r its residual input and LN its own LayerNorm (adapters' Adapter class):
      residual = h if residual_before_ln is True; a (below) if False; h + r if "post_add"
      a = LN(h + r) if original_ln_before else h
      z = LN_before(a) if ln_before else a
      y = (act(z @ down.T + down_bias) @ up.T + up_bias) * scaling
      y = y + residual, LN_after(y) if ln_after  (residual added before LN_after when adapter_residual_before_ln,
                                                  after it otherwise)
      out = LN(y + r) if original_ln_after else y
    """

    down: torch.Tensor  # [m, hidden]
    down_bias: torch.Tensor  # [m]
    up: torch.Tensor  # [hidden, m]
    up_bias: torch.Tensor  # [hidden]
    activation: str  # lower-case name, as adapters' Activation_Function_Class takes it ("relu", "swish", ...)
    scaling: torch.Tensor  # [hidden] (a float scaling broadcast, or the learned "channel"/"learned" value)
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool | str  # True, False or "post_add"
    adapter_residual_before_ln: bool
    ln_before: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight [hidden], bias [hidden]), eps 1e-5
    ln_after: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class HeadSpec:
    """A task head on the base's hidden states.

    task: seq_cls (softmax over one row), multilabel (sigmoid), token_cls (per token).
    pooled: the head reads the base model's own pooler output (PEFT SEQ_CLS on BERT)
    instead of the raw hidden state at position 0.
    hidden_layers: AdapterHub heads with layers > 1 run Linear(hidden, hidden) + activation
    this many times before the final `weight`/`bias` layer.
    """

    task: str
    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor  # [num_labels] (zeros for a head saved without bias)
    labels: tuple[str, ...]
    pooled: bool = True
    hidden_layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # ([hidden, hidden], [hidden]) each
    activation: str | None = None  # between hidden layers ("tanh", ...); None = identity

    @property
    def num_labels(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    format: str  # "peft" | "adapterhub"
    kind: str  # lora | rslora | dora | adalora | ia3 | prompt_tuning | p_tuning | prefix_tuning | bottleneck | head
    lora: Mapping[str, LoraDelta] = field(default_factory=dict)  # base module name -> delta
    ia3: Mapping[str, Ia3Vector] = field(default_factory=dict)  # base module name -> scaling vector
    bottleneck: Mapping[str, Bottleneck] = field(default_factory=dict)  # sub-layer module name (schema.sublayers)
    prompt: torch.Tensor | None = None  # [n_virtual, hidden]: prompt / P-tuning embeddings prepended per row
    prefix: torch.Tensor | None = None  # [num_layers, 2, num_kv_heads, n_virtual, head_dim]: per-layer keys (0), values (1)
    head: HeadSpec | None = None
    source: str = ""
    # full copies of base weights a format saved beside the adapter (PEFT with an adapted lm_head):
    # they must equal the served base's, which the engine checks at load
    base_copies: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # what registration should tell the user about an adapter that loads but may not do what they expect
    # (labels missing, no head, a PEFT config without task_type): adapters_store/loader.py's registration_warnings
    warnings: tuple[str, ...] = ()

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.lora.values()), default=0)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions a row gains: prompt tokens before the input, or prefix keys/values in every layer."""
        if self.prompt is not None:
            return self.prompt.shape[0]
        if self.prefix is not None:
            return self.prefix.shape[3]
        return 0

    @property
    def has_body(self) -> bool:
        """False for a head-only adapter: its rows run the plain base body."""
        return bool(self.lora or self.ia3 or self.bottleneck) or self.prompt is not None or self.prefix is not None
