"""Contrastive losses.

* Image-text losses, as objects chosen by name (:data:`LOSSES`, :func:`create_loss`):
  :class:`ClipLoss` (CLIP's softmax InfoNCE, open_clip's local loss with gather-with-grad) and
  :class:`SigLipLoss` (SigLIP's pairwise sigmoid loss, texts exchanged around a ring of ranks).
  Each is called as ``loss_fn(image_features, text_features, logit_scale, logit_bias)`` and
  returns a :class:`LossOutput` dict (``loss``, ``logits_per_image``, ``logits_per_text``,
  ``labels``); its class attributes say whether the model needs a bias and how to initialise
  the temperature and bias.
* :func:`clip_loss`: the functional form of :class:`ClipLoss` that the trainers call today.
* :func:`caption_contrastive_loss`: LLM2Vec's hard-negative InfoNCE for the caption encoder.
"""

from llm2clip.losses.base import ContrastiveLoss, LossOutput
from llm2clip.losses.caption import caption_contrastive_loss
from llm2clip.losses.clip import ClipLoss, clip_loss
from llm2clip.losses.registry import LOSSES, create_loss
from llm2clip.losses.siglip import SigLipLoss

__all__ = [
    "LOSSES",
    "ClipLoss",
    "ContrastiveLoss",
    "LossOutput",
    "SigLipLoss",
    "caption_contrastive_loss",
    "clip_loss",
    "create_loss",
]
