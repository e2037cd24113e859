"""Image-caption tables: cross-lingual retrieval sets in the COCO-CN / Flickr30k-CN style.

The format is given by columns (:class:`~llm2clip.config.CaptionTableSource`), e.g.

Flickr30k-CN (Lan et al. 2017), header-less TSV, one caption per line::

    1000092795.jpg#zhc#0<TAB>两个年轻人在户外的一个院子里。

with ``image_column: 0``, ``caption_column: 1``, ``image_pattern: '^(?P<image>[^#]+)#'``;
COCO-CN (Li et al. 2019): ids such as ``COCO_val2014_000000xxxxxx`` (``image_suffix: .jpg``)
and a split file ``coco-cn_test.txt`` with one id per line (``ids_file``).

Rows of one image merge into one sample, captions in file order; a row that cannot be used
(too few columns, bad JSON, an image value the pattern does not match) is a quarantined sample
naming its line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llm2clip.config.benchmarks import CaptionTableSource
from llm2clip.data import records as R
from llm2clip.data.benchmarks.files import image_sample, join, parent, read_text, stem
from llm2clip.data.records import RawSample, make_key
from llm2clip.io import StageError

LAYOUT = "a tsv/csv/jsonl table with the image and caption columns the source names"


@dataclass
class _Image:
    """The rows of one image: first line, image file name, captions in file order."""

    line: int
    file: str
    captions: list[Any] = field(default_factory=list)


def _delimited(src: CaptionTableSource, text: str) -> Iterator[tuple[int, dict | list | None]]:
    """``(line, row)`` of a tsv/csv table; the header (if any) is checked and turns rows into dicts."""
    tsv = src.table_format == "tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header: list[str] | None = None
    if src.header:
        header = next(reader, [])
        missing = [c for c in (src.image_column, src.caption_column) if c not in header]
        if missing:
            raise StageError(f"{src.path}: no column {missing[0]!r} in the header {header[:12]}; set the source's "
                             "image_column / caption_column (or header: false and 0-based indexes)")
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num
        if row:
            yield start, dict(zip(header, row, strict=False)) if header is not None else row


def _jsonl(src: CaptionTableSource, text: str) -> Iterator[tuple[int, dict | list | None]]:
    checked = False
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict) and not checked:  # the first object shows whether the columns are right
            missing = [c for c in (src.image_column, src.caption_column) if c not in row]
            if missing:
                raise StageError(f"{src.path}:{n} has no {missing[0]!r} key (keys: {sorted(row)[:12]}); set the "
                                 "source's image_column / caption_column")
            checked = True
        yield n, row if isinstance(row, dict) else None


def _cell(row: dict | list, column: str | int) -> Any:
    if isinstance(row, dict):
        return row.get(column)
    return row[column] if isinstance(column, int) and column < len(row) else None


def _image_file(src: CaptionTableSource, pattern: re.Pattern | None, value: Any) -> str | None:
    """The image file name a row's image value names (None: the pattern does not match)."""
    text = str(value).strip() if value is not None else ""
    if pattern is not None:
        found = pattern.search(text)
        text = found.group("image").strip() if found and found.group("image") else ""
    if not text:
        return None
    return text if os.path.splitext(text)[1] else text + src.image_suffix


def _wanted(src: CaptionTableSource, endpoint_url: str) -> set[str] | None:
    if not src.ids_file:
        return None
    text = read_text(src.ids_file, endpoint_url, src.name, "a split file with one image id per line")
    return {stem(line.strip()) for line in text.splitlines() if line.strip()}


def _group(src: CaptionTableSource, endpoint_url: str) -> list[_Image | RawSample]:
    """Every image of the table (rows merged, in order of first appearance) and every bad row."""
    text = read_text(src.path, endpoint_url, src.name, LAYOUT)
    rows = _jsonl(src, text) if src.table_format == "jsonl" else _delimited(src, text)
    pattern = re.compile(src.image_pattern) if src.image_pattern else None
    wanted = _wanted(src, endpoint_url)
    out: list[_Image | RawSample] = []
    images: dict[str, _Image] = {}
    for n, row in rows:
        file = _image_file(src, pattern, _cell(row, src.image_column)) if row is not None else None
        if file is None:
            why = "not a JSON object" if row is None else f"no image id in column {src.image_column!r}" + (
                f" matching image_pattern {src.image_pattern!r}" if pattern else "")
            out.append(RawSample(src.name, f"{src.path}:{n}", make_key(src.name, f"line-{n}"),
                                 error=(R.BAD_METADATA, f"line {n}: {why}"), line=n))
            continue
        image_id = stem(file)
        if wanted is not None and image_id not in wanted:
            continue
        if image_id not in images:
            images[image_id] = _Image(n, file)
            out.append(images[image_id])
        caption = _cell(row, src.caption_column)
        images[image_id].captions += caption if isinstance(caption, list) else [caption]
    return out


def open_caption_table(src: CaptionTableSource, endpoint_url: str = "") -> tuple[Iterator[RawSample], int]:
    """Read and group the table now (layout errors surface here); the images as iterated.

    Returns:
        ``(samples, count)``; keys are ``<name>-<image id without extension>``.

    Raises:
        StageError: the table or ids file is missing, or a named column is not in it.
    """
    entries = _group(src, endpoint_url)
    root = src.image_root or parent(src.path)

    def samples() -> Iterator[RawSample]:
        for entry in entries:
            if isinstance(entry, RawSample):
                yield entry
                continue
            sample = image_sample(src.name, stem(entry.file), join(root, entry.file), endpoint_url,
                                  captions={src.caption_field: entry.captions}, where=f"{src.path}:{entry.line}")
            sample.line = entry.line
            yield sample

    return samples(), len(entries)
