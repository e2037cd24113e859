"""caption_contrastive_loss: equals explicit loops; 2 gloo ranks == 1 rank on the global batch."""

from __future__ import annotations

import math

import pytest
import torch
from gloo import run_ranks

from llm2clip.losses import caption_contrastive_loss


def naive_loss(q, p, n, scale):
    """Explicit loops: candidates = all positives, then all hard negatives; target = own positive."""
    def cos(a, b):
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    candidates = list(p) + (list(n) if n is not None else [])
    total = 0.0
    for i in range(len(q)):
        logits = [scale * cos(q[i], c) for c in candidates]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(x - top) for x in logits))
        total += log_z - logits[i]
    return total / len(q)


def batch(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("scale", [50.0, 1.0])
def test_matches_naive_reference(hard, scale):
    q, p, n = batch()
    got = caption_contrastive_loss(q, p, n if hard else None, scale=scale)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_loss(q, p, n if hard else None, scale), rel=1e-5, abs=1e-5)


def test_hard_negatives_make_it_harder():
    q, p, _ = batch()
    n = p + 0.01 * torch.randn_like(p)  # negatives almost equal to the positives
    assert caption_contrastive_loss(q, p, n, scale=50) > caption_contrastive_loss(q, p, scale=50)


def test_shape_mismatch_is_an_error():
    q, p, n = batch()
    with pytest.raises(ValueError):
        caption_contrastive_loss(q, p[:3])
    with pytest.raises(ValueError):
        caption_contrastive_loss(q, p, n[:3])


def _rank_loss(rank, world, sizes):
    q, p, n = batch(sum(sizes))
    start = sum(sizes[:rank])
    local = [t[start : start + sizes[rank]].clone().requires_grad_(True) for t in (q, p, n)]
    loss = caption_contrastive_loss(*local, scale=50.0)
    loss.backward()
    return {"loss": loss.detach(), "grads": [t.grad for t in local]}


@pytest.mark.parametrize("sizes", [(4, 4), (5, 3)])
def test_two_ranks_equal_one_rank_loss_and_gradients(sizes, tmp_path):
    """Candidates gathered with gradient: the 2-rank losses/gradients are the global batch's."""
    ranks = run_ranks(_rank_loss, tmp_path, sizes)

    q, p, n = (t.clone().requires_grad_(True) for t in batch(sum(sizes)))
    loss = caption_contrastive_loss(q, p, n, scale=50.0)
    loss.backward()
    weighted = sum(size * r["loss"] for size, r in zip(sizes, ranks, strict=True)) / sum(sizes)
    torch.testing.assert_close(weighted, loss.detach(), atol=1e-6, rtol=1e-6)
    if sizes[0] == sizes[1]:
        # each rank's gradient is d(sum of rank losses)/d(its slice); DeepSpeed averages over
        # ranks, so dividing by the world size must give the global batch's gradient
        for rank, r in enumerate(ranks):
            rows = slice(rank * sizes[0], (rank + 1) * sizes[0])
            for got, ref in zip(r["grads"], (q.grad, p.grad, n.grad), strict=True):
                torch.testing.assert_close(got / 2, ref[rows], atol=1e-6, rtol=1e-5)


def test_gather_is_identity_without_a_group():
    from llm2clip.train.distributed import all_gather_with_grad, get_rank, get_world_size

    x = torch.randn(3, 2)
    gathered, offset = all_gather_with_grad(x)
    assert gathered is x and offset == 0 and (get_rank(), get_world_size()) == (0, 1)


# ---------------------------------------------------------------------------------------------
# The image-text losses by name


def test_create_loss_builds_every_registered_loss():
    from llm2clip.losses import LOSSES, ClipLoss, SigLipLoss, create_loss

    assert LOSSES == {"clip": ClipLoss, "siglip": SigLipLoss}
    for name, cls in LOSSES.items():
        loss = create_loss(name)
        assert type(loss) is cls and loss.gather
        assert create_loss(name, gather=False).gather is False


def test_create_loss_unknown_name_lists_the_known_ones():
    from llm2clip.losses import create_loss

    with pytest.raises(ValueError, match=r"unknown loss 'sigclip' \(known losses: clip, siglip\)"):
        create_loss("sigclip")
    with pytest.raises(TypeError):
        create_loss("clip", local_loss=True)  # a wrong keyword is the class's own error


def test_caption_loss_moved_not_changed():
    from llm2clip.losses import caption
    from llm2clip.losses import caption_contrastive_loss as exported

    assert exported is caption.caption_contrastive_loss is caption_contrastive_loss
