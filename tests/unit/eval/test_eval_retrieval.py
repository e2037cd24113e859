"""Retrieval metrics: hand-computed cases (with ties), open_clip's definition, chunking, multi-caption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm2clip.eval.retrieval import (
    clip_metrics,
    multi_caption_metrics,
    recall_at_ks,
    recall_curve,
    retrieval_ranks,
    to_open_clip_names,
)

CHUNKS = (1, 2, 3, 4, 7, None, 1000)


def from_scores(scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose dot products are exactly ``scores`` (N, M): image = eye(N), text = S.T."""
    s = torch.tensor(scores, dtype=torch.float32)
    return torch.eye(s.shape[0]), s.T.contiguous()


def ref_get_clip_metrics(image, text, logit_scale):
    """open_clip's get_clip_metrics written from its definition (argsort; exact without ties)."""
    metrics = {}
    logits_per_image = logit_scale * image @ text.T
    logits = {"image_to_text": logits_per_image, "text_to_image": logits_per_image.T}
    ground_truth = torch.arange(len(text)).view(-1, 1)
    for name, logit in logits.items():
        ranking = torch.argsort(logit, descending=True)
        preds = torch.where(ranking == ground_truth)[1].numpy()
        metrics[f"{name}_mean_rank"] = preds.mean() + 1
        metrics[f"{name}_median_rank"] = np.floor(np.median(preds)) + 1
        for k in (1, 5, 10):
            metrics[f"{name}_R@{k}"] = np.mean(preds < k)
    return metrics


def ref_stable_ranks(image, text, owner):
    """Ranks from a stable descending sort (equal scores keep index order): the documented tie rule."""
    scores = image.float() @ text.float().T  # (N, M)
    n = scores.shape[0]
    order_t = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (N, M)
    i2t = []
    for i in range(n):
        positions = [p for p, j in enumerate(order_t[i].tolist()) if owner[j] == i]
        i2t.append(min(positions))
    order_i = torch.sort(scores.T, dim=1, descending=True, stable=True).indices  # (M, N)
    t2i = [order_i[j].tolist().index(int(owner[j])) for j in range(scores.shape[1])]
    return torch.tensor(i2t), torch.tensor(t2i)


# ------------------------------------------------------------------------------- hand-computed 1:1


def test_hand_3x3_no_ties():
    image, text = from_scores([[0.9, 0.5, 0.1], [0.8, 0.3, 0.2], [0.1, 0.7, 0.6]])
    i2t, t2i = retrieval_ranks(image, text)
    assert i2t.tolist() == [0, 1, 1]
    assert t2i.tolist() == [0, 2, 0]
    m = clip_metrics(image, text)
    assert m["image_to_text_mean_rank"] == pytest.approx(1 + 2 / 3)
    assert m["image_to_text_median_rank"] == 2.0
    assert m["image_to_text_R_at_1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R_at_5"] == 1.0 and m["image_to_text_R_at_10"] == 1.0
    assert m["text_to_image_mean_rank"] == pytest.approx(1 + 2 / 3)
    assert m["text_to_image_median_rank"] == 1.0
    assert m["text_to_image_R_at_1"] == pytest.approx(2 / 3)


def test_all_equal_scores_rank_by_index():
    image, text = from_scores(np.ones((3, 3)))
    i2t, t2i = retrieval_ranks(image, text)
    # rank_i = # equal scores at a lower index = i
    assert i2t.tolist() == [0, 1, 2] and t2i.tolist() == [0, 1, 2]
    m = clip_metrics(image, text)
    assert m["image_to_text_mean_rank"] == 2.0
    assert m["image_to_text_median_rank"] == 2.0
    assert m["image_to_text_R_at_1"] == pytest.approx(1 / 3)
    assert m["text_to_image_R_at_1"] == pytest.approx(1 / 3)


def test_two_equal_texts_4x4():
    # texts 1 and 2 are the same vector: columns 1 and 2 of the score matrix are equal
    scores = [[4, 1, 1, 0], [2, 3, 3, 1], [0, 2, 2, 5], [1, 2, 2, 2]]
    image, text = from_scores(scores)
    assert torch.equal(text[1], text[2])
    i2t, t2i = retrieval_ranks(image, text)
    # row1: the equal text 2 has a higher index -> not ahead; row2: 5 higher + equal text 1 ahead
    assert i2t.tolist() == [0, 0, 2, 2]
    # col2 target 2: 3 (row1) higher, equal row3 has a higher index -> rank 1
    assert t2i.tolist() == [0, 0, 1, 1]
    m = clip_metrics(image, text)
    assert m["image_to_text_mean_rank"] == 2.0
    assert m["image_to_text_median_rank"] == 2.0  # median(0,0,2,2) = 1
    assert m["image_to_text_R_at_1"] == 0.5
    assert m["text_to_image_mean_rank"] == 1.5
    assert m["text_to_image_median_rank"] == 1.0  # floor(median(0,0,1,1) = 0.5) + 1
    assert m["text_to_image_R_at_1"] == 0.5 and m["text_to_image_R_at_5"] == 1.0


