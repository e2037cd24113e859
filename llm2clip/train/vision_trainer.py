"""The train_vision loop: LLM2CLIP model + CLIP loss through DeepSpeed, open_clip-style logging.

Every rank calls :func:`train`. Per micro-batch: forward both sides, the gathered-with-grad CLIP
loss (:func:`llm2clip.losses.clip_loss`), ``engine.backward`` and ``engine.step`` (DeepSpeed
accumulates, clips, steps the optimizer and the LR schedule at accumulation boundaries). After
each optimizer step ``logit_scale`` is clamped to ``[0, ln 100]`` (reference). Checkpoints carry
the step, samples seen and the metric history; the data stream is a pure function of the seed
and the micro-batch index (:mod:`llm2clip.train.vision_data`), so a resumed run continues with
exactly the batches and weights an uninterrupted one would have had.

The batches come from a callable ``batches(start, total)`` so the same loop trains on prepared
shards (the stage), on synthetic tensors (the GPU benchmark) or on anything else.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2clip.config import TrainVisionConfig
from llm2clip.losses import clip_loss
from llm2clip.train import checkpoint
from llm2clip.train import engine as ds_engine
from llm2clip.train.distributed import DistContext
from llm2clip.vision.model import LOGIT_SCALE_MAX, LLM2CLIPModel

log = logging.getLogger(__name__)

Batches = Callable[[int, int], Iterable[dict[str, Any]]]  # (first micro-batch, total) -> batches
HISTORY_KEYS = ("loss", "lr", "logit_scale", "i2t_acc", "t2i_acc", "samples_per_second", "data_time",
                "batch_time")


@dataclass(frozen=True)
class TrainPlan:
    """How long a run is (open_clip epoch semantics on resampled data).

    Attributes:
        total_steps: Optimizer steps of the whole run.
        steps_per_epoch: ``ceil(samples per epoch / global_batch)``.
        global_batch: Samples per optimizer step over all ranks and micro-steps.
        accumulation: Micro-batches per optimizer step.
        precision: Resolved precision (``fp32``, ``bf16``, ``fp16``).
    """

    total_steps: int
    steps_per_epoch: int
    global_batch: int
    accumulation: int
    precision: str


def plan_training(cfg: TrainVisionConfig, train_samples: int, world_size: int, precision: str) -> TrainPlan:
    """Steps from the config: ``max_steps``, else ``epochs x ceil(train_num_samples / global batch)``."""
    accumulation = cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * world_size * accumulation
    per_epoch = max(1, math.ceil((cfg.train_num_samples or train_samples) / global_batch))
    total = cfg.max_steps or cfg.epochs * per_epoch
    return TrainPlan(total, per_epoch, global_batch, accumulation, precision)


@dataclass
class TrainOutcome:
    """What a run did (the same on every rank).

    Attributes:
        steps: Last optimizer step done.
        samples_seen: Training samples consumed over all ranks.
        resumed_from: Step of the checkpoint the run started from (0: fresh).
        history: Per step: ``HISTORY_KEYS`` lists (``history["loss"][k]`` is step ``k + 1``),
            resumed steps included.
        wall_time_s: Seconds in this process's loop.
        samples_per_second: Mean training throughput of this process's steps (all ranks).
        params: Full fp32 parameters after training (``full_fp32_parameters``).
    """

    steps: int = 0
    samples_seen: int = 0
    resumed_from: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    wall_time_s: float = 0.0
    samples_per_second: float = 0.0
    params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def _step_seed(seed: int, micro: int, rank: int) -> int:
    """Seed of the torch RNG for one micro-batch (drop-path, dropout): resumable by construction."""
    return (seed * 1_000_003 + micro * 7_919 + rank * 104_729) % (2**63 - 1)


class _Window:
    """Sums between two log points (open_clip's AverageMeter, one per logged value)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self) -> dict[str, float]:
        out = {k: v / max(1, self.count) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


def _micro_step(engine, batch: dict[str, Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Forward + loss + backward + ``engine.step`` of one micro-batch; returns detached
    ``[loss, i2t_acc, t2i_acc]`` of this rank."""
    pixels = batch["pixels"].to(device, dtype, non_blocking=True)  # (B, 3, S, S)
    text = batch["text"].to(device, non_blocking=True)  # (B, D_llm); the adapter normalises in fp32
    image_features, text_features, scale = engine(pixels, text)  # (B, E), (B, E), [1]
    loss, per_image, per_text, labels = clip_loss(image_features, text_features, scale, return_logits=True)
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        i2t = (per_image.argmax(dim=1) == labels).float().mean()
        t2i = (per_text.argmax(dim=1) == labels).float().mean()
        return torch.stack([loss.detach(), i2t, t2i]).float()


def _resume(engine, source: Path | None, outcome: TrainOutcome) -> None:
    state = checkpoint.load_latest(engine, source) if source is not None else None
    if state:
        outcome.steps = outcome.resumed_from = int(state["step"])
        outcome.samples_seen = int(state["samples_seen"])
        outcome.history = {k: list(state["history"].get(k, [])) for k in HISTORY_KEYS}
        log.info("resuming after step %d (%d samples seen)", outcome.steps, outcome.samples_seen)


def train(model: LLM2CLIPModel, cfg: TrainVisionConfig, *, plan: TrainPlan, batches: Batches,
          ctx: DistContext, seed: int, ckpt_dir: checkpoint.CheckpointStore | None,
          resume_from: Path | None = None,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainOutcome:
    """Train ``model`` through DeepSpeed; every rank calls it.

    Args:
        model: The model (already on ``ctx.device``, fp32); DeepSpeed wraps it.
        cfg: Stage config (optimizer, ZeRO, clipping, checkpoint and log intervals).
        plan: Steps and batch sizes (:func:`plan_training`).
        batches: ``batches(start, total)`` -> micro-batches ``start .. total-1`` as dicts with
            ``pixels (B, 3, S, S)`` and ``text (B, D_llm)``.
        ctx: The distributed context.
        seed: Base seed (per-micro-batch torch RNG).
        ckpt_dir: Checkpoint store (prepared with ``checkpoint.prepare_dir``); None = none.
        resume_from: Checkpoint dir to continue from (its ``latest``); None = fresh start.
        on_log: Called on rank 0 every ``cfg.log_every`` steps with window averages.

    Returns:
        The outcome, including the full fp32 parameters.
    """
    from tqdm.auto import tqdm

    engine = ds_engine.build_engine(model, cfg, world_size=ctx.world_size, total_steps=plan.total_steps,
                                    precision=plan.precision)
    outcome = TrainOutcome()
    _resume(engine, resume_from, outcome)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision, torch.float32)
    per_rank = cfg.batch_size * plan.accumulation
    engine.train()
    window, started = _Window(), time.monotonic()
    bar = tqdm(total=plan.total_steps, initial=outcome.steps, desc="train_vision", unit="step",
               disable=not ctx.is_main, mininterval=2.0)
    micro, step_stats, data_time = outcome.steps * plan.accumulation, [], 0.0
    tick = step_start = time.perf_counter()
    for batch in batches(micro, plan.total_steps * plan.accumulation):
        data_time += time.perf_counter() - tick
        torch.manual_seed(_step_seed(seed, micro, ctx.rank))
        step_stats.append(_micro_step(engine, batch, dtype, ctx.device))
        micro += 1
        if micro % plan.accumulation:
            tick = time.perf_counter()
            continue
        scale = ds_engine.clamp_logit_scale(engine.module, LOGIT_SCALE_MAX)
        stats = torch.stack(step_stats).mean(dim=0)
        if ctx.world_size > 1:  # one small all-reduce per step: mean over ranks
            torch.distributed.all_reduce(stats)
            stats /= ctx.world_size
        loss, i2t, t2i = (float(v) for v in stats)
        batch_time = time.perf_counter() - step_start
        outcome.steps += 1
        outcome.samples_seen += plan.global_batch
        values = {"loss": loss, "lr": max(engine.get_lr()), "logit_scale": scale, "i2t_acc": i2t,
                  "t2i_acc": t2i, "samples_per_second": plan.global_batch / batch_time, "data_time": data_time,
                  "batch_time": batch_time}
        for key in HISTORY_KEYS:
            outcome.history[key].append(values[key])
        window.add(values | {"scale": math.exp(scale), "samples_per_second_per_gpu": per_rank / batch_time})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{values['samples_per_second']:.1f}", refresh=False)
        if ctx.is_main and on_log is not None and (outcome.steps % cfg.log_every == 0
                                                   or outcome.steps == plan.total_steps):
            on_log(outcome.steps, window.flush())
        if ckpt_dir is not None and (outcome.steps == plan.total_steps or (
                cfg.checkpoint_every and outcome.steps % cfg.checkpoint_every == 0)):
            state = {"step": outcome.steps, "samples_seen": outcome.samples_seen, "history": outcome.history}
            checkpoint.save(engine, ckpt_dir, outcome.steps, state, ctx, keep=cfg.keep_checkpoints)
        step_stats, data_time = [], 0.0
        tick = step_start = time.perf_counter()
    bar.close()
    outcome.wall_time_s = time.monotonic() - started
    done = outcome.steps - outcome.resumed_from
    outcome.samples_per_second = done * plan.global_batch / max(outcome.wall_time_s, 1e-9)
    if outcome.steps != plan.total_steps:
        raise RuntimeError(f"the data ran out after {outcome.steps} of {plan.total_steps} steps")
    outcome.params = ds_engine.full_fp32_parameters(engine.module)
    log.info("trained %d steps (%d resumed), %d samples, %.1f samples/s, final loss %.4f",
             outcome.steps, outcome.resumed_from, outcome.samples_seen, outcome.samples_per_second,
             outcome.history["loss"][-1] if outcome.history["loss"] else float("nan"))
    return outcome


def export_model(model: LLM2CLIPModel, params: dict[str, torch.Tensor]) -> LLM2CLIPModel:
    """A plain fp32 CPU copy of ``model`` holding ``params`` (works when ``model`` is ZeRO-3 partitioned).

    The copy is rebuilt from the tower's export spec (no pretrained dir read again) and loaded
    strictly, so a missing or extra tensor is an error.
    """
    from llm2clip.vision.towers import build_tower

    tower = build_tower(model.tower.export_spec())
    tower.preprocess = model.tower.preprocess
    clone = LLM2CLIPModel(tower, llm_dim=model.llm_dim, embed_dim=model.embed_dim,
                          adapter_blocks=model.adapter.num_blocks, adapter_expansion=model.adapter.expansion,
                          caption_encoder=model.caption_encoder,
                          caption_encoder_fingerprint=model.caption_encoder_fingerprint)
    clone.source_spec = model.source_spec
    buffers = dict(model.named_buffers())
    wanted = clone.state_dict()
    state = {k: params[k] if k in params else buffers[k].detach().cpu() for k in wanted}
    clone.load_state_dict(state, strict=True)
    return clone.eval()


@torch.no_grad()
def retrieval_embeddings(model: LLM2CLIPModel, batches: Iterable[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image features ``(N, E)`` and per caption field text features ``(N, E)`` (fp32, eval mode)."""
    model.eval()
    images: list[torch.Tensor] = []
    texts: dict[str, list[torch.Tensor]] = {}
    for pixels, by_field in batches:
        images.append(model.image_features(pixels))
        for name, text in by_field.items():
            texts.setdefault(name, []).append(model.text_features(text))
    if not images:
        return torch.empty(0, model.embed_dim), {}
    return torch.cat(images), {name: torch.cat(rows) for name, rows in texts.items()}


def training_flops(model: LLM2CLIPModel, pixels: torch.Tensor, text: torch.Tensor) -> int:
    """Model FLOPs of one forward + backward on this batch (for samples/s -> FLOP/s, MFU).

    Counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention); the CPU flash
    attention kernels are not in its table, so their standard formulas are added. Gradients
    are left zeroed.

    Args:
        model: A plain (not DeepSpeed-wrapped) model.
        pixels: ``(B, 3, S, S)``; text: ``(B, D_llm)``, on the model's device and dtype.
    """
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(g, q, k, v),
    }
    counter = fc.FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        image_features, text_features, scale = model(pixels, text)
        clip_loss(image_features, text_features, scale, gather=False).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
