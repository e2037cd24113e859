"""What both trainers share: :class:`TrainArgs` and :func:`stage_defaults`."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from llm2clip.config.base import ConfigError, check_bounds


@dataclass(frozen=True)
class TrainArgs:
    """The training settings both trainers share (caption_contrastive, train_vision): one type and
    one check each. A stage section inherits them and sets its own defaults with
    :func:`stage_defaults`; its YAML keys stay flat (``train_vision.lr``).

    Attributes:
        nproc_per_node: Processes on this machine. > 1: the stage's CLI starts them under
            torchrun itself (one thread each on CPU); under an outer torchrun it is ignored.
        batch_size: Samples (train_vision) or caption pairs (caption_contrastive) per rank and
            micro-step.
        max_steps: Optimizer steps in total (train_vision: 0 = from ``epochs``).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (train_vision: not on 1-d/bias/embeddings/logit_scale).
        warmup_steps: Linear warmup steps (capped at the run's length), then the stage's schedule.
        zero_stage: DeepSpeed ZeRO stage.
        precision: ``auto`` (bf16 on a GPU that has it, fp16 with loss scaling on an older GPU,
            fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (GPU only). One resolver for every
            trainer: :func:`llm2clip.train.precision.resolve_precision`.
        gradient_checkpointing: Recompute activations in backward (less memory, more compute).
        gradient_clipping: Max global gradient norm; 0 = off.
        checkpoint_every: Save a resumable DeepSpeed checkpoint every N steps (0 = never).
        keep_checkpoints: Complete checkpoints kept. 0: at most one while training, removed after
            a successful run, no final checkpoint; N > 0: the newest N, the last step included.
        log_every: Log window averages to MLflow every N steps.
        seed_offset: Added to ``common.seed`` for this stage's generators.
    """

    nproc_per_node: int = 1
    batch_size: int = 8
    max_steps: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    zero_stage: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    gradient_clipping: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    log_every: int = 10
    seed_offset: int = 0

    SECTION: typing.ClassVar[str] = "train"

    def __post_init__(self) -> None:
        where = self.SECTION
        check_bounds(where, 1, nproc_per_node=self.nproc_per_node, batch_size=self.batch_size,
                     log_every=self.log_every)
        check_bounds(where, 0, max_steps=self.max_steps, weight_decay=self.weight_decay,
                     warmup_steps=self.warmup_steps, gradient_clipping=self.gradient_clipping,
                     checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints)
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")


def stage_defaults(**values: Any):
    """Class decorator, placed under ``@dataclass``: this stage's defaults for inherited
    :class:`TrainArgs` fields (the type and the checks stay TrainArgs')."""

    def apply(cls: type) -> type:
        own = cls.__dict__.get("__annotations__", {})
        for name, value in values.items():
            if name not in TrainArgs.__annotations__:
                raise TypeError(f"stage_defaults: {name} is not a TrainArgs field")
            own[name] = TrainArgs.__annotations__[name]
            setattr(cls, name, value)
        cls.__annotations__ = own
        return cls

    return apply
