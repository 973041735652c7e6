"""Detect an adapter folder's format and convert it into an AdapterSpec, fully validated."""
from __future__ import annotations

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
        raise AdapterError(f"{folder}: not an adapter folder (no such directory)")
    refuse_pickles(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file() and (folder / "head_config.json").is_file():  # an AdapterHub head saved alone
        return load_adapterhub(folder, name, schema, max_rank=max_rank, labels=labels, limits=limits)
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE}: not a PEFT or AdapterHub adapter folder")
    cfg = read_json(cfg_path, limits)
    if "peft_type" in cfg:
        return load_peft(folder, name, schema, max_rank=max_rank, labels=labels, limits=limits,
                         max_virtual_tokens=max_virtual_tokens)
    if isinstance(cfg.get("config"), dict):
        return load_adapterhub(folder, name, schema, max_rank=max_rank, labels=labels, limits=limits)
    raise AdapterError(f"{cfg_path}: neither a PEFT config (no 'peft_type') nor an AdapterHub config (no 'config')")
