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
from llm2clip.config.templates import SINGLE_TEMPLATE
from llm2clip.data.shards import iter_samples
from llm2clip.data.sidecars import iter_lockstep
from llm2clip.eval import protocols
from llm2clip.eval.retrieval import clip_metrics, multi_caption_metrics, recall_curve
from llm2clip.eval.zeroshot import class_embeddings, zeroshot_metrics
from llm2clip.io import StageError, is_remote, s3_filesystem
from llm2clip.lineage import rerun

log = logging.getLogger(__name__)

PROTOCOL = (
    "1:1 = open_clip get_clip_metrics on (image, first caption of the field) pairs; "
    "multi_ = CLIP_benchmark protocol, a hit if any caption of the image is in the top k; "
    "ties ranked by a stable descending sort; mean_R_at_1 = mean of image->text and "
    "text->image 1:1 R@1 over the caption fields; headline = one field under the set's protocol "
    "(multi_caption for several captions per image, else 1:1); zero-shot class embedding = "
    "renormalised mean of the normalised prompt embeddings (class names x templates), "
    "zeroshot_single = the template 'a photo of the {}.' alone; CRA = first two captions of each "
    "image retrieve each other, top-1, on the caption encoder's stored embeddings"
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
        caption_fields: the fields in the embeddings manifest's order (empty: ``text_emb``'s).
        templates: the T zero-shot templates the prompt embeddings were made with.
        single_class_emb: (C, D) class embeddings of :data:`SINGLE_TEMPLATE` alone, when it is
            among ``templates``.
        cra_pairs: caption field -> ``(first, second)``, each (P, llm_dim): the stored (caption
            encoder's, pre-adapter) embeddings of the first two captions of every image that has
            two of that field (collected with ``embed_set(..., cra=True)``).
    """

    image_emb: torch.Tensor
    text_emb: dict[str, torch.Tensor] = field(default_factory=dict)
    text_to_image: dict[str, torch.Tensor] = field(default_factory=dict)
    first_caption: dict[str, torch.Tensor] = field(default_factory=dict)
    captioned: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: list[str | None] = field(default_factory=list)
    class_emb: torch.Tensor | None = None
    classnames: list[str] = field(default_factory=list)
    caption_fields: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    single_class_emb: torch.Tensor | None = None
    cra_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def fields(self) -> list[str]:
        """The caption fields with embeddings, in manifest order."""
        ordered = [f for f in self.caption_fields if f in self.text_emb]
        return ordered + [f for f in self.text_emb if f not in ordered]


def _check_width(array: np.ndarray, model: Any, where: str) -> None:
    """Refuse caption embeddings the model's adapter cannot take (instead of a shape error deep in torch)."""
    want = getattr(model, "llm_dim", None)
    if want is not None and (array.ndim == 0 or array.shape[-1] != want):
        raise StageError(f"{where}: caption embeddings of shape {tuple(array.shape)}, but the model takes "
                         f"{want}-wide ones: they were made with another caption encoder than the model was "
                         f"trained on; {rerun('embed_captions')} with the model's caption encoder")


def embed_set(model: Any, data: str, embeddings: str, split: str, *, batch_size: int = 64,
              endpoint_url: str = "", cra: bool = False) -> EmbeddedSet:
    """Embed one split of a prepared eval set with ``model`` (an ``LLM2CLIPModel``).

    A set without caption fields (a labelled image set such as ImageNet) gets image and
    zero-shot class embeddings only. ``cra`` also keeps the stored embeddings of every image's
    first two captions per field (for :func:`set_metrics`' CRA).

    Raises:
        StageError: an empty split, keys that differ from the image shards, or caption
            embeddings of another width than the model's ``llm_dim``.
    """
    images: list[Any] = []
    image_rows: list[torch.Tensor] = []
    raw: dict[str, list[np.ndarray]] = {}
    owners: dict[str, list[int]] = {}
    labels: list[str | None] = []
    pairs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    manifest = contracts.read_manifest("embed_captions", embeddings, endpoint_url)
    if manifest.get("caption_fields"):
        stream = iter_lockstep(data, embeddings, split, endpoint_url=endpoint_url)
    else:  # a labelled image set (ImageNet): its sidecars hold no vectors, only the images count
        stream = ((sample, {}) for sample in iter_samples(data, split, endpoint_url=endpoint_url))
    for index, (sample, arrays) in enumerate(tqdm(stream, desc=f"embed {split}", unit="img")):
        images.append(sample.image)
        labels.append(sample.label)
        for name, array in arrays.items():
            _check_width(array, model, f"{embeddings} ({split} sample {sample.key}, field {name})")
            raw.setdefault(name, []).append(np.asarray(array, dtype=np.float32))
            owners.setdefault(name, []).extend([index] * len(array))
            if cra and len(array) >= 2:
                firsts, seconds = pairs.setdefault(name, ([], []))
                firsts.append(raw[name][-1][0])
                seconds.append(raw[name][-1][1])
        if len(images) == batch_size:
            image_rows.append(model.encode_image(images, batch_size=batch_size))
            images = []
    if images:
        image_rows.append(model.encode_image(images, batch_size=batch_size))
    if not image_rows:
        raise StageError(f"{data}: split {split!r} has no samples to evaluate")
    ordered = [f for f in manifest.get("caption_fields", []) if f in raw]
    out = EmbeddedSet(image_emb=torch.cat(image_rows), labels=labels,
                      caption_fields=ordered + [f for f in raw if f not in ordered])
    for name in out.caption_fields:
        arrays = raw[name]
        counts = torch.tensor([len(a) for a in arrays])
        out.text_emb[name] = model.encode_text_embeddings(torch.from_numpy(np.concatenate(arrays)))
        out.text_to_image[name] = torch.tensor(owners[name])
        out.first_caption[name] = torch.cumsum(counts, 0) - counts
        out.captioned[name] = counts > 0
    for name, (firsts, seconds) in pairs.items():
        out.cra_pairs[name] = (torch.from_numpy(np.stack(firsts)), torch.from_numpy(np.stack(seconds)))
    _attach_zeroshot(out, model, embeddings, manifest, split, endpoint_url)
    return out


def _attach_zeroshot(out: EmbeddedSet, model: Any, embeddings: str, manifest: dict, split: str,
                     endpoint_url: str) -> None:
    entry = manifest.get("zeroshot", {}).get(split)
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
    grid = adapted.reshape(classes, templates, -1)
    out.class_emb = class_embeddings(grid)
    out.classnames = list(meta["classnames"])
    out.templates = list(meta.get("templates", []))
    if SINGLE_TEMPLATE[0] in out.templates:
        out.single_class_emb = class_embeddings(grid[:, out.templates.index(SINGLE_TEMPLATE[0])])


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


def _scored(embedded: EmbeddedSet, name: str) -> bool:
    """Whether a field has a caption on at least one image (else it has no metrics)."""
    return name in embedded.text_emb and (name not in embedded.captioned or bool(embedded.captioned[name].any()))


def headline_choice(embedded: EmbeddedSet, protocol: str = "auto", caption_field: str = "",
                    where: str = "") -> tuple[str, str] | None:
    """``(caption field, resolved protocol)`` of a set's headline; None for a set without captions.

    Args:
        embedded: The set.
        protocol: ``auto``, ``multi_caption`` or ``one_to_one``.
        caption_field: The field; empty = the first field (manifest order) that has captions.
        where: What to name in errors (``evaluate.eval_sets[coco]``).

    Raises:
        StageError: ``caption_field`` is not a field of the set (or none of its images has one).
    """
    scored = [f for f in embedded.fields() if _scored(embedded, f)]
    if caption_field:
        if caption_field not in scored:
            raise StageError(f"{where or 'eval set'}.caption_field: {caption_field!r} is not a caption field "
                             f"with captions in this set (it has: {scored or 'none'})")
        name = caption_field
    elif scored:
        name = scored[0]
    else:
        return None
    _, _, owners = _field_view(embedded, name)
    return name, protocols.resolve_protocol(protocol, owners)


def _zeroshot(embedded: EmbeddedSet, prefix: str) -> dict[str, float]:
    """``zeroshot.*`` over all templates and, when the single template was embedded, ``zeroshot_single.*``."""
    index = {c: i for i, c in enumerate(embedded.classnames)}
    keep = [i for i, label in enumerate(embedded.labels) if label in index]
    if not keep:
        log.warning("%s: no image carries one of the %d zero-shot classes; no zero-shot metrics", prefix,
                    len(index))
        return {}
    labels = torch.tensor([index[embedded.labels[i]] for i in keep])
    images = embedded.image_emb[keep]
    metrics = {f"{prefix}.zeroshot.{k}": v for k, v in zeroshot_metrics(images, embedded.class_emb, labels).items()}
    metrics[f"{prefix}.zeroshot.classes"] = float(len(embedded.classnames))
    metrics[f"{prefix}.zeroshot.templates"] = float(len(embedded.templates))
    if embedded.single_class_emb is not None:
        single = zeroshot_metrics(images, embedded.single_class_emb, labels)
        metrics.update({f"{prefix}.zeroshot_single.{k}": v for k, v in single.items()})
    return metrics


def set_metrics(embedded: EmbeddedSet, prefix: str, *, max_k: int = 10, protocol: str = "auto",
                caption_field: str = "", cra: bool = False) -> tuple[dict, dict]:
    """All metrics of one embedded set, flat ``<prefix>.<field>.<metric>``; plus recall curves.

    Per caption field: the 1:1 and ``multi_`` metrics. Over the fields: ``mean_R_at_1`` (1:1)
    and ``chance_R_at_1``. The headline (:mod:`llm2clip.eval.protocols`): ``headline.*`` of
    ``caption_field`` under ``protocol``. Labelled sets: ``zeroshot.*`` (all templates) and
    ``zeroshot_single.*``. With ``cra``: ``cra.*`` of the headline field. A set without caption
    fields (ImageNet) has only ``images`` and the zero-shot metrics.

    Returns:
        ``(metrics, curves)``; curves map ``<field>/<direction>`` to recall@1..max_k (1:1).

    Raises:
        StageError: ``caption_field`` is not a field of the set.
    """
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    r1: list[float] = []
    image_emb = embedded.image_emb
    for name in embedded.fields():
        if not _scored(embedded, name):
            log.warning("caption field %s: no image of %s has one; no metrics for it", name, prefix)
            continue
        images, first, owners = _field_view(embedded, name)
        one_to_one = clip_metrics(images, first)
        multi = multi_caption_metrics(images, embedded.text_emb[name], owners)
        metrics.update({f"{prefix}.{name}.{k}": v for k, v in {**one_to_one, **multi}.items()})
        r1 += [one_to_one["image_to_text_R_at_1"], one_to_one["text_to_image_R_at_1"]]
        for direction, values in recall_curve(images, first, max_k=max_k).items():
            curves[f"{name}/{direction}"] = values
    if r1:  # a set without captions has no retrieval numbers (not NaN ones)
        metrics[f"{prefix}.mean_R_at_1"] = float(np.mean(r1))
        metrics[f"{prefix}.chance_R_at_1"] = 1.0 / len(image_emb)
    metrics[f"{prefix}.images"] = float(len(image_emb))
    choice = headline_choice(embedded, protocol, caption_field, f"evaluate.eval_sets[{prefix}]")
    if choice is not None:
        name, resolved = choice
        field_metrics = {k.removeprefix(f"{prefix}.{name}."): v for k, v in metrics.items()
                         if k.startswith(f"{prefix}.{name}.")}
        metrics.update({f"{prefix}.headline.{k}": v for k, v in protocols.headline(field_metrics, resolved).items()})
    if cra:
        metrics.update(_cra(embedded, prefix, choice[0] if choice else caption_field))
    if embedded.class_emb is not None:
        metrics.update(_zeroshot(embedded, prefix))
    return metrics, curves


def _cra(embedded: EmbeddedSet, prefix: str, name: str) -> dict[str, float]:
    first, second = embedded.cra_pairs.get(name, (None, None))
    pairs = 0 if first is None else len(first)
    if pairs < 2:
        log.warning("%s: CRA needs >= 2 images with two captions of field %r, found %d; no CRA", prefix,
                    name or "(none)", pairs)
        return {}
    return {f"{prefix}.cra.{k}": v for k, v in protocols.cra(first, second).items()}
