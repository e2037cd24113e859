"""MNTP: masked next-token prediction, LLM2Vec's optional pre-step before contrastive tuning.

With bidirectional attention, a share of the caption tokens (reference: 20%) is corrupted
(80% -> the mask token, 10% -> a random token, 10% kept, as HF's MLM collator) and token ``i``
is predicted from the LM-head output at position ``i - 1`` (the causal LM's shifted loss, with
labels only on the chosen tokens). The LoRA it trains is merged before contrastive tuning.
The mask token is the tokenizer's own, else "_" (LLM2Vec's ``blank`` type for Llama).
"""

from __future__ import annotations

import logging
import random

import torch
from torch import nn

from llm2clip.config import CaptionContrastiveConfig
from llm2clip.text.contrastive import add_lora, lora_engine, merge_lora
from llm2clip.text.encoder import bidirectional_mask, set_causal
from llm2clip.text.truncation import TruncationCount, tokens_cut
from llm2clip.train.distributed import DistContext, all_reduce_mean
from llm2clip.train.loop import StepLoop, step_seed

log = logging.getLogger(__name__)

IGNORE = -100


def mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, else the id of "_" (blank), else unk."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer("_", add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else int(tokenizer.unk_token_id)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special: torch.Tensor,
                probability: float, mask_id: int, vocab_size: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose and corrupt MNTP targets.

    Args:
        input_ids: ``(B, L)``.
        attention_mask: ``(B, L)`` 1 = real token.
        special: ``(B, L)`` bool, special tokens (never targets).
        probability: Share of eligible tokens to pick.
        mask_id: Replacement token id.
        vocab_size: For random replacements.
        generator: CPU generator (determinism).

    Returns:
        ``(corrupted input_ids, labels)``; labels are ``-100`` except at picked tokens. A token
        is eligible only if the token before it is real (it is predicted from there); every row
        with an eligible token gets at least one target.
    """
    real = attention_mask.bool()
    previous_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    eligible = real & previous_real & ~special
    picked = (torch.rand(input_ids.shape, generator=generator) < probability) & eligible
    empty = ~picked.any(1) & eligible.any(1)
    last_eligible = eligible.shape[1] - 1 - eligible.flip(1).int().argmax(1)
    picked[empty, last_eligible[empty]] = True
    labels = torch.where(picked, input_ids, IGNORE)
    draw = torch.rand(input_ids.shape, generator=generator)
    corrupted = torch.where(picked & (draw < 0.8), mask_id, input_ids)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    corrupted = torch.where(picked & (draw >= 0.8) & (draw < 0.9), random_ids, corrupted)
    return corrupted, labels


def _mntp_batch(tokenizer, texts: list[str], cfg: CaptionContrastiveConfig, step: int, rank: int,
                seed: int, mask_id: int, vocab_size: int, truncation: TruncationCount | None = None
                ) -> dict[str, torch.Tensor]:
    rng = random.Random(step_seed(seed, step, rank))
    chosen = [texts[rng.randrange(len(texts))] for _ in range(cfg.mntp_batch_size)]
    enc = tokenizer(chosen, padding=True, truncation=True, max_length=cfg.max_length,
                    return_special_tokens_mask=True, return_tensors="pt")
    if truncation is not None:
        truncation.add(tokens_cut(tokenizer, chosen, enc["attention_mask"].sum(1).tolist(), cfg.max_length))
    generator = torch.Generator().manual_seed(step_seed(seed, step, rank))
    ids, labels = mask_tokens(enc["input_ids"], enc["attention_mask"], enc["special_tokens_mask"].bool(),
                              cfg.mntp_probability, mask_id, vocab_size, generator)
    positions = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "position_ids": positions,
            "labels": labels}


class _MNTPModel(nn.Module):
    """Causal LM + the bidirectional mask; forward returns the MNTP loss."""

    def __init__(self, lm: nn.Module, bidirectional: bool) -> None:
        super().__init__()
        self.lm, self.bidirectional = lm, bidirectional

    def forward(self, input_ids, attention_mask, position_ids, labels) -> torch.Tensor:
        device = next(self.lm.parameters()).device
        mask = attention_mask.to(device)
        if self.bidirectional:
            mask = bidirectional_mask(self.lm.config, mask, self.lm.get_input_embeddings().weight.dtype)
        out = self.lm(input_ids=input_ids.to(device), attention_mask=mask,
                      position_ids=position_ids.to(device), labels=labels.to(device))
        return out.loss  # shifted CE: logits at i-1 predict the target at i


def train_mntp(causal_lm: nn.Module, tokenizer, texts: list[str], cfg: CaptionContrastiveConfig, *,
               seed: int, precision: str, ctx: DistContext, truncation: TruncationCount | None = None
               ) -> tuple[nn.Module, list[float]]:
    """Run ``cfg.mntp_steps`` MNTP steps with a fresh LoRA and return the merged causal LM.

    Args:
        causal_lm: An ``AutoModelForCausalLM`` (its LM head scores the masked tokens).
        tokenizer: Its tokenizer (padding handled; pad = eos if missing).
        texts: Training captions.
        cfg: Stage config (``mntp_*``, LoRA, ``bidirectional``, the shared training settings).
        seed: Base seed.
        precision: Resolved precision (:func:`llm2clip.train.precision.resolve_precision`).
        ctx: Distributed context (every rank calls this).
        truncation: Gets the captions cut at ``cfg.max_length``, summed over steps and ranks.

    Returns:
        The causal LM with the MNTP LoRA merged (plain HF model, fp32), and the mean loss over
        ranks of every step.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.bidirectional:
        set_causal(causal_lm, False)
    model = _MNTPModel(add_lora(causal_lm, cfg, cfg.gradient_checkpointing), cfg.bidirectional)
    engine = lora_engine(model, cfg, ctx, precision, total_steps=cfg.mntp_steps, lr=cfg.mntp_lr,
                         micro_batch=cfg.mntp_batch_size)
    mask_id, vocab = mask_token_id(tokenizer), causal_lm.config.vocab_size
    mntp_seed = seed + 17  # its own stream, so MNTP on/off does not change the contrastive data
    losses: list[float] = []
    cut = TruncationCount()

    def on_log(step: int, metrics: dict[str, float]) -> None:
        log.info("mntp step %d/%d loss %.4f", step, cfg.mntp_steps, metrics["loss"])

    with StepLoop(engine, "mntp", cfg.mntp_steps, cfg, ctx, on_log=on_log) as loop:
        for step in range(1, cfg.mntp_steps + 1):
            torch.manual_seed(step_seed(mntp_seed, step, ctx.rank))
            loss = engine(**_mntp_batch(tokenizer, texts, cfg, step, ctx.rank, mntp_seed, mask_id, vocab, cut))
            engine.backward(loss)
            engine.step()
            losses.append(float(all_reduce_mean(loss.detach())))  # a collective: every rank joins
            loop.end_step({"loss": losses[-1]}, dict)
    if truncation is not None:
        truncation.merge(cut.all_reduce(ctx.device))
    merged = merge_lora(model.lm)
    if cfg.bidirectional:
        set_causal(merged, True)  # the encoder decides attention again from its settings
    return merged, losses
