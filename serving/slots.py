"""Slots: adapter weights resident in preallocated, fixed-shape stacked tensors on the model's device.

For each adapted module, `A[S, R, d_in]`, `B[S, d_out, R]`, `scale[S]` (and `G[S, d_out]`
once a DoRA adapter lands there); B is stored as the last R columns of `Bb[S, d_out, 1 + R]`,
whose column 0 holds the base layer's bias, so one matmul writes bias + delta. IA3 vectors,
bottleneck weights, prompt and prefix tensors and heads have their own stacks below. Slot tensors
exist only for the modules some loaded adapter adapts; their rank capacity R grows to the
largest rank loaded (up to max_rank). `SlotPool` maps adapter names to slot ids, LRU.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Callable

import torch
from torch import nn

from adapters_store import AdapterSpec, Bottleneck, HeadSpec, Ia3Vector, LinearShape, LoraDelta


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class LoraSlots:
    """Slot tensors of one adapted linear module."""

    def __init__(self, shape: LinearShape, max_slots: int, max_rank: int, dtype: torch.dtype, device,
                 bias: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        self.shape, self.max_rank = shape, max_rank
        self.weight, self.bias = weight, bias  # the base layer's own (never written)
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


class Ia3Slots:
    """IA3 vectors of one linear module: vin[S, d_in] scales inputs, vout[S, d_out] outputs; 1 where unused."""

    def __init__(self, shape: LinearShape, max_slots: int, dtype: torch.dtype, device):
        self.shape = shape
        self.vin = torch.ones(max_slots, shape.d_in, dtype=dtype, device=device)  # [S, d_in]
        self.vout = torch.ones(max_slots, shape.d_out, dtype=dtype, device=device)  # [S, d_out]
        self.on_input = [False] * max_slots
        self.on_output = [False] * max_slots

    def nbytes(self) -> int:
        return self.vin.nbytes + self.vout.nbytes

    def write(self, slot: int, vec: Ia3Vector | None) -> None:
        self.vin[slot] = 1
        self.vout[slot] = 1
        self.on_input[slot] = vec is not None and vec.on_input
        self.on_output[slot] = vec is not None and not vec.on_input
        if vec is not None:
            (self.vin if vec.on_input else self.vout)[slot] = vec.scale.to(self.vin.device, self.vin.dtype)


class BottleneckSlots:
    """Bottleneck adapters at one residual sub-layer: down[S, M, H], up[S, H, M] and per-slot vectors.

    The capacity M grows to the largest bottleneck loaded here (up to max_size); unused columns are
    zero, so a smaller adapter's extra units contribute nothing.
    """

    def __init__(self, hidden: int, max_slots: int, max_size: int, dtype: torch.dtype, device):
        self.hidden, self.max_size, self.dtype, self.device = hidden, max_size, dtype, device
        S, H = max_slots, hidden
        self.down = torch.zeros(S, 0, H, dtype=dtype, device=device)  # [S, M, H]
        self.down_b = torch.zeros(S, 0, dtype=dtype, device=device)  # [S, M]
        self.up = torch.zeros(S, H, 0, dtype=dtype, device=device)  # [S, H, M]
        self.up_b = torch.zeros(S, H, dtype=dtype, device=device)  # [S, H]
        self.scaling = torch.zeros(S, H, dtype=dtype, device=device)  # [S, H]
        self.ln = torch.zeros(S, 4, H, dtype=dtype, device=device)  # [S, (before w, before b, after w, after b), H]
        self.specs: list[Bottleneck | None] = [None] * S

    @property
    def capacity(self) -> int:
        return self.down.shape[1]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.down, self.down_b, self.up, self.up_b, self.scaling, self.ln))

    def _grow(self, size: int) -> None:
        new = max(8, _round_up(size, 8))
        S, M, H = self.down.shape[0], self.capacity, self.hidden
        down = torch.zeros(S, new, H, dtype=self.dtype, device=self.device)
        down_b = torch.zeros(S, new, dtype=self.dtype, device=self.device)
        up = torch.zeros(S, H, new, dtype=self.dtype, device=self.device)
        down[:, :M], down_b[:, :M], up[:, :, :M] = self.down, self.down_b, self.up
        self.down, self.down_b, self.up = down, down_b, up

    def write(self, slot: int, bn: Bottleneck | None) -> None:
        self.specs[slot] = bn
        for t in (self.down, self.down_b, self.up, self.up_b, self.scaling, self.ln):
            t[slot].zero_()
        if bn is None:
            return
        if bn.size > self.capacity:
            self._grow(bn.size)
        m, dev, dt = bn.size, self.device, self.dtype
        self.down[slot, :m] = bn.down.to(dev, dt)
        self.down_b[slot, :m] = bn.down_bias.to(dev, dt)
        self.up[slot, :, :m] = bn.up.to(dev, dt)
        self.up_b[slot] = bn.up_bias.to(dev, dt)
        self.scaling[slot] = bn.scaling.to(dev, dt)
        for i, ln in enumerate((bn.ln_before, bn.ln_after)):
            if ln is not None:
                self.ln[slot, 2 * i] = ln[0].to(dev, dt)
                self.ln[slot, 2 * i + 1] = ln[1].to(dev, dt)


class VirtualTokenSlots:
    """Prompt embeddings [S, P, H] or prefix keys/values [S, layers, 2, kv_heads, P, head_dim]; P grows."""

    def __init__(self, shape: tuple[int, ...], max_slots: int, dtype: torch.dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, device  # shape of one slot with P = 0 at `axis`
        self.axis = 0 if len(shape) == 2 else 3  # axis of P in the per-slot tensor
        self.data = torch.zeros(max_slots, *shape, dtype=dtype, device=device)
        self.lengths = [0] * max_slots

    @property
    def capacity(self) -> int:
        return self.data.shape[self.axis + 1]

    def nbytes(self) -> int:
        return self.data.nbytes

    def write(self, slot: int, tensor: torch.Tensor | None) -> None:
        """tensor: [n, H] prompt, or [layers, 2, kv_heads, n, head_dim] prefix."""
        n = 0 if tensor is None else tensor.shape[self.axis]
        if n > self.capacity:
            shape = list(self.data.shape)
            shape[self.axis + 1] = max(8, _round_up(n, 8))
            data = torch.zeros(shape, dtype=self.dtype, device=self.device)
            data.narrow(self.axis + 1, 0, self.capacity).copy_(self.data)
            self.data = data
        self.data[slot].zero_()
        if tensor is not None:
            self.data[slot].narrow(self.axis, 0, n).copy_(tensor.to(self.device, self.dtype))
        self.lengths[slot] = n


class HeadSlots:
    """Task heads per slot, on the model's device: (hidden layers, final weight, final bias) each."""

    def __init__(self, max_slots: int, hidden: int, dtype: torch.dtype, device):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.specs: list[HeadSpec | None] = [None] * max_slots
        self.tensors: list[tuple | None] = [None] * max_slots  # (((W, b), ...), W_out, b_out)

    def nbytes(self) -> int:
        total = 0
        for entry in self.tensors:
            if entry is not None:
                total += sum(W.nbytes + b.nbytes for W, b in entry[0]) + entry[1].nbytes + entry[2].nbytes
        return total

    def write(self, slot: int, head: HeadSpec | None) -> None:
        self.specs[slot] = head
        if head is None:
            self.tensors[slot] = None
            return
        dev, dt = self.device, self.dtype
        layers = tuple((W.to(dev, dt), b.to(dev, dt)) for W, b in head.hidden_layers)
        self.tensors[slot] = (layers, head.weight.to(dev, dt), head.bias.to(dev, dt))


