"""Layout binding (attention/layout_binding.py) from its definition: the grid a latent shrinks to
(a stride-2 convolution's output size), the box's query rows (cells whose centre lies in it), and
the map attention.core computes with a binding's operations: the span's keys reweighted by alpha
for the box's queries and by 1/alpha for the others, renormalised (1e-5)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from attnserve.attention.core import attend_rows
from attnserve.attention.layout import MaskKind, RowLayout
from attnserve.attention.layout_binding import binding_ops, box_query_rows, downsampled_grid
from attnserve.attention.plan import KeySet, RowPlan


@pytest.mark.parametrize("latent", [(8, 8), (5, 3), (6, 2), (7, 13)])
def test_downsampled_grid_is_a_stride_two_convolutions_output(latent):
    x = torch.zeros(1, 1, *latent)
    for downsamplings in range(4):
        assert downsampled_grid(latent, downsamplings) == tuple(x.shape[2:])
        x = F.conv2d(x, torch.zeros(1, 1, 3, 3), stride=2, padding=1)


def box_rows_reference(box, grid):
    """Query q = r * cols + c is inside when its cell's centre is in [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = box
    rows, cols = grid
    return {
        q
        for q in range(rows * cols)
        if x0 <= (q % cols + 0.5) / cols < x1 and y0 <= (q // cols + 0.5) / rows < y1
    }


def test_box_query_rows_are_the_cells_whose_centre_is_in_the_box():
    generator = random.Random(0)
    for _ in range(200):
        grid = (generator.randint(1, 9), generator.randint(1, 9))
        xs, ys = sorted(generator.random() for _ in range(2)), sorted(generator.random() for _ in range(2))
        box = (xs[0], ys[0], xs[1], ys[1])
        got = {q for start, end in box_query_rows(box, grid) for q in range(start, end)}
        assert got == box_rows_reference(box, grid), (box, grid)
    assert box_query_rows((0.0, 0.0, 1.0, 1.0), (3, 4)) == ((0, 4), (4, 8), (8, 12))
    assert box_query_rows((0.5, 0.25, 1.0, 0.75), (2, 4)) == ((2, 4),)  # row centres 0.25, 0.75
    assert box_query_rows((0.5, 0.25, 1.0, 1.0), (2, 4)) == ((2, 4), (6, 8))


HEADS, ROWS, COLS, KEYS, HEAD_DIM = 2, 4, 6, 7, 5
SPAN = ((2, 4),)


def span_mass_map(q, k, plan):
    """Per head and query row, the final map's mass on the span: attention.core's output with
    values 1 on the span's keys (o_i = sum_j p_ij v_j)."""
    v = torch.zeros(1, HEADS, KEYS, HEAD_DIM)
    for start, end in SPAN:
        v[0, :, start:end, 0] = 1.0
    layout = RowLayout(key_start=0, num_prompt_tokens=KEYS, mask=MaskKind.FULL, cross_attention=True)
    out, _ = attend_rows(q, k, v, scale=1 / math.sqrt(HEAD_DIM), layouts=[layout], plans=[plan])
    return out[0, :, :, 0]


@pytest.mark.parametrize("box", [(0.25, 0.0, 0.75, 0.5), (0.0, 0.0, 1.0, 1.0), (0.9, 0.9, 0.95, 0.95)])
def test_a_bindings_map_reweights_the_span_inside_and_outside_the_box(box):
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, ROWS * COLS, HEAD_DIM)
    k = torch.randn(1, HEADS, KEYS, HEAD_DIM)
    alpha = 8.0
    ops = binding_ops(box, (ROWS, COLS), KeySet(ranges=SPAN), alpha)
    got = span_mass_map(q, k, RowPlan(ops=ops))

    inside = box_rows_reference(box, (ROWS, COLS))
    probs = torch.softmax(q[0].double() @ k[0].double().transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)
    expected = torch.zeros(HEADS, ROWS * COLS, dtype=torch.float64)
    for h in range(HEADS):
        for i in range(ROWS * COLS):
            weight = alpha if i in inside else 1 / alpha
            span = sum(float(probs[h, i, j]) for s, e in SPAN for j in range(s, e))
            expected[h, i] = weight * span / (weight * span + (1 - span))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    plain = span_mass_map(q, k, RowPlan())
    for i in range(ROWS * COLS):
        assert bool((got[:, i] > plain[:, i]).all()) == (i in inside)
