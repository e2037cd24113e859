"""Every tower kind builds, pools to (B, width), loads real weights, and assigns layer ids."""

from __future__ import annotations

import json
import math

import pytest
import torch
from vision_tiny import CUSTOM_MEAN, CUSTOM_STD, TINY_VISION

from llm2clip.vision.towers import (
    TOWER_KINDS,
    TowerSpec,
    build_tower,
    packaged_efficientnet_weights_path,
    read_pretrained_logit_scale,
)
from llm2clip.vision.transforms import HALF, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SMALL_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "patch_size": 8}


@pytest.mark.parametrize("spec,width,size,mean", [
    ({"kind": "clip", "config": TINY_VISION}, 32, 32, OPENAI_CLIP_MEAN),
    ({"kind": "siglip", "config": TINY_VISION}, 32, 32, HALF),
    ({"kind": "vit_scratch", "config": SMALL_VIT, "image_size": 48}, 32, 48, OPENAI_CLIP_MEAN),
    ({"kind": "efficientnet_lite0", "image_size": 64}, 1280, 64, HALF),
])
def test_each_kind_pools_to_width(spec, width, size, mean):
    tower = build_tower(spec)
    assert tower.width == width and tower.preprocess.image_size == size and tower.preprocess.mean == mean
    feats = tower(torch.randn(3, 3, size, size))
    assert feats.shape == (3, width) and torch.isfinite(feats).all()
    assert set(TOWER_KINDS) == {"clip", "siglip", "vit_scratch", "efficientnet_lite0", "eva02"}


def test_vit_scratch_defaults_are_a_small_exact_gelu_vit():
    tower = build_tower({"kind": "vit_scratch"})
    cfg = tower.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.hidden_act) == (192, 6, 128, "gelu")
    assert tower.preprocess.std == OPENAI_CLIP_STD
    assert 2e6 < sum(p.numel() for p in tower.parameters()) < 4e6


def test_efficientnet_loads_the_packaged_imagenet_weights():
    tower = build_tower({"kind": "efficientnet_lite0", "image_size": 64})
    file_state = torch.load(packaged_efficientnet_weights_path(), map_location="cpu", weights_only=True)
    ours = tower.net.state_dict()
    # every trunk tensor (incl. BatchNorm statistics) equals the file's; only the classifier is dropped
    assert set(file_state) - set(ours) == {"_fc.weight", "_fc.bias"}
    assert set(ours) <= set(file_state)
    for key, value in ours.items():
        assert torch.equal(value, file_state[key]), key
    random_tower = build_tower({"kind": "efficientnet_lite0", "image_size": 64, "pretrained": False})
    assert not torch.equal(random_tower.net._conv_stem.weight, tower.net._conv_stem.weight)


def test_efficientnet_eval_features_are_sane():
    tower = build_tower({"kind": "efficientnet_lite0", "image_size": 64}).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f1, f2 = tower(x), tower(x)
    assert torch.equal(f1, f2) and torch.isfinite(f1).all()
    assert (f1 >= 0).all() and (f1 <= 6).all()  # ReLU6 activations, averaged
    assert not torch.allclose(f1[0], f1[1])


def test_clip_tower_from_full_clipmodel_dir(tiny_clip_dir):
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tower = build_tower({"kind": "clip", "path": str(tiny_clip_dir)}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x).pooler_output  # post-LayerNorm CLS
        torch.testing.assert_close(tower(x), expected, atol=1e-6, rtol=1e-5)
    assert list(tower.preprocess.mean) == pytest.approx(CUSTOM_MEAN)
    assert list(tower.preprocess.std) == pytest.approx(CUSTOM_STD)
    assert not any("text" in n for n, _ in tower.named_parameters())
    assert read_pretrained_logit_scale(tiny_clip_dir) == pytest.approx(math.log(100), abs=1e-6)


def test_clip_tower_from_vision_only_dir(tiny_clip_dir, tmp_path):
    first = build_tower({"kind": "clip", "path": str(tiny_clip_dir)})
    first.model.save_pretrained(tmp_path)
    again = build_tower({"kind": "clip", "path": str(tmp_path)})
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), again.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert again.preprocess.mean == OPENAI_CLIP_MEAN  # no preprocessor_config.json there
    assert read_pretrained_logit_scale(tmp_path) is None


def test_siglip_tower_from_full_dir_uses_its_pooling_head(tiny_siglip_dir):
    from transformers import SiglipModel

    full = SiglipModel.from_pretrained(tiny_siglip_dir).eval()
    tower = build_tower({"kind": "siglip", "path": str(tiny_siglip_dir)}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), full.vision_model(pixel_values=x).pooler_output)
    assert any(n.endswith("head.probe") for n, _ in tower.named_parameters())
    assert tower.preprocess.mean == HALF


