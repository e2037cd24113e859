"""Fuzz the image decoder/validator (``open_image``, ``normalise_image``) with hostile bytes.

Properties: random bytes, mutated and truncated images of every common format, and headers that
claim huge sizes in tiny files are either a normalised 8-bit RGB image within the configured
bounds or a ``SampleRejected`` with an image reason; never another exception; a decompression
bomb is refused from its header (fast, reason ``decompression_bomb``). Profiles: see
``test_fuzz_support``.
"""

from __future__ import annotations

import io
import struct
import time

import bad_inputs as B
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from test_fuzz_support import TIMEOUT, fuzz, record

from llm2clip.config import ValidationConfig
from llm2clip.data import records as R
from llm2clip.data.records import SampleRejected
from llm2clip.data.validate import encode_jpeg, normalise_image

IMAGE_REASONS = {R.NOT_AN_IMAGE, R.TRUNCATED_IMAGE, R.CORRUPT_IMAGE, R.DECOMPRESSION_BOMB, R.IMAGE_TOO_SMALL,
                 R.BAD_ASPECT_RATIO, R.MISSING_IMAGE}
MAX_SIDE = 64


# ------------------------------------------------------------------------ crafted headers


def bmp_header(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16


def gif_header(w: int, h: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    return screen + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00;"


def ppm_header(w: int, h: int) -> bytes:
    return f"P6\n{w} {h}\n255\n".encode() + b"\0" * 16


def jpeg_header(w: int, h: int) -> bytes:
    dqt = b"\xff\xdb" + struct.pack(">HB", 67, 0) + bytes(range(1, 65))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x22\x00\x02\x11\x00\x03\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + dqt + sof + sos + b"\0" * 16 + b"\xff\xd9"


def tiff_header(w: int, h: int) -> bytes:
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", 24) + b"\0" * 16 + ifd


HEADERS = {"png": (B.png_header_only, 2**31 - 1), "bmp": (bmp_header, 2**31 - 1), "gif": (gif_header, 65535),
           "ppm": (ppm_header, 2**31 - 1), "jpeg": (jpeg_header, 65535), "tiff": (tiff_header, 2**32 - 1)}


@pytest.mark.parametrize("fmt", sorted(HEADERS))
def test_crafted_headers_declare_the_size_they_say(fmt):
    """The bomb builders are right: PIL reads the declared size from each (so the bombs are real)."""
    make, _ = HEADERS[fmt]
    assert Image.open(io.BytesIO(make(321, 123))).size == (321, 123)


@fuzz()
@given(fmt=st.sampled_from(sorted(HEADERS)), max_pixels=st.integers(1_000, 40_000_000), data=st.data())
@example(fmt="png", max_pixels=40_000_000, data=None)
def test_decompression_bombs_are_refused_from_the_header(fmt, max_pixels, data):
    """A small file claiming more than max_image_pixels pixels: refused fast, before decoding."""
    make, biggest = HEADERS[fmt]
    if data is None:
        w = h = 65_535
    else:
        w = data.draw(st.integers(max_pixels // biggest + 1, biggest), label="width")
        h = data.draw(st.integers(max(1, max_pixels // w + 1), biggest), label="height")
    cfg = ValidationConfig(max_image_pixels=max_pixels, min_image_side=1, max_aspect_ratio=1e12)
    start = time.monotonic()
    with pytest.raises(SampleRejected) as rej:
        normalise_image(make(w, h), cfg, MAX_SIDE)
    assert rej.value.reason == R.DECOMPRESSION_BOMB, rej.value.detail
    record(rej.value.reason)
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------- mutated real images


def _seed_images() -> dict[str, bytes]:
    """Small real images in many formats and modes (the mutation seeds)."""
    rgb = B.noise_rgb(40, 32, seed=3)
    out = {fmt: B.encode(rgb, fmt) for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA")}
    out["GIF"] = B.encode(rgb.convert("P"), "GIF")
    out["PNG16"], out["CMYK"], out["RGBA"] = B.png16(), B.cmyk_jpeg(), B.rgba_png()
    out["TIFF-F"] = B.encode(Image.fromarray(np.linspace(-5, 500, 48 * 40, dtype=np.float32).reshape(40, 48)), "TIFF")
    out["TIFF-LAB"] = B.encode(Image.new("LAB", (40, 40), (50, 10, 200)), "TIFF")
    out["PNG-P-trns"] = B.encode(rgb.convert("P"), "PNG", transparency=0)
    return out


SEEDS = _seed_images()
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"RIFF\0\0\0\0WEBPVP8X",
         b"P6\n", b"\x00\x00\x01\x00", b"8BPS", b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


def check_result(data: bytes, cfg: ValidationConfig) -> str:
    """Normalise ``data``; returns "kept" or the rejection reason, checking either outcome."""
    try:
        rgb, (w, h), pixel_hash = normalise_image(data, cfg, MAX_SIDE)
    except SampleRejected as rej:
        assert rej.reason in IMAGE_REASONS and rej.detail, rej
        record(rej.reason)
        return rej.reason
    assert rgb.mode == "RGB" and max(rgb.size) <= MAX_SIDE and len(pixel_hash) == 32
    assert min(w, h) >= cfg.min_image_side and max(w, h) / min(w, h) <= cfg.max_aspect_ratio
    assert w * h <= cfg.max_image_pixels
    Image.open(io.BytesIO(encode_jpeg(rgb, 80))).load()  # the shard's jpg is a real jpg
    record("kept")
    return "kept"


CFG = ValidationConfig(min_image_side=8, max_image_pixels=2_000_000)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_image_is_kept(name):
    assert check_result(SEEDS[name], CFG) == "kept"


@fuzz()
@given(name=st.sampled_from(sorted(SEEDS)), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                           max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
@pytest.mark.timeout(TIMEOUT)
def test_mutated_and_truncated_images_never_crash(name, flips, cut):
    data = bytearray(SEEDS[name])
    for where, value in flips:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    check_result(bytes(data), CFG)


@fuzz()
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=600))
@pytest.mark.timeout(TIMEOUT)
def test_random_bytes_behind_a_format_signature_never_crash(magic, body):
    check_result(magic + body, CFG)
