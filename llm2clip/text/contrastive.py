"""Caption-contrastive fine-tuning (LLM2Vec supervised SimCSE on captions) with LoRA + DeepSpeed.

Each step every rank takes ``batch_size`` images of the global batch; per image two distinct
captions become (query, positive) and a caption of the positive's type from another image is
the hard negative. With ``text_pair_ratio`` > 0 a share of the global batch is text pairs
instead (:mod:`llm2clip.text.pairs`). The loss (:func:`llm2clip.losses.caption_contrastive_loss`)
lets every query compete against all positives and hard negatives of all ranks.

Determinism and resume: the batch of (step, rank) and the RNG state used in that step are pure
functions of ``(seed, step, rank)``, so a run restarted from a checkpoint at step ``k`` sees
exactly the data and dropout masks an uninterrupted run would have seen from ``k + 1`` on.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from llm2clip.config import CaptionContrastiveConfig
from llm2clip.hf import set_activation_checkpointing
from llm2clip.losses import caption_contrastive_loss
from llm2clip.text.data import ImageCaptions
from llm2clip.text.encoder import CaptionEncoder
from llm2clip.text.pairs import TextPair, TextPairSampler, split_evenly
from llm2clip.text.truncation import TruncationCount
from llm2clip.train import checkpoint
from llm2clip.train.distributed import DistContext, all_reduce_mean
from llm2clip.train.engine import build_engine, full_fp32_parameters
from llm2clip.train.loop import StepLoop, step_seed
from llm2clip.train.optim import trainable_groups

log = logging.getLogger(__name__)


class StepBatch(NamedTuple):
    """What one rank embeds in one step (``n`` each; captions first, then text pairs)."""

    queries: list[str]
    positives: list[str]
    negatives: list[str]
    instructions: list[str]  # put before each query


class PairSampler:
    """Deterministic (query, positive, hard negative) triples per step and rank.

    Images are visited in a fresh permutation every epoch, ``world * batch_size`` distinct
    images per step (no image appears twice in one global batch). With text pairs,
    ``round(text_ratio * world * batch_size)`` of those slots are text pairs (spread evenly over
    ranks, their own permutation and epochs), the rest images.

    Args:
        images: Captions per image as ``[(field, caption), ...]``; images with < 2 are dropped.
        batch_size: Pairs per rank and step.
        world_size: Number of ranks.
        seed: Base seed.
        instruction: Put before every caption query.
        text_pairs: Text pairs to mix in (each with its own instruction).
        text_ratio: Share of the global batch that is text pairs (0: captions only).
    """

    def __init__(self, images: list[list[tuple[str, str]]], batch_size: int, world_size: int,
                 seed: int, *, instruction: str = "", text_pairs: Sequence[TextPair] = (),
                 text_ratio: float = 0.0) -> None:
        self.images = [i for i in images if len(i) >= 2]
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.instruction = instruction
        self.global_batch = batch_size * world_size
        self.text_per_step = min(round(text_ratio * self.global_batch), self.global_batch - 1) if text_ratio else 0
        if text_ratio and not self.text_per_step:
            raise ValueError(f"text_pair_ratio {text_ratio} of a global batch of {self.global_batch} is no "
                             "text pair at all: raise text_pair_ratio or batch_size")
        self.captions_per_step = self.global_batch - self.text_per_step
        if len(self.images) < max(2, self.captions_per_step):
            raise ValueError(f"{len(self.images)} images with two captions, but a global batch needs "
                             f"{self.captions_per_step} (batch_size x ranks): lower batch_size")
        self.steps_per_epoch = len(self.images) // self.captions_per_step
        self.text = TextPairSampler(text_pairs, self.text_per_step, seed) if self.text_per_step else None

    def batch(self, step: int, rank: int) -> StepBatch:
        """Queries, positives, hard negatives and query instructions (``batch_size`` each) of 1-based
        ``step``."""
        text_offset, text_count = split_evenly(self.text_per_step, self.world_size, rank)
        epoch, within = divmod(step - 1, self.steps_per_epoch)
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = within * self.captions_per_step + rank * self.batch_size - text_offset
        rng = random.Random(step_seed(self.seed, step, rank))
        queries, positives, negatives = [], [], []
        for index in perm[start : start + self.batch_size - text_count].tolist():
            (_, query), (kind, positive) = rng.sample(self.images[index], 2)
            other = rng.randrange(len(self.images) - 1)
            other += other >= index  # any image but this one
            same_kind = [c for f, c in self.images[other] if f == kind] or [c for _, c in self.images[other]]
            queries.append(query)
            positives.append(positive)
            negatives.append(rng.choice(same_kind))
        instructions = [self.instruction] * len(queries)
        for query, positive, negative, instruction in (self.text.take(step, rank, text_offset, text_count)
                                                       if self.text is not None else ()):
            queries.append(query)
            positives.append(positive)
            negatives.append(negative)
            instructions.append(instruction)
        return StepBatch(queries, positives, negatives, instructions)


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
        set_activation_checkpointing(model)
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


def lora_engine(model: torch.nn.Module, cfg: CaptionContrastiveConfig, ctx: DistContext, precision: str, *,
                total_steps: int, lr: float | None = None, micro_batch: int | None = None):
    """The DeepSpeed engine of a LoRA run (caption_contrastive, MNTP): one group of the trainable
    parameters, linear warmup then decay (the HF Trainer default LLM2Vec used).

    The optimizer is torch's default multi-tensor AdamW, as these trainers always had: the fused
    kernel is the same maths with other rounding, which moved the demo's val R@1 by 2 of 280 hits
    through the embeddings (tests/e2e pins it); switch it on with a re-pin, not silently.
    """
    return build_engine(model, trainable_groups(model, cfg.weight_decay), cfg, world_size=ctx.world_size,
                        precision=precision, total_steps=total_steps, schedule="linear", lr=lr,
                        micro_batch=micro_batch, fused_optimizer=False)


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Merge the LoRA into fp32 base weights and drop the wrapper (call on every rank).

    Under bf16 the exact weights live in DeepSpeed's fp32 master copy, so those are copied in
    first (a collective under ZeRO: every rank must call this in step).
    """
    masters = full_fp32_parameters(peft_model, trainable_only=True)
    peft_model.float()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name in masters:
                p.copy_(masters[name].to(p.device))
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
        truncation: Texts cut at ``max_length`` over all steps and ranks (resumed runs included).
        text_pairs_per_step: Text pairs in each global batch (0: captions only).
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    wall_time_s: float = 0.0
    truncation: TruncationCount = field(default_factory=TruncationCount)
    text_pairs_per_step: int = 0


