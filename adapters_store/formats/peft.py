"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

Supported here: LORA (incl. rsLoRA, DoRA, rank/alpha patterns, GPT-2 Conv1D with
fan_in_fan_out) and ADALORA (folded into plain LoRA: A' = A * E, scale = alpha / (init_r + 1e-5)),
with SEQ_CLS / TOKEN_CLS heads saved through `modules_to_save`. IA3, PROMPT_TUNING, P_TUNING and
PREFIX_TUNING live in peft_kinds.py and reuse the head and label helpers here.
Semantics follow PEFT: y = W x + b + scale * B (A x); DoRA rescales per output row.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..base import BaseSchema
from ..errors import AdapterError
from ..files import FLOAT32_MAX, FileLimits, read_json, read_safetensors
from ..spec import AdapterSpec, HeadSpec, LoraDelta

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
BASE_COPY_SUFFIX = ".base_layer.weight"
HEAD_MODULES = ("classifier", "score")
LORA_SUFFIXES = {
    "lora_A.weight": "A", "lora_A": "A",
    "lora_B.weight": "B", "lora_B": "B",
    "lora_E": "E",
    "lora_magnitude_vector": "m", "lora_magnitude_vector.weight": "m",
}
PART_NAMES = {"A": "lora_A", "B": "lora_B", "E": "lora_E", "m": "lora_magnitude_vector"}
TASK_HEADS = {"SEQ_CLS": "seq_cls", "TOKEN_CLS": "token_cls"}
NO_HEAD_TASKS = (None, "FEATURE_EXTRACTION", "CAUSAL_LM")
SUPPORTED_TYPES = ("LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def load_peft(folder: Path, name: str, schema: BaseSchema, *, max_rank: int,
              labels: list[str] | None, limits: FileLimits, max_virtual_tokens: int = 128) -> AdapterSpec:
    cfg_path = folder / CONFIG_FILE
    cfg = read_json(cfg_path, limits)
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterError(f"{cfg_path}: PEFT type {peft_type!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_TYPES)})")
    task_type = cfg.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        raise AdapterError(f"{cfg_path}: 'task_type' must be a string, got {task_type!r:.80}")
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise AdapterError(f"{cfg_path}: 'modules_to_save' must be a list of module names, got {saved!r:.80}")
    if peft_type not in ("LORA", "ADALORA"):
        from .peft_kinds import load_peft_kind  # imported here: peft_kinds imports this module's helpers

        return load_peft_kind(folder, name, schema, cfg, labels=labels, limits=limits,
                              max_virtual_tokens=max_virtual_tokens)
    _refuse_unsupported_options(cfg_path, cfg)
    weights_path = folder / WEIGHTS_FILE
    tensors = read_safetensors(weights_path, limits)

    groups, head_tensors, copies = _group_tensors(weights_path, tensors)
    is_adalora = peft_type == "ADALORA"
    lora, adapted_by = {}, {}
    for module_path, parts in sorted(groups.items()):
        delta = _lora_delta(weights_path, cfg, module_path, parts, schema, max_rank, is_adalora)
        target = schema.resolve_module(module_path)
        if target in adapted_by:
            raise AdapterError(f"{weights_path}: modules '{adapted_by[target]}' and '{module_path}' both adapt "
                               f"base module '{target}'")
        adapted_by[target] = module_path
        if delta is not None:
            lora[target] = delta
    head = _head(weights_path, folder, cfg, head_tensors, schema, labels, limits)
    if not lora and head is None:
        raise AdapterError(f"{weights_path}: no LoRA weights and no head: the adapter would change nothing")
    kind = "adalora" if is_adalora else "dora" if cfg.get("use_dora") else "rslora" if cfg.get("use_rslora") else "lora"
    base_copies = _base_copies(weights_path, copies, schema, adapted_by)
    return AdapterSpec(name=name, format="peft", kind=kind, lora=lora, head=head, source=str(folder),
                       base_copies=base_copies)


def _base_copies(weights_path: Path, copies: dict, schema: BaseSchema, adapted_by: dict) -> dict[str, torch.Tensor]:
    """Saved copies of adapted layers' base weights, checked for shape here and for equality by the engine."""
    out = {}
    for module_path, tensor in copies.items():
        target = schema.resolve_module(module_path)
        if target is None or target not in adapted_by:
            raise AdapterError(f"{weights_path}: tensor '{module_path}{BASE_COPY_SUFFIX}' is a base-layer weight of "
                               "a module the adapter does not adapt")
        shape = schema.linears[target]
        want = [shape.d_in, shape.d_out] if shape.conv1d else [shape.d_out, shape.d_in]
        if list(tensor.shape) != want:
            raise AdapterError(f"{weights_path}: '{module_path}{BASE_COPY_SUFFIX}' is {list(tensor.shape)}, the base "
                               f"layer is {want} (a resized vocabulary is not supported: one frozen base serves all)")
        out[target] = tensor
    return out


def _refuse_unsupported_options(cfg_path: Path, cfg: dict) -> None:
    for key in ("r", "lora_alpha"):
        if key in cfg and not _is_number(cfg[key]):
            raise AdapterError(f"{cfg_path}: '{key}' must be a number, got {cfg[key]!r}")
    r = cfg.get("init_r") if cfg.get("peft_type") == "ADALORA" else cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{cfg_path}: rank 'r' must be a positive integer, got {r!r}")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none'): "
                           "trained base biases would have to replace the frozen base's")
    if cfg.get("lora_bias"):
        raise AdapterError(f"{cfg_path}: lora_bias=true is not supported")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise AdapterError(f"{cfg_path}: '{key}' must be true or false, got {cfg[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        if not isinstance(value, dict):
            raise AdapterError(f"{cfg_path}: '{key}' must be an object, got {type(value).__name__}")
        if cfg.get("peft_type") == "LORA" or key == "alpha_pattern":
            for pat, val in value.items():
                if not _is_number(val):
                    raise AdapterError(f"{cfg_path}: {key}[{pat!r}] must be a number, got {val!r}")
                try:
                    re.compile(pat)
                except re.error as exc:
                    raise AdapterError(f"{cfg_path}: {key} key {pat!r} is not a valid pattern: {exc}") from exc
    for key in ("trainable_token_indices", "layer_replication", "target_parameters"):
        if cfg.get(key):
            raise AdapterError(f"{cfg_path}: '{key}' is not supported")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group_tensors(weights_path: Path, tensors: dict):
    """LoRA tensors by module path and part (A, B, E, m); head tensors by path ("classifier.weight");
    copies of base weights by module path (PEFT saves `lm_head.base_layer.weight` with an adapted lm_head)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    head_tensors: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"{weights_path}: tensor '{key}' does not start with '{KEY_PREFIX}' (not a PEFT adapter key)")
        path = key[len(KEY_PREFIX):]
        if _is_head(path):
            head_tensors[path] = tensor
            continue
        if path.endswith(BASE_COPY_SUFFIX):
            base_copies[path[: -len(BASE_COPY_SUFFIX)]] = tensor
            continue
        module, part = _split_lora_key(weights_path, key, path)
        group = groups.setdefault(module, {})
        if part in group:  # e.g. both `lora_A` and `lora_A.weight`: one would silently win
            raise AdapterError(f"{weights_path}: module '{module}' has {PART_NAMES[part]} twice (tensor '{key}')")
        group[part] = tensor
    return groups, head_tensors, base_copies


def _is_head(path: str) -> bool:
    return any(path.startswith(module + ".") for module in HEAD_MODULES)


def _split_lora_key(weights_path: Path, key: str, path: str) -> tuple[str, str]:
    for suffix, part in LORA_SUFFIXES.items():
        if path.endswith("." + suffix):
            return path[: -len(suffix) - 1], part
    if ".lora_embedding_" in path:
        raise AdapterError(f"{weights_path}: tensor '{key}': LoRA on embedding layers is not supported")
    raise AdapterError(f"{weights_path}: tensor '{key}' is not a LoRA weight (lora_A/lora_B/lora_E/lora_magnitude_vector) "
                       "nor a classifier head")


def _pattern_value(pattern: dict, module_path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _lora_delta(weights_path: Path, cfg: dict, module_path: str, parts: dict, schema: BaseSchema,
                max_rank: int, is_adalora: bool) -> LoraDelta | None:
    where = f"{weights_path}: module '{module_path}'"
    target = schema.resolve_module(module_path)
    if target is None:
        raise AdapterError(f"{where}: no such linear module in the base model ({schema.model_type}, "
                           f"{schema.num_layers} layers)")
    for needed in ("A", "B") + (("E",) if is_adalora else ()):
        if needed not in parts:
            raise AdapterError(f"{where}: missing lora_{needed}")
    if not is_adalora and "E" in parts:
        raise AdapterError(f"{where}: lora_E found in a plain LoRA adapter")
    if "m" in parts and not cfg.get("use_dora"):
        raise AdapterError(f"{where}: lora_magnitude_vector found but use_dora is false")
    if cfg.get("use_dora") and "m" not in parts:
        raise AdapterError(f"{where}: use_dora is true but lora_magnitude_vector is missing")
    A, B = parts["A"], parts["B"]
    shape = schema.linears[target]
    if A.dim() != 2 or B.dim() != 2:
        raise AdapterError(f"{where}: lora_A {list(A.shape)} and lora_B {list(B.shape)} must be matrices")
    rank = A.shape[0]
    if A.shape[1] != shape.d_in or B.shape[0] != shape.d_out or B.shape[1] != rank:
        raise AdapterError(f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit the base layer "
                           f"(in {shape.d_in}, out {shape.d_out}): expected [r, {shape.d_in}] and [{shape.d_out}, r]")
    if is_adalora:
        E = parts["E"]
        if list(E.shape) != [rank, 1]:
            raise AdapterError(f"{where}: lora_E {list(E.shape)} does not fit rank {rank} (expected [{rank}, 1])")
        if rank == 0:
            return None  # pruned to nothing by AdaLoRA's rank allocator
        init_r = cfg["init_r"]
        if rank > init_r:
            raise AdapterError(f"{where}: rank {rank} exceeds init_r {init_r}")
        alpha = cfg.get("lora_alpha", init_r)
        alpha = alpha if alpha > 0 else float(rank)
        A, scale = A * E, alpha / (init_r + 1e-5)
    else:
        r = _pattern_value(cfg.get("rank_pattern") or {}, module_path, cfg["r"])
        if rank != r:
            raise AdapterError(f"{where}: lora_A has rank {rank} but the config says r={r}")
        if rank == 0:
            raise AdapterError(f"{where}: rank 0")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module_path, cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if rank > max_rank:
        raise AdapterError(f"{where}: rank {rank} exceeds max_rank {max_rank}")
    if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:
        raise AdapterError(f"{where}: its scale (lora_alpha / r) {scale:.3g} does not fit a float32")
    magnitude = parts.get("m")
    if magnitude is not None and list(magnitude.shape) != [shape.d_out]:
        raise AdapterError(f"{where}: lora_magnitude_vector {list(magnitude.shape)} does not fit out features {shape.d_out}")
    return LoraDelta(A=A.contiguous(), B=B.contiguous(), scale=float(scale), magnitude=magnitude)


def _head(weights_path: Path, folder: Path, cfg: dict, tensors: dict, schema: BaseSchema,
          labels: list[str] | None, limits: FileLimits) -> HeadSpec | None:
    task_type = cfg.get("task_type")
    if task_type in NO_HEAD_TASKS:
        if tensors:
            raise AdapterError(f"{weights_path}: head weights found but task_type is {task_type!r}")
        return None
    tensors = _head_parts(weights_path, tensors)
    if task_type not in TASK_HEADS:
        raise AdapterError(f"{weights_path.parent / CONFIG_FILE}: task_type {task_type!r} is not supported "
                           f"(supported: {', '.join(TASK_HEADS)}, FEATURE_EXTRACTION, CAUSAL_LM)")
    if schema.is_causal:
        raise AdapterError(f"{weights_path}: {task_type} heads on causal LM bases are not supported yet")
    if set(tensors) != {"weight", "bias"}:
        raise AdapterError(f"{weights_path}: a {task_type} adapter needs exactly classifier.weight and classifier.bias "
                           f"(a single linear head), found {sorted(tensors) or 'none'}")
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.dim() != 2 or weight.shape[1] != schema.hidden_size or weight.shape[0] == 0:
        raise AdapterError(f"{weights_path}: classifier.weight {list(weight.shape)} does not fit hidden size "
                           f"{schema.hidden_size} (expected [num_labels, {schema.hidden_size}])")
    if list(bias.shape) != [weight.shape[0]]:
        raise AdapterError(f"{weights_path}: classifier.bias {list(bias.shape)} does not match "
                           f"{weight.shape[0]} labels in classifier.weight")
    task = TASK_HEADS[task_type]
    names, problem = _labels(folder, weight.shape[0], labels, limits)
    if task == "seq_cls" and problem == "multi_label_classification":
        task = "multilabel"
    pooled = task != "token_cls"
    if pooled and not schema.has_pooler:
        raise AdapterError(f"{weights_path}: SEQ_CLS on a base without a pooler is not supported")
    return HeadSpec(task=task, weight=weight.contiguous(), bias=bias.contiguous(), labels=names, pooled=pooled)


def _head_parts(weights_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head tensors by part ("weight", "bias"), all under one head module (classifier or score)."""
    modules = sorted({path.split(".", 1)[0] for path in tensors})
    if len(modules) > 1:
        raise AdapterError(f"{weights_path}: head weights under both {modules[0]!r} and {modules[1]!r}: "
                           "a PEFT adapter has one head module")
    return {path.split(".", 1)[1]: tensor for path, tensor in tensors.items()}


def _labels(folder: Path, num_labels: int, given: list[str] | None, limits: FileLimits) -> tuple[tuple[str, ...], str | None]:
    """Labels from the caller, else from a config.json beside the adapter, else LABEL_i; and its problem_type."""
    default = tuple(f"LABEL_{i}" for i in range(num_labels))
    if given is not None:
        return _given_labels(folder, num_labels, given), None
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return default, None
    cfg = read_json(cfg_path, limits)
    declared = cfg.get("num_labels")
    if declared is not None and declared != num_labels:
        raise AdapterError(f"{cfg_path}: num_labels={declared!r} but the classifier has {num_labels} outputs")
    id2label = cfg.get("id2label")
    names = default if id2label is None else _id2label(cfg_path, id2label, num_labels)
    return names, cfg.get("problem_type")


def _given_labels(folder: Path, num_labels: int, given) -> tuple[str, ...]:
    if not isinstance(given, (list, tuple)) or not all(isinstance(x, str) for x in given):
        raise AdapterError(f"{folder}: labels must be a list of strings, got {given!r:.80}")
    if len(given) != num_labels:
        raise AdapterError(f"{folder}: {len(given)} labels given for a head with {num_labels} outputs")
    return tuple(given)


def _id2label(cfg_path: Path, id2label, num_labels: int) -> tuple[str, ...]:
    if not isinstance(id2label, dict):
        raise AdapterError(f"{cfg_path}: id2label must be an object, got {type(id2label).__name__}")
    if len(id2label) != num_labels:
        raise AdapterError(f"{cfg_path}: id2label has {len(id2label)} entries but the classifier has {num_labels} outputs")
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: id2label keys must be integers: {exc}") from exc
    if sorted(by_index) != list(range(num_labels)):
        raise AdapterError(f"{cfg_path}: id2label keys must be 0..{num_labels - 1}")
    return tuple(by_index[i] for i in range(num_labels))
