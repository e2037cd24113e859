"""What every image-text loss object shares: the call contract, the output dict, input checks.

A loss is built once (``create_loss("clip")``) and called every step as
``loss_fn(image_features, text_features, logit_scale, logit_bias)``. It returns a
:class:`LossOutput` dict, so a training loop can log the loss and its in-batch accuracy without
knowing which loss it runs: ``(out["logits_per_image"].argmax(1) == out["labels"]).float().mean()``.

The class attributes tell the model what the loss wants from it: ``needs_bias`` (whether the
model must own a learnable ``logit_bias``) and the initial values of its temperature parameter
``init_logit_scale`` (the log of the inverse temperature; the model passes ``exp`` of it) and
of its bias ``init_logit_bias`` (None when the loss takes no bias).
"""

from __future__ import annotations

from typing import ClassVar, TypedDict

import torch


class LossOutput(TypedDict):
    """What a loss object returns (this rank's view).

    Attributes:
        loss: Scalar fp32 loss of this rank, the one to ``backward``.
        logits_per_image: ``(B, N)`` scores of this rank's ``B`` images against the ``N`` texts
            the loss compares them with (the whole gathered batch for CLIP, this rank's own
            ``B`` texts for SigLIP).
        logits_per_text: ``(B, N)`` the same for this rank's texts against images.
        labels: ``(B,)`` the column of each row's matching pair, so
            ``argmax(logits_per_image, 1) == labels`` is the in-batch top-1 accuracy.
    """

    loss: torch.Tensor
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    labels: torch.Tensor


class ContrastiveLoss:
    """Base of the image-text losses (see the module docstring for the contract).

    Attributes:
        name: The key of the loss in :data:`llm2clip.losses.LOSSES`.
        needs_bias: True when the loss expects a learnable scalar ``logit_bias`` from the model.
        init_logit_scale: Initial value of the model's ``logit_scale`` parameter (log of the
            inverse temperature) this loss was designed with.
        init_logit_bias: Initial value of the model's ``logit_bias``; None when ``needs_bias``
            is False.
    """

    name: ClassVar[str]
    needs_bias: ClassVar[bool] = False
    init_logit_scale: ClassVar[float]
    init_logit_bias: ClassVar[float | None] = None

    def __init__(self, gather: bool = True) -> None:
        """Args:
            gather: Compare this rank's pairs with every rank's (a no-op without a process
                group); False = this rank's batch only.
        """
        self.gather = gather

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gather={self.gather})"

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> LossOutput:
        raise NotImplementedError


def check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Image and text features must be ``(B, D)`` of the same shape (row i pairs with row i)."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image {tuple(image_features.shape)} and text {tuple(text_features.shape)} "
                         "features must both be (B, D) of the same shape")


def as_scalar(value: torch.Tensor, what: str) -> torch.Tensor:
    """A one-element tensor (``[]`` or ``[1]``, any float dtype) as an fp32 0-d tensor, with grad."""
    if value.numel() != 1:
        raise ValueError(f"{what} must hold one value, got shape {tuple(value.shape)}")
    return value.float().reshape(())
