"""MNTP masking: eligible tokens, 80/10/10, at least one target per caption."""

from __future__ import annotations

import torch

from llm2clip.text.mntp import IGNORE, mask_token_id, mask_tokens


def test_targets_only_where_the_previous_token_is_real():
    ids = torch.tensor([[0, 0, 2, 10, 11, 12, 13], [2, 10, 11, 12, 13, 14, 15]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    special = ids == 2
    g = torch.Generator().manual_seed(0)
    corrupted, labels = mask_tokens(ids, attention, special, 0.5, mask_id=99, vocab_size=20, generator=g)
    picked = labels != IGNORE
    assert not picked[0, :3].any() and not picked[1, 0]  # padding, BOS, first real token
    assert picked.any(1).all()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(corrupted[~picked], ids[~picked])


def test_replacement_mix_is_about_80_10_10():
    ids = torch.randint(10, 1000, (64, 256))
    g = torch.Generator().manual_seed(1)
    corrupted, labels = mask_tokens(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool),
                                    0.2, mask_id=5, vocab_size=1000, generator=g)
    picked = labels != IGNORE
    share = picked.float().mean().item()
    assert 0.18 < share < 0.22
    masked = (corrupted[picked] == 5).float().mean().item()
    kept = (corrupted[picked] == ids[picked]).float().mean().item()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.13


def test_blank_mask_token_when_the_tokenizer_has_none(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.mask_token_id is None
    assert mask_token_id(tok) == tok.unk_token_id  # "_" is not in the tiny vocab
