"""Kernel dispatch: one module of ops (shrink, expand, add_lora, rescale_output) per device.

`reference` is the oracle, `cpu` the fast torch path (also used on GPUs until the Triton
kernels land). POLYHEAD_KERNEL=reference|cpu|triton forces one.
"""
from __future__ import annotations

import os
from types import ModuleType

from . import cpu, reference

CHOICES = ("reference", "cpu", "triton")


def select(device_type: str, forced: str | None = None) -> ModuleType:
    choice = forced if forced is not None else os.environ.get("POLYHEAD_KERNEL", "").strip().lower() or None
    if choice is None:
        return cpu
    if choice not in CHOICES:
        raise ValueError(f"POLYHEAD_KERNEL={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "triton":
        raise ValueError("POLYHEAD_KERNEL=triton: the Triton kernels are not available yet (use cpu or reference)")
    return reference if choice == "reference" else cpu
