"""Image-text retrieval metrics on precomputed embeddings (pure functions, no model).

Two protocols, named apart because their numbers differ:

* **1:1 pairs** (:func:`clip_metrics`): image ``i`` belongs with text ``i``; open_clip's
  ``get_clip_metrics`` exactly (``open_clip_train/metrics.py`` on main, ``train.py`` on v3).
* **multi-caption** (:func:`multi_caption_metrics`): COCO/Flickr style, several captions per
  image (CLIP_benchmark, LLM2CLIP ``zeroshot_retrieval.py``); image->text is a hit at k when
  *any* of the image's captions is among the top-k texts.

Ranks are 0-based positions of the true partner in a descending sort of the scores
``logit_scale * image @ text.T`` (fp32). **Ties** are broken deterministically as in open_clip
main's chunked code: ``rank = #(strictly higher scores) + #(equal scores at a lower index)``, i.e. a
stable descending sort where, among equal scores, the lower index comes first. In the
multi-caption protocol the image->text rank is that of the *first* of the image's captions in
this order (the minimum over its captions).

Everything is computed in ``chunk_size x chunk_size`` blocks of the score matrix, so memory stays
at one block however large the eval set is.

Metric names are MLflow-safe (MLflow rejects ``@``); the mapping to open_clip's names is
``image_to_text_R_at_1 <-> image_to_text_R@1`` (see :func:`to_open_clip_names`)::

    {d}_mean_rank    mean(rank) + 1
    {d}_median_rank  floor(median(rank)) + 1
    {d}_R_at_{k}     mean(rank < k)          k in (1, 5, 10)

with ``d`` in ``image_to_text``, ``text_to_image``; the multi-caption protocol writes the same
keys prefixed with ``multi_``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")
MULTI_PREFIX = "multi_"


def _as_float32_2d(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def retrieval_ranks(
    image_emb,
    text_emb,
    text_to_image=None,
    *,
    logit_scale: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the true partner for every image and every text (the deterministic tie rule).

    Args:
        image_emb: (N, D) image embeddings (normalised or not; scores are plain dot products).
        text_emb: (M, D) text embeddings.
        text_to_image: (M,) int, the image each text belongs to; ``None`` means 1:1 pairs
            (M == N, text ``i`` belongs to image ``i``).
        logit_scale: multiplies the scores, as in open_clip (it can only create ties, never
            reorder).
        chunk_size: block side of the score matrix; ``None`` or <= 0 = one block.

    Returns:
        ``(image_to_text, text_to_image)`` int64 CPU tensors of shape (N,) and (M,). For an image
        with several captions its rank is that of its best-placed caption.

    Raises:
        ValueError: on bad shapes, out-of-range indices, or an image without any caption.
    """
    image = _as_float32_2d(image_emb, "image_emb")
    device = image.device
    text = _as_float32_2d(text_emb, "text_emb", device)
    n, m = image.shape[0], text.shape[0]
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"embedding dims differ: image {image.shape[1]} vs text {text.shape[1]}")
    if n == 0 or m == 0:
        raise ValueError("retrieval metrics need at least one image and one text")
    if not (bool(torch.isfinite(image).all()) and bool(torch.isfinite(text).all())):
        raise ValueError("embeddings contain NaN or inf; the encoder output is broken")
    if text_to_image is None:
        if n != m:
            raise ValueError(f"1:1 pairs need as many texts as images, got {n} images, {m} texts")
        owner = torch.arange(n, device=device)
    else:
        owner = torch.as_tensor(text_to_image, device=device).long().reshape(-1)
        if owner.numel() != m:
            raise ValueError(f"text_to_image has {owner.numel()} entries for {m} texts")
        if int(owner.min()) < 0 or int(owner.max()) >= n:
            raise ValueError(f"text_to_image must index images 0..{n - 1}")
        counts = torch.bincount(owner, minlength=n)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
            raise ValueError(f"images without any caption (first: {missing}); drop them first")
    size = n if not chunk_size or chunk_size <= 0 else int(chunk_size)
    scale = torch.tensor(float(logit_scale), device=device, dtype=torch.float32)

    # Pass 1, targets. img_best[i] = score of image i's first caption in the stable order (highest
    # score, lowest index among equals); txt_target[j] = score of text j with its own image.
    # Both come out of the same blocks pass 2 computes, so they are bitwise equal to them.
    neg_inf = torch.tensor(-math.inf, device=device)
    img_best = torch.full((n,), -math.inf, device=device)
    img_best_idx = torch.full((n,), m, device=device, dtype=torch.long)
    txt_target = torch.empty(m, device=device)
    for i0, i1 in _chunks(n, size):
        img_idx = torch.arange(i0, i1, device=device)[:, None]
        for t0, t1 in _chunks(m, size):
            positive = owner[None, t0:t1] == img_idx  # (ci, ct)
            if not bool(positive.any()):
                continue
            scores = scale * (image[i0:i1] @ text[t0:t1].T)
            masked = torch.where(positive, scores, neg_inf)
            best = masked.max(dim=1).values
            cols_idx = torch.arange(t0, t1, device=device)[None, :]
            arg = torch.where(positive & (masked == best[:, None]), cols_idx, m).min(dim=1).values
            has = positive.any(dim=1)
            better = has & (best > img_best[i0:i1])  # equal scores keep the earlier (lower) index
            img_best[i0:i1] = torch.where(better, best, img_best[i0:i1])
            img_best_idx[i0:i1] = torch.where(better, arg, img_best_idx[i0:i1])
            rows, cols = torch.nonzero(positive, as_tuple=True)
            txt_target[t0 + cols] = scores[rows, cols]

    # Pass 2, ranks: count what sorts strictly before the target.
    i2t = torch.zeros(n, device=device, dtype=torch.long)
    t2i = torch.zeros(m, device=device, dtype=torch.long)
    for i0, i1 in _chunks(n, size):
        img_idx = torch.arange(i0, i1, device=device)
        for t0, t1 in _chunks(m, size):
            txt_idx = torch.arange(t0, t1, device=device)
            scores = scale * (image[i0:i1] @ text[t0:t1].T)  # (ci, ct)
            row_t, row_idx = img_best[i0:i1, None], img_best_idx[i0:i1, None]
            before_img = (scores > row_t) | ((scores == row_t) & (txt_idx[None, :] < row_idx))
            col_t = txt_target[None, t0:t1]
            before_txt = (scores > col_t) | ((scores == col_t) & (img_idx[:, None] < owner[None, t0:t1]))
            i2t[i0:i1] += before_img.sum(dim=1)
            t2i[t0:t1] += before_txt.sum(dim=0)
    return i2t.cpu(), t2i.cpu()


