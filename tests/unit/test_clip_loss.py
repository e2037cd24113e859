"""clip_loss: open_clip's ClipLoss by hand; 2 gloo ranks (local loss + gather with grad) == 1 rank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gloo import run_ranks
from test_siglip_loss import extract_open_clip_loss, load_module_file, load_open_clip_loss

from llm2clip.losses import ClipLoss, clip_loss


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


# ---------------------------------------------------------------------------------------------
# ClipLoss (the object behind clip_loss) == open_clip's ClipLoss(local_loss, gather_with_grad)


def clip_both(image, text, scale, reference, rank=0, world=1) -> dict:
    """Our ClipLoss and open_clip's on the same float64 leaves: losses and the 3 gradients."""
    out = {}
    ref = reference.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    for tag, fn in (("ours", ClipLoss()), ("ref", ref)):
        inputs = [t.detach().clone().requires_grad_(True) for t in (image, text, scale)]
        result = fn(*inputs)
        loss = result["loss"] if isinstance(result, dict) else result
        loss.backward()
        out[tag] = {"loss": loss.detach(), "grads": [t.grad for t in inputs]}
        if tag == "ours":
            out["shapes"] = {k: tuple(v.shape) for k, v in result.items()}
            out["labels"] = result["labels"]
    return out


def assert_clip_same(ours: dict, ref: dict) -> float:
    """Loss and gradients equal (ours in fp32, open_clip in float64); returns the max |difference|."""
    torch.testing.assert_close(ours["loss"].double(), ref["loss"].double(), atol=1e-6, rtol=1e-5)
    for a, b in zip(ours["grads"], ref["grads"], strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-5)
    diffs = [(ours["loss"].double() - ref["loss"]).abs()] + [(a - b).abs().max()
                                                             for a, b in zip(ours["grads"], ref["grads"], strict=True)]
    return float(max(diffs))


@pytest.mark.parametrize("scale", [1.0, 14.28, 100.0])
def test_clip_loss_object_matches_open_clip_single_process(scale, tmp_path):
    image, text = features()
    got = clip_both(image, text, torch.tensor([scale], dtype=torch.float64), load_open_clip_loss(tmp_path))
    print(f"clip world 1 scale {scale}: max |ours - open_clip| = {assert_clip_same(got['ours'], got['ref']):.2e}")
    assert got["shapes"] == {"loss": (), "logits_per_image": (6, 6), "logits_per_text": (6, 6), "labels": (6,)}


def _rank_open_clip(rank, world, n, reference_file):
    image, text = features(n * world)
    rows = slice(rank * n, (rank + 1) * n)
    return clip_both(image[rows], text[rows], torch.tensor([20.0], dtype=torch.float64),
                     load_module_file(reference_file), rank=rank, world=world)


def test_clip_loss_object_matches_open_clip_on_two_ranks(tmp_path):
    n = 4
    reference_file = extract_open_clip_loss(tmp_path)
    ranks = run_ranks(_rank_open_clip, tmp_path, n, str(reference_file))
    worst = max(assert_clip_same(r["ours"], r["ref"]) for r in ranks)
    print(f"clip world 2: max |ours - open_clip| over ranks = {worst:.2e}")
    assert ranks[0]["shapes"]["logits_per_image"] == ranks[1]["shapes"]["logits_per_text"] == (n, 2 * n)
    assert ranks[1]["labels"].tolist() == [4, 5, 6, 7]


def test_clip_loss_function_is_the_object():
    image, text = features()
    scale = torch.tensor([14.0])
    out = ClipLoss()(image, text, scale)
    assert clip_loss(image, text, scale).item() == out["loss"].item()
    for got, key in zip(clip_loss(image, text, scale, return_logits=True)[1:],
                        ("logits_per_image", "logits_per_text", "labels"), strict=True):
        assert torch.equal(got, out[key])


def test_clip_loss_bias_shifts_every_logit():
    """open_clip adds an optional logit_bias to both logit matrices (CLIP itself has none)."""
    image, text = features()
    plain = ClipLoss()(image, text, torch.tensor(10.0))
    shifted = ClipLoss()(image, text, torch.tensor(10.0), torch.tensor(-3.0))
    torch.testing.assert_close(shifted["logits_per_image"], plain["logits_per_image"] - 3.0)
    torch.testing.assert_close(shifted["loss"], plain["loss"])  # softmax ignores a constant shift
