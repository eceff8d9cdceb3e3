"""Visual Funnel's distribution, entropy, anchor, crop sizes and boxes against eager references
written from the formula in docs/attention-math.md#visual-funnel, on synthetic maps; 1e-5."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from attnserve.attention.visual_funnel import (
    anchor,
    crop_box,
    crop_fractions,
    normalised_entropy,
    patch_distribution,
)


def reference_distribution(maps):
    steps, layers, grid = len(maps), len(maps[0]), len(maps[0][0])
    mean = [
        [sum(maps[t][layer][r][c] for t in range(steps) for layer in range(layers)) for c in range(grid)]
        for r in range(grid)
    ]
    total = sum(sum(row) for row in mean)
    return [[value / total for value in row] for row in mean]


def reference_entropy(distribution):
    values = [p for row in distribution for p in row]
    return -sum(p * math.log(p) for p in values if p > 0) / math.log(len(values))


def reference_box(centre, fraction, region, size):
    left, top, right, _ = region
    side = right - left
    crop = min(max(1, round(fraction * side)), *size)
    x, y = left + centre[0] * side, top + centre[1] * side
    box_left = min(max(round(x - crop / 2), 0), size[0] - crop)
    box_top = min(max(round(y - crop / 2), 0), size[1] - crop)
    return box_left, box_top, box_left + crop, box_top + crop


@pytest.mark.parametrize("seed", range(4))
def test_distribution_and_entropy_match_the_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(3, 2, 5, 5, generator=generator) ** 4 * 0.3
    ours = patch_distribution(maps)
    expected = reference_distribution(maps.double().tolist())
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert normalised_entropy(ours) == pytest.approx(reference_entropy(expected), abs=1e-5)


def test_entropy_bounds():
    uniform = torch.full((4, 4), 1 / 16)
    peak = torch.zeros(4, 4)
    peak[1, 2] = 1.0
    assert normalised_entropy(uniform) == pytest.approx(1.0, abs=1e-6)
    assert normalised_entropy(peak) == 0.0
    assert anchor(peak) == (2.5 / 4, 1.5 / 4)


def test_anchor_takes_the_first_of_equal_peaks():
    distribution = torch.zeros(3, 3)
    distribution[2, 0] = distribution[0, 2] = 0.5
    assert anchor(distribution) == (2.5 / 3, 0.5 / 3)


@pytest.mark.parametrize(("entropy", "count"), [(0.0, 3), (1.0, 3), (0.37, 4), (0.5, 1)])
def test_crop_fractions_widen_from_the_entropy_scaled_focal_crop(entropy, count):
    fractions = crop_fractions(entropy, count, smallest=0.2, largest=0.8)
    focal = 0.2 + 0.6 * entropy
    expected = [focal + (1 - focal) * k / count for k in range(count)]
    assert fractions == pytest.approx(expected, abs=1e-12)
    assert all(a < b for a, b in itertools.pairwise(fractions)) and fractions[-1] < 1


@pytest.mark.parametrize(
    ("centre", "fraction", "region", "size"),
    [
        ((0.5, 0.5), 0.25, (0, 0, 40, 40), (40, 40)),
        ((0.05, 0.9), 0.5, (4, 0, 44, 40), (48, 40)),  # pushed back inside at the corner
        ((0.99, 0.01), 0.9, (10, 0, 50, 40), (60, 40)),
        ((0.3, 0.6), 0.001, (0, 5, 30, 35), (30, 40)),  # at least one pixel
    ],
)
def test_crop_box_matches_the_reference(centre, fraction, region, size):
    box = crop_box(centre, fraction, region, size)
    assert box == reference_box(centre, fraction, region, size)
    left, top, right, bottom = box
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
