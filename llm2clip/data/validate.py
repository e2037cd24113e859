"""Per-sample validation: decode and normalise images, clean captions, never crash on bad input.

Every problem becomes a :class:`~llm2clip.data.records.SampleRejected` with a reason code; the
caller turns it into a quarantine record. Images end as 8-bit RGB, downscaled so the long side
is at most ``image_max_side`` and re-encoded as a deterministic JPEG.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import unicodedata
import warnings
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llm2clip.config import ValidationConfig
from llm2clip.data import records as R
from llm2clip.data.records import RawSample, SampleRecord, SampleRejected

# Unicode categories removed from captions: control, format (zero-width, bidi overrides),
# surrogates and private use.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
_WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------- images


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes, checking the header's pixel count *before* decoding the pixels.

    Raises:
        SampleRejected: not an image, truncated, corrupt, or a decompression bomb.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise SampleRejected(R.DECOMPRESSION_BOMB, str(err)) from None
        except UnidentifiedImageError:
            raise SampleRejected(
                R.NOT_AN_IMAGE, f"unknown image format ({len(data)} bytes, starting {data[:8]!r})"
            ) from None
        except Exception as err:  # any decoder failure is a bad sample, not a crash
            raise _decode_error(err) from None
        width, height = im.size
        if width * height > max_pixels:
            raise SampleRejected(
                R.DECOMPRESSION_BOMB,
                f"header says {width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}",
            )
        try:
            im.load()
        except Image.DecompressionBombError as err:
            raise SampleRejected(R.DECOMPRESSION_BOMB, str(err)) from None
        except Exception as err:  # see above
            raise _decode_error(err) from None
    return im


def _decode_error(err: Exception) -> SampleRejected:
    text = f"{type(err).__name__}: {err}"
    reason = R.TRUNCATED_IMAGE if "truncat" in str(err).lower() else R.CORRUPT_IMAGE
    return SampleRejected(reason, text)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, 16-bit is scaled down."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(im.convert("RGB"), mask=im.getchannel("A"))
        return background
    return im.convert("RGB")  # L, 1, CMYK (PIL handles Adobe's inverted CMYK), YCbCr, LAB, HSV


def check_geometry(width: int, height: int, cfg: ValidationConfig) -> None:
    """Reject images smaller than ``min_image_side`` or more elongated than ``max_aspect_ratio``."""
    if min(width, height) < cfg.min_image_side:
        raise SampleRejected(
            R.IMAGE_TOO_SMALL, f"{width}x{height}: a side is below min_image_side {cfg.min_image_side}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > cfg.max_aspect_ratio:
        raise SampleRejected(
            R.BAD_ASPECT_RATIO,
            f"{width}x{height}: aspect ratio {ratio:.2f} > max_aspect_ratio {cfg.max_aspect_ratio}",
        )


def normalise_image(
    image: Any, cfg: ValidationConfig, max_side: int
) -> tuple[Image.Image, tuple[int, int], str]:
    """Decode (if bytes), convert to RGB, check geometry, hash the pixels and downscale.

    Returns:
        ``(rgb_image, (orig_width, orig_height), pixel_hash)``; the hash is of the decoded RGB
        pixels before downscaling, so re-encoded copies of one image hash alike.
    """
    if image is None:
        raise SampleRejected(R.MISSING_IMAGE, "the sample has no image")
    if isinstance(image, Image.Image):
        im = image
    else:
        im = open_image(bytes(image), cfg.max_image_pixels)
        with contextlib.suppress(Exception):  # broken EXIF: keep the pixels as stored
            im = ImageOps.exif_transpose(im)
    try:
        rgb = to_rgb(im)
    except Exception as err:  # an exotic mode PIL cannot convert
        raise SampleRejected(R.CORRUPT_IMAGE, f"cannot convert mode {im.mode} to RGB: {err}") from None
    width, height = rgb.size
    check_geometry(width, height, cfg)
    digest = hashlib.blake2b(f"{width}x{height}:".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb, (width, height), digest.hexdigest()


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    """Deterministic baseline JPEG (no EXIF, no optimisation passes, 4:2:0)."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=False, progressive=False, subsampling=2)
    return buf.getvalue()


# -------------------------------------------------------------------------------- captions


def clean_text(text: str) -> str:
    """Drop control/format characters, NFKC-normalise and collapse whitespace.

    Dropping comes first, so a letter and its accent that a dropped character kept apart still
    compose: the result is NFKC and cleaning it again changes nothing.
    """
    kept = (
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in _DROP_CATEGORIES
    )
    return " ".join(unicodedata.normalize("NFKC", "".join(kept)).split())


