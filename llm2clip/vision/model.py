"""The LLM2CLIP model: vision tower + new head, text adapter, learnable temperature.

Mirrors the reference ``CustomCLIP`` (LLM2CLIP ``eva_clip/model.py``): the CLIP text tower is gone;
captions arrive as precomputed frozen-LLM embeddings and go through :class:`TextAdapter`; the vision
tower's pooled features go through a freshly initialised ``Linear(width, embed_dim)`` (the reference
deletes the pretrained ``visual.head``/``visual.proj``), initialised as the reference does for the
tower's family (:data:`HEAD_INITS`: OpenAI CLIP ``width ** -0.5`` normal, EVA trunc-normal x 0.001).
``forward`` returns both L2-normalised features and ``logit_scale.exp()``, as the reference.

The exported model is ``model.safetensors`` + ``llm2clip_config.json`` (see :meth:`config_dict`);
it rebuilds without the original pretrained directory because the tower's full config is inside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip.io import atomic_path, atomic_write_json, sha256_file
from llm2clip.vision.adapter import TextAdapter
from llm2clip.vision.towers import TowerSpec, VisionTower, build_tower
from llm2clip.vision.transforms import EvalTransform, Preprocess, TrainTransform, to_tensor_batch

log = logging.getLogger(__name__)

CONFIG_FILE = "llm2clip_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "llm2clip"
FORMAT_VERSION = 1
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)  # temperature >= 0.01, clamped after every step (reference)
# Excluded from weight decay besides 1-d tensors and biases (reference ``no_weight_decay``:
# pos_embed, cls_token, logit_scale; SigLIP's attention-pool ``probe`` is its cls-token analogue).
_NO_DECAY = re.compile(
    r"(?:^|\.)(position_embedding|class_embedding|pos_embed|cls_token|probe|logit_scale|logit_bias)(?:\.|$)")


def _init_head_openai(head: nn.Linear) -> None:
    """OpenAI CLIP ``VisionTransformer.proj = width ** -0.5 * randn(width, embed_dim)`` (LLM2CLIP
    ``eva_clip/transformer.py``; ``build_model_from_openai_state_dict`` pops the pretrained ``proj``,
    so this init is what trains). The reference projection has no bias; ours is zero and trains."""
    nn.init.normal_(head.weight, std=head.in_features ** -0.5)
    nn.init.zeros_(head.bias)


def _init_head_eva(head: nn.Linear) -> None:
    """EVA ``EVAVisionTransformer.head``: trunc-normal std 0.02, then weight and (zero) bias times
    ``init_scale`` 0.001 (LLM2CLIP ``eva_clip/eva_vit_model.py``; ``factory.py:load_checkpoint``
    deletes the pretrained ``visual.head``, so this init is what trains)."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    with torch.no_grad():
        head.weight.mul_(0.001)
    nn.init.zeros_(head.bias)


