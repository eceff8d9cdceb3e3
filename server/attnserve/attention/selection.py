"""Which heads, query rows and keys of one row an operation acts on, as boolean tensors.

The same ops come back for every layer and step, so the masks are cached (callers must not
modify them in place).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from attnserve.attention.plan import KeySet, QueryRows


@lru_cache(maxsize=4096)
def key_selection(keys: KeySet, num_keys: int, num_prompt_tokens: int, device: torch.device) -> torch.Tensor:
    """(num_keys,) bool: the keys at positions 0..num_keys-1 that the KeySet selects."""
    positions = torch.arange(num_keys, device=device)
    is_prompt = positions < num_prompt_tokens
    if keys.ranges:
        in_ranges = torch.zeros(num_keys, dtype=torch.bool, device=device)
        for start, end in keys.ranges:
            in_ranges |= (positions >= start) & (positions < end)
    else:
        in_ranges = is_prompt
    selected = is_prompt & (in_ranges ^ keys.invert)
    if keys.include_generated:
        selected |= ~is_prompt
    return selected


@lru_cache(maxsize=4096)
def head_selection(heads: tuple[int, ...] | None, num_heads: int, device: torch.device) -> torch.Tensor:
    """(num_heads,) bool; None selects every head."""
    if heads is None:
        return torch.ones(num_heads, dtype=torch.bool, device=device)
    if any(h < 0 or h >= num_heads for h in heads):
        raise ValueError(f"head index out of range 0..{num_heads - 1}: {heads}")
    selected = torch.zeros(num_heads, dtype=torch.bool, device=device)
    selected[list(heads)] = True
    return selected


@lru_cache(maxsize=4096)
def query_selection(
    rows: QueryRows, last_query_only: bool, num_queries: int, device: torch.device
) -> torch.Tensor:
    """(num_queries,) bool over the row's valid query rows: those rows selects and, with
    last_query_only, only the last one (it predicts the next token)."""
    if rows.ranges:
        index = torch.arange(num_queries, device=device)
        selected = torch.zeros(num_queries, dtype=torch.bool, device=device)
        for start, end in rows.ranges:
            selected |= (index >= start) & (index < end)
    else:
        selected = torch.ones(num_queries, dtype=torch.bool, device=device)
    if rows.invert:
        selected = ~selected
    if last_query_only:
        selected[:-1] = False
    return selected
