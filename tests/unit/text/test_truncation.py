"""Captions cut at max_length are counted, with the exact number of tokens cut (issue #13 item 2).

The tiny tokenizer is word-level with a ``<s>`` in front, so a caption of ``w`` words is ``w + 1``
tokens and the cut of each caption is known by hand.
"""

from __future__ import annotations

import pytest
import torch

from llm2clip.text import embed
from llm2clip.text.encoder import CaptionEncoder, EncoderSettings
from llm2clip.text.truncation import TruncationCount, tokens_cut

SHORT = "a red circle"  # 3 words + <s> = 4 tokens
LONG = "a red circle and a blue star next to the big tree"  # 12 words + <s> = 13 tokens
LONGER = " ".join(["a red circle"] * 6)  # 18 words + <s> = 19 tokens


@pytest.fixture(scope="module")
def encoder(tiny_llama):
    return CaptionEncoder.from_pretrained(tiny_llama, EncoderSettings(max_length=8), device="cpu")


def test_tokens_cut_is_exact(encoder):
    lengths = [4, 8, 8]
    assert tokens_cut(encoder.tokenizer, [SHORT, LONG, LONGER], lengths, 8) == [0, 5, 11]
    assert tokens_cut(encoder.tokenizer, ["a b c d e f g"], [8], 8) == [0]  # exactly at the limit: not cut


def test_tokenize_counts_inside_the_block_only(encoder):
    encoder.tokenize([LONG])  # no block: nothing counted, nothing kept
    with encoder.count_truncation() as outer:
        batch = encoder.tokenize([SHORT, LONG])
        assert batch["attention_mask"].sum(1).tolist() == [4, 8]
        with encoder.count_truncation() as inner:
            encoder.tokenize([LONGER, SHORT], ["a red ", "a red "])  # the instruction counts too: 21 tokens
    assert (inner.captions, inner.truncated, inner.tokens, inner.tokens_max) == (2, 1, 13, 13)
    assert (outer.captions, outer.truncated, outer.tokens, outer.tokens_max) == (4, 2, 18, 13)
    assert encoder._truncation is None
    assert outer.to_dict(8) == {"captions": 4, "truncated_captions": 2, "truncated_fraction": 0.5,
                                "truncated_tokens": 18, "truncated_tokens_max": 13, "max_length": 8}
    assert outer.metrics() == {"truncated_captions": 2, "truncated_fraction": 0.5, "truncated_tokens_max": 13}
    assert TruncationCount.from_dict(outer.to_dict()) == outer
    assert outer.all_reduce() == outer  # one process: itself
    assert "2 of 4 captions (50.00%) cut at 8 tokens (tokens cut: 18 total, 13 max)" in outer.describe("x", 8)


def test_embed_texts_counts_distinct_captions(encoder):
    stats = embed.EmbedStats()
    embed.embed_texts(encoder, [SHORT, LONG, LONG, LONGER], stats=stats)
    assert (stats.unique, stats.truncated, stats.truncated_tokens, stats.truncated_tokens_max) == (3, 2, 16, 11)
    more = embed.EmbedStats(unique=1, truncated=1, truncated_tokens=2, truncated_tokens_max=2)
    stats.add(more)  # shards add up; the max stays a max
    assert stats.truncation() == TruncationCount(4, 3, 18, 11)


def test_embed_options_max_length_overrides_the_encoders_own(tiny_llama, tmp_path):
    saved = tmp_path / "enc"
    CaptionEncoder.from_pretrained(tiny_llama, EncoderSettings(max_length=8), device="cpu").save_pretrained(saved)
    own = embed.load_encoder(embed.EmbedOptions(encoder=str(saved), out=str(tmp_path), caption_fields=("s",)))
    wider = embed.load_encoder(embed.EmbedOptions(encoder=str(saved), out=str(tmp_path), caption_fields=("s",),
                                                  max_length=16))
    assert own.settings.max_length == 8 and wider.settings.max_length == 16
    stats = embed.EmbedStats()
    embed.embed_texts(wider, [LONG, LONGER], stats=stats)
    assert (stats.truncated, stats.truncated_tokens) == (1, 3)


def test_mntp_batches_count_what_they_cut(tiny_llama):
    from transformers import AutoTokenizer

    from llm2clip.config import CaptionContrastiveConfig
    from llm2clip.text.mntp import _mntp_batch

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = CaptionContrastiveConfig(max_length=8, mntp_batch_size=6)
    count = TruncationCount()
    batch = _mntp_batch(tok, [LONG], cfg, step=1, rank=0, seed=0, mask_id=1, vocab_size=10, truncation=count)
    assert batch["input_ids"].shape == (6, 8)
    assert count == TruncationCount(6, 6, 30, 5)
    without = _mntp_batch(tok, [LONG], cfg, step=1, rank=0, seed=0, mask_id=1, vocab_size=10)
    assert torch.equal(without["input_ids"], batch["input_ids"])  # counting changes nothing