@pytest.mark.parametrize("chunk", CHUNKS)
def test_tie_cases_do_not_depend_on_chunking(chunk):
    image, text = from_scores([[4, 1, 1, 0], [2, 3, 3, 1], [0, 2, 2, 5], [1, 2, 2, 2]])
    i2t, t2i = retrieval_ranks(image, text, chunk_size=chunk)
    assert i2t.tolist() == [0, 0, 2, 2] and t2i.tolist() == [0, 0, 1, 1]
    i2t, t2i = retrieval_ranks(*from_scores(np.ones((5, 5))), chunk_size=chunk)
    assert i2t.tolist() == list(range(5)) and t2i.tolist() == list(range(5))


def test_metric_names_are_mlflow_safe_and_map_to_open_clip():
    image, text = from_scores(np.eye(3))
    m = clip_metrics(image, text)
    expected = {
        f"{d}_{s}" for d in ("image_to_text", "text_to_image")
        for s in ("mean_rank", "median_rank", "R_at_1", "R_at_5", "R_at_10")
    }
    assert set(m) == expected
    assert all("@" not in k for k in m)
    assert all(isinstance(v, float) for v in m.values())
    assert set(to_open_clip_names(m)) == set(ref_get_clip_metrics(image, text, 1.0))


# ------------------------------------------------------------------------- open_clip's definition


@pytest.mark.parametrize("seed,n,d,scale", [(0, 37, 16, 1.0), (1, 128, 32, 100.0), (2, 9, 4, 14.3)])
def test_matches_open_clip_definition_on_random_data(seed, n, d, scale):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    ref = ref_get_clip_metrics(image, text, scale)
    for chunk in (5, 16, None):
        ours = to_open_clip_names(clip_metrics(image, text, logit_scale=scale, chunk_size=chunk))
        assert set(ours) == set(ref)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(float(value), abs=1e-12), key


def test_stable_sort_reference_with_many_ties():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(-1, 2, (40, 3), generator=g).float()  # tiny integer vectors: many ties
    text = torch.randint(-1, 2, (40, 3), generator=g).float()
    ref_i2t, ref_t2i = ref_stable_ranks(image, text, torch.arange(40))
    for chunk in (1, 6, 40, None):
        i2t, t2i = retrieval_ranks(image, text, chunk_size=chunk)
        assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(4)
    image, text = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    assert clip_metrics(image, text, chunk_size=chunk) == clip_metrics(image, text, chunk_size=None)


def test_logit_scale_does_not_reorder():
    g = torch.Generator().manual_seed(5)
    image, text = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    assert clip_metrics(image, text, logit_scale=100.0) == clip_metrics(image, text)


def test_accepts_numpy_and_half_inputs():
    g = torch.Generator().manual_seed(6)
    image, text = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    expected = clip_metrics(image, text)
    assert clip_metrics(image.numpy(), text.numpy()) == expected
    half = clip_metrics(image.half(), text.half())  # cast to fp32 before scoring
    assert set(half) == set(expected)


# ---------------------------------------------------------------------------------- multi-caption


def test_multi_caption_hand_case():
    # 3 images with 2, 3 and 1 captions
    scores = [
        [0.2, 0.9, 0.5, 0.1, 0.0, 0.3],  # positives t0, t1: t1 is first -> rank 0
        [0.8, 0.7, 0.1, 0.6, 0.2, 0.9],  # positives t2, t3, t4: best t3 (0.6), 3 higher -> rank 3
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # positive t5, all equal, 5 lower indices -> rank 5
    ]
    owner = torch.tensor([0, 0, 1, 1, 1, 2])
    image, text = from_scores(scores)
    i2t, t2i = retrieval_ranks(image, text, owner)
    assert i2t.tolist() == [0, 3, 5]
    assert t2i.tolist() == [2, 0, 2, 0, 1, 1]
    m = multi_caption_metrics(image, text, owner)
    assert m["multi_image_to_text_R_at_1"] == pytest.approx(1 / 3)
    assert m["multi_image_to_text_R_at_5"] == pytest.approx(2 / 3)
    assert m["multi_image_to_text_R_at_10"] == 1.0
    assert m["multi_image_to_text_mean_rank"] == pytest.approx(1 + 8 / 3)
    assert m["multi_image_to_text_median_rank"] == 4.0
    assert m["multi_text_to_image_R_at_1"] == pytest.approx(2 / 6)
    assert m["multi_text_to_image_R_at_5"] == 1.0
    assert m["multi_text_to_image_mean_rank"] == 2.0
    assert m["multi_text_to_image_median_rank"] == 2.0


