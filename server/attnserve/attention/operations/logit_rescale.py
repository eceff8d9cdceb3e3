"""LogitRescale (PAINT): selected logits s -> s + alpha * |s|."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnserve.attention.operations.base import Operation, Stage


@dataclass(frozen=True)
class LogitRescale(Operation):
    """PAINT: logits of selected keys s -> s + alpha * |s| (on the tempered logit)."""

    name = "logit_rescale"
    stage = Stage.LOGIT_REWRITE

    alpha: float = 0.7

    @property
    def is_identity(self) -> bool:
        return self.alpha == 0.0

    def rewrite_logits(self, logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        return torch.where(selected, logits + self.alpha * logits.abs(), logits)
