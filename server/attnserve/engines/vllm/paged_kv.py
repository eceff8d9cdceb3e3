"""Reading one request's keys and values back from vLLM's paged KV cache.

Both layouts keep, per (block, KV head), block_size keys and block_size values of head_dim
numbers each (kv_cache is [num_blocks, num_kv_heads, block_size, 2 * head_dim]); they differ in
how the keys sit inside that slot. The engine's own kernel is the reference for both: tests
recompute rows from what these functions read and compare with the kernel's output.
"""

from __future__ import annotations

import torch


def read_cpu_vec(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU "vec" kernel: per (block, KV head), K^T [head_dim x block_size], then V
    [block_size x head_dim]. Returns k, v (num_kv_heads, seq_len, head_dim)."""
    _, num_kv_heads, block_size, width = kv_cache.shape
    head_dim = width // 2
    blocks = kv_cache.index_select(0, _used_blocks(block_ids, seq_len, block_size))
    slots = blocks.reshape(len(blocks), num_kv_heads, 2, block_size * head_dim)
    k = slots[:, :, 0].reshape(-1, num_kv_heads, head_dim, block_size).permute(1, 0, 3, 2)
    v = slots[:, :, 1].reshape(-1, num_kv_heads, block_size, head_dim).transpose(0, 1)
    return _sequence(k, seq_len), _sequence(v, seq_len)


def read_flash(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's FlashAttention layout: per (block, KV head), block_size rows of [k | v]. Returns
    k, v (num_kv_heads, seq_len, head_dim). Written from vLLM's source; not yet run on a GPU."""
    block_size, head_dim = kv_cache.shape[2], kv_cache.shape[3] // 2
    blocks = kv_cache.index_select(0, _used_blocks(block_ids, seq_len, block_size)).transpose(0, 1)
    return _sequence(blocks[..., :head_dim], seq_len), _sequence(blocks[..., head_dim:], seq_len)


def _used_blocks(block_ids: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    return block_ids[: -(-seq_len // block_size)].to(torch.long)


def _sequence(per_block: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(Hkv, num_blocks, block_size, D) -> (Hkv, seq_len, D)."""
    num_kv_heads, _, _, head_dim = per_block.shape
    return per_block.reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