def _init_head_default(head: nn.Linear) -> None:
    """Trunc-normal std 0.02, zero bias: kinds without a reference head (the demo towers, SigLIP,
    whose reference run has no new head at all: docs/reference-differences.md)."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


HEAD_INITS: dict[str, Callable[[nn.Linear], None]] = {"clip": _init_head_openai, "eva02": _init_head_eva}
"""Tower kind -> how the reference initialises the new projection head of that tower family; a
kind not listed (``vit_scratch``, ``efficientnet_lite0``, ``siglip``, plugins) gets
:func:`_init_head_default`."""


def init_head(head: nn.Linear, kind: str) -> None:
    """Initialise the new ``Linear(width, embed_dim)`` head as the reference does for tower ``kind``."""
    HEAD_INITS.get(kind, _init_head_default)(head)


def _absolute_if_local(spec: str | None) -> str | None:
    """An existing local path made absolute (the model then loads from any working directory)."""
    if not spec or "://" in spec or not Path(spec).expanduser().exists():
        return spec
    return os.path.abspath(Path(spec).expanduser())


def _saved_caption_encoder(saved: dict[str, Any], directory: Path) -> str | None:
    """The caption encoder a saved config names, as a spec that loads from here.

    Absolute paths, ``pkg://`` specs and hub ids are kept. A relative path (older exports) is
    looked up next to the model dir, then in the working directory; when neither exists and it
    was a local dir (it has a fingerprint) the model-dir candidate is returned, else the path as
    saved. Either way :func:`llm2clip.clip_model.encode_text` fails at once on a missing local
    path instead of asking the hub (this package never imports :mod:`llm2clip.text`).
    """
    path = saved.get("path")
    if not path or "://" in path or Path(path).expanduser().is_absolute():
        return path
    candidates = [directory / path, Path(path)]
    for candidate in candidates:
        if candidate.exists():
            return os.path.abspath(candidate)
    if saved.get("fingerprint"):
        return os.path.abspath(candidates[0])
    return path


class LLM2CLIPModel(nn.Module):
    """Vision tower + head and text adapter mapping into one ``embed_dim`` space.

    Args:
        tower: The vision tower.
        llm_dim: Width of the LLM caption embeddings.
        embed_dim: Shared embedding width (reference: 1280).
        adapter_blocks: Residual blocks in the adapter (reference: 4).
        adapter_expansion: Hidden width factor of each block (reference: 2).
        logit_scale_init: Initial ``logit_scale`` (log of the inverse temperature).
        logit_bias_init: Initial learnable ``logit_bias`` for a loss that takes one (SigLIP);
            None: the model has no bias.
        loss: Name of the loss the model is trained with (:data:`llm2clip.losses.LOSSES`),
            recorded in its config.
        caption_encoder: Saved caption-encoder dir, for :func:`llm2clip.clip_model.encode_text`.
        caption_encoder_fingerprint: Fingerprint of that encoder (lineage; written to the config).
    """

    def __init__(self, tower: VisionTower, llm_dim: int, embed_dim: int = 1280, adapter_blocks: int = 4,
                 adapter_expansion: float = 2.0, logit_scale_init: float = LOGIT_SCALE_INIT,
                 logit_bias_init: float | None = None, loss: str = "clip",
                 caption_encoder: str | None = None, caption_encoder_fingerprint: str | None = None) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.width, embed_dim)
        init_head(self.head, tower.spec.kind)
        self.adapter = TextAdapter(llm_dim, embed_dim, adapter_blocks, adapter_expansion)
        # Shape [1], not []: DeepSpeed 0.19.8 cannot broadcast 0-dim parameters (feasibility §3).
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale_init)))
        self.logit_bias = (nn.Parameter(torch.full((1,), float(logit_bias_init)))
                           if logit_bias_init is not None else None)
        self.loss = loss
        self.embed_dim = embed_dim
        self.llm_dim = llm_dim
        self.caption_encoder = caption_encoder
        self.caption_encoder_fingerprint = caption_encoder_fingerprint
        self.source_spec: dict[str, Any] = tower.spec.to_dict()
        self._caption_encoder_origin = ""  # where caption_encoder came from (for errors)

    @classmethod
    def build(cls, tower: TowerSpec | dict[str, Any], **kwargs: Any) -> LLM2CLIPModel:
        """Build the tower from its spec, then the model (``kwargs`` as in the constructor)."""
        return cls(build_tower(tower), **kwargs)

    # ---------------------------------------------------------------------------------- forward

    @property
    def preprocess(self) -> Preprocess:
        return self.tower.preprocess

    def train_transform(self) -> TrainTransform:
        return TrainTransform(self.tower.preprocess)

    def eval_transform(self) -> EvalTransform:
        return EvalTransform(self.tower.preprocess)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> L2-normalised ``(B, embed_dim)`` float32."""
        return F.normalize(self.head(self.tower(pixel_values)).float(), dim=-1)

    def text_features(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, llm_dim)`` -> L2-normalised ``(B, embed_dim)`` float32."""
        return F.normalize(self.adapter(text_embeddings).float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor, text_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both sides into the shared space, as the keyword arguments of a loss
        (``loss_fn(**model(pixels, text))``, open_clip's ``output_dict``).

        Args:
            pixel_values: ``(B, 3, S, S)`` images normalised with ``self.preprocess``.
            text_embeddings: ``(B, llm_dim)`` frozen-LLM caption embeddings (any scale).

        Returns:
            ``image_features (B, D)``, ``text_features (B, D)`` (both unit-norm, float32),
            ``logit_scale``: ``exp`` of the parameter, shape ``[1]``, and ``logit_bias`` ``[1]``
            when the model has one.
        """
        out = {"image_features": self.image_features(pixel_values),
               "text_features": self.text_features(text_embeddings), "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp ``logit_scale`` to ``[0, ln 100]``; the trainer calls it after every optimizer step."""
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_gradient_checkpointing(enable)

    # -------------------------------------------------------------------------------- optimizer

    def no_weight_decay_names(self) -> set[str]:
        """Names of parameters trained without weight decay.

        1-d tensors (biases, norms, BatchNorm, CLIP ``class_embedding``), every ``*.bias``,
        ``logit_scale``, position embeddings and SigLIP's ``probe`` (reference
        ``optim.py:get_parameters`` + ``no_weight_decay``).
        """
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith(".bias") or _NO_DECAY.search(name)}

    def layer_id(self, name: str) -> int:
        """Layer id of a model parameter: the tower's ids; head, adapter, logit_scale on top."""
        if name.startswith("tower."):
            return self.tower.layer_id(name[len("tower."):])
        return self.tower.num_layers + 1

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float = 1.0,
                     with_names: bool = False) -> list[dict[str, Any]]:
        """Optimizer parameter groups with weight-decay exclusions and layer-wise LR decay.

        ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``: embeddings (id 0) get the
        smallest scale, block ``i`` has id ``i + 1``, everything above the last block (final norm,
        pooler, head, adapter, logit_scale) has scale 1 (reference ``get_assigner``; ViT-L with
        0.85: last block 0.85, embeddings 0.85**25). ``layer_decay=1`` turns it off.

        Args:
            lr: Base learning rate.
            weight_decay: Weight decay of the decayed groups.
            layer_decay: Per-layer LR decay factor in ``(0, 1]``.
            with_names: Add ``param_names`` to each group (torch >= 2.6 understands it).

        Returns:
            Groups with ``params``, ``lr`` (already scaled), ``lr_scale``, ``weight_decay``,
            ``layer_id`` and ``group_name``; only parameters with ``requires_grad``.
        """
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        top = self.tower.num_layers + 1
        no_decay = self.no_weight_decay_names()
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            lid, exempt = self.layer_id(name), name in no_decay
            scale = layer_decay ** (top - lid)
            group = groups.setdefault((lid, exempt), {
                "params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale,
                "weight_decay": 0.0 if exempt else weight_decay, "layer_id": lid,
                "group_name": f"layer_{lid}_{'no_decay' if exempt else 'decay'}",
            })
            group["params"].append(param)
            group["param_names"].append(name)
        out = [groups[key] for key in sorted(groups)]
        if not with_names:
            for group in out:
                del group["param_names"]
        return out

    # ------------------------------------------------------------------------------ save / load

    def config_dict(self) -> dict[str, Any]:
        """The ``llm2clip_config.json`` content (without the weights checksum)."""
        caption = None
        if self.caption_encoder or self.caption_encoder_fingerprint:
            caption = {"path": _absolute_if_local(self.caption_encoder),
                       "fingerprint": self.caption_encoder_fingerprint}
        scale = float(self.logit_scale.detach().float().reshape(-1)[0])
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "embed_dim": self.embed_dim, "llm_embedding_dim": self.llm_dim,
            "tower": {"spec": self.tower.export_spec().to_dict(), "width": self.tower.width,
                      "num_layers": self.tower.num_layers, "source": self.source_spec},
            "head": {"in_features": self.tower.width, "out_features": self.embed_dim, "bias": True},
            "adapter": {"num_blocks": self.adapter.num_blocks, "expansion": self.adapter.expansion,
                        "l2_normalize_input": True},
            "logit_scale": scale, "logit_scale_exp": math.exp(scale),
            "logit_bias": (float(self.logit_bias.detach().float().reshape(-1)[0])
                           if self.logit_bias is not None else None),
            "loss": self.loss,
            "preprocess": self.tower.preprocess.to_dict(),
            "caption_encoder": caption,
            "num_parameters": sum(p.numel() for p in self.parameters()),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` then ``llm2clip_config.json``, each atomically.

        The config goes last and records the weights' sha256, so a directory with a config is a
        complete one.

        Returns:
            The directory.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        config = self.config_dict()
        config["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(directory / WEIGHTS_FILE)}
        atomic_write_json(directory / CONFIG_FILE, config)
        log.info("saved LLM2CLIP model (%d params) to %s", config["num_parameters"], directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, caption_encoder: str | None = None,
                        device: str | torch.device = "cpu", verify: bool = True) -> LLM2CLIPModel:
        """Load a saved model (safetensors only, no pickle), in eval mode.

        Args:
            directory: A directory written by :meth:`save_pretrained`.
            caption_encoder: Caption-encoder dir for :func:`llm2clip.clip_model.encode_text`;
                default: the saved one
                (saved as an absolute path; an older relative one is looked up next to
                ``directory``, then in the working directory).
            device: Where to put the model.
            verify: Check the weights file against the sha256 in the config.

        Raises:
            ValueError: Not an LLM2CLIP model dir, or a weights file that does not match.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise ValueError(f"{config_path} not found: not an exported LLM2CLIP model")
        cfg = json.loads(config_path.read_text())
        if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format {cfg.get('format')!r} v{cfg.get('format_version')} "
                             f"is not {FORMAT!r} v{FORMAT_VERSION}")
        tower = build_tower(TowerSpec.from_dict(cfg["tower"]["spec"]))
        tower.preprocess = Preprocess.from_dict(cfg["preprocess"])
        saved_caption = cfg.get("caption_encoder") or {}
        adapter = cfg["adapter"]
        model = cls(tower, llm_dim=cfg["llm_embedding_dim"], embed_dim=cfg["embed_dim"],
                    adapter_blocks=adapter["num_blocks"], adapter_expansion=adapter["expansion"],
                    logit_scale_init=cfg["logit_scale"], logit_bias_init=cfg.get("logit_bias"),
                    loss=cfg.get("loss", "clip"),  # models saved before losses were named trained with CLIP
                    caption_encoder=caption_encoder or _saved_caption_encoder(saved_caption, directory),
                    caption_encoder_fingerprint=saved_caption.get("fingerprint"))
        if not caption_encoder and saved_caption.get("path"):
            model._caption_encoder_origin = f"saved in {config_path} as {saved_caption['path']!r}"
        model.source_spec = cfg["tower"].get("source", model.source_spec)
        weights = cfg.get("weights") or {}
        weights_path = directory / weights.get("file", WEIGHTS_FILE)
        if verify and weights.get("sha256") and sha256_file(weights_path) != weights["sha256"]:
            raise ValueError(f"{weights_path} does not match the sha256 in {config_path}")
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    # ---------------------------------------------------------------------------------- encode

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        return self.head.weight.device, self.head.weight.dtype

    def encode_image(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Embed PIL images with the eval transform (shorter-side resize, center crop, normalise).

        Args:
            images: ``N`` PIL images of any mode and size.
            batch_size: Images per forward pass.

        Returns:
            ``(N, embed_dim)`` unit-norm float32 on CPU.
        """
        transform = self.eval_transform()
        device, dtype = self._device_dtype()
        out = []
        with self._inference():
            for start in range(0, len(images), batch_size):
                pixels = to_tensor_batch([transform(im) for im in images[start:start + batch_size]])
                out.append(self.image_features(pixels.to(device, dtype)).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def encode_text_embeddings(self, embeddings: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Map frozen-LLM caption embeddings into the shared space.

        Args:
            embeddings: ``(N, llm_dim)`` tensor or array, any scale and float dtype.
            batch_size: Rows per adapter pass.

        Returns:
            ``(N, embed_dim)`` unit-norm float32 on CPU.
        """
        device, _ = self._device_dtype()
        embeddings = torch.as_tensor(embeddings)
        out = []
        with self._inference():
            for start in range(0, embeddings.shape[0], batch_size):
                out.append(self.text_features(embeddings[start:start + batch_size].to(device)).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)
