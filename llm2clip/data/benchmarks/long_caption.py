"""Long-caption retrieval sets, one long caption per image, in their released layouts.

``sharegpt4v`` (ShareGPT4V, Chen et al. 2023; ShareGPT4V-1k = its first 1000 entries, as in
Long-CLIP and LLM2CLIP): a JSON list of ::

    {"id": "sa_545504", "image": "sam/images/sa_545504.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the photo?"},
                       {"from": "gpt", "value": "<the long caption>"}]}

the caption being the first ``gpt`` turn; image paths are relative to the image root.

``urban1k`` (Urban1k, Zhang et al. 2024, Long-CLIP): ``Urban1k/image/<n>.jpg`` and
``Urban1k/caption/<n>.txt`` (same ``<n>``).

``docci`` (DOCCI, Onoe et al. 2024): ``docci_descriptions.jsonlines``, one JSON object per line
``{"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description":
"..."}``, the images in ``images/`` next to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llm2clip.config.benchmarks import LongCaptionSource
from llm2clip.data import records as R
from llm2clip.data.benchmarks.files import (
    field_of,
    image_sample,
    join,
    list_field,
    list_folder,
    parent,
    read_json,
    read_text,
    stem,
)
from llm2clip.data.records import RawSample, make_key
from llm2clip.data.sources import _read_bytes
from llm2clip.io import StageError

SHAREGPT4V = ('the ShareGPT4V JSON: a list of {"id", "image", "conversations": [{"from": "human", '
              '"value"}, {"from": "gpt", "value"}]}')
URBAN1K = "the Urban1k folder: image/<n>.jpg and caption/<n>.txt"
DOCCI = ('docci_descriptions.jsonlines: one {"example_id", "split", "image_file", "description"} per line, '
         'images in images/')
DOCCI_KEYS = ("example_id", "split", "image_file", "description")


@dataclass(frozen=True)
class _Entry:
    """One image of the set: its id, image path and caption (None: ``problem`` says why not)."""

    raw_id: str
    image: str
    caption: str | None
    problem: str = ""


def _take(items: list, limit: int) -> list:
    return items[:limit] if limit else items


def _gpt_turn(turns: list, where: str) -> str | None:
    """The first ``gpt`` turn's text (None when there is none)."""
    for j, turn in enumerate(turns):
        if field_of(turn, "from", f"{where}.conversations[{j}]", SHAREGPT4V) == "gpt":
            return field_of(turn, "value", f"{where}.conversations[{j}]", SHAREGPT4V)
    return None


def _sharegpt4v(src: LongCaptionSource, endpoint_url: str) -> list[_Entry]:
    doc = read_json(src.path, endpoint_url, src.name, SHAREGPT4V)
    if not isinstance(doc, list):
        raise StageError(f"source {src.name!r}: {src.path} holds a JSON {type(doc).__name__}; expected {SHAREGPT4V}")
    root = src.image_root or parent(src.path)
    entries = []
    for i, item in enumerate(_take(doc, src.resolved_limit)):
        where = f"{src.path}: entry [{i}]"
        image = str(field_of(item, "image", where, SHAREGPT4V))
        caption = _gpt_turn(list_field(item, "conversations", where, SHAREGPT4V), where)
        entries.append(_Entry(str(item.get("id") or stem(image)), join(root, image), caption,
                              f"{where} has no 'gpt' turn"))
    return entries


def _number_first(name: str) -> tuple:
    head = name.removesuffix(".txt")
    return (0, int(head), "") if head.isdigit() else (1, 0, head)


def _caption_file(path: str, endpoint_url: str) -> str | None:
    try:
        return _read_bytes(path, endpoint_url).decode("utf-8-sig")
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _urban1k(src: LongCaptionSource, endpoint_url: str) -> list[_Entry]:
    captions = join(src.path, "caption")
    texts = [n for n, is_dir in list_folder(captions, endpoint_url, src.name, URBAN1K)
             if not is_dir and n.endswith(".txt")]
    images = src.image_root or join(src.path, "image")
    found = {stem(n): n for n, is_dir in list_folder(images, endpoint_url, src.name, URBAN1K) if not is_dir}
    entries = []
    for name in _take(sorted(texts, key=_number_first), src.resolved_limit):
        n, text_path = name.removesuffix(".txt"), join(captions, name)
        entries.append(_Entry(n, join(images, found.get(n, f"{n}.jpg")), _caption_file(text_path, endpoint_url),
                              f"{text_path} cannot be read as UTF-8 text"))
    return entries


def _docci(src: LongCaptionSource, endpoint_url: str) -> list[_Entry]:
    text = read_text(src.path, endpoint_url, src.name, DOCCI)
    root = src.image_root or join(parent(src.path), "images")
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{src.path}:{n}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise StageError(f"{where} is not valid JSON ({err}); expected {DOCCI}") from None
        example, split, image, description = (field_of(row, key, where, DOCCI) for key in DOCCI_KEYS)
        if not src.split or split == src.split:
            entries.append(_Entry(str(example), join(root, str(image)), description))
    return _take(entries, src.resolved_limit)


LAYOUTS: dict[str, Callable[[LongCaptionSource, str], list[_Entry]]] = {
    "sharegpt4v": _sharegpt4v, "urban1k": _urban1k, "docci": _docci,
}


def _sample(src: LongCaptionSource, entry: _Entry, endpoint_url: str) -> RawSample:
    if entry.caption is None:
        return RawSample(src.name, entry.image, make_key(src.name, entry.raw_id),
                         error=(R.MISSING_CAPTION, entry.problem))
    return image_sample(src.name, entry.raw_id, entry.image, endpoint_url,
                        captions={src.caption_field: [entry.caption]})


def open_long_caption(src: LongCaptionSource, endpoint_url: str = "") -> tuple[Iterator[RawSample], int]:
    """Read the index of ``src.layout`` now (layout errors surface here); images as iterated.

    Returns:
        ``(samples, count)``.

    Raises:
        StageError: a file or folder of the layout is missing, or a JSON key (naming the file,
            the entry or line, and the key).
    """
    entries = LAYOUTS[src.layout](src, endpoint_url)
    return (_sample(src, entry, endpoint_url) for entry in entries), len(entries)
