"""The parts of a vision import both released families share: the adapter's dims read from the
weights, the caption encoder it pairs with, and the output dir (model + manifest)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from llm2clip.contracts import write_manifest
from llm2clip.importers import ImportResult
from llm2clip.importers.common import provenance, written_or_emptied
from llm2clip.io import StageError, sha256_file
from llm2clip.vision.model import CONFIG_FILE, WEIGHTS_FILE, LLM2CLIPModel

log = logging.getLogger(__name__)


def adapter_dims(state: dict[str, torch.Tensor], prefix: str, what: str) -> dict[str, Any]:
    """The reference adapter's sizes from its weights (``TextProj`` / HF ``LLM2CLIP_Adapter``).

    ``<prefix>.<i>.fn.0`` is block ``i``'s first Linear (``d -> e*d``); after ``B`` blocks come
    ``<prefix>.<B>`` (LayerNorm ``d``) and ``<prefix>.<B+1>`` (Linear ``d -> embed_dim``).

    Returns:
        ``llm_dim``, ``embed_dim``, ``num_blocks`` and ``expansion``.

    Raises:
        StageError: the adapter's LayerNorm/Linear are not where the block count puts them.
    """
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.fn\.0\.weight")
    blocks = sorted(int(m.group(1)) for m in map(pattern.fullmatch, state) if m)
    if blocks != list(range(len(blocks))):
        raise StageError(f"{what}: adapter blocks {blocks} are not numbered 0..{len(blocks) - 1}")
    count = len(blocks)
    norm, linear = f"{prefix}.{count}.weight", f"{prefix}.{count + 1}.weight"
    missing = [k for k in (norm, linear) if k not in state]
    if missing:
        raise StageError(f"{what} is not in the released layout: no adapter {missing} "
                         f"(after {count} blocks come a LayerNorm and a Linear)")
    llm_dim, embed_dim = int(state[norm].shape[0]), int(state[linear].shape[0])
    expansion = (float(state[f"{prefix}.0.fn.0.weight"].shape[0]) / llm_dim) if count else 2.0
    return {"llm_dim": llm_dim, "embed_dim": embed_dim, "num_blocks": count,
            "expansion": int(expansion) if expansion.is_integer() else expansion}


def caption_encoder_record(caption_encoder: str | None) -> tuple[str | None, str | None]:
    """``(absolute path, fingerprint)`` of the caption encoder dir the model is paired with.

    Raises:
        StageError: not a local directory.
    """
    if not caption_encoder:
        return None, None
    path = Path(caption_encoder).expanduser()
    if not path.is_dir():
        raise StageError(f"--caption-encoder {caption_encoder} is not a directory (import the released caption "
                         "encoder first: `llm2clip import caption-encoder SRC DIR`)")
    from llm2clip.text.embed import encoder_fingerprint

    return str(path.resolve()), encoder_fingerprint(path)


def write_vision_import(model: LLM2CLIPModel, dst: Path, kind: str, src: Path, source_files: dict[str, str],
                        *, release: str | None, dropped: dict[str, str], filled: dict[str, str],
                        notes: list[str], **extra: Any) -> ImportResult:
    """Save ``model`` in ``dst`` and, last, its manifest (the train_vision contract, so evaluate and
    register take the dir like a trained model), with ``imported_from``.

    Returns:
        What was written.
    """
    with written_or_emptied(dst):
        _write(model, dst, kind, src, source_files, release, dropped, filled, notes, extra)
    mapped = len(model.state_dict()) - len(filled)
    log.info("imported %s from %s into %s: %d tensors mapped, %d source keys dropped, filled %s",
             kind, src, dst, mapped, len(dropped), sorted(filled) or "nothing")
    for note in notes:
        log.info("import %s: %s", kind, note)
    return ImportResult(kind, str(src), str(dst), mapped, dropped, filled, tuple(notes))


def _write(model: LLM2CLIPModel, dst: Path, kind: str, src: Path, source_files: dict[str, str],
           release: str | None, dropped: dict[str, str], filled: dict[str, str], notes: list[str],
           extra: dict[str, Any]) -> None:
    model.save_pretrained(dst)
    record = provenance(kind, src, source_files, release=release, dropped=dropped, filled=filled, notes=notes,
                        **extra)
    write_manifest("train_vision", dst, {
        "config_hash": None,
        "model": {"config": CONFIG_FILE, "weights": WEIGHTS_FILE, "embed_dim": model.embed_dim,
                  "llm_embedding_dim": model.llm_dim, "tower": model.tower.spec.kind},
        "training": None,
        "inputs": {"imported_from": {"kind": kind, "source": str(src), "files": source_files}},
        "val_protocol": None,
        "files": {name: sha256_file(dst / name) for name in (WEIGHTS_FILE, CONFIG_FILE)},
        "imported_from": record,
    })
