"""The text adapter is the reference TextProj: input L2 norm, pre-LN residual MLP blocks, LN, Linear."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llm2clip.vision.adapter import LinearBlock, TextAdapter


@pytest.fixture()
def adapter() -> TextAdapter:
    torch.manual_seed(0)
    return TextAdapter(llm_dim=16, embed_dim=8)


def test_shapes_and_structure(adapter):
    out = adapter(torch.randn(5, 16))
    assert out.shape == (5, 8) and out.dtype == torch.float32
    layers = list(adapter.text_adaptor)
    assert [type(m) for m in layers] == [LinearBlock] * 4 + [nn.LayerNorm, nn.Linear]
    assert layers[-1].bias is not None and layers[-1].in_features == 16
    block = layers[0]
    assert (block.fn[0].in_features, block.fn[0].out_features) == (16, 32)  # expansion 2
    assert (block.fn[3].in_features, block.fn[3].out_features) == (32, 16)
    # reference parameter names (eva_clip/model.py TextProj: text_adaptor.<i>.fn.{0,3}, .ln)
    names = {n for n, _ in adapter.named_parameters()}
    assert {"text_adaptor.0.fn.0.weight", "text_adaptor.3.fn.3.bias", "text_adaptor.3.ln.weight",
            "text_adaptor.4.weight", "text_adaptor.5.weight", "text_adaptor.5.bias"} <= names


def test_configurable_depth_and_expansion():
    a = TextAdapter(llm_dim=12, embed_dim=6, num_blocks=2, expansion=3)
    assert sum(isinstance(m, LinearBlock) for m in a.text_adaptor) == 2
    assert a.text_adaptor[0].fn[0].out_features == 36
    assert a(torch.randn(3, 12)).shape == (3, 6)


def test_input_is_l2_normalised(adapter):
    x = torch.randn(4, 16)
    ref = adapter(x)
    # any positive rescaling of the LLM embedding gives the same output
    for scale in (1e-3, 0.5, 7.0, 300.0):
        torch.testing.assert_close(adapter(scale * x), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter(x / x.norm(dim=-1, keepdim=True)), ref, atol=1e-6, rtol=1e-5)
    # fp16 sidecar embeddings are normalised in fp32 and give (almost) the same output
    torch.testing.assert_close(adapter(x.half()), ref, atol=2e-3, rtol=1e-3)


def test_block_is_pre_ln_residual_with_exact_gelu():
    torch.manual_seed(0)
    block = LinearBlock(8, expansion=2)
    with torch.no_grad():
        block.ln.weight.uniform_(0.5, 1.5)
        block.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 8)
    ln = nn.functional.layer_norm(x, (8,), block.ln.weight, block.ln.bias, eps=1e-5)
    h = ln @ block.fn[0].weight.T + block.fn[0].bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact (erf) GELU, not the tanh one
    expected = x + h @ block.fn[3].weight.T + block.fn[3].bias
    torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)


def test_block_with_zeroed_mlp_is_identity():
    block = LinearBlock(8)
    with torch.no_grad():
        for p in block.fn.parameters():
            p.zero_()
    x = torch.randn(5, 8)
    assert torch.equal(block(x), x)


def test_zeroed_blocks_reduce_to_ln_linear_of_normalised_input(adapter):
    with torch.no_grad():
        for block in list(adapter.text_adaptor)[:4]:
            for p in block.fn.parameters():
                p.zero_()
    x = torch.randn(3, 16)
    unit = x / x.norm(dim=-1, keepdim=True)
    expected = adapter.text_adaptor[5](adapter.text_adaptor[4](unit))
    torch.testing.assert_close(adapter(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("llm_dim,embed_dim,blocks,expansion",
                         [(16, 8, 4, 2), (10, 7, 2, 3), (12, 4, 0, 2), (9, 5, 1, 1.5)])
def test_param_count_formula(llm_dim, embed_dim, blocks, expansion):
    a = TextAdapter(llm_dim, embed_dim, blocks, expansion)
    assert sum(p.numel() for p in a.parameters()) == TextAdapter.num_parameters(llm_dim, embed_dim, blocks,
                                                                               expansion)


def test_param_count_at_reference_scale():
    # research §3.3: ~273.8M for 4096 -> 1280; the paper's "4-layer adaptor 67.1M" = 4 blocks at 2048
    with torch.device("meta"):
        a = TextAdapter(4096, 1280)
    assert sum(p.numel() for p in a.parameters()) == 273_769_728 == TextAdapter.num_parameters(4096, 1280)
    blocks_2048 = TextAdapter.num_parameters(2048, 1, 4) - TextAdapter.num_parameters(2048, 1, 0)
    assert round(blocks_2048 / 1e6, 1) == 67.1


def test_wrong_input_dim_is_a_clear_error(adapter):
    with pytest.raises(ValueError, match="expects 16"):
        adapter(torch.randn(2, 15))
