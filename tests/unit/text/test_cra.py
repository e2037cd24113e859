"""CRA: first two captions per image, gallery = all val captions minus the query, top-1."""

from __future__ import annotations

import torch

from llm2clip.text.cra import CRA_PROTOCOL, caption_retrieval_accuracy, cra_from_embeddings, cra_pairs
from llm2clip.text.data import ImageCaptions


def test_perfect_and_broken_pairs():
    first = torch.eye(4)
    assert cra_from_embeddings(first, first.clone())["cra"] == 1.0  # partner is an exact copy
    swapped = first[[1, 0, 2, 3]]  # images 0 and 1 point at each other's partner
    result = cra_from_embeddings(first, swapped)
    assert result["cra_first_to_second"] == 0.5 and result["cra_second_to_first"] == 0.5
    assert result["cra"] == 0.5 and result["pairs"] == 4


def test_query_never_retrieves_itself_and_gallery_holds_both_sides():
    # Both first captions are identical: each finds the *other image's* first caption (the
    # gallery holds both sides), never itself.
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    second = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    result = cra_from_embeddings(first, second)
    assert result["cra_first_to_second"] == 0.0
    # second[0]: first[0] and first[1] tie at 0.8 (lower index wins: its partner) > second[1] 0.6;
    # second[1]: second[0] at 0.6 beats both first captions at 0.0.
    assert result["cra_second_to_first"] == 0.5


def test_chunking_does_not_change_the_answer():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    b = a + 0.8 * b
    assert cra_from_embeddings(a, b, chunk=7) == cra_from_embeddings(a, b, chunk=1024)


def test_pairs_follow_caption_field_order_and_skip_single_caption_images():
    images = [
        ImageCaptions("k0", {"short": ["s0"], "dense": ["d0", "d0b"]}),
        ImageCaptions("k1", {"short": ["s1"], "dense": []}),
        ImageCaptions("k2", {"short": ["s2a", "s2b"], "dense": ["d2"]}),
    ]
    assert cra_pairs(images, ("short", "dense")) == (["s0", "s2a"], ["d0", "s2b"])
    assert cra_pairs(images, ("dense", "short")) == (["d0", "d2"], ["d0b", "s2a"])
    assert cra_pairs(images, ("short", "dense"), max_images=1) == (["s0"], ["d0"])


def test_end_to_end_with_an_encoder(tiny_llama):
    from llm2clip.text.encoder import CaptionEncoder, EncoderSettings

    enc = CaptionEncoder.from_pretrained(tiny_llama, EncoderSettings(), device="cpu")
    images = [ImageCaptions(f"k{i}", {"short": [f"a {c} circle"], "dense": [f"a big {c} circle"]})
              for i, c in enumerate(["red", "green", "blue", "yellow"])]
    result = caption_retrieval_accuracy(enc, images, ("short", "dense"))
    assert 0.0 <= result["cra"] <= 1.0 and result["pairs"] == 4
    assert "minus query" in CRA_PROTOCOL
