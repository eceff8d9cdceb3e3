"""A tiny random Llama with the "attnserve" attention, and labelled token-id examples for it."""

from __future__ import annotations

import pytest
import torch
from attnserve.calibration.objective import TokenizedExample
from attnserve.engines.hf import attention
from attnserve.spec.geometry import ModelGeometry
from transformers import LlamaConfig, LlamaForCausalLM

NUM_LAYERS = 4
NUM_HEADS = 4


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    attention.register()
    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attention.ATTN_IMPLEMENTATION,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_geometry() -> ModelGeometry:
    return ModelGeometry.causal_lm(num_layers=NUM_LAYERS, num_heads=NUM_HEADS, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="session")
def tiny_examples() -> list[TokenizedExample]:
    """Random prompts of 6..13 tokens; a single-token, a two-token and a three-token candidate."""
    generator = torch.Generator().manual_seed(3)
    examples = []
    for i in range(10):
        length = 6 + int(torch.randint(0, 8, (1,), generator=generator))
        prompt = tuple(torch.randint(1, 64, (length,), generator=generator).tolist())
        candidates = ((11,), (12, 13), (14, 15, 16))
        examples.append(TokenizedExample(prompt, candidates, answer=i % 3))
    return examples


def _greedy_reference(objective, candidates, rounds, per_round):
    """HeadHunter written naively: round by round, score every remaining head added to the chosen
    ones and keep the best k (the earlier candidate among equals). (chosen heads, each round's)."""
    chosen, history = [], []
    for _ in range(rounds):
        scored = []
        for index, head in enumerate(candidates):
            if head not in chosen:
                scored.append((-objective(set(chosen) | {head}), index, head))
        if not scored:
            break
        best = [head for _, _, head in sorted(scored)[:per_round]]
        history.append(best)
        chosen += best
    return chosen, history


@pytest.fixture(scope="session")
def greedy_reference():
    return _greedy_reference
