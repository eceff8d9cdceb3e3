"""KeyEmphasis (PASTA): selected keys' probabilities times alpha, the row renormalised."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnserve.attention.operations.base import EmphasisTerm, KeyBias, Operation, Scope, Stage
from attnserve.attention.row_attention import RowAttention


@dataclass(frozen=True)
class KeyEmphasis(Operation):
    """PASTA: selected keys' probabilities times alpha, row renormalised: exactly the logit bias
    log alpha (docs/attention-math.md#identity-b)."""

    name = "key_emphasis"
    stage = Stage.BIAS

    alpha: float = 0.01

    @property
    def is_identity(self) -> bool:
        return self.alpha == 1.0

    def edit_bias(self, key_bias: KeyBias, scope: Scope, row: RowAttention) -> None:
        log_alpha = math.log(self.alpha) if self.alpha > 0 else float("-inf")
        key_bias.bias = torch.where(scope.logits, key_bias.bias + log_alpha, key_bias.bias)
        if self.alpha > 0:
            key_bias.emphasis.append(EmphasisTerm(scope.head_query, scope.keys, log_alpha))
