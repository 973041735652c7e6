"""The paged KV cache: one preallocated key and one value tensor per layer, cut into fixed-size blocks.

A sequence owns a list of blocks (its block table); its token at cache position p lives at row
`blocks[p // block_size] * block_size + p % block_size` of every layer's tensors. The budget is
fixed when the cache is made and never grows: the scheduler waits or preempts when blocks run out.

Attention reads some positions it masks out (the padding of shorter block tables, the unwritten end of
a sequence's last block); a masked NaN would still poison the output (0 x NaN), so those must hold
finite values: padding reads `pad_block`, an extra block that stays zero, and freed blocks are zeroed
(a sequence whose adapter overflowed leaves NaN behind).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_tokens: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        if block_size < 1 or num_tokens < block_size:
            raise ValueError(f"the KV cache needs at least one block: {num_tokens} tokens, block size {block_size}")
        self.block_size = block_size
        self.num_blocks = num_tokens // block_size
        self.pad_block = self.num_blocks  # never handed out, always zero
        rows = (self.num_blocks + 1) * block_size
        # [layers, rows, kv_heads, head_dim]: one token's keys (or values) of one layer are one row
        self.keys = torch.zeros(num_layers, rows, kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low blocks first

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def bytes_per_token(self) -> int:
        return 2 * self.keys[:, 0].numel() * self.keys.element_size()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n free blocks, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        if blocks:
            index = torch.tensor(blocks, device=self.keys.device)
            for t in (self.keys, self.values):
                t.view(t.shape[0], -1, self.block_size, *t.shape[2:]).index_fill_(1, index, 0)
        self._free.extend(reversed(blocks))
        blocks.clear()

    def rows(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Cache rows of positions [start, stop) of a sequence with this block table."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, stop)]
