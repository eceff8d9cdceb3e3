"""Image attention maps drawn over their image: the hot patch lands where it should."""

import io

import pytest
from attnserve_client.heatmap import colour
from attnserve_client.image_map import mean_grid, overlay, write_image_maps
from attnserve_client.v1 import readout_pb2
from PIL import Image


def png(size=(80, 60), fill=(0, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, fill).save(buffer, "PNG")
    return buffer.getvalue()


def hot(image: int, row: int, col: int, grid: int = 4, step: int = 0) -> readout_pb2.ImageAttentionMap:
    weights = [0.01] * grid * grid
    weights[row * grid + col] = 0.5
    return readout_pb2.ImageAttentionMap(image=image, step=step, grid_size=grid, weights=weights)


def test_mean_over_steps():
    grid, weights = mean_grid([hot(0, 0, 0), hot(0, 0, 1, step=1)])
    assert grid == 4 and weights[:2] == pytest.approx([(0.5 + 0.01) / 2] * 2)


def test_the_hot_cell_is_drawn_over_its_patch_of_the_centre_square():
    picture = overlay(png(), [hot(0, 1, 2)], size=80)
    assert picture.size == (80, 80)
    # Cell (row 1, col 2) of a 4x4 grid covers x 40..59, y 20..39; black beneath, so the blend
    # is OPACITY times the colour map's top colour there and its bottom colour elsewhere.
    for (x, y), value in (((50, 30), 1.0), ((10, 70), 0.0), ((45, 25), 1.0), ((35, 30), 0.0)):
        expected = [0.55 * c for c in colour(value)]
        assert picture.getpixel((x, y)) == pytest.approx(expected, abs=1), (x, y)


def test_one_file_per_image(tmp_path):
    written = write_image_maps([png(), png((30, 30))], [hot(0, 0, 0), hot(1, 3, 3)], tmp_path / "map.png")
    assert [p.name for p in written] == ["map-0.png", "map-1.png"]
    assert all(Image.open(p).size == (384, 384) for p in written)
    assert write_image_maps([png()], [hot(0, 0, 0)], tmp_path / "one.png") == [tmp_path / "one.png"]
