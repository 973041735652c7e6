"""Kernel dispatch: one module of ops (shrink, expand, linear_expand, add_lora, rescale_output) per device.

`reference` is the oracle, `cpu` the fast torch path, `triton_lora` the GPU kernels. By
default a CUDA device gets triton (cpu when triton is not installed) and a CPU gets cpu.
POLYHEAD_KERNEL=reference|cpu|triton (or the `forced` argument) picks one; triton on a CPU
runs only under Triton's interpreter (TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from . import cpu, reference

CHOICES = ("reference", "cpu", "triton")


def select(device_type: str, forced: str | None = None) -> ModuleType:
    choice = forced if forced is not None else os.environ.get("POLYHEAD_KERNEL", "").strip().lower() or None
    if choice is None:
        if device_type == "cuda":
            try:
                return _triton(device_type)
            except ImportError:
                return cpu
        return cpu
    if choice not in CHOICES:
        raise ValueError(f"POLYHEAD_KERNEL={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "triton":
        try:
            return _triton(device_type)
        except ImportError as err:
            raise ValueError(f"kernel 'triton' needs the triton package, which cannot be imported ({err}); "
                             "install polyhead[gpu] or choose cpu or reference") from err
    return reference if choice == "reference" else cpu


def _triton(device_type: str) -> ModuleType:
    module = importlib.import_module(".triton_lora", __name__)
    if device_type != "cuda" and not module.INTERPRETED:
        raise ValueError(f"kernel 'triton' on a {device_type!r} device runs only under Triton's interpreter: "
                         "set TRITON_INTERPRET=1 before polyhead is imported, or choose cpu or reference")
    return module
