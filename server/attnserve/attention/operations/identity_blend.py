"""IdentityBlend (PAG, SoftPAG): the attention map mixed with the identity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnserve.attention.operations.base import Operation, Scope, Stage
from attnserve.attention.row_attention import RowAttention


@dataclass(frozen=True)
class IdentityBlend(Operation):
    """SoftPAG: attention map (1 - weight) * A + weight * I, i.e. output (1-u) o_i + u v_i
    (docs/attention-math.md#identity-u). Self-attention only: I needs each query's own key."""

    name = "identity_blend"
    stage = Stage.OUTPUT
    needs_own_key = True

    weight: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.weight == 0.0

    def edit_output(
        self, out: torch.Tensor, kept: torch.Tensor, scope: Scope, row: RowAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        selected = scope.head_query
        out = torch.where(selected[:, :, None], (1 - self.weight) * out + self.weight * row.own_values(), out)
        return out, torch.where(selected, kept * (1 - self.weight), kept)
