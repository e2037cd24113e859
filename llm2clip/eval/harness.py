"""Evaluate an LLM2CLIP model on prepared eval sets: embed once, then every metric.

An eval set is a prepare_data output (images + named captions) with its embed_captions output
(key-aligned caption embeddings, and zero-shot prompt embeddings when the samples are labelled).
The model embeds the images; its adapter maps the stored caption embeddings into the joint space.
Nothing here runs the LLM.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llm2clip import contracts
from llm2clip.data.sidecars import iter_lockstep
from llm2clip.eval.retrieval import clip_metrics, multi_caption_metrics, recall_curve
from llm2clip.eval.zeroshot import class_embeddings, zeroshot_metrics
from llm2clip.io import StageError, is_remote, s3_filesystem
from llm2clip.lineage import rerun

log = logging.getLogger(__name__)

PROTOCOL = (
    "1:1 = open_clip get_clip_metrics on (image, first caption of the field) pairs; "
    "multi_ = CLIP_benchmark protocol, a hit if any caption of the image is in the top k; "
    "ties ranked by a stable descending sort; mean_R_at_1 = mean of image->text and "
    "text->image 1:1 R@1 over the caption fields; zero-shot class embedding = renormalised "
    "mean of the normalised prompt embeddings (class names x templates)"
)


@dataclass
class EmbeddedSet:
    """Everything a set's metrics need, in the joint space (rows L2-normalised, float32).

    Attributes:
        image_emb: (N, D) one row per image.
        text_emb: caption field -> (M_f, D) every caption of that field.
        text_to_image: caption field -> (M_f,) index of each caption's image.
        first_caption: caption field -> (N,) row in ``text_emb[field]`` of each image's first
            caption of that field (meaningless where the image has none: see ``captioned``).
        captioned: caption field -> (N,) bool, the images with at least one caption of that
            field (an optional field may be missing); a field's metrics use only those images.
        labels: (N,) class label strings (None where a sample has none).
        class_emb: (C, D) zero-shot class embeddings, when the set has prompt embeddings.
        classnames: the C class names.
    """

    image_emb: torch.Tensor
    text_emb: dict[str, torch.Tensor] = field(default_factory=dict)
    text_to_image: dict[str, torch.Tensor] = field(default_factory=dict)
    first_caption: dict[str, torch.Tensor] = field(default_factory=dict)
    captioned: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: list[str | None] = field(default_factory=list)
    class_emb: torch.Tensor | None = None
    classnames: list[str] = field(default_factory=list)


def _check_width(array: np.ndarray, model: Any, where: str) -> None:
    """Refuse caption embeddings the model's adapter cannot take (instead of a shape error deep in torch)."""
    want = getattr(model, "llm_dim", None)
    if want is not None and (array.ndim == 0 or array.shape[-1] != want):
        raise StageError(f"{where}: caption embeddings of shape {tuple(array.shape)}, but the model takes "
                         f"{want}-wide ones: they were made with another caption encoder than the model was "
                         f"trained on; {rerun('embed_captions')} with the model's caption encoder")


def embed_set(model: Any, data: str, embeddings: str, split: str, *, batch_size: int = 64,
              endpoint_url: str = "") -> EmbeddedSet:
    """Embed one split of a prepared eval set with ``model`` (an ``LLM2CLIPModel``).

    Raises:
        StageError: an empty split, keys that differ from the image shards, or caption
            embeddings of another width than the model's ``llm_dim``.
    """
    images: list[Any] = []
    image_rows: list[torch.Tensor] = []
    raw: dict[str, list[np.ndarray]] = {}
    owners: dict[str, list[int]] = {}
    labels: list[str | None] = []
    stream = iter_lockstep(data, embeddings, split, endpoint_url=endpoint_url)
    for index, (sample, arrays) in enumerate(tqdm(stream, desc=f"embed {split}", unit="img")):
        images.append(sample.image)
        labels.append(sample.label)
        for name, array in arrays.items():
            _check_width(array, model, f"{embeddings} ({split} sample {sample.key}, field {name})")
            raw.setdefault(name, []).append(np.asarray(array, dtype=np.float32))
            owners.setdefault(name, []).extend([index] * len(array))
        if len(images) == batch_size:
            image_rows.append(model.encode_image(images, batch_size=batch_size))
            images = []
    if images:
        image_rows.append(model.encode_image(images, batch_size=batch_size))
    if not image_rows:
        raise StageError(f"{data}: split {split!r} has no samples to evaluate")
    out = EmbeddedSet(image_emb=torch.cat(image_rows), labels=labels)
    for name, arrays in raw.items():
        counts = torch.tensor([len(a) for a in arrays])
        out.text_emb[name] = model.encode_text_embeddings(torch.from_numpy(np.concatenate(arrays)))
        out.text_to_image[name] = torch.tensor(owners[name])
        out.first_caption[name] = torch.cumsum(counts, 0) - counts
        out.captioned[name] = counts > 0
    _attach_zeroshot(out, model, embeddings, split, endpoint_url)
    return out


