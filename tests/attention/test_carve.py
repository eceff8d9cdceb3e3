"""CARVE's contrast map, mask, components and box against eager references written from the
paper's description (float64 loops, a flood fill), on synthetic maps; fp32 to 1e-5."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from attnserve.attention.carve import (
    contrast_map,
    default_layers,
    keep_components,
    label_components,
    mask_box,
    top_fraction_mask,
)


def reference_bilinear(grid, height, width):
    """Resample a (g, g) grid to (height, width): each pixel's centre mapped back onto the grid
    (half-pixel centres), the four nearest cells blended, coordinates clamped at the edges."""
    rows, columns = len(grid), len(grid[0])
    out = [[0.0] * width for _ in range(height)]
    for y in range(height):
        sy = max((y + 0.5) * rows / height - 0.5, 0.0)
        y0 = min(math.floor(sy), rows - 1)
        y1, wy = min(y0 + 1, rows - 1), sy - y0
        for x in range(width):
            sx = max((x + 0.5) * columns / width - 0.5, 0.0)
            x0 = min(math.floor(sx), columns - 1)
            x1, wx = min(x0 + 1, columns - 1), sx - x0
            top = grid[y0][x0] * (1 - wx) + grid[y0][x1] * wx
            bottom = grid[y1][x0] * (1 - wx) + grid[y1][x1] * wx
            out[y][x] = top * (1 - wy) + bottom * wy
    return out


def reference_contrast(query, general, height, width, epsilon=1e-8):
    """S = sum over paired steps t of (t + 1) times the sum over layers of the resized ratio."""
    steps = min(len(query), len(general))
    total = [[0.0] * width for _ in range(height)]
    for t in range(steps):
        for layer in range(len(query[t])):
            ratio = [
                [q / (g + epsilon) for q, g in zip(q_row, g_row)]
                for q_row, g_row in zip(query[t][layer], general[t][layer])
            ]
            resized = reference_bilinear(ratio, height, width)
            for y in range(height):
                for x in range(width):
                    total[y][x] += (t + 1) * resized[y][x]
    return torch.tensor(total, dtype=torch.float64)


def reference_labels(mask):
    """Flood fill from each unlabelled pixel in raster order, 4-neighbours."""
    height, width = len(mask), len(mask[0])
    labels = [[0] * width for _ in range(height)]
    count = 0
    for y in range(height):
        for x in range(width):
            if mask[y][x] and not labels[y][x]:
                count += 1
                labels[y][x] = count
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < height and 0 <= nx < width and mask[ny][nx] and not labels[ny][nx]:
                            labels[ny][nx] = count
                            queue.append((ny, nx))
    return labels, count


def reference_mask(scores, fraction=0.2, min_components=3):
    """Top fraction of pixels (numpy's linear percentile), then the components with the largest
    summed scores, max(min_components, floor(fraction * count)) of them."""
    values = sorted(scores.flatten().tolist())
    position = (1 - fraction) * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    threshold = values[low] + (values[high] - values[low]) * (position - low)
    rows = scores.tolist()
    top = [[value >= threshold for value in row] for row in rows]
    labels, count = reference_labels(top)
    mass = {c: 0.0 for c in range(1, count + 1)}
    for y, row in enumerate(rows):
        for x, value in enumerate(row):
            if labels[y][x]:
                mass[labels[y][x]] += value
    ranked = sorted(mass, key=lambda c: -mass[c])  # stable: ties keep raster order
    kept = set(ranked[: max(min_components, int(count * fraction))])
    return [[labels[y][x] in kept for x in range(len(rows[0]))] for y in range(len(rows))]


def synthetic_maps(steps, layers, grid, seed):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(steps, layers, grid, grid, generator=generator) ** 3
    return maps / maps.sum(dim=(2, 3), keepdim=True) * 0.4  # 40% of each row on the image


@pytest.mark.parametrize(("steps_q", "steps_g", "size"), [(3, 3, (20, 20)), (4, 2, (13, 17)), (1, 5, (6, 5))])
def test_contrast_map_matches_the_reference(steps_q, steps_g, size):
    query = synthetic_maps(steps_q, 2, 4, seed=1)
    general = synthetic_maps(steps_g, 2, 4, seed=2)
    ours = contrast_map(query, general, size)
    expected = reference_contrast(query.double().tolist(), general.double().tolist(), *size)
    assert ours.dtype == torch.float32 and ours.shape == size
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_zero_general_attention_stays_finite():
    query = synthetic_maps(2, 1, 3, seed=4)
    general = synthetic_maps(2, 1, 3, seed=5)
    general[1, 0, 2, 2] = 0.0
    assert torch.isfinite(contrast_map(query, general, (6, 6))).all()


def test_steps_weigh_by_their_index():
    ones = torch.ones(3, 1, 2, 2)
    assert contrast_map(ones, ones, (4, 4)) == pytest.approx(torch.full((4, 4), 6.0), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_labels_match_a_flood_fill(seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(23, 31, generator=generator) < 0.45
    labels, count = label_components(mask)
    expected, expected_count = reference_labels(mask.tolist())
    assert count == expected_count > 3
    assert labels.tolist() == expected


def test_labels_join_a_spiral_and_keep_diagonals_apart():
    spiral = torch.tensor(
        [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert label_components(spiral)[1] == 1
    diagonal = torch.eye(4, dtype=torch.bool)
    labels, count = label_components(diagonal)
    assert count == 4 and labels.diagonal().tolist() == [1, 2, 3, 4]
    assert label_components(torch.zeros(3, 3, dtype=torch.bool))[1] == 0


@pytest.mark.parametrize(
    ("seed", "fraction", "min_components"), [(0, 0.2, 3), (1, 0.2, 1), (2, 0.35, 2), (3, 0.1, 3)]
)
def test_mask_matches_the_reference(seed, fraction, min_components):
    query = synthetic_maps(3, 2, 6, seed=seed)
    general = synthetic_maps(3, 2, 6, seed=seed + 10)
    scores = contrast_map(query, general, (29, 29))
    mask = keep_components(scores, top_fraction_mask(scores, fraction), fraction, min_components)
    assert mask.tolist() == reference_mask(scores.double(), fraction, min_components)


def test_components_are_ranked_by_attention_mass_not_size():
    scores = torch.zeros(9, 9)
    scores[0:3, 0:3] = 1.0  # large, light
    scores[5, 5] = 20.0  # one pixel, heavy
    scores[8, 0] = 2.0
    mask = scores > 0
    kept = keep_components(scores, mask, fraction=0.2, min_components=1)
    assert kept.nonzero().tolist() == [[5, 5]]
    assert keep_components(scores, mask, fraction=0.2, min_components=2).sum() == 10


def test_top_fraction_keeps_that_share_of_distinct_scores():
    scores = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    assert top_fraction_mask(scores, 0.2).sum() == 20


def test_box_bounds_the_mask_and_an_empty_mask_boxes_everything():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2, 3] = mask[6, 9] = True
    assert mask_box(mask) == (3, 2, 10, 7)
    assert mask_box(torch.zeros(10, 12, dtype=torch.bool)) == (0, 0, 12, 10)


def test_default_layers_are_the_authors_share_of_the_depth():
    assert default_layers(32) == [20, 21, 22, 23, 24, 25]
    assert default_layers(4) == [2, 3]
    assert default_layers(1) == [0]
