"""LLM2CLIPModel: temperature, optimizer groups, encode_* and a save/load round trip across processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vision_tiny import CUSTOM_MEAN, TINY_VISION

from llm2clip.clip_model import encode_text
from llm2clip.vision.model import CONFIG_FILE, LOGIT_SCALE_INIT, WEIGHTS_FILE, LLM2CLIPModel
from llm2clip.vision.transforms import EvalTransform, to_tensor_batch

REPO = Path(__file__).resolve().parents[3]
LLM_DIM, EMBED = 24, 16


def tiny_model(**kwargs) -> LLM2CLIPModel:
    torch.manual_seed(0)
    return LLM2CLIPModel.build({"kind": "clip", "config": TINY_VISION}, llm_dim=LLM_DIM, embed_dim=EMBED,
                               **kwargs)


def outputs(out: dict) -> tuple:
    """The forward's dict (the loss's keyword arguments) as ``(image, text, scale)``."""
    return out["image_features"], out["text_features"], out["logit_scale"]


def test_logit_scale_shape_init_and_clamp():
    model = tiny_model()
    assert model.logit_scale.shape == (1,)  # not 0-dim: DeepSpeed 0.19.8 breaks on 0-dim params
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, LLM_DIM))
    scale = out["logit_scale"]
    assert "logit_bias" not in out and model.logit_bias is None and model.loss == "clip"
    assert scale.shape == (1,) and scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-0.5)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0
    assert LLM2CLIPModel.build({"kind": "clip", "config": TINY_VISION}, llm_dim=LLM_DIM, embed_dim=EMBED,
                               logit_scale_init=math.log(100)).logit_scale.item() == pytest.approx(4.60517)


def test_forward_normalised_features_and_gradients_everywhere():
    model = tiny_model()
    images, texts = torch.randn(4, 3, 32, 32), 50 * torch.randn(4, LLM_DIM)
    img, txt, scale = outputs(model(images, texts))
    assert img.shape == txt.shape == (4, EMBED) and img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    logits = scale * img @ txt.T
    labels = torch.arange(4)
    loss = (torch.nn.functional.cross_entropy(logits, labels) +
            torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    for name in ("tower.model.embeddings.patch_embedding.weight", "head.weight",
                 "adapter.text_adaptor.0.fn.0.weight", "adapter.text_adaptor.5.bias", "logit_scale"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_no_weight_decay_names_on_tiny_clip():
    model = tiny_model()
    names = model.no_weight_decay_names()
    for n in ("logit_scale", "head.bias", "tower.model.embeddings.class_embedding",
              "tower.model.embeddings.position_embedding.weight",  # 2-d, excluded by name
              "tower.model.pre_layrnorm.weight", "tower.model.encoder.layers.0.layer_norm1.weight",
              "tower.model.encoder.layers.1.self_attn.q_proj.bias", "tower.model.post_layernorm.bias",
              "adapter.text_adaptor.0.ln.weight", "adapter.text_adaptor.4.weight",
              "adapter.text_adaptor.5.bias"):
        assert n in names, n
    for n in ("head.weight", "tower.model.embeddings.patch_embedding.weight",
              "tower.model.encoder.layers.0.self_attn.q_proj.weight",
              "tower.model.encoder.layers.1.mlp.fc1.weight",
              "adapter.text_adaptor.0.fn.0.weight", "adapter.text_adaptor.5.weight"):
        assert n not in names, n
    # everything else decays: exactly the >= 2-d weights other than position embeddings
    params = dict(model.named_parameters())
    decayed = set(params) - names
    assert decayed == {n for n, p in params.items() if p.ndim >= 2 and "position_embedding" not in n}


def test_param_groups_layer_decay_numbers():
    model = tiny_model()
    lr, wd = 1e-3, 0.05
    groups = model.param_groups(lr, wd, layer_decay=0.5, with_names=True)
    where = {name: g for g in groups for name in g["param_names"]}
    assert sorted(where) == sorted(n for n, _ in model.named_parameters())  # each exactly once

    def check(name, scale, decay):
        g = where[name]
        assert g["lr"] == pytest.approx(lr * scale) and g["lr_scale"] == pytest.approx(scale), name
        assert g["weight_decay"] == (wd if decay else 0.0), name

    # 2 blocks: scale = 0.5 ** (3 - layer_id)
    check("tower.model.embeddings.patch_embedding.weight", 0.125, True)
    check("tower.model.embeddings.position_embedding.weight", 0.125, False)
    check("tower.model.pre_layrnorm.weight", 1.0, False)  # the reference puts ln_pre on top
    check("tower.model.encoder.layers.0.mlp.fc1.weight", 0.25, True)
    check("tower.model.encoder.layers.0.mlp.fc1.bias", 0.25, False)
    check("tower.model.encoder.layers.1.self_attn.k_proj.weight", 0.5, True)
    check("tower.model.post_layernorm.weight", 1.0, False)
    check("head.weight", 1.0, True)
    check("adapter.text_adaptor.2.fn.3.weight", 1.0, True)
    check("logit_scale", 1.0, False)
    assert [g["layer_id"] for g in groups] == sorted(g["layer_id"] for g in groups)
    assert len({g["group_name"] for g in groups}) == len(groups) == 8


def test_param_groups_feed_adamw_and_skip_frozen():
    model = tiny_model()
    for p in model.tower.parameters():
        p.requires_grad_(False)
    groups = model.param_groups(1e-2, 0.1, layer_decay=0.8)
    assert all("param_names" not in g for g in groups)
    assert {g["layer_id"] for g in groups} == {3}  # only head, adapter, logit_scale remain
    optimizer = torch.optim.AdamW(groups)
    before = model.head.weight.detach().clone()
    img, txt, scale = outputs(model(torch.randn(3, 3, 32, 32), torch.randn(3, LLM_DIM)))
    (-(scale * img * txt).sum()).backward()
    optimizer.step()
    model.clamp_logit_scale_()
    assert not torch.equal(before, model.head.weight)
    with pytest.raises(ValueError, match="layer_decay"):
        model.param_groups(1e-3, 0.0, layer_decay=0.0)


def test_reference_scale_vit_l_336():
    # research §3.3: ViT-L/14-336 + new head + 4096-d adapter = the released 579M-parameter model;
    # layer decay 0.85: embeddings 0.85**25 ~ 0.017, block 0 ~ 0.020, last block 0.85, top 1.0
    vit_l = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
    with torch.device("meta"):
        model = LLM2CLIPModel.build({"kind": "clip", "config": vit_l}, llm_dim=4096, embed_dim=1280)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 579
    scales = {g["layer_id"]: g["lr_scale"] for g in model.param_groups(1e-5, 0.05, 0.85)}
    assert scales[0] == pytest.approx(0.0172, abs=1e-4)
    assert scales[1] == pytest.approx(0.0202, abs=1e-4)
    assert scales[24] == pytest.approx(0.85) and scales[25] == 1.0


def test_encode_image_matches_forward_and_restores_mode():
    model = tiny_model().train()
    images = [Image.new("RGB", (50, 40), (10, 200, 30)), Image.new("L", (30, 60), 90),
              Image.new("RGBA", (33, 33), (0, 0, 255, 128))]
    out = model.encode_image(images, batch_size=2)
    assert model.training  # mode restored
    assert out.shape == (3, EMBED) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    pixels = to_tensor_batch([EvalTransform(model.preprocess)(im) for im in images])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model.image_features(pixels), atol=1e-6, rtol=1e-5)
    assert model.encode_image([]).shape == (0, EMBED)


def test_encode_text_embeddings_is_scale_free_and_batched():
    model = tiny_model()
    emb = torch.randn(7, LLM_DIM)
    out = model.encode_text_embeddings(emb, batch_size=3)
    torch.testing.assert_close(out, model.encode_text_embeddings(10 * emb.half()), atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(out, model.eval().text_features(emb), atol=1e-6, rtol=1e-5)


def test_encode_text_needs_a_caption_encoder():
    with pytest.raises(ValueError, match="caption encoder"):
        encode_text(tiny_model(), ["a red square"])


def test_encode_text_plumbing_with_a_stub_encoder(monkeypatch):
    encoder_module = pytest.importorskip("llm2clip.text.encoder")
    table = {"a red square": torch.randn(LLM_DIM), "two blue circles": torch.randn(LLM_DIM)}

    class Stub:
        dim = LLM_DIM

        def encode(self, texts, batch_size=64):
            return torch.stack([table[t] for t in texts])

    loaded = []
    monkeypatch.setattr(encoder_module.CaptionEncoder, "from_pretrained",
                        classmethod(lambda cls, source, *a, **k: loaded.append(source) or Stub()))
    model = tiny_model(caption_encoder="/some/encoder")
    texts = ["two blue circles", "a red square"]
    out = encode_text(model, texts)
    torch.testing.assert_close(out, model.encode_text_embeddings(torch.stack([table[t] for t in texts])))
    encode_text(model, texts)
    assert loaded == ["/some/encoder"]  # loaded once, then cached
    assert not any("_text_encoder" in k for k in model.state_dict())  # cached, not a submodule


def _train_a_step(model: LLM2CLIPModel) -> None:
    """Move every weight (and BatchNorm statistics) away from its init, so the round trip means something."""
    model.train()
    size = model.preprocess.image_size
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, 0.05, 0.9))
    img, txt, scale = outputs(model(torch.randn(4, 3, size, size), torch.randn(4, LLM_DIM)))
    logits = scale * img @ txt.T
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    optimizer.step()
    model.clamp_logit_scale_()


LOADER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from llm2clip import LLM2CLIPModel

    root = Path(sys.argv[1])
    images = [Image.open(p) for p in sorted((root / "images").glob("*.png"))]
    texts = load_file(root / "texts.safetensors")["texts"]
    out = {}
    for name in sys.argv[2:]:
        model = LLM2CLIPModel.from_pretrained(root / name)
        out[name + ".image"] = model.encode_image(images, batch_size=2)
        out[name + ".text"] = model.encode_text_embeddings(texts)
    save_file(out, root / "out.safetensors")
""")


