"""Attention rows -> PNG heatmap."""

from attnserve_client.heatmap import (
    LABEL_BAND,
    LABEL_WIDTH,
    PADDING_COLOUR,
    SCALE_LABEL_WIDTH,
    SCALE_MARGIN,
    SCALE_MIN_HEIGHT,
    SCALE_WIDTH,
    colour,
    heatmap_image,
    key_label_stride,
    write_heatmap,
)
from attnserve_client.v1 import readout_pb2
from PIL import Image


def _row(layer, head, step, weights):
    return readout_pb2.AttentionRow(
        layer=layer, head=head, step=step, query_position=len(weights) - 1, weights=weights
    )


ROWS = [
    _row(5, 1, 0, [0.5, 0.1, 0.1, 0.3]),
    _row(5, 0, 1, [0.4, 0.2, 0.1, 0.1, 0.2]),
    _row(2, 0, 0, [0.7, 0.1, 0.1, 0.1]),
]


def test_png_size_and_pixels(tmp_path):
    path = tmp_path / "rows.png"
    size = write_heatmap(ROWS, path, cell=16)

    image = Image.open(path)
    assert image.format == "PNG"
    scale = SCALE_MARGIN + SCALE_WIDTH + SCALE_LABEL_WIDTH
    assert image.size == size == (LABEL_WIDTH + 5 * 16 + scale, max(3 * 16, SCALE_MIN_HEIGHT))
    cells = image.convert("RGB").crop((LABEL_WIDTH, 0, LABEL_WIDTH + 5 * 16, 3 * 16))
    assert len(cells.getcolors(maxcolors=1 << 16)) > 3


def test_colour_scale_reads_from_the_row_maximum_down():
    image = heatmap_image(ROWS, cell=16)
    x = LABEL_WIDTH + 5 * 16 + SCALE_MARGIN + SCALE_WIDTH // 2
    assert image.getpixel((x, 0)) == colour(1.0)
    assert image.getpixel((x, image.height - 1)) == colour(0.0)


def test_key_tokens_are_named_under_their_columns():
    plain = heatmap_image(ROWS, cell=16)
    named = heatmap_image(ROWS, cell=16, key_tokens=["<s>", "The", " cat", " sat", " on"])
    assert named.height == plain.height + LABEL_BAND
    band = named.crop((LABEL_WIDTH, plain.height, LABEL_WIDTH + 5 * 16, named.height))
    for j in range(5):  # some ink in every column's strip
        column = band.crop((j * 16, 0, (j + 1) * 16, LABEL_BAND)).convert("L")
        assert column.getextrema()[0] < 128, j
    # Cells narrower than a line of text: every k-th column is named, so names never overlap.
    assert [key_label_stride(cell) for cell in (16, 11, 10, 6, 3)] == [1, 1, 2, 2, 4]


def test_rows_sorted_normalised_and_padded():
    image = heatmap_image(ROWS, cell=16)

    def cell(x, y):
        return image.getpixel((LABEL_WIDTH + x * 16 + 8, y * 16 + 8))

    # Row 0 is layer 2 (sorted by layer, head, step): its maximum is the top colour, its minimum the bottom.
    assert cell(0, 0) == colour(1.0)
    assert cell(1, 0) == colour(0.0)
    # Rows shorter than the longest are padded.
    assert cell(4, 0) == PADDING_COLOUR
    assert cell(4, 1) != PADDING_COLOUR


def test_default_cell_keeps_long_rows_legible():
    image = heatmap_image([_row(0, 0, 0, [1.0 / 300] * 299 + [0.5])])
    assert image.width >= LABEL_WIDTH + 2 * 300
    assert image.height >= 14


def test_colour_map_ends():
    assert colour(0.0) != colour(1.0)
    assert colour(-1.0) == colour(0.0)
    assert colour(2.0) == colour(1.0)
