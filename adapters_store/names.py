"""Adapter names: short identifiers, never paths."""
from __future__ import annotations

import re

from .errors import AdapterError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED = frozenset({"base", "none", "null", "default"})


def check_name(name) -> str:
    """Return `name` if it is a valid adapter name, else raise AdapterError saying why."""
    if not isinstance(name, str):
        raise AdapterError(f"adapter name must be a string, got {type(name).__name__}")
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name[:80]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '..' (names are not paths)"
        )
    if name.lower() in RESERVED:
        raise AdapterError(f"invalid adapter name {name!r}: reserved")
    return name
