"""Image parts of chat messages: encoded bytes decoded with Pillow, every check before a model.

An image is refused (a violation naming its field) when it is larger than the byte limit, when
its header's width x height exceeds the pixel limit (checked before any pixel is decoded, so a
decompression bomb costs nothing), when it is not PNG, JPEG or WebP, or when it is truncated or
corrupt (the whole image is decoded here, not in the engine).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..spec.errors import Violations

#: Pillow format names accepted.
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(
    data: bytes, field: str, *, max_bytes: int, max_pixels: int, violations: Violations
) -> Image.Image | None:
    """The image as RGB, or None with a violation on field."""
    if not data:
        violations.add(field, "is empty; send PNG, JPEG or WebP bytes")
        return None
    if len(data) > max_bytes:
        violations.add(field, f"{len(data)} bytes exceed the limit of {max_bytes} (GetModel limits)")
        return None
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns above its limit: an error here, whatever ours is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                violations.add(
                    field,
                    f"{width}x{height} = {width * height} pixels exceed the limit of {max_pixels} "
                    "(GetModel limits); the image was not decoded",
                )
                return None
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        violations.add(field, "is not a PNG, JPEG or WebP image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        violations.add(field, "is a decompression bomb (far more pixels than its size suggests)")
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        violations.add(field, f"could not be decoded ({exc}); is the file truncated or corrupt?")
    return None


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
