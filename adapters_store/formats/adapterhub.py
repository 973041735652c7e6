"""AdapterHub (`adapters` library, v1.x) folders: `adapter_config.json` + `adapter.safetensors`, and optionally a
prediction head saved beside it (`head_config.json` + `model_head.safetensors`).

Supported, on BERT-style bases (`schema.sublayers`):
- bottleneck adapters (BnConfig: seq_bn/Pfeiffer, double_seq_bn/Houlsby and any other sequential BnConfig),
  placed after attention ("mh_adapter") and/or the FFN ("output_adapter"); see `spec.Bottleneck`;
- LoRA (LoRAConfig, composition "add": y += alpha/r * x A^T B^T) on q/k/v, intermediate.dense, output.dense;
- (IA)^3 (LoRAConfig composition "scale", r=1: y = (W x + b) * (lora_B * alpha)) as output-scaling `Ia3Vector`s;
- heads: classification, multilabel_classification, tagging (PredictionHead.build's Dropout/Linear/act layout).
A head saved alone (`save_head`: head files, no adapter_config.json) loads as a head-only adapter (kind "head").
Refused with a message: parallel/gated/PHM (Compacter)/invertible bottlenecks, DoRA, VeRA, gated LoRA, and the
architectures prefix_tuning, prompt_tuning, mtl_lora, reft and union. Semantics follow the library's
methods/modeling.py, methods/lora.py, heads/base.py and loading.py.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..base import BaseSchema
from ..errors import AdapterError
from ..files import FLOAT32_MAX, FileLimits, read_json, read_safetensors, refuse_pickles
from ..spec import AdapterSpec, Bottleneck, HeadSpec, Ia3Vector, LoraDelta

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"

# the parts of a module path that hold one adapter's weights (AdapterLoader.filter_func), then `.<name>.<param>`
MARKERS = ("adapters", "loras", "prefix_tunings", "prefix_gates", "refts", "prompt_tunings", "shared_parameters",
           "invertible_adapters", "adapter_fusion_layer")
KEY_RE = re.compile(rf"^(?P<module>.+?)\.(?P<marker>{'|'.join(MARKERS)})\.(?P<rest>.+)$")
LEGACY_KEYS = {  # AdapterLoader.legacy_weights_mapping: older files are renamed on load
    "attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
    "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
    "invertible_lang_adapters": "invertible_adapters",
}
ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # applied to configs saved without "version"
PARAMETRIC_ACTIVATIONS = ("prelu", "xielu")  # transformers activations with learned weights: a name cannot carry them

BN_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
BN_DEFAULTS = {  # BnConfig's defaults (adapters/configuration/adapter_config.py)
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0, "phm_layer": False,
    "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}
LORA_DEFAULTS = {  # LoRAConfig's defaults
    "selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "leave_out": [], "r": 8, "alpha": 8,
    "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add", "init_weights": "lora",
    "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None, "vera_b": None, "dtype": None,
}
# where LoRALinear wraps a BERT layer (models/bert/mixin_bert.py), relative to `encoder.layer.<i>`
ATTN_MODULES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value"}
FFN_MODULES = {"intermediate_lora": "intermediate.dense", "output_lora": "output.dense"}
REFUSED_ARCHITECTURES = {
    "prefix_tuning": "prefix tuning (the adapters library cannot save it as safetensors either)",
    "prompt_tuning": "prompt tuning", "mtl_lora": "multi-task LoRA (MTL-LoRA)", "reft": "ReFT interventions",
    "union": "a ConfigUnion of several methods (MAM, UniPELT, ...)",
}
HEAD_TASKS = {"classification": "seq_cls", "multilabel_classification": "multilabel", "tagging": "token_cls"}
HEAD_DEFAULTS = {  # the head classes' constructor defaults (heads/base.py)
    "classification": {"num_labels": 2, "layers": 2, "activation_function": "tanh", "use_pooler": False, "bias": True},
    "multilabel_classification": {"num_labels": 2, "layers": 2, "activation_function": "tanh", "use_pooler": False,
                                  "bias": True},
    "tagging": {"num_labels": 2, "layers": 1, "activation_function": "tanh"},
}
HEAD_COMMON_KEYS = ("head_type", "label2id", "id2label", "dropout_prob")


def load_adapterhub(folder: Path, name: str, schema: BaseSchema, *, max_rank: int,
                    labels: list[str] | None, limits: FileLimits) -> AdapterSpec:
    refuse_pickles(folder)
    cfg_path = folder / CONFIG_FILE
    kind, lora, ia3, bottleneck = "head", {}, {}, {}
    if cfg_path.is_file():
        cfg = read_json(cfg_path, limits)
        _check_base(cfg_path, cfg, schema)
        method = cfg.get("config")
        if not isinstance(method, dict):
            raise AdapterError(f"{cfg_path}: 'config' must be an object (the adapter's method config)")
        arch = method.get("architecture")
        if arch in REFUSED_ARCHITECTURES:
            raise AdapterError(f"{cfg_path}: AdapterHub architecture {arch!r} ({REFUSED_ARCHITECTURES[arch]}) is not "
                               "supported (supported: bottleneck adapters, lora, (IA)^3)")
        if arch not in (None, "bottleneck", "lora"):
            raise AdapterError(f"{cfg_path}: unknown AdapterHub architecture {arch!r}")
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            raise AdapterError(f"{weights_path}: missing (the adapters library writes it with "
                               "save_adapter(..., use_safetensors=True))")
        groups = _group_keys(weights_path, read_safetensors(weights_path, limits), _name(cfg_path, cfg))
        if arch == "lora":
            kind, lora, ia3 = _loras(cfg_path, weights_path, cfg, groups, schema, max_rank)
        else:
            kind, bottleneck = "bottleneck", _bottlenecks(cfg_path, weights_path, cfg, groups, schema)
    elif not (folder / HEAD_CONFIG_FILE).is_file() and not (folder / HEAD_WEIGHTS_FILE).is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} and no head files: not an AdapterHub adapter folder")
    head = _head(folder, schema, labels, limits)
    if not (lora or ia3 or bottleneck) and head is None:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: the config places no adapter modules and there is no head: "
                           "the adapter would change nothing")
    return AdapterSpec(name=name, format="adapterhub", kind=kind, lora=lora, ia3=ia3, bottleneck=bottleneck,
                       head=head, source=str(folder))


# shared checks ------------------------------------------------------------------------------------------------

def _check_base(cfg_path: Path, cfg: dict, schema: BaseSchema) -> None:
    model_type, hidden = cfg.get("model_type"), cfg.get("hidden_size")
    if model_type is not None and model_type != schema.model_type:
        raise AdapterError(f"{cfg_path}: made for model_type {model_type!r}, the base is {schema.model_type!r}")
    if hidden is not None and hidden != schema.hidden_size:
        raise AdapterError(f"{cfg_path}: made for hidden_size {hidden!r}, the base has {schema.hidden_size}")


def _name(cfg_path: Path, cfg: dict) -> str:
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise AdapterError(f"{cfg_path}: 'name' must be a non-empty string (the adapter name inside every tensor key), "
                           f"got {name!r}")
    return name


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bools(cfg_path: Path, opts: dict, keys) -> None:
    for key in keys:
        if not isinstance(opts[key], bool):
            raise AdapterError(f"{cfg_path}: '{key}' must be true or false, got {opts[key]!r}")


def _options(cfg_path: Path, method: dict, defaults: dict, kind: str, required=()) -> dict:
    """The method config with the library's defaults filled in; unknown keys are refused (never ignored)."""
    missing = [k for k in required if k not in method]
    if missing:
        raise AdapterError(f"{cfg_path}: {kind} config lacks required option(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(method) - set(defaults) - set(required) - {"architecture"})
    if unknown:
        raise AdapterError(f"{cfg_path}: unknown option(s) {', '.join(map(repr, unknown))} in 'config' (a {kind} "
                           "config of adapters v1.x has no such option; refused rather than ignored)")
    return {**defaults, **method}


def _leave_out(cfg_path: Path, value) -> set[int]:
    if value is None:
        return set()
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise AdapterError(f"{cfg_path}: 'leave_out' must be a list of layer indices, got {value!r}")
    return set(value)


def activation_name(path: Path, what: str, value, allow_none: bool) -> str | None:
    """A lower-case activation name as adapters' Activation_Function_Class takes it (transformers' get_activation
    plus "leakyrelu"), or None (identity) where allowed."""
    from transformers.activations import ACT2FN

    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise AdapterError(f"{path}: {what} must be an activation name, got {value!r}")
    act = value.lower()
    if act in PARAMETRIC_ACTIVATIONS:
        raise AdapterError(f"{path}: {what} {value!r} has learned parameters, which polyhead does not serve")
    if act != "leakyrelu" and act not in ACT2FN:
        raise AdapterError(f"{path}: unknown {what} {value!r} (known: leakyrelu, "
                           f"{', '.join(sorted(a for a in ACT2FN if a not in PARAMETRIC_ACTIVATIONS))})")
    return act


def _group_keys(weights_path: Path, tensors: dict, adapter_name: str) -> dict[str, dict[str, dict]]:
    """Tensors by marker ("adapters", "loras", ...), module path and parameter, the adapter name stripped.
    Every key must carry the adapter's own name: a key of another adapter would be skipped by the library,
    leaving this one half loaded."""
    groups: dict[str, dict[str, dict]] = {}
    for key, tensor in tensors.items():
        new_key = key
        for old, new in LEGACY_KEYS.items():
            new_key = new_key.replace(old, new)
        m = KEY_RE.match(new_key)
        if m is None:
            raise AdapterError(f"{weights_path}: tensor '{key}' is not an adapter weight "
                               f"(no '.adapters.{adapter_name}.' or '.loras.{adapter_name}.' in its name)")
        rest = m["rest"]
        if not rest.startswith(adapter_name + "."):
            raise AdapterError(f"{weights_path}: tensor '{key}' belongs to adapter '{rest.split('.')[0]}', but "
                               f"{CONFIG_FILE} names the adapter '{adapter_name}' (every key must use that one name)")
        params = groups.setdefault(m["marker"], {}).setdefault(m["module"], {})
        param = rest[len(adapter_name) + 1:]
        if param in params:
            raise AdapterError(f"{weights_path}: '{m['module']}' has '{param}' twice (tensor '{key}')")
        params[param] = tensor
    return groups


def _only_marker(weights_path: Path, groups: dict, marker: str, method: str) -> dict[str, dict]:
    for other in groups:
        if other != marker:
            module, params = next(iter(groups[other].items()))
            raise AdapterError(f"{weights_path}: '{module}' has '{other}' weights ({', '.join(sorted(params))}), "
                               f"which a {method} adapter does not have")
    return groups.get(marker, {})


def _shape(path: Path, what: str, tensor: torch.Tensor, want: list[int], why: str = "") -> None:
    if list(tensor.shape) != want:
        raise AdapterError(f"{path}: {what} is {list(tensor.shape)}, expected {want}{why}")


# bottleneck adapters ------------------------------------------------------------------------------------------

def _bottlenecks(cfg_path: Path, weights_path: Path, cfg: dict, groups: dict, schema: BaseSchema):
    opts = _bn_options(cfg_path, cfg, schema)
    inv_keys = groups.pop("invertible_adapters", None)
    if opts["inv_adapter"] is not None:
        if inv_keys is not None or cfg.get("type") != "text_task":
            raise AdapterError(f"{cfg_path}: invertible adapters (inv_adapter={opts['inv_adapter']!r}) "
                               "are not supported")
        # loading.py _fix_legacy_config: old task adapters name an inv_adapter they never trained; it is dropped
    elif inv_keys is not None:
        groups["invertible_adapters"] = inv_keys  # refused below as weights the config does not describe
    found = _only_marker(weights_path, groups, "adapters", "bottleneck")
    leave_out = opts["leave_out"]
    expected = {sub for sub, (layer, loc) in schema.sublayers.items() if opts[loc] and layer not in leave_out}
    by_target = {}
    for module, params in sorted(found.items()):
        target = schema.resolve_sublayer(module)
        if target is None:
            raise AdapterError(f"{weights_path}: '{module}' is not a residual sub-layer of the base "
                               f"({schema.model_type}, {schema.num_layers} layers)")
        layer, loc = schema.sublayers[target]
        if target not in expected:
            why = f"layer {layer} is in leave_out" if opts[loc] else f"{loc} is false"
            raise AdapterError(f"{weights_path}: '{module}' has adapter weights but the config places no adapter "
                               f"there ({why})")
        if target in by_target:
            raise AdapterError(f"{weights_path}: '{by_target[target][0]}' and '{module}' both adapt "
                               f"sub-layer '{target}'")
        by_target[target] = (module, params)
    for target in sorted(expected - set(by_target)):
        layer, loc = schema.sublayers[target]
        raise AdapterError(f"{weights_path}: no adapter weights for sub-layer '{target}' (the config places an "
                           f"adapter there: {loc}=true, layer {layer} not in leave_out)")
    return {target: _bottleneck(weights_path, cfg_path, opts, module, params, schema)
            for target, (module, params) in sorted(by_target.items())}


def _bn_options(cfg_path: Path, cfg: dict, schema: BaseSchema) -> dict:
    method = dict(cfg["config"])
    if "invertible_adapter" in method:  # v1 nested form, translated by BnConfig.__setattr__
        inv = method.pop("invertible_adapter")
        if inv:
            if not isinstance(inv, dict) or "block_type" not in inv:
                raise AdapterError(f"{cfg_path}: 'invertible_adapter' must be an object with 'block_type', got {inv!r}")
            method.setdefault("inv_adapter", inv["block_type"])
    opts = _options(cfg_path, method, BN_DEFAULTS, "bottleneck", BN_REQUIRED)
    if "version" not in cfg and opts["non_linearity"] in ACTIVATION_RENAME:
        opts["non_linearity"] = ACTIVATION_RENAME[opts["non_linearity"]]  # loading.py load_weights_config
    _bools(cfg_path, opts, ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                            "ln_after", "is_parallel", "use_gating", "adapter_residual_before_ln", "phm_layer"))
    if not schema.sublayers:
        raise AdapterError(f"{cfg_path}: bottleneck adapters need a BERT-style base (residual sub-layers with dense, "
                           f"dropout and LayerNorm); {schema.model_type} has none")
    for key, what in (("is_parallel", "parallel adapters"), ("use_gating", "gated adapters (use_gating)"),
                      ("phm_layer", "PHM layers (Compacter)")):
        if opts[key]:
            raise AdapterError(f"{cfg_path}: {what} are not supported ({key}=true)")
    residual = opts["residual_before_ln"]
    if not (isinstance(residual, bool) or residual == "post_add"):
        raise AdapterError(f"{cfg_path}: residual_before_ln must be true, false or 'post_add', got {residual!r}")
    if residual == "post_add" and not opts["original_ln_before"]:
        raise AdapterError(f"{cfg_path}: residual_before_ln='post_add' needs original_ln_before=true "
                           "(the library has no residual for it otherwise)")
    scaling = opts["scaling"]
    if not (isinstance(scaling, float) and abs(scaling) <= FLOAT32_MAX) and scaling not in ("learned", "channel"):
        raise AdapterError(f"{cfg_path}: scaling must be a float32 number (e.g. 1.0), 'learned' or 'channel', got "
                           f"{scaling!r} (the adapters library rejects anything else)")
    opts["non_linearity"] = activation_name(cfg_path, "non_linearity", opts["non_linearity"], allow_none=False)
    opts["leave_out"] = _leave_out(cfg_path, opts["leave_out"])
    rf = opts["reduction_factor"]
    values = rf.items() if isinstance(rf, dict) else [("reduction_factor", rf)]
    for key, value in values:
        if isinstance(rf, dict) and key != "default" and not (key.isdigit() and int(key) < schema.num_layers):
            raise AdapterError(f"{cfg_path}: reduction_factor key {key!r} is neither 'default' nor a layer index "
                               f"0..{schema.num_layers - 1}")
        if not _is_number(value) or value <= 0:
            raise AdapterError(f"{cfg_path}: reduction_factor {key!r} must be a number > 0, got {value!r}")
    return opts


