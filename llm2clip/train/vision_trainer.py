"""The train_vision step: LLM2CLIP model + a contrastive loss through DeepSpeed.

Every rank calls :func:`train`. Per micro-batch: forward both sides, the loss the model was built
for (``model.loss``, a name in :data:`llm2clip.losses.LOSSES`: CLIP's gathered-with-grad InfoNCE
or SigLIP's sigmoid loss; the loop only calls ``loss_fn(**model_out)["loss"]``), ``engine.backward``
and ``engine.step`` (DeepSpeed
accumulates, clips, steps the optimizer and the LR schedule at accumulation boundaries). After
each optimizer step ``logit_scale`` is clamped to ``[0, ln 100]`` (reference). Checkpoints carry
the step, samples seen and the metric history; the data stream is a pure function of the seed
and the micro-batch index (:mod:`llm2clip.train.vision_data`), so a resumed run continues with
exactly the batches and weights an uninterrupted one would have had.

With ``cfg.accumulation == "cached_features"`` an optimizer step of ``k`` micro-batches runs
:func:`cached_features_step` instead (open_clip ``--accum-freq``): the loss spans all ``k``
micro-batches of every rank, so the negatives are ``k x batch x world``, while the autograd graph
held at any time is one micro-batch's.

The batches come from a callable ``batches(start, total)`` so the same loop trains on prepared
shards (the stage), on synthetic tensors (the GPU benchmark) or on anything else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2clip.config import TrainVisionConfig
from llm2clip.losses import ContrastiveLoss, create_loss
from llm2clip.train import checkpoint
from llm2clip.train import engine as ds_engine
from llm2clip.train.distributed import DistContext
from llm2clip.train.loop import StepLoop, step_seed
from llm2clip.train.precision import torch_dtype
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


def _step_stats(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Detached ``[loss, i2t_acc, t2i_acc]`` of a loss output (accuracies of this rank's rows)."""
    with torch.no_grad():
        i2t = (out["logits_per_image"].argmax(dim=1) == out["labels"]).float().mean()
        t2i = (out["logits_per_text"].argmax(dim=1) == out["labels"]).float().mean()
        return torch.stack([out["loss"].detach(), i2t, t2i]).float()