def _embed_step(engine, encoder: CaptionEncoder, sampler: PairSampler, step: int, rank: int,
                hard_negatives: bool, buckets: int = 2) -> list[torch.Tensor]:
    """Embed the step's queries, positives (and hard negatives) with gradient.

    Short and dense captions differ a lot in length, so the texts are sorted by length and run
    as ``buckets`` forward passes (about half the padding of one mixed batch); embeddings do not
    depend on their batch neighbours, so the result is the same as one pass.

    Returns:
        ``[queries (B, D), positives (B, D)]`` plus ``hard negatives (B, D)`` if enabled.
    """
    queries, positives, negatives, query_instructions = sampler.batch(step, rank)
    texts = queries + positives + (negatives if hard_negatives else [])
    instructions = query_instructions + [""] * (len(texts) - len(queries))
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
          caption_fields: tuple[str, ...], seed: int, precision: str,
          ckpt_dir: checkpoint.CheckpointStore | None, ctx: DistContext,
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          text_pairs: Sequence[TextPair] = ()) -> TrainOutcome:
    """Train ``encoder.model`` (a peft LoRA model) in place through DeepSpeed; every rank calls it.

    Args:
        encoder: Encoder whose ``model`` already carries the LoRA to train.
        images: Training images.
        cfg: Stage config (batch, lr, warmup, steps, scale, DeepSpeed, checkpoints).
        caption_fields: Caption order (``common.caption_fields``).
        seed: Base seed for data order and dropout.
        precision: Resolved precision (:func:`llm2clip.train.precision.resolve_precision`).
        ckpt_dir: Checkpoint store (prepared with ``checkpoint.prepare_dir``), or None for none.
        ctx: The distributed context.
        on_log: Called on rank 0 every ``cfg.log_every`` steps with ``(step, window averages)``
            of ``train_loss`` and ``lr``.
        text_pairs: Text pairs mixed in at ``cfg.text_pair_ratio`` (:mod:`llm2clip.text.pairs`).

    Returns:
        The loss curve and step counts.
    """
    sampler = PairSampler([i.flat(caption_fields) for i in images], cfg.batch_size, ctx.world_size, seed,
                          instruction=cfg.instruction, text_pairs=text_pairs,
                          text_ratio=cfg.text_pair_ratio if text_pairs else 0.0)
    if sampler.text_per_step:
        log.info("global batch of %d: %d caption pairs + %d text pairs", sampler.global_batch,
                 sampler.captions_per_step, sampler.text_per_step)
    engine = lora_engine(encoder, cfg, ctx, precision, total_steps=cfg.max_steps)
    outcome = TrainOutcome(text_pairs_per_step=sampler.text_per_step)
    loop = StepLoop(engine, "caption_contrastive", cfg.max_steps, cfg, ctx, ckpt_dir,
                    on_log and (lambda step, m: on_log(step, {"train_loss": m["loss"], "lr": m["lr"]})))
    state = loop.resume(ckpt_dir.local if ckpt_dir is not None else None)
    before = TruncationCount()  # what the steps before a resume cut (all ranks)
    if state:
        outcome.losses = list(state["losses"])
        outcome.resumed_from = outcome.steps = loop.step
        before = TruncationCount.from_dict(state.get("truncation"))

    def cut_so_far() -> TruncationCount:  # a collective: every rank checkpoints (and ends) together
        return TruncationCount().merge(before).merge(cut.all_reduce(ctx.device))

    with loop, encoder.count_truncation() as cut:  # this process's steps, this rank
        for step in range(outcome.steps + 1, cfg.max_steps + 1):
            torch.manual_seed(step_seed(seed, step, ctx.rank))  # dropout of this step, resumable
            parts = _embed_step(engine, encoder, sampler, step, ctx.rank, cfg.hard_negatives)
            loss = caption_contrastive_loss(*parts, scale=cfg.scale)
            engine.backward(loss)
            engine.step()
            outcome.losses.append(float(all_reduce_mean(loss.detach())))
            outcome.steps = step
            loop.end_step({"loss": outcome.losses[-1], "lr": engine.get_lr()[0]},
                          lambda: {"losses": outcome.losses, "truncation": cut_so_far().to_dict()})
    outcome.truncation = cut_so_far()
    outcome.wall_time_s = loop.wall_time_s
    encoder.model = merge_lora(encoder.model)
    encoder.eval()
    return outcome
