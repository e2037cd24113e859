"""The ``eva02`` tower against the EVA-CLIP reference, and inside LLM2CLIPModel, config and training.

``Ref*`` below re-states, compactly and in this file's own words, what the reference computes
(LLM2CLIP ``llm2clip/eva_clip/eva_vit_model.py`` with ``rope``/``subln``/``naiveswiglu``/``qkv_bias``
and ``use_mean_pooling=False``, ``rope.py:VisionRotaryEmbeddingFast``), module by module with the
reference's names, so its ``state_dict`` has the reference checkpoint's keys (the shared rope module
registered under every block, the CLIP ``head``). It takes the reference's route where ours differs:
explicit softmax attention instead of SDPA, the rope table built by broadcasting two axis tables,
``norm`` over every token before taking the CLS one.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from llm2clip.config import ConfigError, TrainVisionConfig, from_dict
from llm2clip.losses import create_loss
from llm2clip.vision.eva02 import PRESETS, EVA02Tower, Rope2D, resolve_config
from llm2clip.vision.model import LLM2CLIPModel
from llm2clip.vision.towers import build_tower
from llm2clip.vision.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TINY = {"width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2.6667, "patch_size": 8, "image_size": 32}
LN = dict(eps=1e-6)


# ---- the reference, restated -------------------------------------------------------------------


class RefRope(nn.Module):
    def __init__(self, half_head_dim, pt_seq_len, ft_seq_len):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, half_head_dim, 2)[: half_head_dim // 2].float() / half_head_dim))
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, -1)  # '... n -> ... (n r)', r=2
        h = freqs[:, None, :].expand(ft_seq_len, ft_seq_len, -1)
        w = freqs[None, :, :].expand(ft_seq_len, ft_seq_len, -1)
        freqs = torch.cat((h, w), -1)  # broadcat
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t):
        x = t.reshape(*t.shape[:-1], -1, 2)  # '... (d r) -> ... d r'
        rotated = torch.stack((-x[..., 1], x[..., 0]), -1).reshape(t.shape)
        return t * self.freqs_cos + rotated * self.freqs_sin


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads, rope):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = nn.LayerNorm(dim, **LN)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x):
        B, N, _ = x.shape
        heads = lambda t: t.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)  # noqa: E731
        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(F.linear(x, self.k_proj.weight, None))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        q = torch.cat((q[:, :, :1, :], self.rope(q[:, :, 1:, :])), -2).type_as(v)
        k = torch.cat((k[:, :, :1, :], self.rope(k[:, :, 1:, :])), -2).type_as(v)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(self.inner_attn_ln(x))


class RefSwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.act, self.ffn_ln, self.w3 = nn.SiLU(), nn.LayerNorm(hidden, **LN), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, rope):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, **LN), RefAttention(dim, num_heads, rope)
        self.norm2, self.mlp = nn.LayerNorm(dim, **LN), RefSwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefEVAVisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, pt_hw_seq_len=16, num_classes=16):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.rope = RefRope(embed_dim // num_heads // 2, pt_hw_seq_len, grid)
        self.blocks = nn.ModuleList(RefBlock(embed_dim, num_heads, mlp_ratio, self.rope) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, **LN)
        self.head = nn.Linear(embed_dim, num_classes)  # the CLIP projection LLM2CLIP discards

    def forward_features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def get_num_layer_for_vit(var_name: str, num_max_layer: int) -> int:
    """The reference's layer-id rule (EVA/BEiT optimizer utilities), restated."""
    if var_name in ("cls_token", "mask_token", "pos_embed") or var_name.startswith("patch_embed"):
        return 0
    if var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    if var_name.startswith("blocks"):
        return int(var_name.split(".")[1]) + 1
    return num_max_layer - 1


def reference(seed: int = 0, sizes: dict = TINY) -> RefEVAVisionTransformer:
    """A reference model with every weight random (biases and norms too, so each one matters)."""
    torch.manual_seed(seed)
    ref = RefEVAVisionTransformer(sizes["image_size"], sizes["patch_size"], sizes["width"], sizes["layers"],
                                  sizes["heads"], sizes["mlp_ratio"])
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if re.search(r"(norm\d?|_ln)\.weight$", name) else 0.0))
    return ref.eval()


def tiny_tower(**spec) -> EVA02Tower:
    torch.manual_seed(0)
    return build_tower({"kind": "eva02", "config": dict(TINY), **spec})


