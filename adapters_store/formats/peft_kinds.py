"""PEFT's IA3 and prompt-learning kinds (PROMPT_TUNING, P_TUNING, PREFIX_TUNING), parsed and checked into AdapterSpec.

What PEFT saves in `adapter_model.safetensors` (peft 0.21: tuners/ia3/layer.py, tuners/tuners_utils.py
BasePromptEncoder._get_adapter_state_dict, peft_model.py get_prompt_embedding_to_save / get_prompt):
  IA3            `base_model.model.<module>.ia3_l`: [1, d_in] for modules matching `feedforward_modules` (input
                 scaled: y = W (x * v) + b), else [d_out, 1] (output scaled: y = (W x + b) * v). GPT-2 Conv1D saves
                 the same shapes; `fan_in_fan_out` only changes how PEFT merges.
  PROMPT_TUNING  `prompt_embeddings`: [num_virtual_tokens * num_transformer_submodules, token_dim]
  P_TUNING       the same, the prompt encoder (MLP/LSTM) already applied at save time
  PREFIX_TUNING  `prompt_embeddings`: [num_virtual_tokens, num_layers * 2 * token_dim], already projected when
                 prefix_projection (the MLP is not saved); token_dim = kv_heads * head_dim (PEFT sizes it by the
                 key/value heads on grouped-query models)
Heads (modules_to_save) are saved under `base_model.model.` for IA3 and under `base_model.` for prompt learning
(PEFT does not wrap the task model there): `base_model.classifier.weight`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..base import BaseSchema
from ..errors import AdapterError
from ..files import FileLimits, read_safetensors
from ..spec import AdapterSpec, Ia3Vector
from .peft import BASE_COPY_SUFFIX, CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, _base_copies, _head, _is_head

PROMPT_KINDS = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
PROMPT_KEY = "prompt_embeddings"
PROMPT_HEAD_PREFIX = "base_model."
IA3_SUFFIX = ".ia3_l"


def load_peft_kind(folder: Path, name: str, schema: BaseSchema, cfg: dict, *, labels: list[str] | None,
                   limits: FileLimits, max_virtual_tokens: int) -> AdapterSpec:
    if cfg["peft_type"] == "IA3":
        return _load_ia3(folder, name, schema, cfg, labels, limits)
    return _load_prompt_learning(folder, name, schema, cfg, labels, limits, max_virtual_tokens)


# ---- IA3 ----

def _load_ia3(folder: Path, name: str, schema: BaseSchema, cfg: dict, labels, limits: FileLimits) -> AdapterSpec:
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    _check_ia3_config(cfg_path, cfg)
    tensors = read_safetensors(weights_path, limits)
    vectors, head_tensors, copies = {}, {}, {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"{weights_path}: tensor '{key}' does not start with '{KEY_PREFIX}' (not a PEFT IA3 key)")
        path = key[len(KEY_PREFIX):]
        if _is_head(path):
            head_tensors[path] = tensor
        elif path.endswith(IA3_SUFFIX):
            vectors[path[: -len(IA3_SUFFIX)]] = tensor
        elif path.endswith(BASE_COPY_SUFFIX):  # PEFT saves lm_head's base weight when lm_head is a target
            copies[path[: -len(BASE_COPY_SUFFIX)]] = tensor
        else:
            raise AdapterError(f"{weights_path}: tensor '{key}' is not an IA3 vector (<module>.ia3_l) nor a classifier head")
    if not vectors:
        raise AdapterError(f"{weights_path}: no IA3 vectors (ia3_l): PEFT saves one for every targeted module")
    ia3, adapted_by = {}, {}
    for module_path, tensor in sorted(vectors.items()):
        target, vector = _ia3_vector(weights_path, cfg, module_path, tensor, schema)
        if target in adapted_by:
            raise AdapterError(f"{weights_path}: modules '{adapted_by[target]}' and '{module_path}' both adapt "
                               f"base module '{target}'")
        adapted_by[target] = module_path
        ia3[target] = vector
    head = _head(weights_path, folder, cfg, head_tensors, schema, labels, limits)
    return AdapterSpec(name=name, format="peft", kind="ia3", ia3=ia3, head=head, source=str(folder),
                       base_copies=_base_copies(weights_path, copies, schema, adapted_by))


def _check_ia3_config(cfg_path: Path, cfg: dict) -> None:
    for key in ("target_modules", "feedforward_modules"):
        if cfg.get(key) is None:
            raise AdapterError(f"{cfg_path}: '{key}' is missing: PEFT writes the modules it used (name them explicitly)")
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        _check_module_names(cfg_path, key, cfg.get(key))
    if not isinstance(cfg.get("fan_in_fan_out", False), bool):
        raise AdapterError(f"{cfg_path}: 'fan_in_fan_out' must be true or false, got {cfg['fan_in_fan_out']!r}")
    targets, feedforward = cfg["target_modules"], cfg["feedforward_modules"]
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        extra = sorted(set(feedforward) - set(targets))
        raise AdapterError(f"{cfg_path}: feedforward_modules {extra} are not in target_modules (PEFT requires a subset)")
    for key in ("layers_to_transform", "layers_pattern", "target_parameters"):
        if cfg.get(key):
            raise AdapterError(f"{cfg_path}: '{key}' is not an IA3 option")


def _check_module_names(cfg_path: Path, key: str, value) -> None:
    """A module-name option: None, a regex (full match) or a list of names (exact or dotted-suffix match)."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise AdapterError(f"{cfg_path}: '{key}' {value!r} is not a valid pattern: {exc}") from exc
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{cfg_path}: '{key}' must be a pattern or a list of module names, got {value!r:.80}")