def _bottleneck_size(cfg_path: Path, rf, layer: int, hidden: int) -> tuple[int, object]:
    """Bottleneck width at `layer` exactly as BottleneckLayer.add_adapter and Adapter compute it."""
    if isinstance(rf, dict):
        if str(layer) in rf:
            rf = rf[str(layer)]
        elif "default" in rf:
            rf = rf["default"]
        else:
            raise AdapterError(f"{cfg_path}: reduction_factor mapping has no entry for layer {layer} and no 'default'")
    return max(1, int(hidden // rf)), rf


def _bottleneck(weights_path: Path, cfg_path: Path, opts: dict, module: str, params: dict,
                schema: BaseSchema) -> Bottleneck:
    hidden = schema.hidden_size
    layer, _ = schema.sublayers[schema.resolve_sublayer(module)]
    size, rf = _bottleneck_size(cfg_path, opts["reduction_factor"], layer, hidden)
    where = f"{weights_path}: '{module}'"
    down = 1 if opts["ln_before"] else 0  # ln_before puts the LayerNorm first in adapter_down (nn.Sequential)
    want = {f"adapter_down.{down}.weight": [size, hidden], f"adapter_down.{down}.bias": [size],
            "adapter_up.weight": [hidden, size], "adapter_up.bias": [hidden]}
    if opts["scaling"] in ("learned", "channel"):
        want["scaling"] = [1] if opts["scaling"] == "learned" else [hidden]
    if opts["ln_after"]:
        want.update({"adapter_norm_after.weight": [hidden], "adapter_norm_after.bias": [hidden]})
    optional = {}
    if opts["ln_before"]:  # one module registered twice (adapter_norm_before and adapter_down.0): either key loads it
        optional = {f"{alias}.{p}": [hidden] for alias in ("adapter_norm_before", "adapter_down.0")
                    for p in ("weight", "bias")}
    for param in sorted(params):
        if param not in want and param not in optional:
            raise AdapterError(f"{where}: unexpected tensor '{param}' (not part of this config's adapter: "
                               f"ln_before={opts['ln_before']}, ln_after={opts['ln_after']}, "
                               f"scaling={opts['scaling']!r})")
    for param in want:
        if param not in params:
            raise AdapterError(f"{where}: missing {param}")
    why = f" (reduction_factor {rf} gives a bottleneck of {size} = int({hidden} // {rf}))"
    projections = {f"adapter_down.{down}.weight", f"adapter_down.{down}.bias", "adapter_up.weight"}
    for param, shape in {**want, **optional}.items():
        if param in params:
            _shape(weights_path, f"'{module}' {param}", params[param], shape, why if param in projections else "")
    ln_before = None
    if opts["ln_before"]:
        ln_before = tuple(_alias(where, params, p) for p in ("weight", "bias"))
    scaling = params["scaling"].expand(hidden) if "scaling" in params else torch.full((hidden,), opts["scaling"])
    ln_after = (params["adapter_norm_after.weight"], params["adapter_norm_after.bias"]) if opts["ln_after"] else None
    return Bottleneck(
        down=params[f"adapter_down.{down}.weight"], down_bias=params[f"adapter_down.{down}.bias"],
        up=params["adapter_up.weight"], up_bias=params["adapter_up.bias"], activation=opts["non_linearity"],
        scaling=scaling.contiguous(), original_ln_before=opts["original_ln_before"],
        original_ln_after=opts["original_ln_after"], residual_before_ln=opts["residual_before_ln"],
        adapter_residual_before_ln=opts["adapter_residual_before_ln"], ln_before=ln_before, ln_after=ln_after)


def _alias(where: str, params: dict, part: str) -> torch.Tensor:
    a, b = params.get(f"adapter_norm_before.{part}"), params.get(f"adapter_down.0.{part}")
    if a is None and b is None:
        raise AdapterError(f"{where}: ln_before is true but adapter_norm_before.{part} (or adapter_down.0.{part}) "
                           "is missing")
    if a is not None and b is not None and not torch.equal(a, b):
        raise AdapterError(f"{where}: adapter_norm_before.{part} and adapter_down.0.{part} name one parameter "
                           "but differ")
    return a if a is not None else b


# LoRA and (IA)^3 ----------------------------------------------------------------------------------------------

def _lora_options(cfg_path: Path, cfg: dict) -> dict:
    opts = _options(cfg_path, cfg["config"], LORA_DEFAULTS, "LoRA")
    _bools(cfg_path, opts, ("selfattn_lora", "intermediate_lora", "output_lora", "use_gating", "use_dora"))
    if opts["use_gating"]:
        raise AdapterError(f"{cfg_path}: gated LoRA (use_gating=true) is not supported")
    if opts["use_dora"]:
        raise AdapterError(f"{cfg_path}: AdapterHub DoRA (use_dora=true) is not supported: it normalizes by "
                           "||W + B A|| without the alpha/r scaling and rescales the layer bias too, "
                           "unlike PEFT's DoRA")
    if opts["vera_d"] is not None or opts["vera_b"] is not None:
        raise AdapterError(f"{cfg_path}: VeRA (vera_d/vera_b set) is not supported")
    r, alpha = opts["r"], opts["alpha"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{cfg_path}: rank 'r' must be a positive integer, got {r!r}")
    if not _is_number(alpha):
        raise AdapterError(f"{cfg_path}: 'alpha' must be a number, got {alpha!r}")
    if not _is_number(opts["dropout"]) or opts["dropout"] < 0:
        raise AdapterError(f"{cfg_path}: 'dropout' must be a number >= 0, got {opts['dropout']!r}")
    mode = opts["composition_mode"]
    if mode not in ("add", "scale"):
        raise AdapterError(f"{cfg_path}: composition_mode must be 'add' or 'scale', got {mode!r}")
    if mode == "scale" and (r != 1 or opts["dropout"] > 0):
        raise AdapterError(f"{cfg_path}: composition_mode 'scale' ((IA)^3) needs r=1 and dropout 0, "
                           f"got r={r}, dropout={opts['dropout']}")
    matrices = opts["attn_matrices"]
    if not isinstance(matrices, list) or not all(m in ATTN_MODULES for m in matrices):
        raise AdapterError(f"{cfg_path}: attn_matrices must be a list of 'q', 'k', 'v', got {matrices!r}")
    opts["leave_out"] = _leave_out(cfg_path, opts["leave_out"])
    version = cfg.get("version")
    if isinstance(version, str) and version.startswith("adapters.") and r != alpha:
        from packaging.version import InvalidVersion, Version

        try:
            old = Version(version[len("adapters."):]) < Version("1.1.0")
        except InvalidVersion as exc:
            raise AdapterError(f"{cfg_path}: version {version!r} is not a valid version") from exc
        if old:  # loading.py _fix_backward_compat: LoRA saved before 1.1.0 was trained with scaling 1
            opts["alpha"] = r
    return opts


def _lora_targets(cfg_path: Path, opts: dict, schema: BaseSchema) -> dict[str, str]:
    """Served module name -> the config option that adapts it, for every module this config wraps."""
    layers = sorted((layer, sub[: -len(".output")]) for sub, (layer, loc) in schema.sublayers.items()
                    if loc == "output_adapter" and sub.endswith(".output"))
    if not layers:
        raise AdapterError(f"{cfg_path}: AdapterHub LoRA is supported on BERT-style bases only; "
                           f"{schema.model_type} has no BERT layers")
    targets = {}
    for layer, prefix in layers:
        if layer in opts["leave_out"]:
            continue
        if opts["selfattn_lora"]:
            targets.update({f"{prefix}.{ATTN_MODULES[m]}": f"attn_matrices '{m}'" for m in opts["attn_matrices"]})
        targets.update({f"{prefix}.{path}": key for key, path in FFN_MODULES.items() if opts[key]})
    for target in targets:
        if target not in schema.linears:
            raise AdapterError(f"{cfg_path}: the config adapts '{target}', which the base does not have")
    return targets


def _loras(cfg_path: Path, weights_path: Path, cfg: dict, groups: dict, schema: BaseSchema, max_rank: int):
    opts = _lora_options(cfg_path, cfg)
    targets = _lora_targets(cfg_path, opts, schema)
    found = _only_marker(weights_path, groups, "loras", "LoRA")
    by_target = {}
    for module, params in sorted(found.items()):
        target = schema.resolve_module(module)
        if target is None:
            raise AdapterError(f"{weights_path}: '{module}' is not a linear module of the base "
                               f"({schema.model_type}, {schema.num_layers} layers)")
        if target not in targets:
            raise AdapterError(f"{weights_path}: '{module}' has LoRA weights but the config does not adapt it "
                               f"(selfattn_lora/attn_matrices/intermediate_lora/output_lora/leave_out)")
        if target in by_target:
            raise AdapterError(f"{weights_path}: '{by_target[target][0]}' and '{module}' both adapt '{target}'")
        by_target[target] = (module, params)
    for target in sorted(set(targets) - set(by_target)):
        raise AdapterError(f"{weights_path}: no LoRA weights for '{target}' (the config adapts it: {targets[target]})")
    lora, ia3 = {}, {}
    for target, (module, params) in sorted(by_target.items()):
        shape, where = schema.linears[target], f"{weights_path}: '{module}'"
        wanted = ("lora_B",) if opts["composition_mode"] == "scale" else ("lora_A", "lora_B")
        for param in sorted(params):
            if param not in wanted:
                raise AdapterError(f"{where}: unexpected tensor '{param}' (composition_mode "
                                   f"{opts['composition_mode']!r} has {' and '.join(wanted)})")
        for param in wanted:
            if param not in params:
                raise AdapterError(f"{where}: missing {param}")
        if opts["composition_mode"] == "scale":  # IA3: y = (W x + b) * (lora_B * alpha)
            _shape(weights_path, f"'{module}' lora_B", params["lora_B"], [shape.d_out, 1])
            ia3[target] = Ia3Vector(scale=(params["lora_B"].reshape(-1) * opts["alpha"]).contiguous(), on_input=False)
            continue
        A, B = params["lora_A"], params["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != shape.d_in or B.shape[0] != shape.d_out \
                or B.shape[1] != A.shape[0]:
            raise AdapterError(f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit the base layer "
                               f"(in {shape.d_in}, out {shape.d_out}): expected [r, {shape.d_in}] and "
                               f"[{shape.d_out}, r]")
        rank = A.shape[0]
        if rank != opts["r"]:
            raise AdapterError(f"{where}: lora_A has rank {rank} but the config says r={opts['r']}")
        if rank > max_rank:
            raise AdapterError(f"{where}: rank {rank} exceeds max_rank {max_rank}")
        lora[target] = LoraDelta(A=A.contiguous(), B=B.contiguous(), scale=float(opts["alpha"] / opts["r"]))
    return ("ia3" if opts["composition_mode"] == "scale" else "lora"), lora, ia3


# prediction heads ---------------------------------------------------------------------------------------------

def head_linear_indices(layers: int, has_activation: bool) -> list[int]:
    """nn.Sequential indices of the Linear modules PredictionHead.build makes: per layer a Dropout, then a Linear,
    then (all but the last layer) the activation when there is one."""
    out, index = [], 0
    for layer in range(layers):
        index += 1  # Dropout
        out.append(index)
        index += 1
        if layer < layers - 1 and has_activation:
            index += 1
    return out


def _head(folder: Path, schema: BaseSchema, labels, limits: FileLimits) -> HeadSpec | None:
    cfg_path, weights_path = folder / HEAD_CONFIG_FILE, folder / HEAD_WEIGHTS_FILE
    if not cfg_path.is_file() and not weights_path.is_file():
        return None
    if not cfg_path.is_file():
        raise AdapterError(f"{weights_path}: head weights without {HEAD_CONFIG_FILE} (its type, layers and labels "
                           "are unknown)")
    if not weights_path.is_file():
        raise AdapterError(f"{cfg_path}: a head config without {HEAD_WEIGHTS_FILE} (save the head with "
                           "use_safetensors=True)")
    cfg = read_json(cfg_path, limits)
    _check_base(cfg_path, cfg, schema)
    head_name = _name(cfg_path, cfg)
    hc = cfg.get("config")
    if not isinstance(hc, dict):
        raise AdapterError(f"{cfg_path}: 'config' is {hc!r}: only AdapterHub flex heads (head_type ...) are supported, "
                           f"not the static head of a {cfg.get('model_class')!r}")
    head_type = hc.get("head_type")
    if head_type not in HEAD_TASKS:
        raise AdapterError(f"{cfg_path}: head_type {head_type!r} is not supported (supported: {', '.join(HEAD_TASKS)})")
    if schema.is_causal:
        raise AdapterError(f"{cfg_path}: AdapterHub {head_type} heads on causal LM bases are not supported")
    opts = _options(cfg_path, {k: v for k, v in hc.items() if k not in HEAD_COMMON_KEYS}, HEAD_DEFAULTS[head_type],
                    f"{head_type} head")
    num_labels, layers = opts["num_labels"], opts["layers"]
    for key in ("num_labels", "layers"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise AdapterError(f"{cfg_path}: '{key}' must be an integer >= 1, got {opts[key]!r}")
    act = opts["activation_function"]
    act = activation_name(cfg_path, "activation_function", act or None, allow_none=True)  # "" builds no activation
    _bools(cfg_path, opts, [k for k in ("use_pooler", "bias") if k in opts])
    pooled = opts.get("use_pooler", False)
    if pooled and not schema.has_pooler:
        raise AdapterError(f"{cfg_path}: use_pooler=true but the base has no pooler")
    params = _head_params(weights_path, read_safetensors(weights_path, limits), head_name)
    hidden, indices = schema.hidden_size, head_linear_indices(layers, act is not None)
    want = {}
    for i in indices[:-1]:
        want.update({f"{i}.weight": [hidden, hidden], f"{i}.bias": [hidden]})
    last = indices[-1]
    want[f"{last}.weight"] = [num_labels, hidden]
    if opts.get("bias", True):
        want[f"{last}.bias"] = [num_labels]
    for param in sorted(params):
        if param not in want:
            raise AdapterError(f"{weights_path}: unexpected tensor 'heads.{head_name}.{param}' (a {layers}-layer head "
                               f"with activation {act!r} has Linear modules at {indices})")
    for param, shape in want.items():
        if param not in params:
            raise AdapterError(f"{weights_path}: missing 'heads.{head_name}.{param}' (a {layers}-layer head with "
                               f"activation {act!r} has Linear modules at {indices})")
        why = f" (head_config.json says num_labels={num_labels})" if param.startswith(f"{last}.") else ""
        _shape(weights_path, f"'heads.{head_name}.{param}'", params[param], shape, why)
    bias = params.get(f"{last}.bias", torch.zeros(num_labels))
    hidden_layers = tuple((params[f"{i}.weight"], params[f"{i}.bias"]) for i in indices[:-1])
    return HeadSpec(task=HEAD_TASKS[head_type], weight=params[f"{last}.weight"], bias=bias,
                    labels=_labels(cfg_path, hc, num_labels, labels), pooled=bool(pooled),
                    hidden_layers=hidden_layers, activation=act)


def _head_params(weights_path: Path, tensors: dict, head_name: str) -> dict[str, torch.Tensor]:
    prefix = f"heads.{head_name}."
    out = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            other = key.split(".")[1] if key.startswith("heads.") and key.count(".") >= 2 else None
            raise AdapterError(f"{weights_path}: tensor '{key}' " + (
                f"belongs to head '{other}', but {HEAD_CONFIG_FILE} names the head '{head_name}'" if other
                else f"is not a head weight (expected '{prefix}<module index>.weight/bias')"))
        out[key[len(prefix):]] = tensor
    return out


def _labels(cfg_path: Path, hc: dict, num_labels: int, given) -> tuple[str, ...]:
    """Labels given by the caller, else the head config's label2id (which the library's loader prefers), else its
    id2label, else LABEL_i."""
    if given is not None:
        if not isinstance(given, (list, tuple)) or not all(isinstance(x, str) for x in given):
            raise AdapterError(f"{cfg_path.parent}: labels must be a list of strings, got {given!r:.80}")
        if len(given) != num_labels:
            raise AdapterError(f"{cfg_path.parent}: {len(given)} labels given for a head with {num_labels} outputs")
        return tuple(given)
    label2id, id2label = hc.get("label2id"), hc.get("id2label")
    if label2id is not None:
        if not isinstance(label2id, dict):
            raise AdapterError(f"{cfg_path}: label2id must be an object, got {type(label2id).__name__}")
        pairs, what = [(i, label) for label, i in label2id.items()], "label2id"
    elif id2label is not None:
        if not isinstance(id2label, dict):
            raise AdapterError(f"{cfg_path}: id2label must be an object, got {type(id2label).__name__}")
        pairs, what = list(id2label.items()), "id2label"
    else:
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    by_id = {}
    for i, label in pairs:
        ok = isinstance(i, int) and not isinstance(i, bool) or isinstance(i, str) and i.isdigit()
        if not ok or not isinstance(label, str):
            raise AdapterError(f"{cfg_path}: {what} must map labels (strings) to integer ids, got {i!r}: {label!r}")
        if int(i) in by_id:
            raise AdapterError(f"{cfg_path}: {what} gives id {int(i)} to both {by_id[int(i)]!r} and {label!r}")
        by_id[int(i)] = label
    if sorted(by_id) != list(range(num_labels)):
        raise AdapterError(f"{cfg_path}: {what} has ids {sorted(by_id)}, the head has {num_labels} outputs "
                           f"(ids 0..{num_labels - 1})")
    return tuple(by_id[i] for i in range(num_labels))