def _attach_zeroshot(out: EmbeddedSet, model: Any, embeddings: str, split: str,
                     endpoint_url: str) -> None:
    entry = contracts.read_manifest("embed_captions", embeddings, endpoint_url).get("zeroshot", {}).get(split)
    if not entry or not any(label is not None for label in out.labels):
        return
    base = str(embeddings).rstrip("/")
    if is_remote(base):
        fs = s3_filesystem(endpoint_url)
        meta = json.loads(fs.cat(f"{base}/{entry['meta']}"))
        with fs.open(f"{base}/{entry['file']}", "rb") as f:
            prompts = np.load(f, allow_pickle=False)
    else:
        meta = json.loads(open(f"{base}/{entry['meta']}").read())
        prompts = np.load(f"{base}/{entry['file']}", allow_pickle=False)
    _check_width(prompts, model, f"{base}/{entry['file']}")
    classes, templates, dim = prompts.shape
    adapted = model.encode_text_embeddings(torch.from_numpy(prompts.astype(np.float32)).reshape(-1, dim))
    out.class_emb = class_embeddings(adapted.reshape(classes, templates, -1))
    out.classnames = list(meta["classnames"])


def _field_view(embedded: EmbeddedSet, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, first captions, caption owners)`` of one field, over the images that have it.

    An image without a caption of an optional field has no first caption: pairing it with the
    next image's would score wrong pairs, so such images leave that field's metrics.
    """
    text_to_image = embedded.text_to_image[name]
    captioned = embedded.captioned.get(name)
    if captioned is None or bool(captioned.all()):
        return embedded.image_emb, embedded.text_emb[name][embedded.first_caption[name]], text_to_image
    log.warning("caption field %s: %d of %d images have none; its metrics use the other %d", name,
                int((~captioned).sum()), len(captioned), int(captioned.sum()))
    renumber = torch.cumsum(captioned.long(), 0) - 1  # old image index -> index among captioned ones
    first = embedded.text_emb[name][embedded.first_caption[name][captioned]]
    return embedded.image_emb[captioned], first, renumber[text_to_image]


def set_metrics(embedded: EmbeddedSet, prefix: str, *, max_k: int = 10) -> tuple[dict, dict]:
    """All metrics of one embedded set, flat ``<prefix>.<field>.<metric>``; plus recall curves.

    Returns:
        ``(metrics, curves)``; curves map ``<field>/<direction>`` to recall@1..max_k (1:1).
    """
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    r1: list[float] = []
    image_emb = embedded.image_emb
    for name, text_emb in embedded.text_emb.items():
        if name in embedded.captioned and not bool(embedded.captioned[name].any()):
            log.warning("caption field %s: no image of %s has one; no metrics for it", name, prefix)
            continue
        images, first, owners = _field_view(embedded, name)
        one_to_one = clip_metrics(images, first)
        multi = multi_caption_metrics(images, text_emb, owners)
        metrics.update({f"{prefix}.{name}.{k}": v for k, v in {**one_to_one, **multi}.items()})
        r1 += [one_to_one["image_to_text_R_at_1"], one_to_one["text_to_image_R_at_1"]]
        for direction, values in recall_curve(images, first, max_k=max_k).items():
            curves[f"{name}/{direction}"] = values
    metrics[f"{prefix}.mean_R_at_1"] = float(np.mean(r1))
    metrics[f"{prefix}.images"] = float(len(image_emb))
    metrics[f"{prefix}.chance_R_at_1"] = 1.0 / len(image_emb)
    if embedded.class_emb is not None:
        index = {c: i for i, c in enumerate(embedded.classnames)}
        keep = [i for i, label in enumerate(embedded.labels) if label in index]
        labels = torch.tensor([index[embedded.labels[i]] for i in keep])
        zs = zeroshot_metrics(image_emb[keep], embedded.class_emb, labels)
        metrics.update({f"{prefix}.zeroshot.{k}": v for k, v in zs.items()})
        metrics[f"{prefix}.zeroshot.classes"] = float(len(embedded.classnames))
    return metrics, curves
