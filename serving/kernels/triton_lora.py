"""Triton GPU kernels for the LoRA ops: the same functions and semantics as reference.py.

Rows are sorted by slot (BatchPlan), so each adapter's tokens are one contiguous run, a
segment. Both kernels run over (segment, token block) x (rank or output block): a program
loads its segment's slot id once and reads that slot's weights straight from the stacked
slot tensors (no gathered copies), only the first r rank columns of a rank-r slot, with
fp32 accumulation. Base rows (slot -1) come first in the plan and belong to no segment:
no program reads or writes them.

`u` here is a `Shrunk`: one fp32 [N, W] buffer shared by the members of a shrink group,
the member's first column in it, and the member's rank per segment (expand reads only
those columns). Per-plan device metadata (token-block and segment tables, per-segment
ranks) is built once per plan and kept in the plan's `__dict__` under "_triton".

On a CPU these kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how the tests check them without a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..batch import BatchPlan
from .cpu import rescale_output as _rescale_output


@dataclass(frozen=True)
class Shrunk:
    """One member's share of a group shrink: what expand needs besides y and B."""

    u: torch.Tensor  # [N, W] float32, the whole group's; member columns col0 : col0 + rank
    col0: int
    seg_rank: torch.Tensor  # [n_seg] int32 this member's rank per segment
    max_rank: int


@dataclass(frozen=True)
class _Segments:
    """Device tables of one plan at one tokens-per-row: segments and their token blocks."""

    block_t: int
    n_blk: int
    blk_seg: torch.Tensor  # [n_blk] int32 segment of each token block
    blk_t0: torch.Tensor  # [n_blk] int32 first token of each block
    seg_slot: torch.Tensor  # [n_seg] int32 slot id of each segment
    seg_t1: torch.Tensor  # [n_seg] int32 one past each segment's last token


def _cache(plan: BatchPlan) -> dict:
    return vars(plan).setdefault("_triton", {})  # BatchPlan is frozen; its __dict__ still takes a cache


def _segments(plan: BatchPlan, tpr: int, device: torch.device) -> _Segments:
    key = ("segments", device, tpr)
    cache = _cache(plan)
    if key not in cache:
        longest = max((s.row1 - s.row0) * tpr for s in plan.segments)
        block_t = 16 if longest <= 16 else 32 if longest <= 32 else 64
        blk_seg, blk_t0 = [], []
        for j, s in enumerate(plan.segments):
            starts = range(s.row0 * tpr, s.row1 * tpr, block_t)
            blk_seg.extend([j] * len(starts))
            blk_t0.extend(starts)
        n_blk, n_seg = len(blk_seg), len(plan.segments)
        table = torch.tensor(blk_seg + blk_t0 + [s.slot for s in plan.segments] + [s.row1 * tpr for s in plan.segments],
                             dtype=torch.int32).to(device)  # one copy to the device
        cache[key] = _Segments(block_t, n_blk, table[:n_blk], table[n_blk:2 * n_blk],
                               table[2 * n_blk:2 * n_blk + n_seg], table[2 * n_blk + n_seg:])
    return cache[key]


