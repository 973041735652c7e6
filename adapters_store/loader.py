"""Detect an adapter folder's format and convert it into an AdapterSpec, fully validated."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .base import BaseSchema
from .errors import AdapterError
from .files import FileLimits, read_json, refuse_pickles
from .formats.adapterhub import load_adapterhub
from .formats.peft import CONFIG_FILE, load_peft
from .names import check_name
from .spec import AdapterSpec


def load_adapter_dir(path: str | Path, schema: BaseSchema, *, name: str = "adapter", max_rank: int = 64,
                     labels: list[str] | None = None, limits: FileLimits = FileLimits(),
                     max_virtual_tokens: int = 128) -> AdapterSpec:
    """Read, validate and normalize the adapter folder at `path` against `schema`."""
    check_name(name)
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(_not_a_folder(folder))
    refuse_pickles(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file() and (folder / "head_config.json").is_file():  # an AdapterHub head saved alone
        spec = load_adapterhub(folder, name, schema, max_rank=max_rank, labels=labels, limits=limits)
        return replace(spec, warnings=registration_warnings(spec, schema, None, labels))
    if not os.path.lexists(cfg_path):  # one that is not a regular file is refused by read_json
        raise AdapterError(f"{folder}: no {CONFIG_FILE}: not a PEFT or AdapterHub adapter folder")
    cfg = read_json(cfg_path, limits)
    if "peft_type" in cfg:
        spec = load_peft(folder, name, schema, max_rank=max_rank, labels=labels, limits=limits,
                         max_virtual_tokens=max_virtual_tokens)
    elif isinstance(cfg.get("config"), dict):
        spec = load_adapterhub(folder, name, schema, max_rank=max_rank, labels=labels, limits=limits)
    else:
        raise AdapterError(f"{cfg_path}: neither a PEFT config (no 'peft_type') nor an AdapterHub config (no 'config')")
    return replace(spec, warnings=registration_warnings(spec, schema, cfg, labels))


def registration_warnings(spec: AdapterSpec, schema: BaseSchema, cfg: dict | None,
                          labels: list[str] | None) -> tuple[str, ...]:
    """What a user registering `spec` should hear about although it loads: a PEFT config without task_type, no
    task head on an encoder base (which routes it can serve), a head whose labels are only LABEL_0..N-1."""
    out = []
    if spec.format == "peft" and cfg is not None and cfg.get("task_type") is None:
        out.append(f"{CONFIG_FILE} has no task_type: read as an adapter without a task head; a PEFT classifier "
                   "saves its head only when trained with task_type set (LoraConfig(task_type=\"SEQ_CLS\", ...))")
    head = spec.head
    if head is None and not schema.is_causal:
        out.append("no task head: this adapter serves /v1/embeddings only (/v1/classify needs a sequence "
                   "classification head, /v1/tag a token classification head)")
    if head is not None and labels is None and head.labels == tuple(f"LABEL_{i}" for i in range(head.num_labels)):
        peft = spec.format == "peft"
        where = ("no config.json with id2label beside the adapter" if peft
                 else "no label2id or id2label in head_config.json")
        fix = ", or save the training model's config beside it: model.config.save_pretrained(folder)" if peft else ""
        out.append(f"labels missing: the {head.task} head's {head.num_labels} outputs are answered as LABEL_0.."
                   f"LABEL_{head.num_labels - 1} (no labels given, {where}); register it again with its label names "
                   f"(`labels` in POST /v1/adapters, `--labels a,b` in polyhead adapters add){fix}")
    return tuple(out)


def _not_a_folder(folder: Path) -> str:
    """Why `folder` cannot be read as an adapter folder, saying what a path is relative to and that a folder
    (not one of its files) is expected."""
    if folder.is_file():
        return (f"{folder}: not an adapter folder: this is a file; give the folder that holds it "
                f"({folder.parent}), with {CONFIG_FILE} and the weights")
    if not folder.is_absolute():
        return (f"{folder}: not an adapter folder (no such directory relative to {Path.cwd()}, the working "
                "directory of the process reading it: give an absolute path)")
    return f"{folder}: not an adapter folder (no such directory)"
