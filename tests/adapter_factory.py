"""Random, non-trivial PEFT LoRA adapter folders written by tests (no peft import needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters_store import BaseSchema


def make_lora(folder: Path, schema: BaseSchema, *, seed: int, r: int = 8, alpha: float = 16,
              targets: tuple[str, ...] = ("query", "value"), head: str | None = None, num_labels: int = 3,
              dora: bool = False, rslora: bool = False, layers: list[int] | None = None) -> Path:
    """A PEFT LoRA folder on `schema`'s encoder (or causal) modules, every weight random and non-zero.

    head: None | "SEQ_CLS" | "TOKEN_CLS".
    """
    g = torch.Generator().manual_seed(seed)
    prefix = f"base_model.model.{schema.base_model_prefix}." if head else "base_model.model."
    tensors = {}
    for name, shape in schema.linears.items():
        leaf_ok = any(name == t or name.endswith("." + t) for t in targets)
        in_layers = layers is None or any(f".{i}." in name for i in layers)
        if not (leaf_ok and in_layers) or "pooler" in name or name == "lm_head":
            continue
        key = prefix + name
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, shape.d_in, generator=g) / math.sqrt(shape.d_in)
        tensors[f"{key}.lora_B.weight"] = torch.randn(shape.d_out, r, generator=g) * 0.05
        if dora:
            tensors[f"{key}.lora_magnitude_vector"] = 1 + 0.1 * torch.randn(shape.d_out, generator=g)
    if head:
        tensors["base_model.model.classifier.weight"] = torch.randn(num_labels, schema.hidden_size, generator=g) * 0.5
        tensors["base_model.model.classifier.bias"] = torch.randn(num_labels, generator=g) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
        "use_dora": dora, "use_rslora": rslora, "fan_in_fan_out": False, "bias": "none",
        "task_type": head or "FEATURE_EXTRACTION", "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": ["classifier"] if head else None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