def _members(plan: BatchPlan, parts: list[tuple[int, int]], ranks: list[list[int]],
             device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """[M, 1 + n_seg] int32: each member's first column, then its rank per segment; and each member's max rank."""
    seg_ranks = tuple(tuple(r[s.slot] for s in plan.segments) for r in ranks)
    key = ("members", device, tuple(parts), seg_ranks)
    cache = _cache(plan)
    if key not in cache:
        for (off, cap), rs in zip(parts, seg_ranks):
            if max(rs) > cap:
                raise ValueError(f"a slot's rank {max(rs)} exceeds the member's capacity {cap}")
        rows = [[off, *rs] for (off, _), rs in zip(parts, seg_ranks)]
        cache[key] = (torch.tensor(rows, dtype=torch.int32).to(device), [max(rs) for rs in seg_ranks])
    return cache[key]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    # fp32 matches torch's default fp32 matmul (no TF32); 16-bit inputs use the tensor cores either way
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------- shrink


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, scale_ptr, u_ptr,
    blk_seg_ptr, blk_t0_ptr, seg_slot_ptr, seg_t1_ptr, member_ptr,
    d_in, n_rblocks, member_stride,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_sm, stride_ut,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Semantics: u[t, c0 + j] = sum_k x[t, k] * A[s, c0 + j, k] * scale_m[s] for j < rank_m[s].

    Program (token block, member m x rank block, K split): t runs over the block's tokens of
    one segment, s is the segment's slot, c0 = member m's first column. Rank blocks at or
    beyond the slot's rank return at once; columns beyond it are masked (never loaded).
    """
    blk = tl.program_id(0)
    m = tl.program_id(1) // n_rblocks
    r0 = (tl.program_id(1) % n_rblocks) * BLOCK_R
    seg = tl.load(blk_seg_ptr + blk)
    rank = tl.load(member_ptr + m * member_stride + 1 + seg)
    if r0 >= rank:
        return
    col0 = tl.load(member_ptr + m * member_stride)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    t0 = tl.load(blk_t0_ptr + blk)
    t1 = tl.load(seg_t1_ptr + seg)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(2) * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    t_mask = offs_t < t1
    r_mask = offs_r < rank
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_k[None, :] * stride_xk  # [BLOCK_T, BLOCK_K]
    # A[s, col0 + r, k] as a [BLOCK_K, BLOCK_R] tile
    a_ptrs = a_ptr + slot * stride_as + (col0 + offs_r)[None, :] * stride_ar + offs_k[:, None] * stride_ak
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            xk = tl.load(x_ptrs, mask=t_mask[:, None], other=0.0)
            ak = tl.load(a_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k + k < d_in
            xk = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            ak = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.dot(xk.to(ak.dtype), ak, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc *= tl.load(scale_ptr + m * stride_sm + slot).to(tl.float32)
    u_ptrs = u_ptr + offs_t[:, None].to(tl.int64) * stride_ut + (col0 + offs_r)[None, :]
    mask = t_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(u_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(u_ptrs, acc, mask=mask)


INTERPRETED = not isinstance(_shrink_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


def shrink(x: torch.Tensor, A: torch.Tensor, parts: list[tuple[int, int]], scales: list[torch.Tensor],
           ranks: list[list[int]], plan: BatchPlan, tpr: int) -> list[Shrunk]:
    """One shrink for modules that read the same input x; one launch for the whole group.

    Semantics: u_i[t] = x[t] @ A[s, off_i:off_i + cap_i].T * scales[i][s] for s = slot of t's row,
    s != -1, computed only for the first ranks[i][s] columns (the rest of A is zero anyway).
    x: [N, d_in]; A: [S, W, d_in] (any strides); parts[i] = (off_i, cap_i); scales[i]: [S];
    ranks[i]: rank per slot. Returns one `Shrunk` per member.
    """
    return _shrink(x, A, parts, scales, ranks, plan, tpr)


def _shrink(x, A, parts, scales, ranks, plan, tpr, split_k: int | None = None) -> list[Shrunk]:
    """shrink, with the K split chosen here (None: by occupancy on CUDA, 1 elsewhere); tests force it."""
    N, d_in = x.shape
    W = A.shape[1]
    if not plan.segments:
        empty = torch.zeros(0, dtype=torch.int32, device=x.device)
        u = torch.empty(N, W, dtype=torch.float32, device=x.device)
        return [Shrunk(u, off, empty, 0) for off, _ in parts]
    members, max_ranks = _members(plan, parts, ranks, x.device)
    r_max = max(max_ranks)
    if r_max == 0:  # no segment has this group's modules adapted: nothing to compute or read
        u = torch.empty(N, W, dtype=torch.float32, device=x.device)
        return [Shrunk(u, off, members[i, 1:], 0) for i, (off, _) in enumerate(parts)]
    seg = _segments(plan, tpr, x.device)
    M = len(parts)
    block_r = _pow2(r_max, 16, 64)
    n_rblocks = triton.cdiv(r_max, block_r)
    block_k = _pow2(d_in, 16, 64 if A.dtype == torch.float32 else 128)
    if split_k is None:
        split_k = 1
        if x.is_cuda:  # too few programs to keep every SM reading: split the reduction over d_in
            programs, target = seg.n_blk * M * n_rblocks, 4 * _sm_count(x.device.index or 0)
            while programs * split_k * 2 <= target and d_in // (split_k * 2) >= 4 * block_k:
                split_k *= 2
    k_per_split = triton.cdiv(triton.cdiv(d_in, split_k), block_k) * block_k
    u = (torch.zeros if split_k > 1 else torch.empty)(N, W, dtype=torch.float32, device=x.device)
    scale = scales[0] if M == 1 else torch.stack(scales)  # [S] or [M, S]
    grid = (seg.n_blk, M * n_rblocks, split_k)
    _shrink_kernel[grid](
        x, A, scale, u,
        seg.blk_seg, seg.blk_t0, seg.seg_slot, seg.seg_t1, members,
        d_in, n_rblocks, members.stride(0),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), 0 if M == 1 else scale.stride(0), u.stride(0),
        BLOCK_T=seg.block_t, BLOCK_R=block_r, BLOCK_K=block_k, K_PER_SPLIT=k_per_split, SPLIT_K=split_k,
        EVEN_K=k_per_split * split_k == d_in, PRECISION=_precision(A.dtype),
        num_warps=4, num_stages=3,
    )
    return [Shrunk(u, off, members[i, 1:], r) for i, ((off, _), r) in enumerate(zip(parts, max_ranks))]

# ---------------------------------------------------------------- expand


@triton.jit
def _expand_kernel(
    u_ptr, b_ptr, y_ptr,
    blk_seg_ptr, blk_t0_ptr, seg_slot_ptr, seg_t1_ptr, rank_ptr,
    d_out, u_col0,
    stride_ut, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Semantics: y[t, n] += sum_{j < rank[s]} u[t, c0 + j] * B[s, n, j], in place.

    Program (token block, output block): t runs over the block's tokens of one segment, s is
    the segment's slot. A rank-0 segment returns at once; B columns beyond the rank are never loaded.
    """
    blk = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + blk)
    rank = tl.load(rank_ptr + seg)
    if rank == 0:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    t0 = tl.load(blk_t0_ptr + blk)
    t1 = tl.load(seg_t1_ptr + seg)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < t1
    n_mask = offs_n < d_out
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        u_ptrs = u_ptr + offs_t[:, None].to(tl.int64) * stride_ut + (u_col0 + offs_r)[None, :]  # [BLOCK_T, BLOCK_R]
        # B[s, n, r] as a [BLOCK_R, BLOCK_N] tile
        b_ptrs = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        uk = tl.load(u_ptrs, mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        bk = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(uk.to(bk.dtype), bk, input_precision=PRECISION)
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_n[None, :] * stride_yn
    mask = t_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def expand(y: torch.Tensor, u: Shrunk, B: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    """y: [N, d_out] += u @ B[s].T with B: [S, d_out, R] (any strides), in place, skipping base rows.

    Semantics: y[t] += u[t, :r] @ B[s, :, :r].T for s = slot of t's row, r = the slot's rank, s != -1.
    """
    if u.max_rank == 0:
        return
    seg = _segments(plan, tpr, y.device)
    d_out = y.shape[1]
    block_n = _pow2(d_out, 16, 128)
    grid = (seg.n_blk, triton.cdiv(d_out, block_n))
    _expand_kernel[grid](
        u.u, B, y,
        seg.blk_seg, seg.blk_t0, seg.seg_slot, seg.seg_t1, u.seg_rank,
        d_out, u.col0,
        u.u.stride(0), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        BLOCK_T=seg.block_t, BLOCK_N=block_n, BLOCK_R=_pow2(u.max_rank, 16, 64), PRECISION=_precision(B.dtype),
        num_warps=4, num_stages=2,
    )


# ---------------------------------------------------------------- compositions


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             ranks: list[int], plan: BatchPlan, tpr: int) -> None:
    """Semantics: y[t] += (x[t] @ A[s].T) @ B[s].T * scale[s] for s = slot of t's row, skipping s = -1."""
    [u] = shrink(x, A, [(0, A.shape[1])], [scale], [ranks], plan, tpr)
    expand(y, u, B, plan, tpr)


def linear_expand(x: torch.Tensor, weight: torch.Tensor, conv1d: bool, u: Shrunk, Bb: torch.Tensor,
                  plan: BatchPlan, tpr: int) -> torch.Tensor:
    """Semantics: the base layer plus expand: y = x @ W.T + bias (cuBLAS), then y[t] += u[t] @ B[s].T (Triton),
    with Bb[s] = [bias | B[s]] as in reference.linear_expand.

    weight: [d_out, d_in] (nn.Linear) or [d_in, d_out] (GPT-2 Conv1D, conv1d=True). Returns y: [N, d_out].
    """
    y = torch.addmm(Bb[0, :, 0], x, weight if conv1d else weight.T)
    expand(y, u, Bb[:, :, 1:], plan, tpr)
    return y


def rescale_output(y: torch.Tensor, bias: torch.Tensor | None, G: torch.Tensor, plan: BatchPlan, tpr: int) -> None:
    """Same semantics as reference.rescale_output (DoRA): y[t] = G[s] * (y[t] - bias) + bias; torch ops per bucket."""
    _rescale_output(y, bias, G, plan, tpr)
