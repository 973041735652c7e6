"""The fast path for CPUs (and any torch device): one batched matmul per bucket of equal-size segments.

Rows are sorted by slot (see BatchPlan), so each adapter's tokens are one contiguous block.
A bucket of n segments x L tokens becomes x viewed as [n, L, d_in] and one bmm against the
n adapters' weights: read in place when the bucket's slots are consecutive, else gathered
once per bucket (one copy per distinct adapter, never per row). Modules that read the same
input keep their A's side by side in one tensor, so their shrink is one bmm that reads x once.
Cost follows the adapter weights the batch reads: base rows are skipped, and a bucket runs
at its own largest rank rather than the slot capacity.

`u` here is a list over buckets of [n, L, w] views (None where the bucket's rank is 0).
"""
from __future__ import annotations

import torch

from ..batch import Bucket, BatchPlan


def _slot_rows(t: torch.Tensor, bucket: Bucket, workspace: dict | None = None, role: str = "") -> torch.Tensor:
    """t[bucket's slots]: a view when the slots are consecutive, else one gather.

    A gather writes into `workspace[role]`, a buffer kept across forwards (the plan carries the
    engine's), so large gathers do not pay for fresh pages every time.
    """
    first, n = bucket.slots[0], bucket.n_seg
    if bucket.slots[-1] - first == n - 1:  # slots are sorted and distinct
        return t[first:first + n]
    if workspace is None:
        return t.index_select(0, bucket.slot_index)
    shape = (n,) + tuple(t.shape[1:])
    numel = n * t[0].numel()
    buf = workspace.get(role)
    if buf is None or buf.numel() < numel or buf.dtype != t.dtype or buf.device != t.device:
        buf = workspace[role] = torch.empty(numel, dtype=t.dtype, device=t.device)
    return torch.index_select(t, 0, bucket.slot_index, out=buf[:numel].view(shape))


# Buckets of at most this many scattered segments run as one mm per segment on the slot tensor itself
# (no gather); larger ones as one bmm over gathered weights. From benchmarks/results/kernels_cpu.md:
# a per-segment loop wins up to ~4 adapters per bucket, a batched matmul from ~16.
LOOP_MAX_SEGMENTS = 4


