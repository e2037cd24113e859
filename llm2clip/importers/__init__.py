"""Import the released LLM2CLIP checkpoints: ``llm2clip import <kind> SRC DST``.

Each kind reads a *local* snapshot of a released Hugging Face repo (``SRC``; nothing is
downloaded, no remote code runs, weights are safetensors or a pickle-free ``.bin``/``.pt`` read
with ``weights_only=True``) and writes one of our own artifacts to ``DST``:

- ``openai-vit``: ``microsoft/LLM2CLIP-Openai-{L-14-336,L-14-224,B-16}`` (HF ``CLIPVisionModel``
  tower, projection, adapter) -> an ``LLM2CLIPModel`` dir (:mod:`llm2clip.importers.openai_vit`);
- ``eva02``: ``microsoft/LLM2CLIP-EVA02-{L-14-336,B-16}`` (their eva_clip ``.pt`` state dict) -> an
  ``LLM2CLIPModel`` dir (:mod:`llm2clip.importers.eva02`);
- ``caption-encoder``: ``microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned`` (and the 3.2-1B one)
  -> a caption-encoder dir (:mod:`llm2clip.importers.caption_encoder`).

The mapping is strict: every source tensor is used or dropped by a named rule, every target
tensor is filled, and anything else is one :class:`~llm2clip.io.StageError` listing the keys.
``docs/released-checkpoints.md`` gives the layouts, where each was read, and what had to be assumed.

This module is light (no torch at import); a kind's module is imported when it runs. The CLI runs
the importers as a program (:mod:`llm2clip.importers.command`), so no pipeline stage depends on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm2clip.io import StageError


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote.

    Attributes:
        kind: The importer kind.
        source: The source directory (absolute).
        output: The directory written.
        mapped: Number of target tensors (or files, for the caption encoder) filled from the source.
        dropped: Source key (or file) -> why it was not used.
        filled: Target key -> how it was filled without a source tensor.
        notes: Assumptions that could not be checked against the source.
    """

    kind: str
    source: str
    output: str
    mapped: int
    dropped: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "output": self.output, "mapped": self.mapped,
                "dropped": len(self.dropped), "filled": sorted(self.filled)}


def _openai_vit() -> Callable[..., ImportResult]:
    from llm2clip.importers.openai_vit import import_openai_vit

    return import_openai_vit


def _eva02() -> Callable[..., ImportResult]:
    from llm2clip.importers.eva02 import import_eva02

    return import_eva02


def _caption_encoder() -> Callable[..., ImportResult]:
    from llm2clip.importers.caption_encoder import import_caption_encoder

    return import_caption_encoder


@dataclass(frozen=True)
class ImporterKind:
    """One row of :data:`KINDS`.

    Attributes:
        name: The kind (the CLI's first argument).
        summary: One line for ``--help``.
        releases: The Hugging Face repos whose snapshots it reads.
        writes: ``vision model`` (an ``LLM2CLIPModel`` dir) or ``caption encoder``.
        load: Returns the import function ``(src, dst, **options) -> ImportResult``.
        options: The keyword options the import function takes (CLI flags).
    """

    name: str
    summary: str
    releases: tuple[str, ...]
    writes: str
    load: Callable[[], Callable[..., ImportResult]]
    options: tuple[str, ...] = ()


VISION_OPTIONS = ("caption_encoder", "overwrite")

KINDS: dict[str, ImporterKind] = {kind.name: kind for kind in (
    ImporterKind("openai-vit", "LLM2CLIP-Openai-* (CLIP ViT tower + head + adapter) -> LLM2CLIPModel dir",
                 ("microsoft/LLM2CLIP-Openai-L-14-336", "microsoft/LLM2CLIP-Openai-L-14-224",
                  "microsoft/LLM2CLIP-Openai-B-16"), "vision model", _openai_vit, VISION_OPTIONS),
    ImporterKind("eva02", "LLM2CLIP-EVA02-* (eva_clip .pt: EVA02 tower + head + adapter) -> LLM2CLIPModel dir",
                 ("microsoft/LLM2CLIP-EVA02-L-14-336", "microsoft/LLM2CLIP-EVA02-B-16"), "vision model",
                 _eva02, VISION_OPTIONS),
    ImporterKind("caption-encoder", "LLM2CLIP-Llama-3-*-CC-Finetuned -> caption-encoder dir (model, tokenizer, "
                 "settings, manifest)", ("microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
                                          "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned"),
                 "caption encoder", _caption_encoder, ("link", "overwrite")),
)}


def importer_kind(name: str) -> ImporterKind:
    """The row of ``name``.

    Raises:
        StageError: An unknown kind; the message lists the known ones.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise StageError(f"unknown import kind {name!r}; expected one of {list(KINDS)}") from None


def import_checkpoint(kind: str, src: str, dst: str, **options: Any) -> ImportResult:
    """Import the release snapshot ``src`` of ``kind`` into ``dst``.

    Args:
        kind: A key of :data:`KINDS`.
        src: Local directory: a snapshot of the released Hugging Face repo.
        dst: Local directory to write (created; must be empty unless ``overwrite``).
        **options: The kind's options (:attr:`ImporterKind.options`); None values are left out.

    Raises:
        StageError: Unknown kind, an option the kind does not take, or a source that is not in
            the released layout (the message lists the keys).
    """
    row = importer_kind(kind)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(row.options))
    if unknown:
        raise StageError(f"import {kind}: options {unknown} do not apply; it takes {list(row.options)}")
    return row.load()(src, dst, **given)
