"""HeadOutputScale: a head's attention output times a scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnserve.attention.operations.base import Operation, Scope, Stage
from attnserve.attention.row_attention import RowAttention


@dataclass(frozen=True)
class HeadOutputScale(Operation):
    """Multiplies the head's attention output by scale."""

    name = "head_output_scale"
    stage = Stage.OUTPUT

    scale: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0

    def edit_output(
        self, out: torch.Tensor, kept: torch.Tensor, scope: Scope, row: RowAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The map is left as it is; only its output is scaled (kept is unchanged).
        return torch.where(scope.head_query[:, :, None], out * self.scale, out), kept
