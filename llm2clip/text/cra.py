"""CRA (caption retrieval accuracy), LLM2CLIP's gate for a caption encoder.

Protocol (the paper leaves the gallery open; this is the stricter reading): for every val image
the first two captions (``caption_fields`` order, flattened) are a pair; each caption is a query
that must retrieve its partner, top-1, among ALL val captions (both captions of every image)
except itself. The two directions are averaged.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from llm2clip.text.data import ImageCaptions

log = logging.getLogger(__name__)

CRA_PROTOCOL = "val first-two-captions, gallery=all val captions minus query, top-1, mean of both directions"


def cra_pairs(images: list[ImageCaptions], caption_fields: tuple[str, ...],
              max_images: int = 0) -> tuple[list[str], list[str]]:
    """The first two captions of every image that has two (``max_images`` > 0 caps the count)."""
    firsts, seconds = [], []
    for image in images:
        flat = image.flat(caption_fields)
        if len(flat) >= 2:
            firsts.append(flat[0][1])
            seconds.append(flat[1][1])
        if max_images and len(firsts) == max_images:
            break
    return firsts, seconds


def cra_from_embeddings(first: torch.Tensor, second: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """CRA from the embeddings of the pairs.

    Args:
        first: ``(N, D)`` embeddings of each image's first caption.
        second: ``(N, D)`` embeddings of each image's second caption (same order).
        chunk: Queries per similarity block (memory ~ chunk x 2N floats).

    Returns:
        ``cra`` (mean of both directions), ``cra_first_to_second``, ``cra_second_to_first``,
        ``pairs`` (N). Ties go to the lower gallery index.
    """
    n = first.shape[0]
    if n < 2 or second.shape[0] != n:
        raise ValueError(f"CRA needs >= 2 pairs of equal count, got {n} and {second.shape[0]}")
    gallery = F.normalize(torch.cat([first, second]).float(), dim=-1)  # (2N, D): [first; second]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # partner of gallery row i
    hits = torch.zeros(2 * n, dtype=torch.bool)
    for start in range(0, 2 * n, chunk):
        rows = torch.arange(start, min(start + chunk, 2 * n))
        sims = gallery[rows] @ gallery.T  # (chunk, 2N)
        sims[torch.arange(len(rows)), rows] = float("-inf")  # a query never retrieves itself
        hits[rows] = sims.argmax(1) == target[rows]
    forward, backward = hits[:n].float().mean().item(), hits[n:].float().mean().item()
    return {"cra": (forward + backward) / 2, "cra_first_to_second": forward,
            "cra_second_to_first": backward, "pairs": float(n)}


def caption_retrieval_accuracy(encoder, images: list[ImageCaptions], caption_fields: tuple[str, ...],
                               *, batch_size: int = 64, max_images: int = 0,
                               progress: bool = False) -> dict[str, float]:
    """Embed the val pairs with ``encoder`` (a CaptionEncoder) and score them (see module doc)."""
    firsts, seconds = cra_pairs(images, caption_fields, max_images)
    emb = encoder.encode(firsts + seconds, batch_size=batch_size, normalize=True, progress=progress)
    result = cra_from_embeddings(emb[: len(firsts)], emb[len(firsts):])
    log.info("CRA %.4f over %d pairs", result["cra"], len(firsts))
    return result
