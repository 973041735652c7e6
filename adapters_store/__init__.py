"""Adapters at rest: formats, validation, the normalized AdapterSpec and the versioned AdapterStore.

Never runs a model."""
from __future__ import annotations

import importlib

from .errors import AdapterError
from .names import check_name
from .store import AdapterStore, AdapterVersion, parse_ref

# These load on first use, with torch (0.9 s): listing and removing versions, resolving refs and checking names
# (`polyhead adapters list|rm`, the ingress) need none of them.
_WHERE = {"BaseSchema": ".base", "LinearShape": ".base", "FileLimits": ".files", "load_adapter_dir": ".loader",
          "AdapterSpec": ".spec", "Bottleneck": ".spec", "HeadSpec": ".spec", "Ia3Vector": ".spec",
          "LoraDelta": ".spec"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterError", "AdapterSpec", "AdapterStore", "AdapterVersion", "BaseSchema", "Bottleneck", "FileLimits", "HeadSpec", "Ia3Vector",
    "LinearShape", "LoraDelta", "check_name", "load_adapter_dir", "parse_ref",
]
