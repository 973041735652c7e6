"""BatchPlan: built once per forward from the rows' slot ids; every patched layer reads it.

Rows are reordered so that base rows (slot -1) come first and each adapter's rows are
contiguous (a segment); segments with the same number of rows are adjacent, forming
buckets that a kernel runs as one batched matmul.

An optional `group` per slot (an int: the engine gives one per adapter kind, e.g. IA3,
each bottleneck configuration, prompts, prefixes) orders segments first by group, so each
group's rows are one contiguous range (`ranges`) and buckets never cross a group boundary:
a layer that treats one kind of row reads one slice.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Bucket:
    """`n_seg` adjacent segments of `rows_per_seg` rows each, starting at sorted row `row0`."""

    row0: int
    rows_per_seg: int
    slots: tuple[int, ...]  # [n_seg] slot id per segment
    slot_index: torch.Tensor  # [n_seg] int64 on the model's device

    @property
    def n_seg(self) -> int:
        return len(self.slots)

    @property
    def row1(self) -> int:
        return self.row0 + self.n_seg * self.rows_per_seg


@dataclass(frozen=True)
class Segment:
    slot: int
    row0: int
    row1: int


@dataclass(frozen=True)
class BatchPlan:
    order: tuple[int, ...]  # [B] sorted position -> index of the row in the caller's list
    row_slots: tuple[int, ...]  # [B] slot id per sorted row, -1 = base model
    segments: tuple[Segment, ...]  # adapter rows only, in sorted order
    buckets: tuple[Bucket, ...]
    token_slots: torch.Tensor  # [B] int64 slot per sorted row (reference kernels expand it per token)
    ranges: dict = field(default_factory=dict, compare=False)  # group -> (row0, row1) of its rows, sorted order
    workspace: dict = field(default_factory=dict, compare=False)  # kernels' scratch buffers, kept by the engine

    @property
    def num_rows(self) -> int:
        return len(self.row_slots)

    @property
    def has_adapters(self) -> bool:
        return bool(self.segments)

    @classmethod
    def build(cls, slots: list[int], device: torch.device | str = "cpu", workspace: dict | None = None,
              group: dict[int, int] | None = None) -> "BatchPlan":
        counts = Counter(s for s in slots if s >= 0)
        group = group or {}
        # base rows first, then segments ordered by (group, row count, slot): equal-size segments adjoin
        rank = {s: i for i, s in enumerate(sorted(counts, key=lambda s: (group.get(s, 0), counts[s], s)))}
        order = sorted(range(len(slots)), key=lambda i: (-1 if slots[i] < 0 else rank[slots[i]], i))
        row_slots = tuple(slots[i] for i in order)
        segments, buckets = [], []
        row = sum(1 for s in slots if s < 0)
        for slot in sorted(counts, key=lambda s: rank[s]):
            segments.append(Segment(slot, row, row + counts[slot]))
            row += counts[slot]
        ranges: dict[int, tuple[int, int]] = {}
        for seg in segments:
            g = group.get(seg.slot, 0)
            ranges[g] = (ranges[g][0] if g in ranges else seg.row0, seg.row1)
        i = 0
        while i < len(segments):
            j = i
            size = segments[i].row1 - segments[i].row0
            g = group.get(segments[i].slot, 0)
            while (j < len(segments) and segments[j].row1 - segments[j].row0 == size
                   and group.get(segments[j].slot, 0) == g):
                j += 1
            seg_slots = tuple(s.slot for s in segments[i:j])
            index = torch.tensor(seg_slots, dtype=torch.long, device=device)
            buckets.append(Bucket(segments[i].row0, size, seg_slots, index))
            i = j
        return cls(
            order=tuple(order),
            row_slots=row_slots,
            segments=tuple(segments),
            buckets=tuple(buckets),
            token_slots=torch.tensor(row_slots, dtype=torch.long, device=device),
            workspace={} if workspace is None else workspace,
            ranges=ranges,
        )

    def buckets_in(self, row0: int, row1: int) -> list[Bucket]:
        """The buckets inside sorted rows [row0, row1) (a group's range never splits a bucket)."""
        return [b for b in self.buckets if b.row0 >= row0 and b.row1 <= row1]
