"""The paper's evaluation protocols on top of the per-field metrics: headline retrieval and CRA.

* **Headline** (``<set>.headline.*``): one caption field of a set, scored the way the paper
  reports that kind of set. ``multi_caption`` (COCO 5k / Flickr30k 1k, 5 captions per image):
  image->text is a hit at k when any caption of the image is in the top k, every caption is a
  text->image query (:func:`llm2clip.eval.retrieval.multi_caption_metrics`, equal to the
  reference ``zeroshot_retrieval.py``); ``one_to_one`` (ShareGPT4V-1k, Urban1k, DOCCI: one long
  caption per image): the image and the first caption of the field
  (:func:`llm2clip.eval.retrieval.clip_metrics`); ``auto``: ``multi_caption`` when some image has
  more than one caption of the field, else ``one_to_one`` (where both give the same numbers).
  ``mean_R_at_1`` = mean of the headline image->text and text->image R@1.
* **CRA** (``<set>.cra.*``, the paper's caption retrieval accuracy, arXiv 2411.04997v6 Table A1):
  for every image with at least two captions of the field, its first two captions are a pair;
  each caption retrieves, top-1, among all the pairs' captions but itself, and must find its
  partner; reported per direction and averaged. Scored on the caption encoder's own stored
  embeddings (the tuned LLM's space, before the vision model's adapter) with
  :func:`llm2clip.text.cra.cra_from_embeddings`.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "multi_caption", "one_to_one")
HEADLINE_KS = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")


def resolve_protocol(protocol: str, text_to_image: torch.Tensor) -> str:
    """``multi_caption`` or ``one_to_one`` for a field whose captions belong to ``text_to_image``.

    Raises:
        ValueError: an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"retrieval protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    if protocol != "auto":
        return protocol
    owners = torch.as_tensor(text_to_image).long()
    several = owners.numel() > 0 and bool((torch.bincount(owners) > 1).any())
    return "multi_caption" if several else "one_to_one"


def headline(field_metrics: dict[str, float], protocol: str) -> dict[str, float]:
    """The headline metrics of one field from its already computed metrics.

    Args:
        field_metrics: The field's metrics without the ``<set>.<field>.`` prefix: the 1:1 keys
            (``image_to_text_R_at_1``, ...) and the ``multi_`` ones.
        protocol: ``multi_caption`` or ``one_to_one`` (resolved).

    Returns:
        ``image_to_text_R_at_{1,5,10}``, ``text_to_image_R_at_{1,5,10}`` and ``mean_R_at_1``.
    """
    source = "multi_" if protocol == "multi_caption" else ""
    out = {f"{d}_R_at_{k}": field_metrics[f"{source}{d}_R_at_{k}"] for d in DIRECTIONS for k in HEADLINE_KS}
    out["mean_R_at_1"] = (out["image_to_text_R_at_1"] + out["text_to_image_R_at_1"]) / 2
    return out


def cra(first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """CRA of N caption pairs (rows of ``first`` and ``second`` pair up); see the module doc.

    Returns:
        ``R_at_1`` (mean of both directions), ``first_to_second_R_at_1``,
        ``second_to_first_R_at_1`` and ``pairs``.
    """
    from llm2clip.text.cra import cra_from_embeddings

    scored = cra_from_embeddings(torch.as_tensor(first).float(), torch.as_tensor(second).float())
    return {"R_at_1": scored["cra"], "first_to_second_R_at_1": scored["cra_first_to_second"],
            "second_to_first_R_at_1": scored["cra_second_to_first"], "pairs": scored["pairs"]}
