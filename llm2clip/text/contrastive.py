"""Caption-contrastive fine-tuning (LLM2Vec supervised SimCSE on captions) with LoRA + DeepSpeed.

Each step every rank takes ``batch_size`` images of the global batch; per image two distinct
captions become (query, positive) and a caption of the positive's type from another image is
the hard negative. The loss (:func:`llm2clip.losses.caption_contrastive_loss`) lets every query
compete against all positives and hard negatives of all ranks.

Determinism and resume: the batch of (step, rank) and the RNG state used in that step are pure
functions of ``(seed, step, rank)``, so a run restarted from a checkpoint at step ``k`` sees
exactly the data and dropout masks an uninterrupted run would have seen from ``k + 1`` on.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm2clip.config import CaptionContrastiveConfig
from llm2clip.losses import caption_contrastive_loss
from llm2clip.text.data import ImageCaptions
from llm2clip.text.encoder import CaptionEncoder
from llm2clip.train import checkpoint
from llm2clip.train.distributed import DistContext, all_reduce_mean

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one (step, rank): data order and dropout derive from it, nothing else."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


class PairSampler:
    """Deterministic (query, positive, hard negative) caption triples per step and rank.

    Images are visited in a fresh permutation every epoch, ``world * batch_size`` distinct
    images per step (no image appears twice in one global batch).

    Args:
        images: Captions per image as ``[(field, caption), ...]``; images with < 2 are dropped.
        batch_size: Images per rank and step.
        world_size: Number of ranks.
        seed: Base seed.
    """

    def __init__(self, images: list[list[tuple[str, str]]], batch_size: int, world_size: int,
                 seed: int) -> None:
        self.images = [i for i in images if len(i) >= 2]
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.global_batch = batch_size * world_size
        if len(self.images) < max(2, self.global_batch):
            raise ValueError(f"{len(self.images)} images with two captions, but a global batch needs "
                             f"{self.global_batch} (batch_size x ranks): lower batch_size")
        self.steps_per_epoch = len(self.images) // self.global_batch

    def batch(self, step: int, rank: int) -> tuple[list[str], list[str], list[str]]:
        """Queries, positives and hard negatives (``batch_size`` each) of 1-based ``step``."""
        epoch, within = divmod(step - 1, self.steps_per_epoch)
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = within * self.global_batch + rank * self.batch_size
        rng = random.Random(step_seed(self.seed, step, rank))
        queries, positives, negatives = [], [], []
        for index in perm[start : start + self.batch_size].tolist():
            (_, query), (kind, positive) = rng.sample(self.images[index], 2)
            other = rng.randrange(len(self.images) - 1)
            other += other >= index  # any image but this one
            same_kind = [c for f, c in self.images[other] if f == kind] or [c for _, c in self.images[other]]
            queries.append(query)
            positives.append(positive)
            negatives.append(rng.choice(same_kind))
        return queries, positives, negatives


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 where the hardware has it (CUDA with bf16), else fp32."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _last_layers(model: torch.nn.Module, count: int) -> dict:
    """peft arguments that put the LoRA only into the last ``count`` transformer layers."""
    total = int(model.config.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total:
            return {"layers_to_transform": list(range(max(0, total - count), total)),
                    "layers_pattern": name.split(".")[-1]}
    raise ValueError(f"lora_layers: no list of {total} layers found in {type(model).__name__}")


def add_lora(model: torch.nn.Module, cfg: CaptionContrastiveConfig, gradient_checkpointing: bool = False):
    """Freeze ``model`` and wrap it with a fresh LoRA (peft); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    kwargs = cfg.lora_kwargs()
    if cfg.lora_layers:
        kwargs.update(_last_layers(model, cfg.lora_layers))
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d: %d trainable of %d parameters (%.2f%%)", cfg.lora_r, trainable, total,
             100 * trainable / total)
    return peft_model


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Merge the LoRA into fp32 base weights and drop the wrapper (call on every rank).

    Under bf16 the exact weights live in DeepSpeed's fp32 master copy, so those are copied in
    first (a collective under ZeRO: every rank must call this in step).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {name: safe_get_full_fp32_param(p) for name, p in peft_model.named_parameters()
               if p.requires_grad}
    peft_model.float()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if masters.get(name) is not None:
                p.copy_(masters[name].to(p.device, torch.float32))
    return peft_model.merge_and_unload()


