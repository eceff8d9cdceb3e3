"""Attention rows drawn as a PNG heatmap, with Pillow alone.

One image row per attention row, sorted by layer, head and step; one column per key position.
Each row is min-max normalised on its own (a row's weights span very different scales across
heads), shorter rows are padded in grey, and a left margin labels each row.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from PIL import Image, ImageDraw

from attnserve_client.v1 import readout_pb2

# Anchors of a viridis-like colour map, from 0 (low) to 1 (high).
_COLOUR_MAP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
PADDING_COLOUR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
LABEL_WIDTH = 96
MIN_ROW_HEIGHT = 14  # room for a label in Pillow's default font
TARGET_WIDTH = 1200


def colour(value: float) -> tuple[int, int, int]:
    """The colour map at value in [0, 1]."""
    position = min(max(value, 0.0), 1.0) * (len(_COLOUR_MAP) - 1)
    low = min(int(position), len(_COLOUR_MAP) - 2)
    t = position - low
    return tuple(round(a + (b - a) * t) for a, b in zip(_COLOUR_MAP[low], _COLOUR_MAP[low + 1]))


def heatmap_image(rows: Sequence[readout_pb2.AttentionRow], *, cell: int | None = None) -> Image.Image:
    """Draw rows with square-ish cells of `cell` pixels (by default sized to ~1200 px wide)."""
    if not rows:
        raise ValueError("no attention rows to draw")
    rows = sorted(rows, key=lambda r: (r.layer, r.head, r.step))
    columns = max(len(r.weights) for r in rows)
    if cell is None:
        cell = min(max(TARGET_WIDTH // columns, 2), 32)
    row_height = max(cell, MIN_ROW_HEIGHT)

    cells = Image.new("RGB", (columns, len(rows)), PADDING_COLOUR)
    for y, row in enumerate(rows):
        for x, value in enumerate(_normalised(row.weights)):
            cells.putpixel((x, y), colour(value))
    image = Image.new("RGB", (LABEL_WIDTH + columns * cell, len(rows) * row_height), BACKGROUND)
    image.paste(
        cells.resize((columns * cell, len(rows) * row_height), Image.Resampling.NEAREST), (LABEL_WIDTH, 0)
    )

    draw = ImageDraw.Draw(image)
    for y, row in enumerate(rows):
        draw.text(
            (4, y * row_height + (row_height - 11) // 2),
            f"L{row.layer} H{row.head} S{row.step}",
            fill=(0, 0, 0),
        )
    return image


def write_heatmap(
    rows: Sequence[readout_pb2.AttentionRow], path: str | pathlib.Path, *, cell: int | None = None
) -> tuple[int, int]:
    """Write the heatmap PNG; returns its (width, height)."""
    image = heatmap_image(rows, cell=cell)
    image.save(path, format="PNG")
    return image.size


def _normalised(weights: Sequence[float]) -> list[float]:
    low, high = min(weights, default=0.0), max(weights, default=0.0)
    span = high - low
    return [(w - low) / span if span > 0 else 0.0 for w in weights]
