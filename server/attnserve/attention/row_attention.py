"""One row of the padded batch with its padding cut off, in float32 (or float64)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from attnserve.attention.layout import RowLayout


@dataclass
class RowAttention:
    """A request's keys at positions 0..n-1 and its L valid query rows: for self-attention the
    tokens at positions n-L..n-1, for cross-attention queries without a position among the keys.

    q (H, L, D); k, v (Hkv, n, D). Query row i of this object is query row Lq - L + i of the batch.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    layout: RowLayout

    @classmethod
    def from_batch(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int, layout: RowLayout, scale: float
    ) -> RowAttention:
        num_queries = layout.num_queries(q.shape[2], k.shape[2])
        dtype = torch.promote_types(q.dtype, torch.float32)
        return cls(
            q=q[row, :, q.shape[2] - num_queries :].to(dtype),
            k=k[row, :, layout.key_start :].to(dtype),
            v=v[row, :, layout.key_start :].to(dtype),
            scale=scale,
            layout=layout,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return self.layout.num_prompt_tokens

    @property
    def has_own_key(self) -> bool:
        return self.layout.has_own_key

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_queries(self) -> int:
        return self.q.shape[1]

    @property
    def num_keys(self) -> int:
        return self.k.shape[1]

    @cached_property
    def query_positions(self) -> torch.Tensor:
        """(L,) token position of each query row (self-attention only)."""
        self._require_own_key("query positions")
        return torch.arange(self.num_keys - self.num_queries, self.num_keys, device=self.device)

    @cached_property
    def key_positions(self) -> torch.Tensor:
        return torch.arange(self.num_keys, device=self.device)

    @cached_property
    def visible(self) -> torch.Tensor:
        """(L, n) whether query i sees key j (the layout's mask)."""
        return self.layout.visibility(self.num_queries, self.num_keys, self.device)

    @cached_property
    def visible_keys(self) -> torch.Tensor:
        """(L,) number of keys each query sees."""
        return self.visible.sum(dim=1)

    @cached_property
    def own_key(self) -> torch.Tensor:
        """(L, n) one-hot of each query's own key; all False for cross-attention (none)."""
        if not self.has_own_key:
            return torch.zeros(self.num_queries, self.num_keys, dtype=torch.bool, device=self.device)
        return self.key_positions[None, :] == self.query_positions[:, None]

    @cached_property
    def queries_per_key(self) -> torch.Tensor:
        """(n,) number of this call's query rows that see each key."""
        return self.visible.sum(dim=0)

    def queries_per_key_of(self, heads: torch.Tensor) -> torch.Tensor:
        """(1 or len(heads), n): queries_per_key as the given heads see it (every head alike here)."""
        return self.queries_per_key[None]

    def key_positions_of(self, heads: torch.Tensor) -> torch.Tensor:
        """(1 or len(heads), n): each key's token position as the given heads see it."""
        return self.key_positions[None]

    def _kv_heads(self, heads: torch.Tensor) -> torch.Tensor:
        return heads // (self.num_heads // self.k.shape[0])

    def _require_own_key(self, what: str) -> None:
        if not self.has_own_key:
            raise ValueError(f"{what} need each query's own key; a cross-attention row has none")

    def own_values(self) -> torch.Tensor:
        """(H, L, D) value of each query's own key."""
        self._require_own_key("own values")
        own = self.v[:, self.num_keys - self.num_queries :]
        return own.repeat_interleave(self.num_heads // self.k.shape[0], dim=0)

    def own_keys(self, heads: torch.Tensor) -> torch.Tensor:
        """(len(heads), L, D) key of each query's own token, for the given query heads."""
        self._require_own_key("own keys")
        return self.k[:, self.num_keys - self.num_queries :][self._kv_heads(heads)]

    def keys_of(self, heads: torch.Tensor) -> torch.Tensor:
        """Keys for kernels.logits with the queries of `heads` (sorted, unique): K itself when
        that is every head, else the heads' own copies."""
        return self.k if len(heads) == self.num_heads else self.k[self._kv_heads(heads)]

    def values_of(self, heads: torch.Tensor) -> torch.Tensor:
        """V for the given query heads, as keys_of gives K."""
        return self.v if len(heads) == self.num_heads else self.v[self._kv_heads(heads)]
