"""Captions out of prepare_data shards (images are never decoded).

Reads through :mod:`llm2clip.data.shards`, so the data contract (manifest stage and format,
caption fields, shard checksums) is checked exactly as every other stage checks it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageCaptions:
    """The named captions of one image.

    Attributes:
        key: The sample key.
        captions: ``{field: [caption, ...]}``.
    """

    key: str
    captions: dict[str, list[str]]

    def flat(self, fields: tuple[str, ...]) -> list[tuple[str, str]]:
        """``[(field, caption), ...]`` in ``fields`` order (fields the sample lacks are skipped)."""
        return [(f, c) for f in fields for c in self.captions.get(f, []) if c.strip()]


def read_splits(
    data_dir: str | Path, splits: tuple[str, ...] = ("train", "val"), *, caption_fields: tuple[str, ...],
    endpoint_url: str = "", verify: bool = True,
) -> dict[str, list[ImageCaptions]]:
    """Every image of the given splits with its named captions, in shard order.

    Args:
        data_dir: A prepare_data output (local or ``s3://``).
        splits: Which splits to read.
        caption_fields: The fields to read, in order (``common.caption_fields``); the data
            manifest must list each of them.
        endpoint_url: S3 endpoint for ``s3://`` dirs.
        verify: Check every shard's sha256 against the manifest first.

    Returns:
        ``{split: [ImageCaptions, ...]}``.

    Raises:
        StageError: no/foreign manifest, a missing caption field, a checksum mismatch.
    """
    from llm2clip.data.shards import iter_samples, load_manifest, verify_shards

    data_dir = str(data_dir)
    manifest = load_manifest(data_dir, endpoint_url, caption_fields)
    if verify:
        verify_shards(data_dir, manifest, endpoint_url)
    out: dict[str, list[ImageCaptions]] = {}
    for split in splits:
        samples = iter_samples(data_dir, split, endpoint_url=endpoint_url, manifest=manifest, decode=False)
        out[split] = [
            ImageCaptions(s.key, {f: [c for c in s.captions.get(f, []) if isinstance(c, str)]
                                  for f in caption_fields})
            for s in samples
        ]
        log.info("%s/%s: %d images", data_dir, split, len(out[split]))
    return out


def read_captions(data_dir: str | Path, split: str, *, caption_fields: tuple[str, ...],
                  endpoint_url: str = "", verify: bool = True) -> list[ImageCaptions]:
    """One split of :func:`read_splits`."""
    return read_splits(data_dir, (split,), caption_fields=caption_fields, endpoint_url=endpoint_url,
                       verify=verify)[split]
