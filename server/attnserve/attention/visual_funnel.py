"""Visual Funnel's anchor, entropy-scaled crop sizes and crop portfolio
(docs/attention-math.md#visual-funnel), pure torch.

Visual Funnel publishes only its idea: one anchoring pass finds where the model looks, the crop
sizes scale with the entropy of that attention, and a portfolio of crops from focal to wide is
fed back with the image. The formula is attnserve's own, written down in the docs page.
"""

from __future__ import annotations

import math

import torch

#: Crop sides, as shares of the seen square's side, for entropy 0 and entropy 1.
SMALLEST_CROP = 0.25
LARGEST_CROP = 0.75
CROPS = 3


def patch_distribution(maps: torch.Tensor) -> torch.Tensor:
    """maps (steps, layers, grid, grid) of attention over one image's patches: their mean,
    renormalised to sum to 1 over the patches, (grid, grid)."""
    mean = maps.double().mean(dim=(0, 1))
    return mean / mean.sum()


def normalised_entropy(distribution: torch.Tensor) -> float:
    """H(p) / ln(P) over the P patches (0 ln 0 = 0), in [0, 1]."""
    p = distribution.flatten().double()
    if p.numel() < 2:
        return 0.0
    terms = torch.where(p > 0, -p * torch.log(p), torch.zeros_like(p))
    return float(terms.sum() / math.log(p.numel()))


def anchor(distribution: torch.Tensor) -> tuple[float, float]:
    """(x, y) in [0, 1]: the centre of the most attended patch (the first in raster order)."""
    grid_rows, grid_columns = distribution.shape
    flat = int(torch.argmax(distribution.flatten()))
    row, column = divmod(flat, grid_columns)
    return (column + 0.5) / grid_columns, (row + 0.5) / grid_rows


def crop_fractions(
    entropy: float, count: int = CROPS, smallest: float = SMALLEST_CROP, largest: float = LARGEST_CROP
) -> list[float]:
    """f_1 = smallest + (largest - smallest) * entropy, then f_k = f_1 + (1 - f_1) (k - 1) / count
    for k = 1..count: evenly from focal towards the whole, which the image itself covers."""
    focal = smallest + (largest - smallest) * entropy
    return [focal + (1.0 - focal) * k / count for k in range(count)]


def crop_box(
    centre: tuple[float, float], fraction: float, region: tuple[int, int, int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The square of side round(fraction * s) (at least 1) centred on centre (x, y in [0, 1]
    of region, a square (left, top, right, bottom) of side s), moved inside the image of
    size (width, height): (left, top, right, bottom), half-open."""
    left, top, right, _ = region
    width, height = size
    side = min(max(1, round(fraction * (right - left))), width, height)
    x = left + centre[0] * (right - left)
    y = top + centre[1] * (right - left)
    box_left = min(max(round(x - side / 2), 0), width - side)
    box_top = min(max(round(y - side / 2), 0), height - side)
    return box_left, box_top, box_left + side, box_top + side
