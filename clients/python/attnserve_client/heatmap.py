"""Attention rows drawn as a PNG heatmap, with Pillow alone.

One image row per attention row, sorted by layer, head and step; one column per key position.
Each row is min-max normalised on its own (a row's weights span very different scales across
heads), shorter rows are padded in grey, and a left margin labels each row. Given the keys'
tokens, a band below the cells names them (every k-th when the cells are too narrow to name
each), and a colour scale on the right reads from the row's minimum to its maximum.
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
TEXT = (0, 0, 0)
LABEL_WIDTH = 96
TEXT_LINE = 11  # a line of Pillow's default font
MIN_ROW_HEIGHT = 14  # room for a label
TARGET_WIDTH = 1200
#: The band under the cells holding the key tokens, and the characters of a token shown.
LABEL_BAND = 90
MAX_TOKEN_CHARACTERS = 14
SCALE_MARGIN, SCALE_WIDTH, SCALE_LABEL_WIDTH, SCALE_MIN_HEIGHT = 12, 14, 64, 64


def colour(value: float) -> tuple[int, int, int]:
    """The colour map at value in [0, 1]."""
    position = min(max(value, 0.0), 1.0) * (len(_COLOUR_MAP) - 1)
    low = min(int(position), len(_COLOUR_MAP) - 2)
    t = position - low
    return tuple(round(a + (b - a) * t) for a, b in zip(_COLOUR_MAP[low], _COLOUR_MAP[low + 1]))


def heatmap_image(
    rows: Sequence[readout_pb2.AttentionRow], *, cell: int | None = None, key_tokens: Sequence[str] = ()
) -> Image.Image:
    """Draw rows with square-ish cells of `cell` pixels (by default sized to ~1200 px wide);
    key_tokens[j] names key position j."""
    if not rows:
        raise ValueError("no attention rows to draw")
    rows = sorted(rows, key=lambda r: (r.layer, r.head, r.step))
    columns = max(len(r.weights) for r in rows)
    if cell is None:
        cell = min(max(TARGET_WIDTH // columns, 2), 32)
    row_height = max(cell, MIN_ROW_HEIGHT)
    grid_width, grid_height = columns * cell, len(rows) * row_height
    label_band = LABEL_BAND if key_tokens else 0

    cells = Image.new("RGB", (columns, len(rows)), PADDING_COLOUR)
    for y, row in enumerate(rows):
        for x, value in enumerate(_normalised(row.weights)):
            cells.putpixel((x, y), colour(value))
    width = LABEL_WIDTH + grid_width + SCALE_MARGIN + SCALE_WIDTH + SCALE_LABEL_WIDTH
    image = Image.new("RGB", (width, max(grid_height, SCALE_MIN_HEIGHT) + label_band), BACKGROUND)
    image.paste(cells.resize((grid_width, grid_height), Image.Resampling.NEAREST), (LABEL_WIDTH, 0))

    draw = ImageDraw.Draw(image)
    for y, row in enumerate(rows):
        draw.text(
            (4, y * row_height + (row_height - 11) // 2),
            f"L{row.layer} H{row.head} S{row.step}",
            fill=TEXT,
        )
    if key_tokens:
        _draw_key_tokens(image, key_tokens[:columns], cell, top=grid_height)
    _draw_scale(
        image, left=LABEL_WIDTH + grid_width + SCALE_MARGIN, height=max(grid_height, SCALE_MIN_HEIGHT)
    )
    return image


def _draw_key_tokens(image: Image.Image, tokens: Sequence[str], cell: int, top: int) -> None:
    """Each token's text, turned a quarter, under its column; every k-th when cells are narrower
    than a line of text."""
    every = key_label_stride(cell)
    band = Image.new("RGB", (LABEL_BAND, len(tokens) * cell), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for j in range(0, len(tokens), every):
        text = tokens[j].replace("\n", "\\n").strip() or repr(tokens[j])
        draw.text((4, j * cell + (cell - TEXT_LINE) // 2), text[:MAX_TOKEN_CHARACTERS], fill=TEXT)
    # Turned so the text reads downwards from the grid's edge, one line per column.
    image.paste(band.rotate(90, expand=True), (LABEL_WIDTH, top))


def key_label_stride(cell: int) -> int:
    """Name every k-th key so that lines of text, TEXT_LINE px each, do not overlap."""
    return max(1, -(-TEXT_LINE // cell))


def _draw_scale(image: Image.Image, left: int, height: int) -> None:
    """A vertical colour bar, the row's maximum at the top, its minimum at the bottom."""
    bar = Image.new("RGB", (1, height))
    bar.putdata([colour(1 - y / max(height - 1, 1)) for y in range(height)])
    image.paste(bar.resize((SCALE_WIDTH, height), Image.Resampling.NEAREST), (left, 0))
    draw = ImageDraw.Draw(image)
    text_left = left + SCALE_WIDTH + 4
    draw.text((text_left, 0), "row max", fill=TEXT)
    draw.text((text_left, height // 2 - TEXT_LINE // 2), "(each row", fill=TEXT)
    draw.text((text_left, height // 2 + TEXT_LINE // 2), "scaled)", fill=TEXT)
    draw.text((text_left, height - TEXT_LINE), "row min", fill=TEXT)


def write_heatmap(
    rows: Sequence[readout_pb2.AttentionRow],
    path: str | pathlib.Path,
    *,
    cell: int | None = None,
    key_tokens: Sequence[str] = (),
) -> tuple[int, int]:
    """Write the heatmap PNG; returns its (width, height)."""
    image = heatmap_image(rows, cell=cell, key_tokens=key_tokens)
    image.save(path, format="PNG")
    return image.size


def _normalised(weights: Sequence[float]) -> list[float]:
    low, high = min(weights, default=0.0), max(weights, default=0.0)
    span = high - low
    return [(w - low) / span if span > 0 else 0.0 for w in weights]
