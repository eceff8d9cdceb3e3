"""KeyMask: selected keys removed from attention."""

from __future__ import annotations

from dataclasses import dataclass

from attnserve.attention.operations.base import KeyBias, Operation, Scope, Stage
from attnserve.attention.row_attention import RowAttention


@dataclass(frozen=True)
class KeyMask(Operation):
    """Selected keys removed from attention; in self-attention a query always keeps its own key
    (cross-attention has none: masking every key of a query is refused)."""

    name = "key_mask"
    stage = Stage.BIAS
    removes_keys = True

    @property
    def is_identity(self) -> bool:
        return False

    def edit_bias(self, key_bias: KeyBias, scope: Scope, row: RowAttention) -> None:
        key_bias.bias = key_bias.bias.masked_fill(scope.logits & ~row.own_key, float("-inf"))
