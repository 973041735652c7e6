"""Adapters at rest: formats, validation, the normalized AdapterSpec and the versioned AdapterStore.

Never runs a model."""
from .base import BaseSchema, LinearShape
from .errors import AdapterError
from .files import FileLimits
from .loader import load_adapter_dir
from .names import check_name
from .spec import AdapterSpec, Bottleneck, HeadSpec, Ia3Vector, LoraDelta
from .store import AdapterStore, AdapterVersion, parse_ref

__all__ = [
    "AdapterError", "AdapterSpec", "AdapterStore", "AdapterVersion", "BaseSchema", "Bottleneck", "FileLimits", "HeadSpec", "Ia3Vector",
    "LinearShape", "LoraDelta", "check_name", "load_adapter_dir", "parse_ref",
]