def test_save_and_load_in_a_fresh_process(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    # the pretrained dir is removed before loading: the saved model must not need it
    pretrained = shutil.copytree(tiny_clip_dir, tmp_path / "pretrained")
    specs = {
        "clip": {"kind": "clip", "path": str(pretrained)},
        "siglip": {"kind": "siglip", "config": TINY_VISION, "image_size": 40},
        "efficientnet": {"kind": "efficientnet_lite0", "image_size": 64},
        "vit": {"kind": "vit_scratch", "config": {**TINY_VISION, "image_size": 48}},
    }
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(70, 50), (40, 90), (64, 64)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    images = [Image.open(p) for p in sorted((tmp_path / "images").glob("*.png"))]
    texts = torch.randn(5, LLM_DIM)
    save_file({"texts": texts}, tmp_path / "texts.safetensors")
    expected = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        model = LLM2CLIPModel.build(spec, llm_dim=LLM_DIM, embed_dim=EMBED, caption_encoder="/enc",
                                    caption_encoder_fingerprint="abc123")
        _train_a_step(model)
        model.save_pretrained(tmp_path / name)
        expected[name + ".image"] = model.encode_image(images, batch_size=2)
        expected[name + ".text"] = model.encode_text_embeddings(texts)
        cfg = json.loads((tmp_path / name / CONFIG_FILE).read_text())
        assert cfg["logit_scale"] == pytest.approx(model.logit_scale.item())
        assert cfg["caption_encoder"] == {"path": "/enc", "fingerprint": "abc123"}
    shutil.rmtree(pretrained)

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path), *specs], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)

    cfg = json.loads((tmp_path / "clip" / CONFIG_FILE).read_text())
    assert cfg["tower"]["spec"]["path"] == "" and cfg["tower"]["source"]["path"] == str(pretrained)
    assert cfg["preprocess"]["mean"] == pytest.approx(CUSTOM_MEAN)  # from preprocessor_config.json
    assert cfg["preprocess"]["image_size"] == 32 and cfg["tower"]["width"] == 32
    assert cfg["embed_dim"] == EMBED and cfg["llm_embedding_dim"] == LLM_DIM
    assert json.loads((tmp_path / "siglip" / CONFIG_FILE).read_text())["preprocess"]["image_size"] == 40


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="not an exported LLM2CLIP model"):
        LLM2CLIPModel.from_pretrained(tmp_path)
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    loaded = LLM2CLIPModel.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    weights = tmp_path / "m" / WEIGHTS_FILE
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, weights)
    with pytest.raises(ValueError, match="sha256"):
        LLM2CLIPModel.from_pretrained(tmp_path / "m")
    assert LLM2CLIPModel.from_pretrained(tmp_path / "m", verify=False).head.bias.detach().min() >= 1 - 1e-3
    cfg_path = tmp_path / "m" / CONFIG_FILE
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "format": "open_clip"}))
    with pytest.raises(ValueError, match="format 'open_clip'"):
        LLM2CLIPModel.from_pretrained(tmp_path / "m")


def test_package_exports_the_model_lazily():
    code = ("import sys, llm2clip; assert 'torch' not in sys.modules, 'import llm2clip pulled torch'; "
            "from llm2clip import LLM2CLIPModel; print(LLM2CLIPModel.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "llm2clip.vision.model"
