"""Patched layers: each adapted linear adds every row's own adapter delta to its output.

The base module's weights are untouched (they keep their storage); the patched forward
reads the current BatchPlan from the shared ForwardState.

Modules that read the same input tensor (BERT's query/key/value, Llama's q/k/v and
gate/up) share one shrink: the first forward with adapters records which modules see the
same input object, then stores their A's side by side (slots.fuse_storage); later forwards
compute the group's shrink as one matmul in the first member's hook and hand the others
their part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from .batch import BatchPlan
from .slots import LoraSlots, fuse_storage


@dataclass(frozen=True)
class ShrinkGroup:
    """Modules that read the same input, their A's side by side in one block."""

    names: tuple[str, ...]
    A: torch.Tensor  # [S, sum R_i, d_in]
    parts: tuple[tuple[int, int], ...]  # (offset, R_i) per member


@dataclass
class ForwardState:
    """What every hook reads during one forward: the plan, the kernels, the shrink groups."""

    kernels: ModuleType
    plan: BatchPlan | None = None
    modules: dict[str, LoraSlots] = field(default_factory=dict)
    groups: dict[str, ShrinkGroup] = field(default_factory=dict)  # module -> its group, when it has one
    learning: bool = True
    _inputs: list[tuple[torch.Tensor, list[str]]] = field(default_factory=list)
    _stash: tuple[torch.Tensor, dict] | None = None

    def add_module(self, name: str, slots: LoraSlots) -> None:
        self.modules[name] = slots
        slots.on_resize = self.regroup
        self.regroup()

    def regroup(self) -> None:
        """Forget the groups; the next forward with adapters learns them again."""
        self.groups, self.learning = {}, True

    def begin(self, plan: BatchPlan) -> None:
        self.plan, self._stash, self._inputs = plan, None, []

    def end(self) -> None:
        if self.learning and self._inputs:
            for _, names in self._inputs:
                if len(names) > 1:
                    block, parts = fuse_storage([self.modules[n] for n in names])
                    group = ShrinkGroup(tuple(names), block, tuple(parts))
                    for n in names:
                        self.groups[n] = group
            self.learning = False
        self.plan, self._stash, self._inputs = None, None, []

    def shrunk(self, name: str, x: torch.Tensor, x2: torch.Tensor, tpr: int):
        """This module's shrunk input u, computed with its group's on first use."""
        if self.learning:
            for seen, names in self._inputs:
                if seen is x:
                    names.append(name)
                    break
            else:
                self._inputs.append((x, [name]))
        if self._stash is not None and self._stash[0] is x and name in self._stash[1]:
            return self._stash[1].pop(name)
        group = self.groups.get(name)
        if group is None:
            slots = self.modules[name]
            [u] = self.kernels.shrink(x2, slots.A, [(0, slots.capacity)], [slots.scale], [slots.ranks], self.plan, tpr)
            return u
        members = [self.modules[n] for n in group.names]
        us = self.kernels.shrink(x2, group.A, list(group.parts), [m.scale for m in members],
                                 [m.ranks for m in members], self.plan, tpr)
        mine = group.names.index(name)
        self._stash = (x, {n: u for i, (n, u) in enumerate(zip(group.names, us)) if i != mine})
        return us[mine]


def attach_lora(name: str, module: nn.Module, slots: LoraSlots, state: ForwardState) -> None:
    """Route `module`'s output through the per-row LoRA/DoRA deltas in `slots`.

    The module's forward is shadowed by an instance attribute (its class and weights are
    untouched): without adapter rows it is the base forward; with them, one op computes the
    base matmul and the deltas together; DoRA rows rescale the base output first.
    """
    base_forward = module.forward
    weight, bias = module.weight, getattr(module, "bias", None)
    d_in, d_out, conv1d = slots.shape.d_in, slots.shape.d_out, slots.shape.conv1d
    state.add_module(name, slots)

    def forward(x: torch.Tensor) -> torch.Tensor:
        plan = state.plan
        if plan is None or not plan.has_adapters:
            return base_forward(x)
        x2 = x.reshape(-1, d_in)  # [N, d_in]
        tpr = x2.shape[0] // plan.num_rows
        u = state.shrunk(name, x, x2, tpr)
        if slots.G is not None and any(slots.dora[seg.slot] for seg in plan.segments):
            y = base_forward(x)
            y2 = y.view(-1, d_out)
            state.kernels.rescale_output(y2, bias, slots.G, plan, tpr)
            state.kernels.expand(y2, u, slots.B, plan, tpr)
            return y
        y2 = state.kernels.linear_expand(x2, weight, conv1d, u, slots.Bb, plan, tpr)
        return y2.view(*x.shape[:-1], d_out)

    module.forward = forward