def cut_at_word(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, at a word boundary when there is one."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    space = head.rfind(" ")
    cut = head[:space] if space >= limit // 2 else text[:limit]
    return cut.rstrip(" ,;:-")


def _raw_values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# A raw caption longer than _PREFIX_FACTOR * max_caption_chars + 1024 characters is cleaned from
# a prefix first (a 100 MB CSV field must not cost a full NFKC pass when only
# ``max_caption_chars`` of it are kept).
_PREFIX_FACTOR = 8


# Printable ASCII is never dropped, never reordered and never the second half of a composition:
# NFKC never reaches across it.
_BOUNDARY = re.compile("[\x20-\x7e]")


def _clean_one(value: str, cfg: ValidationConfig) -> str:
    """``clean_text`` of one caption, looking only at a long enough prefix of a giant one.

    The prefix ends before a printable ASCII character (see ``_BOUNDARY``; a combining sequence
    cut in two would be reordered differently), so its cleaned text is a prefix of the whole one's.
    """
    limit, size = cfg.max_caption_chars, _PREFIX_FACTOR * cfg.max_caption_chars + 1024
    if len(value) > size:
        end = max((m.start() for m in _BOUNDARY.finditer(value, limit, size)), default=0)
        head = clean_text(value[:end])
        if len(head) > limit + 64:  # cut_at_word reads only text[: limit + 1]: same result
            return head
    return clean_text(value)


def _clean_field(values: list[Any], cfg: ValidationConfig, stats: Counter) -> list[str]:
    """The usable, cleaned, exactly-deduplicated captions of one field, in order."""
    kept: list[str] = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            stats["captions_dropped"] += 1
            continue
        text = _clean_one(value, cfg)
        if len(text) > cfg.max_caption_chars:
            text = cut_at_word(text, cfg.max_caption_chars)
            stats["captions_truncated"] += 1
        if len(text) < cfg.min_caption_chars:
            stats["captions_dropped"] += 1
            continue
        if text not in kept:
            kept.append(text)
    return kept


def clean_captions(
    raw: dict[str, Any], fields: tuple[str, ...], cfg: ValidationConfig, stats: Counter,
    optional: frozenset[str] | set[str] = frozenset(),
) -> dict[str, list[str]]:
    """Clean every caption of every field; count dropped and truncated ones in ``stats``.

    A field in ``optional`` may end with no caption (an empty list, counted in
    ``stats["optional_captions_missing"]``); each such field lowers ``cfg.min_captions`` by one
    for this sample (never below 1), so a sample with all its required captions is judged on
    those alone. With no fields at all (a labelled image set such as ImageNet) no caption is
    needed: ``min_captions`` is 0.

    Raises:
        SampleRejected: a required field has no usable caption, or fewer than the (lowered)
            ``min_captions`` in total.
    """
    out: dict[str, list[str]] = {}
    missing_optional: list[str] = []
    for name in fields:
        values = _raw_values(raw.get(name))
        kept = _clean_field(values, cfg, stats)
        if not kept and name in optional:
            missing_optional.append(name)
            stats["optional_captions_missing"] += 1
        elif not kept:
            raise SampleRejected(
                R.MISSING_CAPTION,
                f"no usable {name!r} caption ({len(values)} raw value(s); empty, not text or "
                f"shorter than min_caption_chars {cfg.min_caption_chars} after cleaning)",
            )
        out[name] = kept
    total = sum(len(v) for v in out.values())
    needed = max(1, cfg.min_captions - len(missing_optional)) if fields else 0
    if total < needed:
        excused = f" (lowered from {cfg.min_captions}: optional {missing_optional} missing)"
        raise SampleRejected(
            R.TOO_FEW_CAPTIONS,
            f"{total} caption(s) in all fields, min_captions is {needed}{excused if missing_optional else ''}",
        )
    return out


# ---------------------------------------------------------------------------------- sample


def validate_sample(
    raw: RawSample,
    fields: tuple[str, ...],
    cfg: ValidationConfig,
    *,
    max_side: int,
    jpeg_quality: int,
    stats: Counter,
) -> tuple[SampleRecord, bytes]:
    """Validate one raw sample.

    Returns:
        ``(record, jpg_bytes)``.

    Raises:
        SampleRejected: with the reason code; the sample belongs in quarantine.
    """
    if raw.error is not None:
        raise SampleRejected(*raw.error)
    captions = clean_captions(raw.captions, fields, cfg, stats, raw.optional)
    rgb, (orig_w, orig_h), pixel_hash = normalise_image(raw.image, cfg, max_side)
    jpg = encode_jpeg(rgb, jpeg_quality)
    caption_hash = hashlib.blake2b(
        json.dumps(captions, sort_keys=True, ensure_ascii=False).encode(), digest_size=16
    ).hexdigest()
    label = clean_text(raw.label) if isinstance(raw.label, str) else None
    record = SampleRecord(
        key=raw.key, source=raw.source, source_id=raw.source_id, label=label or None,
        captions=captions, width=rgb.width, height=rgb.height, orig_width=orig_w,
        orig_height=orig_h, pixel_hash=pixel_hash, caption_hash=caption_hash,
    )
    return record, jpg
