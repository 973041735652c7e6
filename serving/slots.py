"""Slots: adapter weights resident in preallocated, fixed-shape stacked tensors on the model's device.

For each adapted module, `A[S, R, d_in]`, `B[S, d_out, R]`, `scale[S]` (and `G[S, d_out]`
once a DoRA adapter lands there); B is stored as the last R columns of `Bb[S, d_out, 1 + R]`,
whose column 0 holds the base layer's bias, so one matmul writes bias + delta; heads have `W[S, C, H]`, `b[S, C]`. Slot tensors exist
only for the modules some loaded adapter adapts; their rank capacity R grows to the
largest rank loaded (up to max_rank). `SlotPool` maps adapter names to slot ids, LRU.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Callable

import torch
from torch import nn

from adapters_store import AdapterSpec, HeadSpec, LinearShape, LoraDelta


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class LoraSlots:
    """Slot tensors of one adapted linear module."""

    def __init__(self, shape: LinearShape, max_slots: int, max_rank: int, dtype: torch.dtype, device,
                 bias: torch.Tensor | None = None):
        self.shape, self.max_rank = shape, max_rank
        self.dtype, self.device = dtype, device
        S = max_slots
        self.A = torch.zeros(S, 0, shape.d_in, dtype=dtype, device=device)  # [S, R, d_in]
        self.Bb = torch.zeros(S, shape.d_out, 1, dtype=dtype, device=device)  # [S, d_out, 1 + R]: [bias | B]
        if bias is not None:
            self.Bb[:, :, 0] = bias.detach().to(dtype)
        self.scale = torch.zeros(S, dtype=dtype, device=device)  # [S]
        self.G: torch.Tensor | None = None  # [S, d_out] DoRA output factor, 1 where not DoRA
        self.ranks = [0] * S
        self.dora = [False] * S
        self.on_resize: Callable[[], None] | None = None  # told when A stops being a view of a fused block

    @property
    def capacity(self) -> int:
        return self.A.shape[1]

    @property
    def B(self) -> torch.Tensor:
        return self.Bb[:, :, 1:]  # [S, d_out, R]

    def nbytes(self) -> int:
        extra = self.G.nbytes if self.G is not None else 0
        return self.A.nbytes + self.Bb.nbytes + self.scale.nbytes + extra

    def _grow(self, rank: int) -> None:
        new = min(self.max_rank, max(8, _round_up(rank, 8)))
        S, R = self.A.shape[0], self.capacity
        A = torch.zeros(S, new, self.shape.d_in, dtype=self.dtype, device=self.device)
        Bb = torch.zeros(S, self.shape.d_out, 1 + new, dtype=self.dtype, device=self.device)
        A[:, :R], Bb[:, :, :1 + R] = self.A, self.Bb
        self.A, self.Bb = A, Bb
        if self.on_resize is not None:
            self.on_resize()

    def write(self, slot: int, delta: LoraDelta | None, base: nn.Module) -> None:
        if delta is None:
            self.clear(slot)
            return
        r = delta.rank
        if r > self.capacity:
            self._grow(r)
        A = delta.A.to(self.device, torch.float32)
        B = delta.B.to(self.device, torch.float32)
        if delta.magnitude is not None:
            g = dora_factor(base, self.shape, A, B, delta.scale, delta.magnitude.to(self.device, torch.float32))
            if self.G is None:
                self.G = torch.ones(self.A.shape[0], self.shape.d_out, dtype=self.dtype, device=self.device)
            self.G[slot] = g.to(self.dtype)
            B = B * g[:, None]  # the LoRA term is rescaled by the same factor
        elif self.G is not None:
            self.G[slot] = 1
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = A.to(self.dtype)
        self.B[slot, :, :r] = B.to(self.dtype)
        self.scale[slot] = delta.scale
        self.ranks[slot] = r
        self.dora[slot] = delta.magnitude is not None

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scale[slot] = 0
        if self.G is not None:
            self.G[slot] = 1
        self.ranks[slot] = 0
        self.dora[slot] = False


def fuse_storage(members: list[LoraSlots]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Put the members' A side by side in one [S, sum R, d_in] tensor; each member's A becomes a view of it.

    Modules that read the same input then shrink with one matmul. Returns the block and (offset, R) per member.
    """
    S, d_in = members[0].A.shape[0], members[0].shape.d_in
    block = torch.zeros(S, sum(m.capacity for m in members), d_in, dtype=members[0].dtype, device=members[0].device)
    parts, off = [], 0
    for m in members:
        cap = m.capacity
        block[:, off:off + cap] = m.A
        m.A = block[:, off:off + cap]
        parts.append((off, cap))
        off += cap
    return block, parts


