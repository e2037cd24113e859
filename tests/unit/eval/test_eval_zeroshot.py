"""Zero-shot classification: class embeddings, top-k by hand (ties, k > C), templates."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from llm2clip.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    SINGLE_TEMPLATE,
    build_prompts,
    class_embeddings,
    zeroshot_metrics,
)


def test_class_embedding_by_hand():
    # class 0: prompts (3, 4) and (0, 2) -> unit (0.6, 0.8), (0, 1) -> mean (0.3, 0.9) -> renormalised
    prompts = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[1.0, 0.0], [5.0, 0.0]]])
    emb = class_embeddings(prompts)
    assert emb.shape == (2, 2) and emb.dtype == torch.float32
    norm = math.sqrt(0.3**2 + 0.9**2)
    assert emb[0].tolist() == pytest.approx([0.3 / norm, 0.9 / norm])
    assert emb[1].tolist() == pytest.approx([1.0, 0.0])


def test_class_embedding_normalises_each_prompt_before_averaging():
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(5, 4, 8, generator=g)
    scales = torch.rand(5, 4, 1, generator=g) * 100 + 0.01
    emb = class_embeddings(prompts)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-6)
    # a prompt's length must not weigh in the average
    assert torch.allclose(class_embeddings(prompts * scales), emb, atol=1e-6)
    # the plain mean (no per-prompt normalisation) differs
    plain = torch.nn.functional.normalize((prompts * scales).mean(1), dim=-1)
    assert not torch.allclose(plain, emb, atol=1e-3)


def test_class_embedding_single_template_and_errors():
    emb = class_embeddings(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))  # (C, D) = one template
    assert emb.flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, -1.0])
    with pytest.raises(ValueError):
        class_embeddings(torch.zeros(2, 0, 4))
    with pytest.raises(ValueError):
        class_embeddings(torch.zeros(4))


def hand_case():
    """Logits = image @ eye(6).T = image: 4 images, 6 classes."""
    image = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0 -> rank 0
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 1 -> rank 1
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5 -> rank 5
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # label 2, all tied -> classes 0, 1 ahead -> rank 2
    ])
    return image, torch.eye(6), torch.tensor([0, 1, 5, 2])


def test_topk_by_hand_with_ties():
    image, classes, labels = hand_case()
    m = zeroshot_metrics(image, classes, labels)
    assert m == {"top1": 0.25, "top5": 0.75}
    m = zeroshot_metrics(image, classes, labels, ks=(1, 2, 3, 6))
    assert m == {"top1": 0.25, "top2": 0.5, "top3": 0.75, "top6": 1.0}


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunking_does_not_change_results(chunk):
    image, classes, labels = hand_case()
    assert zeroshot_metrics(image, classes, labels, ks=(1, 2, 3), chunk_size=chunk) == {
        "top1": 0.25, "top2": 0.5, "top3": 0.75,
    }


def test_k_larger_than_class_count_is_capped(caplog):
    image = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 2])  # ranks 2 and 2
    with caplog.at_level(logging.WARNING, logger="llm2clip.eval.zeroshot"):
        m = zeroshot_metrics(image, torch.eye(3), labels, ks=(1, 5, 10))
    assert m == {"top1": 0.0, "top5": 1.0, "top10": 1.0}
    assert "capped" in caplog.text


def test_matches_topk_on_random_data():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(200, 16, generator=g)
    classes = class_embeddings(torch.randn(10, 3, 16, generator=g))
    labels = torch.randint(0, 10, (200,), generator=g)
    logits = image @ classes.T
    ref = {
        f"top{k}": (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
        for k in (1, 5)
    }
    assert zeroshot_metrics(image, classes, labels, chunk_size=64) == pytest.approx(ref)


def test_input_errors():
    with pytest.raises(ValueError, match="labels"):
        zeroshot_metrics(torch.randn(2, 3), torch.eye(3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels for"):
        zeroshot_metrics(torch.randn(2, 3), torch.eye(3), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        zeroshot_metrics(torch.randn(2, 4), torch.eye(3), torch.tensor([0, 1]))


def test_templates_and_prompts():
    assert len(DEFAULT_TEMPLATES) >= 8 and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES + SINGLE_TEMPLATE)
    prompts = build_prompts(["cat", "golden retriever"], ("a photo of a {}.", "a drawing of a {}."))
    assert prompts == [
        ["a photo of a cat.", "a drawing of a cat."],
        ["a photo of a golden retriever.", "a drawing of a golden retriever."],
    ]
    assert len(build_prompts(["dog"])[0]) == len(DEFAULT_TEMPLATES)
    with pytest.raises(ValueError):
        build_prompts(["dog"], ("no placeholder",))
    with pytest.raises(ValueError):
        build_prompts(["dog"], ())
