"""Patched layers: each adapted linear adds every row's own adapter delta to its output,
and scales the inputs/outputs of IA3 rows by their own vectors.

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
from .kernels.cpu import output_buffer
from .slots import Ia3Slots, LoraSlots, VirtualTokenSlots, fuse_storage

# BatchPlan groups: the engine gives each slot the group of its adapter's kind, so each kind's rows
# form one contiguous range (plan.ranges) that a layer treats as one slice.
GROUP_PLAIN = 0  # LoRA family, head-only adapters
GROUP_IA3 = 1
GROUP_BOTTLENECK = 16  # + one per bottleneck configuration (serving/bottleneck.py)
GROUP_PROMPT = 1 << 20
GROUP_PREFIX = 1 << 21  # last: attention treats rows [row0, B)


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
    modules: dict[str, LoraSlots] = field(default_factory=dict)  # LoRA slots per linear module
    ia3: dict[str, Ia3Slots] = field(default_factory=dict)
    ia3_rows: tuple[int, int, torch.Tensor] | None = None  # IA3 rows of this forward: row0, row1, slot per row
    prefix_rows: tuple[int, torch.Tensor, torch.Tensor] | None = None  # row0, slot per row, prefix length per row
    prefix_slots: VirtualTokenSlots | None = None  # the pool's prefix stack, once an adapter has one
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
        ia3 = plan.ranges.get(GROUP_IA3)
        self.ia3_rows = None if ia3 is None else (ia3[0], ia3[1], plan.token_slots[ia3[0]:ia3[1]])

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
        self.ia3_rows = self.prefix_rows = None

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


def attach_linear(name: str, module: nn.Module, state: ForwardState) -> None:
    """Route `module`'s output through the per-row adapters of this forward (state.plan).

    The module's forward is shadowed by an instance attribute (its class and weights are
    untouched): without adapter rows it is the base forward. LoRA: one op computes the base
    matmul and the deltas together; DoRA rows rescale the base output first. IA3 rows (one
    contiguous range) scale their inputs before, or their outputs after, the base matmul.
    Called once per module, when its first slot tensor of any kind is created.
    """
    base_forward = module.forward
    weight = module.weight
    conv1d = type(module).__name__ == "Conv1D"
    d_in, d_out = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])

    def forward(x: torch.Tensor) -> torch.Tensor:
        plan = state.plan
        if plan is None or not plan.has_adapters:
            return base_forward(x)
        lora, ia3 = state.modules.get(name), state.ia3.get(name)
        rows = state.ia3_rows if ia3 is not None else None
        x2 = x.reshape(-1, d_in)  # [N, d_in]
        tpr = x2.shape[0] // plan.num_rows
        scale_input = rows is not None and any(ia3.on_input[s] for s in plan.row_slots[rows[0]:rows[1]])
        if lora is not None:
            y = _lora_forward(name, lora, state, x, tpr, base_forward, (ia3.vin, rows) if scale_input else None)
        elif scale_input:
            y = _ia3_input_linear(x2, weight, getattr(module, "bias", None), conv1d, ia3.vin, rows, tpr,
                                  plan.workspace)
            y = y.view(*x.shape[:-1], d_out)
        else:
            y = base_forward(x)
        if rows is not None and any(ia3.on_output[s] for s in plan.row_slots[rows[0]:rows[1]]):
            _scale_rows(y.view(-1, d_out), ia3.vout, rows, tpr)
        return y

    module.forward = forward


def _ia3_input_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool,
                      vectors: torch.Tensor, rows: tuple[int, int, torch.Tensor], tpr: int,
                      workspace: dict) -> torch.Tensor:
    """The base linear on x [N, d_in] where the IA3 rows' inputs are scaled first: the other rows' matmul
    reads x in place, only the IA3 rows' inputs are copied (scaled). Returns [N, d_out]."""
    row0, row1, slots = rows
    W = weight if conv1d else weight.T  # [d_in, d_out]
    t0, t1 = row0 * tpr, row1 * tpr
    y = output_buffer(workspace, x.shape[0], W.shape[1], x)
    scaled = (x[t0:t1].view(row1 - row0, tpr, -1) * vectors.index_select(0, slots).unsqueeze(1)).view(t1 - t0, -1)
    for a, b, inp in ((0, t0, x[:t0]), (t0, t1, scaled), (t1, x.shape[0], x[t1:])):
        if b > a:
            if bias is None:
                torch.mm(inp, W, out=y[a:b])
            else:
                torch.addmm(bias, inp, W, out=y[a:b])
    return y


def _scale_rows(t: torch.Tensor, vectors: torch.Tensor, rows: tuple[int, int, torch.Tensor], tpr: int) -> None:
    """t[tokens of rows row0..row1] *= vectors[slot of the row], in place. t: [N, d], vectors: [S, d]."""
    row0, row1, slots = rows
    part = t[row0 * tpr:row1 * tpr].view(row1 - row0, tpr, t.shape[-1])
    part.mul_(vectors.index_select(0, slots).unsqueeze(1))


def _lora_forward(name: str, slots: LoraSlots, state: ForwardState, x: torch.Tensor, tpr: int, base_forward,
                  ia3_input: tuple[torch.Tensor, tuple[int, int, torch.Tensor]] | None) -> torch.Tensor:
    """The LoRA rows' deltas on top of the base output. ia3_input: (input vectors, IA3 rows) where IA3 rows
    scale their inputs; then the base matmul runs per row block (only the IA3 rows' inputs are copied) and
    the deltas are added after it. LoRA rows are never IA3 rows, so the shrink reads x as it is."""
    plan = state.plan
    d_in, d_out, conv1d = slots.shape.d_in, slots.shape.d_out, slots.shape.conv1d
    x2 = x.reshape(-1, d_in)
    u = state.shrunk(name, x, x2, tpr)
    dora = slots.G is not None and any(slots.dora[seg.slot] for seg in plan.segments)
    if ia3_input is None and not dora:
        y2 = state.kernels.linear_expand(x2, slots.weight, conv1d, u, slots.Bb, plan, tpr)
        return y2.view(*x.shape[:-1], d_out)
    if ia3_input is None:
        y2 = base_forward(x).view(-1, d_out)
    else:
        y2 = _ia3_input_linear(x2, slots.weight, slots.bias, conv1d, *ia3_input, tpr, plan.workspace)
    if dora:
        state.kernels.rescale_output(y2, slots.bias, slots.G, plan, tpr)
    state.kernels.expand(y2, u, slots.B, plan, tpr)
    return y2.view(*x.shape[:-1], d_out)
