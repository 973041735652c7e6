"""Adapters at rest: formats, validation and the normalized AdapterSpec. Never runs a model."""
from .base import BaseSchema, LinearShape
from .errors import AdapterError
from .files import FileLimits
from .loader import load_adapter_dir
from .names import check_name
from .spec import AdapterSpec, HeadSpec, LoraDelta

__all__ = [
    "AdapterError", "AdapterSpec", "BaseSchema", "FileLimits", "HeadSpec", "LinearShape", "LoraDelta",
    "check_name", "load_adapter_dir",
]
