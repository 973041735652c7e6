"""polyhead serving: the Engine (one frozen base, many adapters, one batched forward).

The names below load on first use, so that `serving.app`'s HTTP ingress and metrics hub, which never run
the engine, do not import torch through this package.
"""
from __future__ import annotations

import importlib

__all__ = ["Engine", "Request", "Result", "RequestError", "SamplingParams", "GenerationResult"]
_WHERE = {"Engine": ".engine", "Request": ".engine", "Result": ".engine", "RequestError": ".errors",
          "SamplingParams": ".generation.sampling", "GenerationResult": ".generation.generator"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
