"""``train_vision``: vision tower + text adapter on frozen-LLM caption embeddings."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from llm2clip.config.base import ConfigError, check_bounds
from llm2clip.config.training import TrainArgs, stage_defaults
from llm2clip.tower_kinds import TOWERS, directory_kinds


@dataclass(frozen=True)
@stage_defaults(batch_size=32, max_steps=0, lr=5e-4, weight_decay=0.05, warmup_steps=10, zero_stage=1,
                gradient_clipping=5.0, checkpoint_every=50, keep_checkpoints=2, log_every=10, seed_offset=3)
class TrainVisionConfig(TrainArgs):
    """train_vision: vision tower + text adapter on frozen-LLM caption embeddings (CLIP loss).

    Defaults are the small CPU demo. One step = one optimizer step over ``batch_size x ranks x
    gradient_accumulation_steps`` samples. The shared training fields are :class:`TrainArgs`; the
    paper recipe (LLM2CLIP v6 C.1, ``run.sh``) for them: global batch 4096, lr 1e-5 on a
    pretrained tower, weight decay 0.05, no warmup, ZeRO-1, fp16 with dynamic loss scaling,
    gradient clipping 5.0, gradient checkpointing on.

    Attributes:
        tower: Vision tower kind, a key of :data:`llm2clip.tower_kinds.TOWERS`: ``clip``,
            ``siglip``, ``efficientnet_lite0`` or ``vit_scratch`` (built in).
        tower_path: Kinds that load a directory (``clip``/``siglip``: a local Hugging Face dir;
            ``eva02``: EVA-CLIP safetensors + config.json): pretrained weights; empty: from config.
        tower_config: Vision-config keyword arguments (sizes) for a tower built from scratch.
        tower_pretrained: ``efficientnet_lite0``: start from the packaged ImageNet weights.
        image_size: Input side in pixels; 0 = the tower's own (reference: 224 / 336).
        embed_dim: Shared embedding width (reference: 1280).
        adapter_blocks: Residual blocks of the text adapter (reference: 4).
        adapter_expansion: Hidden width factor of each adapter block (reference: 2).
        loss: A name in :data:`llm2clip.losses.LOSSES` (``clip``: symmetric InfoNCE; ``siglip``:
            the pairwise sigmoid loss with a learnable bias), or ``auto``: the tower's own
            (``siglip`` for SigLIP towers, ``clip`` otherwise).
        logit_scale_init: Initial log inverse temperature; None = the pretrained CLIP/SigLIP
            checkpoint's (reference keeps it), else the loss's own (CLIP ln(1/0.07), SigLIP ln 10).
        caption_mix: Caption field -> sampling weight, one caption type drawn per sample; empty
            = equal weights over ``common.caption_fields`` (reference: short/long 50/50).
        gradient_accumulation_steps: Micro-steps per optimizer step (how: ``accumulation``).
        accumulation: ``sum`` (DeepSpeed gradient summation: negatives come from each
            micro-batch only) or ``cached_features`` (open_clip ``--accum-freq``: the loss spans
            every micro-batch of the step x ranks, memory stays one micro-batch's graph, at one
            extra no-grad forward per micro-batch); only matters with ``gradient_accumulation_steps > 1``.
        epochs: Passes of ``train_num_samples`` samples (reference: 4).
        train_num_samples: Samples per epoch (open_clip ``--train-num-samples``); 0 = the size of
            the train split. Shards are resampled with replacement, so an epoch is a sample count.
        layer_decay: Layer-wise LR decay of the tower (reference: 0.85; 1 = off).
        schedule: ``cosine`` (to 0 at the last step, open_clip ``cosine_lr``) or ``constant``.
        workers: Data-loader processes per rank (0 = load in the training process).
        shuffle_buffer: Samples in each loader's shuffle buffer (open_clip: 5000).
        init_model: An exported LLM2CLIP model dir (``llm2clip import``, or an earlier run's
            output) whose tower, head, adapter, temperature and loss start this run; the tower
            fields above are then taken from it. Empty: build from ``tower`` (the demo).
        resume: ``latest`` (continue this output's newest checkpoint), ``none`` (start over) or
            a checkpoint directory to start from.
        val_batch_size: Images per forward pass for the val retrieval metrics.
        val_max_samples: Cap on val samples for R@1 (0 = all).
        verify_sidecar_files: Recompute every sidecar's sha256 before training (slow on big
            data; keys are checked sample by sample while reading either way).
    """

    SECTION: typing.ClassVar[str] = "train_vision"

    tower: str = "vit_scratch"  # checked against llm2clip.tower_kinds.TOWERS in __post_init__
    tower_path: str = ""
    tower_config: dict[str, Any] = field(default_factory=dict)
    tower_pretrained: bool = True
    image_size: int = 0
    embed_dim: int = 256
    adapter_blocks: int = 4
    adapter_expansion: float = 2.0
    loss: str = "auto"  # checked against llm2clip.losses.LOSSES by the stage (torch stays out of here)
    logit_scale_init: float | None = None
    caption_mix: dict[str, float] = field(default_factory=dict)
    gradient_accumulation_steps: int = 1
    accumulation: Literal["sum", "cached_features"] = "sum"
    epochs: int = 1
    train_num_samples: int = 0
    layer_decay: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    workers: int = 2
    shuffle_buffer: int = 1000
    init_model: str = ""
    resume: str = "latest"
    val_batch_size: int = 64
    val_max_samples: int = 0
    verify_sidecar_files: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self.SECTION
        check_bounds(where, 1, embed_dim=self.embed_dim, epochs=self.epochs,
                     gradient_accumulation_steps=self.gradient_accumulation_steps,
                     val_batch_size=self.val_batch_size)
        check_bounds(where, 0, image_size=self.image_size, adapter_blocks=self.adapter_blocks,
                     train_num_samples=self.train_num_samples, workers=self.workers,
                     shuffle_buffer=self.shuffle_buffer, val_max_samples=self.val_max_samples)
        if self.accumulation not in ("sum", "cached_features"):
            raise ConfigError(f"{where}.accumulation: must be 'sum' or 'cached_features', got {self.accumulation!r}")
        if self.adapter_expansion <= 0:
            raise ConfigError(f"{where}.adapter_expansion: must be > 0, got {self.adapter_expansion}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"{where}.layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.zero_stage == 0 and self.precision in ("bf16", "fp16"):
            # Stage 0 keeps the fp32 master weights inside DeepSpeed's fp16/bf16 wrapper, out of
            # reach of the per-step logit-scale clamp; ZeRO >= 1 exposes them (safe_set_full_fp32_param).
            raise ConfigError(f"{where}.zero_stage: {self.precision} needs ZeRO stage >= 1")
        if any(w < 0 for w in self.caption_mix.values()) or (
                self.caption_mix and sum(self.caption_mix.values()) <= 0):
            raise ConfigError(f"{where}.caption_mix: weights must be >= 0 with a positive sum")
        if self.tower not in TOWERS:
            raise ConfigError(f"{where}.tower: must be one of {list(TOWERS)}, got {self.tower!r}")
        if self.tower_path and not TOWERS[self.tower].loads_directory:
            raise ConfigError(f"{where}.tower_path: only {'/'.join(directory_kinds())} towers load a directory")
        if not self.loss.strip():
            raise ConfigError(f"{where}.loss: 'auto' or a loss name (clip, siglip)")
        if not self.resume.strip():
            raise ConfigError(f"{where}.resume: 'latest', 'none' or a checkpoint directory")

    def tower_spec(self) -> dict[str, Any]:
        """The :class:`llm2clip.vision.towers.TowerSpec` fields of this config."""
        return {"kind": self.tower, "path": self.tower_path, "config": dict(self.tower_config),
                "image_size": self.image_size, "pretrained": self.tower_pretrained,
                "gradient_checkpointing": self.gradient_checkpointing}
