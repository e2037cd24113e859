"""DeepSpeed for every trainer: derived config, engine, logit-scale clamp and fp32 export.

:func:`deepspeed_config` is a pure function of the shared training settings
(:class:`llm2clip.config.TrainArgs`), the world size and the precision (the DeepSpeed JSON is
derived, never kept as a file). :func:`build_engine` wraps a model with the client AdamW and
schedule of :mod:`llm2clip.train.optim`.

Where the exact weights live depends on ZeRO stage and precision: the module's parameters (stage
0 fp32), fp32 fragments partitioned over ranks (stages 1-2) or per-parameter partitions (stage 3).
:func:`clamp_logit_scale` and :func:`full_fp32_parameters` go through DeepSpeed's
``safe_get/set_full_fp32_param`` so they are right in every case; both are collectives (call on
every rank).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm2clip.config import TrainArgs
from llm2clip.train.optim import build_optimizer
from llm2clip.train.precision import PRECISIONS

log = logging.getLogger(__name__)


def deepspeed_config(args: TrainArgs, world_size: int, precision: str = "fp32", *, zero_stage: int | None = None,
                     micro_batch: int | None = None, accumulation: int = 1) -> dict[str, Any]:
    """The DeepSpeed JSON for ``args`` on ``world_size`` ranks (pure; unit-tested).

    Args:
        args: The stage's training settings (batch, ZeRO stage, clipping, checkpointing).
        world_size: Number of data-parallel ranks.
        precision: Resolved precision: ``fp32``, ``bf16`` or ``fp16``
            (:func:`llm2clip.train.precision.resolve_precision`).
        zero_stage: The stage to run (default ``args.zero_stage``; see :func:`effective_zero_stage`).
        micro_batch: Samples per rank and micro-step (default ``args.batch_size``).
        accumulation: Micro-steps per optimizer step.

    Returns:
        A config dict for ``deepspeed.initialize(config=...)``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be resolved to fp32/bf16/fp16, got {precision!r}")
    micro = micro_batch or args.batch_size
    config: dict[str, Any] = {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": args.gradient_clipping,  # 0 = off in DeepSpeed too
        "zero_optimization": {"stage": args.zero_stage if zero_stage is None else zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log like open_clip; DeepSpeed's own step log stays quiet
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        # Dynamic loss scaling as the reference (DeepSpeed fp16 defaults, stated explicitly).
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if args.gradient_checkpointing:
        # The model recomputes its blocks itself (HF non-reentrant checkpointing, set on the
        # model); this section only configures DeepSpeed's own checkpointing API, kept at the
        # plain setting so the two never disagree.
        config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                              "contiguous_memory_optimization": False}
    return config


def effective_zero_stage(args: TrainArgs, world_size: int, precision: str) -> int:
    """The ZeRO stage to run: the configured one, except fp32 on a single rank -> 0.

    ZeRO partitions over ranks; with one rank it only adds copies into and out of flat buffers
    (about a quarter of a small CPU step). bf16/fp16 keep their stage: the fp32 master weights
    live in the ZeRO optimizer.
    """
    return 0 if world_size == 1 and precision == "fp32" else args.zero_stage


def build_engine(model: torch.nn.Module, groups: list[dict], args: TrainArgs, *, world_size: int, precision: str,
                 total_steps: int, schedule: str, lr: float | None = None, micro_batch: int | None = None,
                 accumulation: int = 1, fused_optimizer: bool = True):
    """``deepspeed.initialize`` with the client AdamW over ``groups`` and its schedule.

    Args:
        model: The module to train (on its device, fp32).
        groups: Parameter groups (:func:`llm2clip.train.optim.trainable_groups` or the model's own).
        args: The stage's training settings; ``lr`` and ``micro_batch`` override theirs (MNTP).
        world_size: Data-parallel ranks.
        precision: Resolved precision.
        total_steps: Optimizer steps of the run (the schedule's length).
        schedule: ``cosine``, ``linear`` or ``constant`` (:func:`llm2clip.train.optim.lr_factor`).
        accumulation: Micro-steps per optimizer step.
        fused_optimizer: The fused AdamW kernel (:func:`llm2clip.train.optim.build_optimizer`).
    """
    import deepspeed

    stage = effective_zero_stage(args, world_size, precision)
    if stage != args.zero_stage:
        log.info("one rank, fp32: ZeRO-%d has nothing to partition, running stage 0", args.zero_stage)
    optimizer, scheduler = build_optimizer(groups, lr=lr or args.lr, total_steps=total_steps,
                                           warmup=args.warmup_steps, schedule=schedule, fused=fused_optimizer)
    config = deepspeed_config(args, world_size, precision, zero_stage=stage, micro_batch=micro_batch,
                              accumulation=accumulation)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if world_size == 1 and stage == 0:
        engine.enable_backward_allreduce = False  # nothing to reduce: skip flattening every gradient
    return engine


def _local_pieces(param: torch.nn.Parameter) -> list[torch.Tensor]:
    """The low-precision storage of ``param`` on this rank: its data and, under ZeRO-3, its partition."""
    pieces = [param.data] if param.data.numel() else []
    if getattr(param, "ds_tensor", None) is not None:
        pieces.append(param.ds_tensor.data)
    return pieces


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module, high: float, low: float = 0.0) -> float:
    """Clamp ``model.logit_scale`` to ``[low, high]`` everywhere it is stored (every rank calls).

    The reference clamps the module parameter after each step (open_clip ``legacy_train.py``,
    LLM2CLIP ``train.py``); under ZeRO/bf16 that alone is undone by the next step, which copies
    the fp32 master back, so the master is clamped too. Clamping is elementwise, so each rank
    clamps its own pieces: under ZeRO-3 its local fp32 partition (DeepSpeed 0.19.7's
    ``set_full_hp_param`` fails on a padded 1-element parameter split over 2 ranks), under
    ZeRO-1/2 the fp32 fragment it owns.

    Returns:
        The clamped value (log inverse temperature).
    """
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    param, master = model.logit_scale, None
    if hasattr(param, "ds_id"):  # ZeRO-3
        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(low, high))
    else:
        master = safe_get_full_fp32_param(param)  # collective under ZeRO-1/2; None at stage 0
        if master is not None:
            master = master.clamp(low, high)
            safe_set_full_fp32_param(param, master)
    for piece in _local_pieces(param):
        piece.clamp_(low, high)
    if hasattr(param, "ds_id"):
        master = safe_get_full_fp32_param(param)  # gathered again, after the clamp
    value = master if master is not None else param.data  # the fp32 master, not its bf16 copy
    return float(value.float().reshape(-1)[0])


@torch.no_grad()
def full_fp32_parameters(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Every (trained) parameter as a full fp32 CPU tensor (collective: every rank calls it).

    Under bf16/fp16 the exact values are DeepSpeed's fp32 masters; under ZeRO-3 they are gathered.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is None:  # stage 0 fp32: the module parameter is the master
            full = param.data
        shape = getattr(param, "ds_shape", param.shape)
        out[name] = full.detach().float().reshape(shape).cpu().clone()
    return out
