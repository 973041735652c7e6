"""Patched layers: a forward hook on each adapted linear adds every row's own adapter delta.

The base module itself is untouched (its weights keep their storage); the hook reads the
current BatchPlan from the shared ForwardState and edits the layer's output in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from .batch import BatchPlan
from .slots import LoraSlots


@dataclass
class ForwardState:
    """What every hook reads during one forward: the plan, and which kernels to run."""

    kernels: ModuleType
    plan: BatchPlan | None = None


def attach_lora(module: nn.Module, slots: LoraSlots, state: ForwardState):
    """Route `module`'s output through the per-row LoRA/DoRA deltas in `slots`."""
    bias = getattr(module, "bias", None)
    d_in, d_out = slots.shape.d_in, slots.shape.d_out

    def hook(_module, args, output):
        plan = state.plan
        if plan is None or not plan.has_adapters:
            return output
        x = args[0]
        x2 = x.reshape(-1, d_in)  # [N, d_in]
        y2 = output.view(-1, d_out)  # [N, d_out], edited in place
        tokens_per_row = x2.shape[0] // plan.num_rows
        if slots.G is not None and any(slots.dora[seg.slot] for seg in plan.segments):
            state.kernels.rescale_output(y2, bias, slots.G, plan, tokens_per_row)
        state.kernels.add_lora(y2, x2, slots.A, slots.B, slots.scale, slots.ranks, plan, tokens_per_row)
        return output

    return module.register_forward_hook(hook)
