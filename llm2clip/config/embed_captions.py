"""``embed_captions``: every caption -> key-aligned embedding sidecars."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llm2clip.config.base import ConfigError


@dataclass(frozen=True)
class EmbedCaptionsConfig:
    """embed_captions: every caption of every shard -> key-aligned embedding sidecars.

    Attributes:
        dtype: Stored dtype of the vectors (``float16`` halves the disk; ``float32`` exact).
        normalize: L2-normalise before storing (the adapter normalises anyway; the reference
            stores raw vectors). The manifest states which.
        max_tokens: Token budget of one forward pass, padding included: captions are sorted by
            length and packed until ``captions x longest`` would pass it. 0 = auto: 1024 on CPU
            (activations stay in cache; bigger was slower on the 2-core box), 16384 on CUDA.
        max_batch_size: Upper bound on captions per forward pass.
        num_workers: Processes embedding shards in parallel; each loads the encoder. 0 = auto:
            on CUDA one per GPU the process sees (``torch.cuda.device_count()``, which honours
            ``CUDA_VISIBLE_DEVICES``), on CPU one (its torch threads use every core). Worker
            ``w`` runs on ``cuda:w``; only more workers than GPUs, asked for here, share GPUs
            (round robin). Shards are split deterministically (``llm2clip.text.embed.assign_work``)
            and the output does not depend on the worker count (for a fixed ``threads`` on CPU,
            where the thread count decides the float summation order).
        threads: Torch threads per worker; 0 = ``cores // workers``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU), ``fp32``,
            ``bf16`` or ``fp16`` (GPU only).
        zeroshot_splits: Splits whose sample labels become zero-shot class sets; () = none.
        zeroshot_templates: Prompt templates with one ``{}``; () = the default ensemble of
            ``llm2clip.eval.zeroshot.DEFAULT_TEMPLATES``.
        model_cache_dir: GGUF conversion cache, used when ``caption_encoder`` is a model spec.
        max_length: Tokens per caption, template included (longer captions are cut; the stage
            counts them); 0 = the encoder's own budget from its settings file (what it was
            trained with). Another value makes other vectors than the encoder's own ``encode``.
    """

    dtype: Literal["float16", "float32"] = "float16"
    normalize: bool = True
    max_tokens: int = 0
    max_batch_size: int = 256
    num_workers: int = 0
    threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    zeroshot_splits: tuple[str, ...] = ("val",)
    zeroshot_templates: tuple[str, ...] = ()
    model_cache_dir: str = ".cache/models"
    max_length: int = 0

    def __post_init__(self) -> None:
        where = "embed_captions"
        if self.max_batch_size < 1:
            raise ConfigError(f"{where}.max_batch_size: must be >= 1, got {self.max_batch_size}")
        for key in ("max_tokens", "num_workers", "threads", "max_length"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        for t in self.zeroshot_templates:
            if t.count("{}") != 1:
                raise ConfigError(f"{where}.zeroshot_templates: {t!r} must contain exactly one '{{}}'")
