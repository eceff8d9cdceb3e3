"""Image attention maps drawn over their image, with Pillow alone.

The server reads a `grid_size x grid_size` map per image and step (ImageAttentionMap); the
vision tower saw the image resized and centre-cropped to a square (CLIP's processing), so the
map is laid over the image's centre square. Maps of several steps are averaged; the mean is
min-max normalised and blended over the image in the heatmap's colour map.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Sequence

from PIL import Image

from attnserve_client.heatmap import colour
from attnserve_client.v1 import readout_pb2

SIZE = 384
OPACITY = 0.55


def mean_grid(maps: Sequence[readout_pb2.ImageAttentionMap]) -> tuple[int, list[float]]:
    """(grid_size, the maps' mean weights, row-major) of one image's maps."""
    if not maps:
        raise ValueError("no image attention maps")
    grid = maps[0].grid_size
    if any(m.grid_size != grid for m in maps):
        raise ValueError("the maps of one image have different grid sizes")
    return grid, [sum(column) / len(maps) for column in zip(*(m.weights for m in maps))]


def overlay(
    image_bytes: bytes, maps: Sequence[readout_pb2.ImageAttentionMap], *, size: int = SIZE
) -> Image.Image:
    """The image's centre square at size x size px with the mean of maps blended over it."""
    grid, weights = mean_grid(maps)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return heat_over(square, grid, grid, weights)


def heat_over(image: Image.Image, width: int, height: int, weights: Sequence[float]) -> Image.Image:
    """A width x height grid of weights (row-major), min-max normalised, in the heatmap's colour
    map, blended over image (an RGB image of any size; the grid is stretched to it)."""
    low, high = min(weights), max(weights)
    span = high - low or 1.0
    cells = Image.new("RGB", (width, height))
    cells.putdata([colour((w - low) / span) for w in weights])
    heat = cells.resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image, heat, OPACITY)


def write_image_maps(
    images: Sequence[bytes], maps: Sequence[readout_pb2.ImageAttentionMap], path: str | pathlib.Path
) -> list[pathlib.Path]:
    """One PNG per image (path itself for one image, path-<k>.png for several); returns them."""
    path = pathlib.Path(path)
    written = []
    for k, image_bytes in enumerate(images):
        out = path if len(images) == 1 else path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}")
        overlay(image_bytes, [m for m in maps if m.image == k]).save(out, format="PNG")
        written.append(out)
    return written
