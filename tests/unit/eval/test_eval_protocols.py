"""The paper's protocols on a hand-checkable toy set, against brute-force loops written here:
the multi-caption and 1:1 headlines, the ``auto`` choice, CRA, and a labelled set without any
caption field (ImageNet)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm2clip.eval.harness import EmbeddedSet, headline_choice, set_metrics
from llm2clip.eval.zeroshot import class_embeddings
from llm2clip.io import StageError

KS = (1, 5, 10)


def toy(captions_per_image: list[int], *, seed: int = 0, dim: int = 6) -> EmbeddedSet:
    """Random unit embeddings (no ties): image i has ``captions_per_image[i]`` captions of field ``c``."""
    g = torch.Generator().manual_seed(seed)
    n = len(captions_per_image)
    images = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    owners = torch.tensor([i for i, k in enumerate(captions_per_image) for _ in range(k)])
    texts = F.normalize(images[owners] + 0.9 * torch.randn(len(owners), dim, generator=g), dim=-1)
    counts = torch.tensor(captions_per_image)
    out = EmbeddedSet(image_emb=images, labels=[None] * n, caption_fields=["c"])
    out.text_emb, out.text_to_image = {"c": texts}, {"c": owners}
    out.first_caption, out.captioned = {"c": torch.cumsum(counts, 0) - counts}, {"c": counts > 0}
    return out


def brute_multi(images: torch.Tensor, texts: torch.Tensor, owners: list[int]) -> dict[str, float]:
    """Loops: an image is found at k when any of its captions is among the k best texts; a text
    when its image is among the k best images."""
    n, m = len(images), len(texts)
    i2t, t2i = [], []
    for i in range(n):
        scores = [float(images[i] @ texts[j]) for j in range(m)]
        order = sorted(range(m), key=lambda j: -scores[j])
        i2t.append(min(order.index(j) for j in range(m) if owners[j] == i))
    for j in range(m):
        scores = [float(images[i] @ texts[j]) for i in range(n)]
        order = sorted(range(n), key=lambda i: -scores[i])
        t2i.append(order.index(owners[j]))
    out = {}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in KS:
            out[f"{name}_R_at_{k}"] = sum(r < k for r in ranks) / len(ranks)
    out["mean_R_at_1"] = (out["image_to_text_R_at_1"] + out["text_to_image_R_at_1"]) / 2
    return out


def headline_of(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(f"{prefix}.headline."): v for k, v in metrics.items() if k.startswith(f"{prefix}.headline.")}


def test_multi_caption_headline_equals_brute_force():
    counts = [5, 5, 3, 5, 4, 5, 5, 2, 5, 5, 5, 1]  # COCO-like: mostly 5 captions, some fewer
    embedded = toy(counts)
    metrics, _ = set_metrics(embedded, "coco", protocol="multi_caption")
    expected = brute_multi(embedded.image_emb, embedded.text_emb["c"], embedded.text_to_image["c"].tolist())
    assert headline_of(metrics, "coco") == pytest.approx(expected)
    # auto picks multi_caption because some image has several captions; the multi_ keys are unchanged
    auto, _ = set_metrics(embedded, "coco")
    assert headline_of(auto, "coco") == headline_of(metrics, "coco")
    assert auto["coco.c.multi_image_to_text_R_at_1"] == metrics["coco.headline.image_to_text_R_at_1"]
    assert headline_choice(embedded) == ("c", "multi_caption")


def test_one_to_one_headline_is_the_first_caption_of_each_image():
    counts = [3, 1, 2, 4, 1, 2, 3, 1, 2]
    embedded = toy(counts, seed=1)
    metrics, _ = set_metrics(embedded, "docci", protocol="one_to_one")
    firsts = embedded.first_caption["c"]
    expected = brute_multi(embedded.image_emb, embedded.text_emb["c"][firsts], list(range(len(counts))))
    assert headline_of(metrics, "docci") == pytest.approx(expected)
    # it is the set's 1:1 numbers (open_clip's get_clip_metrics) under another name
    assert metrics["docci.headline.text_to_image_R_at_5"] == metrics["docci.c.text_to_image_R_at_5"]


def test_auto_with_one_caption_per_image_is_one_to_one():
    embedded = toy([1] * 10, seed=2)
    metrics, _ = set_metrics(embedded, "urban1k")
    assert headline_choice(embedded) == ("c", "one_to_one")
    expected = brute_multi(embedded.image_emb, embedded.text_emb["c"], list(range(10)))
    assert headline_of(metrics, "urban1k") == pytest.approx(expected)


def test_headline_field_is_the_named_one_else_the_first():
    embedded = toy([2, 2, 2, 2], seed=3)
    embedded.text_emb["zh"] = embedded.text_emb["c"][embedded.first_caption["c"]]
    embedded.text_to_image["zh"] = torch.arange(4)
    embedded.first_caption["zh"], embedded.captioned["zh"] = torch.arange(4), torch.ones(4, dtype=torch.bool)
    embedded.caption_fields = ["c", "zh"]
    assert headline_choice(embedded) == ("c", "multi_caption")
    assert headline_choice(embedded, caption_field="zh") == ("zh", "one_to_one")
    metrics, _ = set_metrics(embedded, "cn", caption_field="zh")
    assert metrics["cn.headline.image_to_text_R_at_1"] == metrics["cn.zh.image_to_text_R_at_1"]
    with pytest.raises(StageError, match=r"evaluate.eval_sets\[cn\].caption_field: 'en' .*\['c', 'zh'\]"):
        set_metrics(embedded, "cn", caption_field="en")


def test_existing_metric_names_are_unchanged():
    embedded = toy([1] * 6, seed=4)
    metrics, _ = set_metrics(embedded, "val")
    assert metrics["val.mean_R_at_1"] == pytest.approx(
        (metrics["val.c.image_to_text_R_at_1"] + metrics["val.c.text_to_image_R_at_1"]) / 2)
    assert {"val.images", "val.chance_R_at_1", "val.c.multi_image_to_text_R_at_1"} <= set(metrics)


def brute_cra(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float]:
    """Loops: each caption of the 2N retrieves (top-1, itself excluded) and must find its pair."""
    n = len(first)
    gallery = F.normalize(torch.cat([first, second]).float(), dim=-1)
    hits = []
    for q in range(2 * n):
        best, arg = -math.inf, None
        for j in range(2 * n):
            if j != q and float(gallery[q] @ gallery[j]) > best:
                best, arg = float(gallery[q] @ gallery[j]), j
        hits.append(arg == (q + n) % (2 * n))
    return sum(hits[:n]) / n, sum(hits[n:]) / n


def test_cra_on_a_toy_set_equals_brute_force():
    g = torch.Generator().manual_seed(5)
    n, dim = 9, 5
    first = torch.randn(n, dim, generator=g)
    second = first + 1.2 * torch.randn(n, dim, generator=g)  # some pairs are found, some not
    embedded = toy([2] * n, seed=5)
    embedded.cra_pairs = {"c": (first, second)}
    metrics, _ = set_metrics(embedded, "coco", cra=True)
    forward, backward = brute_cra(first, second)
    assert 0 < forward < 1 or 0 < backward < 1  # the toy is not trivial
    assert metrics["coco.cra.first_to_second_R_at_1"] == pytest.approx(forward)
    assert metrics["coco.cra.second_to_first_R_at_1"] == pytest.approx(backward)
    assert metrics["coco.cra.R_at_1"] == pytest.approx((forward + backward) / 2)
    assert metrics["coco.cra.pairs"] == n
    # without cra (or without pairs) there is no CRA number, not a zero
    assert not any(".cra." in k for k in set_metrics(embedded, "coco")[0])
    embedded.cra_pairs = {}
    assert not any(".cra." in k for k in set_metrics(embedded, "coco", cra=True)[0])


def test_labelled_set_without_caption_fields_has_only_zero_shot():
    g = torch.Generator().manual_seed(6)
    classes = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    labels = [0, 1, 2, 0, 1, 2]
    images = F.normalize(classes[labels] + 0.1 * torch.randn(6, 4, generator=g), dim=-1)
    embedded = EmbeddedSet(image_emb=images, labels=[["tench", "goldfish", "shark"][i] for i in labels],
                           class_emb=class_embeddings(classes), classnames=["tench", "goldfish", "shark"],
                           templates=["a photo of a {}."])
    metrics, curves = set_metrics(embedded, "imagenet", caption_field="")
    assert curves == {}
    assert metrics == {"imagenet.images": 6.0, "imagenet.zeroshot.top1": 1.0, "imagenet.zeroshot.top5": 1.0,
                       "imagenet.zeroshot.classes": 3.0, "imagenet.zeroshot.templates": 1.0}
    assert all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(StageError, match="it has: none"):
        set_metrics(embedded, "imagenet", caption_field="captions")
