"""train_vision: vision tower + text adapter on frozen-LLM caption embeddings (LLM2CLIP stage 2).

Runs on every rank under ``torchrun --nproc-per-node N -m llm2clip train_vision ...`` (several
nodes too) and as a plain single process. Reads ``data`` (prepare_data) and ``embeddings``
(embed_captions, key-aligned sidecars); writes into ``vision_model``: the exported model
(``model.safetensors`` + ``llm2clip_config.json``), ``checkpoints/`` (DeepSpeed, resumable),
``metrics.json``, ``training_curve.png`` and, last, ``manifest.json``. A killed run started again
with the same config continues from its newest checkpoint (``resume: latest``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time

import torch

from llm2clip.config import CommonConfig, TrainVisionConfig
from llm2clip.io import StageError, output_dir
from llm2clip.stages import train_vision_io as artifacts
from llm2clip.tracking import Tracker
from llm2clip.train import checkpoint, vision_data, vision_trainer
from llm2clip.train.distributed import DistContext, run_on_every_rank
from llm2clip.train.precision import resolve_precision

log = logging.getLogger(__name__)
STAGE = "train_vision"


@dataclasses.dataclass(frozen=True)
class TrainVisionResult:
    """What the stage produced (the same on every rank; ``summary()`` is what the CLI prints)."""

    vision_model: str
    steps: int
    resumed_from: int
    samples_seen: int
    world_size: int
    final_loss: float
    logit_scale: float
    val_image_to_text_r1: float
    val_text_to_image_r1: float
    samples_per_second: float
    wall_time_s: float

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def run(cfg: TrainVisionConfig, common: CommonConfig, *, data: str, embeddings: str, vision_model: str,
        pipeline_run_id: str = "") -> TrainVisionResult:
    """Train on ``data`` + ``embeddings``; write the model and its checkpoints to ``vision_model``.

    Raises:
        StageError: inputs not finished / not aligned, a caption mix the embeddings lack, or
            a precision the hardware has not.
    """
    started = time.monotonic()
    return run_on_every_rank(
        STAGE, cfg, common, inputs={"data": data, "embeddings": embeddings}, pipeline_run_id=pipeline_run_id,
        body=lambda ctx, tracker: _run(cfg, common, ctx, tracker, data, embeddings, vision_model, started))


def _batches(cfg: TrainVisionConfig, inputs: artifacts.Inputs, model, seed: int, ctx: DistContext,
             endpoint: str):
    """``batches(start, total)`` for the trainer: a resumable loader over the train split."""
    pairs = vision_data.shard_pairs(inputs.data, inputs.embeddings, "train", inputs.data_manifest)
    transform = model.train_transform()

    def batches(start: int, total: int):
        stream = vision_data.TrainStream(
            pairs, transform, batch_size=cfg.batch_size, fields=inputs.fields, weights=inputs.weights,
            seed=seed, rank=ctx.rank, workers=cfg.workers, start=start, total=total,
            shuffle_buffer=cfg.shuffle_buffer, endpoint_url=endpoint)
        return vision_data.make_loader(stream, cfg.workers)

    return batches


def _run(cfg, common, ctx: DistContext, tracker: Tracker, data: str, embeddings: str, out_url: str,
         started: float) -> TrainVisionResult | None:
    seed, endpoint = common.seed + cfg.seed_offset, common.s3_endpoint_url
    inputs = artifacts.check_inputs(cfg, common, data, embeddings, verify=ctx.is_main)
    try:
        precision = resolve_precision(cfg.precision, ctx.device)
    except ValueError as err:
        raise StageError(f"train_vision.precision: {err}") from err
    plan = vision_trainer.plan_training(cfg, inputs.train_samples, ctx.world_size, precision)
    ckpt_dir, resume_from = artifacts.checkpoint_dir(cfg, common, inputs, out_url, ctx)
    torch.manual_seed(seed)  # the same initial weights on every rank (DeepSpeed broadcasts anyway)
    model = artifacts.build_model(cfg, inputs).to(ctx.device)
    tracker.log_params({"train_vision.derived.total_steps": plan.total_steps,
                        "train_vision.derived.global_batch": plan.global_batch,
                        "train_vision.derived.precision": precision, "world_size": ctx.world_size})
    log.info("train_vision: %d steps x %d samples (%d per epoch, %s, ZeRO-%d, %d ranks), %d parameters",
             plan.total_steps, plan.global_batch, plan.steps_per_epoch, precision, cfg.zero_stage,
             ctx.world_size, sum(p.numel() for p in model.parameters()))
    outcome = vision_trainer.train(
        model, cfg, plan=plan, batches=_batches(cfg, inputs, model, seed, ctx, endpoint), ctx=ctx, seed=seed,
        ckpt_dir=ckpt_dir, resume_from=resume_from, on_log=lambda step, m: tracker.log_metrics(m, step))
    result = None
    if ctx.is_main:
        exported = vision_trainer.export_model(model, outcome.params)
        val = artifacts.validate(exported, inputs, cfg, endpoint)
        kept = checkpoint.latest_tag(ckpt_dir.local) if cfg.keep_checkpoints else None
        if not cfg.keep_checkpoints:
            ckpt_dir.remove()  # keep_checkpoints: 0 -> none stay after a successful run
        with output_dir(out_url, endpoint) as out:  # kept checkpoints are in <out>/checkpoints already
            metrics = artifacts.write_outputs(out, exported, outcome, val, plan, inputs, cfg, common,
                                              ctx.world_size, time.monotonic() - started, kept)
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                step=outcome.steps)
            for name in ("training_curve.png", "metrics.json", "llm2clip_config.json", "manifest.json"):
                tracker.log_artifact(out / name)
        result = TrainVisionResult(
            str(out_url), outcome.steps, outcome.resumed_from, outcome.samples_seen, ctx.world_size,
            metrics["final_loss"], metrics["final_logit_scale"], metrics["val_image_to_text_R_at_1"],
            metrics["val_text_to_image_R_at_1"], outcome.samples_per_second, time.monotonic() - started)
        artifacts.log_summary(metrics, str(out_url))
    ctx.barrier()
    if ckpt_dir.remote and ctx.local_rank == 0:
        shutil.rmtree(ckpt_dir.local, ignore_errors=True)  # the node's staging copy of S3 checkpoints
    return result
