"""The image-text losses by name: one table, one constructor (the ``create_loss`` of open_clip)."""

from __future__ import annotations

from typing import Any

from llm2clip.losses.base import ContrastiveLoss
from llm2clip.losses.clip import ClipLoss
from llm2clip.losses.siglip import SigLipLoss

LOSSES: dict[str, type[ContrastiveLoss]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def create_loss(name: str, **kwargs: Any) -> ContrastiveLoss:
    """Build the loss registered as ``name`` with the keyword arguments of its class.

    Args:
        name: A key of :data:`LOSSES` (``clip``, ``siglip``).
        **kwargs: Passed to the class (e.g. ``gather=False``).

    Raises:
        ValueError: ``name`` is not a known loss; the message lists the known ones.
    """
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (known losses: {', '.join(sorted(LOSSES))})") from None
    return cls(**kwargs)
