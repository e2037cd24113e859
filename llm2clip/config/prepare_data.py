"""``prepare_data``: where samples come from (one dataclass per source kind), checks, shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llm2clip.config.base import ConfigError
from llm2clip.config.benchmarks import CaptionTableSource, ImageNetSource, KarpathySource, LongCaptionSource

# Caption styles of the synthetic scenes (``SyntheticSource.captions``), see llm2clip.data.synthetic.
SYNTHETIC_CAPTION_STYLES = ("short", "dense", "long", "de", "fr")


@dataclass(frozen=True)
class SyntheticSource:
    """Built-in compositional scenes (shapes, colours, sizes, counts, relations, words).

    Deterministic by seed.

    Attributes:
        captions: Output caption field -> style: ``short`` (``two red circles left of a blue
            star``), ``dense`` (every attribute, in other words), ``long`` (a paragraph of several
            sentences, ShareGPT4V/DOCCI style), ``de`` / ``fr`` (the short caption in German /
            French). Empty (the default): the first of ``common.caption_fields`` gets the short
            caption and every further one the dense caption. Otherwise it must name exactly
            ``common.caption_fields``, e.g. ``{"de": "de"}`` for a German retrieval set.
    """

    kind: Literal["synthetic"] = "synthetic"
    name: str = "synthetic"
    count: int = 400
    image_size: int = 128
    captions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, style in self.captions.items():
            if not name or style not in SYNTHETIC_CAPTION_STYLES:
                raise ConfigError(
                    f"synthetic source {self.name!r}: captions.{name or '<empty>'} = {style!r} "
                    f"(caption field -> style) is not valid; known styles: {list(SYNTHETIC_CAPTION_STYLES)}"
                )


@dataclass(frozen=True)
class EmojiSource:
    """Noto Color Emoji glyphs with their human-written CLDR names (``emoji`` package).

    ``count`` 0 takes every renderable emoji. Off with a clear message when the font is absent.
    """

    kind: Literal["emoji"] = "emoji"
    name: str = "emoji"
    count: int = 0
    image_size: int = 96
    font_path: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def _check_optional_captions(where: str, optional: tuple[str, ...], captions: dict[str, str], key: str) -> None:
    """Optional caption names must be caption names, and at least one caption must stay required."""
    unknown = [n for n in optional if n not in captions]
    if unknown or (captions and set(captions) <= set(optional)):
        raise ConfigError(f"{where}: optional_captions {list(optional)} must be names of {key} "
                          f"{sorted(captions)}, and at least one must stay required")


@dataclass(frozen=True)
class WebDatasetSource:
    """img2dataset-style webdataset shards (``jpg``/``png``/``webp`` + ``txt`` + ``json``).

    Attributes:
        urls: Brace pattern or comma-separated list, local paths or ``s3://``.
        caption_fields: Output caption name -> source field: ``txt`` or ``json:<key>``
            (e.g. ``{"short": "json:shortSV_captions", "dense": "json:longSV_captions"}``).
            A json field may hold a string or a list of strings.
        label_field: Optional class label, same syntax (``cls`` or ``json:<key>``); empty: none.
        optional_captions: Caption names (keys of ``caption_fields``) used when present: a
            sample whose optional field is missing or empty is kept without it (see
            :class:`ManifestSource`). At least one caption name must stay required.
    """

    kind: Literal["webdataset"] = "webdataset"
    name: str = "webdataset"
    urls: str = ""
    caption_fields: dict[str, str] = field(default_factory=lambda: {"short": "txt"})
    label_field: str = ""
    optional_captions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_optional_captions(f"webdataset source {self.name!r}", self.optional_captions,
                                 self.caption_fields, "caption_fields")


@dataclass(frozen=True)
class ManifestSource:
    """A CSV or JSONL manifest plus an image folder.

    Attributes:
        path: The ``.csv`` / ``.jsonl`` file (local or ``s3://``).
        image_root: Folder image paths are relative to; empty: the manifest's folder.
        image_column: Column holding the image path.
        caption_columns: Output caption name -> column (a JSONL value may be a list).
        key_column: Column with a stable sample id; empty: derived from the image path.
            Rows with the same id (or, without ``key_column``, the same image) are ONE sample:
            their captions are merged per name in file order, exact duplicates once (the
            COCO / Flickr layout, one row per caption). Rows of one id that name another image
            or another label are quarantined (``duplicate_key``, with the line number).
        label_column: Optional column with a class label (for zero-shot eval); empty: none.
        optional_captions: Caption names (keys of ``caption_columns``) used when present, e.g.
            ``[dense]`` for a column that is empty in most rows. A sample lacking an optional
            caption is kept without it (its caption list is empty) instead of being quarantined;
            each missing optional name lowers ``validation.min_captions`` by one for that
            sample, so a sample with every required caption always passes when ``min_captions``
            is at most the number of caption names. At least one name must stay required.
        encoding: Text encoding of the manifest. ``auto``: UTF-8 (a UTF-8 or UTF-16 byte-order
            mark is honoured); a file without one valid multi-byte UTF-8 character that is not
            UTF-8 is read as ``cp1252`` (Windows Latin-1, a superset of printable ISO-8859-1) with
            a warning that counts the characters read that way. Otherwise (and with an explicit
            encoding) bytes that are not valid in the encoding are never replaced: their row
            is quarantined (``bad_encoding``, line number, count) and the total is logged.
    """

    kind: Literal["manifest"] = "manifest"
    name: str = "manifest"
    path: str = ""
    image_root: str = ""
    image_column: str = "image"
    caption_columns: dict[str, str] = field(default_factory=lambda: {"short": "caption"})
    key_column: str = ""
    label_column: str = ""
    optional_captions: tuple[str, ...] = ()
    encoding: str = "auto"

    def __post_init__(self) -> None:
        import codecs

        _check_optional_captions(f"manifest source {self.name!r}", self.optional_captions,
                                 self.caption_columns, "caption_columns")
        if self.encoding != "auto":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ConfigError(
                    f"manifest source {self.name!r}: unknown encoding {self.encoding!r} "
                    "(use auto or a Python codec name: utf-8, cp1252, latin-1, shift_jis, ...)"
                ) from None


from llm2clip.config.dvc_source import DvcSource  # noqa: E402 (it wraps the two kinds above)

Source = (SyntheticSource | EmojiSource | WebDatasetSource | ManifestSource
          | KarpathySource | LongCaptionSource | ImageNetSource | CaptionTableSource | DvcSource)


@dataclass(frozen=True)
class ValidationConfig:
    """Per-sample checks and the table-level great-expectations gate.

    Attributes:
        min_image_side: Smallest accepted width/height in pixels.
        max_aspect_ratio: Largest accepted long side / short side.
        max_image_pixels: Decompression-bomb guard: larger images are rejected before decoding.
        min_caption_chars: Shortest accepted caption after normalisation.
        max_caption_chars: Longer captions are cut at a word boundary (and counted).
        min_captions: Samples with fewer named captions are rejected.
        min_valid_fraction: The stage fails when fewer samples than this survive.
        max_rows: Upper row-count bound of the great-expectations suite.
    """

    min_image_side: int = 32
    max_aspect_ratio: float = 4.0
    max_image_pixels: int = 40_000_000
    min_caption_chars: int = 3
    max_caption_chars: int = 2000
    min_captions: int = 2
    min_valid_fraction: float = 0.9
    max_rows: int = 100_000_000


@dataclass(frozen=True)
class PrepareDataConfig:
    """prepare_data: sources -> validated, deduplicated, split webdataset shards.

    Attributes:
        sources: Where samples come from; several are mixed in order.
        val_fraction: Share of keys (by hash) that go to ``val``.
        shard_size: Samples per output shard.
        image_max_side: Images are downscaled so the long side is at most this.
        jpeg_quality: Quality of the re-encoded jpg.
        eval_set: Empty for training data (``train``/``val`` split by ``val_fraction``). The name
            of an ``eval_data`` entry when this run prepares that evaluation set (set by
            ``prepare_data --eval-set NAME``): every kept sample goes into the one split ``test``
            and the manifest records the name.
        workers: Processes that validate, re-encode and write shards (``llm2clip.data.groups``);
            0 = one per core this process may use (its CPU affinity, capped by a container's CPU
            limit), or none for a run too small to pay for starting them (one group, or fewer
            than 2000 samples known in advance); 1 = all in this process. The output is
            byte-identical for any value, and it is left out of the manifest's ``config_hash``.
    """

    sources: tuple[Source, ...] = (SyntheticSource(),)
    val_fraction: float = 0.1
    shard_size: int = 256
    image_max_side: int = 256
    jpeg_quality: int = 90
    validation: ValidationConfig = ValidationConfig()
    eval_set: str = ""
    workers: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("prepare_data.sources: at least one source is needed")
        if self.workers < 0:
            raise ConfigError(f"prepare_data.workers: must be >= 0 (0 = one per core), got {self.workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"prepare_data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"prepare_data.sources: source names must be unique, got {names}")
        if self.shard_size < 1:
            raise ConfigError("prepare_data.shard_size: must be >= 1")