@pytest.mark.parametrize("chunk", CHUNKS)
def test_multi_caption_ties_between_captions(chunk):
    owner = torch.tensor([1, 0, 0, 1])
    # img0: its captions t1, t2 tie at 0.5 with t0 (not its caption, lower index) -> rank 1
    # img1: captions t0, t3 tie at 0.5, t1 scores 0.7 -> rank 1
    image, text = from_scores([[0.5, 0.5, 0.5, 0.1], [0.5, 0.7, 0.2, 0.5]])
    i2t, t2i = retrieval_ranks(image, text, owner, chunk_size=chunk)
    assert i2t.tolist() == [1, 1]
    # t0 (image 1): image 0 ties at a lower index -> 1; t1 (image 0): image 1 higher -> 1
    assert t2i.tolist() == [1, 1, 0, 0]


def test_multi_caption_equals_one_to_one_with_one_caption_each():
    g = torch.Generator().manual_seed(7)
    image, text = torch.randn(25, 6, generator=g), torch.randn(25, 6, generator=g)
    one = clip_metrics(image, text, chunk_size=4)
    multi = multi_caption_metrics(image, text, torch.arange(25), chunk_size=4)
    assert {k.removeprefix("multi_"): v for k, v in multi.items()} == one
    # with ties too
    image, text = from_scores([[4, 1, 1, 0], [2, 3, 3, 1], [0, 2, 2, 5], [1, 2, 2, 2]])
    multi = multi_caption_metrics(image, text, torch.arange(4))
    assert {k.removeprefix("multi_"): v for k, v in multi.items()} == clip_metrics(image, text)


def test_multi_caption_random_against_stable_sort_reference():
    g = torch.Generator().manual_seed(8)
    n, m = 17, 60
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])
    owner = owner[torch.randperm(m, generator=g)]
    ties = (
        torch.randint(-1, 2, (n, 2), generator=g).float(),
        torch.randint(-1, 2, (m, 2), generator=g).float(),
    )
    for image, text in [(torch.randn(n, 5, generator=g), torch.randn(m, 5, generator=g)), ties]:
        ref = ref_stable_ranks(image, text, owner)
        for chunk in (1, 5, 16, None):
            i2t, t2i = retrieval_ranks(image, text, owner, chunk_size=chunk)
            assert torch.equal(i2t, ref[0]) and torch.equal(t2i, ref[1])


def test_multi_caption_invariant_to_caption_order_without_ties():
    g = torch.Generator().manual_seed(9)
    image, text = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    owner = torch.arange(30) % 10
    perm = torch.randperm(30, generator=g)
    assert multi_caption_metrics(image, text, owner) == multi_caption_metrics(image, text[perm], owner[perm])


def test_multi_caption_input_errors():
    image, text = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="without any caption"):
        multi_caption_metrics(image, text, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="index images"):
        multi_caption_metrics(image, text, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="entries"):
        multi_caption_metrics(image, text, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="as many texts"):
        clip_metrics(image, text)
    with pytest.raises(ValueError, match="dims differ"):
        clip_metrics(image, torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        clip_metrics(torch.full((3, 4), float("nan")), torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        clip_metrics(torch.empty(0, 4), torch.empty(0, 4))


# ---------------------------------------------------------------------------------- recall curves


def test_recall_at_ks_by_hand():
    assert recall_at_ks(torch.tensor([0, 3, 5]), 6) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0])
    assert recall_at_ks(torch.tensor([7, 9]), 3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        recall_at_ks(torch.tensor([0]), 0)


def test_recall_curve_agrees_with_metrics():
    g = torch.Generator().manual_seed(10)
    image, text = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    curve = recall_curve(image, text, max_k=12, chunk_size=7)
    m = clip_metrics(image, text)
    for d in ("image_to_text", "text_to_image"):
        assert len(curve[d]) == 12
        assert all(a <= b for a, b in zip(curve[d], curve[d][1:], strict=False))
        for k in (1, 5, 10):
            assert curve[d][k - 1] == pytest.approx(m[f"{d}_R_at_{k}"])
    owner = torch.arange(40) // 2
    multi_curve = recall_curve(image[:20], text, owner, max_k=5)
    mm = multi_caption_metrics(image[:20], text, owner)
    assert multi_curve["image_to_text"][0] == pytest.approx(mm["multi_image_to_text_R_at_1"])
    assert multi_curve["text_to_image"][4] == pytest.approx(mm["multi_text_to_image_R_at_5"])
