"""Layout binding (BizGen-style): a box of the image bound to a prompt span.

On a cross-attention layer whose image tokens form a rows x cols grid (row-major, the latent
grid halved, rounding up, once per downsampling), the tokens whose cell centre lies in the box
get the span's keys emphasised by alpha (logit bias +log alpha) and the others get them
suppressed (-log alpha): two key emphases on complementary query rows
(docs/attention-math.md#layout-binding).
"""

from __future__ import annotations

import math

from .plan import KeyEmphasis, KeySet, QueryRows, ScopedOp

#: (x0, y0, x1, y1) in fractions of the image's width and height, origin at the top left.
Box = tuple[float, float, float, float]


def downsampled_grid(latent: tuple[int, int], downsamplings: int) -> tuple[int, int]:
    """The (rows, cols) grid of image tokens after halving the latent grid, rounding up, as a
    stride-2 convolution with padding 1 does, `downsamplings` times."""
    rows, cols = latent
    for _ in range(downsamplings):
        rows, cols = math.ceil(rows / 2), math.ceil(cols / 2)
    return rows, cols


def box_query_rows(box: Box, grid: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Half-open ranges of the query rows (row-major over the grid) whose cell centre lies in
    [x0, x1) x [y0, y1): one range per grid row the box covers."""
    x0, y0, x1, y1 = box
    rows, cols = grid
    inside_cols = [c for c in range(cols) if x0 <= (c + 0.5) / cols < x1]
    inside_rows = [r for r in range(rows) if y0 <= (r + 0.5) / rows < y1]
    if not inside_cols:
        return ()
    first, last = inside_cols[0], inside_cols[-1] + 1
    return tuple((r * cols + first, r * cols + last) for r in inside_rows)


def binding_ops(box: Box, grid: tuple[int, int], keys: KeySet, alpha: float) -> tuple[ScopedOp, ...]:
    """The key emphases of one binding on one layer: alpha on the box's query rows, 1/alpha on
    the others (an empty side gets no operation)."""
    inside = box_query_rows(box, grid)
    covered = sum(end - start for start, end in inside)
    ops = []
    if inside:
        ops.append(ScopedOp(KeyEmphasis(alpha), keys=keys, query_rows=QueryRows(inside)))
    if covered < grid[0] * grid[1]:
        outside = QueryRows(inside, invert=True) if inside else QueryRows()
        ops.append(ScopedOp(KeyEmphasis(1 / alpha), keys=keys, query_rows=outside))
    return tuple(ops)
