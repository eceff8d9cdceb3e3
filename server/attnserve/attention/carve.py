"""CARVE's contrastive attention map, mask and crop box (docs/attention-math.md#carve), pure torch.

CARVE ("Contrastive Attention Reveals Visual Evidence") asks a vision-language model twice
about one image, once with the task question and once with a general query, divides the two
answers' attention over the image patches layer by layer and step by step, keeps the pixels where
the question's attention stands out most, and asks again with the image and a crop of them.
Here: the contrast map, the top-fraction mask, the components kept by attention mass and the box;
the passes themselves run in the API layer (api/visual_recipes.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

GENERAL_QUERY = "Write a general description of the image."
#: lambda in A_Q / (A_G + lambda).
EPSILON = 1e-8
#: Share of the pixels kept, and share of the connected components kept.
TOP_FRACTION = 0.2
#: Components kept at least.
MIN_COMPONENTS = 3
#: The authors read layers 20..25 of LLaVA-1.5-7B's 32; other depths get the same share.
AUTHORS_LAYERS = (20, 26)
AUTHORS_DEPTH = 32


def default_layers(num_layers: int) -> list[int]:
    """The authors' layers 20..25 of 32, scaled to num_layers: floor(20 N/32) .. ceil(26 N/32) - 1."""
    first = AUTHORS_LAYERS[0] * num_layers // AUTHORS_DEPTH
    end = math.ceil(AUTHORS_LAYERS[1] * num_layers / AUTHORS_DEPTH)
    return list(range(first, max(end, first + 1)))


def contrast_map(
    query_maps: torch.Tensor, general_maps: torch.Tensor, size: tuple[int, int], epsilon: float = EPSILON
) -> torch.Tensor:
    """S = sum_t (t + 1) sum_l up(A_Q[t, l] / (A_G[t, l] + epsilon)), (height, width).

    query_maps, general_maps: (steps, layers, grid, grid), the head-mean attention of the row that
    predicts step t's token over the image's patches, of the question's and the general query's
    answer; their steps are paired from step 0 up to the shorter answer's length. up: bilinear
    resampling of the grid to size (half-pixel centres, edges clamped). Resampling is linear, so
    the weighted sum is taken on the grid, in float64, and resampled once."""
    steps = min(query_maps.shape[0], general_maps.shape[0])
    ratio = query_maps[:steps].double() / (general_maps[:steps].double() + epsilon)
    weights = torch.arange(1, steps + 1, dtype=torch.float64)
    grid = torch.einsum("t,tlhw->hw", weights, ratio)
    resized = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)
    return resized[0, 0].to(query_maps.dtype)


def top_fraction_mask(scores: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """The pixels at or above the (1 - fraction) quantile of scores (linear interpolation)."""
    threshold = torch.quantile(scores.flatten().double(), 1.0 - fraction)
    return scores.double() >= threshold


def label_components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """4-connected components of a boolean (height, width) mask: labels 1..count numbered in
    raster order of their first pixel, 0 off the mask (as scipy.ndimage.label). Runs of each
    row are joined with the overlapping runs of the next row by union-find."""
    cells = mask.cpu().numpy().astype(bool)
    height, width = cells.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = cells
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major like starts: run k is [starts[k], ends[k])
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_begin = np.searchsorted(rows, np.arange(height + 1))
    for row in range(height - 1):
        i, i_end = row_begin[row], row_begin[row + 1]
        j, j_end = row_begin[row + 1], row_begin[row + 2]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                parent[root(i)] = root(j)
            if ends[i] <= ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((height, width), dtype=np.int64)
    numbers: dict[int, int] = {}
    for run, (row, start, end) in enumerate(zip(rows, starts, ends)):
        number = numbers.setdefault(root(run), len(numbers) + 1)
        labels[row, start:end] = number
    return torch.from_numpy(labels), len(numbers)


def keep_components(
    scores: torch.Tensor,
    mask: torch.Tensor,
    fraction: float = TOP_FRACTION,
    min_components: int = MIN_COMPONENTS,
) -> torch.Tensor:
    """The mask's components ranked by their summed scores (ties: first in raster order), the
    first max(min_components, floor(fraction * count)) kept."""
    labels, count = label_components(mask)
    if count == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    mass = torch.zeros(count + 1, dtype=torch.float64).index_add_(
        0, labels.flatten(), scores.flatten().double()
    )[1:]
    keep = max(min_components, int(count * fraction))
    kept = torch.argsort(-mass, stable=True)[:keep] + 1
    return torch.isin(labels, kept)


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), half-open, of the mask's pixels; the whole mask when empty."""
    rows, columns = mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return 0, 0, mask.shape[1], mask.shape[0]
    return int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1
