"""Reading requests' keys and values back from vLLM's paged KV cache, one gather per layer.

Both layouts keep, per (block, KV head), block_size keys and block_size values of head_dim
numbers each (kv_cache is [num_blocks, num_kv_heads, block_size, 2 * head_dim]); they differ in
how the keys sit inside that slot. Whole blocks are gathered, then cut at the longest request
(blocks hold 128 tokens on the CPU: every later operation would pay for the rest), so the result
is right-padded: request b's keys at 0..seq_len_b-1, then padding up to the longest. The
engine's own kernel is the reference for both: tests recompute rows from what these functions
read and compare with the kernel's output.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    #: (B, num_blocks) block ids, as many as the longest request needs (a shorter request's
    #: extra entries are its table's unused ones: valid ids, their contents masked out).
    blocks: torch.Tensor
    seq_lens: tuple[int, ...]

    @classmethod
    def of(cls, block_table: torch.Tensor, seq_lens: Sequence[int], block_size: int) -> KVSlots:
        """block_table (B, max_blocks): the requests' rows of the step's block table."""
        num_blocks = -(-max(seq_lens) // block_size)
        return cls(blocks=block_table[:, :num_blocks].long(), seq_lens=tuple(seq_lens))


def read_cpu_vec(kv_cache: torch.Tensor, slots: KVSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU "vec" kernel: per (block, KV head), K^T [head_dim x block_size], then V
    [block_size x head_dim]. Returns k, v (B, num_kv_heads, max(seq_lens), head_dim),
    right-padded; k is a transposed view of a contiguous K^T, the layout matmuls read best."""
    _, num_kv_heads, block_size, width = kv_cache.shape
    head_dim = width // 2
    batch, used = slots.blocks.shape
    num_keys = max(slots.seq_lens)
    halves = kv_cache.index_select(0, slots.blocks.flatten()).view(batch, used, num_kv_heads, 2, -1)
    keys_t = halves[:, :, :, 0].view(batch, used, num_kv_heads, head_dim, block_size)
    values = halves[:, :, :, 1].view(batch, used, num_kv_heads, block_size, head_dim)
    # (B, Hkv, D, blocks, block_size): block_size numbers move together, then seen as (B, Hkv, n, D)
    # (a view for one block); nan_to_num makes the one contiguous copy of the first num_keys.
    k_t = keys_t.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, head_dim, -1)
    v = values.transpose(1, 2).reshape(batch, num_kv_heads, -1, head_dim)
    k_t = k_t[..., :num_keys].nan_to_num(**_FINITE)
    return k_t.transpose(2, 3), v[:, :, :num_keys].nan_to_num(**_FINITE)


def read_flash(kv_cache: torch.Tensor, slots: KVSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's FlashAttention layout: per (block, KV head), block_size rows of [k | v]. Returns
    k, v (B, num_kv_heads, max(seq_lens), head_dim), right-padded. Written from vLLM's source;
    not yet run on a GPU."""
    _, num_kv_heads, _, width = kv_cache.shape
    batch, used = slots.blocks.shape
    blocks = kv_cache.index_select(0, slots.blocks.flatten()).view(batch, used, num_kv_heads, -1, width)
    rows = blocks.transpose(1, 2).reshape(batch, num_kv_heads, -1, width)[:, :, : max(slots.seq_lens)]
    rows = rows.nan_to_num(**_FINITE)
    return rows[..., : width // 2], rows[..., width // 2 :]
