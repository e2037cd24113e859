"""Raw captions into an LLM2CLIP model's space: the caption encoder joined with the model.

:class:`~llm2clip.vision.model.LLM2CLIPModel` maps *precomputed* LLM caption embeddings
(``encode_text_embeddings``); turning caption strings into those embeddings needs the caption
encoder of :mod:`llm2clip.text`. This module joins the two, so neither package imports the other
(``tests/test_import_graph.py``). Serving joins them the same way in :mod:`llm2clip.pyfunc`.

    model = LLM2CLIPModel.from_pretrained("models/vision")          # names its caption encoder
    text = encode_text(model, ["a red circle", "two blue boats"])   # (2, embed_dim), unit norm
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from llm2clip.text.encoder import CaptionEncoder
    from llm2clip.vision.model import LLM2CLIPModel

# model -> (caption encoder spec, the loaded encoder). Weak keys: dropping the model frees the LLM;
# kept out of the model so the encoder is never a submodule (nor in its state dict).
_ENCODERS: weakref.WeakKeyDictionary[Any, tuple[str, Any]] = weakref.WeakKeyDictionary()


def caption_encoder_of(model: LLM2CLIPModel) -> CaptionEncoder:
    """The caption encoder ``model.caption_encoder`` names, loaded on first use, then cached.

    Raises:
        ValueError: The model names no caption encoder, or one of another width than its adapter.
        FileNotFoundError: The caption encoder is a local path that does not exist (at once: a
            missing path is never tried as a hub id).
    """
    spec = model.caption_encoder
    cached = _ENCODERS.get(model)
    if cached is not None and cached[0] == spec:
        return cached[1]
    if not spec:
        raise ValueError("encode_text needs a caption encoder: pass caption_encoder=<dir> to "
                         "LLM2CLIPModel.from_pretrained (or use model.encode_text_embeddings)")
    from llm2clip.text.encoder import CaptionEncoder  # heavy; only when text is encoded
    from llm2clip.text.loading import looks_local

    try:
        encoder = CaptionEncoder.from_pretrained(spec)  # a missing local path fails at once
    except FileNotFoundError as err:
        if "://" in spec or Path(spec).expanduser().exists() or not looks_local(spec):
            raise
        origin = getattr(model, "_caption_encoder_origin", "")
        origin = f" ({origin})" if origin else ""
        raise FileNotFoundError(
            errno.ENOENT, f"caption encoder {spec} does not exist{origin}: pass caption_encoder=<dir> "
            "to LLM2CLIPModel.from_pretrained, or use model.encode_text_embeddings", spec) from err
    if encoder.dim != model.llm_dim:
        raise ValueError(f"caption encoder {spec} gives dim {encoder.dim}, the adapter expects {model.llm_dim}")
    _ENCODERS[model] = (spec, encoder)
    return encoder


def encode_text(model: LLM2CLIPModel, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Embed raw captions: caption encoder (frozen LLM) -> the model's adapter.

    Args:
        model: The LLM2CLIP model; its ``caption_encoder`` names the encoder.
        texts: ``N`` captions.
        batch_size: Captions per LLM forward pass.

    Returns:
        ``(N, embed_dim)`` unit-norm float32 on CPU.

    Raises:
        ValueError, FileNotFoundError: As :func:`caption_encoder_of`.
    """
    embeddings = caption_encoder_of(model).encode(list(texts), batch_size=batch_size)
    return model.encode_text_embeddings(embeddings)
