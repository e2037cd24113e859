"""The EVA02-CLIP vision transformer (tower kind ``eva02``), in plain PyTorch.

This is the image encoder LLM2CLIP fine-tunes in its EVA02 runs: the EVA-CLIP code it ships
(LLM2CLIP ``llm2clip/eva_clip/eva_vit_model.py``: ``EVAVisionTransformer``, ``Attention``, ``SwiGLU``,
``Block``; ``rope.py``: ``VisionRotaryEmbeddingFast``; built by ``model.py:_build_vision_tower`` from
``model_configs/EVA02-CLIP-*.json``) with the switches every EVA02 config sets: ``rope``,
``subln``, ``naiveswiglu``, ``xattn`` (which only picks the attention kernel), ``qkv_bias``,
``intp_freq`` and ``global_average_pool=False``. Per image ``(B, 3, S, S)``:

1. ``patch_embed.proj`` (a ``P x P`` conv, stride ``P``) -> ``G x G`` patch tokens, ``G = S / P``;
   prepend ``cls_token``; add the absolute ``pos_embed`` -> ``(B, 1 + G*G, width)``.
2. ``layers`` pre-norm blocks: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, where
   - attention has separate ``q_proj``/``k_proj``/``v_proj`` weights with biases ``q_bias`` and
     ``v_bias`` only (k has none), 2-D rotary embeddings on the patch tokens of q and k (the CLS
     token is not rotated), and a LayerNorm (``inner_attn_ln``, the sub-LN) before ``proj``;
   - the MLP is SwiGLU: ``w3(ffn_ln(silu(w1 x) * w2 x))``, hidden ``int(width * mlp_ratio)``.
3. ``norm`` (LayerNorm) of the CLS token -> pooled ``(B, width)``. The reference's ``head`` (the
   CLIP projection) is not part of the tower: LLM2CLIP deletes it and trains a new one
   (:class:`llm2clip.vision.model.LLM2CLIPModel`).

Every LayerNorm has eps 1e-6 (the reference's ``partial(FusedLayerNorm, eps=1e-6)``). The rotary
table follows ``VisionRotaryEmbeddingFast``: per axis, ``head_dim / 4`` frequencies
``10000 ** (-2i / (head_dim / 2))`` at positions ``arange(G) / G * rope_grid`` (``rope_grid`` =
``pt_hw_seq_len``, the grid the model was pre-trained at: ``intp_freq``), each repeated for an
adjacent channel pair; the first half of a head's channels rotate with the row, the second with
the column. Drop path and patch dropout (0 in every EVA02 config) are not implemented.

Parameter names are the reference's state-dict keys, so an EVA-CLIP checkpoint loads with
:meth:`EVA02Tower.load_reference_state_dict` (``visual.`` prefix stripped; see there).

Config (``TowerSpec.config`` / ``train_vision.tower_config``): ``preset`` (a key of
:data:`PRESETS`) and/or the sizes ``width``, ``layers``, ``heads``, ``mlp_ratio``, ``patch_size``,
``image_size``, ``rope_grid`` (``mlp_ratio`` defaults to 2.6667, ``rope_grid`` to 16); explicit
sizes override the preset's. ``TowerSpec.image_size``, when set, overrides ``image_size``.
``tower_path``: a directory holding the weights (``*.safetensors``; a ``.bin``/``.pt``/``.pth`` of
plain tensors is read with ``weights_only=True``) and, unless the config is given, ``config.json``
in the reference's model-config form (``vision_cfg``) or ours.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm2clip.vision.towers import TowerSpec, VisionTower
from llm2clip.vision.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess

log = logging.getLogger(__name__)

EPS = 1e-6
_L14 = {"width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 2.6667, "patch_size": 14, "rope_grid": 16}
# The reference's model_configs/EVA02-CLIP-*.json vision_cfg (heads = width / head_width 64).
PRESETS: dict[str, dict[str, Any]] = {
    "EVA02-CLIP-B-16": {"width": 768, "layers": 12, "heads": 12, "mlp_ratio": 2.6667, "patch_size": 16,
                        "image_size": 224, "rope_grid": 16},
    "EVA02-CLIP-L-14": {**_L14, "image_size": 224},
    "EVA02-CLIP-L-14-336": {**_L14, "image_size": 336},
}
SIZE_KEYS = ("width", "layers", "heads", "mlp_ratio", "patch_size", "image_size", "rope_grid")
_DEFAULTS = {"mlp_ratio": 2.6667, "rope_grid": 16}
# Keys of an EVA-CLIP checkpoint that are not weights of this tower: the CLIP projection LLM2CLIP
# drops, and the rotary tables (buffers computed from the config, stored once per block).
_DROPPED = re.compile(r"head\.(weight|bias)|(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)")

# The reference's CLIPVisionCfg defaults (eva_clip/model.py) and the switches EVA02 sets.
_REFERENCE_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                       "image_size": 224, "pt_hw_seq_len": 16, "rope": False, "subln": False,
                       "naiveswiglu": False, "intp_freq": False, "qkv_bias": True,
                       "global_average_pool": False, "postnorm": False, "ls_init_value": None}
_EVA02_SWITCHES = {"rope": True, "subln": True, "naiveswiglu": True, "intp_freq": True, "qkv_bias": True,
                   "global_average_pool": False, "postnorm": False, "ls_init_value": None}


def resolve_config(config: dict[str, Any], image_size: int = 0) -> dict[str, Any]:
    """A preset and/or explicit sizes -> every key of :data:`SIZE_KEYS`, checked.

    Raises:
        ValueError: Unknown keys or preset, a missing size, or sizes that do not fit together.
    """
    unknown = sorted(set(config) - {"preset", *SIZE_KEYS})
    if unknown:
        raise ValueError(f"eva02 tower config keys {unknown} unknown; known: ['preset', *{list(SIZE_KEYS)}]")
    preset = config.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"eva02 preset {preset!r} unknown; expected one of {list(PRESETS)}")
    out = {**_DEFAULTS, **PRESETS.get(preset, {}), **{k: v for k, v in config.items() if k != "preset"}}
    if image_size:
        out["image_size"] = image_size
    missing = [k for k in SIZE_KEYS if k not in out]
    if missing:
        raise ValueError(f"eva02 tower needs config.preset (one of {list(PRESETS)}) or the sizes {missing}")
    out = {k: (float(out[k]) if k == "mlp_ratio" else int(out[k])) for k in SIZE_KEYS}
    if out["width"] % out["heads"] or (out["width"] // out["heads"]) % 4:
        raise ValueError(f"eva02: width {out['width']} / heads {out['heads']} must be a multiple of 4 (2-D RoPE)")
    if out["image_size"] % out["patch_size"]:
        raise ValueError(f"eva02: image_size {out['image_size']} is not a multiple of patch_size {out['patch_size']}")
    return out


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(..., 2k)``: each channel pair ``(a, b)`` -> ``(-b, a)`` (reference ``rotate_half``)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class Rope2D(nn.Module):
    """2-D rotary position embedding of the ``G x G`` patch tokens (reference ``VisionRotaryEmbeddingFast``).

    The tables are buffers computed from the sizes (not saved: they are no weights).
    """

    def __init__(self, head_dim: int, grid: int, pretrain_grid: int) -> None:
        super().__init__()
        axis_dim = head_dim // 2  # channels per axis
        inv_freq = 1.0 / (10000 ** (torch.arange(0, axis_dim, 2).float() / axis_dim))  # (head_dim / 4,)
        pos = torch.arange(grid) / grid * pretrain_grid  # positions rescaled to the pre-training grid
        angles = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)  # (G, axis_dim)
        rows = angles[:, None, :].expand(grid, grid, axis_dim)
        cols = angles[None, :, :].expand(grid, grid, axis_dim)
        table = torch.cat((rows, cols), dim=-1).reshape(grid * grid, head_dim)  # row-major tokens
        self.register_buffer("cos", table.cos(), persistent=False)
        self.register_buffer("sin", table.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads, G*G, head_dim)`` -> the same, rotated."""
        return x * self.cos + rotate_pairs(x) * self.sin


