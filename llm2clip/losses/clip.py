"""CLIP's symmetric image-text InfoNCE, computed per rank against the gathered global batch.

:class:`ClipLoss` is the loss of open_clip's ``ClipLoss`` configured with ``local_loss=True`` and
``gather_with_grad=True`` (open_clip ``src/open_clip/loss.py``; LLM2CLIP's ``eva_clip/loss.py``
does the same): every rank gathers the image and text features of all ranks, with gradient,
and scores only its own ``B`` rows against them, so the logits take ``B x WB`` memory instead of
``WB x WB``. :func:`clip_loss` is the older functional form, kept for its callers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llm2clip.losses.base import ContrastiveLoss, LossOutput, as_scalar, check_pair
from llm2clip.train.distributed import all_gather_with_grad


class ClipLoss(ContrastiveLoss):
    """Symmetric softmax contrastive loss of CLIP (Radford et al. 2021), open_clip's variant.

    With ``s = logit_scale`` (already exponentiated, as the model returns it), optional scalar
    bias ``b``, this rank's ``I``, ``T`` (``(B, D)``, L2-normalised) and the gathered
    ``I_all``, ``T_all`` (``(WB, D)``, every rank's rows in rank order, this rank's at
    ``offset``)::

        logits_per_image = s * I @ T_all.T + b          # (B, WB)
        logits_per_text  = s * T @ I_all.T + b          # (B, WB)
        labels           = offset + arange(B)           # (B,)
        loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2

    The gather's backward sums each rank's gradient contributions, so the mean of the per-rank
    losses (what DeepSpeed's gradient averaging optimises) equals, value and gradient, the
    single-process loss on the concatenated global batch (with equal batch sizes per rank;
    ragged batches are allowed). Maths in fp32 whatever the input dtype.

    CLIP's temperature starts at 0.07 (``init_logit_scale = log(1/0.07)``) and it takes no bias.
    """

    name = "clip"
    needs_bias = False
    init_logit_scale = math.log(1 / 0.07)
    init_logit_bias = None

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> LossOutput:
        """Loss of this rank's batch against the global one.

        Args:
            image_features: ``(B, D)`` L2-normalised image embeddings of this rank.
            text_features: ``(B, D)`` L2-normalised text embeddings; row ``i`` pairs with image ``i``.
            logit_scale: ``exp`` of the model's log inverse temperature, shape ``[]`` or ``[1]``.
            logit_bias: Optional scalar added to every logit (open_clip allows one; CLIP has none).

        Returns:
            :class:`~llm2clip.losses.base.LossOutput` with ``(B, WB)`` logits and labels offset to
            this rank's rows of the gathered batch.
        """
        check_pair(image_features, text_features)
        image, text = image_features.float(), text_features.float()
        all_image, all_text, offset = image, text, 0
        if self.gather:
            all_image, offset = all_gather_with_grad(image)
            all_text, _ = all_gather_with_grad(text)
        scale = as_scalar(logit_scale, "logit_scale")
        logits_per_image = scale * image @ all_text.T  # (B, WB)
        logits_per_text = scale * text @ all_image.T  # (B, WB)
        if logit_bias is not None:
            bias = as_scalar(logit_bias, "logit_bias")
            logits_per_image, logits_per_text = logits_per_image + bias, logits_per_text + bias
        labels = offset + torch.arange(image.shape[0], device=image.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"loss": loss, "logits_per_image": logits_per_image, "logits_per_text": logits_per_text,
                "labels": labels}


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: bool = True,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`ClipLoss` as a function (the form the trainers used before the loss objects).

    Args:
        image_features: ``(B, D)`` L2-normalised image embeddings of this rank.
        text_features: ``(B, D)`` L2-normalised text embeddings (row ``i`` pairs with image ``i``).
        logit_scale: ``exp(logit_scale)``, shape ``[]`` or ``[1]`` (the model returns it).
        gather: Gather across ranks (no-op in a world of one); False = this rank's batch only.
        return_logits: Also return the logits and labels (for in-batch accuracy).

    Returns:
        The scalar fp32 loss; with ``return_logits``, ``(loss, logits_per_image (B, WB),
        logits_per_text (B, WB), labels (B,))``.
    """
    out = ClipLoss(gather=gather)(image_features, text_features, logit_scale)
    if return_logits:
        return out["loss"], out["logits_per_image"], out["logits_per_text"], out["labels"]
    return out["loss"]
