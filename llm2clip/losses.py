"""Contrastive losses.

``caption_contrastive_loss`` is LLM2Vec's ``HardNegativeNLLLoss`` (supervised SimCSE): each
query's positive competes with every positive and every hard negative of the *global* batch,
gathered across ranks with gradient. ``clip_loss`` is open_clip's symmetric image-text InfoNCE
with ``local_loss`` + ``gather_with_grad``; both use
:func:`llm2clip.train.distributed.all_gather_with_grad`.
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


# --------------------------------------------------------------------------------------------
# CLIP image-text loss (train_vision)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: bool = True,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``.

    Each rank scores its own ``B`` images against the texts of *every* rank and its own texts
    against every image (features all-gathered with gradient), with labels offset by the rank's
    position in the gathered batch (open_clip ``loss.py``; LLM2CLIP ``eva_clip/loss.py``). The
    logit memory is ``B x WB`` instead of ``WB x WB``. The mean of this loss over ranks (which
    DeepSpeed's gradient averaging takes) equals, value and gradient, the single-process loss on
    the concatenated global batch (open_clip: "one-to-one numerical results").

    Args:
        image_features: ``(B, D)`` L2-normalised image embeddings of this rank.
        text_features: ``(B, D)`` L2-normalised text embeddings (row ``i`` pairs with image ``i``).
        logit_scale: ``exp(logit_scale)``, shape ``[]`` or ``[1]`` (the model returns it).
        gather: Gather across ranks (no-op in a world of one); False = this rank's batch only.
        return_logits: Also return the logits and labels (for in-batch accuracy).

    Returns:
        The scalar fp32 loss ``(CE(s I_local T_all^T) + CE(s T_local I_all^T)) / 2``; with
        ``return_logits``, ``(loss, logits_per_image (B, WB), logits_per_text (B, WB),
        labels (B,))``.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"image {tuple(image_features.shape)} and text {tuple(text_features.shape)} "
                         "features differ in shape")
    image, text = image_features.float(), text_features.float()
    all_image, all_text, offset = image, text, 0
    if gather:
        all_image, offset = all_gather_with_grad(image)
        all_text, _ = all_gather_with_grad(text)
    scale = logit_scale.float().reshape(())
    logits_per_image = scale * image @ all_text.T  # (B, WB)
    logits_per_text = scale * text @ all_image.T  # (B, WB)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    if return_logits:
        return loss, logits_per_image, logits_per_text, labels
    return loss
