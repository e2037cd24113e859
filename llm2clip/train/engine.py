"""DeepSpeed for the vision trainer: derived config, engine, LR schedule, clamp and fp32 export.

``to_deepspeed_config`` is a pure function of the stage config and the world size (the DeepSpeed
JSON is derived, never kept as a file). The optimizer is a plain ``torch.optim.AdamW`` over the
model's own parameter groups (weight-decay exclusions, layer-wise LR decay), handed to DeepSpeed
as a client optimizer: no JIT-built fused op on CPU (feasibility §3). The schedule is a
``LambdaLR`` that multiplies each group's own (already layer-scaled) LR, stepped and checkpointed
by DeepSpeed.

Where the exact weights live depends on ZeRO stage and precision: the module's parameters (stage
0 fp32), fp32 fragments partitioned over ranks (stages 1-2) or per-parameter partitions (stage 3).
:func:`clamp_logit_scale` and :func:`full_fp32_parameters` go through DeepSpeed's
``safe_get/set_full_fp32_param`` so they are right in every case; both are collectives (call on
every rank).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import torch

from llm2clip.config import TrainVisionConfig

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)  # reference optimizer (LLM2CLIP run.sh / open_clip defaults)
ADAM_EPS = 1e-8


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device with bf16, else ``fp32``.

    Raises:
        ValueError: ``fp16`` on CPU (DeepSpeed's CPU accelerator has no fp16 training path).
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return precision


def to_deepspeed_config(cfg: TrainVisionConfig, world_size: int, precision: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` ranks (pure; unit-tested).

    Args:
        cfg: The stage config (batch, accumulation, ZeRO stage, clipping, checkpointing).
        world_size: Number of data-parallel ranks.
        precision: Resolved precision: ``fp32``, ``bf16`` or ``fp16`` (see :func:`resolve_precision`).

    Returns:
        A config dict for ``deepspeed.initialize(config=...)``.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be resolved to fp32/bf16/fp16, got {precision!r}")
    micro, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.gradient_clipping,  # 0 = off in DeepSpeed too
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log like open_clip; DeepSpeed's own step log stays quiet
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        # Dynamic loss scaling as the reference (DeepSpeed fp16 defaults, stated explicitly).
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if cfg.gradient_checkpointing:
        # The tower recomputes its blocks itself (HF non-reentrant checkpointing, set on the
        # model); this section only configures DeepSpeed's own checkpointing API, kept at the
        # plain setting so the two never disagree.
        config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                              "contiguous_memory_optimization": False}
    return config


def lr_factor(step: int, *, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Multiplier of every group's LR at 0-based optimizer ``step`` (open_clip ``cosine_lr``).

    Warmup: ``(step + 1) / warmup``; then cosine from 1 to 0 at ``total`` (``constant``: 1).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done, span = step - warmup, max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(done, span) / span))


def build_optimizer(model: torch.nn.Module, cfg: TrainVisionConfig, total_steps: int):
    """AdamW over ``model.param_groups`` + the LR schedule (``LambdaLR`` keeps per-group LRs)."""
    groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.layer_decay)
    # The fused kernel (CPU and CUDA) is one pass over each tensor: ~7x faster than the default
    # single-tensor loop on CPU; DeepSpeed steps it on its flat fp32 partitions just the same.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused)
    factor = functools.partial(lr_factor, warmup=min(cfg.warmup_steps, total_steps), total=total_steps,
                               schedule=cfg.schedule)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def effective_zero_stage(cfg: TrainVisionConfig, world_size: int, precision: str) -> int:
    """The ZeRO stage to run: the configured one, except fp32 on a single rank -> 0.

    ZeRO partitions over ranks; with one rank it only adds copies into and out of flat buffers
    (about a quarter of a small CPU step). bf16/fp16 keep their stage: the fp32 master weights
    live in the ZeRO optimizer.
    """
    return 0 if world_size == 1 and precision == "fp32" else cfg.zero_stage


def build_engine(model: torch.nn.Module, cfg: TrainVisionConfig, *, world_size: int, total_steps: int,
                 precision: str):
    """``deepspeed.initialize`` with the client AdamW and schedule; returns the engine."""
    import deepspeed

    stage = effective_zero_stage(cfg, world_size, precision)
    if stage != cfg.zero_stage:
        log.info("one rank, fp32: ZeRO-%d has nothing to partition, running stage 0", cfg.zero_stage)
        cfg = dataclasses.replace(cfg, zero_stage=stage)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=to_deepspeed_config(cfg, world_size, precision))
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
def full_fp32_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained parameter as a full fp32 CPU tensor (collective: every rank calls it).

    Under bf16 the exact values are DeepSpeed's fp32 masters; under ZeRO-3 they are gathered.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # stage 0 fp32: the module parameter is the master
            full = param.data
        shape = getattr(param, "ds_shape", param.shape)
        out[name] = full.detach().float().reshape(shape).cpu().clone()
    return out
