"""Image attention maps drawn over their image: the hot patch lands where it should."""

import io

import pytest
from attnserve_client.heatmap import colour
from attnserve_client.image_map import (
    SCANPATH_POINT,
    mean_grid,
    overlay,
    scanpath_over,
    write_image_maps,
    write_scanpaths,
)
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


def test_scanpath_points_sit_on_their_patches_numbered_in_step_order(tmp_path):
    points = [
        readout_pb2.ScanpathPoint(step=1, image=0, row=3, column=0, weight=0.4),
        readout_pb2.ScanpathPoint(step=0, image=0, row=0, column=3, weight=0.6),
    ]
    picture = scanpath_over(png(), points, grid_size=4, size=80)
    assert picture.size == (80, 80)
    patch = 80 / 4
    for point in points:  # the disc's rim, beside the number at its centre
        x, y = (point.column + 0.5) * patch, (point.row + 0.5) * patch
        assert picture.getpixel((round(x) + 5, round(y))) == SCANPATH_POINT
    assert picture.getpixel((10, 10)) == (0, 0, 0)  # a patch with no fixation keeps the image
    # The numbers differ: the two discs are not drawn alike.
    discs = [picture.crop((x - 6, y - 6, x + 6, y + 6)).tobytes() for x, y in ((70, 10), (10, 70))]
    assert discs[0] != discs[1]
    written = write_scanpaths([png(), png()], points, 4, tmp_path / "path.png")
    assert [p.name for p in written] == ["path-0.png", "path-1.png"]
