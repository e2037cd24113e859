"""Retrieval metrics when an optional caption field is missing for some images.

Before: each image's "first caption" was ``cumsum(counts) - counts``; an image with no caption of
a field pointed at the next image's caption, so 1:1 metrics scored wrong pairs without a word
(and the last image raised IndexError). Now such images leave that field's metrics only.
"""

import torch
import torch.nn.functional as F

from llm2clip.eval.harness import EmbeddedSet, set_metrics
from llm2clip.eval.retrieval import clip_metrics


def embedded_with_gaps() -> tuple[EmbeddedSet, list[int]]:
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8), dim=-1)
    dense_counts = [2, 0, 1, 0, 1, 0]  # images 1, 3 and 5 (the last) lack the optional field
    rows, owners = [], []
    for i, n in enumerate(dense_counts):
        for _ in range(n):
            rows.append(F.normalize(images[i] + 0.3 * torch.randn(8), dim=-1))
            owners.append(i)
    counts = torch.tensor(dense_counts)
    short = F.normalize(images + 0.3 * torch.randn(6, 8), dim=-1)
    out = EmbeddedSet(image_emb=images, labels=[None] * 6)
    out.text_emb = {"short": short, "dense": torch.stack(rows)}
    out.text_to_image = {"short": torch.arange(6), "dense": torch.tensor(owners)}
    out.first_caption = {"short": torch.arange(6), "dense": torch.cumsum(counts, 0) - counts}
    out.captioned = {"short": torch.ones(6, dtype=torch.bool), "dense": counts > 0}
    return out, [i for i, n in enumerate(dense_counts) if n]


def test_images_without_an_optional_caption_leave_only_that_fields_metrics():
    embedded, kept = embedded_with_gaps()
    metrics, curves = set_metrics(embedded, "val")
    firsts = torch.tensor([0, 2, 3])  # rows of the first dense caption of images 0, 2, 4
    expected = clip_metrics(embedded.image_emb[kept], embedded.text_emb["dense"][firsts])
    for key, value in expected.items():
        assert metrics[f"val.dense.{key}"] == value
    assert metrics["val.short.image_to_text_R_at_1"] == clip_metrics(embedded.image_emb,
                                                                     embedded.text_emb["short"])["image_to_text_R_at_1"]
    assert metrics["val.images"] == 6.0 and "dense/image_to_text" in curves


def test_a_field_no_image_has_is_skipped():
    embedded, _ = embedded_with_gaps()
    embedded.captioned["dense"] = torch.zeros(6, dtype=torch.bool)
    metrics, _ = set_metrics(embedded, "val")
    assert not any(k.startswith("val.dense.") for k in metrics) and "val.short.image_to_text_R_at_1" in metrics
