"""Fused attention calls on one row (heads first, no batch dimension), with the log-sum-exp.

Shapes: q (H, L, D); k (Hkv, n, D) with H % Hkv == 0 (query head h reads kv head h // (H // Hkv),
so a per-head k, Hkv == H, serves any subset of heads);
bias broadcastable to (H, L, n), 0 / finite / -inf, added to scale * q . k.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

#: Logit elements materialised at once by the chunked passes.
CHUNK_ELEMENTS = 1 << 22


def logits(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Materialised scale * q . k (+ bias): (h, L, n) for q (h, L, D) and k (h / g, n, D).

    Each kv head serves g consecutive query heads: one matmul per kv head, no copy of K; a
    per-head bias is added by the same call.
    """
    num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys, _ = k.shape
    group = num_heads // num_kv_heads
    grouped_q = q.reshape(num_kv_heads, group * num_queries, head_dim)
    if bias is not None and bias.shape[:2] == (num_heads, num_queries):
        grouped_bias = bias.reshape(num_kv_heads, group * num_queries, num_keys)
        scores = torch.baddbmm(grouped_bias, grouped_q, k.transpose(-1, -2), alpha=scale)
        return scores.reshape(num_heads, num_queries, num_keys)
    scores = scale * (grouped_q @ k.transpose(-1, -2)).reshape(num_heads, num_queries, num_keys)
    return scores if bias is None else scores + bias


def logit_chunks(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(query slice, logits of those query rows), a few rows at a time."""
    num_heads, num_queries, _ = q.shape
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, num_heads * k.shape[1]))
    for start in range(0, num_queries, rows_per_chunk):
        rows = slice(start, min(num_queries, start + rows_per_chunk))
        yield rows, logits(q[:, rows], k, bias[:, rows], scale)


def chunked_logsumexp(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """(h, L) log-sum-exp of the logits, O(chunk * n) memory; works on every device."""
    parts = [torch.logsumexp(chunk, dim=-1) for _, chunk in logit_chunks(q, k, bias, scale)]
    return torch.cat(parts, dim=1)


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(scale * q . k + bias) @ values, values (Hkv, n, Dv) of any width; and the lse.

    The CPU flash kernel returns the lse with the output but wants one head size: zero columns
    appended to q and k leave every dot product unchanged, so everything is padded to the widest.
    Elsewhere SDPA gives the output and a chunked pass the lse. SDPA is slow on keys that are a
    transposed view (engines/vllm/paged_kv.py reads them so): with one query row per head (a
    decode step), those are materialised instead, as fast as SDPA at that size; longer rows get
    a contiguous copy.
    """
    if k.stride(-1) != 1:
        if q.shape[1] == 1:
            return _one_query_attention(q, k, values, bias, scale, with_lse)
        k = k.contiguous()
    head_dim, value_dim = q.shape[-1], values.shape[-1]
    q_in, k_in, values_in = q, k, values
    if value_dim != head_dim:
        width = max(head_dim, value_dim)
        q_in, k_in, values_in = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, values))
    mask = bias[None]
    if with_lse and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_in[None], k_in[None], values_in[None], attn_mask=mask, scale=scale
        )
        return out[0, ..., :value_dim], lse[0]
    out = F.scaled_dot_product_attention(
        q_in[None], k_in[None], values_in[None], attn_mask=mask, scale=scale, enable_gqa=True
    )[0, ..., :value_dim]
    lse = chunked_logsumexp(q, k, bias, scale) if with_lse else None
    return out, lse


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float, with_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused_attention for q (H, 1, D), whose one query sees at least one key."""
    scores = logits(q, k, bias.expand(q.shape[0], 1, -1), scale)
    if not with_lse:
        return weighted_values(torch.softmax(scores, dim=-1), values), None
    lse = torch.logsumexp(scores, dim=-1)
    return weighted_values(torch.exp(scores - lse[..., None]), values), lse


def weighted_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs @ values: (h, L, Dv) for probs (h, L, n) and values (h / g, n, Dv), each value head
    serving g consecutive query heads (as logits)."""
    num_heads, num_queries, num_keys = probs.shape
    num_kv_heads, _, value_dim = values.shape
    grouped = probs.reshape(num_kv_heads, -1, num_keys) @ values
    return grouped.reshape(num_heads, num_queries, value_dim)