def rank_metrics(name: str, ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """open_clip's summary of a rank vector, with MLflow-safe names.

    Args:
        name: key prefix, e.g. ``image_to_text``.
        ranks: (Q,) 0-based ranks.
        ks: cut-offs for recall.

    Returns:
        ``{name}_mean_rank``, ``{name}_median_rank`` and ``{name}_R_at_{k}`` as Python floats.
    """
    r = np.asarray(torch.as_tensor(ranks).cpu(), dtype=np.float64)
    out = {
        f"{name}_mean_rank": float(r.mean() + 1),
        f"{name}_median_rank": float(np.floor(np.median(r)) + 1),
    }
    for k in ks:
        out[f"{name}_R_at_{k}"] = float(np.mean(r < k))
    return out


def clip_metrics(
    image_emb,
    text_emb,
    logit_scale: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    *,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """open_clip's 1:1 retrieval metrics (``get_clip_metrics``) on N paired embeddings.

    Args:
        image_emb: (N, D) image embeddings; row ``i`` pairs with ``text_emb[i]``.
        text_emb: (N, D) text embeddings.
        logit_scale: score scale ``s`` in ``s * image @ text.T`` (open_clip passes exp(logit_scale)).
        chunk_size: block side of the score matrix (``None`` = one block).
        ks: recall cut-offs (open_clip: 1, 5, 10).

    Returns:
        ``image_to_text_{mean_rank,median_rank,R_at_1,R_at_5,R_at_10}`` and the same for
        ``text_to_image``; floats.
    """
    i2t, t2i = retrieval_ranks(image_emb, text_emb, None, logit_scale=logit_scale, chunk_size=chunk_size)
    return {**rank_metrics("image_to_text", i2t, ks), **rank_metrics("text_to_image", t2i, ks)}


def multi_caption_metrics(
    image_emb,
    text_emb,
    text_to_image,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    logit_scale: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """COCO/Flickr multi-caption retrieval (the CLIP_benchmark protocol).

    image->text is a hit at k when any caption of the image is in the top-k of all M texts;
    text->image is a hit when the text's image is in the top-k of all N images. Ties follow the
    module's rule (stable descending order, lower index first). With one caption per image
    (``text_to_image == arange(N)``) every value equals :func:`clip_metrics`.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (M, D) caption embeddings.
        text_to_image: (M,) int, the image index of each caption; every image needs >= 1.
        ks: recall cut-offs.
        logit_scale: score scale.
        chunk_size: block side of the score matrix.

    Returns:
        ``multi_image_to_text_*`` and ``multi_text_to_image_*`` keys: ``mean_rank``,
        ``median_rank`` (rank of the best caption for images) and ``R_at_{k}``.
    """
    i2t, t2i = retrieval_ranks(
        image_emb, text_emb, text_to_image, logit_scale=logit_scale, chunk_size=chunk_size
    )
    return {
        **rank_metrics(f"{MULTI_PREFIX}image_to_text", i2t, ks),
        **rank_metrics(f"{MULTI_PREFIX}text_to_image", t2i, ks),
    }


def recall_at_ks(ranks, max_k: int) -> list[float]:
    """Recall@k for k = 1..max_k from (Q,) 0-based ranks: ``[mean(rank < 1), ..., mean(rank < K)]``."""
    r = torch.as_tensor(ranks).cpu().long()
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    hist = torch.bincount(r.clamp(max=max_k), minlength=max_k + 1)[:max_k]  # ranks 0..K-1
    return (hist.cumsum(0).double() / max(r.numel(), 1)).tolist()


def recall_curve(
    image_emb,
    text_emb,
    text_to_image=None,
    *,
    max_k: int = 50,
    logit_scale: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> dict[str, list[float]]:
    """Recall@k for k = 1..max_k in both directions (the data behind the recall plot).

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (M, D) text embeddings.
        text_to_image: (M,) image index per text; ``None`` = 1:1 pairs.
        max_k: largest k.
        logit_scale: score scale.
        chunk_size: block side of the score matrix.

    Returns:
        ``{"image_to_text": [R@1, ..., R@max_k], "text_to_image": [...]}``.
    """
    i2t, t2i = retrieval_ranks(
        image_emb, text_emb, text_to_image, logit_scale=logit_scale, chunk_size=chunk_size
    )
    return {"image_to_text": recall_at_ks(i2t, max_k), "text_to_image": recall_at_ks(t2i, max_k)}


def to_open_clip_names(metrics: dict[str, float]) -> dict[str, float]:
    """Rename ``..._R_at_k`` keys to open_clip's ``..._R@k`` (for comparing with its logs)."""
    return {key.replace("_R_at_", "_R@"): value for key, value in metrics.items()}