@dataclass
class TrainOutcome:
    """What a training run did.

    Attributes:
        losses: Mean loss over ranks per step (``losses[k]`` is step ``k + 1``), resumed runs
            included.
        steps: Last step done.
        resumed_from: Step of the checkpoint the run resumed from (0: fresh start).
        wall_time_s: Seconds spent in this process's loop.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    wall_time_s: float = 0.0


def _embed_step(engine, encoder: CaptionEncoder, sampler: PairSampler, step: int, rank: int,
                instruction: str, hard_negatives: bool, buckets: int = 2) -> list[torch.Tensor]:
    """Embed the step's queries, positives (and hard negatives) with gradient.

    Short and dense captions differ a lot in length, so the texts are sorted by length and run
    as ``buckets`` forward passes (about half the padding of one mixed batch); embeddings do not
    depend on their batch neighbours, so the result is the same as one pass.

    Returns:
        ``[queries (B, D), positives (B, D)]`` plus ``hard negatives (B, D)`` if enabled.
    """
    queries, positives, negatives = sampler.batch(step, rank)
    texts = queries + positives + (negatives if hard_negatives else [])
    instructions = [instruction] * len(queries) + [""] * (len(texts) - len(queries))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    size = -(-len(order) // buckets)
    parts = []
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        parts.append(engine(**encoder.tokenize([texts[i] for i in idx], [instructions[i] for i in idx])))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    emb = torch.cat(parts)[inverse.to(parts[0].device)]  # back to [queries; positives; negatives]
    return list(emb.split(len(queries)))


def train(encoder: CaptionEncoder, images: list[ImageCaptions], cfg: CaptionContrastiveConfig, *,
          caption_fields: tuple[str, ...], seed: int, ckpt_dir: checkpoint.CheckpointStore | None,
          ctx: DistContext,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainOutcome:
    """Train ``encoder.model`` (a peft LoRA model) in place through DeepSpeed; every rank calls it.

    Args:
        encoder: Encoder whose ``model`` already carries the LoRA to train.
        images: Training images.
        cfg: Stage config (batch, lr, warmup, steps, scale, DeepSpeed, checkpoints).
        caption_fields: Caption order (``common.caption_fields``).
        seed: Base seed for data order and dropout.
        ckpt_dir: Checkpoint store (prepared with ``checkpoint.prepare_dir``), or None for none.
        ctx: The distributed context.
        on_log: Called on rank 0 every ``cfg.log_every`` steps with ``(step, metrics)``.

    Returns:
        The loss curve and step counts.
    """
    from tqdm.auto import tqdm

    sampler = PairSampler([i.flat(caption_fields) for i in images], cfg.batch_size, ctx.world_size, seed)
    engine = checkpoint.build_engine(
        encoder, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps, ds_config=cfg.deepspeed_config(bf16=use_bf16(cfg.precision, ctx.device)),
    )
    outcome = TrainOutcome()
    if ckpt_dir is not None and (state := checkpoint.load_latest(engine, ckpt_dir.local)) is not None:
        outcome.losses = list(state["losses"])
        outcome.resumed_from = outcome.steps = int(state["step"])
        log.info("resuming at step %d of %d", outcome.steps + 1, cfg.max_steps)
    engine.train()
    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=outcome.steps, desc="caption_contrastive", unit="step",
               disable=not ctx.is_main, mininterval=2.0)
    for step in range(outcome.steps + 1, cfg.max_steps + 1):
        torch.manual_seed(step_seed(seed, step, ctx.rank))  # dropout of this step, resumable
        parts = _embed_step(engine, encoder, sampler, step, ctx.rank, cfg.instruction, cfg.hard_negatives)
        loss = caption_contrastive_loss(*parts, scale=cfg.scale)
        engine.backward(loss)
        engine.step()
        mean_loss = float(all_reduce_mean(loss.detach()))
        outcome.losses.append(mean_loss)
        outcome.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if ctx.is_main and on_log is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
            on_log(step, {"train_loss": mean_loss, "lr": engine.get_lr()[0]})
        if ckpt_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                and step < cfg.max_steps:
            checkpoint.save(engine, ckpt_dir, step, {"step": step, "losses": outcome.losses}, ctx)
    bar.close()
    outcome.wall_time_s = time.monotonic() - started
    encoder.model = merge_lora(encoder.model)
    encoder.eval()
    return outcome