def _micro_step(engine, loss_fn: ContrastiveLoss, batch: dict[str, Any], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Forward + loss + backward + ``engine.step`` of one micro-batch; returns detached
    ``[loss, i2t_acc, t2i_acc]`` of this rank (accuracies of its own block of the logits)."""
    pixels = batch["pixels"].to(device, dtype, non_blocking=True)  # (B, 3, S, S)
    text = batch["text"].to(device, non_blocking=True)  # (B, D_llm); the adapter normalises in fp32
    out = loss_fn(**engine(pixels, text))
    engine.backward(out["loss"])
    engine.step()
    return _step_stats(out)


@contextlib.contextmanager
def _norm_stats_kept(module: torch.nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running statistics on exit: the no-grad pass of
    :func:`cached_features_step` must not update them (the grad pass does, once per micro-batch)."""
    norms = [m for m in module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [{name: buf.clone() for name, buf in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(norm, name).copy_(value)


SCALARS = ("logit_scale", "logit_bias")  # model outputs shared by every row, not concatenated


def cached_features_step(engine, loss_fn: ContrastiveLoss, batches: Sequence[dict[str, Any]],
                         seeds: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One optimizer step over ``k`` micro-batches whose loss spans all of them (open_clip
    ``--accum-freq``, ``train_vision.accumulation: cached_features``).

    1. Forward every micro-batch without grad; keep its features (``image_features``,
       ``text_features``: every model output but the scalars ``logit_scale``/``logit_bias``).
    2. For each micro-batch ``j``: forward it again *with* grad, build the step's features
       ``(kB, D)`` by putting the fresh block ``j`` among the cached ones, compute the loss over
       the whole accumulated batch (it still gathers across ranks, so the negatives are
       ``k x B x world``) and ``engine.backward`` it; ``engine.step()`` (DeepSpeed steps the
       optimizer at the ``k``-th).

    Arithmetic: the cached blocks equal the fresh ones in value (same weights, same inputs, and
    each micro-batch's two forwards run under the same seed, ``seeds[j]``, so dropout and drop
    path draw the same masks), so every pass computes the same full loss ``L``, and pass ``j``
    back-propagates ``dL/d(block j) . d(block j)/dθ``. Summed over the ``k`` passes that is exactly
    ``dL/dθ`` -- the gradient of one big batch of ``kB`` rows -- so the passes must *not* be
    divided by ``k``: ``scale_wrt_gas=False`` (DeepSpeed divides by gradient_accumulation_steps
    by default). ``logit_scale``/``logit_bias`` enter ``L`` directly, not through a block, so each
    pass would add the full ``dL/ds`` (``k`` times too much, as open_clip does); they carry grad
    in the first pass only. Across ranks DeepSpeed averages as for any batch.

    BatchNorm running statistics are left as the grad pass sets them (the no-grad pass restores
    them); BatchNorm still normalises each micro-batch with its own statistics, so a BatchNorm
    tower matches a big batch only approximately.

    Args:
        engine: The DeepSpeed engine (``gradient_accumulation_steps == len(batches)``).
        loss_fn: The model's loss object (:func:`llm2clip.losses.create_loss`).
        batches: ``k`` micro-batches: ``pixels (B, 3, S, S)``, ``text (B, D_llm)``.
        seeds: The torch seed of each micro-batch (:func:`llm2clip.train.loop.step_seed`).
        dtype: Pixel dtype of the engine's precision.
        device: This rank's device.

    Returns:
        Detached ``[loss, i2t_acc, t2i_acc]`` of the full accumulated batch of this rank.
    """
    inputs = [(b["pixels"].to(device, dtype, non_blocking=True), b["text"].to(device, non_blocking=True))
              for b in batches]
    cached: list[dict[str, torch.Tensor]] = []
    with torch.no_grad(), _norm_stats_kept(engine.module):
        for (pixels, text), seed in zip(inputs, seeds, strict=True):
            torch.manual_seed(seed)
            cached.append({k: v for k, v in engine(pixels, text).items() if k not in SCALARS})
    out = None
    for j, ((pixels, text), seed) in enumerate(zip(inputs, seeds, strict=True)):
        torch.manual_seed(seed)
        fresh = engine(pixels, text)
        features = {k: torch.cat([c[k] for c in cached[:j]] + [fresh[k]] + [c[k] for c in cached[j + 1:]])
                    for k in cached[j]}  # (kB, D) each, block j with grad
        scalars = {k: fresh[k] if j == 0 else fresh[k].detach() for k in SCALARS if k in fresh}
        out = loss_fn(**features, **scalars)
        engine.backward(out["loss"], scale_wrt_gas=False)
        engine.step()
        del fresh, features  # also frees the detached exp(logit_scale) node, which backward did not
    return _step_stats(out)


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
    engine = ds_engine.build_engine(
        model, model.param_groups(cfg.lr, cfg.weight_decay, cfg.layer_decay), cfg, world_size=ctx.world_size,
        precision=plan.precision, total_steps=plan.total_steps, schedule=cfg.schedule,
        accumulation=plan.accumulation)
    loss_fn = create_loss(model.loss)
    outcome = TrainOutcome()
    loop = StepLoop(engine, "train_vision", plan.total_steps, cfg, ctx, ckpt_dir, on_log)
    state = loop.resume(resume_from)
    if state:
        outcome.steps = outcome.resumed_from = loop.step
        outcome.samples_seen = int(state["samples_seen"])
        outcome.history = {k: list(state["history"].get(k, [])) for k in HISTORY_KEYS}
        log.info("%d samples seen before the resume", outcome.samples_seen)
    dtype = torch_dtype(plan.precision)
    per_rank = cfg.batch_size * plan.accumulation
    micro, step_stats, data_time = outcome.steps * plan.accumulation, [], 0.0
    cached, pending = cfg.accumulation == "cached_features" and plan.accumulation > 1, []
    with loop:
        tick = step_start = time.perf_counter()
        for batch in batches(micro, plan.total_steps * plan.accumulation):
            data_time += time.perf_counter() - tick
            if cached:
                pending.append(batch)
            else:
                torch.manual_seed(step_seed(seed, micro, ctx.rank))
                step_stats.append(_micro_step(engine, loss_fn, batch, dtype, ctx.device))
            micro += 1
            if micro % plan.accumulation:
                tick = time.perf_counter()
                continue
            if cached:  # the whole step at once: its loss spans the k micro-batches
                seeds = [step_seed(seed, m, ctx.rank) for m in range(micro - plan.accumulation, micro)]
                step_stats.append(cached_features_step(engine, loss_fn, pending, seeds, dtype, ctx.device))
                pending = []
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
                      "t2i_acc": t2i, "samples_per_second": plan.global_batch / batch_time,
                      "data_time": data_time, "batch_time": batch_time}
            for key in HISTORY_KEYS:
                outcome.history[key].append(values[key])
            logged = values | {"scale": math.exp(scale), "samples_per_second_per_gpu": per_rank / batch_time}
            if engine.module.logit_bias is not None:
                logged["logit_bias"] = float(engine.module.logit_bias.detach().float().reshape(-1)[0])
            loop.end_step(logged, lambda: {"samples_seen": outcome.samples_seen, "history": outcome.history})
            step_stats, data_time = [], 0.0
            tick = step_start = time.perf_counter()
    outcome.wall_time_s = loop.wall_time_s
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
                          logit_bias_init=0.0 if model.logit_bias is not None else None, loss=model.loss,
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
        create_loss(model.loss, gather=False)(**model(pixels, text))["loss"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