class Attention(nn.Module):
    """Multi-head self-attention with q/v biases, RoPE on patch tokens and the sub-LN before ``proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: Rope2D) -> torch.Tensor:
        """``(B, N, width)`` -> ``(B, N, width)``; token 0 is the CLS token."""
        b, n, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)
        v = F.linear(x, self.v_proj.weight, self.v_bias).view(b, n, self.heads, -1).transpose(1, 2)
        q = torch.cat((q[:, :, :1], rope(q[:, :, 1:])), dim=2).type_as(v)
        k = torch.cat((k[:, :, :1], rope(k[:, :, 1:])), dim=2).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as the reference
        return self.proj(self.inner_attn_ln(out.transpose(1, 2).reshape(b, n, c)))


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))`` (reference ``SwiGLU`` with ``subln=True``)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    """Pre-norm transformer block (reference ``Block`` without layer scale, post-norm or drop path)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = SwiGLU(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Rope2D) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class EVA02Tower(VisionTower):
    """EVA02-CLIP vision transformer: ``(B, 3, S, S)`` -> normed CLS token ``(B, width)``.

    Args:
        spec: The spec (``kind="eva02"``); its ``image_size`` overrides the config's.
        config: A preset and/or sizes (see :func:`resolve_config`); default ``spec.config``.
    """

    def __init__(self, spec: TowerSpec, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = resolve_config(spec.config if config is None else config, spec.image_size)
        self.spec, self.config = spec, cfg
        width, grid = cfg["width"], cfg["image_size"] // cfg["patch_size"]
        self.width = width
        self.preprocess = Preprocess(cfg["image_size"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, width, cfg["patch_size"], cfg["patch_size"])})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.rope = Rope2D(width // cfg["heads"], grid, cfg["rope_grid"])
        self.blocks = nn.ModuleList(Block(width, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["layers"]))
        self.norm = nn.LayerNorm(width, eps=EPS)
        self._init_weights()
        self._checkpointing = False
        self.set_gradient_checkpointing(spec.gradient_checkpointing)

    def _init_weights(self) -> None:
        """The reference init: trunc-normal(0.02) linears, cls and pos; zero biases; the output
        projections of block ``i`` scaled by ``1 / sqrt(2 (i + 1))`` (``fix_init_weight``); the
        patch conv keeps PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.w3.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> ``(B, width)``."""
        size = self.config["image_size"]
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"eva02 tower expects {size}x{size} inputs, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed["proj"](pixel_values).flatten(2).transpose(1, 2)  # (B, G*G, width)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            if self._checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, self.rope, use_reentrant=False)
            else:
                x = block(x, self.rope)
        return self.norm(x[:, 0])  # LayerNorm is per token: norm(x)[:, 0] of the reference

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        # The reference's get_num_layer_for_vit: embeddings 0, blocks.i -> i + 1, the rest on top.
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        match = re.match(r"blocks\.(\d+)\.", name)
        return int(match.group(1)) + 1 if match else self.num_layers + 1

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (``torch.utils.checkpoint``, non-reentrant)."""
        self._checkpointing = bool(enable)

    def export_spec(self) -> TowerSpec:
        return TowerSpec(kind=self.spec.kind, config=dict(self.config), image_size=self.preprocess.image_size,
                         pretrained=False, gradient_checkpointing=self._checkpointing)

    def load_reference_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load EVA-CLIP vision weights, strictly.

        Accepts a whole EVA-CLIP checkpoint (its ``visual.*`` keys are taken, the text tower and
        ``logit_scale`` ignored) or the vision keys alone. Besides our own names it takes LLM2CLIP's
        ``attn.q_proj.bias``/``attn.v_proj.bias`` for ``q_bias``/``v_bias``, drops ``head.*`` and the
        ``rope.freqs_*`` tables, and resizes a ``pos_embed`` of another grid bicubically (reference
        ``utils.py:resize_eva_pos_embed``).

        Raises:
            ValueError: Missing or unexpected keys (listed), or a tensor of the wrong shape.
        """
        state = dict(state_dict)
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        dropped = [k for k in state if _DROPPED.fullmatch(k)]
        for key in dropped:
            del state[key]
        for key in [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.[qv]_proj\.bias", k)]:
            ours = key.replace("_proj.bias", "_bias")
            if ours in state and not torch.equal(state[ours], state[key]):
                raise ValueError(f"checkpoint holds both {key} and {ours}, with different values")
            state[ours] = state.pop(key)
        if "pos_embed" in state and state["pos_embed"].shape != self.pos_embed.shape:
            state["pos_embed"] = _resize_pos_embed(state["pos_embed"], self.pos_embed.shape[1] - 1)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if state[k].shape != own[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"eva02 checkpoint does not match the tower: missing {missing}, "
                             f"unexpected {unexpected}, wrong shape {wrong}")
        self.load_state_dict(state, strict=True)
        log.info("loaded %d eva02 tensors (dropped %d: head / rope tables)", len(state), len(dropped))


def _resize_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``(1, 1 + g*g, D)`` -> ``(1, 1 + num_patches, D)``: the CLS row kept, the grid resized bicubically."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(num_patches)
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    log.info("eva02 pos_embed resized from %dx%d to %dx%d", old, old, new, new)
    return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)), dim=1)


