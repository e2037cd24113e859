"""clip_loss: open_clip's ClipLoss by hand; 2 gloo ranks (local loss + gather with grad) == 1 rank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gloo import run_ranks

from llm2clip.losses import clip_loss


def features(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image, text = (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    return image, text


def naive_clip_loss(image, text, scale):
    """Explicit loops over the global batch: mean of image->text and text->image cross-entropies."""
    def ce(a, b):
        total = 0.0
        for i in range(len(a)):
            logits = [scale * float(a[i] @ b[j]) for j in range(len(b))]
            top = max(logits)
            total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[i]
        return total / len(a)

    return (ce(image, text) + ce(text, image)) / 2


@pytest.mark.parametrize("scale", [1.0, 14.28, 100.0])
def test_single_process_matches_explicit_loops(scale):
    image, text = features()
    got = clip_loss(image, text, torch.tensor([scale]))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_clip_loss(image, text, scale), rel=1e-5, abs=1e-5)


def test_logits_labels_and_shapes():
    image, text = features(4)
    loss, per_image, per_text, labels = clip_loss(image, text, torch.tensor(10.0), return_logits=True)
    assert per_image.shape == per_text.shape == (4, 4) and labels.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(per_text, per_image.T)  # one process: L_txt = L_img^T (open_clip)
    perfect = clip_loss(image, image, torch.tensor([100.0]))
    assert perfect < loss
    with pytest.raises(ValueError):
        clip_loss(image, text[:3], torch.tensor(1.0))


def _rank_loss(rank, world, n):
    image, text = features(n * world)
    rows = slice(rank * n, (rank + 1) * n)
    local = [image[rows].clone().requires_grad_(True), text[rows].clone().requires_grad_(True)]
    scale = torch.tensor([20.0], dtype=torch.float64, requires_grad=True)
    loss, per_image, _, labels = clip_loss(*local, scale, return_logits=True)
    loss.backward()
    return {"loss": loss.detach(), "grads": [t.grad for t in local], "scale_grad": scale.grad,
            "labels": labels, "logits_shape": tuple(per_image.shape)}


def test_two_ranks_equal_the_global_batch_loss_and_gradients(tmp_path):
    """Mean over ranks of the local losses (what DeepSpeed's gradient averaging optimises) and
    its gradients equal the single-process loss on the concatenated batch."""
    n = 4
    ranks = run_ranks(_rank_loss, tmp_path, n)
    assert ranks[1]["labels"].tolist() == [4, 5, 6, 7] and ranks[0]["logits_shape"] == (4, 8)

    image, text = (t.clone().requires_grad_(True) for t in features(2 * n))
    scale = torch.tensor([20.0], dtype=torch.float64, requires_grad=True)
    loss = clip_loss(image, text, scale, gather=False)
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), atol=1e-6, rtol=1e-6)
    # A rank's feature gradient is d(sum of rank losses)/d(its rows) (the gather's backward sums
    # over ranks); averaging over the 2 ranks gives the global gradient.
    for rank, r in enumerate(ranks):
        rows = slice(rank * n, (rank + 1) * n)
        for got, ref in zip(r["grads"], (image.grad, text.grad), strict=True):
            torch.testing.assert_close(got / 2, ref[rows], atol=1e-6, rtol=1e-5)
    # logit_scale is replicated: DeepSpeed averages its per-rank gradients
    scale_grad = (ranks[0]["scale_grad"] + ranks[1]["scale_grad"]) / 2
    torch.testing.assert_close(scale_grad, scale.grad, atol=1e-6, rtol=1e-5)
