"""Image attention maps and scanpaths drawn over their image, with Pillow alone.

The server reads a `grid_size x grid_size` map per image and step (ImageAttentionMap); the
vision tower saw the image resized and centre-cropped to a square (CLIP's processing), so the
map is laid over the image's centre square. Maps of several steps are averaged; the mean is
min-max normalised and blended over the image in the heatmap's colour map. A scanpath (one
fixation per step, ScanpathPoint) is drawn over the same square as numbered points, joined in
step order.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Sequence

from PIL import Image, ImageDraw

from attnserve_client.heatmap import colour
from attnserve_client.v1 import readout_pb2

SIZE = 384
OPACITY = 0.55
SCANPATH_LINE = (255, 64, 64)
SCANPATH_POINT = (255, 230, 0)


def mean_grid(maps: Sequence[readout_pb2.ImageAttentionMap]) -> tuple[int, list[float]]:
    """(grid_size, the maps' mean weights, row-major) of one image's maps."""
    if not maps:
        raise ValueError("no image attention maps")
    grid = maps[0].grid_size
    if any(m.grid_size != grid for m in maps):
        raise ValueError("the maps of one image have different grid sizes")
    return grid, [sum(column) / len(maps) for column in zip(*(m.weights for m in maps))]


def centre_square(image_bytes: bytes, size: int = SIZE) -> Image.Image:
    """The part of the image the vision tower saw, size x size px."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def overlay(
    image_bytes: bytes, maps: Sequence[readout_pb2.ImageAttentionMap], *, size: int = SIZE
) -> Image.Image:
    """The image's centre square at size x size px with the mean of maps blended over it."""
    grid, weights = mean_grid(maps)
    return heat_over(centre_square(image_bytes, size), grid, grid, weights)


def scanpath_over(
    image_bytes: bytes, points: Sequence[readout_pb2.ScanpathPoint], grid_size: int, *, size: int = SIZE
) -> Image.Image:
    """The image's centre square with the fixations (the patches' centres) numbered by step
    (step 0 is the first generated token) and joined in step order."""
    image = centre_square(image_bytes, size)
    draw = ImageDraw.Draw(image)
    patch = size / grid_size
    points = sorted(points, key=lambda p: p.step)
    centres = [((p.column + 0.5) * patch, (p.row + 0.5) * patch) for p in points]
    if len(centres) > 1:
        draw.line(centres, fill=SCANPATH_LINE, width=2)
    radius = max(6, round(patch / 3))
    for point, (x, y) in zip(points, centres):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=SCANPATH_POINT, outline=(0, 0, 0))
        draw.text((x, y), str(point.step), fill=(0, 0, 0), anchor="mm")
    return image


def heat_over(image: Image.Image, width: int, height: int, weights: Sequence[float]) -> Image.Image:
    """A width x height grid of weights (row-major), min-max normalised, in the heatmap's colour
    map, blended over image (an RGB image of any size; the grid is stretched to it)."""
    low, high = min(weights), max(weights)
    span = high - low or 1.0
    cells = Image.new("RGB", (width, height))
    cells.putdata([colour((w - low) / span) for w in weights])
    heat = cells.resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image, heat, OPACITY)


def write_scanpaths(
    images: Sequence[bytes],
    points: Sequence[readout_pb2.ScanpathPoint],
    grid_size: int,
    path: str | pathlib.Path,
) -> list[pathlib.Path]:
    """One PNG per image with its fixations (path itself for one image, path-<k>.png for several)."""
    written = []
    for k, image_bytes in enumerate(images):
        out = _image_path(path, k, len(images))
        scanpath_over(image_bytes, [p for p in points if p.image == k], grid_size).save(out, format="PNG")
        written.append(out)
    return written


def _image_path(path: str | pathlib.Path, k: int, count: int) -> pathlib.Path:
    path = pathlib.Path(path)
    return path if count == 1 else path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}")


def write_image_maps(
    images: Sequence[bytes], maps: Sequence[readout_pb2.ImageAttentionMap], path: str | pathlib.Path
) -> list[pathlib.Path]:
    """One PNG per image (path itself for one image, path-<k>.png for several); returns them."""
    written = []
    for k, image_bytes in enumerate(images):
        out = _image_path(path, k, len(images))
        overlay(image_bytes, [m for m in maps if m.image == k]).save(out, format="PNG")
        written.append(out)
    return written
