"""COCO / Flickr30k retrieval through the Karpathy split files (``dataset_coco.json``,
``dataset_flickr30k.json``; Karpathy & Fei-Fei, CVPR 2015), as CLIP_benchmark and LAVIS read them.

Layout::

    {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "cocoid": 391895, "sentids": [...],
         "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...]}, ...]}

Flickr30k entries have no ``filepath`` (the images sit in ``flickr30k-images/``) nor ``cocoid``.
One sample per image of the chosen split; its captions are the ``raw`` sentences in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llm2clip.config.benchmarks import KarpathySource
from llm2clip.data.benchmarks.files import field_of, image_sample, join, list_field, parent, read_json, stem
from llm2clip.data.records import RawSample

LAYOUT = ('the Karpathy split JSON {"images": [{"filename", "split", "sentences": [{"raw"}], '
          '"filepath" (COCO), "cocoid" | "imgid"}]}')


def _entries(src: KarpathySource, endpoint_url: str) -> list[dict[str, Any]]:
    """The image entries of ``src.split``, every one checked for the keys the reader uses.

    Raises:
        StageError: the file is missing or not JSON, or a key of the layout is missing (naming
            the file, the entry and the key).
    """
    doc = read_json(src.path, endpoint_url, src.name, LAYOUT)
    chosen = []
    for i, entry in enumerate(list_field(doc, "images", src.path, LAYOUT)):
        where = f"{src.path}: images[{i}]"
        if field_of(entry, "split", where, LAYOUT) != src.split:
            continue
        field_of(entry, "filename", where, LAYOUT)
        for j, sentence in enumerate(list_field(entry, "sentences", where, LAYOUT)):
            field_of(sentence, "raw", f"{where}.sentences[{j}]", LAYOUT)
        chosen.append(entry)
    return chosen


def _raw_id(entry: dict[str, Any]) -> str:
    for key in ("cocoid", "imgid"):
        if entry.get(key) not in (None, ""):
            return str(entry[key])
    return stem(entry["filename"])


def open_karpathy(src: KarpathySource, endpoint_url: str = "") -> tuple[Iterator[RawSample], int]:
    """Read the split file now (layout errors surface here); the images as they are iterated.

    Returns:
        ``(samples, count)``.

    Raises:
        StageError: see :func:`_entries`.
    """
    entries = _entries(src, endpoint_url)
    root = src.image_root or parent(src.path)

    def samples() -> Iterator[RawSample]:
        for entry in entries:
            captions = [s["raw"] for s in entry["sentences"]]
            if src.max_captions:
                captions = captions[: src.max_captions]
            path = join(root, str(entry.get("filepath") or ""), entry["filename"])
            yield image_sample(src.name, _raw_id(entry), path, endpoint_url,
                               captions={src.caption_field: captions}, where=src.path)

    return samples(), len(entries)
