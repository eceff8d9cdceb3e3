"""Next-token choice per row: greedy or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch

from ..base import NonFiniteOutput, SamplingConfig


def make_generator(config: SamplingConfig) -> torch.Generator | None:
    if config.temperature == 0:
        return None
    generator = torch.Generator()
    if config.seed is None:
        generator.seed()  # a fresh random seed, without reseeding torch's global generator
    else:
        generator.manual_seed(config.seed)
    return generator


def choose_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from one row's logits (V,), float32."""
    if config.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # finite logits over a tiny temperature overflow
        raise NonFiniteOutput("the sampling probabilities")
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
