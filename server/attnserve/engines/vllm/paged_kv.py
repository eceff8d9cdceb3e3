"""Reading requests' keys and values back from vLLM's paged KV cache, one gather per layer.

Both layouts keep, per (block, KV head), block_size keys and block_size values of head_dim
numbers each (kv_cache is [num_blocks, num_kv_heads, block_size, 2 * head_dim]); they differ in
how the keys sit inside that slot. The requests' blocks are read column by column of their
block tables, each cut at the longest request (blocks hold 128 tokens on the CPU: every later
operation would pay for the rest), straight from strided views of the cache, so only the numbers
used are copied, once. The result is right-padded: request b's keys at 0..seq_len_b-1, then
padding up to the longest. The engine's own kernel is the reference for both: tests recompute
rows from what these functions read and compare with the kernel's output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

#: Padding slots hold whatever a block's earlier owner left; made finite so that, masked out,
#: they weigh exactly 0 (0 * nan is nan). A planned request's own keys are finite already: every
#: step it runs in writes its keys through PlannedRowsMixin.do_kv_cache_update, which zeroes
#: non-finite numbers.
_FINITE = {"nan": 0.0, "posinf": 0.0, "neginf": 0.0}


@dataclass(frozen=True)
class KVSlots:
    """The cache blocks of B requests: the same for every layer of a step (one block table per
    KV cache group)."""

    #: (num_blocks, B) block ids, block table column by column, as many columns as the longest
    #: request needs (a shorter request's extra entries are its table's unused ones: valid ids,
    #: their contents masked out).
    columns: torch.Tensor
    seq_lens: tuple[int, ...]
    block_size: int

    @classmethod
    def of(cls, block_table: torch.Tensor, seq_lens: Sequence[int], block_size: int) -> KVSlots:
        """block_table (B, max_blocks): the requests' rows of the step's block table."""
        num_blocks = -(-max(seq_lens) // block_size)
        columns = block_table[:, :num_blocks].long().t().contiguous()
        return cls(columns=columns, seq_lens=tuple(seq_lens), block_size=block_size)

    def tokens_per_column(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Each column's (B,) block ids and how many of its tokens are read: a whole block but
        in the last column."""
        num_keys = max(self.seq_lens)
        for index, blocks in enumerate(self.columns):
            yield blocks, min(self.block_size, num_keys - index * self.block_size)


def read_cpu_vec(kv_cache: torch.Tensor, slots: KVSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU "vec" kernel: per (block, KV head), K^T [head_dim x block_size], then V
    [block_size x head_dim]. Returns k, v (B, num_kv_heads, max(seq_lens), head_dim),
    right-padded; k is a transposed view of a contiguous K^T, the layout matmuls read best."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    head_dim = width // 2
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, head_dim * block_size)
    keys_t = halves[:, :, 0].unflatten(-1, (head_dim, block_size))
    values = halves[:, :, 1].unflatten(-1, (block_size, head_dim))
    return _gather(keys_t, slots, token_dim=3).transpose(2, 3), _gather(values, slots, token_dim=2)


def read_flash(kv_cache: torch.Tensor, slots: KVSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's FlashAttention layout: per (block, KV head), block_size rows of [k | v]. Returns
    k, v (B, num_kv_heads, max(seq_lens), head_dim), right-padded. Written from vLLM's source;
    not yet run on a GPU."""
    width = kv_cache.shape[-1]
    rows = _gather(kv_cache, slots, token_dim=2)
    return rows[..., : width // 2], rows[..., width // 2 :]


def _gather(per_block: torch.Tensor, slots: KVSlots, token_dim: int) -> torch.Tensor:
    """(B, ...): per_block (num_blocks, ...) gathered column by column, each column cut at the
    tokens read from it along token_dim, joined along it; made finite in place."""
    parts = [
        per_block.narrow(token_dim, 0, count).index_select(0, blocks)
        for blocks, count in slots.tokens_per_column()
    ]
    gathered = parts[0] if len(parts) == 1 else torch.cat(parts, dim=token_dim)
    return gathered.nan_to_num_(**_FINITE)
