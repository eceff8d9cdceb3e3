"""How a diffusion model's cross-attention splits over the parts of its prompt's text tokens: the
start token, the prompt's own tokens, and the end token with the padding after it
(docs/attention-math.md#cross-attention-share), in that order (metrics.PROMPT_PARTS labels
them). Pure torch."""

from __future__ import annotations

import torch


def prompt_part_shares(probs: torch.Tensor, num_prompt_tokens: int) -> torch.Tensor:
    """(3,): the mean over heads and query rows of the probability on the start token (position
    0), on the prompt's own tokens (1 .. n-2) and on the end token and the padding (n-1 ..), for
    probs (H, Lq, Lk) of one row and a prompt of n tokens with its start and end tokens."""
    mass = probs.float().mean(dim=(0, 1))
    end = num_prompt_tokens - 1
    return torch.stack([mass[:1].sum(), mass[1:end].sum(), mass[end:].sum()])
