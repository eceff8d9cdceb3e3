"""Generated images and their word heatmaps (GenerateImage's DAAM readout) as PNG files."""

from __future__ import annotations

import io
import pathlib
import re

from PIL import Image

from attnserve_client.image_map import SIZE, heat_over
from attnserve_client.v1 import image_generation_pb2


def write_images(
    complete: image_generation_pb2.GenerateImageComplete, directory: str | pathlib.Path, stem: str = "image"
) -> list[pathlib.Path]:
    """Each image as <stem>-<k>.png and each word heatmap laid over its image as
    <stem>-<k>-<word>.png (at least SIZE px on the short side, so tiny images stay readable);
    returns the paths written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for k, image in enumerate(complete.images):
        path = directory / f"{stem}-{k}.png"
        path.write_bytes(image.png)
        written.append(path)
    for heatmap in complete.word_heatmaps:
        picture = _enlarged(complete.images[heatmap.image].png)
        overlay = heat_over(picture, heatmap.width, heatmap.height, heatmap.values)
        path = directory / f"{stem}-{heatmap.image}-{_file_word(heatmap.word)}.png"
        overlay.save(path, format="PNG")
        written.append(path)
    return written


def _enlarged(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    factor = max(1, -(-SIZE // min(image.size)))  # ceiling division
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _file_word(word: str) -> str:
    """The word as a file-name part: letters, digits, - and _ kept, the rest as _."""
    return re.sub(r"[^\w-]", "_", word)[:64] or "_"
