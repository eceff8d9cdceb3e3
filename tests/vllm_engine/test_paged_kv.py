"""paged_kv reads back what vLLM's own CPU cache-write op stored: requests of different lengths
in shuffled blocks, gathered in one call, right-padded to the longest, the padding finite."""

from __future__ import annotations

import pytest
import torch
from attnserve.engines.vllm.paged_kv import KVSlots, read_cpu_vec
from vllm import _custom_ops as ops

NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM = 12, 3, 32, 64


def write_cpu_vec(kv_cache: torch.Tensor, key, value, slot_mapping) -> None:
    """vLLM's CPU backend's own write (CPUAttentionBackendImpl.do_kv_cache_update)."""
    caches = kv_cache.view(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE * 2, -1)
    key_cache, value_cache = caches.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        "vec",
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )


@pytest.mark.parametrize("seq_lens", [[1], [70, 5, 33, 64], [32, 31]])
def test_read_cpu_vec_gathers_every_request_right_padded(seq_lens):
    generator = torch.Generator().manual_seed(sum(seq_lens))
    kv_cache = torch.full((NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM), float("nan"))
    blocks = torch.randperm(NUM_BLOCKS, generator=generator)
    block_table = torch.zeros(len(seq_lens), 4, dtype=torch.int32)
    written = []
    for b, seq_len in enumerate(seq_lens):
        own = blocks[: -(-seq_len // BLOCK_SIZE)]
        blocks = blocks[len(own) :]
        block_table[b, : len(own)] = own
        tokens = torch.arange(seq_len)
        slot_mapping = own[tokens // BLOCK_SIZE] * BLOCK_SIZE + tokens % BLOCK_SIZE
        k = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        v = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        write_cpu_vec(kv_cache, k, v, slot_mapping)
        written.append((k.transpose(0, 1), v.transpose(0, 1)))

    slots = KVSlots.of(block_table, seq_lens, BLOCK_SIZE)
    k, v = read_cpu_vec(kv_cache, slots)

    assert k.shape == v.shape == (len(seq_lens), NUM_KV_HEADS, max(seq_lens), HEAD_DIM)
    assert k.transpose(2, 3).is_contiguous() and v.is_contiguous()
    for b, (own_k, own_v) in enumerate(written):
        assert torch.equal(k[b, :, : seq_lens[b]], own_k)
        assert torch.equal(v[b, :, : seq_lens[b]], own_v)
    # The slots nobody wrote hold NaN here; read back, they are finite (masked out, they must
    # weigh exactly 0 in the attention).
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
