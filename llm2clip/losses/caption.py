"""Caption-contrastive loss of the LLM2Vec stage (the LLM learns to embed captions).

:func:`caption_contrastive_loss` is LLM2Vec's ``HardNegativeNLLLoss`` (supervised SimCSE): each
query's positive competes with every positive and every hard negative of the *global* batch,
gathered across ranks with gradient by :func:`llm2clip.train.distributed.all_gather_with_grad`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm2clip.train.distributed import all_gather_with_grad


def caption_contrastive_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    *,
    scale: float = 50.0,
    gather: bool = True,
) -> torch.Tensor:
    """InfoNCE over cosine similarities with in-batch and hard negatives.

    For query ``i`` of this rank the candidates are ``[P_all; N_all]``: the positives of every
    rank followed by the hard negatives of every rank (gathered with gradient), and the target
    is its own positive at ``offset + i``.

    Args:
        queries: ``(B, D)`` query embeddings of this rank (need not be normalised).
        positives: ``(B, D)`` the matching positives (same order as ``queries``).
        hard_negatives: ``(B, D)`` one hard negative per query, or None.
        scale: Multiplies the cosine similarities (1/temperature; 50 = tau 0.02).
        gather: Gather candidates from every rank (no-op in a world of one).

    Returns:
        Scalar mean cross-entropy over this rank's queries (fp32). Averaging it over ranks
        (what DeepSpeed does to the gradients) gives the loss of the global batch.
    """
    if queries.shape != positives.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} differ")
    q = F.normalize(queries.float(), dim=-1)
    candidates = [F.normalize(positives.float(), dim=-1)]
    if hard_negatives is not None:
        if hard_negatives.shape != positives.shape:
            raise ValueError(f"hard_negatives {tuple(hard_negatives.shape)} != positives")
        candidates.append(F.normalize(hard_negatives.float(), dim=-1))
    offset = 0
    if gather:
        gathered = [all_gather_with_grad(c) for c in candidates]
        offset = gathered[0][1]
        candidates = [g for g, _ in gathered]
    cand = torch.cat(candidates)  # (W*B [+ W*B], D)
    logits = scale * q @ cand.T  # (B, W*B [+ W*B])
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)
