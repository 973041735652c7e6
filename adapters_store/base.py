"""BaseSchema: what an adapter is checked against — the base model's adaptable modules and sizes.

Built from a loaded model, or from a model folder's config alone (weights never read:
the model is built on the meta device with accelerate's `init_empty_weights`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from torch import nn

from .errors import AdapterError


@dataclass(frozen=True)
class LinearShape:
    d_in: int
    d_out: int
    conv1d: bool  # GPT-2 style Conv1D: weight stored [d_in, d_out]


@dataclass(frozen=True)
class BaseSchema:
    model_type: str
    is_causal: bool
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    base_model_prefix: str  # "bert", "model", "transformer": how PEFT names the backbone
    has_pooler: bool
    linears: Mapping[str, LinearShape]  # module name in the served model -> shape
    num_attention_heads: int = 0
    num_key_value_heads: int = 0  # = num_attention_heads without grouped-query attention
    head_dim: int = 0
    # residual sub-layers where bottleneck adapters attach (BERT-style: dense -> dropout -> LayerNorm(h + input)):
    # module name -> (layer index, AdapterHub location: "mh_adapter" after attention, "output_adapter" after the FFN)
    sublayers: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def resolve_module(self, name: str) -> str | None:
        """Map a module path as an adapter file names it to the served model's name."""
        if name in self.linears:
            return name
        prefix = self.base_model_prefix + "."
        if name.startswith(prefix) and name[len(prefix):] in self.linears:
            return name[len(prefix):]
        if prefix + name in self.linears:
            return prefix + name
        return None

    def resolve_sublayer(self, name: str) -> str | None:
        """Like resolve_module, for the residual sub-layers in `sublayers`."""
        prefix = self.base_model_prefix + "."
        for candidate in (name, name[len(prefix):] if name.startswith(prefix) else None, prefix + name):
            if candidate in self.sublayers:
                return candidate
        return None

    @classmethod
    def from_model(cls, model: nn.Module, is_causal: bool) -> "BaseSchema":
        config = model.config
        linears = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                linears[name] = LinearShape(module.in_features, module.out_features, False)
            elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D
                d_in, d_out = module.weight.shape
                linears[name] = LinearShape(d_in, d_out, True)
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 0
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
        return cls(
            model_type=config.model_type,
            is_causal=is_causal,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            max_positions=int(max_pos or 512),
            base_model_prefix=getattr(model, "base_model_prefix", "") or "",
            has_pooler=getattr(model, "pooler", None) is not None,
            linears=linears,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            sublayers=_sublayers(model),
        )

    @classmethod
    def from_config_dir(cls, base_dir: str | Path) -> "BaseSchema":
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise AdapterError(f"base model {base_dir}: cannot read its config: {exc}") from exc
        causal = is_causal_config(config)
        with init_empty_weights():
            model = build_model(config, causal)
        return cls.from_model(model, causal)


def _sublayers(model: nn.Module) -> dict[str, tuple[int, str]]:
    """BERT-style residual sub-layers: `*SelfOutput` (after attention) and `*Output` (after the FFN) modules
    with dense, dropout and LayerNorm, inside a numbered layer."""
    out = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not cls.endswith("Output") or not all(hasattr(module, a) for a in ("dense", "dropout", "LayerNorm")):
            continue
        parts = name.split(".")
        index = next((int(p) for p in reversed(parts) if p.isdigit()), None)
        if index is None:
            continue
        out[name] = (index, "mh_adapter" if cls.endswith("SelfOutput") else "output_adapter")
    return out


def is_causal_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def build_model(config, causal: bool) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    if causal:
        return AutoModelForCausalLM.from_config(config)
    return AutoModel.from_config(config)