def test_clear_errors(tiny_clip_dir, tiny_siglip_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown vision tower kind 'resnet'"):
        build_tower({"kind": "resnet"})
    with pytest.raises(ValueError, match="unknown tower spec keys"):
        build_tower({"kind": "clip", "layers": 3})
    with pytest.raises(ValueError, match="not a directory"):
        build_tower({"kind": "clip", "path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="model_type 'siglip'"):
        build_tower({"kind": "clip", "path": str(tiny_siglip_dir)})
    with pytest.raises(ValueError, match="model_type None"):
        build_tower({"kind": "siglip", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="needs a path"):
        build_tower({"kind": "clip"})
    with pytest.raises(ValueError, match="takes no path"):
        TowerSpec(kind="efficientnet_lite0", path="/x")
    with pytest.raises(ValueError, match="config keys"):
        build_tower({"kind": "efficientnet_lite0", "config": {"width": 3}})


def test_missing_vision_weights_are_an_error(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(tiny_clip_dir / "model.safetensors").items()
             if "post_layernorm" not in k}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="lacks vision weights"):
        build_tower({"kind": "clip", "path": str(tmp_path)})


def test_layer_ids_on_tiny_clip():
    tower = build_tower({"kind": "clip", "config": TINY_VISION})
    assert tower.num_layers == 2
    ids = {n: tower.layer_id(n) for n, _ in tower.named_parameters()}
    assert ids["model.embeddings.class_embedding"] == 3  # on top, as the reference's assigner
    assert ids["model.embeddings.patch_embedding.weight"] == 0
    assert ids["model.embeddings.position_embedding.weight"] == 0
    assert ids["model.pre_layrnorm.weight"] == 3
    assert ids["model.encoder.layers.0.self_attn.q_proj.weight"] == 1
    assert ids["model.encoder.layers.1.mlp.fc2.bias"] == 2
    assert ids["model.post_layernorm.weight"] == 3
    groups = tower.layer_groups()
    assert list(groups) == [0, 1, 2, 3]
    assert sum(len(v) for v in groups.values()) == len(ids)


def test_layer_ids_on_efficientnet():
    tower = build_tower({"kind": "efficientnet_lite0", "image_size": 64, "pretrained": False})
    assert tower.num_layers == 16
    assert tower.layer_id("net._conv_stem.weight") == 0
    assert tower.layer_id("net._blocks.0._depthwise_conv.weight") == 1
    assert tower.layer_id("net._blocks.15._bn2.bias") == 16
    assert tower.layer_id("net._conv_head.weight") == 17


@pytest.mark.parametrize("spec", [
    {"kind": "clip", "config": TINY_VISION},
    {"kind": "efficientnet_lite0", "image_size": 64, "pretrained": False,
     "config": {"drop_connect_rate": 0.0}},
])
def test_gradient_checkpointing_gives_same_outputs_and_grads(spec):
    torch.manual_seed(0)
    plain = build_tower(spec)
    ckpt = build_tower({**spec, "gradient_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    size = plain.preprocess.image_size
    x = torch.randn(2, 3, size, size)
    results = []
    for tower in (plain, ckpt):
        # train(): checkpointing only acts in training mode; BatchNorm stays on its running stats
        tower.train()
        for m in tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        calls = []
        block = tower.net._blocks[3] if hasattr(tower, "net") else tower.model.encoder.layers[0].self_attn
        hook = block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        out = tower(x)
        out.square().sum().backward()
        hook.remove()
        assert len(calls) == (2 if tower is ckpt else 1)  # checkpointed blocks rerun in backward
        results.append((out.detach(), [p.grad.clone() for p in tower.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g1, g2 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_other_image_size_interpolates_position_embeddings():
    tower = build_tower({"kind": "clip", "config": TINY_VISION, "image_size": 48})
    assert tower.preprocess.image_size == 48
    assert tower(torch.randn(1, 3, 48, 48)).shape == (1, 32)


def test_export_spec_rebuilds_without_the_directory(tiny_clip_dir):
    tower = build_tower({"kind": "clip", "path": str(tiny_clip_dir)})
    spec = tower.export_spec()
    assert spec.path == "" and spec.config["hidden_size"] == 32
    json.dumps(spec.to_dict())  # JSON-ready
    rebuilt = build_tower(spec)
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in tower.named_parameters()]
