"""Per-sample validation: every bad input kind is converted correctly or quarantined with its reason."""

from __future__ import annotations

import io
from collections import Counter

import bad_inputs as B
import numpy as np
import pytest
from PIL import Image

from llm2clip.config import ValidationConfig
from llm2clip.data import records as R
from llm2clip.data.records import RawSample, SampleRejected, make_key
from llm2clip.data.validate import clean_captions, clean_text, cut_at_word, validate_sample

CFG = ValidationConfig(
    min_image_side=32,
    max_aspect_ratio=4.0,
    max_image_pixels=40_000_000,
    min_caption_chars=3,
    max_caption_chars=60,
    min_captions=2,
)
FIELDS = ("short", "dense")
CAPS = {"short": "a test picture", "dense": "a longer description of the test picture"}


def check(image, captions=None, cfg=CFG, max_side=64):
    stats: Counter = Counter()
    raw = RawSample("src", "id-1", "src-1", image=image, captions=dict(captions or CAPS))
    record, jpg = validate_sample(raw, FIELDS, cfg, max_side=max_side, jpeg_quality=90, stats=stats)
    return record, Image.open(io.BytesIO(jpg)), stats


def reason_of(image, captions=None, cfg=CFG) -> SampleRejected:
    with pytest.raises(SampleRejected) as info:
        check(image, captions, cfg)
    return info.value


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (B.truncated_jpeg, R.TRUNCATED_IMAGE),
        (B.not_an_image, R.NOT_AN_IMAGE),
        (lambda: B.encode(B.noise_rgb(10, 10), "PNG"), R.IMAGE_TOO_SMALL),
        (lambda: B.encode(B.noise_rgb(400, 40), "PNG"), R.BAD_ASPECT_RATIO),
        (lambda: B.png_header_only(8000, 8000), R.DECOMPRESSION_BOMB),  # 64 M > max_image_pixels
        (lambda: B.png_header_only(50000, 50000), R.DECOMPRESSION_BOMB),  # PIL's own bomb error
        (lambda: b"", R.NOT_AN_IMAGE),
        (lambda: None, R.MISSING_IMAGE),
    ],
    ids=["truncated", "text", "tiny", "aspect", "bomb-config", "bomb-pil", "empty", "none"],
)
def test_bad_images_are_rejected_with_their_reason(make, reason):
    err = reason_of(make())
    assert err.reason == reason, err.detail
    assert err.detail  # a human-readable explanation goes with every code


def test_bomb_is_rejected_from_the_header_without_decoding():
    err = reason_of(B.png_header_only(8000, 8000))
    assert "8000x8000" in err.detail and "max_image_pixels" in err.detail


def test_16bit_png_is_scaled_to_8bit_rgb():
    record, im, _ = check(B.png16(), max_side=256)
    assert im.mode == "RGB" and (record.width, record.height) == (64, 48)
    row = np.asarray(im)[24, :, 0].astype(int)
    assert row[0] <= 3 and row[-1] >= 250  # the 0..65535 ramp became 0..255, not clipped to 255
    assert np.all(np.diff(row[2:-2]) >= -3)  # still a ramp (JPEG noise aside)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour():
    _, im, _ = check(B.cmyk_jpeg())
    r, g, b = np.asarray(im)[32, 32]
    assert im.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_rgba_png_is_composited_on_white():
    _, im, _ = check(B.rgba_png())
    left, right = np.asarray(im)[32, 8].astype(int), np.asarray(im)[32, 56].astype(int)
    assert left[2] > 200 and left[0] < 60  # opaque blue stays blue
    assert (right > 240).all()  # transparent red becomes white, not red


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("RGB", "WEBP")],
)
def test_other_modes_and_formats_become_rgb(mode, fmt):
    source = B.noise_rgb(48, 48).convert(mode)
    record, out, _ = check(B.encode(source, fmt))
    assert out.mode == "RGB" and (record.width, record.height) == (48, 48)
    if mode in ("L", "I", "F"):  # grey levels survive the trip (JPEG noise aside)
        grey = np.asarray(source.convert("L"), dtype=int)
        assert np.abs(np.asarray(out)[..., 0].astype(int) - grey).mean() < 25


def test_downscale_keeps_aspect_and_records_original_size():
    record, im, _ = check(B.good_jpeg(200, 100), max_side=64)
    assert im.size == (64, 32) == (record.width, record.height)
    assert (record.orig_width, record.orig_height) == (200, 100)


def test_pixel_hash_ignores_encoding_but_not_content():
    a, _, _ = check(B.encode(B.noise_rgb(seed=1), "PNG"))
    b, _, _ = check(B.encode(B.noise_rgb(seed=1), "BMP"))
    c, _, _ = check(B.encode(B.noise_rgb(seed=2), "PNG"))
    assert a.pixel_hash == b.pixel_hash != c.pixel_hash


# ------------------------------------------------------------------------------ captions


def test_unicode_junk_is_normalised():
    assert clean_text("  \ufb01ne\u200b cafe\u0301 \x00\x07 text\u202e\n\tend  ") == "fine café text end"


def test_overlong_caption_is_cut_at_a_word_boundary_and_counted():
    long = "word " * 40
    _, _, stats = check(B.good_jpeg(), {"short": long, "dense": CAPS["dense"]})
    record, _, _ = check(B.good_jpeg(), {"short": long, "dense": CAPS["dense"]})
    (short,) = record.captions["short"]
    assert len(short) <= CFG.max_caption_chars and short.endswith("word") and stats["captions_truncated"] == 1
    assert cut_at_word("abcdefghij klm", 12) == "abcdefghij"


@pytest.mark.parametrize("empty", ["", "   ", "\x00\u200b", None, [], ["", "  "], "ab"])
def test_empty_caption_field_is_quarantined(empty):
    err = reason_of(B.good_jpeg(), {"short": "a fine caption", "dense": empty})
    assert err.reason == R.MISSING_CAPTION and "'dense'" in err.detail


def test_list_captions_are_kept_in_order_deduplicated_and_non_text_dropped():
    stats: Counter = Counter()
    out = clean_captions(
        {"short": ["one cat", "two cats", "one cat", 7, None], "dense": "a cat"}, FIELDS, CFG, stats
    )
    assert out == {"short": ["one cat", "two cats"], "dense": ["a cat"]}
    assert stats["captions_dropped"] == 2  # the number 7 and the None in the list


def test_min_captions_counts_captions_across_fields():
    cfg = ValidationConfig(min_captions=3)
    err = reason_of(B.good_jpeg(), {"short": "one cat", "dense": "a cat"}, cfg=cfg)
    assert err.reason == R.TOO_FEW_CAPTIONS
    record, _, _ = check(B.good_jpeg(), {"short": ["one cat", "a kitten"], "dense": "a cat"}, cfg=cfg)
    assert sum(len(v) for v in record.captions.values()) == 3


def test_source_error_passes_through():
    raw = RawSample("s", "x", "s-x", error=(R.BAD_METADATA, "broken json"))
    with pytest.raises(SampleRejected) as info:
        validate_sample(raw, FIELDS, CFG, max_side=64, jpeg_quality=90, stats=Counter())
    assert info.value.reason == R.BAD_METADATA


def test_keys_are_safe_stable_and_distinct():
    assert make_key("laion", "000123") == "laion-000123"
    a, b = make_key("m", "imgs/cat.01"), make_key("m", "imgs_cat_01")
    assert a != b and "." not in a and "/" not in a and a == make_key("m", "imgs/cat.01")
    assert R.KEY_PATTERN and all(c.isalnum() or c in "-_" for c in make_key("s.x", "ünï cödé"))
