"""Next-token choice: greedy, seeded sampling, temperature, top-k and top-p."""

from __future__ import annotations

import math

import pytest
import torch
from attnserve.engines.base import NonFiniteOutput, SamplingConfig
from attnserve.engines.hf.sampling import choose_token, make_generator

VOCAB = 64


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits: torch.Tensor, config: SamplingConfig, count: int) -> list[int]:
    generator = make_generator(config)
    return [choose_token(logits, config, generator) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = random_logits(seed)
    config = SamplingConfig(temperature=0.0)
    assert make_generator(config) is None
    assert choose_token(logits, config, None) == int(torch.argmax(logits))


def test_greedy_ignores_top_k_and_top_p():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9])
    assert choose_token(logits, SamplingConfig(temperature=0.0, top_k=3, top_p=0.01), None) == 1


def test_same_seed_same_tokens():
    flat = torch.zeros(VOCAB)  # uniform: every draw is genuinely random
    config = SamplingConfig(temperature=1.0, seed=7)
    first = draw(flat, config, 40)
    assert draw(flat, config, 40) == first
    assert len(set(first)) > 10  # it really is sampling
    other_seed = draw(flat, SamplingConfig(temperature=1.0, seed=8), 40)
    assert other_seed != first


def test_unseeded_generators_differ():
    flat = torch.zeros(VOCAB)
    config = SamplingConfig(temperature=1.0)
    assert draw(flat, config, 40) != draw(flat, config, 40)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_one_is_greedy(seed):
    logits = random_logits(seed)
    config = SamplingConfig(temperature=1.5, top_k=1, seed=seed)
    assert set(draw(logits, config, 30)) == {int(torch.argmax(logits))}


@pytest.mark.parametrize("seed", range(4))
def test_tiny_top_p_is_greedy(seed):
    logits = random_logits(seed)
    config = SamplingConfig(temperature=2.0, top_p=1e-6, seed=seed)
    assert set(draw(logits, config, 30)) == {int(torch.argmax(logits))}


def test_never_picks_outside_top_k():
    # Five near-equal favourites, the rest a little behind: without top-k the rest would be drawn.
    logits = torch.zeros(VOCAB)
    favourites = [3, 17, 22, 40, 63]
    logits[favourites] = 2.0
    config = SamplingConfig(temperature=1.0, top_k=5, seed=0)
    tokens = draw(logits, config, 400)
    assert set(tokens) == set(favourites)
    without_top_k = draw(logits, SamplingConfig(temperature=1.0, seed=0), 400)
    assert not set(without_top_k) <= set(favourites)


def test_top_k_larger_than_vocabulary_samples_everything():
    config = SamplingConfig(temperature=1.0, top_k=10 * VOCAB, seed=3)
    assert len(set(draw(torch.zeros(VOCAB), config, 400))) > VOCAB // 2


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    # Sorted masses 0.5, 0.3, 0.15, 0.05: 0.7 needs the first two, 0.9 the first three.
    assert set(draw(logits, SamplingConfig(temperature=1.0, top_p=0.7, seed=1), 300)) == {1, 3}
    assert set(draw(logits, SamplingConfig(temperature=1.0, top_p=0.9, seed=1), 300)) == {1, 3, 2}
    assert set(draw(logits, SamplingConfig(temperature=1.0, seed=1), 600)) == {0, 1, 2, 3}


def test_top_p_and_top_k_together():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # top_k 3 renormalises to 4/9, 3/9, 2/9; top_p 0.5 then needs the first two.
    tokens = draw(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.5, seed=2), 300)
    assert set(tokens) == {0, 1}


def test_low_temperature_concentrates_on_the_argmax():
    logits = torch.tensor([1.0, 2.0, 1.5, 0.0])
    assert set(draw(logits, SamplingConfig(temperature=0.01, seed=4), 100)) == {1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    tokens = draw(torch.log(probs), SamplingConfig(temperature=1.0, seed=5), 2000)
    share_of_1 = tokens.count(1) / len(tokens)
    assert math.isclose(share_of_1, 0.6, abs_tol=0.06)
    # Temperature 2 flattens it: token 1's share falls.
    hot = draw(torch.log(probs), SamplingConfig(temperature=2.0, seed=5), 2000)
    assert hot.count(1) / len(hot) < share_of_1 - 0.05


def test_a_temperature_that_overflows_the_logits_is_a_non_finite_output():
    logits = torch.tensor([1.0, 3.0, 2.0])
    with pytest.raises(NonFiniteOutput):
        choose_token(
            logits, SamplingConfig(temperature=1e-45, seed=0), make_generator(SamplingConfig(seed=0))
        )
