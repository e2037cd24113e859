"""The paper's published numbers for released checkpoints, and which evaluated model is one.

``published.yaml`` (next to this module) holds, per released model, the numbers the paper prints
for it with their table references. An evaluated model gets that row in the paper-layout table
only when it is an import of that release (:func:`match_release`); any other model, including
one trained here from the same tower, gets no published row at all.

Matching rule: the vision model dir's manifest has ``imported_from`` (written by ``llm2clip
import openai-vit|eva02``), and for exactly one entry of the file

1. ``imported_from.kind`` is the entry's ``kind`` (``openai-vit`` / ``eva02``);
2. the release is named: ``imported_from.release`` (the snapshot's own ``_name_or_path``) is the
   entry's repo id, or a folder of ``imported_from.source`` is named after it: the repo name
   (``.../LLM2CLIP-Openai-L-14-336``) or the Hugging Face cache folder
   (``models--microsoft--LLM2CLIP-Openai-L-14-336``), case-insensitive;
3. the model's input size, when known, is the entry's ``image_size``.

A snapshot in a folder named otherwise is not matched (rename the folder, or re-import from the
hub cache path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


@dataclass(frozen=True)
class PublishedNumbers:
    """Numbers from one table of the paper.

    Attributes:
        reference: Paper version, table and row they were read from.
        columns: ``{column: {metric: percent}}`` (``coco: {i2t: 68.5, t2i: 54.8}``).
        note: What the reader should know about them.
    """

    reference: str
    columns: dict[str, dict[str, float]]
    note: str = ""


@dataclass(frozen=True)
class PublishedModel:
    """One released model's published numbers.

    Attributes:
        name: The release's short name (``LLM2CLIP-Openai-L-14-336``).
        release: Its Hugging Face repo id.
        kind: The importer kind that reads it.
        image_size: Its input size.
        paper: The paper version the numbers come from.
        why_this_row: Why these rows of the paper stand for this release.
        numbers: One entry per table read.
    """

    name: str
    release: str
    kind: str
    image_size: int
    paper: str = ""
    why_this_row: str = ""
    numbers: tuple[PublishedNumbers, ...] = field(default_factory=tuple)

    def value(self, column: str, metric: str) -> tuple[float, str] | None:
        """``(percent, reference)`` the paper prints for ``column``/``metric``; None where it prints none."""
        for numbers in self.numbers:
            found = numbers.columns.get(column, {}).get(metric)
            if found is not None:
                return float(found), numbers.reference
        return None

    def notes(self) -> list[str]:
        return [f"{n.reference}: {n.note}" for n in self.numbers if n.note]


def load_published(path: str | Path = PUBLISHED_FILE) -> list[PublishedModel]:
    """Every released model of the data file.

    Raises:
        ValueError: an entry without ``release``, ``kind``, ``image_size`` or ``numbers``, or a
            value that is not a number.
    """
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    models = []
    for name, entry in (raw.get("models") or {}).items():
        missing = [k for k in ("release", "kind", "image_size", "numbers") if k not in entry]
        if missing:
            raise ValueError(f"{path}: models.{name} lacks {missing}")
        numbers = []
        for item in entry["numbers"]:
            columns = {c: {m: float(v) for m, v in metrics.items()} for c, metrics in item["columns"].items()}
            numbers.append(PublishedNumbers(str(item["reference"]), columns, str(item.get("note", "")).strip()))
        models.append(PublishedModel(name, str(entry["release"]), str(entry["kind"]), int(entry["image_size"]),
                                     str(raw.get("paper", "")), str(entry.get("why_this_row", "")).strip(),
                                     tuple(numbers)))
    return models


def _names_release(imported_from: dict[str, Any], model: PublishedModel) -> bool:
    release = str(imported_from.get("release") or "").lower()
    if release and release == model.release.lower():
        return True
    wanted = model.name.lower()
    parts = [p.lower() for p in PurePosixPath(str(imported_from.get("source") or "").replace("\\", "/")).parts]
    return any(p == wanted or p.endswith(f"--{wanted}") for p in parts)


def match_release(imported_from: dict[str, Any] | None, image_size: int | None = None,
                  models: list[PublishedModel] | None = None) -> PublishedModel | None:
    """The released model an evaluated model is an import of (module doc: the rule); else None.

    Args:
        imported_from: The vision model manifest's ``imported_from`` (None: not an import).
        image_size: The model's input size, when known.
        models: The published models (default: the data file's).
    """
    if not imported_from:
        return None
    candidates = [m for m in (models if models is not None else load_published())
                  if m.kind == imported_from.get("kind") and _names_release(imported_from, m)
                  and (not image_size or m.image_size == int(image_size))]
    if len(candidates) != 1:
        log.info("evaluate: imported %s model from %s matches %s published releases; no published row",
                 imported_from.get("kind"), imported_from.get("source"), len(candidates) or "no")
        return None
    return candidates[0]