def pixels(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---- (1) parity --------------------------------------------------------------------------------


def as_llm2clip_keys(state: dict) -> dict:
    """LLM2CLIP's module stores the q/v biases as ``q_proj.bias``/``v_proj.bias``."""
    return {re.sub(r"attn\.([qv])_bias$", r"attn.\1_proj.bias", k): v for k, v in state.items()}


def as_full_checkpoint(state: dict) -> dict:
    """A whole EVA-CLIP checkpoint: ``visual.`` keys, a text tower and the logit scale."""
    return {**{f"visual.{k}": v for k, v in state.items()},
            "text.token_embedding.weight": torch.zeros(4, 2), "logit_scale": torch.tensor(4.6)}


@pytest.mark.parametrize("convert", [dict, as_llm2clip_keys, as_full_checkpoint], ids=["eva_clip", "llm2clip", "full"])
def test_forward_matches_the_reference(convert):
    ref = reference()
    state = ref.state_dict()
    assert {"rope.freqs_cos", "blocks.1.attn.rope.freqs_sin", "head.weight", "blocks.0.attn.q_bias"} <= set(state)
    tower = tiny_tower().eval()
    tower.load_reference_state_dict(convert(state))
    x = pixels()
    with torch.no_grad():
        ours, theirs = tower(x), ref.forward_features(x)
    assert ours.shape == (3, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # and in float64 the two routes agree to rounding
    with torch.no_grad():
        diff = (tower.double()(x.double()) - ref.double().forward_features(x.double())).abs().max().item()
    assert diff < 1e-12


def test_rope_table_matches_the_reference_at_the_preset_sizes():
    for name, sizes in PRESETS.items():
        grid = sizes["image_size"] // sizes["patch_size"]
        ref = RefRope(sizes["width"] // sizes["heads"] // 2, 16, grid)
        ours = Rope2D(sizes["width"] // sizes["heads"], grid, sizes["rope_grid"])
        assert torch.equal(ours.cos, ref.freqs_cos) and torch.equal(ours.sin, ref.freqs_sin), name


def test_loading_is_strict_and_names_the_keys():
    state = reference().state_dict()
    tower = tiny_tower()
    bad = {k: v for k, v in state.items() if k != "blocks.0.mlp.w3.weight"}
    bad["blocks.0.mlp.fc2.weight"] = state["blocks.0.mlp.w3.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.0.mlp.w3.weight'\], unexpected \['blocks.0.mlp.fc2"):
        tower.load_reference_state_dict(bad)
    with pytest.raises(ValueError, match=r"wrong shape \['norm.weight'\]"):
        tower.load_reference_state_dict({**state, "norm.weight": torch.ones(5)})


def test_a_checkpoint_of_another_grid_gets_its_pos_embed_resized():
    state = reference().state_dict()
    tower = tiny_tower(image_size=48)  # 6 x 6 patches instead of 4 x 4
    tower.load_reference_state_dict(state)
    assert tower.pos_embed.shape == (1, 37, 32)
    assert torch.equal(tower.pos_embed[:, 0], state["pos_embed"][:, 0])  # the CLS row is kept
    assert tower(pixels(2, 48)).shape == (2, 32)


def test_a_tower_path_with_reference_config_and_weights(tmp_path):
    ref = reference()
    vision_cfg = {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8,
                  "mlp_ratio": 2.6667, "eva_model_name": "eva-clip-tiny", "xattn": True, "fusedLN": True,
                  "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True}
    (tmp_path / "config.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision_cfg}))
    save_file({k: v.clone() for k, v in as_full_checkpoint(ref.state_dict()).items()},
              str(tmp_path / "model.safetensors"))
    tower = build_tower({"kind": "eva02", "path": str(tmp_path)}).eval()
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref.forward_features(x), atol=1e-5, rtol=0)

    # a tower config beside config.json must agree with it (a preset as a check)
    agreeing = build_tower({"kind": "eva02", "path": str(tmp_path), "config": TINY})
    assert agreeing.config == tower.config
    with pytest.raises(ValueError, match=r"differ .*'layers': \(2, 3\)"):
        build_tower({"kind": "eva02", "path": str(tmp_path), "config": {**TINY, "layers": 3}})

    (tmp_path / "model.safetensors").unlink()  # a plain tensor pickle is read with weights_only=True
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "EVA02_CLIP_tiny.pt")
    with torch.no_grad():
        torch.testing.assert_close(build_tower({"kind": "eva02", "path": str(tmp_path)}).eval()(x),
                                   ref.forward_features(x), atol=1e-5, rtol=0)

    (tmp_path / "config.json").write_text(json.dumps({"vision_cfg": {**vision_cfg, "subln": False}}))
    with pytest.raises(ValueError, match="not the EVA02 architecture"):
        build_tower({"kind": "eva02", "path": str(tmp_path)})


# ---- (2) layer-wise LR decay and weight decay ---------------------------------------------------


def tiny_model(**spec) -> LLM2CLIPModel:
    return LLM2CLIPModel(tiny_tower(**spec), llm_dim=8, embed_dim=16)


def test_layer_ids_are_the_references():
    model = tiny_model()
    layers = model.tower.num_layers
    groups = model.param_groups(lr=1.0, weight_decay=0.05, layer_decay=0.5, with_names=True)
    seen = set()
    for group in groups:
        for name in group["param_names"]:
            expected = (get_num_layer_for_vit(name[len("tower."):], layers + 2) if name.startswith("tower.")
                        else layers + 1)
            assert group["layer_id"] == expected, name
            assert group["lr_scale"] == 0.5 ** (layers + 1 - expected), name
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["tower.cls_token"] == ids["tower.pos_embed"] == ids["tower.patch_embed.proj.weight"] == 0
    assert ids["tower.blocks.1.attn.q_bias"] == 2 and ids["tower.norm.weight"] == ids["head.weight"] == 3


def test_no_weight_decay_is_the_references():
    model = tiny_model()
    # reference get_parameters: ndim <= 1 or a bias or the tower's no_weight_decay() {pos_embed, cls_token}
    expected = {n for n, p in model.named_parameters()
                if p.ndim <= 1 or n.endswith(".bias") or n in ("tower.pos_embed", "tower.cls_token")}
    assert {"tower.blocks.0.attn.q_bias", "tower.blocks.0.attn.inner_attn_ln.weight", "logit_scale"} <= expected
    assert model.no_weight_decay_names() == expected
    for group in model.param_groups(lr=1.0, weight_decay=0.05, layer_decay=0.9, with_names=True):
        assert all((n in expected) == (group["weight_decay"] == 0.0) for n in group["param_names"])


# ---- (3) gradient checkpointing ----------------------------------------------------------------


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    plain = tiny_tower().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_gradient_checkpointing(True)
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
    x = pixels()
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    assert len(calls) == 2  # forward + recompute in backward
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert build_tower({"kind": "eva02", "config": TINY, "gradient_checkpointing": True})._checkpointing


# ---- (4) export round trip ---------------------------------------------------------------------


def test_save_and_load_rebuild_the_tower(tmp_path):
    model = tiny_model(image_size=48, gradient_checkpointing=True).eval()
    spec = model.tower.export_spec()
    assert spec.config == {**TINY, "image_size": 48, "rope_grid": 16} and spec.image_size == 48 and not spec.path
    loaded = LLM2CLIPModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert isinstance(loaded.tower, EVA02Tower) and loaded.tower.export_spec() == spec
    assert loaded.preprocess == model.preprocess
    x, text = pixels(2, 48), torch.randn(2, 8)
    with torch.no_grad():
        a, b = model(x, text), loaded(x, text)
    torch.testing.assert_close(a["image_features"], b["image_features"], atol=0, rtol=0)


# ---- (5) config --------------------------------------------------------------------------------


def train_vision(**values) -> TrainVisionConfig:
    return from_dict(TrainVisionConfig, values, "train_vision")


@pytest.mark.parametrize("preset,params", [("EVA02-CLIP-B-16", 85.9e6), ("EVA02-CLIP-L-14", 303.3e6),
                                           ("EVA02-CLIP-L-14-336", 303.6e6)])
def test_config_takes_a_preset(preset, params):
    spec = train_vision(tower="eva02", tower_config={"preset": preset}).tower_spec()
    with torch.device("meta"):  # the sizes without allocating 300M parameters
        tower = build_tower(spec)
    size = PRESETS[preset]["image_size"]
    assert tower.preprocess.image_size == size and tower.width == PRESETS[preset]["width"]
    assert (tower.preprocess.mean, tower.preprocess.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert tower.blocks[0].mlp.w1.out_features == int(tower.width * 2.6667)  # 2048 (B) / 2730 (L)
    assert math.isclose(sum(p.numel() for p in tower.parameters()), params, rel_tol=1e-3)


def test_config_takes_explicit_sizes_and_checks_them(tmp_path):
    spec = train_vision(tower="eva02", tower_config=TINY, image_size=40).tower_spec()
    tower = build_tower(spec)
    assert tower.preprocess.image_size == 40 and tower.pos_embed.shape == (1, 26, 32)
    assert resolve_config({"preset": "EVA02-CLIP-B-16", "layers": 2})["layers"] == 2
    assert train_vision(tower="eva02", tower_path=str(tmp_path)).tower_path == str(tmp_path)
    with pytest.raises(ValueError, match="needs config.preset"):
        build_tower({"kind": "eva02"})
    with pytest.raises(ValueError, match=r"keys \['depth'\] unknown"):
        build_tower({"kind": "eva02", "config": {**TINY, "depth": 2}})
    with pytest.raises(ValueError, match="preset 'EVA02-CLIP-H' unknown"):
        build_tower({"kind": "eva02", "config": {"preset": "EVA02-CLIP-H"}})
    with pytest.raises(ValueError, match="multiple of 4"):
        build_tower({"kind": "eva02", "config": {**TINY, "heads": 16}})
    with pytest.raises(ConfigError, match="train_vision.tower: must be one of"):
        train_vision(tower="eva03")


# ---- (6) a training step -----------------------------------------------------------------------


def test_a_few_train_steps_reduce_the_loss():
    model = tiny_model().train()
    loss_fn = create_loss("clip", gather=False)
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-3, weight_decay=0.05, layer_decay=0.85))
    x, text = pixels(8), torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    before = model.tower.blocks[0].attn.q_bias.detach().clone()
    losses = []
    for _ in range(5):
        loss = loss_fn(**model(x, text))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert not torch.equal(before, model.tower.blocks[0].attn.q_bias)