def _matches(names, key: str, *, dotted: bool) -> bool:
    """PEFT's module matching: a string is a full-match regex; a list matches exactly or as a suffix
    (target/exclude_modules: `.name` suffix; feedforward_modules: plain `key.endswith(name)`)."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n if dotted else n) for n in names)


def _is_targeted(cfg: dict, key: str) -> bool:
    """Whether PEFT would have put an IA3 layer on `key` (check_target_module_exists)."""
    if _matches(cfg.get("exclude_modules"), key, dotted=True):
        return False
    for module in cfg.get("modules_to_save") or ():
        if isinstance(module, str) and re.match(rf"(^|.*\.){re.escape(module)}($|\..*)", key):
            return False
    targets = cfg["target_modules"]
    return targets == "all-linear" or _matches(targets, key, dotted=True)


def _ia3_vector(weights_path: Path, cfg: dict, module_path: str, tensor: torch.Tensor,
                schema: BaseSchema) -> tuple[str, Ia3Vector]:
    where = f"{weights_path}: module '{module_path}'"
    if tensor.dim() > 2:
        raise AdapterError(f"{where}: ia3_l {list(tensor.shape)} is a convolution-layer vector: IA3 on convolution "
                           "layers is not supported")
    target = schema.resolve_module(module_path)
    if target is None:
        raise AdapterError(f"{where}: no such linear module in the base model ({schema.model_type}, "
                           f"{schema.num_layers} layers); IA3 is supported on linear and Conv1D layers only")
    if not _is_targeted(cfg, module_path):
        raise AdapterError(f"{where}: not matched by target_modules {cfg['target_modules']!r} (or excluded): PEFT "
                           "would not load this vector")
    shape = schema.linears[target]
    on_input = _matches(cfg["feedforward_modules"], module_path, dotted=False)
    want = [1, shape.d_in] if on_input else [shape.d_out, 1]
    if list(tensor.shape) != want:
        role = ("in feedforward_modules: it scales its input, expected [1, d_in]" if on_input else
                "not in feedforward_modules: it scales its output, expected [d_out, 1]")
        raise AdapterError(f"{where}: ia3_l {list(tensor.shape)} does not fit: the module is {role} = {want} "
                           f"(base layer: in {shape.d_in}, out {shape.d_out})")
    return target, Ia3Vector(scale=tensor.reshape(-1).contiguous(), on_input=on_input)


# ---- prompt learning: PROMPT_TUNING, P_TUNING, PREFIX_TUNING ----

def _load_prompt_learning(folder: Path, name: str, schema: BaseSchema, cfg: dict, labels, limits: FileLimits,
                          max_virtual_tokens: int) -> AdapterSpec:
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    peft_type, task_type = cfg["peft_type"], cfg.get("task_type")
    if task_type == "SEQ_2_SEQ_LM":
        raise AdapterError(f"{cfg_path}: task_type 'SEQ_2_SEQ_LM': encoder-decoder models are not supported")
    if task_type is None:
        raise AdapterError(f"{cfg_path}: {peft_type} needs a task_type: without one PEFT's plain PeftModel never "
                           "applies the virtual tokens")
    n = _positive_int(cfg_path, cfg, "num_virtual_tokens")
    token_dim = _positive_int(cfg_path, cfg, "token_dim")
    submodules = cfg.get("num_transformer_submodules")
    if submodules is None:
        submodules = 1  # PEFT's default for everything but SEQ_2_SEQ_LM
    if submodules != 1:
        raise AdapterError(f"{cfg_path}: num_transformer_submodules={submodules!r}: only 1 is supported (2 means an "
                           "encoder-decoder model, which is not supported)")
    if n > max_virtual_tokens:
        raise AdapterError(f"{cfg_path}: num_virtual_tokens={n} exceeds max_virtual_tokens {max_virtual_tokens}")
    if n + 1 > schema.max_positions:
        raise AdapterError(f"{cfg_path}: num_virtual_tokens={n} leaves no position for an input token: the base has "
                           f"{schema.max_positions} positions")

    tensors = read_safetensors(weights_path, limits)
    head_tensors = {}
    for key, tensor in tensors.items():
        path = key[len(PROMPT_HEAD_PREFIX):] if key.startswith(PROMPT_HEAD_PREFIX) else None
        if key != PROMPT_KEY and (path is None or not _is_head(path)):
            raise AdapterError(f"{weights_path}: tensor '{key}' is neither '{PROMPT_KEY}' nor a classifier head "
                               f"('{PROMPT_HEAD_PREFIX}classifier.*' in a prompt-learning adapter)")
        if path is not None:
            head_tensors[path] = tensor
    if PROMPT_KEY not in tensors:
        raise AdapterError(f"{weights_path}: missing tensor '{PROMPT_KEY}'")
    raw = tensors[PROMPT_KEY]
    if raw.dim() != 2:
        raise AdapterError(f"{weights_path}: {PROMPT_KEY} {list(raw.shape)} must be a matrix")
    if raw.shape[0] != n:
        raise AdapterError(f"{weights_path}: {PROMPT_KEY} has {raw.shape[0]} rows but num_virtual_tokens={n} in "
                           f"{CONFIG_FILE}")

    prompt = prefix = None
    if peft_type == "PREFIX_TUNING":
        prefix = _prefix(cfg_path, weights_path, cfg, raw, n, token_dim, schema)
    else:
        if token_dim != schema.hidden_size:
            raise AdapterError(f"{cfg_path}: token_dim={token_dim} but the base's hidden size is {schema.hidden_size}")
        if raw.shape[1] != token_dim:
            raise AdapterError(f"{weights_path}: {PROMPT_KEY} {list(raw.shape)} does not fit token_dim={token_dim} "
                               f"(expected [{n}, {token_dim}])")
        prompt = raw.contiguous()
    head = _head(weights_path, folder, cfg, head_tensors, schema, labels, limits)
    return AdapterSpec(name=name, format="peft", kind=PROMPT_KINDS[peft_type], prompt=prompt, prefix=prefix,
                       head=head, source=str(folder))


def _prefix(cfg_path: Path, weights_path: Path, cfg: dict, raw: torch.Tensor, n: int, token_dim: int,
            schema: BaseSchema) -> torch.Tensor:
    """[n, L * 2 * token_dim] -> [L, 2, kv_heads, n, head_dim], as PEFT's get_prompt:
    view(n, 2L, H, D).permute(2L, H, n, D) then layer i takes slot 2i as keys and 2i + 1 as values."""
    layers = _positive_int(cfg_path, cfg, "num_layers")
    heads = _positive_int(cfg_path, cfg, "num_attention_heads")
    if layers != schema.num_layers:
        raise AdapterError(f"{cfg_path}: num_layers={layers} but the base has {schema.num_layers} layers")
    kv_heads, head_dim = schema.num_key_value_heads, schema.head_dim
    if kv_heads <= 0 or head_dim <= 0:
        raise AdapterError(f"{cfg_path}: the base ({schema.model_type}) does not say its attention heads: "
                           "prefix tuning cannot be checked against it")
    if heads != kv_heads:
        raise AdapterError(f"{cfg_path}: num_attention_heads={heads} but the base has {kv_heads} key/value heads "
                           "(PEFT sizes prefixes by key/value heads)")
    if token_dim != kv_heads * head_dim:
        raise AdapterError(f"{cfg_path}: token_dim={token_dim} does not fit {kv_heads} key/value heads of size "
                           f"{head_dim} (expected {kv_heads * head_dim})")
    width = layers * 2 * token_dim
    if raw.shape[1] != width:
        raise AdapterError(f"{weights_path}: {PROMPT_KEY} {list(raw.shape)} is not [num_virtual_tokens, num_layers * 2 "
                           f"* token_dim] = [{n}, {width}]")
    # raw: [n, 2L*H*D] -> [n, 2L, H, D] -> [2L, H, n, D] -> [L, 2, H, n, D]
    return raw.view(n, 2 * layers, heads, head_dim).permute(1, 2, 0, 3).reshape(layers, 2, heads, n, head_dim).contiguous()


def _positive_int(cfg_path: Path, cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"{cfg_path}: '{key}' must be a positive integer, got {value!r}")
    return value
