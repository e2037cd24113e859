"""Crafted good and bad image inputs for the prepare_data tests (real bytes, no mocks)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_rgb(w: int = 96, h: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def good_jpeg(w: int = 96, h: int = 80, seed: int = 0) -> bytes:
    return encode(noise_rgb(w, h, seed), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = good_jpeg(200, 200)
    return data[: len(data) * 6 // 10]


def not_an_image() -> bytes:
    return b"this is a text file, not a picture\n" * 20


def png16() -> bytes:
    """16-bit grayscale PNG with a horizontal ramp 0..65535."""
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (48, 1))), "PNG")


def cmyk_jpeg() -> bytes:
    """A pure-red CMYK JPEG (C=0, M=255, Y=255, K=0)."""
    return encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)


def rgba_png() -> bytes:
    """Left half opaque blue, right half fully transparent (red underneath)."""
    a = np.zeros((64, 64, 4), dtype=np.uint8)
    a[:, :32] = (0, 0, 255, 255)
    a[:, 32:] = (255, 0, 0, 0)
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