class SlotPool:
    """Which adapter sits in which slot; LRU eviction of idle slots; lazy per-module slot tensors.

    Slot tensors of each kind exist only once some loaded adapter needs them: `lora` and `ia3`
    per linear module, `bottleneck` per residual sub-layer, one `prompt` and one `prefix` stack.
    `on_new(kind, name, slots)` is told when one is created (the engine hooks the module then).
    """

    def __init__(self, max_slots: int, max_rank: int, dtype: torch.dtype, device, hidden: int,
                 linears: dict[str, nn.Module], shapes: dict[str, LinearShape],
                 on_new: Callable[[str, str, object], None], *, max_bottleneck: int = 256,
                 prefix_shape: tuple[int, int, int] = (0, 0, 0)):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.max_slots, self.max_rank, self.max_bottleneck = max_slots, max_rank, max_bottleneck
        self.dtype, self.device, self.hidden = dtype, device, hidden
        self._linears, self._shapes = linears, shapes
        self._on_new = on_new
        self._prefix_shape = prefix_shape  # (layers, kv_heads, head_dim)
        self.lora: dict[str, LoraSlots] = {}
        self.ia3: dict[str, Ia3Slots] = {}
        self.bottleneck: dict[str, BottleneckSlots] = {}
        self.prompt: VirtualTokenSlots | None = None
        self.prefix: VirtualTokenSlots | None = None
        self.heads = HeadSlots(max_slots, hidden, dtype, device)
        self.specs: list[AdapterSpec | None] = [None] * max_slots
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(max_slots - 1, -1, -1))
        self._pins: Counter[int] = Counter()
        self._orphans: set[int] = set()  # dropped while pinned: not resident, not free yet
        self.loads = 0
        self.evictions = 0

    def slot_of(self, name: str) -> int | None:
        return self._resident.get(name)

    def resident(self) -> list[str]:
        return list(self._resident)

    def nbytes(self) -> int:
        stacks = [*self.lora.values(), *self.ia3.values(), *self.bottleneck.values(), self.heads]
        stacks += [v for v in (self.prompt, self.prefix) if v is not None]
        return sum(m.nbytes() for m in stacks)

    def acquire(self, specs: list[AdapterSpec]) -> dict[str, int]:
        """Make every adapter resident and pin it; returns name -> slot. At most max_slots distinct."""
        if len({s.name for s in specs}) > self.max_slots:
            raise ValueError(f"{len(specs)} adapters requested at once, only {self.max_slots} slots")
        out = {}
        for spec in specs:
            slot = self._resident.get(spec.name)
            if slot is None:
                slot = self._take_free_slot()
                try:
                    self._write(slot, spec)
                except BaseException:
                    self._free.append(slot)  # never leaked: the next adapter written there overwrites it all
                    raise
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
                if slot in self._orphans:  # dropped while pinned: free now
                    self._orphans.discard(slot)
                    self._free.append(slot)

    def drop(self, name: str) -> None:
        """Forget a resident adapter (its slot becomes free). Callers hold the engine lock.
        A slot still pinned (a generating sequence runs on it) is freed when its last pin goes."""
        slot = self._resident.pop(name, None)
        if slot is None:
            return
        if self._pins[slot] > 0:
            self._orphans.add(slot)
        else:
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
        S = self.max_slots
        for module in spec.lora:
            if module not in self.lora:
                slots = LoraSlots(self._shapes[module], S, self.max_rank, self.dtype, self.device,
                                  getattr(self._linears[module], "bias", None), self._linears[module].weight)
                self.lora[module] = slots
                self._on_new("lora", module, slots)
        for module in spec.ia3:
            if module not in self.ia3:
                self.ia3[module] = Ia3Slots(self._shapes[module], S, self.dtype, self.device)
                self._on_new("ia3", module, self.ia3[module])
        for sub in spec.bottleneck:
            if sub not in self.bottleneck:
                self.bottleneck[sub] = BottleneckSlots(self.hidden, S, self.max_bottleneck, self.dtype, self.device)
                self._on_new("bottleneck", sub, self.bottleneck[sub])
        if spec.prompt is not None and self.prompt is None:
            self.prompt = VirtualTokenSlots((0, self.hidden), S, self.dtype, self.device)
        if spec.prefix is not None and self.prefix is None:
            layers, kv_heads, head_dim = self._prefix_shape
            self.prefix = VirtualTokenSlots((layers, 2, kv_heads, 0, head_dim), S, self.dtype, self.device)
            self._on_new("prefix", "", self.prefix)
        for module, slots in self.lora.items():
            slots.write(slot, spec.lora.get(module), self._linears[module])
        for module, ia3 in self.ia3.items():
            ia3.write(slot, spec.ia3.get(module))
        for sub, bn in self.bottleneck.items():
            bn.write(slot, spec.bottleneck.get(sub))
        if self.prompt is not None:
            self.prompt.write(slot, spec.prompt)
        if self.prefix is not None:
            self.prefix.write(slot, spec.prefix)
        self.heads.write(slot, spec.head)
        self.specs[slot] = spec
