"""Temperature: logits divided by a temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnserve.attention.operations.base import LogitScales, Operation, Scope, Stage
from attnserve.attention.row_attention import RowAttention


@dataclass(frozen=True)
class Temperature(Operation):
    """Logits divided by temperature."""

    name = "temperature"
    stage = Stage.LOGIT_SCALE

    temperature: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0

    def scale_logits(self, scales: LogitScales, scope: Scope, row: RowAttention) -> None:
        inverse = 1.0 / self.temperature
        # On all of a query's keys it folds into the query.
        if scope.selects_every_key(row):
            scales.query_gain = torch.where(scope.head_query, scales.query_gain * inverse, scales.query_gain)
            return
        if scales.key_factor is None:
            scales.key_factor = torch.ones_like(row.visible, dtype=row.dtype).expand(row.num_heads, -1, -1)
        scales.key_factor = torch.where(scope.logits, scales.key_factor * inverse, scales.key_factor)
