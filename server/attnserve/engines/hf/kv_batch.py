"""The running batch's KV cache: left-padded rows that join, leave and grow together."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class KVBatch:
    """A DynamicCache plus the 2-D attention mask of its rows (1 = real token).

    Row b's tokens occupy the last row_lengths[b] slots of the sequence axis; the slots before
    them are padding, masked out.
    """

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def row_lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def merge(self, other: KVBatch) -> None:
        """Append other's rows after ours, left-padding both to a common length."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop slots that are padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.shape[1] - mask.sum(dim=1)).min())  # padding shared by every row
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def extend_mask(self) -> None:
        """Account for one new token per row (the model appends its K/V to the cache)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