def _matmul_slots(lhs: torch.Tensor, t: torch.Tensor, bucket: Bucket, workspace: dict, role: str,
                  out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out[j] (+)= lhs[j] @ t[slot_j].T for the bucket's segments j. lhs: [n, M, K], t: [S, N, K] -> [n, M, N].

    Consecutive slots: one bmm on a view; a few scattered ones: one mm per segment; else gather + bmm.
    accumulate: add into `out` in place instead of overwriting it.
    """
    n = bucket.n_seg
    first = bucket.slots[0]
    if out is None:
        out = torch.empty(n, lhs.shape[1], t.shape[1], dtype=lhs.dtype, device=lhs.device)
    if n == 1 or (n <= LOOP_MAX_SEGMENTS and bucket.slots[-1] - first != n - 1):
        for j, slot in enumerate(bucket.slots):
            if accumulate:
                out[j].addmm_(lhs[j], t[slot].T)
            else:
                torch.mm(lhs[j], t[slot].T, out=out[j])
        return out
    rhs = _slot_rows(t, bucket, workspace, role).transpose(1, 2)
    return out.baddbmm_(lhs, rhs) if accumulate else torch.bmm(lhs, rhs, out=out)


def shrink(x: torch.Tensor, A: torch.Tensor, parts: list[tuple[int, int]], scales: list[torch.Tensor],
           ranks: list[list[int]], plan: BatchPlan, tpr: int) -> list[list[torch.Tensor | None]]:
    d_in = x.shape[-1]
    out: list[list[torch.Tensor | None]] = [[] for _ in parts]
    for bucket in plan.buckets:
        widths = [max(r[s] for s in bucket.slots) for r in ranks]
        if not any(widths):
            for u in out:
                u.append(None)
            continue
        n, L = bucket.n_seg, bucket.rows_per_seg * tpr
        # one member: only its bucket rank; several: the whole side-by-side block
        span = widths[0] if len(parts) == 1 else A.shape[1]
        t0 = bucket.row0 * tpr
        u_all = _matmul_slots(x[t0:t0 + n * L].view(n, L, d_in), A[:, :span], bucket, plan.workspace, "A")  # [n, L, span]
        for i, ((off, _), w) in enumerate(zip(parts, widths)):
            if w == 0:
                out[i].append(None)
                continue
            u = u_all[:, :, off:off + w]
            u.mul_(_slot_rows(scales[i], bucket).view(n, 1, 1))
            out[i].append(u)
    return out


def expand(y: torch.Tensor, u: list[torch.Tensor | None], B: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    d_out = y.shape[-1]
    for bucket, ub in zip(plan.buckets, u):
        if ub is None:
            continue
        n, L, w = ub.shape
        t0 = bucket.row0 * tpr
        _matmul_slots(ub, B[:, :, :w], bucket, plan.workspace, "B", out=y[t0:t0 + n * L].view(n, L, d_out),
                      accumulate=True)


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             ranks: list[int], plan: BatchPlan, tpr: int) -> None:
    """Same semantics as reference.add_lora."""
    [u] = shrink(x, A, [(0, A.shape[1])], [scale], [ranks], plan, tpr)
    expand(y, u, B, plan, tpr)


def rescale_output(y: torch.Tensor, bias: torch.Tensor | None, G: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    """Same semantics as reference.rescale_output: y[t] = G[s] * (y[t] - bias) + bias."""
    d_out = y.shape[-1]
    for bucket in plan.buckets:
        n, L = bucket.n_seg, bucket.rows_per_seg * tpr
        t0 = bucket.row0 * tpr
        ys = y[t0:t0 + n * L].view(n, L, d_out)
        g = _slot_rows(G, bucket).unsqueeze(1)  # [n, 1, d_out]
        if bias is None:
            ys.mul_(g)
        else:
            ys.sub_(bias).mul_(g).add_(bias)


def linear_expand(x: torch.Tensor, weight: torch.Tensor, conv1d: bool, u: list[torch.Tensor | None],
                  Bb: torch.Tensor, plan: BatchPlan, tpr: int) -> torch.Tensor:
    """Same semantics as reference.linear_expand, with the expand folded into the base matmul.

    The output is first written once by [1 | u] @ [bias | B].T per bucket with LoRA rows here (the bias
    rides in column 0 of the slot tensor, so the expand is one write, not a read-modify-write) and by
    the bias on each run of rows between them, then the base matmul accumulates into it (addmm with beta=1).
    """
    N, d_out = x.shape[0], Bb.shape[1]
    bias = Bb[0, :, 0]  # [d_out]
    y = output_buffer(plan.workspace, N, d_out, x)
    filled = 0  # rows [0, filled) are written; base rows come first, then buckets in row order
    for bucket, ub in zip(plan.buckets, u):
        if ub is None:
            continue
        n, L, w = ub.shape
        t0 = bucket.row0 * tpr
        if t0 > filled:
            y[filled:t0] = bias
        ones_u = torch.cat([ub.new_ones(n, L, 1), ub], dim=2)  # [n, L, 1 + w]
        _matmul_slots(ones_u, Bb[:, :, :1 + w], bucket, plan.workspace, "B", out=y[t0:t0 + n * L].view(n, L, d_out))
        filled = t0 + n * L
    if filled < N:
        y[filled:] = bias
    return y.addmm_(x, weight if conv1d else weight.T)


# Outputs of at least this many elements come from buffers kept across forwards (output_buffer).
POOLED_MIN_NUMEL = 1 << 20
POOLED_MAX_BUFFERS = 8


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # without it, every output is a new tensor


def _storage_users(t: torch.Tensor) -> int:
    """References to t's storage (tensors and views on it, plus the one this call makes)."""
    return _use_count(t.untyped_storage()._cdata)


def output_buffer(workspace: dict, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [n, d] tensor for a layer's output, like `like`'s dtype and device.

    A large output is taken from buffers kept in the workspace across forwards: fresh pages for a
    tensor of tens of MB cost about as much as writing it once. A buffer is handed out again only
    when nothing else holds its storage (every output earlier taken from it, and every view of one,
    is gone), so an output a caller keeps is never overwritten; otherwise this is a new tensor.
    """
    numel = n * d
    if numel < POOLED_MIN_NUMEL or _use_count is None:
        return like.new_empty(n, d)
    pool: list = workspace.setdefault("outputs", [])  # [(flat buffer, its storage users when free)]
    free = [i for i, (buf, users) in enumerate(pool)
            if buf.dtype == like.dtype and buf.device == like.device and _storage_users(buf) == users]
    fits = [i for i in free if pool[i][0].numel() >= numel]
    if fits:
        buf = pool[min(fits, key=lambda i: pool[i][0].numel())][0]  # the smallest that fits
        return buf[:numel].view(n, d)
    if len(pool) >= POOLED_MAX_BUFFERS and not free:
        return like.new_empty(n, d)
    buf = like.new_empty(numel)
    entry = (buf, _storage_users(buf))
    if len(pool) < POOLED_MAX_BUFFERS:
        pool.append(entry)
    else:
        pool[max(free, key=lambda i: pool[i][0].numel())] = entry  # the largest free one, too small: replaced
    return buf.view(n, d)
