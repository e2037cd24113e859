"""Zero-shot classification on precomputed embeddings (pure functions, no model).

The class embedding follows CLIP / LLM2CLIP ``zero_shot.py``: embed every prompt
``template.format(classname)``, L2-normalise each, average over the templates, renormalise.
Images are scored against the classes with ``image @ class_emb.T`` and counted correct at k when
their label is among the top-k classes. Ties use the same deterministic rule as the retrieval
metrics: the label's rank is ``#(strictly higher logits) + #(equal logits at a lower class index)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llm2clip.config.templates import DEFAULT_TEMPLATES, SINGLE_TEMPLATE

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4096

# The template lists live in llm2clip.config.templates (one definition); re-exported here.
__all__ = ["DEFAULT_TEMPLATES", "SINGLE_TEMPLATE", "build_prompts", "class_embeddings", "zeroshot_metrics"]


def build_prompts(classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """The prompt grid to embed: ``prompts[c][t] = templates[t].format(classnames[c])``.

    Args:
        classnames: C class names.
        templates: T format strings with one ``{}``.

    Returns:
        C lists of T prompts; embed them into a (C, T, D) tensor for :func:`class_embeddings`.
    """
    if not templates:
        raise ValueError("need at least one template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return [[t.format(name) for t in templates] for name in classnames]


def class_embeddings(prompt_emb) -> torch.Tensor:
    """Class embeddings from prompt embeddings: mean of L2-normalised prompts, renormalised.

    Args:
        prompt_emb: (C, T, D) embeddings of C classes x T templates (a (C, D) input is taken as
            T = 1).

    Returns:
        (C, D) float32, unit-norm rows.
    """
    e = torch.as_tensor(prompt_emb).float()
    if e.ndim == 2:
        e = e[:, None, :]
    if e.ndim != 3:
        raise ValueError(f"prompt_emb must be (C, T, D), got shape {tuple(e.shape)}")
    if e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"prompt_emb needs at least one class and one template, got {tuple(e.shape)}")
    mean = F.normalize(e, dim=-1).mean(dim=1)  # (C, D)
    return F.normalize(mean, dim=-1)


def zeroshot_metrics(
    image_emb,
    class_emb,
    labels,
    ks: Sequence[int] = (1, 5),
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Top-k accuracy of zero-shot classification.

    Args:
        image_emb: (N, D) image embeddings.
        class_emb: (C, D) class embeddings (see :func:`class_embeddings`).
        labels: (N,) int class index of each image.
        ks: cut-offs; a k larger than C is capped at C (accuracy 1.0), the key keeps the asked k.
        chunk_size: images scored per block.

    Returns:
        ``{"top1": ..., "top5": ...}`` (one ``top{k}`` per k), fractions in [0, 1].
    """
    image = torch.as_tensor(image_emb).float()
    classes = torch.as_tensor(class_emb).float().to(image.device)
    y = torch.as_tensor(labels, device=image.device).long().reshape(-1)
    if image.ndim != 2 or classes.ndim != 2 or image.shape[1] != classes.shape[1]:
        raise ValueError(
            f"need image (N, D) and class (C, D), got {tuple(image.shape)}, {tuple(classes.shape)}"
        )
    n, c = image.shape[0], classes.shape[0]
    if n == 0 or c == 0:
        raise ValueError("zero-shot metrics need at least one image and one class")
    if y.numel() != n:
        raise ValueError(f"{y.numel()} labels for {n} images")
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(f"labels must be class indices 0..{c - 1}")
    size = n if not chunk_size or chunk_size <= 0 else int(chunk_size)
    class_idx = torch.arange(c, device=image.device)[None, :]
    ranks = torch.empty(n, dtype=torch.long, device=image.device)
    for i0 in range(0, n, size):
        i1 = min(i0 + size, n)
        logits = image[i0:i1] @ classes.T  # (ci, C)
        yy = y[i0:i1, None]
        target = logits.gather(1, yy)
        before = (logits > target) | ((logits == target) & (class_idx < yy))
        ranks[i0:i1] = before.sum(dim=1)
    out = {}
    for k in ks:
        if k > c:
            log.warning("top-%d asked with only %d classes: capped at %d", k, c, c)
        out[f"top{k}"] = float((ranks < min(k, c)).double().mean())
    return out