def config_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """Our config keys from a ``config.json``: the reference model-config form (``vision_cfg``) or ours.

    Raises:
        ValueError: A reference config that is not an EVA02 architecture this tower implements.
    """
    vision = data.get("vision_cfg")
    if vision is None:
        return data
    got = {**_REFERENCE_DEFAULTS, **vision}
    off = {k: got[k] for k, v in _EVA02_SWITCHES.items() if got[k] != v}
    if off:
        raise ValueError(f"vision_cfg {off} is not the EVA02 architecture this tower implements {_EVA02_SWITCHES}")
    return {"width": got["width"], "layers": got["layers"], "heads": got["width"] // got["head_width"],
            "mlp_ratio": got["mlp_ratio"], "patch_size": got["patch_size"], "image_size": got["image_size"],
            "rope_grid": got["pt_hw_seq_len"]}


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``*.safetensors`` in ``directory`` (merged), else of its one ``.bin``/``.pt``/``.pth``
    read with ``weights_only=True`` (a ``state_dict``/``model``/``module`` entry is unwrapped)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        return {k: v for file in files for k, v in load_file(str(file)).items()}
    pickles = sorted(p for ext in ("bin", "pt", "pth") for p in directory.glob(f"*.{ext}"))
    if len(pickles) != 1:
        raise ValueError(f"{directory}: expected *.safetensors or one .bin/.pt/.pth, found {[p.name for p in pickles]}")
    state = torch.load(pickles[0], map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{pickles[0]} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model", "module"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def build_eva02_tower(spec: TowerSpec) -> EVA02Tower:
    """The builder of kind ``eva02``: random init from ``spec.config``, or a ``spec.path`` checkpoint dir
    (its ``config.json``, else ``spec.config``; given both, they must describe the same sizes)."""
    if not spec.path:
        return EVA02Tower(spec)
    directory = Path(spec.path)
    if not directory.is_dir():
        raise ValueError(f"eva02 tower path {spec.path!r} is not a directory")
    config_file = directory / "config.json"
    config = config_from_json(json.loads(config_file.read_text())) if config_file.is_file() else spec.config
    if config_file.is_file() and spec.config:  # both given (e.g. a preset as a check): they must agree
        saved, given = resolve_config(config, spec.image_size), resolve_config(spec.config, spec.image_size)
        differ = {k: (saved[k], given[k]) for k in SIZE_KEYS if saved[k] != given[k]}
        if differ:
            raise ValueError(f"eva02 tower: {config_file} and the tower config differ (file, config): {differ}")
    tower = EVA02Tower(spec, config)
    tower.load_reference_state_dict(read_checkpoint(directory))
    log.info("loaded eva02 tower from %s (%d layers, width %d)", directory, tower.num_layers, tower.width)
    return tower