def dora_factor(base: nn.Module, shape: LinearShape, A: torch.Tensor, B: torch.Tensor, scale: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output factor m / ||W + scale * B @ A|| (row norms over inputs), fixed since W is frozen."""
    W = base.weight.detach().to(torch.float32)
    if shape.conv1d:
        W = W.T  # Conv1D stores [d_in, d_out]
    norm = torch.linalg.vector_norm(W + scale * (B @ A), dim=1)  # [d_out]
    return magnitude / norm


class HeadSlots:
    """Slot tensors of the linear task heads: rows with different heads share these stacks."""

    def __init__(self, max_slots: int, hidden: int, dtype: torch.dtype, device):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.W = torch.zeros(max_slots, 0, hidden, dtype=dtype, device=device)  # [S, C, H]
        self.b = torch.zeros(max_slots, 0, dtype=dtype, device=device)  # [S, C]
        self.specs: list[HeadSpec | None] = [None] * max_slots

    def nbytes(self) -> int:
        return self.W.nbytes + self.b.nbytes

    def write(self, slot: int, head: HeadSpec | None) -> None:
        self.specs[slot] = head
        if head is None:
            return
        C = head.num_labels
        if C > self.W.shape[1]:
            S, old = self.W.shape[0], self.W.shape[1]
            W = torch.zeros(S, C, self.hidden, dtype=self.dtype, device=self.device)
            b = torch.zeros(S, C, dtype=self.dtype, device=self.device)
            W[:, :old], b[:, :old] = self.W, self.b
            self.W, self.b = W, b
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.W[slot, :C] = head.weight.to(self.device, self.dtype)
        self.b[slot, :C] = head.bias.to(self.device, self.dtype)


class SlotPool:
    """Which adapter sits in which slot; LRU eviction of idle slots; lazy per-module slot tensors."""

    def __init__(self, max_slots: int, max_rank: int, dtype: torch.dtype, device, hidden: int,
                 linears: dict[str, nn.Module], shapes: dict[str, LinearShape],
                 on_new_module: Callable[[str, LoraSlots], None]):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.max_slots, self.max_rank = max_slots, max_rank
        self.dtype, self.device = dtype, device
        self._linears, self._shapes = linears, shapes
        self._on_new_module = on_new_module
        self.lora: dict[str, LoraSlots] = {}
        self.heads = HeadSlots(max_slots, hidden, dtype, device)
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(max_slots - 1, -1, -1))
        self._pins: Counter[int] = Counter()
        self.loads = 0
        self.evictions = 0

    def slot_of(self, name: str) -> int | None:
        return self._resident.get(name)

    def resident(self) -> list[str]:
        return list(self._resident)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.lora.values()) + self.heads.nbytes()

    def acquire(self, specs: list[AdapterSpec]) -> dict[str, int]:
        """Make every adapter resident and pin it; returns name -> slot. At most max_slots distinct."""
        if len({s.name for s in specs}) > self.max_slots:
            raise ValueError(f"{len(specs)} adapters requested at once, only {self.max_slots} slots")
        out = {}
        for spec in specs:
            slot = self._resident.get(spec.name)
            if slot is None:
                slot = self._take_free_slot()
                self._write(slot, spec)
                self._resident[spec.name] = slot
                self.loads += 1
            self._resident.move_to_end(spec.name)
            self._pins[slot] += 1
            out[spec.name] = slot
        return out

    def release(self, slots) -> None:
        for slot in slots:
            self._pins[slot] -= 1
            if self._pins[slot] <= 0:
                del self._pins[slot]

    def drop(self, name: str) -> None:
        """Forget a resident adapter (its slot becomes free). Callers hold the engine lock."""
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._free.append(slot)

    def _take_free_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for name, slot in self._resident.items():  # oldest first
            if self._pins[slot] == 0:
                del self._resident[name]
                self.evictions += 1
                return slot
        raise RuntimeError("every slot is pinned by running batches")

    def _write(self, slot: int, spec: AdapterSpec) -> None:
        for module in spec.lora:
            if module not in self.lora:
                slots = LoraSlots(self._shapes[module], self.max_slots, self.max_rank, self.dtype, self.device,
                                  getattr(self._linears[module], "bias", None))
                self.lora[module] = slots
                self._on_new_module(module, slots)
        for module, slots in self.lora.items():
            slots.write(slot, spec.lora.get(module), self._linears[module])
        self.heads.write(slot, spec.head)
