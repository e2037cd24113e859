"""The records that flow through prepare_data: raw samples in, kept samples and rejections out.

A source yields :class:`RawSample` objects (image bytes or a PIL image, raw caption values).
Validation turns each into a :class:`SampleRecord` (kept; its re-encoded jpg goes into the
group's intermediate tar, :mod:`llm2clip.data.groups`) or a :class:`Rejection` (one line of
``quarantine.jsonl``, with a reason code from :data:`REASONS`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

# Machine-readable reason codes of quarantine.jsonl -> what they mean.
NOT_AN_IMAGE = "not_an_image"
TRUNCATED_IMAGE = "truncated_image"
CORRUPT_IMAGE = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"
IMAGE_TOO_SMALL = "image_too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
TOO_FEW_CAPTIONS = "too_few_captions"
BAD_METADATA = "bad_metadata"
BAD_ENCODING = "bad_encoding"
UNREADABLE_SHARD = "unreadable_shard"
BAD_MEMBER = "bad_member"
DUPLICATE_KEY = "duplicate_key"
DUPLICATE = "duplicate"

REASONS: dict[str, str] = {
    NOT_AN_IMAGE: "the bytes are not an image format PIL knows",
    TRUNCATED_IMAGE: "the image file ends early",
    CORRUPT_IMAGE: "the image could not be decoded",
    DECOMPRESSION_BOMB: "the header claims more pixels than validation.max_image_pixels",
    IMAGE_TOO_SMALL: "width or height below validation.min_image_side",
    BAD_ASPECT_RATIO: "long side / short side above validation.max_aspect_ratio",
    MISSING_IMAGE: "the image file or member is missing",
    MISSING_CAPTION: "a caption field has no usable caption",
    TOO_FEW_CAPTIONS: "fewer than validation.min_captions captions in all fields together",
    BAD_METADATA: "the row / json metadata could not be parsed",
    BAD_ENCODING: "the manifest row has bytes that are not valid in the manifest's encoding",
    UNREADABLE_SHARD: "an input tar shard could not be read (to its end)",
    BAD_MEMBER: "a tar member of the sample is a link, FIFO or device (never followed), a second member of "
                "the same name, or larger than the read limit",
    DUPLICATE_KEY: "another sample (or manifest row) already has this key and cannot be merged with it",
    DUPLICATE: "same image and same captions as a kept sample",
}

# Rejections that are not defects of the sample itself: they do not count against
# validation.min_valid_fraction.
NOT_DEFECTS = frozenset({DUPLICATE})

KEY_PATTERN = r"^[A-Za-z0-9_-]+$"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def short_hash(text: str, n: int = 8) -> str:
    """First ``n`` hex digits of the sha256 of ``text``."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def printable(text: str) -> str:
    """``text`` made safe to write as UTF-8: lone surrogates become ``\\udcff`` escapes.

    They come from undecodable bytes (``surrogateescape``: tar member names, paths) or from
    ``"\\ud800"`` escapes in a JSON manifest; written as they are, they would crash the writer.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def make_key(source: str, raw_id: str) -> str:
    """A stable webdataset key ``<source>-<id>`` made only of ``[A-Za-z0-9_-]`` (no dots).

    An id that had to be changed to fit gets a short hash of the original appended, so two ids
    that differ only in unsafe characters (``a/b`` and ``a_b``) still get different keys.
    """
    safe_source = _UNSAFE.sub("_", source).strip("_") or "source"
    safe = _UNSAFE.sub("_", raw_id).strip("_")[:80]
    if safe != raw_id or not safe:
        safe = f"{safe}_{short_hash(raw_id)}" if safe else short_hash(raw_id)
    return f"{safe_source}-{safe}"


@dataclass
class RawSample:
    """One sample as a source yields it, before any validation.

    Attributes:
        source: Name of the source (``prepare_data.sources[i].name``).
        source_id: The original id or path (for tracing a sample back).
        key: Proposed output key (see :func:`make_key`).
        image: Encoded image bytes, or a PIL image from a generator, or None when missing.
        captions: Output caption name -> raw value (None, a string or a list of them).
        label: Optional class label (e.g. the shape class or emoji name).
        error: ``(reason, detail)`` when the source could not even read the sample.
        line: 1-based line of a manifest row (the first row of a merged sample); None otherwise.
        optional: Caption names this sample may lack (``optional_captions`` of its source).
    """

    source: str
    source_id: str
    key: str
    image: Any = None
    captions: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    error: tuple[str, str] | None = None
    line: int | None = None
    optional: frozenset[str] = frozenset()


@dataclass
class SampleRecord:
    """A sample that passed validation (its re-encoded jpg travels apart from it: in a group tar)."""

    key: str
    source: str
    source_id: str
    label: str | None
    captions: dict[str, list[str]]
    width: int
    height: int
    orig_width: int
    orig_height: int
    pixel_hash: str
    caption_hash: str
    split: str = ""

    def meta(self, caption_fields: tuple[str, ...]) -> dict[str, Any]:
        """The ``json`` member of the sample in the output shard."""
        return {
            "key": self.key,
            "captions": {name: list(self.captions.get(name, [])) for name in caption_fields},
            "source": self.source,
            "source_id": printable(self.source_id),
            "width": self.width,
            "height": self.height,
            "label": self.label,
        }


@dataclass(frozen=True)
class Rejection:
    """One line of ``quarantine.jsonl`` (``line``: the manifest line, None for other sources)."""

    key: str | None
    source: str
    source_id: str
    reason: str
    detail: str
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "source": self.source, "source_id": printable(self.source_id),
            "reason": self.reason, "detail": printable(self.detail), "line": self.line,
        }


class SampleRejected(Exception):
    """Raised inside validation; carries the reason code and a human-readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
