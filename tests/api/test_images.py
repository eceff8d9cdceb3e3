"""Image parts are decoded here, before any model: every bad image becomes a violation naming
its field, and a decompression bomb is refused from its header, before a pixel is decoded."""

import io
import time
import zlib

import pytest
from attnserve.api.images import decode_image
from attnserve.spec.errors import Violations
from PIL import Image

FIELD = "chat.messages[0].parts[1].image"
LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}


def encoded(fmt: str, size=(40, 30), colour=(200, 30, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def decode(data: bytes, **limits):
    violations = Violations()
    image = decode_image(data, FIELD, violations=violations, **{**LIMITS, **limits})
    return image, [(v.field, v.description) for v in violations.items]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_webp_decode_to_rgb(fmt):
    image, violations = decode(encoded(fmt))
    assert violations == []
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((5, 5))
    assert abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 10) < 12


def test_other_modes_convert_to_rgb():
    image, violations = decode(encoded("PNG", mode="LA", colour=(90, 255)))
    assert violations == [] and image.mode == "RGB"


def png_bomb(width: int, height: int) -> bytes:
    """A black greyscale PNG written by hand: a few hundred KB however many pixels it declares."""
    raw_row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(raw_row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "side, message",
    [
        # Over the configured limit: refused from the header by our check.
        (
            6000,
            (
                "6000x6000 = 36000000 pixels exceed the limit of 1048576 (GetModel limits); "
                "the image was not decoded"
            ),
        ),
        # Far over Pillow's own bomb threshold too: Pillow refuses it while reading the header.
        (20000, "is a decompression bomb (far more pixels than its size suggests)"),
    ],
)
def test_decompression_bombs_are_refused_before_decoding(side, message):
    bomb = png_bomb(side, side)
    assert len(bomb) < 1 << 20
    started = time.monotonic()
    image, violations = decode(bomb)
    assert image is None and violations == [(FIELD, message)]
    assert time.monotonic() - started < 0.5  # no pixel was decoded


def test_pixel_limit_applies_to_ordinary_images():
    _, violations = decode(encoded("PNG", size=(100, 100)), max_pixels=9999)
    assert violations and "10000 pixels exceed the limit of 9999" in violations[0][1]


def test_byte_limit():
    data = encoded("PNG")
    _, violations = decode(data, max_bytes=len(data) - 1)
    assert violations == [(FIELD, f"{len(data)} bytes exceed the limit of {len(data) - 1} (GetModel limits)")]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files(fmt):
    data = encoded(fmt, size=(64, 64))
    image, violations = decode(data[: len(data) // 2])
    assert image is None
    assert violations and violations[0][0] == FIELD


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is empty; send PNG, JPEG or WebP bytes"),
        (b"GIF89a not an image at all", "is not a PNG, JPEG or WebP image"),
        (b"hello, world" * 10, "is not a PNG, JPEG or WebP image"),
    ],
)
def test_non_images(data, message):
    image, violations = decode(data)
    assert image is None and violations == [(FIELD, message)]


def test_other_formats_are_refused():
    image, violations = decode(encoded("GIF"))
    assert image is None and violations == [(FIELD, "is not a PNG, JPEG or WebP image")]
