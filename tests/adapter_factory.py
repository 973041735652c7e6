"""Random, non-trivial adapter folders of every kind (PEFT LoRA, IA3, prompt, prefix; AdapterHub bottleneck),
written by tests and benchmarks without the libraries that made the formats."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def make_overflowing_lora(folder: Path, schema: BaseSchema, *, seed: int = 9) -> Path:
    """A SEQ_CLS LoRA folder that passes validation (every weight finite) but whose one weight of 1e30, in the last
    layer's value lora_B, turns the hidden states into NaN in the forward."""
    make_lora(folder, schema, seed=seed, head="SEQ_CLS", num_labels=2)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in weights if "layer.5.attention.self.value.lora_B" in k)
    weights[key][0, 0] = 1e30
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def _head_tensors(schema: BaseSchema, g: torch.Generator, prefix: str, head: str | None, num_labels: int) -> dict:
    if not head:
        return {}
    return {f"{prefix}classifier.weight": torch.randn(num_labels, schema.hidden_size, generator=g) * 0.5,
            f"{prefix}classifier.bias": torch.randn(num_labels, generator=g) * 0.1}


def _write_peft(folder: Path, tensors: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def make_ia3(folder: Path, schema: BaseSchema, *, seed: int, targets: tuple[str, ...] = ("key", "value", "output.dense"),
             feedforward: tuple[str, ...] = ("output.dense",), head: str | None = None, num_labels: int = 3) -> Path:
    """A PEFT IA3 folder: output scaling on targets, input scaling on feedforward modules, vectors in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in schema.linears.items():
        if "pooler" in name or name == "lm_head" or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        on_input = any(name == t or name.endswith("." + t) for t in feedforward)
        size = (1, shape.d_in) if on_input else (shape.d_out, 1)
        tensors[f"base_model.model.{name}.ia3_l"] = 0.5 + torch.rand(*size, generator=g)
    tensors.update(_head_tensors(schema, g, "base_model.model.", head, num_labels))
    return _write_peft(folder, tensors, {
        "peft_type": "IA3", "target_modules": list(targets), "feedforward_modules": list(feedforward),
        "fan_in_fan_out": False, "task_type": head or "FEATURE_EXTRACTION",
        "modules_to_save": ["classifier"] if head else None, "init_ia3_weights": True})


def make_prompt(folder: Path, schema: BaseSchema, *, seed: int, n_virtual: int = 10, head: str | None = None,
                num_labels: int = 3, peft_type: str = "PROMPT_TUNING") -> Path:
    """A PEFT prompt-tuning (or P-tuning, as saved) folder: n_virtual random prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"prompt_embeddings": torch.randn(n_virtual, schema.hidden_size, generator=g) * 0.05}
    tensors.update(_head_tensors(schema, g, "base_model.", head, num_labels))
    return _write_peft(folder, tensors, {
        "peft_type": peft_type, "num_virtual_tokens": n_virtual, "token_dim": schema.hidden_size,
        "num_transformer_submodules": 1, "num_attention_heads": schema.num_attention_heads,
        "num_layers": schema.num_layers, "task_type": head or "FEATURE_EXTRACTION",
        "modules_to_save": ["classifier"] if head else None})


def make_prefix(folder: Path, schema: BaseSchema, *, seed: int, n_virtual: int = 10, head: str | None = None,
                num_labels: int = 3) -> Path:
    """A PEFT prefix-tuning folder: the projected prefix [n_virtual, layers * 2 * hidden], random."""
    g = torch.Generator().manual_seed(seed)
    width = schema.num_layers * 2 * schema.num_key_value_heads * schema.head_dim
    tensors = {"prompt_embeddings": torch.randn(n_virtual, width, generator=g)}
    tensors.update(_head_tensors(schema, g, "base_model.", head, num_labels))
    return _write_peft(folder, tensors, {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": n_virtual, "token_dim": schema.hidden_size,
        "num_transformer_submodules": 1, "num_attention_heads": schema.num_attention_heads,
        "num_layers": schema.num_layers, "prefix_projection": False, "encoder_hidden_size": schema.hidden_size,
        "task_type": head or "FEATURE_EXTRACTION", "modules_to_save": ["classifier"] if head else None})


BN_CONFIGS = {
    "seq_bn": {"mh_adapter": False, "output_adapter": True, "original_ln_before": True, "non_linearity": "relu"},
    "double_seq_bn": {"mh_adapter": True, "output_adapter": True, "original_ln_before": False,
                      "non_linearity": "swish"},
}


def make_bottleneck(folder: Path, schema: BaseSchema, *, seed: int, arch: str = "seq_bn", reduction_factor: int = 16,
                    head: str | None = None, num_labels: int = 3, head_layers: int = 2, name: str = "bn") -> Path:
    """An AdapterHub bottleneck folder (adapter_config.json + adapter.safetensors, optional head files).

    head: None | "classification" | "multilabel_classification" | "tagging".
    """
    g = torch.Generator().manual_seed(seed)
    H = schema.hidden_size
    m = H // reduction_factor
    cfg = {"adapter_residual_before_ln": False, "dropout": 0.0, "inv_adapter": None, "is_parallel": False,
           "leave_out": [], "ln_after": False, "ln_before": False, "original_ln_after": True,
           "phm_layer": False, "reduction_factor": reduction_factor, "residual_before_ln": True, "scaling": 1.0,
           "use_gating": False, "init_weights": "bert", **BN_CONFIGS[arch]}
    tensors = {}
    for sub, (layer, where) in schema.sublayers.items():
        if not cfg["mh_adapter" if where == "mh_adapter" else "output_adapter"]:
            continue
        key = f"{schema.base_model_prefix}.{sub}.adapters.{name}"
        tensors[f"{key}.adapter_down.0.weight"] = torch.randn(m, H, generator=g) / math.sqrt(H)
        tensors[f"{key}.adapter_down.0.bias"] = torch.randn(m, generator=g) * 0.1
        tensors[f"{key}.adapter_up.weight"] = torch.randn(H, m, generator=g) * 0.1
        tensors[f"{key}.adapter_up.bias"] = torch.randn(H, generator=g) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"hidden_size": H, "model_class": "BertAdapterModel", "model_type": schema.model_type, "name": name,
            "version": "adapters.1.3.0"}
    save_file(tensors, str(folder / "adapter.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"config": cfg, **meta}))
    if head:
        head_tensors, index = {}, 0
        for layer in range(head_layers):
            index += 1  # Dropout, then Linear
            out = num_labels if layer == head_layers - 1 else H
            head_tensors[f"heads.{name}.{index}.weight"] = torch.randn(out, H, generator=g) / math.sqrt(H)
            head_tensors[f"heads.{name}.{index}.bias"] = torch.randn(out, generator=g) * 0.1
            index += 2 if layer < head_layers - 1 else 1  # activation after hidden layers
        save_file(head_tensors, str(folder / "model_head.safetensors"))
        head_cfg = {"head_type": head, "num_labels": num_labels, "layers": head_layers,
                    "activation_function": "tanh", "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
        if head != "tagging":
            head_cfg.update(use_pooler=False, bias=True)
        (folder / "head_config.json").write_text(json.dumps({"config": head_cfg, **meta}))
    return folder
